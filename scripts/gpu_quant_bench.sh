#!/usr/bin/env bash
# The quantization issue's figures on one GPU: Llama-3.1-8B shape, random bf16 weights quantized at
# load, batch-1 decode (ISL 128 / OSL 256) and throughput (ISL 128 / OSL 128, 1024 requests,
# concurrency 512) per weight format, bf16 first as the same-run baseline. Logs and JSON to $OUT.
set -uo pipefail
source scripts/gpu_env.sh
CFG=${CFG:-configs/llama-3.1-8b.json}
FORMATS=${FORMATS:-"none fp8 w8a16 w4a16"}
TPUT_FORMATS=${TPUT_FORMATS:-"none fp8"}
B="python3 -m rtllm.cli bench"
E="--model $CFG --dtype bfloat16 --device cuda"
for q in $FORMATS; do
    echo "=== batch-1 decode, --quant $q"
    $B latency $E --quant "$q" --isl 128 --osl 256 --num-requests 2 --output-json "$OUT/latency_$q.json" 2>&1 \
        | grep -v '^{'
done
for q in $TPUT_FORMATS; do
    echo "=== throughput ISL 128 / OSL 128, concurrency 512, --quant $q"
    $B throughput $E --quant "$q" --isl 128 --osl 128 --num-requests 1024 --concurrency 512 --max-batch-size 512 \
        --max-num-tokens 8192 --output-json "$OUT/tput_$q.json" 2>&1 | grep -v '^{'
done

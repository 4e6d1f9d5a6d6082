#!/usr/bin/env bash
# The MoE figures on one GPU: Qwen3-30B-A3B shape (128 experts, top-8), random bf16 weights, EP=1.
# Batch-1 decode against the bandwidth bound counted on active parameters, and throughput at
# ISL 128 / OSL 128, concurrency 256, with transformers in the same run. Logs and JSON to $OUT.
set -uo pipefail
source scripts/gpu_env.sh
CFG=${CFG:-configs/qwen3-30b-a3b.json}
B="python3 -m rtllm.cli bench"
E="--model $CFG --dtype bfloat16 --device cuda"
echo "=== batch-1 decode, ISL 128 / OSL 256"
$B latency $E --isl 128 --osl 256 --num-requests 2 --output-json "$OUT/moe_latency.json" 2>&1 | grep -v '^{'
echo "=== throughput ISL 128 / OSL 128, 256 requests, concurrency 256${MOE_HF:+, with transformers}"
$B throughput $E --isl 128 --osl 128 --num-requests 256 --concurrency 256 --max-batch-size 256 \
    --max-num-tokens 8192 ${MOE_HF:+--baseline hf} --output-json "$OUT/moe_tput.json" 2>&1 | grep -v '^{'

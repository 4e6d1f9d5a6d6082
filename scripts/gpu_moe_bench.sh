#!/usr/bin/env bash
# The MoE figures on one GPU: Qwen3-30B-A3B shape (128 experts, top-8), random bf16 weights, EP=1.
# Batch-1 decode against the bandwidth bound counted on active parameters, and throughput at
# ISL 128 / OSL 128, concurrency 256; transformers (MOE_HF=1) runs in its own line at concurrency
# MOE_HF_CONC (default 64: at 256 its batched expert GEMM runs out of memory beside 60 GB of
# weights), rtllm at the same concurrency in that run. Logs and JSON to $OUT.
set -uo pipefail
source scripts/gpu_env.sh
CFG=${CFG:-configs/qwen3-30b-a3b.json}
B="python3 -m rtllm.cli bench"
E="--model $CFG --dtype bfloat16 --device cuda"
echo "=== batch-1 decode, ISL 128 / OSL 256"
$B latency $E --isl 128 --osl 256 --num-requests 4 --output-json "$OUT/moe_latency.json" 2>&1 | grep -v '^{'
echo "=== throughput ISL 128 / OSL 128, 256 requests, concurrency 256"
$B throughput $E --isl 128 --osl 128 --num-requests 256 --concurrency 256 --max-batch-size 256 \
    --max-num-tokens 8192 --output-json "$OUT/moe_tput.json" 2>&1 | grep -v '^{'
if [ -n "${MOE_HF:-}" ]; then
    C=${MOE_HF_CONC:-64}
    echo "=== throughput ISL 128 / OSL 128, $C requests, concurrency $C, with transformers at batch $C"
    $B throughput $E --isl 128 --osl 128 --num-requests "$C" --concurrency "$C" --max-batch-size "$C" \
        --max-num-tokens 8192 --baseline hf --output-json "$OUT/moe_tput_hf.json" 2>&1 | grep -v '^{'
fi

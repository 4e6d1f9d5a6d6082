#!/usr/bin/env bash
# One command for the figures a session re-measures on one GPU, each line a `rtllm bench` run (ceilings
# measured in that run), logs and JSON to $OUT:
# - Llama-3.1-8B shape, ISL 128 / OSL 128, 1024 requests, concurrency 512: bf16, FP8 weights + FP8 KV,
#   FP8 weights (bf16 first: the same-run baseline); the Triton kernels compiled during each command
#   are listed (a compile inside the measured run stalls it);
# - batch-1 decode (ISL 128 / OSL 256) per weight format (FORMATS, default "none fp8 w8a16 w4a16");
# - Qwen3-30B-A3B shape batch-1 decode (MOE=0 skips it).
set -uo pipefail
source scripts/gpu_env.sh
CD=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
B="python3 -m rtllm.cli bench"
E="--model configs/llama-3.1-8b.json --dtype bfloat16 --device cuda"
T="--isl 128 --osl 128 --num-requests 1024 --concurrency 512 --max-batch-size 512 --max-num-tokens 8192"
i=0
for a in "" "--quant fp8 --kv-cache-dtype fp8" "--quant fp8"; do
    i=$((i + 1))
    echo "=== throughput ${a:-bf16}"
    touch /tmp/bench_mark
    $B throughput $E $T $a --output-json "$OUT/tput_$i.json" 2>&1 | grep -E "rtllm:|bound:"
    echo "    Triton kernels compiled during the command: $(find "$CD" -name '*.json' -newer /tmp/bench_mark \
        ! -name '__grp*' 2>/dev/null | wc -l)"
done
for q in ${FORMATS:-none fp8 w8a16 w4a16}; do
    echo "=== batch-1 decode, --quant $q"
    $B latency $E --quant "$q" --isl 128 --osl 256 --num-requests 2 --output-json "$OUT/latency_$q.json" 2>&1 \
        | grep -E "rtllm:|bound:"
done
if [ "${MOE:-1}" != 0 ]; then
    echo "=== MoE batch-1 decode (Qwen3-30B-A3B shape)"
    $B latency --model configs/qwen3-30b-a3b.json --dtype bfloat16 --device cuda --isl 128 --osl 256 \
        --num-requests 4 --output-json "$OUT/moe_latency.json" 2>&1 | grep -E "rtllm:|bound:"
fi

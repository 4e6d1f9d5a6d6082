#!/usr/bin/env bash
# The decode GEMV kernels on one GPU, in one command: tune / time them against the kernels of
# before (scripts/quant_kernel_tune.py -> $OUT/gemv_tuned.json), then batch-1 decode of the
# Llama-3.1-8B shape (random bf16 weights quantized at load, ISL 128 / OSL 256) per weight format
# with the tuned table, bf16 first as the same-run baseline. BEFORE="w4a16 fp8" adds runs of those
# formats with the GEMV kernels off (RTLLM_QUANT_GEMV=0: the kernels of before).
set -uo pipefail
source scripts/gpu_env.sh
CFG=${CFG:-configs/llama-3.1-8b.json}
FORMATS=${FORMATS:-"none w4a16 fp8 w8a16"}
BEFORE=${BEFORE:-""}
t0=$(date +%s)
python3 scripts/quant_kernel_tune.py --out "$OUT" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log"
echo "=== tune took $(( $(date +%s) - t0 )) s"
export RTLLM_QUANT_GEMV_CONFIG="$OUT/gemv_tuned.json"
B="python3 -m rtllm.cli bench latency --model $CFG --dtype bfloat16 --device cuda --isl 128 --osl 256 --num-requests 2"
for q in $FORMATS; do
    echo "=== batch-1 decode, --quant $q (GEMV kernels, tuned table)"
    $B --quant "$q" --output-json "$OUT/latency_$q.json" 2>&1 | grep -v '^{' | grep -v '^\s*$' | tail -4
done
for q in $BEFORE; do
    echo "=== batch-1 decode, --quant $q, RTLLM_QUANT_GEMV=0 (kernels of before)"
    RTLLM_QUANT_GEMV=0 $B --quant "$q" --output-json "$OUT/latency_${q}_before.json" 2>&1 | grep -v '^{' \
        | grep -v '^\s*$' | tail -4
done
echo "=== total $(( $(date +%s) - t0 )) s"

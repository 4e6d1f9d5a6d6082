#!/usr/bin/env bash
# The dense bf16 decode GEMV (rtllm.kernels.triton_quant_gemv.w16_gemv) and programmatic dependent launch
# on one GPU, logs to $OUT:
# 1. TESTS (default tests/gpu/test_gpu_dense_gemv.py; TESTS=tests/gpu for all GPU tests);
# 2. TUNE=1: the GEMV's tile / split tuning against F.linear at Llama-3.1-8B and Qwen3-30B-A3B shapes,
#    M = TUNE_M (default 1,2) (scripts/quant_kernel_tune.py --kinds w16 $TUNE_ARGS, e.g. --verbose; writes
#    $OUT/gemv_tuned.json, used below);
# 3. batch-1 decode (ISL 128 / OSL 256) of both models under each "RTLLM_DENSE_GEMV RTLLM_PDL" pair of
#    CONFIGS (default "0 0" "1 0" "0 1" "1 1"), interleaved ROUNDS times (MoE: MOE_ROUNDS; MOE=0 skips
#    it), each line a `rtllm bench latency` run with its bound; then each weight format of QUANT (e.g.
#    "w4a16 fp8") with both on.
set -uo pipefail
source scripts/gpu_env.sh
python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/gpu/test_gpu_dense_gemv.py} > "$OUT/tests.log" 2>&1
if [ "${TUNE:-0}" = 1 ]; then
    python3 scripts/quant_kernel_tune.py --kinds w16 --m ${TUNE_M:-1,2} --jobs 14 --out "$OUT" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" \
        | tail -16
    export RTLLM_QUANT_GEMV_CONFIG="$OUT/gemv_tuned.json"
fi
CONFIGS=${CONFIGS:-"0 0,1 0,0 1,1 1"}
B="python3 -m rtllm.cli bench latency --dtype bfloat16 --device cuda --isl 128 --osl 256"
run() {  # model-name config-file requests rounds
    for r in $(seq "$4"); do
        IFS=, read -ra cs <<< "$CONFIGS"
        for c in "${cs[@]}"; do
            read -r g p <<< "$c"
            echo "=== round $r, $1 batch-1 decode, RTLLM_DENSE_GEMV=$g RTLLM_PDL=$p"
            RTLLM_DENSE_GEMV=$g RTLLM_PDL=$p $B --model "$2" --num-requests "$3" \
                --output-json "$OUT/$1_gemv${g}_pdl${p}_r$r.json" 2>&1 | grep -E "rtllm:|bound:"
        done
    done
}
run llama configs/llama-3.1-8b.json 2 "${ROUNDS:-2}"
for q in ${QUANT:-}; do  # weight formats with everything on (their decode GEMVs are PDL launches too)
    echo "=== Llama-3.1-8B batch-1 decode, --quant $q"
    $B --model configs/llama-3.1-8b.json --num-requests 2 --quant "$q" --output-json "$OUT/llama_quant_$q.json" \
        2>&1 | grep -E "rtllm:|bound:"
done
if [ "${MOE:-1}" != 0 ]; then
    run moe configs/qwen3-30b-a3b.json 4 "${MOE_ROUNDS:-${ROUNDS:-2}}"
fi
# TPOT p50 of each JSON
python3 - "$OUT" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*_gemv*_pdl*_r*.json")) +
                glob.glob(os.path.join(sys.argv[1], "llama_quant_*.json"))):
    d = json.load(open(f))
    print(f"{os.path.basename(f):32s} TPOT p50 {d['rtllm']['tpot_s']['p50'] * 1e3:.3f} ms  "
          f"{d['rtllm']['output_tok_s']:.1f} tok/s  {d['rtllm']['ratio_to_bound']:.1%} of bound")
PY
echo "=== tests"
grep -E "passed|failed|error|FAILED|ERROR" "$OUT/tests.log" | tail -12

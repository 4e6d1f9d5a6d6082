#!/usr/bin/env bash
# Where the last decode microseconds are, on one GPU; logs and JSON to $OUT:
# 1. TUNE=1 (default): the FP8 decode GEMV's tiles at M = 1 (scripts/quant_kernel_tune.py --kinds fp8, its grid
#    with the 8 / 16-row x 1-2 KiB tiles), written to $OUT/gemv_tuned.json;
# 2. batch-1 decode (ISL 128 / OSL 256) of the Llama-3.1-8B shape: bf16, FP8 with the committed table, FP8 with
#    the table of step 1, bf16 with the RMSNorm launches removed (scripts/launch_probe.py: an upper bound for
#    fusing them away; outputs wrong, timing only);
# 3. MOE=1 (default): the Qwen3-30B-A3B shape, as it is, without the norms, without the router.
# BEFORE=dir (a tree of repo paths holding the files as they were before a change): bf16 Llama and the MoE are
# also run with those files swapped in, in the same command.
# PROBES (default "norms") lists the Llama probes; each line is a `rtllm bench latency` run with its bound.
set -uo pipefail
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${TUNE:-1}" = 1 ]; then
    timeout 240 python3 scripts/quant_kernel_tune.py --kinds fp8 --m 1 --jobs 14 --out "$OUT" --verbose \
        > "$OUT/tune_fp8.log" 2>&1
    tail -8 "$OUT/tune_fp8.log"
fi
B="--dtype bfloat16 --device cuda --isl 128 --osl 256 --executor inprocess"
lat() {  # name, probe skips, model, requests, extra args...
    local name=$1 skip=$2 model=$3 n=$4
    shift 4
    echo "=== $name"
    timeout 180 python3 scripts/launch_probe.py --skip "$skip" -- bench latency --model "$model" $B --num-requests "$n" \
        --output-json "$OUT/lat_$name.json" "$@" 2>&1 | grep -E "rtllm:|bound:|Error"
}
before() {  # run "$@" with the files under $BEFORE (a tree of repo paths: the code before a change) swapped in
    (cd "$BEFORE" && find . -type f) > /tmp/before_files
    while read -r f; do cp "$f" "/tmp/now_$(echo "$f" | tr / _)"; cp "$BEFORE/$f" "$f"; done < /tmp/before_files
    "$@"
    while read -r f; do cp "/tmp/now_$(echo "$f" | tr / _)" "$f"; done < /tmp/before_files
}
L=configs/llama-3.1-8b.json
lat llama_bf16 "" $L 2
[ -n "${BEFORE:-}" ] && before lat llama_bf16_before "" $L 2
lat llama_fp8 "" $L 2 --quant fp8
if [ -f "$OUT/gemv_tuned.json" ]; then
    RTLLM_QUANT_GEMV_CONFIG="$OUT/gemv_tuned.json" lat llama_fp8_tuned "" $L 2 --quant fp8
fi
for p in ${PROBES:-norms}; do
    lat "llama_bf16_skip_$p" "$p" $L 2
done
if [ "${MOE:-1}" = 1 ]; then
    M=configs/qwen3-30b-a3b.json
    lat moe "" $M 4
    [ -n "${BEFORE:-}" ] && before lat moe_before "" $M 4
    lat moe_skip_norms norms $M 4
    lat moe_skip_router router $M 4
fi
python3 - "$OUT" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "lat_*.json"))):
    d = json.load(open(f))["rtllm"]
    print(f"{os.path.basename(f):34s} TPOT p50 {d['tpot_s']['p50'] * 1e3:.3f} ms  {d['output_tok_s']:.1f} tok/s  "
          f"{d['ratio_to_bound']:.1%} of bound")
PY

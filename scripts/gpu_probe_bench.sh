#!/usr/bin/env bash
# Where the last decode microseconds are, on one GPU; logs and JSON to $OUT. Run in the order 1, 3, 3b, 2, 4 (a
# run cut short keeps what came first):
# 1. TESTS (default tests/gpu; TESTS=none skips them);
# 2. batch-1 decode (ISL 128 / OSL 256; EXTRA: more bench flags, e.g. "--max-seq-len 8192"), each a
#    `rtllm bench latency` run with its bound: Llama-3.1-8B shape in
#    each weight format of QUANT (default "none fp8 w4a16"), then (MOE=1, the default) the Qwen3-30B-A3B shape; with BEFORE=dir (a tree of repo paths holding the
#    files as they were before a change) each also with those files swapped in, in the same command; make one with
#    `for f in $(git diff --name-only REV -- rtllm); do mkdir -p B/$(dirname $f); git show REV:$f > B/$f; done`
#    under .gpucache/ (ignored by git) and carry it; BEFORE may list several such dirs (runs "_before" for the
#    first, "_before_<dir name>" for the others); VARIANT="NAME=value ...": each also with that environment
#    ("_variant"), VARIANTS="label:NAME=value ...;label2:...": each also once per entry ("_label"); MOE_FIRST=1:
#    the MoE's runs before Llama's;
# 3. TUNE=1 (default), before the benches of 2: the decode GEMVs' tiles at M = 1 (scripts/quant_kernel_tune.py
#    --kinds $TUNE_KINDS, default fp8); the benches of this tree then use the tuned table, those of BEFORE their
#    own committed one; TUNE_BEFORE=1 also times the same grid with the first BEFORE dir's files ($OUT/before/);
# 3b. MOE_DECODE=1: the Qwen3-30B-A3B experts alone at 1-4 tokens (scripts/moe_kernel_bench.py --decode; with
#    MOE_TUNE=1 --tune, the GEMV launches' tile sweep), and with BEFORE the same with the first dir's files;
# 4. PROBES=1 (default): the launches' cost on the critical path (scripts/launch_probe.py: outputs wrong, timing
#    only): Llama and the MoE without each launch of PROBE_LIST (default "norms router"; router: the MoE only;
#    also rope, attn_reduce, attn_one_split).
set -uo pipefail
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${TESTS:-tests/gpu}" != none ]; then
    timeout 200 python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/gpu} > "$OUT/tests.log" 2>&1
    grep -E "passed|failed|error|FAILED|ERROR" "$OUT/tests.log" | tail -6
fi
B="--dtype bfloat16 --device cuda --isl 128 --osl 256 --executor inprocess ${EXTRA:-}"
lat() {  # name, probe skips, model, requests, extra args...
    local name=$1 skip=$2 model=$3 n=$4
    shift 4
    timeout 150 python3 scripts/launch_probe.py --skip "$skip" -- bench latency --model "$model" $B --num-requests "$n" \
        --output-json "$OUT/lat_$name.json" "$@" > "$OUT/lat_$name.log" 2>&1
    echo "=== $name: $(grep -E "rtllm:" "$OUT/lat_$name.log" | head -1)"
    grep -E "Error" "$OUT/lat_$name.log" | tail -2
}
before() {  # before DIR CMD...: run CMD with the files under DIR swapped in
    local dir=$1
    shift
    (cd "$dir" && find . -type f) > /tmp/before_files
    while read -r f; do cp "$f" "/tmp/now_$(echo "$f" | tr / _)"; cp "$dir/$f" "$f"; done < /tmp/before_files
    (unset RTLLM_QUANT_GEMV_CONFIG; "$@")
    while read -r f; do cp "/tmp/now_$(echo "$f" | tr / _)" "$f"; done < /tmp/before_files
}
suffix() {  # the name suffix of a BEFORE dir: "_before" for the first, "_before_<dir name>" for the others
    [ "$1" = "${BEFORE%% *}" ] && echo _before || echo "_before_$(basename "$1")"
}
tune() {  # out dir: the GEMV grid at M = 1, timed, the best configurations to DIR/gemv_tuned.json
    mkdir -p "$1"
    timeout 240 python3 scripts/quant_kernel_tune.py --kinds "${TUNE_KINDS:-fp8}" --m 1 --jobs 14 --out "$1" --verbose \
        > "$1/tune.log" 2>&1
    grep -E "^(fp8|w8|w4|w16) " "$1/tune.log"
}
if [ "${TUNE:-1}" = 1 ]; then
    tune "$OUT"
    [ "${TUNE_BEFORE:-0}" = 1 ] && [ -n "${BEFORE:-}" ] && before "${BEFORE%% *}" tune "$OUT/before"
    [ -f "$OUT/gemv_tuned.json" ] && export RTLLM_QUANT_GEMV_CONFIG="$OUT/gemv_tuned.json"
fi
moe_decode() {  # log name
    timeout 200 python3 scripts/moe_kernel_bench.py --only qwen3 --tokens 1 --decode --no-fusions \
        $([ "${MOE_TUNE:-0}" = 1 ] && echo --tune) > "$OUT/$1.log" 2>&1
    grep -E "gemv|best|Error|FAIL" "$OUT/$1.log" | head -40
}
if [ "${MOE_DECODE:-0}" = 1 ]; then
    moe_decode moe_decode
    [ -n "${BEFORE:-}" ] && before "${BEFORE%% *}" moe_decode moe_decode_before
fi
L=configs/llama-3.1-8b.json
M=configs/qwen3-30b-a3b.json
variants() {  # name, lat's other args: the same run once for each entry "label:NAME=value ..." of VARIANTS
    # (";"-separated; named "<name>_<label>"), and with VARIANT="NAME=value ..." ("<name>_variant")
    local name=$1 list="${VARIANTS:-}" v
    shift
    [ -n "${VARIANT:-}" ] && list="variant:${VARIANT}${list:+;$list}"
    while IFS= read -r v; do
        [ -n "$v" ] && (export ${v#*:}; lat "${name}_${v%%:*}" "$@")
    done < <(tr ';' '\n' <<< "$list")
}
moe() {  # the Qwen3-30B-A3B shape, and its variants
    lat moe "" $M 4
    variants moe "" $M 4
    for b in ${BEFORE:-}; do before "$b" lat "moe$(suffix "$b")" "" $M 4; done
}
[ "${MOE:-1}" = 1 ] && [ "${MOE_FIRST:-0}" = 1 ] && moe
for q in ${QUANT:-none fp8 w4a16}; do
    lat "llama_$q" "" $L 2 --quant "$q"
    variants "llama_${q}" "" $L 2 --quant "$q"
    for b in ${BEFORE:-}; do before "$b" lat "llama_${q}$(suffix "$b")" "" $L 2 --quant "$q"; done
done
[ "${MOE:-1}" = 1 ] && [ "${MOE_FIRST:-0}" != 1 ] && moe
if [ "${PROBES:-1}" = 1 ]; then
    for p in ${PROBE_LIST:-norms router}; do
        [ "$p" != router ] && lat "llama_bf16_skip_$p" "$p" $L 2
        [ "${MOE:-1}" = 1 ] && lat "moe_skip_$p" "$p" $M 4
    done
fi
python3 - "$OUT" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "lat_*.json"))):
    d = json.load(open(f))["rtllm"]
    print(f"{os.path.basename(f):34s} TPOT p50 {d['tpot_s']['p50'] * 1e3:.3f} ms  {d['output_tok_s']:.1f} tok/s  "
          f"{d['ratio_to_bound']:.1%} of bound")
PY

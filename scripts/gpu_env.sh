# Sourced by the GPU scripts: unbuffered output, $OUT for logs, carried wheels (.whl/) installed to
# /tmp/site, the repo and /tmp/site on PYTHONPATH. The GPU image's own torch is never reinstalled.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/rtllm-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site"
# an exported tree (git archive, no .git) names its commit in COMMIT, for the benchmarks' JSON
if [ -f COMMIT ] && [ -z "${RTLLM_COMMIT:-}" ]; then
    RTLLM_COMMIT=$(cat COMMIT)
    export RTLLM_COMMIT
fi

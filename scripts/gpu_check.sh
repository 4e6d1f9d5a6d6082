#!/usr/bin/env bash
# GPU checks for the fast-path issue, run on the GPU machine from the repo root:
#   bash scripts/gpu_check.sh [kernels] [tests] [parity] [probes] [bench]   (default: all but probes)
# Logs go to $OUT (the device tool brings them back). Carried wheels in .whl/ are installed to
# /tmp/site first; the default model's GGUF is reassembled from .gpucache/ when its parts are there.
set -uo pipefail
source scripts/gpu_env.sh
if compgen -G ".gpucache/smollm.part*" >/dev/null; then
    cat .gpucache/smollm.part* > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
    export RTLLM_DEFAULT_MODEL=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
fi
stages=${*:-kernels tests parity bench}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
git log -1 --format='commit %h %s' 2>/dev/null || true
for s in $stages; do
    case $s in
    kernels)
        echo "=== kernels at Llama-3.1-8B shapes"
        python3 scripts/kernel_bench.py 2>&1 | tee "$OUT/kernel_bench.log" ;;
    tests)
        echo "=== engine tests on the GPU"
        python3 -m pytest -q -x -p no:cacheprovider tests/gpu -s 2>&1 | tee "$OUT/gpu_tests.log" ;;
    parity)
        echo "=== bf16 parity with transformers on the default model (needs its GGUF)"
        python3 scripts/bf16_parity.py --device cuda 2>&1 | grep -v "it/s" | tee "$OUT/bf16_parity.log"
        python3 scripts/gpu_bf16_agreement.py 2>&1 | grep -v "it/s" | tee "$OUT/bf16_agreement.log" ;;
    probes)
        echo "=== which SDPA backend transformers gets, and which silu spelling gives torch's bits"
        python3 scripts/varlen_probe.py 2>&1 | tee "$OUT/varlen_probe.log"
        python3 scripts/silu_probe.py 2>&1 | tee "$OUT/silu_probe.log" ;;
    bench)
        echo "=== benchmarks: Llama-3.1-8B shape, random bf16 weights"
        bash scripts/gpu_bench.sh 2>&1 | tee "$OUT/gpu_bench.log" ;;
    esac
done

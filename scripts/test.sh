#!/usr/bin/env bash
# Set up (idempotent) and run every check CI runs: ruff, import-linter layer contracts, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export TRITON_INTERPRET=1
.venv/bin/ruff check rtllm tests scripts
.venv/bin/lint-imports
# Three pytest workers (pytest-xdist; a test file stays on one worker, so its module fixtures load once)
# with one torch thread each: the interpreted Triton kernels run on one core, and many tests wait on
# worker processes, servers and gloo ranks they start, so a third worker fills those waits on CI's 2
# cores (the same suite: 570 s with two workers, 463 s with three, one after the other on this VM).
# One thread each also keeps OpenMP from oversubscribing the cores (two-thread GEMMs collapse when
# another process competes for them). PYTEST_WORKERS=0: one process.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=300 -n "${PYTEST_WORKERS:-3}" --dist loadfile "$@"

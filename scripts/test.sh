#!/usr/bin/env bash
# Set up (idempotent) and run every check CI runs: ruff, import-linter layer contracts, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export TRITON_INTERPRET=1
.venv/bin/ruff check rtllm tests scripts
.venv/bin/lint-imports
.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=300 "$@"

#!/usr/bin/env bash
# Set up .venv with the test tools and run every check CI runs: format, lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_venv.sh --test
.venv/bin/ruff format --check src tests examples benchmarks
.venv/bin/ruff check src tests examples benchmarks
.venv/bin/mypy --strict src
.venv/bin/python -m pytest "$@"

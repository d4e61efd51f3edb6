#!/usr/bin/env bash
# Issue 20 on a two-GPU lease, one phase per device call; every rank's output goes to its own file
# under $OUT so nothing is lost to the call's output limit.
#   bash benchmarks/nccl2.sh probe   a bare all_sum: ranks started by hand, then by mlx.launch
#   bash benchmarks/nccl2.sh serve   mlx-server tensor-parallel on both GPUs, a chat through it
#   bash benchmarks/nccl2.sh bench   load.py, Llama-3-8B shape bf16: one GPU, then two
# Expects the wheels staged by ../shared/gpu/stage-mlx-cuda.sh and installed by `h100.sh install`.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
export PYTHONPATH=$HOME/site:$PWD/src MLX_BENCH_TOKENIZER=$PWD/.bench/tokenizer
export NCCL_NVLS_ENABLE=0 NCCL_DEBUG=INFO
py=$(command -v python3)
launch=("$py" -c "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"
        --backend nccl --hosts 127.0.0.1 -n 2
        --python "$py" --env NCCL_NVLS_ENABLE=0 --env NCCL_DEBUG=INFO --env "PYTHONPATH=$PYTHONPATH")

by_hand() {  # rank processes without mlx.launch: rules the launcher in or out
    local port=$((20000 + RANDOM % 10000)) pids=()
    for rank in 0 1; do
        MLX_RANK=$rank MLX_WORLD_SIZE=2 NCCL_HOST_IP=127.0.0.1 NCCL_PORT=$port \
            CUDA_VISIBLE_DEVICES=$rank timeout 90 "$@" >"$out/hand-rank$rank.log" 2>&1 &
        pids+=($!)
    done
    for rank in 0 1; do wait "${pids[$rank]}"; echo "by hand: rank $rank exit $?"; done
}

case "$1" in
probe)
    nvidia-smi -L; echo "python3: $py; python: $(command -v python || echo none)"
    by_hand "$py" benchmarks/nccl_probe.py
    timeout 90 "${launch[@]}" --verbose -- benchmarks/nccl_probe.py >"$out/launch-probe.log" 2>&1
    echo "mlx.launch probe exit $?"
    tail -n 5 "$out"/hand-rank*.log "$out/launch-probe.log" ;;
serve)
    model=$(python3 benchmarks/models.py llama3-8b | tail -n 1)
    timeout 500 "${launch[@]}" -- -m mlx_engine_server "$model" --port 8080 \
        --distributed-mode tensor >"$out/serve.log" 2>&1 &
    for _ in $(seq 240); do curl -sf localhost:8080/health >/dev/null && break; sleep 2; done
    curl -s localhost:8080/v1/mlx/status | tee "$out/status.json"; echo
    curl -s localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":16}' | tee "$out/chat.json"
    kill %1; wait ;;
bench)
    timeout 280 python3 benchmarks/load.py --model llama3-8b --clients 1,8,32,64 --max-tokens 128 \
        --systems ours --json "$out/8b-1gpu.json" | tee "$out/8b-1gpu.txt"
    timeout 300 python3 benchmarks/load.py --model llama3-8b --clients 1,8,32,64 --max-tokens 128 \
        --systems ours --launch "$(printf '%q ' "${launch[@]}") --" --server-flags "--distributed-mode tensor" \
        --json "$out/8b-2gpu.json" | tee "$out/8b-2gpu.txt" ;;
*) echo "usage: $0 probe|serve|bench" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Everything only a GPU shows, in one command (`make gpu-check`), written to one results file
# named after the device: the Triton kernel tests compiled for the GPU (not the interpreter), the
# CUDA-graph tests (with torch.cuda.set_sync_debug_mode("error")), the planner benchmark, and the
# knee of expert GEMM time for a few expert shapes (a calibration file beside the results).
#
# Runs under a python whose torch sees a CUDA device (PYTHON, default python3; `make setup`'s
# .venv is the CPU stack): it needs torch, triton >= 3.5, pytest and hypothesis, and
# megatron-core for the benchmark's Megatron-Core row (skipped without it). The CPU suite never
# needs a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: $PYTHON's torch sees no CUDA device" >&2
    exit 2
fi
DEVICE=$("$PYTHON" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
OUT=${OUT:-examples/benchmarks/results/gpu-check-$DEVICE.txt}
mkdir -p "$(dirname "$OUT")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
status=0
{
    echo "# gpu-check: $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    "$PYTHON" -c "import torch, triton; print(f'# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}')"
    echo; echo "## kernel and CUDA-graph tests (compiled, sm_$("$PYTHON" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))"))"
    "$PYTHON" -m pytest tests/test_kernels.py tests/test_cuda_graphs.py -q -p no:cacheprovider -rs || status=1
    echo; echo "## planner benchmark"
    "$PYTHON" examples/benchmarks/bench_planner.py --device cuda || status=1
    echo; echo "## the knee of expert GEMM time (capaware_megatron.calibrate; min_capacity \"auto\" reads it)"
    # bench_decode's layer, then Mixtral-8x7B / Qwen3-235B / DeepSeek-V3 experts (gated, bf16).
    for shape in "512 1024 --dtype float32 --experts-per-rank 4" "4096 14336 --gated --experts-per-rank 1" \
                 "4096 1536 --gated --experts-per-rank 8" "7168 2048 --gated --experts-per-rank 8"; do
        set -- $shape
        "$PYTHON" -m capaware_megatron.calibrate --hidden "$1" --ffn "$2" "${@:3}" --device cuda \
            --out "${OUT%.txt}-calibration.json" || status=1
    done
} 2>&1 | tee "$OUT"
echo "gpu-check: wrote $OUT" >&2
exit $status

#!/usr/bin/env bash
# The GPU check on a Linux machine with an NVIDIA GPU (MLX's CUDA backend), run from the repository root:
#   OUT=/tmp/out bash bench/device_check.sh
# It:
#   1. installs this package (with MLX-CUDA from the wheels staged in .device/ when present, else
#      `pip install -e ".[cuda]"` must have been run),
#   2. compares the CUDA candidates kernel with the pure-MLX reference (tests/test_kernels.py),
#   3. times the decode step with and without the kernel (is it worth keeping?),
#   4. measures --shape 8b in bf16 and 4-bit: ms per forward of a 32-token block with 0/512/2048 tokens
#      of cached context, and the weight-bandwidth roofline; results land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -f .device/b/WHEEL_NAME ]; then  # an offline machine: MLX-CUDA's wheel staged in two parts
  W=$(cat .device/b/WHEEL_NAME)
  cat "$HOME/mlxparts/part_aa" .device/b/part_ab > "$HOME/$W"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$HOME/$W" .device/b/mlx-*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
export MLX_PTX_CACHE_DIR=$HOME/ptx PYTHONUNBUFFERED=1
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.device_info().get('device_name'))"
python3 -m pytest -q tests/test_kernels.py 2>&1 | tee "$OUT/kernels.txt" | tail -3
python3 bench/gpu_forward.py --json "$OUT/gpu_8b.json" 2>&1 | tee "$OUT/gpu_8b.txt"

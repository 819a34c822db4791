#!/usr/bin/env bash
# The GPU check for a session that is lent an H100/H200 (MLX's CUDA backend). Prepared and tested on the
# CPU; run it as the second device call described in ../shared/device/README.md (the first stages
# .device/a/part_aa in $HOME/mlxparts). It:
#   1. installs MLX-CUDA and this package (no deps: mlx-lm's needs are on the machine),
#   2. compares the CUDA candidates kernel with the pure-MLX reference (tests/test_kernels.py),
#   3. times the decode step with and without the kernel (is it worth keeping?),
#   4. measures --shape 8b in bf16 and 4-bit: ms per forward of a 32-token block with 0/512/2048 tokens
#      of cached context, and the weight-bandwidth roofline; results land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
W=$(cat .device/b/WHEEL_NAME)
cat "$HOME/mlxparts/part_aa" .device/b/part_ab > "$HOME/$W"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$HOME/$W" .device/b/mlx-*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
export MLX_PTX_CACHE_DIR=$HOME/ptx PYTHONUNBUFFERED=1
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.device_info().get('device_name'))"
python3 -m pytest -q tests/test_kernels.py 2>&1 | tee "$OUT/kernels.txt" | tail -3
python3 bench/gpu_forward.py --json "$OUT/gpu_8b.json" 2>&1 | tee "$OUT/gpu_8b.txt"

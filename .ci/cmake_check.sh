#!/usr/bin/env bash
# CMake check: configure and build CMakeLists.txt (find_package(Torch)) against the CPU torch of
# the project venv, in a scratch build directory, then load the library into torch and call an op.
# Env: PYTHON (default .venv/bin/python), CMAKE (default cmake).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
CMAKE=${CMAKE:-cmake}
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
PREFIX=$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
start=$(date +%s)
"$CMAKE" -S "$ROOT" -B "$BUILD" -DCMAKE_PREFIX_PATH="$PREFIX" -DPYBOUNDARY_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=Release
"$CMAKE" --build "$BUILD" -j "${MAX_JOBS:-2}"
LIB=$(ls "$BUILD"/_C*.so)
echo "cmake-check: built $LIB in $(( $(date +%s) - start )) s"
"$PY" - "$LIB" <<'PY'
import sys
import torch
torch.ops.load_library(sys.argv[1])
x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
y = torch.ops.pyboundary.idct2(torch.ops.pyboundary.dct2(x))
assert torch.allclose(x, y, atol=1e-12)
r = torch.tensor([0, 4])
c = torch.ops.pyboundary.dct_block_analysis(x, r, r, 4, 4)
assert c.shape == (2, 3, 4, 4)
assert torch.ops.pyboundary._select_constants() == (1e-4, 1e-3)
print("cmake-check: OK (library loads, ops registered and correct)")
PY

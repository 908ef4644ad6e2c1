#!/usr/bin/env bash
# CUDA compile check (no GPU needed): build the ops library with its CUDA kernels against a CUDA
# build of torch in a second venv outside the repository, load it and check that the CUDA
# kernels are registered. Fails when any .cu (each registers its own ops for the CUDA dispatch
# key) does not compile or link.
# Recipe: ../shared ENVIRONMENT.md facts, repeated here so the repo stands alone:
#   torch==2.14.1 (CUDA 13.0 wheels), nvcc from /usr/local/cuda, CPATH to the wheel's cu13
#   headers (cusparse.h), TORCH_CUDA_ARCH_LIST (no GPU to detect).
# Env: PYBOUNDARY_CUDA_VENV (default /tmp/pyboundary-cuda-venv, reused when present),
#      TORCH_CUDA_ARCH_LIST (default 9.0), CUDA_HOME (default /usr/local/cuda).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
V=${PYBOUNDARY_CUDA_VENV:-/tmp/pyboundary-cuda-venv}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda-check: FAILED: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
  exit 1
fi
if ! "$V/bin/python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
  echo "cuda-check: creating $V with torch==2.14.1 (CUDA build)"
  python3 -m venv "$V"
  "$V/bin/pip" install -q torch==2.14.1 numpy ninja setuptools
fi
SP=$("$V/bin/python" -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__) if nvidia.__file__ else list(nvidia.__path__)[0])')
export CPATH="$SP/cu13/include${CPATH:+:$CPATH}"

# Build in a scratch copy: the repo's pyboundary/_C*.so belongs to the CPU venv.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/pyboundary"
cp -r "$ROOT/csrc" "$ROOT/setup.py" "$ROOT/pyproject.toml" "$WORK/"
[ -f "$ROOT/README.md" ] && cp "$ROOT/README.md" "$WORK/"
(cd "$ROOT" && find pyboundary -name "*.py" -exec cp --parents {} "$WORK/" \;)
cd "$WORK"
start=$(date +%s)
PYBOUNDARY_CUDA=1 "$V/bin/python" setup.py -q build_ext --inplace
echo "cuda-check: build took $(( $(date +%s) - start )) s"
"$V/bin/python" - <<'PY'
import torch
from pyboundary import ops
b = ops.backend()
print("cuda-check: backend", b)
assert b["ops"] == "compiled", b
assert b["cuda_kernels"] is True, b
for name in ("dct2", "idct2", "dct_block_analysis", "dct_block_synthesis", "deepfool_select"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyboundary::{name}", "CUDA"), name
print("cuda-check: OK (CUDA kernels compiled, linked and registered)")
PY

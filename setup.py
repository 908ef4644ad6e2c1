"""Build of the compiled ops library ``pyboundary/_C*.so``.

The library is a plain shared library that registers ``torch.ops.pyboundary.*`` when loaded
with ``torch.ops.load_library`` (see pyboundary/ops/_library.py); it has no Python module init.
Sources: csrc/*.cpp (schemas, checks, DCT matrices) and csrc/cpu/*.cpp, plus csrc/cuda/*.cu when
the CUDA kernels are built; each kernel file registers its own ops.

Switches (environment variables):
  PYBOUNDARY_CUDA=1 / 0   force / forbid the CUDA kernels. Default: built when
                          torch.utils.cpp_extension.CUDA_HOME is set and torch has CUDA
                          (torch.version.cuda); with the CPU build of torch CUDA_HOME is None.
  TORCH_CUDA_ARCH_LIST    CUDA architectures (needed when no GPU is visible, e.g. "9.0").
  MAX_JOBS                parallel compile jobs (ninja).

Install with ``pip install --no-build-isolation -e .`` (build isolation would pull another
torch into the build environment).
"""

from __future__ import annotations

import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("PYBOUNDARY_CUDA", "").strip().lower()
    available = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if flag in ("", "auto"):
        return available
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not available:
            raise RuntimeError(
                "PYBOUNDARY_CUDA=1 but CUDA cannot be built: "
                f"CUDA_HOME={cpp_extension.CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r} "
                "(install a CUDA build of torch and set CUDA_HOME)"
            )
        return True
    raise ValueError(f"PYBOUNDARY_CUDA must be 0, 1 or auto, got {flag!r}")


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    with_cuda = _want_cuda()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # -fopenmp: at::parallel_for is inline and uses OpenMP pragmas in torch's OpenMP builds;
    # without it the kernels run on one thread. libgomp.so.1 is then the one torch loaded.
    cxx = ["-O3", "-g0", "-fvisibility=hidden", "-fopenmp"]
    link = ["-fopenmp"]
    macros = [("PYBOUNDARY_WITH_CUDA", "1" if with_cuda else "0")]
    if with_cuda:
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        return cpp_extension.CUDAExtension(
            "pyboundary._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link,
        )
    return cpp_extension.CppExtension(
        "pyboundary._C",
        sources,
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)

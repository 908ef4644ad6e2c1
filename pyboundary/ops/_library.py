"""Finding and loading the compiled ops library ``pyboundary/_C*.so``.

The library registers ``torch.ops.pyboundary.*`` when loaded with ``torch.ops.load_library``.
Only a library built for the running interpreter is considered (its file name ends with one of
``importlib.machinery.EXTENSION_SUFFIXES``), so a stale build for another Python never wins.
Environment: ``PYBOUNDARY_FORCE_REFERENCE=1`` (read at import) forces the pure-torch twins.
"""

from __future__ import annotations

import importlib.machinery
import os
import warnings

import torch

__all__ = ["LIBRARY", "CUDA_KERNELS", "REASON", "COMPILED", "find_library"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRUE = ("1", "true", "yes", "on")


def find_library(directory: str = _PACKAGE_DIR) -> str | None:
    """Path of the ops library built for this interpreter in ``directory`` (the package folder,
    where setup.py puts it), or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(directory, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def _load() -> tuple[str | None, bool, str | None]:
    """Load the compiled library. Returns (path or None, cuda kernels built, reason if not loaded)."""
    if os.environ.get("PYBOUNDARY_FORCE_REFERENCE", "").strip().lower() in _TRUE:
        return None, False, "forced by PYBOUNDARY_FORCE_REFERENCE"
    path = find_library()
    if path is None:
        return None, False, (f"no compiled library pyboundary/_C{{{','.join(importlib.machinery.EXTENSION_SUFFIXES)}}} "
                             f"in {_PACKAGE_DIR} (build it with `pip install --no-build-isolation -e .`)")
    try:
        if not hasattr(torch.ops.pyboundary, "_cuda_kernels_built"):
            torch.ops.load_library(path)
        cuda = bool(torch.ops.pyboundary._cuda_kernels_built())
    except (OSError, RuntimeError, AttributeError) as exc:  # e.g. built against another torch
        return None, False, f"could not load {path}: {exc}"
    return path, cuda, None


LIBRARY, CUDA_KERNELS, REASON = _load()
COMPILED = LIBRARY is not None
if REASON is not None and not REASON.startswith("forced"):
    warnings.warn(
        f"pyboundary: compiled ops unavailable, using the pure-torch reference ops ({REASON})",
        RuntimeWarning,
        stacklevel=2,
    )

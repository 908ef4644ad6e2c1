"""The emulated CUDA device for the op tests: the real CUDA kernels run on the host (tests only).

tests/cuda_emu/build.py compiles csrc/cuda/*.cu through an emulation layer into a library that
registers ``torch.ops.pyboundary_emu.*`` (same schemas as ``torch.ops.pyboundary``) for the CPU
dispatch key. Inside :func:`emulated`, ``torch.ops.pyboundary`` *is* that namespace, so the
public wrappers of ``pyboundary.ops`` (and tests that call ``torch.ops.pyboundary`` directly)
run the emulated CUDA kernels on CPU tensors, with the package's fake kernels and autograd
registered for them too.

The library is built with AddressSanitizer: it can only be loaded into a process started with
the ASan runtime preloaded (`make cuda-emu` runs pytest that way). Elsewhere the emulated device
is unavailable and its tests skip, or fail when ``PYBOUNDARY_CUDA_EMU=required`` (CI).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

NAMESPACE = "pyboundary_emu"
REQUIRED_ENV = "PYBOUNDARY_CUDA_EMU"  # "required": unavailable -> fail instead of skip
LIB_ENV = "PYBOUNDARY_CUDA_EMU_LIB"  # path of the library (default: the cached build of these sources)

_state: dict = {"loaded": None, "reason": None, "registered": False}


def asan_preloaded() -> bool:
    """Whether the AddressSanitizer runtime is mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return False


def library_path() -> str:
    if os.environ.get(LIB_ENV):
        return os.environ[LIB_ENV]
    from cuda_emu import build  # tests/ is on sys.path (rootdir conftest)

    return str(build.library_path())


def load() -> str | None:
    """Load the emulated library once; None when loaded, else why it is unavailable."""
    if _state["loaded"] is None:
        reason = None
        if not asan_preloaded():
            reason = ("the AddressSanitizer runtime is not preloaded (the emulated CUDA library is "
                      "built with ASan; run `make cuda-emu`)")
        else:
            path = library_path()
            if not os.path.exists(path):
                reason = f"emulated CUDA library not built ({path}; run `make cuda-emu`)"
            else:
                torch.ops.load_library(path)
        _state["loaded"], _state["reason"] = reason is None, reason
    return _state["reason"]


def require() -> None:
    """Skip (or fail, when required) the calling test if the emulated device is unavailable."""
    reason = load()
    if reason is None:
        return
    if os.environ.get(REQUIRED_ENV, "").strip().lower() == "required":
        pytest.fail(f"emulated CUDA required ({REQUIRED_ENV}=required) but unavailable: {reason}")
    pytest.skip(reason)


def ops():
    """The emulated op namespace (torch.ops.pyboundary_emu)."""
    require()
    return getattr(torch.ops, NAMESPACE)


def stats() -> dict:
    """Counters of the emulator since the last :func:`reset_stats`."""
    launches, blocks, syncs, record_streams = ops()._emu_stats()
    return {"launches": launches, "blocks": blocks, "syncs": syncs, "record_streams": record_streams}


def reset_stats() -> None:
    ops()._emu_reset_stats()


def _register_python_side() -> None:
    """The package's fake kernels and autograd, registered for the emulated namespace too."""
    if _state["registered"]:
        return
    from pyboundary.ops import _registrations

    _registrations.register(NAMESPACE)
    _state["registered"] = True


@contextlib.contextmanager
def emulated():
    """Within the block, ``torch.ops.pyboundary`` is the emulated CUDA namespace."""
    emu = ops()
    _register_python_side()
    real = torch.ops.pyboundary
    setattr(torch.ops, "pyboundary", emu)
    try:
        yield emu
    finally:
        setattr(torch.ops, "pyboundary", real)

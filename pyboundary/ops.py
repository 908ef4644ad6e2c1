"""Public entry points of the compiled ops, with a pure-PyTorch fallback.

Each function dispatches to ``torch.ops.pyboundary.<name>``, the compiled kernels of the
shared library ``pyboundary/_C*.so`` (C++ on CPU, CUDA on GPU when built), and to the twin of
the same name in :mod:`pyboundary.reference` when the library is not available (with one
warning). Contracts (shapes, dtypes, units) are those of the twins, which are the executable
specification; tests compare both.

This module also registers, for the compiled ops:

* a fake (meta) kernel for every op, so that ``torch.compile(fullgraph=True)`` traces code that
  calls them;
* autograd for ``dct2``/``idct2`` (each is the other's backward: the transform is orthonormal)
  and for ``dct_block_analysis``/``dct_block_synthesis`` (each is the other's adjoint; the integer
  block origins get no gradient). ``deepfool_select`` is not differentiable.

Environment: ``PYBOUNDARY_FORCE_REFERENCE=1`` (read at import) forces the twins.
"""

from __future__ import annotations

import glob
import os
import warnings

import torch
from torch import Tensor

from . import reference
from .reference import DEFAULT_SELECT_EPS, dct_matrix  # noqa: F401  (re-exported helpers)

# the same public ops as the reference twins (their constant DEFAULT_SELECT_EPS is re-exported, unlisted)
__all__ = ["backend"] + [name for name in reference.__all__ if name != "DEFAULT_SELECT_EPS"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_TRUE = ("1", "true", "yes", "on")


def _find_library() -> str | None:
    """Path of the built ops library next to this file (setup.py puts it there), or None."""
    found = sorted(glob.glob(os.path.join(_HERE, "_C*.so")) + glob.glob(os.path.join(_HERE, "_C*.pyd")))
    return found[0] if found else None


def _load() -> tuple[str | None, bool, str | None]:
    """Load the compiled library. Returns (path or None, cuda kernels built, reason if not loaded)."""
    if os.environ.get("PYBOUNDARY_FORCE_REFERENCE", "").strip().lower() in _TRUE:
        return None, False, "forced by PYBOUNDARY_FORCE_REFERENCE"
    path = _find_library()
    if path is None:
        return None, False, f"no compiled library pyboundary/_C*.so in {_HERE} (build it with " \
            "`pip install --no-build-isolation -e .`)"
    try:
        if not hasattr(torch.ops.pyboundary, "_cuda_kernels_built"):
            torch.ops.load_library(path)
        cuda = bool(torch.ops.pyboundary._cuda_kernels_built())
    except (OSError, RuntimeError, AttributeError) as exc:  # e.g. built against another torch
        return None, False, f"could not load {path}: {exc}"
    return path, cuda, None


_LIBRARY, _CUDA_KERNELS, _REASON = _load()
_COMPILED = _LIBRARY is not None
if _REASON is not None and not _REASON.startswith("forced"):
    warnings.warn(
        f"pyboundary: compiled ops unavailable, using the pure-torch reference ops ({_REASON})",
        RuntimeWarning,
        stacklevel=2,
    )


def backend() -> dict:
    """Which implementation of the ops is active.

    Returns:
        dict with keys
          ``'ops'``: ``'compiled'`` (``torch.ops.pyboundary`` kernels) or ``'reference'``
          (the pure-torch twins of :mod:`pyboundary.reference`);
          ``'cuda_kernels'``: True when the loaded library contains the CUDA kernels (CUDA
          tensors then run compiled kernels; otherwise they use the twins);
          ``'library'``: path of the loaded shared library, or None;
          ``'reason'``: why the twins are used (None when compiled).
    """
    return {
        "ops": "compiled" if _COMPILED else "reference",
        "cuda_kernels": _CUDA_KERNELS,
        "library": _LIBRARY,
        "reason": _REASON,
    }


# ---- fake kernels and autograd of the compiled ops -------------------------------------------

if _COMPILED:

    @torch.library.register_fake("pyboundary::dct2")
    def _dct2_fake(x):
        torch._check(x.dim() >= 2, lambda: f"dct2: x must have at least 2 dimensions, got {x.dim()}")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("pyboundary::idct2")
    def _idct2_fake(x):
        torch._check(x.dim() >= 2, lambda: f"idct2: x must have at least 2 dimensions, got {x.dim()}")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("pyboundary::dct_block_analysis")
    def _analysis_fake(x, row0, col0, kh, kw):
        torch._check(x.dim() == 4, lambda: f"dct_block_analysis: x must be 4-D, got {x.dim()}")
        return x.new_empty((x.shape[0], x.shape[1], kh, kw))

    @torch.library.register_fake("pyboundary::dct_block_synthesis")
    def _synthesis_fake(coeffs, row0, col0, H, W):
        torch._check(coeffs.dim() == 4, lambda: f"dct_block_synthesis: coeffs must be 4-D, got {coeffs.dim()}")
        return coeffs.new_empty((coeffs.shape[0], coeffs.shape[1], H, W))

    @torch.library.register_fake("pyboundary::deepfool_select")
    def _select_fake(gap, grad_gap, p, eps=DEFAULT_SELECT_EPS):
        torch._check(grad_gap.dim() == 3, lambda: "deepfool_select: grad_gap must be 3-D")
        n, m = grad_gap.shape[0], grad_gap.shape[2]
        return (
            grad_gap.new_empty((n, m)),
            gap.new_empty((n,), dtype=torch.int64),
            gap.new_empty((n,)),
        )

    def _no_state(ctx, inputs, output):
        pass

    def _dct2_backward(ctx, grad):
        return torch.ops.pyboundary.idct2(grad)

    def _idct2_backward(ctx, grad):
        return torch.ops.pyboundary.dct2(grad)

    torch.library.register_autograd("pyboundary::dct2", _dct2_backward, setup_context=_no_state)
    torch.library.register_autograd("pyboundary::idct2", _idct2_backward, setup_context=_no_state)

    def _analysis_setup(ctx, inputs, output):
        x, row0, col0, _, _ = inputs
        ctx.save_for_backward(row0, col0)
        ctx.image_size = (x.shape[2], x.shape[3])

    def _analysis_backward(ctx, grad):
        row0, col0 = ctx.saved_tensors
        h, w = ctx.image_size
        return torch.ops.pyboundary.dct_block_synthesis(grad, row0, col0, h, w), None, None, None, None

    def _synthesis_setup(ctx, inputs, output):
        coeffs, row0, col0, _, _ = inputs
        ctx.save_for_backward(row0, col0)
        ctx.block_size = (coeffs.shape[2], coeffs.shape[3])

    def _synthesis_backward(ctx, grad):
        row0, col0 = ctx.saved_tensors
        kh, kw = ctx.block_size
        return torch.ops.pyboundary.dct_block_analysis(grad, row0, col0, kh, kw), None, None, None, None

    torch.library.register_autograd(
        "pyboundary::dct_block_analysis", _analysis_backward, setup_context=_analysis_setup
    )
    torch.library.register_autograd(
        "pyboundary::dct_block_synthesis", _synthesis_backward, setup_context=_synthesis_setup
    )


# ---- public functions -----------------------------------------------------------------------


def _use_compiled(t) -> bool:
    """Compiled kernels for this input: the library is loaded and has kernels for its device."""
    if not _COMPILED or not isinstance(t, Tensor):
        return False
    return t.device.type == "cpu" or (t.device.type == "cuda" and _CUDA_KERNELS) or t.device.type == "meta"


def dct2(x: Tensor) -> Tensor:
    """2-D orthonormal DCT-II over the last two dimensions (scipy.fft.dctn(type=2, norm='ortho')).

    Args:
        x: (..., H, W) float32/float64, any strides.
    Returns:
        (..., H, W) contiguous coefficients, same dtype; entry (u, v) is frequency (row u, col v).
        Differentiable (the backward is :func:`idct2`).
    """
    if _use_compiled(x):
        return torch.ops.pyboundary.dct2(x)
    return reference.dct2(x)


def idct2(x: Tensor) -> Tensor:
    """Inverse of :func:`dct2` over the last two dimensions (its transpose).

    Args:
        x: (..., H, W) DCT coefficients, float32/float64.
    Returns:
        (..., H, W) image, same dtype. Differentiable (the backward is :func:`dct2`).
    """
    if _use_compiled(x):
        return torch.ops.pyboundary.idct2(x)
    return reference.idct2(x)


def dct_block_analysis(x: Tensor, row0: Tensor, col0: Tensor, kh: int, kw: int) -> Tensor:
    """Coefficients of x on a per-sample block of the 2-D DCT basis.

    coeffs[n, c] = A_h X[n, c] A_w^T, A_h = C_H[row0[n] : row0[n]+kh], A_w = C_W[col0[n] : col0[n]+kw].

    Args:
        x: (N, C, H, W) float32/float64.
        row0, col0: (N,) int64 block origins (frequency row / column of the block's top-left
            corner), on x's device.
        kh, kw: block height and width, 1 <= kh <= H, 1 <= kw <= W, block inside the grid.
    Returns:
        (N, C, kh, kw) coefficients, same dtype. Cost O(N C kh H W). Differentiable in x
        (the backward is :func:`dct_block_synthesis`).
    """
    if _use_compiled(x):
        return torch.ops.pyboundary.dct_block_analysis(x, row0, col0, int(kh), int(kw))
    return reference.dct_block_analysis(x, row0, col0, kh, kw)


def dct_block_synthesis(coeffs: Tensor, row0: Tensor, col0: Tensor, H: int, W: int) -> Tensor:
    """Adjoint of :func:`dct_block_analysis`: x[n, c] = A_h^T coeffs[n, c] A_w.

    Args:
        coeffs: (N, C, kh, kw) float32/float64.
        row0, col0: (N,) int64 block origins, on coeffs' device.
        H, W: output image size (the block must fit: row0 + kh <= H, col0 + kw <= W).
    Returns:
        (N, C, H, W), same dtype. ``dct_block_synthesis(dct_block_analysis(x, ...), ...)`` is the
        orthogonal projection of x onto the block subspace. Differentiable in coeffs.
    """
    if _use_compiled(coeffs):
        return torch.ops.pyboundary.dct_block_synthesis(coeffs, row0, col0, int(H), int(W))
    return reference.dct_block_synthesis(coeffs, row0, col0, H, W)


def deepfool_select(
    gap: Tensor, grad_gap: Tensor, p: float, eps: float = DEFAULT_SELECT_EPS
) -> tuple[Tensor, Tensor, Tensor]:
    """One DeepFool choice: the closest linearised boundary among k candidates, and the step to it.

    dist_c = |gap_c| / ||g_c||_q (q = 2 for p = 2, q = 1 for p = inf), c* = argmin (first on
    ties), push = (1 + eps)|gap| + 1e-3 eps (logit units), step = push / ||g||_2^2 * g (p = 2) or
    push / ||g||_1 * sign(g) (p = inf), so that gap + <g, step> = eps (|gap| + 1e-3) >= 0.
    Zero-norm candidates have distance +inf and are never chosen (all zero: index 0, zero step).

    Args:
        gap: (N, k) f_c(x) - f_ref(x) for the k candidates, float32/float64.
        grad_gap: (N, k, M) their gradients, same dtype and device.
        p: 2 or math.inf.
        eps: relative push past the boundary, >= 0.
    Returns:
        step (N, M) same dtype, index (N,) int64 in [0, k), dist (N,) same dtype (input units).
        Not differentiable.
    """
    if _use_compiled(grad_gap) and isinstance(gap, Tensor):
        return torch.ops.pyboundary.deepfool_select(gap, grad_gap, float(p), float(eps))
    return reference.deepfool_select(gap, grad_gap, p, eps)

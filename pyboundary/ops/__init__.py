"""Public entry points of the compiled ops, with a pure-PyTorch fallback.

Each function dispatches to ``torch.ops.pyboundary.<name>``, the compiled kernels of the
shared library ``pyboundary/_C*.so`` (C++ on CPU, CUDA on GPU when built; loaded by
:mod:`pyboundary.ops._library`), and to the twin of the same name in
:mod:`pyboundary.ops.reference` when the library is not available (with one warning). Contracts
(shapes, dtypes, units) are those of the twins, which are the executable specification; tests
compare both. Fake kernels and autograd of the compiled ops: :mod:`pyboundary.ops._registrations`.

Environment: ``PYBOUNDARY_FORCE_REFERENCE=1`` (read at import) forces the twins.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _library, reference
from .reference import DEFAULT_SELECT_EPS, SELECT_ABS_PUSH, dct_matrix

__all__ = ["backend", "dct2", "idct2", "dct_block_analysis", "dct_block_synthesis", "deepfool_select",
           "dct_matrix", "DEFAULT_SELECT_EPS", "SELECT_ABS_PUSH"]

_COMPILED = _library.COMPILED
_CUDA_KERNELS = _library.CUDA_KERNELS
if _COMPILED:
    from . import _registrations

    _registrations.register("pyboundary")  # fake kernels and autograd


def backend() -> dict:
    """Which implementation of the ops is active.

    Returns:
        dict with keys
          ``'ops'``: ``'compiled'`` (``torch.ops.pyboundary`` kernels) or ``'reference'``
          (the pure-torch twins of :mod:`pyboundary.ops.reference`);
          ``'cuda_kernels'``: True when the loaded library contains the CUDA kernels (CUDA
          tensors then run compiled kernels; otherwise they use the twins);
          ``'library'``: path of the loaded shared library, or None;
          ``'reason'``: why the twins are used (None when compiled).
    """
    return {
        "ops": "compiled" if _COMPILED else "reference",
        "cuda_kernels": _library.CUDA_KERNELS,
        "library": _library.LIBRARY,
        "reason": _library.REASON,
    }


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
        Empty input (H = 0, W = 0 or an empty batch): an empty result of the same shape.
        Differentiable (the backward is :func:`idct2`). Computed by own kernels on every
        device, so global matmul settings (TF32, ``torch.set_float32_matmul_precision``) do
        not change the result.
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
            corner), on x's device, every block inside the grid: 0 <= row0 <= H - kh,
            0 <= col0 <= W - kw. Checked without a device-to-host copy: CPU origins on the
            host (ValueError), CUDA origins inside the kernels (an out-of-range origin triggers
            a device-side assert, reported at the next synchronisation, and is never read
            through), so a call never synchronises; callers that create origins validate them
            there (see :mod:`pyboundary.subspaces`).
        kh, kw: block height and width, 1 <= kh <= H, 1 <= kw <= W.
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
        row0, col0: (N,) int64 block origins, on coeffs' device; the blocks must fit,
            row0 + kh <= H, col0 + kw <= W (checked as in :func:`dct_block_analysis`).
        H, W: output image size, >= 1.
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
    ties; norms and distances accumulated in float64 for both dtypes on every device, so
    float32 near-ties are decided the same way on CPU, CUDA and the twin), push = (1 + eps)|gap| + 1e-3 eps (logit units), step = push / ||g||_2^2 * g (p = 2) or
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

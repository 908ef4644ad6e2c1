"""Pure-PyTorch twins of the compiled ops, with the same signatures and contracts.

Every function here is the executable specification of the op of the same name in
``torch.ops.pyboundary``: tests compare the compiled kernels against these, and
``pyboundary.ops`` falls back to them when the compiled extension is not available.

DCT convention (orthonormal DCT-II, the one of ``scipy.fft.dct(norm='ortho')``)::

    C_n[k, i] = a_k cos(pi (2 i + 1) k / (2 n)),   a_0 = sqrt(1/n),  a_k = sqrt(2/n)

2-D transform of an image X (H, W): X_hat = C_H X C_W^T; inverse X = C_H^T X_hat C_W.
The basis image of frequency (u, v) is outer(C_H[u], C_W[v]).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "dct_matrix",
    "dct2",
    "idct2",
    "dct_block_analysis",
    "dct_block_synthesis",
    "deepfool_select",
    "DEFAULT_SELECT_EPS",
    "SELECT_ABS_PUSH",
]

#: Relative push past the linearised boundary used by :func:`deepfool_select`.
DEFAULT_SELECT_EPS = 1e-4
#: Absolute floor of the push, in logit units, so that a zero gap still moves.
SELECT_ABS_PUSH = 1e-3


@lru_cache(maxsize=64)
def _dct_matrix_cached(n: int, dtype: torch.dtype, device: str) -> Tensor:
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    mat = torch.cos(math.pi * (2.0 * i + 1.0) * k / (2.0 * n))
    mat[0] *= math.sqrt(1.0 / n)
    mat[1:] *= math.sqrt(2.0 / n)
    return mat.to(dtype=dtype, device=device)


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device="cpu") -> Tensor:
    """Orthonormal DCT-II matrix C_n of shape (n, n); row k is frequency k.

    Computed in float64 and cast, so float32 matrices are correctly rounded.

    Args:
        n: size (>= 1).
        dtype: dtype of the matrix (default float64).
        device: device of the matrix (default 'cpu').
    Returns:
        (n, n) Tensor C_n with C_n C_n^T = I (a plain tensor; cached per (n, dtype, device), so
        do not modify it in place).
    """
    if n < 1:
        raise ValueError(f"dct_matrix: n must be >= 1, got {n}")
    return _dct_matrix_cached(int(n), dtype, str(torch.device(device)))


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")


def _check_image(op: str, name: str, x: Tensor, min_dim: int) -> None:
    _check_float(f"{op}: {name}", x)
    if x.dim() < min_dim:
        raise ValueError(
            f"{op}: {name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}"
        )


def dct2(x: Tensor) -> Tensor:
    """2-D orthonormal DCT-II over the last two dimensions.

    Args:
        x: (..., H, W) float32/float64.
    Returns:
        (..., H, W) coefficients, same dtype; entry (u, v) is frequency (row u, column v).
        An empty x (H = 0, W = 0 or an empty batch) gives an empty result of the same shape.
    """
    _check_image("dct2", "x", x, 2)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ch = dct_matrix(x.shape[-2], x.dtype, x.device)
    cw = dct_matrix(x.shape[-1], x.dtype, x.device)
    return ch @ x @ cw.T


def idct2(x: Tensor) -> Tensor:
    """Inverse of :func:`dct2` (its transpose, the transform being orthonormal).

    Args:
        x: (..., H, W) DCT coefficients, float32/float64.
    Returns:
        (..., H, W) image, same dtype (empty in, empty out, as :func:`dct2`).
    """
    _check_image("idct2", "x", x, 2)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ch = dct_matrix(x.shape[-2], x.dtype, x.device)
    cw = dct_matrix(x.shape[-1], x.dtype, x.device)
    return ch.T @ x @ cw


def _check_origins(op: str, n: int, row0: Tensor, col0: Tensor, device, kh, kw, H, W) -> None:
    for name, t, k, size in (("row0", row0, kh, H), ("col0", col0, kw, W)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64:
            raise TypeError(f"{op}: {name} must be int64, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(
                f"{op}: {name} must have shape ({n},) (one origin per sample), got {tuple(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but the data is on {device}")
        if k < 1 or k > size:
            raise ValueError(
                f"{op}: block size {'kh' if name == 'row0' else 'kw'}={k} must be in [1, {size}]"
            )
        if n > 0:
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi + k > size:
                raise ValueError(
                    f"{op}: {name} values must lie in [0, {size - k}] for a block of {k} "
                    f"in a dimension of {size}; got range [{lo}, {hi}]"
                )


def _block_rows(n_size: int, origin: Tensor, k: int, dtype, device) -> Tensor:
    """Per-sample slices C_n[origin:origin+k] -> (N, k, n_size)."""
    mat = dct_matrix(n_size, dtype, device)
    rows = origin.unsqueeze(1) + torch.arange(k, device=device).unsqueeze(0)  # (N, k)
    return mat[rows]


def dct_block_analysis(x: Tensor, row0: Tensor, col0: Tensor, kh: int, kw: int) -> Tensor:
    """Coefficients of x on a per-sample block of the 2-D DCT basis.

    coeffs[n, c] = A_h X[n, c] A_w^T with A_h = C_H[row0[n]:row0[n]+kh], A_w = C_W[col0[n]:col0[n]+kw].

    Args:
        x: (N, C, H, W) float32/float64.
        row0, col0: (N,) int64 block origins (frequency row / column of the top-left corner).
        kh, kw: block height and width (>= 1, block inside the H x W grid).
    Returns:
        (N, C, kh, kw) coefficients, same dtype as x. Cost O(N C kh H W).
    """
    op = "dct_block_analysis"
    _check_float(f"{op}: x", x)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must have shape (N, C, H, W), got {tuple(x.shape)}")
    n, _, h, w = x.shape
    _check_origins(op, n, row0, col0, x.device, kh, kw, h, w)
    ah = _block_rows(h, row0, kh, x.dtype, x.device)
    aw = _block_rows(w, col0, kw, x.dtype, x.device)
    return torch.einsum("nah,nchw,nbw->ncab", ah, x, aw)


def dct_block_synthesis(coeffs: Tensor, row0: Tensor, col0: Tensor, H: int, W: int) -> Tensor:
    """Adjoint of :func:`dct_block_analysis`: images from block coefficients.

    x[n, c] = A_h^T coeffs[n, c] A_w (same A_h, A_w as the analysis).

    Args:
        coeffs: (N, C, kh, kw) float32/float64.
        row0, col0: (N,) int64 block origins.
        H, W: output image size.
    Returns:
        (N, C, H, W), same dtype. synthesis(analysis(x)) is the orthogonal projection of x
        onto the block subspace.
    """
    op = "dct_block_synthesis"
    _check_float(f"{op}: coeffs", coeffs)
    if coeffs.dim() != 4:
        raise ValueError(f"{op}: coeffs must have shape (N, C, kh, kw), got {tuple(coeffs.shape)}")
    if H < 1 or W < 1:
        raise ValueError(f"{op}: H and W must be >= 1, got H={H}, W={W}")
    n, _, kh, kw = coeffs.shape
    _check_origins(op, n, row0, col0, coeffs.device, kh, kw, H, W)
    ah = _block_rows(H, row0, kh, coeffs.dtype, coeffs.device)
    aw = _block_rows(W, col0, kw, coeffs.dtype, coeffs.device)
    return torch.einsum("nah,ncab,nbw->nchw", ah, coeffs, aw)


def _check_p(op: str, p: float) -> float:
    p = float(p)
    if p != 2.0 and p != math.inf:
        raise ValueError(f"{op}: p must be 2 or inf, got {p}")
    return p


def deepfool_select(
    gap: Tensor, grad_gap: Tensor, p: float, eps: float = DEFAULT_SELECT_EPS
) -> tuple[Tensor, Tensor, Tensor]:
    """One DeepFool choice: the closest linearised boundary among k candidates, and the step to it.

    For each sample n and candidate c: dist_c = |gap_c| / ||g_c||_q (q = 2 for p = 2, q = 1 for
    p = inf), c* = argmin_c dist_c (first on ties), and with push = (1 + eps)|gap| + 1e-3 eps:

        p = 2:   step = push / ||g||_2^2 * g
        p = inf: step = push / ||g||_1 * sign(g)

    so that gap + <g, step> = eps (|gap| + 1e-3) >= 0: the step lands just past the linearised
    boundary. A candidate whose gradient has zero norm has distance +inf and is never chosen;
    a sample whose candidates all have zero norm gets index 0, dist +inf and a zero step.

    Args:
        gap: (N, k) f_c(x) - f_ref(x) for the k candidates (<= 0 while the label is unchanged).
        grad_gap: (N, k, M) the gradients of those gaps (M = input size or subspace dimension).
        p: 2 or math.inf.
        eps: relative push past the boundary (>= 0).
    Returns:
        step (N, M) same dtype as grad_gap, index (N,) int64 in [0, k), dist (N,) same dtype.
    """
    op = "deepfool_select"
    _check_float(f"{op}: gap", gap)
    _check_float(f"{op}: grad_gap", grad_gap)
    if gap.dim() != 2:
        raise ValueError(f"{op}: gap must have shape (N, k), got {tuple(gap.shape)}")
    if grad_gap.dim() != 3:
        raise ValueError(f"{op}: grad_gap must have shape (N, k, M), got {tuple(grad_gap.shape)}")
    if grad_gap.shape[:2] != gap.shape:
        raise ValueError(
            f"{op}: grad_gap shape {tuple(grad_gap.shape)} does not match gap shape "
            f"{tuple(gap.shape)} in (N, k)"
        )
    if gap.shape[1] < 1:
        raise ValueError(f"{op}: need at least one candidate (k >= 1), got k=0")
    if gap.dtype != grad_gap.dtype:
        raise TypeError(f"{op}: gap ({gap.dtype}) and grad_gap ({grad_gap.dtype}) dtypes differ")
    if gap.device != grad_gap.device:
        raise ValueError(f"{op}: gap is on {gap.device} but grad_gap is on {grad_gap.device}")
    p = _check_p(op, p)
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")

    # Norms, distances, push and scale in float64 for both dtypes, as the compiled kernels do
    # on every device (a float32 sum of M terms is off by ~1e-6 relative: near-ties between
    # candidates would be decided by rounding); the step in the input dtype with the scale
    # rounded once.
    abs_gap = gap.abs().double()
    g64 = grad_gap.double()
    if p == 2.0:
        sq_norm = (g64 * g64).sum(-1)
        norm = sq_norm.sqrt()
    else:
        norm = g64.abs().sum(-1)
    zero = norm == 0
    dist = torch.where(zero, torch.full_like(abs_gap, math.inf), abs_gap / norm.masked_fill(zero, 1))
    best_dist, index = dist.min(dim=1)
    take = index.unsqueeze(1)
    g = grad_gap.gather(1, take.unsqueeze(2).expand(-1, 1, grad_gap.shape[2])).squeeze(1)
    push = (1.0 + eps) * abs_gap.gather(1, take).squeeze(1) + SELECT_ABS_PUSH * eps
    if p == 2.0:
        denom = sq_norm.gather(1, take).squeeze(1)
        direction = g
    else:
        denom = norm.gather(1, take).squeeze(1)
        direction = g.sign()
    best_zero = denom == 0
    scale = torch.where(best_zero, torch.zeros_like(push), push / denom.masked_fill(best_zero, 1))
    step = scale.to(grad_gap.dtype).unsqueeze(1) * direction
    return step, index, best_dist.to(gap.dtype)

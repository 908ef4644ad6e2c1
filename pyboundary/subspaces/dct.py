"""Families of 2-D DCT blocks (each channel separately, dimension C*K^2), through the compiled block
ops of :mod:`pyboundary.ops`; no dense basis is ever built."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .._utils.validation import check_int
from .base import Subspace, _image_shape

__all__ = ["DCTDiagonal", "DCTGrid"]


class _DCTBlocks(Subspace):
    """K x K blocks of the 2-D DCT at given (row, col) origins, each channel; dim C*K^2."""

    def __init__(self, image_shape, K: int, origins: list[tuple[int, int]]):
        super().__init__(image_shape)
        self.K = int(K)
        self.n_members = len(origins)
        self.dim = self.image_shape[0] * self.K * self.K
        self._origins = torch.tensor(origins, dtype=torch.int64).reshape(-1, 2)
        self._origins_on: dict = {}

    def origins(self) -> Tensor:
        """(n_members, 2) int64 (row0, col0) frequency origin of each block."""
        return self._origins.clone()

    def member_labels(self) -> list[str]:
        return [f"({r},{c})" for r, c in self._origins.tolist()]

    def _rc(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        key = str(idx.device)
        table = self._origins_on.get(key)
        if table is None:
            table = self._origins.to(idx.device)
            self._origins_on[key] = table
        rc = table[idx]
        return rc[:, 0].contiguous(), rc[:, 1].contiguous()

    def _analysis(self, x, idx):
        row0, col0 = self._rc(idx)
        coeffs = ops.dct_block_analysis(x, row0, col0, self.K, self.K)
        return coeffs.reshape(x.shape[0], self.dim)

    def _synthesis(self, coeffs, idx):
        row0, col0 = self._rc(idx)
        c, h, w = self.image_shape
        blocks = coeffs.reshape(coeffs.shape[0], c, self.K, self.K)
        return ops.dct_block_synthesis(blocks, row0, col0, h, w)


def _image_dims(image_shape) -> tuple[int, int, int]:
    """(C, H, W) of an image shape ((H, W) allowed); DCT blocks need images."""
    shape = _image_shape(image_shape)
    if len(shape) != 3:
        raise ValueError(f"DCT subspaces need images of shape (C, H, W) or (H, W), got {tuple(image_shape)!r}")
    return shape


def _check_block(K, T, image_shape) -> tuple[int, int]:
    K = check_int("K", K, minimum=1)
    T = check_int("T", T, minimum=1)
    _, h, w = image_shape
    if K > min(h, w):
        raise ValueError(f"block size K={K} is larger than the image ({h}x{w})")
    return K, T


class DCTDiagonal(_DCTBlocks):
    """K x K DCT blocks on the diagonal, origins (iT, iT) for i = 0..n-1, low to high frequency.

    n = floor((min(H, W) - K) / T) + 1 (e.g. 28x28, K=8, T=1: 21 members). Each member spans
    the frequencies [iT, iT+K) x [iT, iT+K) of every channel: dim C*K^2. On a non-square image
    the diagonal ends at min(H, W): the highest frequencies of the longer side are in no member
    (``DCTGrid`` covers the whole spectrum).

    Args:
        image_shape: per-sample shape (C, H, W), or (H, W) for C = 1.
        K: block side in frequencies, 1 <= K <= min(H, W) (default 8).
        T: stride between block origins along the diagonal, >= 1 (default 1).
    """

    name = "dct"

    def __init__(self, image_shape, K: int = 8, T: int = 1):
        shape = _image_dims(image_shape)
        K, T = _check_block(K, T, shape)
        n = (min(shape[1], shape[2]) - K) // T + 1
        super().__init__(shape, K, [(i * T, i * T) for i in range(n)])
        self.T = T

    @property
    def spec(self) -> str:
        return f"dct:K={self.K},T={self.T}"


class DCTGrid(_DCTBlocks):
    """The full grid of K x K DCT blocks, origins (aT, bT), for 2-D frequency maps.

    ``grid_shape`` = (floor((H-K)/T)+1, floor((W-K)/T)+1); member index = a * cols + b.
    T defaults to K (non-overlapping tiles; with H not a multiple of K the last partial strip
    of frequencies is not covered).

    Args:
        image_shape: per-sample shape (C, H, W), or (H, W) for C = 1.
        K: block side in frequencies, 1 <= K <= min(H, W) (default 8).
        T: stride between block origins in both directions, >= 1 (None, the default: K).
    """

    name = "dct-grid"

    def __init__(self, image_shape, K: int = 8, T: int | None = None):
        shape = _image_dims(image_shape)
        K, T = _check_block(K, K if T is None else T, shape)
        rows = (shape[1] - K) // T + 1
        cols = (shape[2] - K) // T + 1
        super().__init__(shape, K, [(a * T, b * T) for a in range(rows) for b in range(cols)])
        self.T = T
        self.grid_shape = (rows, cols)

    @property
    def spec(self) -> str:
        return f"dct-grid:K={self.K}" + ("" if self.T == self.K else f",T={self.T}")

"""Frequency-domain data transforms (2-D orthonormal DCT-II over the last two dimensions).

``dct_flip`` mirrors the spectrum (low <-> high frequencies), ``dct_lowpass`` keeps the
top-left B x B block of frequencies. Both are linear, norm-respecting maps used to test whether
a network's boundary follows the data's discriminative frequencies (train on flipped data and
the margins along the DCT diagonal flip too). Each exists as a tensor function and as a
dataset-transform callable (torchvision style, applied to one sample or a batch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops

__all__ = ["dct_flip", "dct_lowpass", "DCTFlip", "DCTLowpass"]


def _check_input(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name}: x must have shape (..., H, W), got {tuple(x.shape)}")


def dct_flip(x: Tensor) -> Tensor:
    """idct2(flip(dct2(x))) with both frequency axes reversed: coefficient (u, v) moves to
    (H-1-u, W-1-v). An orthogonal involution (dct_flip(dct_flip(x)) == x).

    Args:
        x: (..., H, W) float32/float64 images (pixel units).
    Returns:
        (..., H, W) same dtype and units.
    """
    _check_input("dct_flip", x)
    return ops.idct2(torch.flip(ops.dct2(x), dims=(-2, -1)))


def dct_lowpass(x: Tensor, B: int) -> Tensor:
    """Keep the B x B lowest 2-D DCT frequencies (top-left block), zero the rest.

    The orthogonal projection onto span{basis image (u, v): u < B, v < B}.

    Args:
        x: (..., H, W) float32/float64 images.
        B: block size, 1 <= B <= min(H, W).
    Returns:
        (..., H, W) same dtype.
    """
    _check_input("dct_lowpass", x)
    h, w = x.shape[-2:]
    if isinstance(B, bool) or not isinstance(B, int):
        raise TypeError(f"dct_lowpass: B must be an int, got {type(B).__name__}")
    if not 1 <= B <= min(h, w):
        raise ValueError(f"dct_lowpass: B must be in [1, {min(h, w)}] for {h}x{w} images, got {B}")
    coeffs = ops.dct2(x)
    mask = torch.zeros(h, w, dtype=x.dtype, device=x.device)
    mask[:B, :B] = 1
    return ops.idct2(coeffs * mask)


class DCTFlip:
    """Dataset transform: ``DCTFlip()(x) == dct_flip(x)`` for one (C, H, W) sample or a batch."""

    def __call__(self, x: Tensor) -> Tensor:
        return dct_flip(x)

    def __repr__(self) -> str:
        return "DCTFlip()"


class DCTLowpass:
    """Dataset transform: ``DCTLowpass(B)(x) == dct_lowpass(x, B)``."""

    def __init__(self, B: int):
        if isinstance(B, bool) or not isinstance(B, int) or B < 1:
            raise ValueError(f"DCTLowpass: B must be a positive int, got {B!r}")
        self.B = B

    def __call__(self, x: Tensor) -> Tensor:
        return dct_lowpass(x, self.B)

    def __repr__(self) -> str:
        return f"DCTLowpass(B={self.B})"

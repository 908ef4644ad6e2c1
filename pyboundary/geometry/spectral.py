"""Frequency analysis: DCT data transforms and the energy of perturbations per frequency band.

Transforms (2-D orthonormal DCT-II over the last two dimensions):

``dct_flip`` mirrors the spectrum (low <-> high frequencies), ``dct_lowpass`` keeps the
top-left B x B block of frequencies. Both are linear, norm-respecting maps used to test whether
a network's boundary follows the data's discriminative frequencies (train on flipped data and
the margins along the DCT diagonal flip too). Each exists as a tensor function and as a
dataset-transform callable (torchvision style, applied to one sample or a batch).

:func:`band_energy` measures which fraction of each perturbation's energy lies in each member
("band") of a subspace family, e.g. the DCT diagonal from low to high frequency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .. import ops
from .._utils.batching import resolve_batch_size
from .._utils.plotting import pyplot, save_figure
from .._utils.results import Result
from .._utils.validation import check_finite, check_int
from ..subspaces import parse_subspaces

__all__ = ["dct_flip", "dct_lowpass", "DCTFlip", "DCTLowpass", "BandEnergy", "band_energy", "plot_band_energy"]


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
    B = check_int("B", B)
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
        B = check_int("B", B, minimum=1)
        self.B = B

    def __call__(self, x: Tensor) -> Tensor:
        return dct_lowpass(x, self.B)

    def __repr__(self) -> str:
        return f"DCTLowpass(B={self.B})"



# ---------------------------------------------------------------------------- band energy
@dataclass
class BandEnergy(Result):
    """Fraction of each perturbation's squared L2 norm inside each member of a subspace family.

    Attributes:
        fractions: (N, B) float64 numpy array, ||P_b delta_n||^2 / ||delta_n||^2 in [0, 1] for
            sample n and member b (a row of NaN for a zero delta).
        per_band: (B,) float64 numpy array, the ``quantile``-th percentile of the fractions over
            the samples (zero deltas left out; NaN when none is left).
        mean: (B,) float64 numpy array, the mean fraction over the samples (zero deltas left out).
        quantile: float, the percentile q in [0, 100] reported in per_band.
        labels: list of B member labels (e.g. DCT block origins; 0..B-1 when the family has
            none).
        name: str, the family's name ('' when it has none).
    """

    fractions: np.ndarray
    per_band: np.ndarray
    mean: np.ndarray
    quantile: float
    labels: list
    name: str

    def summary(self) -> dict:
        return {"family": self.name, "quantile": self.quantile, "n": int(self.fractions.shape[0]),
                "per_band": self.per_band.tolist(), "mean": self.mean.tolist()}


def band_energy(
    perturbations: Tensor, family, *, quantile: float = 95.0, batch_size: int | None = None
) -> BandEnergy:
    """Energy of perturbations per member ("band") of a subspace family.

    For each perturbation delta_n (N, C, H, W) and member b of ``family`` (a
    :class:`pyboundary.subspaces.Subspace` with orthonormal members, e.g. ``DCTDiagonal``, or its
    spec such as ``'dct:K=8,T=1'``):
    fraction[n, b] = ||analysis(delta_n, b)||^2 / ||delta_n||^2 in [0, 1]. The members' fractions
    sum to 1 per sample only when the family partitions the spectrum: a ``DCTGrid`` with T = K and
    K dividing H and W (otherwise a strip of high frequencies is uncovered, sum < 1, or tiles
    overlap for T < K, sum > 1); the diagonal family covers part of the spectrum only.
    Evaluated over (sample, member) pairs, ``batch_size`` pairs at a time (no per-sample loop).

    Args:
        perturbations: (N, C, H, W) finite perturbations delta_n (input units; not modified).
        family: a :class:`pyboundary.subspaces.Subspace` family or its spec string, parsed for
            the perturbations' shape (:func:`pyboundary.subspaces.parse_subspaces`).
        quantile: the percentile q in [0, 100] reported per band (default 95).
        batch_size: (sample, member) pairs analysed together (None: min(256, N x B)).
    Returns:
        :class:`BandEnergy` (fractions (N, B), per-band percentile and mean).
    """
    if not isinstance(perturbations, Tensor) or perturbations.dim() < 2:
        raise ValueError("perturbations must be a tensor (N, C, H, W), got "
                         f"{getattr(perturbations, 'shape', type(perturbations).__name__)}")
    check_finite("perturbations", perturbations)
    if isinstance(family, str):  # a spec, as scans take it
        family = parse_subspaces(family, perturbations.shape[1:])
    if not 0.0 <= float(quantile) <= 100.0:
        raise ValueError(f"quantile must be in [0, 100], got {quantile}")
    n, n_b = perturbations.shape[0], int(family.n_members)
    batch_size = resolve_batch_size(batch_size, n * n_b)
    delta = perturbations.detach()
    energy = delta.flatten(1).double().pow(2).sum(1)  # (N,)
    sample = torch.arange(n, device=delta.device).repeat_interleave(n_b)
    member = torch.arange(n_b, device=delta.device).repeat(n)
    parts = []
    for s in range(0, n * n_b, batch_size):
        si, mi = sample[s:s + batch_size], member[s:s + batch_size]
        coeffs = family.analysis(delta[si], mi)
        parts.append(coeffs.flatten(1).double().pow(2).sum(1))
    inside = torch.cat(parts).view(n, n_b) if parts else torch.zeros(n, n_b, dtype=torch.float64)
    frac = (inside / energy.unsqueeze(1)).cpu().numpy()
    frac[(energy == 0).cpu().numpy()] = np.nan
    ok = ~np.isnan(frac).any(axis=1)
    good = frac[ok]
    nan_row = np.full(n_b, np.nan)
    per_band = np.percentile(good, quantile, axis=0) if good.size else nan_row
    mean = good.mean(axis=0) if good.size else nan_row
    labels = list(family.member_labels()) if hasattr(family, "member_labels") else list(range(n_b))
    return BandEnergy(frac, per_band, mean, float(quantile), labels, str(getattr(family, "name", "")))


def plot_band_energy(results: dict | BandEnergy, path=None, ax=None):
    """Plot the per-band quantile (solid) and mean (dashed) energy fraction; ``results`` is one
    BandEnergy or a dict label -> BandEnergy (e.g. {'standard': ..., 'adversarial': ...}).
    Saves to ``path`` when given; returns the matplotlib Figure."""
    plt = pyplot()
    if isinstance(results, BandEnergy):
        results = {"": results}
    fig = ax.figure if ax is not None else plt.figure(figsize=(6.4, 3.6))
    ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
    for i, (label, res) in enumerate(results.items()):
        xs = np.arange(len(res.per_band))
        line, = ax.plot(xs, res.per_band, marker="o", ms=3, label=f"{label} p{res.quantile:g}".strip())
        ax.plot(xs, res.mean, ls="--", color=line.get_color(), label=f"{label} mean".strip())
    ax.set_xlabel("band (low -> high frequency)")
    ax.set_ylabel("fraction of perturbation energy")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    if path is not None:
        save_figure(fig, path, close=False)
    return fig

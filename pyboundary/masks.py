"""Frequency importance masks: which DCT (or Fourier) coefficients a frozen model needs.

A mask M with entries in [0, 1] over the 2-D DCT coefficients (shape (H, W), or (C, H, W) with
``per_channel``) filters an input as x_M = idct2(M * dct2(x)) (orthonormal DCT of
:mod:`pyboundary.ops`). :func:`learn_mask` minimises

    mean_i | CE(model(x_M,i), t_i) - CE(model(x_i), t_i) |  +  lam * ||M||_p / n^(1/p)

over M by projected Adam (M clipped to [0, 1] after each step), t = the given labels or the
model's own predictions, n = number of mask entries (so the all-ones mask costs exactly lam).
The model is frozen and left unchanged.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .utils import check_finite, forward_logits, make_generator, model_guard

__all__ = ["MaskResult", "apply_mask", "learn_mask", "masked_accuracy", "plot_mask"]

_BASES = ("dct", "fft")


def _check_basis(basis: str) -> str:
    if basis not in _BASES:
        raise ValueError(f"basis must be one of {_BASES}, got {basis!r}")
    return basis


def mask_shape(image_shape, basis: str = "dct", per_channel: bool = False) -> tuple:
    """Shape of a mask for images (C, H, W): (H, W) for the DCT, (H, W // 2 + 1) for the real FFT,
    with a leading C when ``per_channel``."""
    c, h, w = image_shape
    hw = (h, w) if _check_basis(basis) == "dct" else (h, w // 2 + 1)
    return (c, *hw) if per_channel else hw


def apply_mask(x: Tensor, mask: Tensor, basis: str = "dct") -> Tensor:
    """Filter images x (N, C, H, W) by a coefficient mask: idct2(mask * dct2(x)) (or the real
    FFT analogue). mask: (H, W) or (C, H, W) (see :func:`mask_shape`), broadcast over N.
    Differentiable in x and mask. Returns (N, C, H, W)."""
    _check_basis(basis)
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    want = mask_shape(x.shape[1:], basis, per_channel=mask.dim() == 3)
    if tuple(mask.shape) != want:
        raise ValueError(f"mask must have shape {want} for images {tuple(x.shape[1:])} "
                         f"(basis {basis!r}), got {tuple(mask.shape)}")
    mask = mask.to(x.dtype)
    if basis == "dct":
        return ops.idct2(ops.dct2(x) * mask)
    return torch.fft.irfft2(torch.fft.rfft2(x, norm="ortho") * mask, s=x.shape[-2:], norm="ortho")


@dataclass
class MaskResult:
    """A learned mask and its accuracies.

    mask: (H, W) or (C, H, W) in [0, 1] (see :func:`mask_shape`); basis: 'dct' or 'fft';
    accuracy_clean / accuracy_masked / accuracy_complement: accuracy (against the targets used
    for learning) on x, on x filtered by M, and on x filtered by 1 - M; density: mean of M;
    kept: fraction of entries > 0.5; history: objective per step.
    """

    mask: Tensor
    basis: str
    accuracy_clean: float
    accuracy_masked: float
    accuracy_complement: float
    density: float
    kept: float
    lam: float
    p: float
    history: list = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {"basis": self.basis, "lam": self.lam, "p": self.p, "density": self.density,
                "kept": self.kept, "accuracy_clean": self.accuracy_clean,
                "accuracy_masked": self.accuracy_masked, "accuracy_complement": self.accuracy_complement}

    def plot(self, path=None):
        return plot_mask(self, path)


@torch.no_grad()
def masked_accuracy(model: Callable, x: Tensor, target: Tensor, mask: Tensor | None, basis: str = "dct",
                    batch_size: int = 512) -> float:
    """Accuracy of ``model`` on x filtered by ``mask`` (None: unfiltered), in batches."""
    hits = 0
    with model_guard(model):
        for s in range(0, x.shape[0], batch_size):
            xb = x[s:s + batch_size]
            if mask is not None:
                xb = apply_mask(xb, mask, basis)
            hits += int((forward_logits(model, xb).argmax(1) == target[s:s + batch_size]).sum())
    return hits / max(1, x.shape[0])


def learn_mask(
    model: Callable,
    x: Tensor,
    y: Tensor | None = None,
    *,
    basis: str = "dct",
    lam: float = 0.1,
    p: float = 1.0,
    steps: int = 300,
    lr: float = 0.05,
    batch_size: int = 256,
    per_channel: bool = False,
    seed: int = 0,
) -> MaskResult:
    """Learn a sparse mask over DCT (or FFT) coefficients for a frozen model (see module doc).

    Args:
        model: callable (N, C, H, W) -> (N, L) logits; frozen and left unchanged.
        x: (N, C, H, W) inputs; y: optional (N,) int64 labels (default: the model's predictions).
        basis: 'dct' or 'fft'.
        lam: sparsity weight (>= 0); p: the norm of the penalty (> 0, e.g. 1).
        steps: Adam steps (>= 1) on random mini-batches of ``batch_size`` (seeded).
        lr: Adam learning rate.
        per_channel: one mask per colour channel instead of one shared (H, W) mask.
    Returns:
        :class:`MaskResult` (accuracies against y, or against the clean predictions).
    """
    _check_basis(basis)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"x must be a floating tensor (N, C, H, W), got {getattr(x, 'shape', type(x).__name__)}")
    check_finite("x", x)
    for name, val, ok in (("lam", lam, lam >= 0), ("p", p, p > 0), ("lr", lr, lr > 0)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not ok or not np.isfinite(val):
            raise ValueError(f"{name} must be a finite number {'>= 0' if name == 'lam' else '> 0'}, got {val!r}")
    for name, val in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {val!r}")
    n = x.shape[0]
    with model_guard(model):
        with torch.no_grad():
            clean_pred = torch.cat([forward_logits(model, x[s:s + 512]).argmax(1) for s in range(0, n, 512)])
        if y is None:
            target = clean_pred
        else:
            if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != (n,):
                raise ValueError(f"y must be an int64 tensor of shape ({n},), got "
                                 f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
            target = y.to(x.device)
        shape = mask_shape(x.shape[1:], basis, per_channel)
        theta = torch.ones(shape, dtype=x.dtype, device=x.device, requires_grad=True)
        opt = torch.optim.Adam([theta], lr=lr)
        gen = make_generator(seed, "cpu")
        n_entries = theta.numel()
        history = []
        for _ in range(steps):
            pick = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(x.device)
            xb, tb = x[pick], target[pick]
            with torch.enable_grad():
                with torch.no_grad():
                    ref = F.cross_entropy(forward_logits(model, xb), tb, reduction="none")
                masked = F.cross_entropy(forward_logits(model, apply_mask(xb, theta, basis)), tb,
                                         reduction="none")
                penalty = theta.abs().pow(p).sum().pow(1.0 / p) / n_entries ** (1.0 / p)
                loss = (masked - ref).abs().mean() + lam * penalty
                opt.zero_grad()
                loss.backward()
            opt.step()
            with torch.no_grad():
                theta.clamp_(0.0, 1.0)
            history.append(float(loss.detach()))
    mask = theta.detach()
    return MaskResult(
        mask=mask, basis=basis,
        accuracy_clean=masked_accuracy(model, x, target, None, basis),
        accuracy_masked=masked_accuracy(model, x, target, mask, basis),
        accuracy_complement=masked_accuracy(model, x, target, 1 - mask, basis),
        density=float(mask.mean()), kept=float((mask > 0.5).double().mean()),
        lam=float(lam), p=float(p), history=history,
    )


def plot_mask(result: MaskResult, path=None):
    """Image of the mask (channel-averaged), low frequencies top-left; saves to ``path``."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result.mask.detach().double().cpu()
    if m.dim() == 3:
        m = m.mean(0)
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    im = ax.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax)
    ax.set_title(f"{result.basis.upper()} mask: density {result.density:.2f}\n"
                 f"acc clean {result.accuracy_clean:.2f}, masked {result.accuracy_masked:.2f}, "
                 f"complement {result.accuracy_complement:.2f}", fontsize=8)
    ax.set_xlabel("frequency v (column)")
    ax.set_ylabel("frequency u (row)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig

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

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .._utils.batching import chunks, plan_batch_size
from .._utils.model import forward_logits, model_guard, predict
from .._utils.plotting import pyplot, save_figure
from .._utils.results import Result
from .._utils.rng import make_generator
from .._utils.validation import (
    check_inputs,
    check_int,
    check_labels,
    check_model,
    check_number,
)

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
class MaskResult(Result):
    """A learned mask and its accuracies.

    Attributes:
        mask: (H, W) or (C, H, W) tensor M with entries in [0, 1] (see :func:`mask_shape`;
            (H, W // 2 + 1) columns for 'fft'), dtype and device of x.
        basis: 'dct' or 'fft'.
        accuracy_clean: accuracy (fraction in [0, 1], against the targets used for learning:
            the labels, or the clean predictions) on x.
        accuracy_masked: the same on x filtered by M.
        accuracy_complement: the same on x filtered by 1 - M.
        density: mean of M, in [0, 1].
        kept: fraction of the entries of M above 0.5.
        lam: the sparsity weight.
        penalty_exponent: q of the penalty (sum |m|^q)^(1/q).
        history: list of floats, the objective (loss + penalty) of each Adam step, in order.
    """

    mask: Tensor
    basis: str
    accuracy_clean: float
    accuracy_masked: float
    accuracy_complement: float
    density: float
    kept: float
    lam: float
    penalty_exponent: float
    history: list = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {"basis": self.basis, "lam": self.lam, "penalty_exponent": self.penalty_exponent, "density": self.density,
                "kept": self.kept, "accuracy_clean": self.accuracy_clean,
                "accuracy_masked": self.accuracy_masked, "accuracy_complement": self.accuracy_complement}

    def plot(self, path=None):
        return plot_mask(self, path)


@torch.no_grad()
def masked_accuracy(model: Callable, x: Tensor, labels: Tensor, mask: Tensor | None, basis: str = "dct",
                    *, batch_size: int | None = None) -> float:
    """Accuracy of ``model`` against ``labels`` on x filtered by ``mask`` (None: unfiltered).

    batch_size: input rows per model call (None: automatic)."""
    xm = x if mask is None else apply_mask(x, mask, basis)
    return float((predict(model, xm, batch_size=batch_size) == labels.to(x.device)).double().mean()) if x.shape[0] else 0.0


def _mask_loss(model, xb: Tensor, tb: Tensor, theta: Tensor, basis: str, batch: int) -> Tensor:
    """sum over the rows xb of |CE(masked) - CE(clean)| / batch (batch: rows of the whole
    mini-batch, so the parts of a mini-batch add up to its mean)."""
    with torch.no_grad():
        ref = F.cross_entropy(forward_logits(model, xb), tb, reduction="none")
    with torch.enable_grad():
        masked = F.cross_entropy(forward_logits(model, apply_mask(xb, theta, basis)), tb, reduction="none")
        return (masked - ref).abs().sum() / batch


def learn_mask(
    model: Callable,
    x: Tensor,
    labels: Tensor | None = None,
    *,
    basis: str = "dct",
    lam: float = 0.1,
    penalty_exponent: float = 1.0,
    steps: int = 300,
    lr: float = 0.05,
    train_batch_size: int = 256,
    per_channel: bool = False,
    seed: int = 0,
) -> MaskResult:
    """Learn a sparse mask over DCT (or FFT) coefficients for a frozen model (see module doc).

    Args:
        model: callable (N, C, H, W) -> (N, L) logits; frozen and left unchanged.
        x: (N, C, H, W) inputs.
        labels: optional (N,) int64 classes (default: the model's predictions).
        basis: 'dct' or 'fft'.
        lam: sparsity weight (>= 0).
        penalty_exponent: q of the penalty (sum |m|^q)^(1/q) (> 0, e.g. 1).
        steps: Adam steps (>= 1) on random mini-batches of ``train_batch_size`` samples (seeded);
            a mini-batch larger than the memory budget allows in one pass is accumulated over
            smaller ones (same gradient).
        lr: Adam learning rate.
        train_batch_size: samples per Adam step (>= 1, default 256; at most N), drawn with
            replacement.
        per_channel: one mask per colour channel instead of one shared (H, W) mask.
        seed: seed of the mini-batch draws (default 0; CPU generator). The mask starts at all
            ones, so the seed is the only randomness.
    Returns:
        :class:`MaskResult` (accuracies against labels, or against the clean predictions).
    """
    _check_basis(basis)
    check_model(model)
    x = check_inputs("x", x, min_dim=4)
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    lam = check_number("lam", lam, minimum=0)
    q = check_number("penalty_exponent", penalty_exponent, minimum=0, strict_minimum=True)
    lr = check_number("lr", lr, minimum=0, strict_minimum=True)
    steps = check_int("steps", steps, minimum=1)
    train_batch_size = check_int("train_batch_size", train_batch_size, minimum=1)
    n = x.shape[0]
    with model_guard(model):
        clean_pred = predict(model, x)
        target = clean_pred if labels is None else check_labels(labels, n, device=x.device)
        shape = mask_shape(x.shape[1:], basis, per_channel)
        theta = torch.ones(shape, dtype=x.dtype, device=x.device, requires_grad=True)
        opt = torch.optim.Adam([theta], lr=lr)
        gen = make_generator(seed, "cpu")
        n_entries = theta.numel()
        history = []
        # rows per forward + reverse pass: a mini-batch whose graph does not fit the memory budget
        # is accumulated over smaller passes (the same gradient, up to float summation order)
        def probe(r: int) -> None:
            rows = torch.arange(r, device=x.device) % n
            _mask_loss(model, x[rows], target[rows], theta, basis, r).backward()  # opt.zero_grad() clears it

        micro = plan_batch_size(probe,
                                min(train_batch_size, n), device=x.device, default=train_batch_size,
                                reuse=(model, ("mask", tuple(x.shape[1:]), x.dtype, basis))).batch_size
        for _ in range(steps):
            pick = torch.randint(0, n, (min(train_batch_size, n),), generator=gen).to(x.device)
            opt.zero_grad()
            with torch.enable_grad():
                loss = 0.0
                for sl in chunks(pick.numel(), micro):
                    part = _mask_loss(model, x[pick[sl]], target[pick[sl]], theta, basis, pick.numel())
                    part.backward()
                    loss += float(part.detach())
                penalty = lam * theta.abs().pow(q).sum().pow(1.0 / q) / n_entries ** (1.0 / q)
                penalty.backward()
            opt.step()
            with torch.no_grad():
                theta.clamp_(0.0, 1.0)
            history.append(loss + float(penalty.detach()))
    mask = theta.detach()
    return MaskResult(
        mask=mask, basis=basis,
        accuracy_clean=masked_accuracy(model, x, target, None, basis),
        accuracy_masked=masked_accuracy(model, x, target, mask, basis),
        accuracy_complement=masked_accuracy(model, x, target, 1 - mask, basis),
        density=float(mask.mean()), kept=float((mask > 0.5).double().mean()),
        lam=lam, penalty_exponent=q, history=history,
    )


def plot_mask(result: MaskResult, path=None):
    """Image of the mask (channel-averaged), low frequencies top-left; saves to ``path``."""
    plt = pyplot()
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
    if path is not None:
        save_figure(fig, path, close=False)
    return fig

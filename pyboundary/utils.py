"""Small shared helpers: leaving a model as found, input validation, seeded randomness."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["model_guard", "check_finite", "check_logits", "make_generator", "forward_logits"]


@contextlib.contextmanager
def model_guard(model: Callable, *, eval_mode: bool = True) -> Iterator[Callable]:
    """Run ``model`` in eval mode with frozen parameters, then restore it exactly.

    Inside the block every submodule is in eval mode (if ``eval_mode``) and every parameter has
    ``requires_grad=False``, so gradients with respect to the input never touch parameter
    ``.grad`` and cost no parameter-gradient work. On exit the per-module training flags and
    per-parameter ``requires_grad`` flags are restored, also when the block raises.
    Plain callables (not ``nn.Module``) pass through unchanged.
    """
    if not isinstance(model, nn.Module):
        yield model
        return
    training = [(m, m.training) for m in model.modules()]
    requires = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        for p, _ in requires:
            p.requires_grad_(False)
        yield model
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in requires:
            p.requires_grad_(flag)


def check_finite(name: str, x: Tensor) -> None:
    """Raise ValueError naming ``name`` if x holds NaN or Inf."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")


_warned_probabilities = False


def check_logits(logits: Tensor, n: int, *, where: str = "model") -> None:
    """Validate a model output: (n, L) floating logits with L >= 2, finite.

    Warns (once per process) when every row is non-negative and sums to 1, which means the
    model returns probabilities: margins of a softmax output are not margins of the logits.
    """
    global _warned_probabilities
    if not isinstance(logits, Tensor):
        raise TypeError(f"{where} must return a tensor of logits, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(
            f"{where} must return logits of shape (N, L) = ({n}, L) for {n} inputs, "
            f"got shape {tuple(logits.shape)}"
        )
    if logits.shape[1] < 2:
        raise ValueError(f"{where} must return at least 2 classes, got L={logits.shape[1]}")
    if not logits.is_floating_point():
        raise TypeError(f"{where} must return floating-point logits, got {logits.dtype}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{where} returned non-finite logits (NaN or Inf)")
    if not _warned_probabilities and n > 0:
        with torch.no_grad():
            rows = logits.detach()
            sums = rows.sum(1)
            if bool((rows >= 0).all()) and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-4)):
                _warned_probabilities = True
                warnings.warn(
                    f"{where} outputs look like probabilities (non-negative rows summing to 1); "
                    "pyboundary expects logits. Remove the final softmax for meaningful margins.",
                    stacklevel=3,
                )


def forward_logits(model: Callable, x: Tensor, *, where: str = "model") -> Tensor:
    """model(x), validated with :func:`check_logits`."""
    out = model(x)
    check_logits(out, x.shape[0], where=where)
    return out


def make_generator(seed: int | None, device="cpu") -> torch.Generator | None:
    """A torch.Generator seeded with ``seed`` on ``device`` (None when seed is None)."""
    if seed is None:
        return None
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen


def is_inf(p) -> bool:
    """True for p = inf given as float or string ('inf', 'linf')."""
    if isinstance(p, str):
        return p.lower() in ("inf", "linf", "l-inf")
    return math.isinf(float(p))

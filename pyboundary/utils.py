"""Small shared helpers: leaving a model as found, input validation, seeded randomness."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "model_guard", "check_finite", "check_index_tensor", "check_logits", "explain_dtype_errors",
    "make_generator",
    "forward_logits",
]


@contextlib.contextmanager
def model_guard(model: Callable, *, eval_mode: bool = True) -> Iterator[Callable]:
    """Run ``model`` in eval mode with frozen parameters, then restore it exactly.

    Inside the block every submodule is in eval mode (if ``eval_mode``) and every parameter has
    ``requires_grad=False``, so gradients with respect to the input never touch parameter
    ``.grad`` and cost no parameter-gradient work. On exit the per-module training flags and
    per-parameter ``requires_grad`` flags are restored, also when the block raises.
    Plain callables (not ``nn.Module``) pass through unchanged. The block runs outside
    ``torch.inference_mode`` even when the caller is inside it.
    """
    # Every pipeline differentiates through the model: lift an enclosing torch.inference_mode(),
    # under which torch.enable_grad() alone would not record a graph. inference_mode(False)
    # switches grad mode on, so the caller's grad mode is put back explicitly.
    grad_enabled = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad_enabled):
        if not isinstance(model, nn.Module):
            yield model
            return
        with _frozen(model, eval_mode):
            yield model


@contextlib.contextmanager
def _frozen(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    training = [(m, m.training) for m in model.modules()]
    requires = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        for p, _ in requires:
            p.requires_grad_(False)
        yield
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



@contextlib.contextmanager
def explain_dtype_errors(model: Callable, x: Tensor, *, name: str = "x") -> Iterator[None]:
    """Turn a model failure caused by mixing float32 and float64 into a TypeError naming ``x``.

    A float64 ``x`` fed to a float32 model fails deep inside the model with a torch error about
    matrix dtypes. Models that cast their input themselves are fine, so nothing is checked up
    front: only when the block raises a RuntimeError while x's dtype differs from the model's
    parameters is the error re-raised as a TypeError that says what to convert.
    """
    try:
        yield
    except RuntimeError as err:
        param = None
        if isinstance(model, nn.Module):
            param = next((p for p in model.parameters() if p.is_floating_point()), None)
        if param is None or param.dtype == x.dtype:
            raise
        raise TypeError(
            f"the model failed on {name} of dtype {x.dtype}, and its parameters are {param.dtype}; "
            f"convert one of them (e.g. {name}.to({param.dtype}) or model.to({x.dtype})). "
            f"Model error: {err}"
        ) from err


def check_index_tensor(name: str, t, n: int, device=None):
    """Validate an optional per-sample int64 index tensor of shape (n,); returns it on ``device``.

    None passes through. Raises TypeError (not a tensor, not int64) or ValueError (wrong shape),
    naming ``name`` and the value seen.
    """
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an int64 tensor of shape ({n},), got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match x, got {tuple(t.shape)}")
    return t if device is None else t.to(device)

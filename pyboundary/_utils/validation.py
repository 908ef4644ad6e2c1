"""Argument validation: one policy for every public function.

A wrong *type* raises TypeError, a wrong *value* ValueError; every message names the argument and
the value seen. Integers may be Python or numpy integers (never bools); numbers may be ints or
floats (never bools). The helpers return the normalised value, so callers write
``steps = check_int("steps", steps, minimum=1)``.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "check_int", "check_number", "check_choice", "check_p", "is_inf", "check_clamp", "check_model",
    "check_finite", "check_inputs", "check_index_tensor", "check_labels", "check_in_box",
]


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False) -> int | None:
    """An integer in [minimum, maximum]; None passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_number(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
                 strict_minimum: bool = False, strict_maximum: bool = False, finite: bool = True,
                 allow_none: bool = False) -> float | None:
    """A real number (int or float, not bool), finite unless ``finite=False``, within the bounds
    (``strict_*`` excludes the bound itself); None passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and (value <= minimum if strict_minimum else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict_minimum else '>='} {minimum}, got {value}")
    if maximum is not None and (value >= maximum if strict_maximum else value > maximum):
        raise ValueError(f"{name} must be {'<' if strict_maximum else '<='} {maximum}, got {value}")
    return value


def check_choice(name: str, value, choices: Sequence):
    """``value`` if it is one of ``choices`` (ValueError listing them otherwise)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def is_inf(p) -> bool:
    """True for p = inf given as a number or as a string ('inf', 'linf', 'l-inf')."""
    if isinstance(p, str):
        return p.strip().lower() in ("inf", "linf", "l-inf")
    return math.isinf(float(p))


def check_p(p, name: str = "p") -> float:
    """The norm of a margin or a perturbation: 2.0 or math.inf (also '2', 'l2', 'inf', 'linf')."""
    if isinstance(p, str):
        text = p.strip().lower()
        if text in ("2", "l2"):
            return 2.0
        if is_inf(text):
            return math.inf
    elif not isinstance(p, bool) and isinstance(p, numbers.Real):
        if float(p) == 2.0:
            return 2.0
        if math.isinf(float(p)) and float(p) > 0:
            return math.inf
    raise ValueError(f"{name} must be 2 or inf, got {p!r}")


def check_clamp(clamp, name: str = "clamp") -> tuple[float, float] | None:
    """None, or a box (lo, hi) of finite numbers with lo < hi, as floats."""
    if clamp is None:
        return None
    try:
        lo, hi = clamp
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be None or a pair (lo, hi) of numbers, got {clamp!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must be finite with lo < hi, got {clamp!r}")
    return lo, hi


def check_in_box(name: str, x: Tensor, clamp: tuple[float, float] | None) -> None:
    """ValueError when some row of x (N, ...) has a value outside the box ``clamp`` = (lo, hi)
    (nothing to check for None): a search kept in the box cannot start outside it, and its
    "margin" would include the move into the box."""
    if clamp is None or x.shape[0] == 0:
        return
    lo, hi = clamp
    bad = ((x < lo) | (x > hi)).reshape(x.shape[0], -1).any(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"{name} must lie inside the clamp box [{lo:g}, {hi:g}]: {int(bad.sum())} of {x.shape[0]} "
            f"inputs do not (e.g. input {i}, values in [{float(x[i].min()):.4g}, {float(x[i].max()):.4g}]); "
            "rescale the inputs to the box or pass clamp=None")


def check_model(model) -> None:
    """A model is any callable (N, ...) -> (N, L) logits."""
    if not callable(model):
        raise TypeError(f"model must be callable (N, ...) -> (N, L) logits, got {type(model).__name__}")


def check_finite(name: str, x: Tensor) -> None:
    """Raise ValueError naming ``name`` if x holds NaN or Inf (TypeError if not a tensor)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")


def check_inputs(name: str, x, *, min_dim: int = 2, allow_empty: bool = True) -> Tensor:
    """A batch of inputs: float32/float64 tensor of shape (N, ...) with >= ``min_dim`` dims,
    finite. Returns x detached (not copied)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have shape (N, ...) with a batch dimension "
                         f"(>= {min_dim} dims), got {tuple(x.shape)}")
    if not allow_empty and x.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    check_finite(name, x)
    return x.detach()


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_index_tensor(name: str, t, n: int, device=None):
    """Validate an optional per-sample index tensor of shape (n,); returns it as int64 on ``device``.

    Any integer dtype is accepted (numpy and datasets often give int32 or uint8 labels) and
    converted; None passes through. Raises TypeError (not a tensor, not integer: floats and bools
    are refused rather than truncated) or ValueError (wrong shape), naming ``name`` and the value seen.
    """
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape ({n},), got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64 or narrower), got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match x, got {tuple(t.shape)}")
    return t.to(device=device if device is not None else t.device, dtype=torch.int64)


def check_labels(labels, n: int, *, n_classes: int | None = None, device=None,
                 name: str = "labels") -> Tensor:
    """Class indices: an integer tensor of shape (n,) (returned as int64), values in
    [0, n_classes) when known."""
    if labels is None:
        raise TypeError(f"{name} must be an integer tensor of shape ({n},), got None")
    labels = check_index_tensor(name, labels, n, device)
    if n_classes is not None and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"{name} must lie in [0, {n_classes - 1}] for {n_classes} classes, "
                             f"got range [{lo}, {hi}]")
    return labels

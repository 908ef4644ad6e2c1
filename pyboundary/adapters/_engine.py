"""What the adapters share: their engine options, and one engine call that returns adversarial points.

The adapters translate a peer library's call (foolbox, torchattacks) into one call of
:func:`pyboundary.deepfool` (or, through ``engine``, another function with the same signature):
the model as a torch callable, the reference labels or the target classes, the box as ``clamp``.
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping

import torch
from torch import Tensor

from .._utils.model import forward_logits, model_guard
from .._utils.validation import check_int, check_number
from ..attacks.deepfool import deepfool

__all__ = ["engine_options", "adversarial_points", "check_in_box", "OutOfBoundsError"]

#: engine arguments an adapter sets itself from its peer library's call (never in deepfool_kwargs)
_SET_BY_ADAPTER = frozenset({"model", "x", "labels", "target", "p", "clamp", "subspace", "subspace_index"})
#: engine arguments an adapter takes under its own (peer library's) names
_NAMED = {"max_iter": "steps", "candidates": "candidates", "overshoot": "overshoot"}


def engine_options(*, steps, candidates, overshoot, deepfool_kwargs, engine: Callable = deepfool) -> dict:
    """Validated engine keyword options from an adapter's constructor arguments.

    Args:
        steps: int >= 1, the engine's ``max_iter``.
        candidates: int >= 2 or None (all classes).
        overshoot: number in [0, 10).
        deepfool_kwargs: None or a mapping of further engine options (``refine``, ``tol``,
            ``batch_size``, ``prune``, ``noise_retries``, ``seed``, ``grad_strategy``, ...).
    Returns:
        dict of keyword arguments for ``engine`` (everything but model, x, p, labels/target, clamp).
    Raises:
        TypeError: a wrong type, or a deepfool_kwargs key the engine does not take, or one that
            the adapter sets itself (named in the message).
        ValueError: a value out of range.
    """
    check_int("steps", steps, minimum=1)
    check_int("candidates", candidates, minimum=2, allow_none=True)
    overshoot = check_number("overshoot", overshoot, minimum=0.0, maximum=10.0, strict_maximum=True)
    extra = {} if deepfool_kwargs is None else deepfool_kwargs
    if not isinstance(extra, Mapping):
        raise TypeError(f"deepfool_kwargs must be a dict or None, got {type(extra).__name__}")
    params = inspect.signature(engine).parameters
    unknown = sorted(k for k in extra if k not in params or k.startswith("_"))
    if unknown:
        raise TypeError(f"deepfool_kwargs: unknown engine option(s) {unknown}; engine options are "
                        f"{sorted(k for k in set(params) - _SET_BY_ADAPTER - set(_NAMED) if not k.startswith('_'))}")
    taken = sorted(k for k in extra if k in _SET_BY_ADAPTER or k in _NAMED)
    if taken:
        named = {k: _NAMED[k] for k in taken if k in _NAMED}
        raise TypeError(f"deepfool_kwargs: {taken} are set by the attack itself"
                        + (f" (pass them as {named})" if named else ""))
    return dict(extra, max_iter=steps, candidates=candidates, overshoot=overshoot)


class OutOfBoundsError(ValueError, AssertionError):
    """Inputs outside an attack's box: a ValueError, and also an AssertionError, which is what
    foolbox's own attacks raise for inputs outside the model's bounds (their ``run`` asserts the
    bounds), so code written against the peer library catches it too."""


def check_in_box(x: Tensor, clamp: tuple, what: str) -> None:
    """OutOfBoundsError (a ValueError) when x has values outside the box clamp = (lo, hi), naming ``what``."""
    lo, hi = clamp
    if x.numel() and (float(x.min()) < lo or float(x.max()) > hi):
        raise OutOfBoundsError(f"inputs must lie within {what} [{lo:g}, {hi:g}], got values in "
                               f"[{float(x.min()):g}, {float(x.max()):g}]")


def adversarial_points(model: Callable, x: Tensor, *, p, labels: Tensor | None = None,
                       target: Tensor | None = None, clamp: tuple | None, options: dict,
                       engine: Callable = deepfool) -> tuple[Tensor, Tensor]:
    """x + the engine's perturbation per input, and the class there.

    Returns:
        (points (N, ...) like x, a new tensor without graph; classes (N,) int64: the engine's
        ``adv_label``, the reference class where nothing was found, the target where the input
        already was classified as it).

    Untargeted (``labels`` given or None = the model's predictions): inputs the model already
    misclassifies come back unchanged (margin 0). Targeted (``target``): inputs already
    classified as their target come back unchanged, the others go through the engine with
    ``target``. Inputs the engine could not flip in ``max_iter`` steps come back unchanged
    (not adversarial). With ``clamp`` the points are clipped to the box (the engine's points
    lie in it; clipping only removes float rounding of x + (point - x)).
    """
    x = x.detach()
    if target is None:
        res = engine(model, x, p=p, labels=labels, clamp=clamp, **options)
        return _points(x, res.perturbation, clamp), res.adv_label
    with model_guard(model), torch.no_grad():
        pred = forward_logits(model, x).argmax(1)
    todo = (pred != target).nonzero().squeeze(1)
    out, classes = x.clone(), pred.clone()
    if todo.numel():
        res = engine(model, x[todo], p=p, target=target[todo], clamp=clamp, **options)
        out[todo] = _points(x[todo], res.perturbation, clamp)
        classes[todo] = res.adv_label
    return out, classes


def _points(x: Tensor, perturbation: Tensor, clamp) -> Tensor:
    adv = x + perturbation
    return adv if clamp is None else adv.clamp(clamp[0], clamp[1])

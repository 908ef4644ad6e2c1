"""Projected gradient descent (PGD) in L-inf and L2 balls, and adversarial-training batch transforms.

Units: ``eps`` and step sizes are in input units (pixel intensity for data in [0, 1]): the L-inf
radius bounds every coordinate, the L2 radius the Euclidean norm of the whole perturbation of one
sample.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils.batching import DEFAULT_BATCH_SIZE, chunks, plan_batch_size
from .._utils.model import explain_input_errors, forward_logits, model_guard
from .._utils.rng import make_generator
from .._utils.validation import (
    check_clamp,
    check_in_box,
    check_inputs,
    check_int,
    check_labels,
    check_model,
    check_number,
    check_p,
)

__all__ = ["pgd", "pgd_batch_transform", "parse_attack"]


def _check_pgd_args(eps, steps, step_size, clamp) -> tuple[float, int, float | None, tuple | None]:
    eps = check_number("eps", eps, minimum=0)
    steps = check_int("steps", steps, minimum=1)
    step_size = check_number("step_size", step_size, minimum=0, strict_minimum=True, allow_none=True)
    return eps, steps, step_size, check_clamp(clamp)


def _flat_norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm, shaped (N, 1, ..., 1) to broadcast against t."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: Tensor, eps: float, p: float) -> Tensor:
    if math.isinf(p):
        return delta.clamp(-eps, eps)
    scale = (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale


def _random_start(x: Tensor, eps: float, p: float, gen) -> Tensor:
    if math.isinf(p):
        u = torch.rand(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        return (2 * u - 1) * eps
    # uniform in the L2 ball: Gaussian direction, radius eps * U^(1/D)
    d = x[0].numel()
    g = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    r = torch.rand((x.shape[0],), generator=gen, dtype=x.dtype, device=x.device) ** (1.0 / d)
    return g / _flat_norm(g).clamp_min(1e-12) * (eps * r).view(-1, *([1] * (x.dim() - 1)))


def _ascent_step(grad: Tensor, alpha: float, p: float) -> Tensor:
    if math.isinf(p):
        return alpha * grad.sign()
    return alpha * grad / _flat_norm(grad).clamp_min(1e-12)


def pgd(
    model: Callable,
    x: Tensor,
    labels: Tensor,
    *,
    eps: float,
    p=math.inf,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    seed: int | None = None,
    targeted: bool = False,
    batch_size: int | None = None,
) -> Tensor:
    """Projected gradient descent on the cross-entropy loss (Madry et al.), batched.

    Maximises CE(model(x + delta), labels) over ||delta||_p <= eps (or, with ``targeted``,
    minimises CE towards ``labels``), with ``steps`` ascent steps of size ``step_size``
    (sign of the gradient for L-inf, normalised gradient for L2), each followed by the projection
    onto the ball and onto the box ``clamp``. The model is run in eval mode with frozen parameters
    and restored exactly (:func:`pyboundary._utils.model.model_guard`); parameter ``.grad`` is untouched.

    Args:
        model: callable (N, ...) -> (N, L) logits.
        x: (N, ...) float inputs.
        labels: (N,) int64 true labels (or target labels when ``targeted``).
        eps: radius of the ball, >= 0, input units. eps = 0 returns a copy of x.
        p: the norm of the ball, inf (default) or 2.
        steps: number of ascent steps (>= 1).
        step_size: per-step length; default 2.5 * eps / steps.
        random_start: start from a uniform point of the ball (else from x).
        clamp: (low, high) box for the adversarial inputs (default (0, 1): images in [0, 1]), or
            None (e.g. for normalised inputs). x must lie inside it (ValueError otherwise).
        seed: seed of the random start (None: torch's global generator).
        targeted: descend towards ``labels`` instead of ascending away from them.
        batch_size: input rows per forward and reverse pass (None: the largest that fits the
            default memory budget, from a probe of one step made once per model and input shape;
            an explicit size that cannot fit is refused before the work). Samples are independent:
            the result does not depend on it.
    Returns:
        (N, ...) adversarial inputs, detached, same dtype and device as x, with
        ||x_adv - x||_p <= eps (up to rounding) and inside ``clamp`` when x is.
    """
    p = check_p(p)
    eps, steps, step_size, clamp = _check_pgd_args(eps, steps, step_size, clamp)
    check_model(model)
    x = check_inputs("x", x)
    check_in_box("x", x, clamp)  # else the projection onto the box would move x by more than eps
    labels = check_labels(labels, x.shape[0], device=x.device)
    if eps == 0 or x.shape[0] == 0:
        return x.clone()
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    gen = make_generator(seed, x.device)
    delta = _random_start(x, eps, p, gen) if random_start else torch.zeros_like(x)
    if clamp is not None:
        delta = (x + delta).clamp(*clamp) - x
    sign = -1.0 if targeted else 1.0
    n = x.shape[0]

    def gradient(rows: Tensor, d: Tensor) -> Tensor:
        x_adv = (x[rows] + d).requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(forward_logits(model, x_adv), labels[rows], reduction="sum")
            (grad,) = torch.autograd.grad(sign * loss, x_adv)
        return grad

    with model_guard(model), explain_input_errors(model, x):
        plan = plan_batch_size(lambda r: gradient(torch.arange(r, device=x.device) % n, delta[:1]), n,
                               device=x.device, batch_size=batch_size, default=DEFAULT_BATCH_SIZE,
                               max_batch_size=DEFAULT_BATCH_SIZE, reuse=(model, ("pgd", tuple(x.shape[1:]), x.dtype)))
        for sl in chunks(n, plan.batch_size):
            rows = torch.arange(sl.start, sl.stop, device=x.device)
            d = delta[sl]
            for _ in range(steps):
                d = _project(d + _ascent_step(gradient(rows, d), alpha, p), eps, p)
                if clamp is not None:
                    d = (x[sl] + d).clamp(*clamp) - x[sl]
            delta[sl] = d
    return (x + delta).detach()


def parse_attack(spec: str) -> dict:
    """Parse 'pgd-linf:eps=0.1,steps=7,frac=0.5' (or pgd-l2:...) into keyword arguments of
    :func:`pgd_batch_transform`: {'p', 'eps', 'steps', 'frac', 'step_size'?}."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"attack spec must look like 'pgd-linf:eps=0.1,steps=7,frac=0.5', got {spec!r}")
    name, _, rest = spec.partition(":")
    names = {"pgd-linf": math.inf, "pgd-l2": 2.0}
    if name.strip().lower() not in names:
        raise ValueError(f"attack must be one of {sorted(names)}, got {name!r} in {spec!r}")
    out: dict = {"p": names[name.strip().lower()]}
    casts = {"eps": float, "steps": int, "frac": float, "step_size": float}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or key not in casts:
            raise ValueError(f"unknown or malformed attack option {item!r} in {spec!r}; "
                             f"allowed: {sorted(casts)}")
        try:
            out[key] = casts[key](val)
        except ValueError:
            raise ValueError(f"attack option {key} must be a {casts[key].__name__}, got {val!r}") from None
    if "eps" not in out:
        raise ValueError(f"attack spec {spec!r} must give eps=...")
    return out


def pgd_batch_transform(
    eps: float,
    steps: int,
    frac: float = 0.5,
    p=math.inf,
    *,
    step_size: float | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
) -> Callable[[Callable, Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A ``batch_transform(model, xb, yb) -> (xb, yb)`` for :func:`pyboundary.zoo.train` that
    replaces a random fraction ``frac`` of each batch by PGD examples (labels unchanged).

    frac = 0.5 mixes clean and adversarial samples (the margin-dynamics study), frac = 1.0 is the
    adversarial training of Madry et al. The attack runs with the model in eval mode and frozen
    parameters; the model's train mode and ``requires_grad`` flags are restored before the
    training step. The replaced subset and the random starts come from a generator seeded once
    with ``seed`` (deterministic across runs).

    Args:
        eps: radius of the PGD ball, >= 0, input units (eps = 0: batches are left unchanged).
        steps: PGD ascent steps per batch (>= 1).
        frac: fraction in [0, 1] of each batch replaced by PGD examples (round(frac * batch)
            samples; default 0.5).
        p: the norm of the ball, inf (default) or 2 (also 'inf'/'linf').
        step_size: per-step length (None: :func:`pgd`'s default 2.5 * eps / steps).
        clamp: (low, high) box of the adversarial inputs (default (0, 1)), or None (e.g. for
            normalised inputs); batches outside the box are refused, as by :func:`pgd`.
        seed: seed of the generator drawing the replaced subsets and the PGD random starts.
    Returns:
        the transform ``f(model, xb, yb) -> (xb, yb)`` (a new xb; yb unchanged). Its ``spec``
        attribute holds p, eps, steps and frac (not step_size, clamp or seed: a
        ``transform_spec`` for :func:`pyboundary.zoo.cache.train_cached` must add those itself
        when they differ from the defaults).
    """
    p = check_p(p)
    eps, steps, step_size, clamp = _check_pgd_args(eps, steps, step_size, clamp)
    frac = check_number("frac", frac, minimum=0, maximum=1)
    gen = torch.Generator().manual_seed(int(seed))

    def transform(model: Callable, xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
        n = xb.shape[0]
        n_adv = int(round(frac * n))
        if n_adv == 0 or eps == 0:
            return xb, yb
        pick = torch.randperm(n, generator=gen)[:n_adv].to(xb.device)
        start_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        adv = pgd(model, xb[pick], yb[pick], eps=eps, p=p, steps=steps,
                  step_size=step_size, clamp=clamp, seed=start_seed)
        xb = xb.clone()
        xb[pick] = adv
        return xb, yb

    transform.spec = {"p": p, "eps": eps, "steps": steps, "frac": frac}  # type: ignore[attr-defined]
    return transform

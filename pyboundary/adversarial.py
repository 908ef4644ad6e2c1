"""Adversarial examples for training and analysis: PGD (L-inf, L2), adversarial-training batch
transforms, the energy of perturbations per DCT band, and the fine-tuning experiment.

Units: inputs are images (N, C, H, W) (any (N, ...) for PGD); ``eps`` and step sizes are in input
units (pixel intensity for data in [0, 1]): the L-inf radius bounds every coordinate, the L2
radius the Euclidean norm of the whole perturbation of one sample.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .utils import (
    check_finite, explain_dtype_errors, forward_logits, is_inf, make_generator, model_guard,
)

__all__ = [
    "pgd",
    "pgd_batch_transform",
    "parse_attack",
    "BandEnergy",
    "band_energy",
    "plot_band_energy",
    "FinetuneResult",
    "directional_margins",
    "finetune_experiment",
]


# --------------------------------------------------------------------------------------- PGD
def _check_norm(norm) -> str:
    if isinstance(norm, str) and norm.lower() in ("l2", "2"):
        return "l2"
    if not isinstance(norm, str) and norm == 2:
        return "l2"
    try:
        if is_inf(norm):
            return "linf"
    except (TypeError, ValueError):
        pass
    raise ValueError(f"norm must be 'linf' or 'l2' (or 2 / inf), got {norm!r}")


def _check_pgd_args(eps, steps, step_size, clamp) -> tuple[float, int, float | None, tuple | None]:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if step_size is not None and not (isinstance(step_size, (int, float)) and step_size > 0):
        raise ValueError(f"step_size must be > 0 (or None for 2.5 * eps / steps), got {step_size!r}")
    if clamp is not None:
        if len(clamp) != 2 or not float(clamp[0]) < float(clamp[1]):
            raise ValueError(f"clamp must be a (low, high) pair with low < high, got {clamp!r}")
        clamp = (float(clamp[0]), float(clamp[1]))
    return float(eps), steps, (None if step_size is None else float(step_size)), clamp


def _flat_norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm, shaped (N, 1, ..., 1) to broadcast against t."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    scale = (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale


def _random_start(x: Tensor, eps: float, norm: str, gen) -> Tensor:
    if norm == "linf":
        u = torch.rand(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        return (2 * u - 1) * eps
    # uniform in the L2 ball: Gaussian direction, radius eps * U^(1/D)
    d = x[0].numel()
    g = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    r = torch.rand((x.shape[0],), generator=gen, dtype=x.dtype, device=x.device) ** (1.0 / d)
    return g / _flat_norm(g).clamp_min(1e-12) * (eps * r).view(-1, *([1] * (x.dim() - 1)))


def _ascent_step(grad: Tensor, alpha: float, norm: str) -> Tensor:
    if norm == "linf":
        return alpha * grad.sign()
    return alpha * grad / _flat_norm(grad).clamp_min(1e-12)


def pgd(
    model: Callable,
    x: Tensor,
    labels: Tensor,
    *,
    eps: float,
    norm="linf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    seed: int | None = None,
    targeted: bool = False,
) -> Tensor:
    """Projected gradient descent on the cross-entropy loss (Madry et al.), batched.

    Maximises CE(model(x + delta), labels) over ||delta||_p <= eps (or, with ``targeted``,
    minimises CE towards ``labels``), with ``steps`` ascent steps of size ``step_size``
    (sign of the gradient for L-inf, normalised gradient for L2), each followed by the projection
    onto the ball and onto the box ``clamp``. The model is run in eval mode with frozen parameters
    and restored exactly (:func:`pyboundary.utils.model_guard`); parameter ``.grad`` is untouched.

    Args:
        model: callable (N, ...) -> (N, L) logits.
        x: (N, ...) float inputs.
        labels: (N,) int64 true labels (or target labels when ``targeted``).
        eps: radius of the ball, >= 0, input units. eps = 0 returns a copy of x.
        norm: 'linf' or 'l2'.
        steps: number of ascent steps (>= 1).
        step_size: per-step length; default 2.5 * eps / steps.
        random_start: start from a uniform point of the ball (else from x).
        clamp: (low, high) box for the adversarial inputs, or None.
        seed: seed of the random start (None: torch's global generator).
        targeted: descend towards ``labels`` instead of ascending away from them.
    Returns:
        (N, ...) adversarial inputs, detached, same dtype and device as x, with
        ||x_adv - x||_p <= eps (up to rounding) and inside ``clamp`` when x is.
    """
    norm = _check_norm(norm)
    eps, steps, step_size, clamp = _check_pgd_args(eps, steps, step_size, clamp)
    check_finite("x", x)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != x.shape[:1]:
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an int64 tensor of shape ({x.shape[0]},), got {got}")
    x = x.detach()
    if eps == 0 or x.shape[0] == 0:
        return x.clone()
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    gen = make_generator(seed, x.device)
    labels = labels.to(x.device)
    delta = _random_start(x, eps, norm, gen) if random_start else torch.zeros_like(x)
    if clamp is not None:
        delta = (x + delta).clamp(*clamp) - x
    sign = -1.0 if targeted else 1.0
    with model_guard(model), explain_dtype_errors(model, x):
        for _ in range(steps):
            x_adv = (x + delta).requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(forward_logits(model, x_adv), labels, reduction="sum")
                (grad,) = torch.autograd.grad(sign * loss, x_adv)
            delta = _project(delta + _ascent_step(grad, alpha, norm), eps, norm)
            if clamp is not None:
                delta = (x + delta).clamp(*clamp) - x
    return (x + delta).detach()


def parse_attack(spec: str) -> dict:
    """Parse 'pgd-linf:eps=0.1,steps=7,frac=0.5' (or pgd-l2:...) into keyword arguments of
    :func:`pgd_batch_transform`: {'norm', 'eps', 'steps', 'frac', 'step_size'?}."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"attack spec must look like 'pgd-linf:eps=0.1,steps=7,frac=0.5', got {spec!r}")
    name, _, rest = spec.partition(":")
    names = {"pgd-linf": "linf", "pgd-l2": "l2"}
    if name.strip().lower() not in names:
        raise ValueError(f"attack must be one of {sorted(names)}, got {name!r} in {spec!r}")
    out: dict = {"norm": names[name.strip().lower()]}
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
    norm="linf",
    *,
    step_size: float | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
) -> Callable[[Callable, Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A ``batch_transform(model, xb, yb) -> (xb, yb)`` for :func:`pyboundary.models.train` that
    replaces a random fraction ``frac`` of each batch by PGD examples (labels unchanged).

    frac = 0.5 mixes clean and adversarial samples (the margin-dynamics study), frac = 1.0 is the
    adversarial training of Madry et al. The attack runs with the model in eval mode and frozen
    parameters; the model's train mode and ``requires_grad`` flags are restored before the
    training step. The replaced subset and the random starts come from a generator seeded once
    with ``seed`` (deterministic across runs).
    """
    norm = _check_norm(norm)
    eps, steps, step_size, clamp = _check_pgd_args(eps, steps, step_size, clamp)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
        raise ValueError(f"frac must be in [0, 1], got {frac!r}")
    gen = torch.Generator().manual_seed(int(seed))

    def transform(model: Callable, xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
        n = xb.shape[0]
        n_adv = int(round(frac * n))
        if n_adv == 0 or eps == 0:
            return xb, yb
        pick = torch.randperm(n, generator=gen)[:n_adv].to(xb.device)
        start_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        adv = pgd(model, xb[pick], yb[pick], eps=eps, norm=norm, steps=steps,
                  step_size=step_size, clamp=clamp, seed=start_seed)
        xb = xb.clone()
        xb[pick] = adv
        return xb, yb

    transform.spec = {"norm": norm, "eps": eps, "steps": steps, "frac": frac}  # type: ignore[attr-defined]
    return transform


# ---------------------------------------------------------------------------- band energy
@dataclass
class BandEnergy:
    """Fraction of each perturbation's squared L2 norm inside each member of a subspace family.

    fractions: (N, B) float64 numpy, ||P_b delta_n||^2 / ||delta_n||^2 (NaN for a zero delta).
    quantile: the percentile q reported per band; per_band: (B,) the q-th percentile over samples;
    mean: (B,) mean fraction; labels: member labels (e.g. DCT block origins); name: family name.
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
    perturbations: Tensor, family, *, quantile: float = 95.0, batch_size: int = 4096
) -> BandEnergy:
    """Energy of perturbations per member ("band") of a subspace family.

    For each perturbation delta_n (N, C, H, W) and member b of ``family`` (a
    :class:`pyboundary.subspaces.Subspace` with orthonormal members, e.g. ``DCTDiagonal``):
    fraction[n, b] = ||analysis(delta_n, b)||^2 / ||delta_n||^2 in [0, 1]. Members of a partition
    (``DCTGrid``) sum to 1 per sample; the diagonal family covers part of the spectrum only.
    Evaluated over (sample, member) pairs in chunks of ``batch_size`` pairs (no per-sample loop).
    """
    if not isinstance(perturbations, Tensor) or perturbations.dim() < 2:
        raise ValueError("perturbations must be a tensor (N, C, H, W), got "
                         f"{getattr(perturbations, 'shape', type(perturbations).__name__)}")
    check_finite("perturbations", perturbations)
    if not 0.0 <= float(quantile) <= 100.0:
        raise ValueError(f"quantile must be in [0, 100], got {quantile}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, n_b = perturbations.shape[0], int(family.n_members)
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
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# ------------------------------------------------------------------- fine-tuning experiment
@dataclass
class FinetuneResult:
    """Margins along each sample's original DeepFool direction, before and after fine-tuning.

    before_p, after_p: (|P|,) margins of the replaced samples P along their delta directions;
    before_u, after_u: (|U|,) the same for the untouched control subset U (inf = not found);
    model: the fine-tuned copy (the input model is left unchanged).
    """

    before_p: Tensor
    after_p: Tensor
    before_u: Tensor
    after_u: Tensor
    model: object

    def summary(self) -> dict:
        from .stats import summarize

        return {k: summarize(getattr(self, k).cpu().numpy())
                for k in ("before_p", "after_p", "before_u", "after_u")}


def directional_margins(model, x: Tensor, directions: Tensor, *, method: str = "deepfool",
                        max_radius=None, **deepfool_kw) -> Tensor:
    """Margin of each x_n inside the 1-D subspace spanned by its own direction d_n.

    method 'deepfool': L2 DeepFool in a :class:`pyboundary.subspaces.Directions` family with one
    1-D member per sample (the distance to the nearest boundary point the iteration finds along
    ±d_n); 'line': the first crossing along +d_n and -d_n by grid + bisection
    (:func:`pyboundary.topology.first_crossing`, range ``max_radius``, default 10 ||x_n||).

    Args:
        x: (N, C, H, W); directions: (N, C, H, W), non-zero (their scale is ignored).
    Returns:
        (N,) float margins in input units; inf where none was found.
    """
    if directions.shape != x.shape:
        raise ValueError(f"directions must have the shape of x {tuple(x.shape)}, got {tuple(directions.shape)}")
    norms = directions.flatten(1).norm(dim=1)
    if not bool((norms > 0).all()):
        raise ValueError("directions must be non-zero")
    unit = directions / _flat_norm(directions)
    if method == "deepfool":
        from .deepfool import deepfool
        from .subspaces import Directions

        sub = Directions(list(unit.detach().flatten(1).unsqueeze(1)), tuple(x.shape[1:]))
        idx = torch.arange(x.shape[0], device=x.device)
        res = deepfool(model, x, p=2, subspace=sub, subspace_index=idx, **deepfool_kw)
        return torch.where(res.converged, res.margin, torch.full_like(res.margin, math.inf))
    if method == "line":
        from .topology import first_crossing, predict

        radius = 10 * x.flatten(1).norm(dim=1).double() if max_radius is None else max_radius
        with model_guard(model):
            label = predict(model, x)
            both = first_crossing(model, torch.cat([x, x]), torch.cat([unit, -unit]), torch.cat([label, label]),
                                  torch.as_tensor(radius, dtype=torch.float64).expand(x.shape[0]).repeat(2))
        return both.view(2, -1).min(0).values.to(x.dtype)
    raise ValueError(f"method must be 'deepfool' or 'line', got {method!r}")


def finetune_experiment(
    model,
    x: Tensor,
    y: Tensor,
    p_index: Tensor,
    u_index: Tensor,
    *,
    epochs: int = 2,
    method: str = "deepfool",
    train_kwargs: dict | None = None,
    deepfool_kwargs: dict | None = None,
) -> FinetuneResult:
    """Replace the training samples P by x + delta(x), fine-tune a copy, compare margins along delta.

    delta(x) is the L2 DeepFool perturbation of each sample of P and U on the original model.
    The training set x (N, C, H, W), y (N,) has x[P] replaced by x[P] + delta (labels kept) and is
    used to fine-tune a deep copy of ``model`` for ``epochs`` epochs with
    :func:`pyboundary.models.train`. Margins inside the 1-D subspace spanned by each sample's own
    delta (:func:`directional_margins` with ``method``) are measured before and after, for P and
    for the untouched control set U. Inputs are clipped to [0, 1] after adding delta.
    """
    from .deepfool import deepfool
    from . import models

    p_index = torch.as_tensor(p_index, dtype=torch.int64)
    u_index = torch.as_tensor(u_index, dtype=torch.int64)
    if p_index.numel() == 0 or u_index.numel() == 0:
        raise ValueError(f"p_index and u_index must be non-empty, got sizes {p_index.numel()}, {u_index.numel()}")
    if bool(torch.isin(p_index, u_index).any()):
        raise ValueError("p_index and u_index must be disjoint")
    n = x.shape[0]
    for name, idx in (("p_index", p_index), ("u_index", u_index)):
        if int(idx.min()) < 0 or int(idx.max()) >= n:
            raise ValueError(f"{name} must lie in [0, {n}), got range [{int(idx.min())}, {int(idx.max())}]")
    dkw = dict(deepfool_kwargs or {})
    both = torch.cat([p_index, u_index])
    res = deepfool(model, x[both], p=2, **dkw)
    if not bool(res.converged.all()):
        keep = res.converged
        raise ValueError(f"DeepFool did not converge for {int((~keep).sum())} of the chosen samples; "
                         "choose samples with finite margins")
    delta = res.perturbation.detach()
    dirs = delta.flatten(1) / delta.flatten(1).norm(dim=1, keepdim=True)
    before = directional_margins(model, x[both], dirs.view_as(delta), method=method, **dkw)
    x_new = x.clone()
    x_new[p_index] = (x[p_index] + delta[: p_index.numel()]).clamp(0, 1)
    tuned = copy.deepcopy(model)
    tuned = models.train(tuned, x_new, y, epochs=epochs, **(train_kwargs or {}))
    tuned.eval()
    after = directional_margins(tuned, x[both], dirs.view_as(delta), method=method, **dkw)
    k = p_index.numel()
    return FinetuneResult(before[:k], after[:k], before[k:], after[k:], tuned)

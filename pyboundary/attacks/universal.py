"""Universal adversarial perturbations: one perturbation v that changes the prediction of most inputs.

The construction is the iterative one of Moosavi-Dezfooli et al. (2017, "Universal adversarial
perturbations", Algorithm 1): visit the inputs in a seeded random order; for every input x that
x + v does not fool yet, compute the minimal perturbation dv that sends x + v across the boundary
(DeepFool, :func:`pyboundary.deepfool`), set v <- Proj_eps(v + dv) (projection onto the L_p ball of
radius eps), and repeat passes over the data until the fooling rate (the fraction of inputs whose
prediction x + v differs from that of x) reaches the target.

Radius. With ``eps`` given, the ball is fixed (the published algorithm). With ``eps=None`` the
radius starts at the median DeepFool margin of (up to 64 of) the inputs and grows by ``growth``
after every pass that ends below the target, the perturbation being carried over (it lies inside
the larger ball); so the run stops near the smallest radius at which the construction reaches the
target (within a factor ``growth``). Finally (``refine=True``) v is scaled down to the smallest
multiple s v, s in (0, 1], that still reaches the target (bisection on s, forward passes only).
Like DeepFool margins, the norm found is an upper bound on the smallest universal perturbation.

Chunks. ``chunk_size`` inputs are attacked at the same v in one engine call; their perturbations
are then added in order, each only if its input is still not fooled by the updated v (one forward
row per input). ``chunk_size=1`` is the published sequential algorithm exactly; larger chunks
trade fidelity for batching.

:func:`evaluate_universal` measures a perturbation on other (held-out) inputs: its fooling rate,
that of random perturbations of the same norm (uniform directions for p = 2, random sign vectors
for p = inf), and the fraction of its energy inside a given subspace (e.g. the shared curved
directions of :func:`pyboundary.shared_curved_directions`) against the fraction m / D of a random
direction.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .._utils.model import CallCounter, model_device, predict
from .._utils.results import Result, reading_saved
from .._utils.validation import check_inputs, check_int, check_model, check_number, check_p
from .deepfool import deepfool

__all__ = [
    "universal_perturbation",
    "UniversalPerturbation",
    "evaluate_universal",
    "UniversalEvaluation",
    "fooling_rate",
    "project_lp",
]

#: Inputs of the radius probe (eps=None): the first ones of the seeded order.
_PROBE = 64
#: Bisection steps of the final scaling (relative resolution 2**-16 on the scale).
_REFINE_STEPS = 16
#: DeepFool options of the construction unless overridden: the published setting (unrefined
#: DeepFool with its usual overshoot; each step only needs to cross the boundary).
_DEFAULT_DEEPFOOL = {"refine": False, "overshoot": 0.02, "max_iter": 50}


# ------------------------------------------------------------------------------------ helpers
def _inputs(data, name: str = "data") -> Tensor:
    """x (N, ...) floating point from a tensor or a dataset with ``.x``."""
    x = data.x if hasattr(data, "x") and not isinstance(data, Tensor) else data
    return check_inputs(name, x, allow_empty=False)


def _lp_norm(v: Tensor, p: float) -> Tensor:
    """Per-row L_p norm of v (N, ...) -> (N,)."""
    flat = v.reshape(v.shape[0], -1)
    return flat.abs().amax(1) if math.isinf(p) else flat.norm(dim=1)


def project_lp(v: Tensor, eps: float, p) -> Tensor:
    """Projection of one perturbation v (any shape) onto the L_p ball of radius eps (p = 2 or inf).

    p = 2 scales v down to norm eps when it is longer; p = inf clips every coordinate to
    [-eps, eps] (the Euclidean projection onto the L-inf ball in both cases).
    """
    p = check_p(p)
    if math.isinf(p):
        return v.clamp(-eps, eps)
    norm = float(v.norm())
    return v * (eps / norm) if norm > eps else v


def fooling_rate(model: Callable, x, perturbation: Tensor, *, batch_size: int | None = None,
                 predictions: Tensor | None = None) -> float:
    """Fraction of the inputs whose predicted class changes when ``perturbation`` is added.

    Args:
        model: callable (N, ...) -> (N, L) logits (left as found).
        x: (N, ...) inputs, or a dataset with ``.x``.
        perturbation: one perturbation of the per-input shape (or (1, ...)), added to every input.
        batch_size: input rows per model call (None: automatic).
        predictions: the clean predictions (N,) if already known.
    """
    check_model(model)
    x = _inputs(x, "x")
    v = _as_single(perturbation, x).to(x.device, x.dtype)
    clean = predict(model, x, batch_size=batch_size) if predictions is None else predictions.to(x.device)
    return float((predict(model, x + v, batch_size=batch_size) != clean).double().mean())


def _as_single(v, x: Tensor) -> Tensor:
    if not isinstance(v, Tensor) or not v.is_floating_point():
        raise TypeError(f"perturbation must be a floating-point tensor, got {type(v).__name__}")
    if v.dim() == x.dim() and v.shape[0] == 1:
        v = v[0]
    if tuple(v.shape) != tuple(x.shape[1:]):
        raise ValueError(f"perturbation must have the per-input shape {tuple(x.shape[1:])}, got {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("perturbation contains non-finite values")
    return v


# ------------------------------------------------------------------------------------ result
@dataclass
class UniversalPerturbation(Result):
    """Result of :func:`universal_perturbation`.

    Attributes:
        perturbation: (*shape) the universal perturbation v (one input's shape, on the input's device).
        p: the norm (2.0 or inf).
        norm: ||v||_p, in input units.
        eps: radius of the ball the construction ended with (norm <= eps; smaller after refine).
        fooling_rate: fraction of the construction inputs whose prediction x + v changes.
        target: the requested fooling rate (the ``fooling_rate`` argument), in (0, 1].
        reached: bool, fooling_rate >= target at the end of the run (False when ``max_passes``
            passes did not get there; v is then not refined).
        n: number of construction inputs.
        passes: int, passes made over the construction inputs (1 to ``max_passes``).
        history: per pass, dict(pass, eps, fooling_rate, norm, updates).
        n_deepfool: per-input DeepFool runs (inputs attacked, the radius probe included).
        n_forward: int, batched forward passes: those of the DeepFool engine calls plus the
            batched prediction calls (clean labels, fooling checks, the final scaling).
        n_backward: int, batched reverse passes of the DeepFool engine calls.
        params: the settings of the run.
    """

    perturbation: Tensor
    p: float
    norm: float
    eps: float
    fooling_rate: float
    target: float
    reached: bool
    n: int
    passes: int
    history: list = field(default_factory=list)
    n_deepfool: int = 0
    n_forward: int = 0
    n_backward: int = 0
    params: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The scalar results as a dict (no tensors)."""
        keys = ("p", "norm", "eps", "fooling_rate", "target", "reached", "n", "passes", "n_deepfool",
                "n_forward", "n_backward")
        return {k: getattr(self, k) for k in keys}

    def format_summary(self) -> str:
        norm = "Linf" if math.isinf(self.p) else "L2"
        state = "reached" if self.reached else "NOT reached"
        return (f"universal perturbation ({norm}): norm {self.norm:.4g} (ball radius {self.eps:.4g}), fooling "
                f"rate {100 * self.fooling_rate:.1f}% on {self.n} inputs (target {100 * self.target:.0f}%, "
                f"{state}) after {self.passes} passes, {self.n_deepfool} DeepFool runs")

    def to_numpy(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "perturbation"}
        out["perturbation"] = self.perturbation.detach().cpu().numpy()
        return out

    def save(self, path) -> None:
        """Write the perturbation and the scalar results to ``path`` (a torch file of plain tensors
        and JSON text, loadable with ``weights_only=True``)."""
        meta = {k: v for k, v in asdict(self).items() if k != "perturbation"}
        meta["p"] = "inf" if math.isinf(self.p) else self.p
        torch.save({"perturbation": self.perturbation.detach().cpu(), "meta": json.dumps(meta)}, Path(path))

    @classmethod
    def load(cls, path) -> "UniversalPerturbation":
        with reading_saved(path, "UniversalPerturbation"):
            blob = torch.load(Path(path), map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or set(blob) != {"perturbation", "meta"}:
                raise ValueError(f"{str(path)!r} is not a saved UniversalPerturbation")
            meta = json.loads(blob["meta"])
            meta["p"] = math.inf if meta["p"] == "inf" else float(meta["p"])
            return cls(perturbation=blob["perturbation"], **meta)


# ------------------------------------------------------------------------------------ construction
def universal_perturbation(
    model: Callable,
    data,
    *,
    p=2,
    fooling_rate: float = 0.8,
    eps: float | None = None,
    growth: float = 1.25,
    max_passes: int = 20,
    chunk_size: int = 1,
    refine: bool = True,
    seed: int = 0,
    batch_size: int | None = None,
    deepfool_kwargs: dict | None = None,
    progress: bool = False,
) -> UniversalPerturbation:
    """One perturbation v that changes the model's prediction on a ``fooling_rate`` fraction of the data.

    Args:
        model: callable (N, ...) -> (N, L) logits; left as found.
        data: (N, ...) inputs (or a dataset with ``.x``) the perturbation is built on.
        p: 2 or inf, the norm of v (and of the DeepFool steps).
        fooling_rate: target fraction in (0, 1] of inputs whose prediction must change.
        eps: radius of the L_p ball v is projected on; None: searched (see the module docstring).
        growth: factor (> 1) by which the radius grows after a pass below the target (eps=None).
        max_passes: passes over the data before giving up (``reached=False``).
        chunk_size: inputs attacked at the same v per engine call (1 = the published algorithm).
        refine: scale v down to the smallest multiple that still reaches the target.
        seed: seed of the visiting order (a fresh permutation per pass).
        batch_size: input rows per model call for predictions and engine calls (None: automatic).
        deepfool_kwargs: options of :func:`pyboundary.deepfool` (default: unrefined, overshoot 0.02).
        progress: a tqdm bar over passes.
    Returns:
        :class:`UniversalPerturbation` (``reached`` says whether the target was met).
    """
    check_model(model)
    x = _inputs(data)
    p = check_p(p)
    target = check_number("fooling_rate", fooling_rate, minimum=0.0, maximum=1.0, strict_minimum=True)
    eps = check_number("eps", eps, minimum=0.0, strict_minimum=True, allow_none=True)
    growth = check_number("growth", growth, minimum=1.0, strict_minimum=True)
    max_passes = check_int("max_passes", max_passes, minimum=1)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1, allow_none=True)
    dkw = dict(_DEFAULT_DEEPFOOL)
    dkw.update(deepfool_kwargs or {})
    for own in ("p", "labels", "target", "subspace", "subspace_index"):
        if own in dkw:
            raise ValueError(f"deepfool_kwargs must not set {own!r} (universal_perturbation sets it)")
    if batch_size is not None:
        dkw.setdefault("batch_size", batch_size)

    n = x.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    run = _Run(model, x, p, dkw, batch_size)

    radius = eps
    if radius is None:
        probe = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 1))[:_PROBE]
        margins = run.margins(probe)
        if not margins.numel():
            raise ValueError("DeepFool found no perturbation for any probe input: the model cannot be fooled")
        radius = float(margins.median())
    v = torch.zeros(x.shape[1:], dtype=x.dtype, device=x.device)
    history, rate, passes = [], run.rate(v), 0
    bar = _bar(progress, max_passes)
    try:
        while rate < target and passes < max_passes:
            order = torch.randperm(n, generator=gen)
            v, updates = run.one_pass(v, order, radius, chunk_size)
            passes += 1
            rate = run.rate(v)
            history.append({"pass": passes, "eps": radius, "fooling_rate": rate,
                            "norm": float(_lp_norm(v.unsqueeze(0), p)[0]), "updates": updates})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rate=f"{rate:.3f}", eps=f"{radius:.3g}")
            if rate < target and eps is None and passes < max_passes:
                radius *= growth
    finally:
        if bar is not None:
            bar.close()
    reached = rate >= target
    if refine and reached:
        v, rate = run.shrink(v, target, rate)
    return UniversalPerturbation(
        perturbation=v, p=p, norm=float(_lp_norm(v.unsqueeze(0), p)[0]), eps=float(radius), fooling_rate=rate,
        target=target, reached=reached, n=n, passes=passes, history=history, n_deepfool=run.n_deepfool,
        n_forward=run.counter.calls + run.engine_forward, n_backward=run.engine_backward,
        params={"eps": eps, "growth": growth, "max_passes": max_passes, "chunk_size": chunk_size,
                "refine": refine, "seed": seed, "deepfool": {k: repr(val) for k, val in dkw.items()}},
    )


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="universal", unit="pass", leave=False)


class _Run:
    """The state shared by the passes of one construction: model, data, clean labels and cost."""

    def __init__(self, model, x: Tensor, p: float, dkw: dict, batch_size: int | None):
        self.model, self.x, self.p, self.dkw, self.batch_size = model, x, p, dkw, batch_size
        self.device = model_device(model, x.device)
        self.counter = CallCounter()
        self.engine_forward = self.engine_backward = self.n_deepfool = 0
        self.clean = self.predict(x)

    def predict(self, xs: Tensor) -> Tensor:
        return predict(self.model, xs, batch_size=self.batch_size, device=self.device, counter=self.counter)

    def rate(self, v: Tensor) -> float:
        return float((self.predict(self.x + v) != self.clean).double().mean())

    def attack(self, xs: Tensor):
        res = deepfool(self.model, xs.to(self.device), p=self.p, **self.dkw)
        self.n_deepfool += xs.shape[0]
        self.engine_forward += res.n_forward
        self.engine_backward += res.n_backward
        return res

    def margins(self, rows: Tensor) -> Tensor:
        """L_p DeepFool margins of the inputs ``rows`` (converged ones only)."""
        res = self.attack(self.x[rows.to(self.x.device)])
        ok = res.converged & torch.isfinite(res.margin)
        return res.margin[ok].double().cpu()

    def one_pass(self, v: Tensor, order: Tensor, radius: float, chunk: int) -> tuple[Tensor, int]:
        """One visit of all inputs in ``order``; returns (v, number of updates)."""
        updates = 0
        order = order.to(self.x.device)
        for s in range(0, order.shape[0], chunk):
            rows = order[s:s + chunk]
            still = self.predict(self.x[rows] + v) == self.clean[rows]
            rows = rows[still]
            if not rows.numel():
                continue
            res = self.attack(self.x[rows] + v)
            good = (res.converged & (res.adv_label != res.orig_label)).cpu()
            step = res.perturbation.to(v.device, v.dtype)
            for i in torch.nonzero(good).flatten().tolist():
                # an earlier update of this chunk may already fool this input
                if i > 0 and bool(self.predict(self.x[rows[i:i + 1]] + v)[0] != self.clean[rows[i]]):
                    continue
                v = project_lp(v + step[i], radius, self.p)
                updates += 1
        return v, updates

    def shrink(self, v: Tensor, target: float, rate: float) -> tuple[Tensor, float]:
        """The smallest s v (s in (0, 1], bisection) whose fooling rate still reaches ``target``."""
        lo, hi, best = 0.0, 1.0, rate
        for _ in range(_REFINE_STEPS):
            mid = 0.5 * (lo + hi)
            r = self.rate(mid * v)
            if r >= target:
                hi, best = mid, r
            else:
                lo = mid
        return hi * v, best


# ------------------------------------------------------------------------------------ evaluation
@dataclass
class UniversalEvaluation(Result):
    """Result of :func:`evaluate_universal` on a set of (held-out) inputs.

    Attributes:
        n: int, inputs evaluated.
        p: the norm of the comparison (2.0 or inf).
        norm: float, ||v||_p of the evaluated perturbation, in input units (> 0).
        fooling_rate: fraction of the inputs whose prediction x + v changes, in [0, 1].
        random_fooling_rate: mean fooling rate of ``n_random`` random perturbations of the same
            norm (uniform directions for p = 2, random sign vectors for p = inf), in [0, 1].
        random_se: float, standard error of random_fooling_rate over the ``n_random`` draws
            (sample standard deviation / sqrt(n_random); NaN when n_random = 1).
        gap: float, fooling_rate / random_fooling_rate (inf when the latter is 0).
        subspace_energy: ||P_S v||_2^2 / ||v||_2^2 for S = span(basis), in [0, 1] (NaN without a
            basis).
        complement_energy: 1 - subspace_energy, the fraction of ||v||_2^2 outside S (NaN without
            a basis).
        random_energy: m / D, the expected subspace_energy of a uniformly random direction (NaN
            without a basis).
        subspace_dim: int, m, the dimension of S (0 without a basis).
    """

    n: int
    p: float
    norm: float
    fooling_rate: float
    random_fooling_rate: float
    random_se: float
    gap: float
    subspace_energy: float = float("nan")
    complement_energy: float = float("nan")
    random_energy: float = float("nan")
    subspace_dim: int = 0

    def summary(self) -> dict:
        return asdict(self)

    def format_summary(self) -> str:
        lines = [f"fooling rate {100 * self.fooling_rate:.1f}% on {self.n} inputs vs "
                 f"{100 * self.random_fooling_rate:.2f}% (SE {100 * self.random_se:.2f}) for random "
                 f"perturbations of the same norm {self.norm:.4g}: {self.gap:.3g}x"]
        if self.subspace_dim:
            lines.append(f"energy in the {self.subspace_dim}-dim subspace {100 * self.subspace_energy:.1f}% "
                         f"(complement {100 * self.complement_energy:.1f}%; a random direction: "
                         f"{100 * self.random_energy:.2f}%)")
        return "\n".join(lines)


def evaluate_universal(
    model: Callable,
    perturbation,
    x,
    *,
    p=None,
    n_random: int = 10,
    basis: Tensor | None = None,
    seed: int = 0,
    batch_size: int | None = None,
) -> UniversalEvaluation:
    """Fooling rate of a universal perturbation on inputs x, against random ones of the same norm.

    Args:
        model: the classifier (left as found).
        perturbation: a :class:`UniversalPerturbation` or a tensor of the per-input shape.
        x: (N, ...) inputs (typically held out from the construction), or a dataset with ``.x``.
        p: norm of the comparison (default: the result's p; required for a plain tensor).
        n_random: random perturbations drawn (>= 1).
        basis: optional (D, m) orthonormal columns or (m, *shape) orthonormal rows (e.g.
            ``SharedDirections.basis()``): report the fraction of ||v||_2^2 inside their span.
        seed: seed of the random perturbations.
        batch_size: input rows per model call (None: automatic).
    Returns:
        :class:`UniversalEvaluation`.
    """
    check_model(model)
    x = _inputs(x, "x")
    if isinstance(perturbation, UniversalPerturbation):
        p = perturbation.p if p is None else p
        perturbation = perturbation.perturbation
    if p is None:
        raise ValueError("p is required when perturbation is a tensor")
    p = check_p(p)
    v = _as_single(perturbation, x).to(x.device, x.dtype)
    n_random = check_int("n_random", n_random, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1, allow_none=True)
    norm = float(_lp_norm(v.unsqueeze(0), p)[0])
    if norm == 0:
        raise ValueError("perturbation is zero: nothing to evaluate")
    clean = predict(model, x, batch_size=batch_size)
    rate = fooling_rate(model, x, v, batch_size=batch_size, predictions=clean)
    gen = torch.Generator().manual_seed(int(seed))
    rates = []
    for _ in range(n_random):
        r = _random_like(v, p, norm, gen)
        rates.append(fooling_rate(model, x, r, batch_size=batch_size, predictions=clean))
    rnd = float(np.mean(rates))
    se = float(np.std(rates, ddof=1) / math.sqrt(n_random)) if n_random > 1 else float("nan")
    out = UniversalEvaluation(n=x.shape[0], p=p, norm=norm, fooling_rate=rate, random_fooling_rate=rnd,
                              random_se=se, gap=rate / rnd if rnd > 0 else math.inf)
    if basis is not None:
        energy, m = _subspace_energy(v, basis)
        out.subspace_energy, out.complement_energy = energy, 1.0 - energy
        out.random_energy, out.subspace_dim = m / v.numel(), m
    return out


def _random_like(v: Tensor, p: float, norm: float, gen: torch.Generator) -> Tensor:
    """A random perturbation of v's shape with L_p norm ``norm`` (sphere for p = 2, vertex for inf)."""
    if math.isinf(p):
        signs = torch.randint(0, 2, v.shape, generator=gen, dtype=torch.int64) * 2 - 1
        return (norm * signs).to(v.device, v.dtype)
    g = torch.randn(v.shape, generator=gen, dtype=torch.float64)
    return (norm * g / g.norm()).to(v.device, v.dtype)


def _subspace_energy(v: Tensor, basis: Tensor) -> tuple[float, int]:
    """(||P v||^2 / ||v||^2, m) for P the projection on the span of orthonormal ``basis``."""
    if not isinstance(basis, Tensor) or not basis.is_floating_point():
        raise TypeError(f"basis must be a floating-point tensor, got {type(basis).__name__}")
    d = v.numel()
    b = basis.detach().to(torch.float64).cpu()
    if b.dim() == 2 and b.shape[0] == d:
        pass
    elif b.dim() >= 2 and b[0].numel() == d:
        b = b.reshape(b.shape[0], d).T
    else:
        raise ValueError(f"basis must have shape (D, m) = ({d}, m) or (m, *shape), got {tuple(basis.shape)}")
    err = float((b.T @ b - torch.eye(b.shape[1], dtype=torch.float64)).abs().max())
    if err > 1e-4:
        raise ValueError(f"basis must have orthonormal columns: max |B^T B - I| = {err:.3g}")
    flat = v.detach().to(torch.float64).cpu().reshape(-1)
    return float((flat @ b).square().sum() / flat.square().sum()), int(b.shape[1])

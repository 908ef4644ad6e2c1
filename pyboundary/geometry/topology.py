"""Shape of classification regions: path connectivity (Fawzi et al.), convex combinations,
and the distance to the boundary along random directions.

Region of x: R(x) = {z : k̂(z) = k̂(x)}. Distances are Euclidean, in input units.
All functions leave the model unchanged (:func:`pyboundary._utils.model.model_guard`) and evaluate
points in batches of at most ``batch_size`` inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .._utils.batching import chunks
from .._utils.model import CallCounter, forward_batch_size, model_guard, predict
from .._utils.results import Result
from .._utils.rng import make_generator, random_unit_vectors
from .._utils.stats import summarize
from .._utils.validation import check_finite, check_int, check_number
from ..attacks.deepfool import deepfool

__all__ = [
    "predict",
    "first_crossing",
    "PathResult",
    "DEFAULT_PUSH_DEPTH",
    "find_path",
    "path_connectivity",
    "ConvexResult",
    "convex_combination_probability",
    "RandomDirectionResult",
    "random_direction_robustness",
]


def _bar(items, progress: bool, desc: str, unit: str, total: int | None = None):
    """A tqdm bar over ``items`` (or a manual one of ``total`` steps when items is None); hidden
    unless ``progress``."""
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, disable=not progress, leave=False)


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def first_crossing(
    model: Callable,
    x: Tensor,
    v: Tensor,
    label: Tensor,
    max_radius,
    *,
    n_grid: int = 32,
    n_bisect: int = 24,
    batch_size: int | None = None,
    counter: CallCounter | None = None,
) -> Tensor:
    """Distance from x along v to the first point predicted other than ``label`` (batched).

    A grid t_j = j * max_radius / n_grid, j = 1..n_grid, locates the first grid point outside
    the region; bisection between it and the previous grid point then refines the crossing to
    max_radius / n_grid / 2^n_bisect. A region thinner than one grid step along v can be jumped
    over (the grid is the resolution of the search). Rows are processed in chunks so that at
    most ``batch_size`` inputs are held at once (at least one row of n_grid points).

    Args:
        x: (M, ...) starting points; v: (M, ...) directions (their length is the unit of t; pass
            unit vectors for Euclidean distances); label: (M,) the region's class.
        max_radius: float or (M,) tensor, the search range.
    Returns:
        (M,) float64 distances t * ||v|| in input units; inf where no crossing within max_radius.
    """
    batch_size = forward_batch_size(model, x, batch_size)
    n_grid = check_int("n_grid", n_grid, minimum=1)
    n_bisect = check_int("n_bisect", n_bisect, minimum=0)
    m = x.shape[0]
    r = torch.as_tensor(max_radius, dtype=torch.float64, device=x.device).expand(m).clone()
    rows = max(1, batch_size // n_grid)  # rays per grid chunk: their n_grid points are ~batch_size rows
    parts = [_grid_bracket(model, x[s:s + rows], v[s:s + rows], label[s:s + rows], r[s:s + rows], n_grid,
                           batch_size, counter) for s in range(0, m, rows)]
    empty = torch.zeros(0, dtype=torch.float64, device=x.device)
    lo, out = (torch.cat([q[i] for q in parts]) if parts else empty for i in range(2))
    act = torch.isfinite(out).nonzero().squeeze(1)
    for sl in chunks(act.numel(), batch_size):  # bisection on ~batch_size rays per model call
        a = act[sl]
        out[a] = _bisect(model, x[a], v[a], label[a], lo[a], out[a], n_bisect, batch_size, counter)
    vnorm = v.flatten(1).double().norm(dim=1)
    # a zero direction never leaves the region: inf (not inf * 0 = nan)
    return torch.where(vnorm > 0, out * vnorm, torch.full_like(out, math.inf))


def _grid_bracket(model, x, v, label, r, n_grid, batch_size, counter) -> tuple[Tensor, Tensor]:
    """For rays x + t v (m rows), t in (0, r]: the bracket (lo, hi) (m,) each of the first grid
    point t = hi outside the region and the grid point before it; hi = inf where none is."""
    m = x.shape[0]
    grid = torch.arange(1, n_grid + 1, dtype=torch.float64, device=x.device) / n_grid  # (G,)
    ts = r.unsqueeze(1) * grid.unsqueeze(0)  # (m, G)
    pts = x.unsqueeze(1) + ts.to(x.dtype).view(m, n_grid, *([1] * (x.dim() - 1))) * v.unsqueeze(1)
    pred = predict(model, pts.reshape(m * n_grid, *x.shape[1:]), batch_size=batch_size,
                   counter=counter).view(m, n_grid)
    outside = pred != label.unsqueeze(1)
    found = outside.any(1)
    first = torch.where(found, outside.float().argmax(1), torch.zeros_like(label))
    hi = torch.where(found, ts.gather(1, first.unsqueeze(1)).squeeze(1), torch.full_like(r, math.inf))
    lo = torch.where(first > 0, hi - r / n_grid, torch.zeros_like(r))
    return lo, hi


def _bisect(model, x, v, label, lo, hi, n_bisect, batch_size, counter) -> Tensor:
    """hi (m,) after n_bisect bisections of [lo, hi] along the rays x + t v (hi outside the region
    of label, lo inside)."""
    for _ in range(n_bisect):
        mid = (lo + hi) / 2
        out = predict(model, x + _bcast(mid.to(x.dtype), x) * v, batch_size=batch_size, counter=counter) != label
        hi = torch.where(out, mid, hi)
        lo = torch.where(out, lo, mid)
    return hi


# --------------------------------------------------------------------------- path search
@dataclass
class PathResult(Result):
    """Outcome of :func:`find_path`.

    Attributes:
        anchors: (P, ...) points x1 = anchors[0], ..., anchors[-1] = x2 of the piecewise-linear
            path, P >= 2, dtype of x1, on x1's device.
        valid: bool, whether every segment was verified inside the region (by sampling
            ``n_check`` interior points each).
        label: int, the region's class (the prediction at x1 and x2).
        length: float, the path length sum_i ||anchors[i+1] - anchors[i]||_2 (input units).
        straight: float, ||x2 - x1||_2 (input units).
        depth: int, subdivision levels made (0 when the straight segment passed; at most
            ``max_depth``).
        n_calls: int, batched model calls (forward passes, and inside the targeted DeepFool
            pushes, its forward and backward passes).
        n_inputs: int, inputs evaluated by forward passes outside DeepFool.
        reason: str, why the search failed ('' when valid).

    ``ratio`` (a property) is length / straight (1.0 when straight = 0).
    """

    anchors: Tensor
    valid: bool
    label: int
    length: float
    straight: float
    depth: int
    n_calls: int
    n_inputs: int
    reason: str = ""

    @property
    def ratio(self) -> float:
        return self.length / self.straight if self.straight > 0 else 1.0

    def summary(self) -> dict:
        return {"valid": self.valid, "label": self.label, "n_anchors": int(self.anchors.shape[0]),
                "length": self.length, "straight": self.straight, "ratio": self.ratio,
                "depth": self.depth, "n_calls": self.n_calls, "reason": self.reason}


def _check_sample_pair(x1, x2) -> None:
    for name, t in (("x1", x1), ("x2", x2)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (one input, no batch dimension), "
                            f"got {type(t).__name__ if not isinstance(t, Tensor) else t.dtype}")
        check_finite(name, t)
    if x1.shape != x2.shape:
        raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")


#: Default depth inside the region at which :func:`find_path` places a repaired midpoint, as a
#: fraction of the length of the segment being repaired (``push_depth``).
DEFAULT_PUSH_DEPTH = 0.1
#: Precision of the boundary crossing along the push direction, relative to the target depth.
_CROSSING_TOL = 0.01


def _push_into(model, mids: Tensor, depth: Tensor, label: int, deepfool_kwargs: dict, batch_size: int,
               counter: CallCounter) -> tuple[Tensor, Tensor]:
    """Move points (B, ...) outside the region of ``label`` to the depth ``depth`` (B,) inside it.

    1. Targeted DeepFool (``pyboundary.deepfool(..., target=label)``, L2, unrefined, overshoot
       0.02; ``deepfool_kwargs`` override) gives a direction d = delta / ||delta|| into the region.
    2. Bisection on the predicted labels along d locates the boundary crossing t_b (to 1 % of the
       depth).
    3. The point goes on along d to t_b + depth, or to the middle of the chord when the ray leaves
       the region again before that (:func:`first_crossing`).
    Steps 2-3 use predicted labels only, so where the point lands depends on the region, not on
    the scale of the logits (DeepFool supplies a direction; its own landing point does not count).
    Returns (points (B, ...), ok (B,) bool: DeepFool converged and the point is in the region).
    """
    kw = {"p": 2, "overshoot": 0.02, "max_iter": 50, "refine": False}
    kw.update(deepfool_kwargs)
    n = mids.shape[0]
    target = torch.full((n,), int(label), dtype=torch.int64, device=mids.device)
    with torch.enable_grad():
        res = deepfool(model, mids, target=target, **kw)
    for name in ("n_forward", "n_backward"):
        val = getattr(res, name, 0)
        counter.calls += int(val.max()) if isinstance(val, Tensor) and val.numel() else int(val or 0)
    delta = res.perturbation.to(mids.dtype).detach()
    reach = delta.flatten(1).norm(dim=1)
    ok = res.converged.to(torch.bool) & (reach > 0)
    ok &= predict(model, mids + delta, batch_size=batch_size, counter=counter) == label
    d = delta / _bcast(reach.clamp_min(torch.finfo(mids.dtype).tiny), delta)
    depth = depth.to(reach.dtype)
    # bisection: lo outside, hi inside, until hi - lo <= tol * depth
    lo, hi = torch.zeros_like(reach), reach.clone()
    need = torch.log2((reach / (_CROSSING_TOL * depth)).clamp_min(1.0)).ceil()
    for _ in range(min(int(need[ok].max()) if bool(ok.any()) else 0, 64)):
        mid = (lo + hi) / 2
        inside = predict(model, mids + _bcast(mid, mids) * d, batch_size=batch_size, counter=counter) == label
        hi, lo = torch.where(inside, mid, hi), torch.where(inside, lo, mid)
    start = mids + _bcast(hi, mids) * d
    step = torch.zeros_like(reach)
    if bool(ok.any()):
        exit_dist = first_crossing(model, start[ok], d[ok], target[ok], depth[ok], n_grid=8, n_bisect=10,
                                   batch_size=batch_size, counter=counter)
        step[ok] = torch.minimum(depth[ok], exit_dist.to(step.dtype) / 2)
    out = (start + _bcast(step, start) * d).detach()
    ok &= predict(model, out, batch_size=batch_size, counter=counter) == label
    return out, ok


def _segments_ok(model, a: Tensor, b: Tensor, label: int, n_check: int, batch_size: int, counter) -> Tensor:
    """(S,) bool: all n_check interior sample points of each segment a_i -> b_i are in the region."""
    t = torch.arange(1, n_check + 1, dtype=a.dtype, device=a.device) / (n_check + 1)
    shape = (1, n_check) + (1,) * (a.dim() - 1)
    ok = []
    for sl in chunks(a.shape[0], max(1, batch_size // n_check)):  # ~batch_size points at a time
        pts = a[sl].unsqueeze(1) + t.view(shape) * (b[sl] - a[sl]).unsqueeze(1)  # (s, n_check, ...)
        pred = predict(model, pts.reshape(-1, *a.shape[1:]), batch_size=batch_size, counter=counter)
        ok.append((pred.view(-1, n_check) == label).all(1))
    return torch.cat(ok)


def find_path(
    model: Callable,
    x1: Tensor,
    x2: Tensor,
    *,
    max_depth: int = 8,
    n_check: int = 16,
    batch_size: int | None = None,
    deepfool_kwargs: dict | None = None,
    push_depth: float = DEFAULT_PUSH_DEPTH,
) -> PathResult:
    """Search a piecewise-linear path from x1 to x2 inside the classification region of x1.

    The recursive-midpoint search of Fawzi et al. (2018), run breadth first so that each level is
    batched: every segment not yet verified is checked by evaluating ``n_check`` equally spaced
    interior points; each failing segment is split at its midpoint, and a midpoint outside the
    region is moved back into it along the direction of targeted DeepFool
    (``pyboundary.deepfool(..., target=label)``), to a depth inside the region of ``push_depth``
    times the length of its segment (less where the region is thinner along that direction; see
    :func:`_push_into`). The depth scales with the segment, so chords between repaired points do
    not graze a curved boundary at every level, and only predicted labels fix where a point
    lands: the outcome depends on the region, not on how its logits are scaled. Verified
    segments are kept. The search stops
    with ``valid=True`` when all segments pass, and with ``valid=False`` at ``max_depth`` or when
    a midpoint cannot be pushed back. Validity is verified by sampling: a region thinner than
    the sample spacing can be crossed unseen.

    Args:
        model: callable (N, ...) -> (N, L) logits.
        x1, x2: one input each (no batch dimension), same shape; both must be predicted the same
            class (push x2 into the region first, e.g. with targeted DeepFool).
        max_depth: number of subdivision levels (>= 0); at most 2^max_depth segments.
        n_check: interior points sampled per segment (>= 1).
        batch_size: input rows per model call for the checks and the pushes' line searches
            (None: automatic, the largest that fits the memory budget, at most 256); segments
            are checked ~batch_size / n_check at a time. The targeted DeepFool sizes its own
            batches (set ``deepfool_kwargs['batch_size']`` to fix them).
        deepfool_kwargs: extra arguments of the targeted DeepFool (default p=2, overshoot=0.02,
            unrefined): it only supplies the direction of the push.
        push_depth: depth of a repaired midpoint inside the region as a fraction of its segment's
            length, in (0, 1] (default :data:`DEFAULT_PUSH_DEPTH`).
    Returns:
        :class:`PathResult`.
    """
    _check_sample_pair(x1, x2)
    batch_size = check_int("batch_size", batch_size, minimum=1, allow_none=True)
    max_depth = check_int("max_depth", max_depth, minimum=0)
    n_check = check_int("n_check", n_check, minimum=1)
    push_depth = check_number("push_depth", push_depth, minimum=0, maximum=1, strict_minimum=True)
    counter = CallCounter()
    dkw = dict(deepfool_kwargs or {})
    with model_guard(model):
        ends = torch.stack([x1.detach(), x2.detach().to(x1.dtype)])
        try:
            lab = predict(model, ends, counter=counter)
        except RuntimeError as err:
            raise ValueError(
                f"the model cannot classify x1/x2 of shape {tuple(x1.shape)} stacked into a batch "
                f"{tuple(ends.shape)}: x1 and x2 must be single inputs without a batch dimension "
                f"(for a batch of one, pass x[0]). Model error: {err}"
            ) from err
        label = int(lab[0])
        batch_size = forward_batch_size(model, ends, batch_size)
        if int(lab[1]) != label:
            raise ValueError(
                f"x1 and x2 must be in the same region: x1 is predicted class {label}, x2 class "
                f"{int(lab[1])}; push x2 into class {label} first (deepfool(..., target=...))"
            )
        points = [ends[0], ends[1]]  # anchors in path order
        ok = [False]  # ok[i]: segment points[i] -> points[i+1] verified
        depth, reason = 0, ""
        while True:
            todo = [i for i, flag in enumerate(ok) if not flag]
            a = torch.stack([points[i] for i in todo])
            b = torch.stack([points[i + 1] for i in todo])
            passed = _segments_ok(model, a, b, label, n_check, batch_size, counter)
            for j, i in enumerate(todo):
                ok[i] = bool(passed[j])
            bad = [i for i in todo if not ok[i]]
            if not bad:
                break
            if depth >= max_depth:
                reason = f"depth limit {max_depth} reached with {len(bad)} segment(s) leaving the region"
                break
            mids = torch.stack([(points[i] + points[i + 1]) / 2 for i in bad])
            seg = torch.stack([(points[i + 1] - points[i]).double().norm() for i in bad])
            outside = (predict(model, mids, batch_size=batch_size, counter=counter) != label).nonzero().squeeze(1)
            if outside.numel():
                moved, back = _push_into(model, mids[outside], push_depth * seg[outside], label, dkw,
                                         batch_size, counter)
                if not bool(back.all()):
                    reason = (f"targeted DeepFool could not move {int((~back).sum())} "
                              f"midpoint(s) back into class {label} at depth {depth + 1}")
                    break
                mids[outside] = moved
            depth += 1
            for j, i in sorted(enumerate(bad), key=lambda t: -t[1]):  # insert from the back
                points.insert(i + 1, mids[j])
                ok[i:i + 1] = [False, False]
    anchors = torch.stack(points)
    length = float(anchors.diff(dim=0).flatten(1).double().norm(dim=1).sum())
    straight = float((x2 - x1).double().norm())
    valid = all(ok) and not reason
    return PathResult(anchors, valid, label, length, straight, depth, counter.calls, counter.inputs,
                      "" if valid else reason)


@dataclass
class PathConnectivity(Result):
    """Outcome of :func:`path_connectivity`.

    Attributes:
        scenario: 'same-label', 'adversarial' or 'random-sphere'.
        results: one :class:`PathResult` per pair that could be formed.
        n_skipped: pairs that could not be formed (no partner of the needed class, or the
            targeted push failed).
    """

    scenario: str
    results: list
    n_skipped: int = 0

    @property
    def n_pairs(self) -> int:
        return len(self.results)

    @property
    def n_valid(self) -> int:
        return sum(1 for r in self.results if r.valid)

    @property
    def rate(self) -> float:
        """Fraction of the formed pairs joined by a valid path (NaN when none was formed)."""
        return self.n_valid / self.n_pairs if self.results else float("nan")

    @property
    def ratios(self) -> list:
        """Path length / straight distance of the valid paths."""
        return [r.ratio for r in self.results if r.valid]

    def summary(self) -> dict:
        ratios = np.asarray(self.ratios, dtype=np.float64)
        return {"scenario": self.scenario, "n_pairs": self.n_pairs, "n_skipped": self.n_skipped,
                "n_valid": self.n_valid, "rate": self.rate,
                "median_ratio": float(np.median(ratios)) if ratios.size else float("nan")}

    def to_numpy(self) -> dict:
        return {"scenario": self.scenario, "n_skipped": self.n_skipped,
                "valid": np.array([r.valid for r in self.results], dtype=bool),
                "ratio": np.array([r.ratio for r in self.results], dtype=np.float64)}


def path_connectivity(
    model: Callable,
    x: Tensor,
    *,
    scenario: str = "same-label",
    n_pairs: int = 20,
    seed: int = 0,
    radius: float | None = None,
    progress: bool = False,
    **path_kwargs,
) -> PathConnectivity:
    """Rate of valid paths for the three scenarios of Fawzi et al. (2018).

    scenario 'same-label': random pairs of inputs with the same predicted label;
    'adversarial': x1 and an input x2 of another predicted class moved into x1's class by
    targeted DeepFool; 'random-sphere': x1 and a Gaussian-random point on the sphere of radius
    ``radius`` (default: the median input norm) moved into x1's class by targeted DeepFool.

    Args:
        model: callable (N, ...) -> (N, L) logits (left unchanged).
        x: (N, ...) inputs to draw from.
        scenario: 'same-label' (default), 'adversarial' or 'random-sphere' (see above).
        n_pairs: pairs (x1, x2) to draw (>= 1, default 20); x1 is drawn uniformly from x with
            replacement. Pairs that cannot be formed are counted in ``n_skipped``.
        seed: seed of the pair draws and of the random-sphere points (default 0; CPU generator).
        radius: L2 radius of the random-sphere points, in input units (scenario
            'random-sphere' only; None: the median L2 norm of the inputs).
        progress: a tqdm bar over the path searches (one per pair; each can take minutes on
            ImageNet-sized inputs).
        **path_kwargs: keyword arguments of :func:`find_path` (``max_depth``, ``n_check``,
            ``batch_size``, ``deepfool_kwargs``, ``push_depth``); ``deepfool_kwargs`` also sets
            the targeted DeepFool that moves x2 into x1's class.
    Returns:
        :class:`PathConnectivity` (pairs that could not be formed are skipped and counted).
    """
    scenarios = ("same-label", "adversarial", "random-sphere")
    if scenario not in scenarios:
        raise ValueError(f"scenario must be one of {scenarios}, got {scenario!r}")
    n_pairs = check_int("n_pairs", n_pairs, minimum=1)
    gen = torch.Generator().manual_seed(int(seed))
    counter = CallCounter()
    dkw = dict(path_kwargs.get("deepfool_kwargs") or {})
    with model_guard(model):
        pred = predict(model, x, counter=counter).cpu()
        n = x.shape[0]
        first = torch.randint(0, n, (n_pairs,), generator=gen)
        seconds = []
        for i in first.tolist():  # pair construction only (cheap index draws)
            if scenario == "same-label":
                cand = ((pred == pred[i]) & (torch.arange(n) != i)).nonzero().squeeze(1)
            else:
                cand = (pred != pred[i]).nonzero().squeeze(1)
            seconds.append(int(cand[torch.randint(0, cand.numel(), (1,), generator=gen)]) if cand.numel() else -1)
        keep = [j for j, s in enumerate(seconds) if s >= 0 or scenario == "random-sphere"]
        i1 = first[keep].to(x.device)
        x1 = x[i1]
        if scenario == "same-label":
            x2 = x[torch.tensor([seconds[j] for j in keep], dtype=torch.int64, device=x.device)]
            pushed = torch.ones(len(keep), dtype=torch.bool)
        else:
            if scenario == "adversarial":
                start = x[torch.tensor([seconds[j] for j in keep], dtype=torch.int64, device=x.device)]
            else:
                r = float(radius) if radius is not None else float(x.flatten(1).norm(dim=1).median())
                g = torch.randn(x1.shape, generator=gen).to(x.device, x.dtype)
                start = g / _bcast(g.flatten(1).norm(dim=1), g) * r
            with torch.enable_grad():
                x2, conv = _push_targets(model, start, pred[first[keep]].to(x.device), dkw, counter)
            pushed = (conv & (predict(model, x2, counter=counter) == pred[first[keep]].to(x.device))).cpu()
    results = []
    todo = [j for j in range(len(keep)) if bool(pushed[j])]
    for j in _bar(todo, progress, f"paths ({scenario})", "pair"):
        results.append(find_path(model, x1[j], x2[j], **path_kwargs))
    return PathConnectivity(scenario=scenario, results=results, n_skipped=n_pairs - len(results))


def _both_ways(model, x, label, r, n_directions, gen, n_grid, n_bisect, batch_size) -> Tensor:
    """(n, 2, T) distances to the boundary from x (n, ...) along T random unit directions v each
    (drawn per sample from gen, so chunks of samples draw the numbers of one draw) and along -v."""
    n, d = x.shape[0], x[0].numel()
    v = random_unit_vectors(n, n_directions, d, generator=gen, dtype=torch.float64, device="cpu")
    v = v.to(x.device, x.dtype).view(n, n_directions, *x.shape[1:])
    starts = x.detach().unsqueeze(1).expand(n, 2 * n_directions, *x.shape[1:]).reshape(-1, *x.shape[1:])
    both_v = torch.cat([v, -v], 1).reshape(-1, *x.shape[1:])
    return first_crossing(model, starts, both_v, label.repeat_interleave(2 * n_directions),
                          r.repeat_interleave(2 * n_directions), n_grid=n_grid, n_bisect=n_bisect,
                          batch_size=batch_size).view(n, 2, n_directions)


def _push_targets(model, pts: Tensor, targets: Tensor, dkw: dict, counter: CallCounter):
    """Targeted DeepFool with per-sample targets; points already in their target stay put."""
    kw = {"p": 2, "overshoot": 0.02, "max_iter": 50, "refine": False}
    kw.update(dkw)
    out = pts.clone()
    conv = torch.ones(pts.shape[0], dtype=torch.bool, device=pts.device)
    move = (predict(model, pts, counter=counter) != targets).nonzero().squeeze(1)
    if move.numel():
        res = deepfool(model, pts[move], target=targets[move], **kw)
        out[move] = (pts[move] + res.perturbation.to(pts.dtype)).detach()
        conv[move] = res.converged.to(torch.bool)
    return out, conv


# ------------------------------------------------------------------- convex combinations
@dataclass
class ConvexResult(Result):
    """Outcome of :func:`convex_combination_probability`.

    Attributes:
        ks: list of ints, the numbers k of inputs combined, in the order given.
        probability: (len(ks),) float64 numpy array; probability[i] is the fraction of the
            ``n_trials`` random convex combinations of ks[i] inputs predicted ``label``.
        se: (len(ks),) float64 numpy array, se[i] = sqrt(p (1 - p) / n_trials) with
            p = probability[i] (binomial standard error).
        n_trials: int, combinations drawn per k.
        label: int, the region's class (the prediction shared by all inputs).
    """

    ks: list
    probability: np.ndarray
    se: np.ndarray
    n_trials: int
    label: int

    def summary(self) -> dict:
        return {"label": self.label, "n_trials": self.n_trials,
                "probability": dict(zip(self.ks, self.probability.tolist()))}


def convex_combination_probability(
    model: Callable,
    xs: Tensor,
    k=2,
    n_trials: int = 1000,
    seed: int = 0,
    *,
    batch_size: int | None = None,
) -> ConvexResult:
    """Probability that a random convex combination of k inputs of one region stays in it.

    Each trial draws k distinct inputs of ``xs`` uniformly and weights uniform on the simplex
    (Dirichlet(1, ..., 1)), and checks the predicted class of sum_i w_i x_i.

    Args:
        model: callable (N, ...) -> (N, L) logits (left unchanged).
        xs: (n, ...) inputs all predicted the same class (the region).
        k: int or sequence of ints, each in [2, n] (e.g. range(2, 11)).
        n_trials: combinations per k (>= 1).
        seed: seed of the draws (CPU generator).
        batch_size: input rows per model call (None: automatic, the largest that fits the
            memory budget, at most 256); the combinations of one k are formed and classified
            ~batch_size at a time.
    Returns:
        :class:`ConvexResult` (one probability per k).
    """
    if not isinstance(xs, Tensor) or not xs.is_floating_point() or xs.dim() < 2:
        raise TypeError(f"xs must be a floating tensor (n, ...), got {getattr(xs, 'shape', type(xs).__name__)}")
    check_finite("xs", xs)
    batch_size = forward_batch_size(model, xs, batch_size)
    ks = [k] if isinstance(k, int) else list(k)
    n = xs.shape[0]
    for kk in ks:
        check_int("k", kk, minimum=2, maximum=n)
    n_trials = check_int("n_trials", n_trials, minimum=1)
    gen = make_generator(seed, "cpu")
    probs = []
    with model_guard(model):
        pred = predict(model, xs, batch_size=batch_size)
        label = int(pred[0])
        if bool((pred != label).any()):
            raise ValueError(f"xs must all be predicted the same class; got classes "
                             f"{sorted(set(pred.tolist()))}")
        for kk in ks:
            idx = torch.multinomial(torch.ones(n_trials, n), kk, replacement=False, generator=gen)
            w = -torch.rand(n_trials, kk, generator=gen, dtype=torch.float64).clamp_min(1e-300).log()
            w = (w / w.sum(1, keepdim=True)).to(xs.dtype).to(xs.device)
            hits = 0
            for s in range(0, n_trials, max(1, batch_size // kk)):
                sl = slice(s, s + max(1, batch_size // kk))
                combo = torch.einsum("tk,tk...->t...", w[sl], xs[idx[sl].to(xs.device)])
                hits += int((predict(model, combo, batch_size=batch_size) == label).sum())
            probs.append(hits / n_trials)
    p = np.asarray(probs, dtype=np.float64)
    return ConvexResult(ks, p, np.sqrt(p * (1 - p) / n_trials), n_trials, label)


# ---------------------------------------------------------------- random-direction robustness
@dataclass
class RandomDirectionResult(Result):
    """Distance to the boundary along random unit directions vs the adversarial margin.

    Attributes:
        distance: (N, T) float64, per input and direction, min over ±v of the distance to the
            first change of prediction along v (input units; inf: none within max_radius).
        margin: (N,) float64 adversarial margin (DeepFool L2, or the ``margin`` given), input
            units.
        ratio: (N, T) float64, distance / margin.
        sqrt_d: float, sqrt(D), D the number of input features; a flat boundary in high
            dimension gives ratio ~ sqrt(pi D / 2) (E|<v, n>| ~ sqrt(2 / (pi D)) for a random
            unit v).
    """

    distance: Tensor
    margin: Tensor
    ratio: Tensor
    sqrt_d: float

    def summary(self) -> dict:
        r = self.ratio.flatten().cpu().numpy()
        out = summarize(r)
        out["sqrt_d"] = self.sqrt_d
        out["flat_reference"] = math.sqrt(math.pi / 2) * self.sqrt_d
        out["frac_not_found"] = float(np.mean(~np.isfinite(r))) if r.size else float("nan")
        # median counting not-found directions as "beyond the range" (inf), not dropping them
        out["median_censored"] = float(np.median(r)) if r.size else float("nan")
        return out


def random_direction_robustness(
    model: Callable,
    x: Tensor,
    *,
    n_directions: int = 20,
    margin: Tensor | None = None,
    max_radius=None,
    seed: int = 0,
    n_grid: int = 32,
    n_bisect: int = 24,
    batch_size: int | None = None,
    deepfool_kwargs: dict | None = None,
    progress: bool = False,
) -> RandomDirectionResult:
    """Line search to the boundary along random unit directions, both ways, against the margin.

    For each input x_n and each of ``n_directions`` Gaussian-random unit directions v: the
    distance min(t+, t-) to the first change of prediction along +v and -v (:func:`first_crossing`).
    Compared with the adversarial margin (DeepFool L2, or ``margin`` when given): for a flat
    boundary ratio = 1 / |cos(v, normal)|, whose typical size is sqrt(pi D / 2).

    Args:
        model: callable (N, ...) -> (N, L) logits (left unchanged).
        x: (N, ...) inputs.
        n_directions: T >= 1 random unit directions per input (default 20).
        margin: optional (N,) adversarial margins in input units (None: computed by
            :func:`pyboundary.deepfool` with p=2 and ``deepfool_kwargs``).
        max_radius: search range in input units, float or (N,) (default 4 sqrt(D) x margin per
            sample; 4 x the largest input norm where the margin is not finite).
        seed: seed of the directions (default 0; CPU generator, directions drawn per input so
            the numbers do not depend on the batching).
        n_grid: grid points per ray of the line search (>= 1, default 32): the resolution of
            the search is max_radius / n_grid (:func:`first_crossing`).
        n_bisect: bisection steps refining each crossing (>= 0, default 24), to
            max_radius / n_grid / 2^n_bisect.
        batch_size: input rows per model call (None: automatic, the largest that fits the
            memory budget, at most 256); the 2 T rays of an input are searched together.
        deepfool_kwargs: options of the DeepFool call that computes ``margin`` when it is None
            (``p`` is fixed to 2); unused when ``margin`` is given.
        progress: a tqdm bar over the inputs whose rays are searched (2 T (n_grid + n_bisect)
            model rows per input at most).
    Returns:
        :class:`RandomDirectionResult`.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError(f"x must be a floating tensor (N, ...), got {getattr(x, 'shape', type(x).__name__)}")
    check_finite("x", x)
    batch_size = forward_batch_size(model, x, batch_size)
    n_directions = check_int("n_directions", n_directions, minimum=1)
    n, d = x.shape[0], x[0].numel()
    if margin is None:
        margin = deepfool(model, x, p=2, **(deepfool_kwargs or {})).margin
    margin = torch.as_tensor(margin, dtype=torch.float64).to(x.device).reshape(-1)
    if margin.shape[0] != n:
        raise ValueError(f"margin must have shape ({n},), got {tuple(margin.shape)}")
    if max_radius is None:
        finite = torch.isfinite(margin)
        fallback = float(x.flatten(1).norm(dim=1).max()) * 4
        max_radius = torch.where(finite, 4 * math.sqrt(d) * margin, torch.full_like(margin, fallback))
    r = torch.as_tensor(max_radius, dtype=torch.float64, device=x.device).expand(n)
    if not bool((r > 0).all()):
        raise ValueError(f"max_radius must be > 0, got min {float(r.min())}")
    gen = make_generator(seed, "cpu")
    with model_guard(model):
        label = predict(model, x, batch_size=batch_size)
        # samples per chunk: their 2 T rays are ~batch_size rows (never (N, 2 T, D) at once: 15 GB
        # for 200 ImageNet inputs)
        parts = []
        with _bar(None, progress, "random directions", "input", total=n) as bar:
            for sl in chunks(n, max(1, batch_size // (2 * n_directions))):
                parts.append(_both_ways(model, x[sl], label[sl], r[sl], n_directions, gen, n_grid, n_bisect,
                                        batch_size))
                bar.update(sl.stop - sl.start)
        dist = torch.cat(parts)
    distance = dist.min(1).values
    ratio = distance / margin.unsqueeze(1)
    return RandomDirectionResult(distance, margin, ratio, math.sqrt(d))

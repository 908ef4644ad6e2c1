"""Finite-difference (and exact) Hessian-vector products of pairwise logit differences, batched
over (sample, direction) rows; the derivative engine of the curvature estimators.

See :mod:`pyboundary.geometry.curvature` for the notation, the sign convention and the choice of
the finite-difference step."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..._utils.batching import DEFAULT_BATCH_SIZE, chunks, plan_batch_size
from ..._utils.model import check_logits, explain_input_errors, model_guard
from ..._utils.rng import make_generator
from ..._utils.validation import check_choice, check_finite, check_inputs, check_model

__all__ = ["DEFAULT_H_REL", "SCHEMES", "finite_difference_step", "hessian_vector_product", "check_curvature_inputs",
           "RowCost", "logits_rows"]

#: Default finite-difference step relative to ||x||_2 (see the package docstring).
DEFAULT_H_REL = 0.05
SCHEMES = ("central", "forward", "exact")


def check_curvature_inputs(x, name: str = "x") -> Tensor:
    """Inputs (N, ...) with N >= 1 and at least 2 features (a curve needs a plane), detached."""
    x = check_inputs(name, x, allow_empty=False)
    if x[0].numel() < 2:
        raise ValueError(f"{name}: inputs must have at least 2 features to have a curved boundary, got {x[0].numel()}")
    return x


def finite_difference_step(x: Tensor, h=None, h_rel: float = DEFAULT_H_REL) -> Tensor:
    """Per-sample finite-difference step (N,) in input units.

    ``h`` given: a positive float (same for all samples) or an (N,) tensor of positive steps.
    ``h`` None: ``h_rel * ||x_n||_2`` (``h_rel * sqrt(D)`` for an all-zero input).
    """
    n = x.shape[0]
    if h is None:
        if not (isinstance(h_rel, (int, float)) and math.isfinite(h_rel) and h_rel > 0):
            raise ValueError(f"h_rel must be a positive finite number, got {h_rel!r}")
        norm = x.reshape(n, -1).norm(dim=1)
        fallback = math.sqrt(x[0].numel())
        return h_rel * torch.where(norm > 0, norm, torch.full_like(norm, fallback))
    if isinstance(h, Tensor):
        hs = h.detach().to(dtype=x.dtype, device=x.device).reshape(-1)
        if hs.numel() == 1:
            hs = hs.expand(n).clone()
        if hs.shape[0] != n:
            raise ValueError(f"h must be a float or an ({n},) tensor, got shape {tuple(h.shape)}")
        if not bool(torch.isfinite(hs).all()) or not bool((hs > 0).all()):
            raise ValueError(f"h must be positive and finite, got min {float(hs.min())}")
        return hs
    if isinstance(h, bool) or not isinstance(h, (int, float)):
        raise TypeError(f"h must be a float, a tensor or None, got {type(h).__name__}")
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"h must be > 0 and finite (a step in input units), got {h}")
    return torch.full((n,), float(h), dtype=x.dtype, device=x.device)


class RowCost:
    """Counts rows (inputs) sent forward and backward through the model."""

    def __init__(self):
        self.forward = 0
        self.backward = 0

    def counts(self) -> dict:
        """The totals as the ``n_forward`` / ``n_backward`` fields of a result."""
        return {"n_forward": self.forward, "n_backward": self.backward}


def _fd_setup(x: Tensor, d: int, h, h_rel: float, seed):
    """Common start of the finite-difference estimators for x (N, *shape), D = d.

    Returns (steps hs (N,) in input units, a fresh :class:`RowCost`, x as rows (N, D), the
    generator seeded by ``seed`` on x's device).
    """
    return finite_difference_step(x, h, h_rel), RowCost(), x.reshape(x.shape[0], d), make_generator(seed, x.device)


def _logits(model, xb: Tensor) -> Tensor:
    """The model's checked logits (B, L) at a batch xb (B, *shape): the curvature code's one model
    call (a float32 / float64 mix is reported as a TypeError saying what to convert)."""
    with explain_input_errors(model, xb):
        out = model(xb)
    check_logits(out, xb.shape[0])
    return out


def logits_rows(model, rows: Tensor, shape, batch_size: int, cost: RowCost) -> Tensor:
    """Logits (R, L) of flattened rows (R, D), no graph."""
    outs = []
    with torch.no_grad():
        for sl in chunks(rows.shape[0], batch_size):
            xb = rows[sl].reshape(-1, *shape)
            outs.append(_logits(model, xb).detach())
            cost.forward += xb.shape[0]
    return torch.cat(outs).to(rows.dtype)


def _pair_values(out: Tensor, i: Tensor, j: Tensor) -> Tensor:
    return out.gather(1, i.unsqueeze(1)).squeeze(1) - out.gather(1, j.unsqueeze(1)).squeeze(1)


def _pair_grad(model, rows: Tensor, i: Tensor, j: Tensor, shape, create_graph: bool = False):
    """F = f_i - f_j (B,) and its gradient (B, D) at one batch of rows (B, D).

    Returns (xb, F, grad): xb is the leaf the gradient is taken with respect to (with
    ``create_graph`` the gradient keeps its graph, for a second derivative w.r.t. xb).
    """
    xb = rows.detach().clone().requires_grad_(True)
    with torch.enable_grad(), explain_input_errors(model, xb):
        out = _logits(model, xb.reshape(-1, *shape))
        f = _pair_values(out, i, j)
        (g,) = torch.autograd.grad(f.sum(), xb, create_graph=create_graph)
    return xb, f, g


def _grad_rows(model, rows: Tensor, i: Tensor, j: Tensor, shape, batch_size: int, cost: RowCost):
    """Values F = f_i - f_j (R,) and gradients (R, D) at rows (R, D), one pair per row."""
    vals, grads = [], []
    for sl in chunks(rows.shape[0], batch_size):
        xb, f, g = _pair_grad(model, rows[sl], i[sl], j[sl], shape)
        vals.append(f.detach())
        grads.append(g.detach())
        cost.forward += xb.shape[0]
        cost.backward += xb.shape[0]
    return torch.cat(vals).to(rows.dtype), torch.cat(grads).to(rows.dtype)


def curvature_batch_size(model, x: Tensor, batch_size: int | None, scheme: str = "central") -> int:
    """Rows per model call for curvature work on inputs x (N, ...): ``batch_size`` checked against
    the memory available, or (None) the largest that fits the default memory budget, at most
    :data:`~pyboundary._utils.batching.DEFAULT_BATCH_SIZE` (see
    :func:`pyboundary._utils.batching.plan_batch_size`). The probe is the heaviest unit of the
    work: one input gradient per row (a gradient and a Hessian-vector product by double backward
    for ``scheme='exact'``), on rows of x. Inputs of at most 4 rows are not probed."""
    flat, shape = x.reshape(x.shape[0], -1), tuple(x.shape[1:])
    exact = scheme == "exact"

    def run(r: int) -> None:
        rows = flat[torch.arange(r, device=x.device) % flat.shape[0]]
        i = torch.zeros(r, dtype=torch.long, device=x.device)
        xb, _, g = _pair_grad(model, rows, i, i + 1, shape, create_graph=exact)
        if exact and g.requires_grad:
            with torch.enable_grad():
                torch.autograd.grad(g.sum(), xb, allow_unused=True)

    with model_guard(model):
        # one probe per model, input shape and scheme in a process (the detector scores in chunks)
        plan = plan_batch_size(run, max(flat.shape[0], DEFAULT_BATCH_SIZE), device=x.device, batch_size=batch_size,
                               default=DEFAULT_BATCH_SIZE, max_batch_size=DEFAULT_BATCH_SIZE, unit="rows",
                               reuse=(model, ("curvature", shape, x.dtype, exact)))
    return plan.batch_size


def _exact_hvp_rows(model, rows, w, i, j, shape, batch_size, cost):
    """Exact H w (R, D) by double backward (zero where the graph has no second-order term)."""
    outs = []
    for sl in chunks(rows.shape[0], batch_size):
        xb, _, g = _pair_grad(model, rows[sl], i[sl], j[sl], shape, create_graph=True)
        with torch.enable_grad():
            if g.requires_grad:
                (hv,) = torch.autograd.grad((g * w[sl]).sum(), xb, allow_unused=True)
                hv = torch.zeros_like(xb) if hv is None else hv
            else:  # piecewise-linear model: the exact Hessian is zero
                hv = torch.zeros_like(xb)
        outs.append(hv.detach())
        cost.forward += xb.shape[0]
        cost.backward += 2 * xb.shape[0]
    return torch.cat(outs)


def _hvp_rows(model, rows, w, hs, i, j, shape, scheme, batch_size, cost, g0=None):
    """Hessian of F = f_i - f_j times w, per row.

    rows (R, D) base points, w (R, D) directions (any norm), hs (R,) steps, i/j (R,) classes.
    Finite differences are taken along the unit direction w/||w|| and rescaled by ||w||, so the
    step length is hs whatever the norm of w. ``g0`` (R, D): gradients at rows (forward scheme).
    """
    if scheme == "exact":
        return _exact_hvp_rows(model, rows, w, i, j, shape, batch_size, cost)
    wn = w.norm(dim=1, keepdim=True)
    u = w / wn.clamp_min(torch.finfo(w.dtype).tiny)
    step = hs.unsqueeze(1) * u
    if scheme == "central":
        stacked = torch.cat([rows + step, rows - step])
        ii, jj = torch.cat([i, i]), torch.cat([j, j])
        _, g = _grad_rows(model, stacked, ii, jj, shape, batch_size, cost)
        r = rows.shape[0]
        diff = (g[:r] - g[r:]) / (2 * hs.unsqueeze(1))
    else:
        if g0 is None:
            _, g0 = _grad_rows(model, rows, i, j, shape, batch_size, cost)
        _, g = _grad_rows(model, rows + step, i, j, shape, batch_size, cost)
        diff = (g - g0) / hs.unsqueeze(1)
    return diff * wn


def _second_diff_rows(model, rows, u, hs, shape, scheme, batch_size, cost, base_logits=None):
    """u^T H_{f_l} u for every logit l: (R, L). u (R, D) unit directions, hs (R,) steps.

    central: (f(x + h u) - 2 f(x) + f(x - h u)) / h^2;  forward: (f(x + 2 h u) - 2 f(x + h u)
    + f(x)) / h^2;  exact: second derivative of t -> f(x + t u) at 0 by reverse mode (4 passes).
    ``base_logits`` (R, L): f(rows) if already known.
    """
    if scheme == "exact":
        return _exact_second_rows(model, rows, u, shape, batch_size, cost)
    step = hs.unsqueeze(1) * u
    h2 = (hs * hs).unsqueeze(1)
    if base_logits is None:
        base_logits = logits_rows(model, rows, shape, batch_size, cost)
    if scheme == "central":
        fp = logits_rows(model, torch.cat([rows + step, rows - step]), shape, batch_size, cost)
        r = rows.shape[0]
        return (fp[:r] - 2 * base_logits + fp[r:]) / h2
    fp = logits_rows(model, torch.cat([rows + step, rows + 2 * step]), shape, batch_size, cost)
    r = rows.shape[0]
    return (fp[r:] - 2 * fp[:r] + base_logits) / h2


def _exact_second_rows(model, rows, u, shape, batch_size, cost):
    """u^T H_{f_l} u for all logits by reverse mode only (jvp as a vjp of a vjp, twice).

    J u = d/dv <J^T v, u>, and (d/dx J u) u the same way applied to J u: four reverse passes,
    no torch.func. Zero where the model has no second-order term (piecewise-linear models).
    """
    grad = torch.autograd.grad
    outs = []
    for sl in chunks(rows.shape[0], batch_size):
        xb = rows[sl].detach().clone().requires_grad_(True)
        ub = u[sl].to(rows.dtype)
        with torch.enable_grad():
            out = _logits(model, xb.reshape(-1, *shape))
            v = torch.zeros_like(out, requires_grad=True)
            (jt_v,) = grad(out, xb, v, create_graph=True)
            (ju,) = grad(jt_v, v, ub, create_graph=True)
            second = None
            if ju.requires_grad:
                w = torch.zeros_like(ju, requires_grad=True)
                (jt_w,) = grad(ju, xb, w, create_graph=True, allow_unused=True)
                if jt_w is not None and jt_w.requires_grad:
                    (second,) = grad(jt_w, w, ub, allow_unused=True)
        if second is None:
            second = torch.zeros_like(out)
        outs.append(second.detach())
        cost.forward += xb.shape[0]
        cost.backward += 4 * xb.shape[0]
    return torch.cat(outs).to(rows.dtype)


def hessian_vector_product(
    model: Callable,
    x: Tensor,
    v: Tensor,
    *,
    pair,
    h=None,
    h_rel: float = DEFAULT_H_REL,
    scheme: str = "central",
    batch_size: int | None = None,
) -> Tensor:
    """Hessian of F = f_i - f_j with respect to the input times directions, batched.

    Args:
        model: callable (N, *shape) -> (N, L) logits (left unchanged).
        x: (N, *shape) points.
        v: (N, T, *shape) T directions per sample (or (N, *shape) for T = 1).
        pair: (i, j) ints, or an (N, 2) int64 tensor of per-sample pairs, i != j.
        h: finite-difference step in input units (float or (N,) tensor); None: h_rel * ||x_n||_2.
        h_rel: the step relative to ||x_n||_2 when ``h`` is None (default :data:`DEFAULT_H_REL`
            = 0.05; ``h_rel * sqrt(D)`` for an all-zero input).
        scheme: 'central' (default, error O(h^2)), 'forward' (O(h)) or 'exact' (double backward).
        batch_size: input rows per model call (None: automatic); all N * T (sample, direction)
            rows form one stacked batch.
    Returns:
        (N, T, *shape) (or (N, *shape)) products H v, dtype of x: a plain tensor, not a result
        class (in units of logits / input units^2 times the units of v).
    """
    check_model(model)
    x = check_curvature_inputs(x)
    scheme = check_choice("scheme", scheme, SCHEMES)
    batch_size = curvature_batch_size(model, x, batch_size, scheme)
    if not isinstance(v, Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    check_finite("v", v)
    n, shape, d = x.shape[0], tuple(x.shape[1:]), x[0].numel()
    single = tuple(v.shape) == tuple(x.shape)
    if not single and (v.dim() != x.dim() + 1 or v.shape[0] != n or tuple(v.shape[2:]) != shape):
        want = ", ".join(map(str, shape))
        raise ValueError(f"v must have shape (N, T, *shape) = ({n}, T, {want}), got {tuple(v.shape)}")
    vv = v.reshape(n, -1, d)
    t = vv.shape[1]
    hs = finite_difference_step(x, h, h_rel)
    with model_guard(model):
        out = logits_rows(model, x.reshape(n, d), shape, batch_size, RowCost())
        pi, pj = _resolve_pair(pair, out)
        rows = x.reshape(n, 1, d).expand(n, t, d).reshape(-1, d)
        rep = lambda a: a.repeat_interleave(t)  # noqa: E731
        hv = _hvp_rows(model, rows, vv.to(x.dtype).reshape(-1, d), rep(hs), rep(pi), rep(pj), shape,
                       scheme, batch_size, RowCost())
    return hv.reshape(v.shape)


def _resolve_pair(pair, logits: Tensor):
    """(i, j) per sample from a pair argument: (i, j) ints, (N, 2) tensor or None (runner-up, top)."""
    n, n_classes = logits.shape
    dev = logits.device
    if pair is None:
        top2 = logits.topk(2, dim=1).indices
        return top2[:, 1], top2[:, 0]
    if isinstance(pair, Tensor):
        if pair.dtype not in (torch.int64, torch.int32) or tuple(pair.shape) != (n, 2):
            raise ValueError(f"pair tensor must be int64 of shape ({n}, 2), got {pair.dtype} {tuple(pair.shape)}")
        pi, pj = pair[:, 0].to(dev, torch.int64), pair[:, 1].to(dev, torch.int64)
    else:
        try:
            a, b = pair
            a, b = int(a), int(b)
        except (TypeError, ValueError):
            raise TypeError(f"pair must be (i, j) class indices, an (N, 2) tensor or None, got {pair!r}") from None
        pi = torch.full((n,), a, dtype=torch.int64, device=dev)
        pj = torch.full((n,), b, dtype=torch.int64, device=dev)
    if bool((pi == pj).any()):
        bad = int((pi == pj).nonzero()[0, 0])
        raise ValueError(f"pair must name two different classes, got ({int(pi[bad])}, {int(pj[bad])}) for sample {bad}")
    for name, t in (("i", pi), ("j", pj)):
        if bool(((t < 0) | (t >= n_classes)).any()):
            raise ValueError(f"pair class {name} must be in [0, {n_classes}), got values {t.unique().tolist()}")
    return pi, pj


def _project(v: Tensor, normal: Tensor) -> Tensor:
    """P v = v - n (n . v) for v (N, ..., D), normal (N, D)."""
    nv = normal.reshape(normal.shape[0], *([1] * (v.dim() - 2)), normal.shape[1])
    return v - nv * (v * nv).sum(-1, keepdim=True)


"""Curvature of decision boundaries in input space.

Notation: ``f`` maps inputs x (N, *shape), D = prod(shape), to logits (N, L). For a pair of
classes ``(i, j)`` the pairwise function is ``F = f_i - f_j``; its level set through the point
of evaluation is the (pairwise) boundary surface studied here (at a boundary point F = 0).

Sign convention (used everywhere in this module and in :mod:`pyboundary.detection`)
-----------------------------------------------------------------------------------
* normal ``n = grad F / ||grad F||``: it points to the side where F grows, i.e. towards class
  ``i`` (the first class of the pair);
* tangent projector ``P = I - n n^T``;
* shape operator ``S = -P H P / ||grad F||`` (H the input Hessian of F), restricted to the
  tangent space (D - 1 dimensions): its eigenvalues are the **principal curvatures**, its
  eigenvectors the principal directions. This is the second fundamental form of the level set
  with respect to ``n``: ``kappa > 0`` means that along that direction the surface bends towards
  ``n``, so if every kappa > 0 the region ``{F > 0}`` (where ``i`` beats ``j``) is locally convex.
  Example (tested): F(x) = x_1 - 1/2 sum_{i>=2} a_i x_i^2 has kappa = a_i at the origin, with
  directions e_i. Swapping the pair flips every sign.
* **mean curvature** = the mean of the D - 1 principal curvatures = tr(S) / (D - 1)
  = (grad F^T H grad F - tr(H) ||grad F||^2) / ((D - 1) ||grad F||^3)   (the "trace form").
  (DESIGN.md's ``G = P H P / ||grad F||`` is ``-S``; its trace formula, with 2 in place of
  D - 1, is ours.)
* functions that take a reference class (``mean_curvature``, the detector) use
  ``F_i = f_i - f_ref`` for every other class ``i``, ``ref`` the predicted label by default:
  the normal points out of the region of the predicted class.

Derivatives
-----------
Hessian-vector products and quadratic forms come from finite differences of gradients
(``scheme='central'``: (grad F(x + h w) - grad F(x - h w)) / 2h; ``'forward'``: (grad F(x + h w)
- grad F(x)) / h) or, for quadratic forms, of values ((F(x + h w) - 2 F(x) + F(x - h w)) / h^2),
or exactly (``scheme='exact'``: double backward / nested forward mode; smooth models only).
Networks with ReLUs are piecewise linear: their Hessian is zero almost everywhere and an
infinitesimal step sees no curvature at all. The finite-difference step ``h`` (in input units,
the length of the step along a unit direction) must therefore span many linear pieces, on the
scale of the boundary's distance: the default is ``h = h_rel * ||x||_2`` per sample with
``h_rel = 0.05`` (DeepFool margins of small image classifiers are a few percent of ||x||).
For such models the finite-difference "Hessian" is a smoothed one and depends on h; the
operator is then only approximately linear and symmetric (the dense method symmetrises it).

Every evaluation is batched: the (sample, direction[, class]) rows are stacked into one batch
and evaluated in chunks of ``batch_size`` rows; counts of rows sent forward and backward through
the model are returned as the cost (``n_forward``, ``n_backward``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .utils import check_finite, check_logits, make_generator, model_guard

__all__ = [
    "DEFAULT_H_REL",
    "hessian_vector_product",
    "principal_curvatures",
    "PrincipalCurvatures",
    "mean_curvature",
    "MeanCurvature",
    "shared_curved_directions",
    "SharedDirections",
    "relative_curvature",
    "RelativeCurvature",
    "noise_accuracy",
    "subspace_fraction",
    "finite_difference_step",
    "register_cli",
]

#: Default finite-difference step relative to ||x||_2 (see the module docstring).
DEFAULT_H_REL = 0.05
#: Default number of rows per model call.
DEFAULT_BATCH_SIZE = 512
_SCHEMES = ("central", "forward", "exact")


# --------------------------------------------------------------------------- validation


def _check_model(model) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable (N, ...) -> (N, L) logits, got {type(model).__name__}")


def _check_x(x, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (N, ...) with at least one feature dim, got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    if x[0].numel() < 2:
        raise ValueError(f"{name}: inputs must have at least 2 features to have a curved boundary, got {x[0].numel()}")
    check_finite(name, x)
    return x.detach()


def _check_scheme(scheme: str) -> str:
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme must be one of {_SCHEMES}, got {scheme!r}")
    return scheme


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


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


# --------------------------------------------------------------------------- model rows


class _Cost:
    """Counts rows (inputs) sent forward and backward through the model."""

    def __init__(self):
        self.forward = 0
        self.backward = 0

    def counts(self) -> dict:
        """The totals as the ``n_forward`` / ``n_backward`` fields of a result."""
        return {"n_forward": self.forward, "n_backward": self.backward}


def _fd_setup(x: Tensor, d: int, h, h_rel: float, seed):
    """Common start of the finite-difference estimators for x (N, *shape), D = d.

    Returns (steps hs (N,) in input units, a fresh :class:`_Cost`, x as rows (N, D), the
    generator seeded by ``seed`` on x's device).
    """
    return finite_difference_step(x, h, h_rel), _Cost(), x.reshape(x.shape[0], d), make_generator(seed, x.device)


def _chunks(r: int, batch_size: int):
    for s in range(0, r, batch_size):
        yield slice(s, min(r, s + batch_size))


def _logits_rows(model, rows: Tensor, shape, batch_size: int, cost: _Cost) -> Tensor:
    """Logits (R, L) of flattened rows (R, D), no graph."""
    outs = []
    with torch.no_grad():
        for sl in _chunks(rows.shape[0], batch_size):
            xb = rows[sl].reshape(-1, *shape)
            out = model(xb)
            check_logits(out, xb.shape[0])
            outs.append(out.detach())
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
    with torch.enable_grad():
        out = model(xb.reshape(-1, *shape))
        check_logits(out, xb.shape[0])
        f = _pair_values(out, i, j)
        (g,) = torch.autograd.grad(f.sum(), xb, create_graph=create_graph)
    return xb, f, g


def _grad_rows(model, rows: Tensor, i: Tensor, j: Tensor, shape, batch_size: int, cost: _Cost):
    """Values F = f_i - f_j (R,) and gradients (R, D) at rows (R, D), one pair per row."""
    vals, grads = [], []
    for sl in _chunks(rows.shape[0], batch_size):
        xb, f, g = _pair_grad(model, rows[sl], i[sl], j[sl], shape)
        vals.append(f.detach())
        grads.append(g.detach())
        cost.forward += xb.shape[0]
        cost.backward += xb.shape[0]
    return torch.cat(vals).to(rows.dtype), torch.cat(grads).to(rows.dtype)


def _exact_hvp_rows(model, rows, w, i, j, shape, batch_size, cost):
    """Exact H w (R, D) by double backward (zero where the graph has no second-order term)."""
    outs = []
    for sl in _chunks(rows.shape[0], batch_size):
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
        base_logits = _logits_rows(model, rows, shape, batch_size, cost)
    if scheme == "central":
        fp = _logits_rows(model, torch.cat([rows + step, rows - step]), shape, batch_size, cost)
        r = rows.shape[0]
        return (fp[:r] - 2 * base_logits + fp[r:]) / h2
    fp = _logits_rows(model, torch.cat([rows + step, rows + 2 * step]), shape, batch_size, cost)
    r = rows.shape[0]
    return (fp[r:] - 2 * fp[:r] + base_logits) / h2


def _exact_second_rows(model, rows, u, shape, batch_size, cost):
    """u^T H_{f_l} u for all logits by reverse mode only (jvp as a vjp of a vjp, twice).

    J u = d/dv <J^T v, u>, and (d/dx J u) u the same way applied to J u: four reverse passes,
    no torch.func. Zero where the model has no second-order term (piecewise-linear models).
    """
    grad = torch.autograd.grad
    outs = []
    for sl in _chunks(rows.shape[0], batch_size):
        xb = rows[sl].detach().clone().requires_grad_(True)
        ub = u[sl].to(rows.dtype)
        with torch.enable_grad():
            out = model(xb.reshape(-1, *shape))
            check_logits(out, xb.shape[0])
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


# --------------------------------------------------------------------------- public HVP


def hessian_vector_product(
    model: Callable,
    x: Tensor,
    v: Tensor,
    *,
    pair,
    h=None,
    h_rel: float = DEFAULT_H_REL,
    scheme: str = "central",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Tensor:
    """Hessian of F = f_i - f_j with respect to the input times directions, batched.

    Args:
        model: callable (N, *shape) -> (N, L) logits (left unchanged).
        x: (N, *shape) points.
        v: (N, T, *shape) T directions per sample (or (N, *shape) for T = 1).
        pair: (i, j) ints, or an (N, 2) int64 tensor of per-sample pairs, i != j.
        h: finite-difference step in input units (float or (N,) tensor); None: h_rel * ||x_n||.
        scheme: 'central' (default, error O(h^2)), 'forward' (O(h)) or 'exact' (double backward).
        batch_size: rows per model call; all N * T (sample, direction) rows form one stacked batch.
    Returns:
        (N, T, *shape) (or (N, *shape)) products H v, dtype of x.
    """
    _check_model(model)
    x = _check_x(x)
    scheme = _check_scheme(scheme)
    batch_size = _check_positive_int("batch_size", batch_size)
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
        out = _logits_rows(model, x.reshape(n, d), shape, batch_size, _Cost())
        pi, pj = _resolve_pair(pair, out)
        rows = x.reshape(n, 1, d).expand(n, t, d).reshape(-1, d)
        rep = lambda a: a.repeat_interleave(t)  # noqa: E731
        hv = _hvp_rows(model, rows, vv.to(x.dtype).reshape(-1, d), rep(hs), rep(pi), rep(pj), shape,
                       scheme, batch_size, _Cost())
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


# --------------------------------------------------------------------------- principal curvatures


@dataclass
class _Result:
    def to_numpy(self) -> dict:
        """Fields as numpy arrays (tensors converted, other values as they are)."""
        return {
            f.name: (getattr(self, f.name).detach().cpu().numpy() if isinstance(getattr(self, f.name), Tensor)
                     else getattr(self, f.name))
            for f in fields(self)
        }


@dataclass
class PrincipalCurvatures(_Result):
    """Principal curvatures of the boundary of F = f_i - f_j (sign convention: module docstring).

    Attributes:
        largest: (N, k) the k largest principal curvatures, descending (1 / input units).
        smallest: (N, k) the k smallest, ascending.
        largest_dirs, smallest_dirs: (N, k, *shape) unit principal directions (tangent to the
            level set), matching the curvatures.
        pair: (N, 2) int64 the classes (i, j) of F = f_i - f_j.
        points: (N, *shape) where the curvature was evaluated (x, or the boundary point z).
        grad_norm: (N,) ||grad F|| at the points.
        h: (N,) finite-difference steps (input units; NaN for scheme='exact').
        valid: (N,) bool; False where no boundary point was found (at='boundary') or grad F = 0.
        spectrum: (N, D - 1) every principal curvature, ascending (method='dense' only).
        method, scheme, at: how it was computed; n_forward, n_backward: rows through the model.
    """

    largest: Tensor
    smallest: Tensor
    largest_dirs: Tensor
    smallest_dirs: Tensor
    pair: Tensor
    points: Tensor
    grad_norm: Tensor
    h: Tensor
    valid: Tensor
    spectrum: Tensor | None = None
    method: str = "lanczos"
    scheme: str = "central"
    at: str = "input"
    n_forward: int = 0
    n_backward: int = 0

    def summary(self) -> dict:
        """Means over valid samples of the extreme curvatures, and the cost per sample."""
        ok = self.valid
        n = max(int(self.valid.numel()), 1)
        return {
            "n": int(self.valid.numel()),
            "n_valid": int(ok.sum()),
            "mean_largest": float(self.largest[ok, 0].mean()) if ok.any() else float("nan"),
            "mean_smallest": float(self.smallest[ok, 0].mean()) if ok.any() else float("nan"),
            "forward_per_sample": self.n_forward / n,
            "backward_per_sample": self.n_backward / n,
        }


def _householder_tangent_basis(normal: Tensor) -> Tensor:
    """(N, D, D - 1) orthonormal bases of the tangent spaces n^perp, from unit normals (N, D)."""
    n, d = normal.shape
    e1 = torch.zeros_like(normal)
    e1[:, 0] = 1.0
    # reflect e1 onto -sign(n_1) n, avoiding cancellation
    sign = torch.where(normal[:, :1] >= 0, 1.0, -1.0).to(normal.dtype)
    u = normal + sign * e1
    u = u / u.norm(dim=1, keepdim=True)
    q = torch.eye(d, dtype=normal.dtype, device=normal.device).expand(n, d, d) - 2 * u.unsqueeze(2) * u.unsqueeze(1)
    return q[:, :, 1:]  # column 0 is +-n


def _project(v: Tensor, normal: Tensor) -> Tensor:
    """P v = v - n (n . v) for v (N, ..., D), normal (N, D)."""
    nv = normal.reshape(normal.shape[0], *([1] * (v.dim() - 2)), normal.shape[1])
    return v - nv * (v * nv).sum(-1, keepdim=True)


def _lanczos(matvec, v0: Tensor, m: int, gen=None):
    """Batched Lanczos with full reorthogonalisation, inside the tangent spaces.

    matvec: (N, D) -> (N, D) symmetric operator (already projected). v0: (N, D) start vectors
    (in the tangent space). Returns alpha (N, m), beta (N, m - 1), Q (N, m, D).
    On breakdown (beta ~ 0, an invariant subspace found) the next vector is a fresh random
    tangent vector orthogonal to the basis, with beta = 0, so the tridiagonal stays exact.
    """
    n, d = v0.shape
    dtype = v0.dtype
    q = v0 / v0.norm(dim=1, keepdim=True)
    basis = torch.zeros(n, m, d, dtype=dtype, device=v0.device)
    alpha = torch.zeros(n, m, dtype=dtype, device=v0.device)
    beta = torch.zeros(n, max(m - 1, 0), dtype=dtype, device=v0.device)
    tol = 100 * torch.finfo(dtype).eps
    for k in range(m):
        basis[:, k] = q
        w = matvec(q)
        alpha[:, k] = (w * q).sum(1)
        for _ in range(2):  # full reorthogonalisation, twice
            coef = torch.einsum("nkd,nd->nk", basis[:, : k + 1], w)
            w = w - torch.einsum("nk,nkd->nd", coef, basis[:, : k + 1])
        if k == m - 1:
            break
        b = w.norm(dim=1)
        scale = alpha[:, : k + 1].abs().amax(1).clamp_min(torch.finfo(dtype).tiny)
        broke = b <= tol * scale
        if bool(broke.any()):
            fresh = matvec.project(torch.randn(n, d, dtype=dtype, device=v0.device, generator=gen))
            for _ in range(2):
                coef = torch.einsum("nkd,nd->nk", basis[:, : k + 1], fresh)
                fresh = fresh - torch.einsum("nk,nkd->nd", coef, basis[:, : k + 1])
            w = torch.where(broke.unsqueeze(1), fresh, w)
            b = torch.where(broke, torch.zeros_like(b), b)
        beta[:, k] = b
        wn = w.norm(dim=1, keepdim=True)
        q = w / wn.clamp_min(torch.finfo(dtype).tiny)
    return alpha, beta, basis


class _ShapeOperator:
    """w -> S w = -P H P w / ||grad F|| for a batch of samples (flattened (N, D))."""

    def __init__(self, model, points, hs, pi, pj, shape, scheme, batch_size, cost, normal, gnorm, g0):
        self.args = (model, points, hs, pi, pj, shape, scheme, batch_size, cost)
        self.normal, self.gnorm, self.g0 = normal, gnorm, g0

    def project(self, v):
        return _project(v, self.normal)

    def __call__(self, w):
        model, points, hs, pi, pj, shape, scheme, batch_size, cost = self.args
        pw = self.project(w)
        hv = _hvp_rows(model, points, pw, hs, pi, pj, shape, scheme, batch_size, cost, g0=self.g0)
        return -self.project(hv) / self.gnorm.unsqueeze(1)


def _boundary_points(model, x, batch_size, deepfool_kwargs):
    """z = x + r(x) on the boundary (DeepFool, no overshoot, refined), pair (adv, orig), ok mask."""
    from .deepfool import deepfool

    kwargs = {"overshoot": 0.0, "refine": True, "batch_size": batch_size}
    kwargs.update(deepfool_kwargs or {})
    res = deepfool(model, x, **kwargs)
    ok = res.converged.to(torch.bool).to(x.device) & torch.isfinite(res.margin).to(x.device)
    pert = res.perturbation.to(dtype=x.dtype, device=x.device).reshape(x.shape)
    ok = ok & torch.isfinite(pert).reshape(x.shape[0], -1).all(1)
    z = torch.where(ok.reshape(-1, *([1] * (x.dim() - 1))), x + pert.nan_to_num(0.0), x).detach()
    orig = res.orig_label.to(torch.int64)
    adv = res.adv_label.to(torch.int64)
    return z, ok, adv, orig


def principal_curvatures(
    model: Callable,
    x: Tensor,
    *,
    pair=None,
    k: int = 5,
    at: str = "input",
    h=None,
    h_rel: float = DEFAULT_H_REL,
    method: str = "lanczos",
    scheme: str = "central",
    n_iter: int | None = None,
    seed: int | None = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    deepfool_kwargs: dict | None = None,
) -> PrincipalCurvatures:
    """The k largest and k smallest principal curvatures of a pairwise boundary, per sample.

    Args:
        model: callable (N, *shape) -> (N, L) logits; left unchanged (eval mode inside).
        x: (N, *shape) inputs.
        pair: (i, j) for F = f_i - f_j, an (N, 2) int64 tensor, or None: at='input', (runner-up,
            predicted class); at='boundary', (class reached, original class).
        k: how many curvatures at each end (1 <= k <= D - 1).
        at: 'input' (level set of F through x) or 'boundary' (at z = x + r(x), the boundary point
            found by :func:`pyboundary.deepfool` with no overshoot; samples where it fails are
            flagged ``valid = False`` and hold NaN).
        h, h_rel: finite-difference step (input units); see :func:`finite_difference_step`.
        method: 'lanczos' (batched Lanczos with ``n_iter`` matrix-vector products, default
            min(D - 1, max(4 k, 40)); extreme curvatures converge first) or 'dense' (the full
            finite-difference Hessian, 2 D gradient rows per sample with 'central', symmetrised;
            returns the whole spectrum; D <= 4096).
        scheme: 'central', 'forward' or 'exact' (see module docstring).
        seed: seeds the Lanczos start vectors.
        batch_size: rows per model call.
        deepfool_kwargs: extra arguments for the boundary search (at='boundary').
    Returns:
        :class:`PrincipalCurvatures`.
    """
    _check_model(model)
    x = _check_x(x)
    scheme = _check_scheme(scheme)
    batch_size = _check_positive_int("batch_size", batch_size)
    n, shape, d = x.shape[0], tuple(x.shape[1:]), x[0].numel()
    k = _check_positive_int("k", k)
    if k > d - 1:
        raise ValueError(f"k must be <= D - 1 = {d - 1} (tangent dimension), got {k}")
    if at not in ("input", "boundary"):
        raise ValueError(f"at must be 'input' or 'boundary', got {at!r}")
    if method not in ("lanczos", "dense"):
        raise ValueError(f"method must be 'lanczos' or 'dense', got {method!r}")
    if method == "dense" and d > 4096:
        raise ValueError(f"method='dense' needs D <= 4096 (a D x D Hessian per sample), got D={d}; use 'lanczos'")
    if n_iter is None:
        n_iter = min(d - 1, max(4 * k, 40))
    n_iter = _check_positive_int("n_iter", n_iter)
    if n_iter < k or n_iter > d - 1:
        raise ValueError(f"n_iter must be in [k, D - 1] = [{k}, {d - 1}], got {n_iter}")
    hs = finite_difference_step(x, h, h_rel)
    cost = _Cost()
    with model_guard(model):
        valid = torch.ones(n, dtype=torch.bool, device=x.device)
        if at == "boundary":
            points, valid, adv, orig = _boundary_points(model, x, batch_size, deepfool_kwargs)
            logits = _logits_rows(model, points.reshape(n, d), shape, batch_size, cost)
            if pair is None:
                n_classes = logits.shape[1]
                bad = ~valid | (adv == orig) | (adv < 0) | (adv >= n_classes)
                valid = valid & ~bad
                pi, pj = torch.where(bad, (orig + 1) % n_classes, adv), orig
            else:
                pi, pj = _resolve_pair(pair, logits)
        else:
            points = x
            logits = _logits_rows(model, x.reshape(n, d), shape, batch_size, cost)
            pi, pj = _resolve_pair(pair, logits)
        flat = points.reshape(n, d)
        _, g0 = _grad_rows(model, flat, pi, pj, shape, batch_size, cost)
        gnorm = g0.norm(dim=1)
        valid = valid & (gnorm > 0)
        normal = g0 / gnorm.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(1)
        normal = torch.where((gnorm > 0).unsqueeze(1), normal, _unit_e1(n, d, x))
        # a zero gradient has no level set: S = 0 there (flagged invalid, reported as NaN)
        safe = torch.where(gnorm > 0, gnorm, torch.full_like(gnorm, math.inf))
        op = _ShapeOperator(model, flat, hs, pi, pj, shape, scheme, batch_size, cost, normal, safe,
                            g0 if scheme == "forward" else None)
        spectrum = None
        if method == "dense":
            vals, vecs = _dense_shape_spectrum(op, normal, n, d)
            spectrum = vals
        else:
            gen = make_generator(seed, x.device)
            v0 = op.project(torch.randn(n, d, dtype=x.dtype, device=x.device, generator=gen))
            alpha, beta, basis = _lanczos(op, v0, n_iter, gen)
            tri = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
            ritz, y = torch.linalg.eigh(tri)
            vals = ritz
            vecs = torch.einsum("nmd,nmr->nrd", basis, y)  # (N, m, D) ascending
    largest = vals.flip(1)[:, :k]
    smallest = vals[:, :k]
    ldirs = vecs.flip(1)[:, :k]
    sdirs = vecs[:, :k]
    nan = torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    mask = valid.unsqueeze(1)
    largest, smallest = torch.where(mask, largest, nan), torch.where(mask, smallest, nan)
    if spectrum is not None:
        spectrum = torch.where(mask, spectrum, nan)
    return PrincipalCurvatures(
        largest=largest,
        smallest=smallest,
        largest_dirs=ldirs.reshape(n, k, *shape),
        smallest_dirs=sdirs.reshape(n, k, *shape),
        pair=torch.stack([pi, pj], 1),
        points=points,
        grad_norm=gnorm,
        h=hs if scheme != "exact" else torch.full_like(hs, float("nan")),
        valid=valid,
        spectrum=spectrum,
        method=method,
        scheme=scheme,
        at=at,
        **cost.counts(),
    )


def _unit_e1(n, d, like):
    e = torch.zeros(n, d, dtype=like.dtype, device=like.device)
    e[:, 0] = 1
    return e


def _dense_shape_spectrum(op: _ShapeOperator, normal: Tensor, n: int, d: int):
    """Full spectrum of S on the tangent space: (N, D-1) ascending values, (N, D-1, D) vectors.

    Samples are processed in chunks of about ``batch_size / D`` (at least one), so the
    stacked (sample, basis vector) rows stay within a few batches; each sample still needs its
    D x D Hessian in memory.
    """
    model, points, hs, pi, pj, shape, scheme, batch_size, cost = op.args
    eye = torch.eye(d, dtype=points.dtype, device=points.device)
    vals, vecs = [], []
    for sl in _chunks(n, max(1, batch_size // d)):
        m = points[sl].shape[0]
        rows = points[sl].unsqueeze(1).expand(m, d, d).reshape(-1, d)
        dirs = eye.expand(m, d, d).reshape(-1, d)
        rep = lambda a: a[sl].repeat_interleave(d)  # noqa: E731
        g0 = op.g0[sl].repeat_interleave(d, 0) if op.g0 is not None else None
        cols = _hvp_rows(model, rows, dirs, rep(hs), rep(pi), rep(pj), shape, scheme, batch_size, cost, g0=g0)
        hess = cols.reshape(m, d, d)  # row c = H e_c (H symmetric up to FD error)
        hess = 0.5 * (hess + hess.transpose(1, 2))
        q = _householder_tangent_basis(normal[sl])  # (m, D, D-1)
        s = -(q.transpose(1, 2) @ hess @ q) / op.gnorm[sl].reshape(m, 1, 1)
        s = 0.5 * (s + s.transpose(1, 2))
        v, y = torch.linalg.eigh(s)
        vals.append(v)
        vecs.append((q @ y).transpose(1, 2))  # (m, D-1, D)
    return torch.cat(vals), torch.cat(vecs)


# --------------------------------------------------------------------------- mean curvature


@dataclass
class MeanCurvature(_Result):
    """Mean curvature of the boundaries of F_i = f_i - f_ref for several classes i.

    Attributes:
        classes: (N, J) int64 the classes i.
        reference: (N,) int64 the reference class (predicted label unless given).
        hutchinson: (N, J) mean of v^T S v over T random unit tangent directions v (unbiased
            for tr(S) / (D - 1), the mean principal curvature); NaN if not computed.
        hutchinson_se: (N, J) its standard error over the T directions.
        trace: (N, J) trace form (grad F^T H grad F - tr(H) ||grad F||^2) / ((D-1) ||grad F||^3)
            with tr(H) estimated from the same T directions for every class; NaN if not computed.
        grad_norm: (N, J) ||grad F_i||.
        values: (N, J) F_i at x (negative when ref is the predicted class).
        h: (N,) finite-difference steps; n_dirs: T; n_forward, n_backward: rows through the model.
    """

    classes: Tensor
    reference: Tensor
    hutchinson: Tensor
    hutchinson_se: Tensor
    trace: Tensor
    grad_norm: Tensor
    values: Tensor
    h: Tensor
    n_dirs: int = 0
    n_forward: int = 0
    n_backward: int = 0

    def summary(self) -> dict:
        est = self.trace if bool(torch.isfinite(self.trace).any()) else self.hutchinson
        per_sample = est.mean(1)
        return {
            "n": int(per_sample.numel()),
            "mean_over_classes_mean": float(per_sample.mean()),
            "forward_per_sample": self.n_forward / max(per_sample.numel(), 1),
            "backward_per_sample": self.n_backward / max(per_sample.numel(), 1),
        }


def _resolve_classes(classes, logits: Tensor, ref: Tensor) -> Tensor:
    n, n_classes = logits.shape
    dev = logits.device
    if classes is None:
        all_c = torch.arange(n_classes, device=dev).expand(n, n_classes)
        keep = all_c != ref.unsqueeze(1)
        return all_c[keep].reshape(n, n_classes - 1)
    if isinstance(classes, Tensor):
        c = classes.to(dev, torch.int64)
        if c.dim() == 1:
            c = c.expand(n, c.shape[0])
    else:
        try:
            c = torch.tensor([int(v) for v in classes], dtype=torch.int64, device=dev).expand(n, -1)
        except (TypeError, ValueError):
            raise TypeError(
                f"classes must be None, a list of class indices or an (N, J) tensor, got {classes!r}"
            ) from None
    if c.dim() != 2 or c.shape[0] != n or c.shape[1] < 1:
        raise ValueError(f"classes must give J >= 1 classes per sample (shape (N, J) = ({n}, J)), got {tuple(c.shape)}")
    if bool(((c < 0) | (c >= n_classes)).any()):
        raise ValueError(f"classes must lie in [0, {n_classes}), got {c.unique().tolist()}")
    clash = c == ref.unsqueeze(1)
    if bool(clash.any()):
        s = int(clash.any(1).nonzero()[0, 0])
        raise ValueError(
            f"classes include the reference class {int(ref[s])} for sample {s}: F = f_i - f_ref needs i != ref"
        )
    return c.contiguous()


def _random_unit(n, t, d, dtype, device, gen):
    v = torch.randn(n, t, d, dtype=dtype, device=device, generator=gen)
    return v / v.norm(dim=2, keepdim=True)


def mean_curvature(
    model: Callable,
    x: Tensor,
    *,
    classes=None,
    labels: Tensor | None = None,
    n_dirs: int = 20,
    h=None,
    h_rel: float = DEFAULT_H_REL,
    scheme: str = "central",
    estimator: str = "both",
    seed: int | None = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> MeanCurvature:
    """Mean curvature of the boundary of F_i = f_i - f_ref at x, for each other class i.

    Sign: positive when the boundary bends towards class i, i.e. away from the reference class
    (module docstring). Both estimators use T = ``n_dirs`` seeded random directions per sample:

    * 'hutchinson': v uniform on the unit sphere of each class's tangent space,
      mean_t v_t^T S_i v_t, the quadratic forms from second differences of F_i along v_t
      (2 T J forward rows per sample with 'central');
    * 'trace': the trace form with tr(H_i) = D E_u[u^T H_i u] (u uniform on the unit sphere,
      shared by all classes: one set of 2 T forward rows gives every class) and grad F_i^T H_i
      grad F_i from second differences along the normal (2 J rows per sample). Much cheaper for
      many classes; same expectation.

    Args:
        model: callable (N, *shape) -> (N, L) logits (left unchanged).
        x: (N, *shape) inputs.
        classes: None (all classes but ref), a list of class indices, or an (N, J) int64 tensor.
        labels: (N,) int64 reference classes; None: the predicted labels.
        n_dirs: T >= 1 random directions per sample.
        h, h_rel: finite-difference step (input units); scheme: 'central', 'forward' or 'exact'.
        estimator: 'hutchinson', 'trace' or 'both'.
        seed: seeds the directions (same seed -> same numbers).
        batch_size: rows per model call.
    Returns:
        :class:`MeanCurvature` (curvatures in 1 / input units).
    """
    _check_model(model)
    x = _check_x(x)
    scheme = _check_scheme(scheme)
    n_dirs = _check_positive_int("n_dirs", n_dirs)
    batch_size = _check_positive_int("batch_size", batch_size)
    if estimator not in ("hutchinson", "trace", "both"):
        raise ValueError(f"estimator must be 'hutchinson', 'trace' or 'both', got {estimator!r}")
    n, shape, d = x.shape[0], tuple(x.shape[1:]), x[0].numel()
    hs, cost, flat, gen = _fd_setup(x, d, h, h_rel, seed)
    with model_guard(model):
        logits = _logits_rows(model, flat, shape, batch_size, cost)
        if labels is None:
            ref = logits.argmax(1)
        else:
            if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
                got = getattr(labels, "shape", labels)
                raise ValueError(f"labels must be an int64 tensor of shape ({n},), got {got!r}")
            ref = labels.to(x.device)
            if bool(((ref < 0) | (ref >= logits.shape[1])).any()):
                raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got {ref.unique().tolist()}")
        cls = _resolve_classes(classes, logits, ref)
        j = cls.shape[1]
        u = _random_unit(n, n_dirs, d, x.dtype, x.device, gen)
        # samples per chunk: (sample, class, direction) rows of a chunk stay within ~batch_size
        per = max(1, batch_size // (j * (n_dirs if estimator != "trace" else 1)))
        parts = [
            _mean_curvature_chunk(model, flat[sl], u[sl], logits[sl], cls[sl], ref[sl], hs[sl], shape, scheme,
                                  estimator, batch_size, cost)
            for sl in _chunks(n, per)
        ]
    hut, hut_se, trace, gnorm, values = (torch.cat([p[k] for p in parts]) for k in range(5))
    return MeanCurvature(
        classes=cls,
        reference=ref,
        hutchinson=hut,
        hutchinson_se=hut_se,
        trace=trace,
        grad_norm=gnorm,
        values=values,
        h=hs,
        n_dirs=n_dirs,
        **cost.counts(),
    )


def _mean_curvature_chunk(model, flat, u, logits, cls, ref, hs, shape, scheme, estimator, batch_size, cost):
    """Estimates for one chunk of samples: hutchinson, its se, trace, grad norms, values (each (n, J))."""
    n, d = flat.shape
    j = cls.shape[1]
    rows = flat.unsqueeze(1).expand(n, j, d).reshape(-1, d)
    ci, cr = cls.reshape(-1), ref.repeat_interleave(j)
    values, grads = _grad_rows(model, rows, ci, cr, shape, batch_size, cost)
    gnorm = grads.norm(dim=1)
    safe = gnorm.clamp_min(torch.finfo(flat.dtype).tiny)
    normal = grads / safe.unsqueeze(1)
    nan = torch.full((n, j), float("nan"), dtype=flat.dtype, device=flat.device)
    hut, hut_se, trace = nan, nan, nan
    if estimator in ("hutchinson", "both"):
        hut, hut_se = _hutchinson(model, flat, u, normal, safe, hs, cls, ref, shape, scheme, batch_size, cost, logits)
    if estimator in ("trace", "both"):
        trace = _trace_form(model, flat, u, normal, safe, hs, cls, ref, shape, scheme, batch_size, cost, logits)
    flat_grad = (gnorm == 0).reshape(n, j)  # no level set: NaN, never a number
    hut, hut_se, trace = (t.masked_fill(flat_grad, float("nan")) for t in (hut, hut_se, trace))
    return hut, hut_se, trace, gnorm.reshape(n, j), values.reshape(n, j)


def _pair_quad(q: Tensor, i: Tensor, r: Tensor) -> Tensor:
    """Quadratic forms of F = f_i - f_r from per-logit forms q (R, L)."""
    return _pair_values(q, i, r)


def _hutchinson(model, flat, u, normal, gnorm, hs, cls, ref, shape, scheme, batch_size, cost, logits):
    n, t, d = u.shape
    j = cls.shape[1]
    nrm = normal.reshape(n, j, 1, d)
    w = u.unsqueeze(1) - nrm * (u.unsqueeze(1) * nrm).sum(-1, keepdim=True)  # (N, J, T, D)
    w = w / w.norm(dim=-1, keepdim=True)
    rows = flat.reshape(n, 1, 1, d).expand(n, j, t, d).reshape(-1, d)
    base = logits.reshape(n, 1, 1, -1).expand(n, j, t, logits.shape[1]).reshape(rows.shape[0], -1)
    q = _second_diff_rows(model, rows, w.reshape(-1, d), hs.repeat_interleave(j * t), shape, scheme,
                          batch_size, cost, base_logits=base)
    ci = cls.reshape(n, j, 1).expand(n, j, t).reshape(-1)
    cr = ref.reshape(n, 1, 1).expand(n, j, t).reshape(-1)
    form = (-_pair_quad(q, ci, cr)).reshape(n, j, t) / gnorm.reshape(n, j, 1)
    est = form.mean(2)
    se = form.std(2) / math.sqrt(t) if t > 1 else torch.full_like(est, float("nan"))
    return est, se


def _trace_form(model, flat, u, normal, gnorm, hs, cls, ref, shape, scheme, batch_size, cost, logits):
    n, t, d = u.shape
    j = cls.shape[1]
    rows_u = flat.unsqueeze(1).expand(n, t, d).reshape(-1, d)
    base_u = logits.repeat_interleave(t, 0)
    qu = _second_diff_rows(model, rows_u, u.reshape(-1, d), hs.repeat_interleave(t), shape, scheme,
                           batch_size, cost, base_logits=base_u).reshape(n, t, -1)
    trace_h_all = d * qu.mean(1)  # (N, L): tr(H_{f_l}) estimates
    rows_n = flat.unsqueeze(1).expand(n, j, d).reshape(-1, d)
    base_n = logits.repeat_interleave(j, 0)
    qn = _second_diff_rows(model, rows_n, normal, hs.repeat_interleave(j), shape, scheme, batch_size,
                           cost, base_logits=base_n)
    ci, cr = cls.reshape(-1), ref.repeat_interleave(j)
    nhn = _pair_quad(qn, ci, cr).reshape(n, j)  # n^T H n
    tr = trace_h_all.gather(1, cls) - trace_h_all.gather(1, ref.unsqueeze(1))
    g = gnorm.reshape(n, j)
    # (g^T H g - tr H |g|^2) / ((D-1) |g|^3) = (n^T H n - tr H) / ((D-1) |g|)
    return (nhn - tr) / ((d - 1) * g)


# --------------------------------------------------------------------------- shared directions


@dataclass
class SharedDirections(_Result):
    """Directions of high curvature shared across samples.

    Attributes:
        directions: (m, *shape) orthonormal shared directions u_1..u_m (most shared first).
        singular_values: (m,) of the stacked principal-direction matrix.
        curvatures: the :class:`PrincipalCurvatures` they were computed from.
    """

    directions: Tensor
    singular_values: Tensor
    curvatures: PrincipalCurvatures

    def basis(self) -> Tensor:
        """(D, m) matrix with the directions as orthonormal columns."""
        return self.directions.reshape(self.directions.shape[0], -1).T


def shared_curved_directions(model: Callable, xs: Tensor, m: int, *, k: int = 5, **kwargs) -> SharedDirections:
    """The m directions most shared by the high-curvature principal directions of many samples.

    For each sample the k principal directions of largest |curvature| (from both ends of the
    spectrum, by :func:`principal_curvatures` with ``kwargs``) are stacked into a (N k, D)
    matrix; its top-m right singular vectors are the shared directions.

    Args:
        model, xs: as :func:`principal_curvatures` (N samples, N k >= m).
        m: number of shared directions (1 <= m <= min(N k, D)).
        k: principal directions per sample.
    Returns:
        :class:`SharedDirections`.
    """
    m = _check_positive_int("m", m)
    pc = principal_curvatures(model, xs, k=k, **kwargs)
    n, d = xs.shape[0], xs[0].numel()
    vals = torch.cat([pc.largest, pc.smallest], 1)
    dirs = torch.cat([pc.largest_dirs.reshape(n, k, d), pc.smallest_dirs.reshape(n, k, d)], 1)
    order = vals.abs().nan_to_num(-1.0).argsort(1, descending=True)[:, :k]
    top = dirs.gather(1, order.unsqueeze(2).expand(n, k, d))[pc.valid].reshape(-1, d)
    if m > min(top.shape[0], d):
        raise ValueError(f"m must be <= min(N_valid * k, D) = {min(top.shape[0], d)}, got {m}")
    _, s, vh = torch.linalg.svd(top, full_matrices=False)
    return SharedDirections(directions=vh[:m].reshape(m, *xs.shape[1:]), singular_values=s[:m], curvatures=pc)


def _check_basis(u: Tensor, d: int, dtype, device) -> Tensor:
    """(D, m) orthonormal columns from (D, m), (m, *shape) or SharedDirections."""
    if isinstance(u, SharedDirections):
        u = u.basis()
    if not isinstance(u, Tensor):
        raise TypeError(f"U must be a tensor or SharedDirections, got {type(u).__name__}")
    if u.dim() == 2 and u.shape[0] == d:
        b = u
    elif u.shape[0] >= 1 and u[0].numel() == d:
        b = u.reshape(u.shape[0], d).T
    else:
        raise ValueError(f"U must have shape (D, m) = ({d}, m) or (m, *shape), got {tuple(u.shape)}")
    b = b.to(dtype=dtype, device=device)
    check_finite("U", b)
    gram = b.T @ b
    err = (gram - torch.eye(b.shape[1], dtype=dtype, device=device)).abs().max()
    if float(err) > 1e-4:
        raise ValueError(f"U must have orthonormal columns (max |U^T U - I| = {float(err):.2e})")
    return b


@dataclass
class RelativeCurvature(_Result):
    """rho_i = |u_i^T S u_i| / E_v |v^T S v| per sample (N, m); mean over samples (m,)."""

    rho: Tensor
    mean: Tensor
    directional: Tensor
    random_mean_abs: Tensor
    n_forward: int = 0
    n_backward: int = 0


def relative_curvature(
    model: Callable,
    xs: Tensor,
    U,
    *,
    pair=None,
    n_dirs: int = 20,
    h=None,
    h_rel: float = DEFAULT_H_REL,
    scheme: str = "central",
    seed: int | None = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> RelativeCurvature:
    """How curved the boundary is along given directions relative to random tangent directions.

    rho_i(x) = |u_i^T S u_i| / E_v |v^T S v|, S the shape operator of F = f_i - f_j (``pair``,
    default (runner-up, predicted)) at x, v uniform unit tangent vectors (``n_dirs`` of them);
    u_i is used as given (its normal component does not count: S = -P H P / ||grad F||).

    Args:
        xs: (N, *shape); U: (D, m) orthonormal columns, (m, *shape) rows, or SharedDirections.
    Returns:
        :class:`RelativeCurvature` with rho (N, m), its sample mean (m,), the directional
        curvatures u_i^T S u_i (N, m) and E_v |v^T S v| (N,).
    """
    _check_model(model)
    xs = _check_x(xs, "xs")
    scheme = _check_scheme(scheme)
    n_dirs = _check_positive_int("n_dirs", n_dirs)
    n, shape, d = xs.shape[0], tuple(xs.shape[1:]), xs[0].numel()
    basis = _check_basis(U, d, xs.dtype, xs.device)
    m = basis.shape[1]
    hs, cost, flat, gen = _fd_setup(xs, d, h, h_rel, seed)
    with model_guard(model):
        logits = _logits_rows(model, flat, shape, batch_size, cost)
        pi, pj = _resolve_pair(pair, logits)
        _, g = _grad_rows(model, flat, pi, pj, shape, batch_size, cost)
        gnorm = g.norm(dim=1).clamp_min(torch.finfo(xs.dtype).tiny)
        normal = g / gnorm.unsqueeze(1)
        v = _project(_random_unit(n, n_dirs, d, xs.dtype, xs.device, gen), normal)
        v = v / v.norm(dim=2, keepdim=True)
        pu = _project(basis.T.unsqueeze(0).expand(n, m, d), normal)  # (N, m, D)
        pun = pu.norm(dim=2)
        dirs = torch.cat([pu / pun.clamp_min(1e-30).unsqueeze(2), v], 1)  # (N, m + T, D)
        r = m + n_dirs
        rows = flat.unsqueeze(1).expand(n, r, d).reshape(-1, d)
        q = _second_diff_rows(model, rows, dirs.reshape(-1, d), hs.repeat_interleave(r), shape, scheme,
                              batch_size, cost, base_logits=logits.repeat_interleave(r, 0))
        form = (-_pair_quad(q, pi.repeat_interleave(r), pj.repeat_interleave(r))).reshape(n, r) / gnorm.unsqueeze(1)
    directional = form[:, :m] * pun**2
    rand = form[:, m:].abs().mean(1)
    rho = directional.abs() / rand.unsqueeze(1)
    return RelativeCurvature(rho=rho, mean=rho.mean(0), directional=directional, random_mean_abs=rand,
                             **cost.counts())


def subspace_fraction(v: Tensor, U) -> Tensor:
    """||P_S v|| / ||v|| per row, S = span(U): v (N, *shape), U (D, m) or (m, *shape). (N,)."""
    if not isinstance(v, Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    check_finite("v", v)
    n, d = v.shape[0], v[0].numel()
    basis = _check_basis(U, d, v.dtype, v.device)
    flat = v.reshape(n, d)
    norm = flat.norm(dim=1)
    if bool((norm == 0).any()):
        raise ValueError(f"v has {int((norm == 0).sum())} zero rows: the fraction is undefined")
    return (flat @ basis).norm(dim=1) / norm


def noise_accuracy(
    model: Callable,
    x: Tensor,
    labels: Tensor,
    U,
    *,
    norm: float,
    n_draws: int = 10,
    seed: int | None = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict:
    """Accuracy under random Gaussian noise of L2 norm ``norm`` inside span(U) vs its complement.

    Args:
        x: (N, *shape), labels: (N,) int64, U: (D, m) orthonormal columns or (m, *shape).
        norm: > 0, the L2 norm of every noise draw; n_draws: draws per sample and space.
    Returns:
        dict: accuracy_clean, accuracy_subspace, accuracy_complement (fractions over N n_draws).
    """
    _check_model(model)
    x = _check_x(x)
    n_draws = _check_positive_int("n_draws", n_draws)
    if not (isinstance(norm, (int, float)) and math.isfinite(norm) and norm > 0):
        raise ValueError(f"norm must be a positive finite float, got {norm!r}")
    n, shape, d = x.shape[0], tuple(x.shape[1:]), x[0].numel()
    if not isinstance(labels, Tensor) or tuple(labels.shape) != (n,):
        raise ValueError(f"labels must be a tensor of shape ({n},), got {getattr(labels, 'shape', labels)!r}")
    basis = _check_basis(U, d, x.dtype, x.device)
    gen = make_generator(seed, x.device)
    cost = _Cost()
    flat = x.reshape(n, d)
    g = torch.randn(2, n, n_draws, d, dtype=x.dtype, device=x.device, generator=gen)
    inside = (g[0] @ basis) @ basis.T
    outside = g[1] - (g[1] @ basis) @ basis.T
    noise = torch.stack([inside, outside])
    noise = norm * noise / noise.norm(dim=-1, keepdim=True)
    rows = (flat.reshape(1, n, 1, d) + noise).reshape(-1, d)
    lab = labels.to(x.device)
    with model_guard(model):
        clean = _logits_rows(model, flat, shape, batch_size, cost).argmax(1)
        pred = _logits_rows(model, rows, shape, batch_size, cost).argmax(1).reshape(2, n, n_draws)
    hit = pred == lab.reshape(1, n, 1)
    return {
        "accuracy_clean": float((clean == lab).double().mean()),
        "accuracy_subspace": float(hit[0].double().mean()),
        "accuracy_complement": float(hit[1].double().mean()),
    }


# --------------------------------------------------------------------------- CLI


def register_cli(subparsers) -> None:
    """Add ``pyboundary curvature``: principal and mean curvature statistics of a model on data."""
    from .cli import positive_int

    p = subparsers.add_parser(
        "curvature",
        help="principal and mean curvature of the decision boundaries at test inputs",
        description="For N test inputs: the k largest / smallest principal curvatures of the boundary "
                    "with the runner-up class (batched Lanczos on the shape operator) and the mean "
                    "curvature of the boundaries with every other class (trace form); prints median, "
                    "5-95 % range and mean of each, and writes curvature_profile.png (sorted principal "
                    "curvatures averaged over --profile-samples inputs, dense Hessian) and "
                    "curvature.json to --out. Curvatures in 1 / input units; sign convention in "
                    "pyboundary.curvature (positive: bends away from the predicted class).",
    )
    p.add_argument("--model", required=True, help="model spec (pyboundary.models.load_model), e.g. lenet-smooth-fmnist")
    p.add_argument("--data", required=True, help="dataset name or folder (pyboundary.data.load_dataset)")
    p.add_argument("--split", default="test", help="dataset split (default test)")
    p.add_argument("--n", type=positive_int, default=50, help="number of inputs (seeded subset; default 50)")
    p.add_argument("--out", default=None, help="folder for curvature_profile.png and curvature.json")
    p.add_argument("--k", type=positive_int, default=5, help="principal curvatures at each end (default 5)")
    p.add_argument("--n-dirs", type=positive_int, default=20,
                   help="random directions of the mean curvature (default 20)")
    p.add_argument("--h-rel", type=float, default=DEFAULT_H_REL,
                   help=f"finite-difference step relative to ||x||_2 (default {DEFAULT_H_REL})")
    p.add_argument("--scheme", choices=_SCHEMES, default="central", help="derivatives (default central)")
    p.add_argument("--at", choices=("input", "boundary"), default="input",
                   help="evaluate at the input or at its DeepFool boundary point (default input)")
    p.add_argument("--profile-samples", type=int, default=4,
                   help="inputs averaged in the profile plot (dense, D <= 4096; 0 = no plot)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and the random directions")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="rows per model call")
    p.set_defaults(func=_cli_curvature)


def _cli_curvature(args) -> int:
    from .data import load_dataset
    from .models import load_model

    if args.profile_samples < 0:
        raise ValueError(f"--profile-samples must be >= 0, got {args.profile_samples}")
    finite_difference_step(torch.zeros(1, 2), None, args.h_rel)  # validates --h-rel before any work
    model = load_model(args.model)
    x = load_dataset(args.data, args.split, limit=args.n, seed=args.seed).x
    report = _curvature_report(model, x, k=args.k, n_dirs=args.n_dirs, h_rel=args.h_rel, scheme=args.scheme,
                              at=args.at, profile_samples=args.profile_samples, seed=args.seed,
                              batch_size=args.batch_size)
    report["model"], report["data"] = args.model, args.data
    print(f"pyboundary curvature: model {args.model}, data {args.data} ({x.shape[0]} inputs, at={args.at}, "
          f"h_rel={args.h_rel}, scheme={args.scheme})")
    print(_format_report(report))
    if args.out:
        paths = _save_report(report, args.out)
        print("wrote " + ", ".join(str(q) for q in paths))
    return 0


def _curvature_report(model: Callable, x: Tensor, *, k: int = 5, n_dirs: int = 20, h_rel: float = DEFAULT_H_REL,
                      scheme: str = "central", at: str = "input", profile_samples: int = 4, seed: int = 0,
                      batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """Curvature statistics of ``model`` at inputs x (N, *shape), as used by ``pyboundary curvature``.

    Returns a dict: ``largest`` / ``smallest`` / ``mean_runner_up`` / ``mean_all`` are
    :func:`pyboundary.stats.summarize` dicts (1 / input units) of, per input, the largest and the
    smallest principal curvature of the boundary with the runner-up class (Lanczos), the mean
    curvature of that boundary and the mean over all other classes (trace form, always at x, also
    with at='boundary'); ``profile`` the
    ascending principal curvatures of the runner-up boundary averaged over the first
    ``profile_samples`` inputs (dense; None when 0 or D > 4096); ``forward_per_input`` and
    ``backward_per_input`` the model rows spent per input.
    """
    from .stats import summarize

    x = _check_x(x)
    n, d = x.shape[0], x[0].numel()
    pc = principal_curvatures(model, x, k=min(k, d - 1), at=at, h_rel=h_rel, scheme=scheme, seed=seed,
                              batch_size=batch_size)
    mc = mean_curvature(model, x, n_dirs=n_dirs, h_rel=h_rel, scheme=scheme, estimator="trace", seed=seed,
                        batch_size=batch_size)
    runner = mc.values.argmax(1, keepdim=True)  # largest F_i = f_i - f_pred: the runner-up class
    fw, bw = pc.n_forward + mc.n_forward, pc.n_backward + mc.n_backward
    profile = None
    m = min(max(profile_samples, 0), n)
    if m > 0 and d <= 4096:
        dense = principal_curvatures(model, x[:m], k=1, at=at, h_rel=h_rel, scheme=scheme, method="dense",
                                     batch_size=batch_size)
        profile = np.nanmean(dense.spectrum.detach().cpu().double().numpy(), 0)
        fw, bw = fw + dense.n_forward, bw + dense.n_backward
    valid = pc.valid.cpu().numpy()
    return {
        "n": n, "k": int(pc.largest.shape[1]), "at": at, "h_rel": h_rel, "scheme": scheme, "n_dirs": n_dirs,
        "largest": summarize(pc.largest[:, 0].double().cpu().numpy(), valid),
        "smallest": summarize(pc.smallest[:, 0].double().cpu().numpy(), valid),
        "mean_runner_up": summarize(mc.trace.gather(1, runner).squeeze(1).double().cpu().numpy()),
        "mean_all": summarize(mc.trace.mean(1).double().cpu().numpy()),
        "profile": profile,
        "profile_samples": m if profile is not None else 0,
        "forward_per_input": fw / n,
        "backward_per_input": bw / n,
    }


def _format_report(report: dict) -> str:
    names = (("largest", "largest principal curvature (runner-up boundary)"),
             ("smallest", "smallest principal curvature (runner-up boundary)"),
             ("mean_runner_up", "mean curvature (runner-up boundary)"),
             ("mean_all", "mean curvature (mean over other classes)"))
    lines = [f"{'statistic':<52} {'median':>11} {'p5':>11} {'p95':>11} {'mean':>11} {'se':>10} {'n':>5}"]
    for key, label in names:
        s = report[key]
        lines.append(f"{label:<52} {s['median']:>11.4g} {s['p5']:>11.4g} {s['p95']:>11.4g} {s['mean']:>11.4g} "
                     f"{s['se']:>10.3g} {s['n_converged']:>5d}")
    lines.append(f"cost: {report['forward_per_input']:.1f} forward + {report['backward_per_input']:.1f} "
                 "backward rows per input")
    return "\n".join(lines)


def _save_report(report: dict, out) -> list:
    """Write curvature.json and (if a profile was computed) curvature_profile.png to ``out``."""
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    profile = report["profile"]
    if profile is not None:
        from .plot import _pyplot

        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(np.arange(profile.size), profile)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("principal curvature index (sorted)")
        ax.set_ylabel("curvature (1 / input units)")
        ax.set_title(f"Curvature profile, runner-up boundary, mean of {report['profile_samples']} inputs")
        fig.tight_layout()
        fig.savefig(out / "curvature_profile.png", dpi=110)
        plt.close(fig)
        paths.append(out / "curvature_profile.png")
    blob = dict(report, profile=None if profile is None else [float(v) for v in profile])
    with open(out / "curvature.json", "w") as fh:
        json.dump(blob, fh, indent=2)
    paths.append(out / "curvature.json")
    return paths

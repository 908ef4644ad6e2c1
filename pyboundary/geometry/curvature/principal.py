"""Principal curvatures of a pairwise boundary: batched Lanczos (or a dense Hessian) on the shape
operator S = -P H P / ||grad F|| restricted to the tangent space."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..._utils.batching import chunks
from ..._utils.model import model_guard
from ..._utils.results import Result
from ..._utils.rng import make_generator
from ..._utils.validation import check_choice, check_int, check_model
from ...attacks.deepfool import deepfool
from .hvp import (
    curvature_batch_size,
    DEFAULT_H_REL,
    SCHEMES,
    RowCost,
    _grad_rows,
    _hvp_rows,
    _project,
    _resolve_pair,
    check_curvature_inputs,
    finite_difference_step,
    logits_rows,
)

__all__ = ["PrincipalCurvatures", "principal_curvatures"]


@dataclass
class PrincipalCurvatures(Result):
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
        method, scheme, at: how it was computed (the arguments of the call).
        n_forward, n_backward: int, input rows sent forward / backward through the model (a row
            of a reverse pass counts once per reverse pass; the boundary search's DeepFool calls
            with at='boundary' are not included).
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


def _curvatures(model, flat, hs, pi, pj, shape, scheme, batch_size, cost, method, n_iter, k, v0, gen):
    """Principal curvatures of one chunk of n points flat (n, D) for the pairs (pi, pj) (n,) each:
    (largest (n, k), smallest (n, k), their directions (n, k, D) each, gradient norms (n,), full
    spectrum (n, D - 1) for method 'dense' else None). v0: (n, D) Lanczos start vectors (before
    projection) or None (dense); gen: generator for fresh vectors after a Lanczos breakdown."""
    n, d = flat.shape
    _, g0 = _grad_rows(model, flat, pi, pj, shape, batch_size, cost)
    gnorm = g0.norm(dim=1)
    normal = g0 / gnorm.clamp_min(torch.finfo(flat.dtype).tiny).unsqueeze(1)
    normal = torch.where((gnorm > 0).unsqueeze(1), normal, _unit_e1(n, d, flat))
    # a zero gradient has no level set: S = 0 there (flagged invalid, reported as NaN)
    safe = torch.where(gnorm > 0, gnorm, torch.full_like(gnorm, math.inf))
    op = _ShapeOperator(model, flat, hs, pi, pj, shape, scheme, batch_size, cost, normal, safe,
                        g0 if scheme == "forward" else None)
    spectrum = None
    if method == "dense":
        vals, vecs = _dense_shape_spectrum(op, normal, n, d)
        spectrum = vals
    else:
        alpha, beta, basis = _lanczos(op, op.project(v0), n_iter, gen)
        tri = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
        vals, y = torch.linalg.eigh(tri)
        # only the 2 k Ritz vectors reported, not all n_iter
        y = torch.cat([y[:, :, :k], y[:, :, -k:]], 2)
        vecs = torch.einsum("nmd,nmr->nrd", basis, y)  # (n, 2 k, D) ascending
    largest = vals.flip(1)[:, :k]
    smallest = vals[:, :k]
    ldirs = vecs.flip(1)[:, :k]
    sdirs = vecs[:, :k]
    return largest, smallest, ldirs, sdirs, gnorm, spectrum


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
    batch_size: int | None = None,
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
            found by :func:`pyboundary.attacks.deepfool.deepfool` with no overshoot; samples where it fails are
            flagged ``valid = False`` and hold NaN).
        h, h_rel: finite-difference step (input units); see :func:`finite_difference_step`.
        method: 'lanczos' (batched Lanczos with ``n_iter`` matrix-vector products, default
            min(D - 1, max(4 k, 40)); extreme curvatures converge first) or 'dense' (the full
            finite-difference Hessian, 2 D gradient rows per sample with 'central', symmetrised;
            returns the whole spectrum; D <= 4096).
        scheme: 'central', 'forward' or 'exact' (see module docstring).
        n_iter: Lanczos steps (matrix-vector products) per sample, in [k, D - 1]; None (default):
            min(D - 1, max(4 k, 40)). Unused with method='dense'.
        seed: seeds the Lanczos start vectors.
        batch_size: input rows per model call (None: automatic).
        deepfool_kwargs: extra arguments for the boundary search (at='boundary').
    Returns:
        :class:`PrincipalCurvatures`.
    """
    check_model(model)
    x = check_curvature_inputs(x)
    scheme = check_choice("scheme", scheme, SCHEMES)
    batch_size = curvature_batch_size(model, x, batch_size, scheme)
    n, shape, d = x.shape[0], tuple(x.shape[1:]), x[0].numel()
    k = check_int("k", k, minimum=1)
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
    n_iter = check_int("n_iter", n_iter, minimum=1)
    if n_iter < k or n_iter > d - 1:
        raise ValueError(f"n_iter must be in [k, D - 1] = [{k}, {d - 1}], got {n_iter}")
    hs = finite_difference_step(x, h, h_rel)
    cost = RowCost()
    with model_guard(model):
        valid = torch.ones(n, dtype=torch.bool, device=x.device)
        if at == "boundary":
            points, valid, adv, orig = _boundary_points(model, x, batch_size, deepfool_kwargs)
            logits = logits_rows(model, points.reshape(n, d), shape, batch_size, cost)
            if pair is None:
                n_classes = logits.shape[1]
                bad = ~valid | (adv == orig) | (adv < 0) | (adv >= n_classes)
                valid = valid & ~bad
                pi, pj = torch.where(bad, (orig + 1) % n_classes, adv), orig
            else:
                pi, pj = _resolve_pair(pair, logits)
        else:
            points = x
            logits = logits_rows(model, x.reshape(n, d), shape, batch_size, cost)
            pi, pj = _resolve_pair(pair, logits)
        flat = points.reshape(n, d)
        gen = make_generator(seed, x.device)
        # drawn for all samples at once, so the start vectors do not depend on the chunks
        v0 = torch.randn(n, d, dtype=x.dtype, device=x.device, generator=gen) if method == "lanczos" else None
        # samples per chunk: one matrix-vector product is ~batch_size rows ('central': 2 per sample),
        # and the chunk's Lanczos vectors (n_iter per sample) are all that is held
        parts = [
            _curvatures(model, flat[sl], hs[sl], pi[sl], pj[sl], shape, scheme, batch_size, cost, method, n_iter,
                        k, None if v0 is None else v0[sl], gen)
            for sl in chunks(n, max(1, batch_size // 2))
        ]
    largest, smallest, ldirs, sdirs, gnorm = (torch.cat([q[i] for q in parts]) for i in range(5))
    spectrum = torch.cat([q[5] for q in parts]) if method == "dense" else None
    valid = valid & (gnorm > 0)
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
    for sl in chunks(n, max(1, batch_size // d)):
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

"""Curvature along given directions relative to random tangent directions, and the subspace studies
built on it (fraction of a vector inside a subspace, accuracy under noise inside / outside it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..._utils.batching import chunks
from ..._utils.model import forward_batch_size, model_guard
from ..._utils.results import Result
from ..._utils.rng import make_generator, per_sample_randn, random_unit_vectors
from ..._utils.validation import (
    check_choice,
    check_finite,
    check_int,
    check_labels,
    check_model,
    check_number,
)
from .hvp import (
    curvature_batch_size,
    DEFAULT_H_REL,
    SCHEMES,
    RowCost,
    _fd_setup,
    _grad_rows,
    _pair_values,
    _project,
    _resolve_pair,
    _second_diff_rows,
    check_curvature_inputs,
    logits_rows,
)
from .shared import SharedDirections

__all__ = ["RelativeCurvature", "relative_curvature", "subspace_fraction", "NoiseAccuracy", "noise_accuracy"]


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
class RelativeCurvature(Result):
    """rho_i = |u_i^T S u_i| / E_v |v^T S v| per sample (N, m); mean over samples (m,).

    Attributes:
        rho: (N, m) relative curvature |u_i^T S u_i| / E_v |v^T S v| of each direction u_i per
            sample (dimensionless; dtype of the inputs).
        mean: (m,) rho averaged over the N samples, per direction.
        directional: (N, m) u_i^T S u_i, the curvature along u_i scaled by ||P u_i||^2 (P the
            projection on the tangent space), in 1 / input units.
        random_mean_abs: (N,) E_v |v^T S v| per sample, estimated as the mean over the ``n_dirs``
            random unit tangent directions v (1 / input units): the denominator of rho.
        n_forward, n_backward: int, input rows sent forward / backward through the model.
    """

    rho: Tensor
    mean: Tensor
    directional: Tensor
    random_mean_abs: Tensor
    n_forward: int = 0
    n_backward: int = 0

    def summary(self) -> dict:
        n = max(int(self.rho.shape[0]), 1)
        return {
            "n": int(self.rho.shape[0]),
            "m": int(self.rho.shape[1]),
            "mean_rho": [float(v) for v in self.mean],
            "forward_per_sample": self.n_forward / n,
            "backward_per_sample": self.n_backward / n,
        }


@dataclass
class NoiseAccuracy(Result):
    """Accuracy under random Gaussian noise of a fixed L2 norm inside span(U) and in its complement.

    Attributes:
        clean, subspace, complement: accuracies (fractions) on the clean inputs and under noise
            inside the subspace / inside its orthogonal complement (over N x n_draws draws).
        radius: the L2 norm of every noise draw (input units).
        n_draws: draws per sample and space.
    """

    clean: float
    subspace: float
    complement: float
    radius: float
    n_draws: int

    def summary(self) -> dict:
        return {"accuracy_clean": self.clean, "accuracy_subspace": self.subspace,
                "accuracy_complement": self.complement, "radius": self.radius, "n_draws": self.n_draws}


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
    batch_size: int | None = None,
) -> RelativeCurvature:
    """How curved the boundary is along given directions relative to random tangent directions.

    rho_i(x) = |u_i^T S u_i| / E_v |v^T S v|, S the shape operator of F = f_i - f_j (``pair``,
    default (runner-up, predicted)) at x, v uniform unit tangent vectors (``n_dirs`` of them);
    u_i is used as given (its normal component does not count: S = -P H P / ||grad F||).

    Args:
        model: callable (N, *shape) -> (N, L) logits (left unchanged).
        xs: (N, *shape) inputs, at least 2 features each.
        U: the m directions u_i: (D, m) orthonormal columns, (m, *shape) orthonormal rows, or a
            :class:`SharedDirections` (its ``basis()``); D = prod(shape).
        pair: (i, j) ints or an (N, 2) int64 tensor for F = f_i - f_j; None (default): per sample
            (runner-up, predicted class).
        n_dirs: number T >= 1 of random unit tangent directions v per sample for E_v |v^T S v|
            (default 20).
        h: finite-difference step in input units, a float or an (N,) tensor; None (default):
            ``h_rel * ||x_n||_2`` per sample (see :func:`finite_difference_step`).
        h_rel: the step relative to ||x_n||_2 when ``h`` is None (default
            :data:`DEFAULT_H_REL` = 0.05).
        scheme: second differences 'central' (default, error O(h^2)), 'forward' (O(h)) or
            'exact' (reverse-mode second derivatives; ``h`` unused).
        seed: seeds the random tangent directions (default 0; None: torch's global generator,
            not reproducible).
        batch_size: input rows per model call (None: automatic, the largest that fits the memory
            budget, at most 256; see :func:`curvature_batch_size`); each sample's m + T
            directions are stacked into rows of one call.
    Returns:
        :class:`RelativeCurvature` with rho (N, m), its sample mean (m,), the directional
        curvatures u_i^T S u_i (N, m) and E_v |v^T S v| (N,).
    """
    check_model(model)
    xs = check_curvature_inputs(xs, "xs")
    scheme = check_choice("scheme", scheme, SCHEMES)
    n_dirs = check_int("n_dirs", n_dirs, minimum=1)
    n, shape, d = xs.shape[0], tuple(xs.shape[1:]), xs[0].numel()
    basis = _check_basis(U, d, xs.dtype, xs.device)
    batch_size = curvature_batch_size(model, xs, batch_size, scheme)
    m = basis.shape[1]
    hs, cost, flat, gen = _fd_setup(xs, d, h, h_rel, seed)
    with model_guard(model):
        logits = logits_rows(model, flat, shape, batch_size, cost)
        pi, pj = _resolve_pair(pair, logits)
        r = m + n_dirs
        # samples per chunk: their (m + T) directions each are ~batch_size rows
        parts = [_directional_forms(model, flat[sl], logits[sl], pi[sl], pj[sl], hs[sl], basis, n_dirs, shape,
                                    scheme, batch_size, cost, gen) for sl in chunks(n, max(1, batch_size // r))]
    form, pun = (torch.cat([q[i] for q in parts]) for i in range(2))
    directional = form[:, :m] * pun**2
    rand = form[:, m:].abs().mean(1)
    rho = directional.abs() / rand.unsqueeze(1)
    return RelativeCurvature(rho=rho, mean=rho.mean(0), directional=directional, random_mean_abs=rand,
                             **cost.counts())


def _directional_forms(model, flat, logits, pi, pj, hs, basis, n_dirs, shape, scheme, batch_size, cost, gen):
    """For samples flat (n, D): w^T S w (n, m + T) along the tangent parts of the basis columns
    (normalised; m = basis.shape[1]) and along T random unit tangent directions, and the norms
    (n, m) of those tangent parts."""
    n, d = flat.shape
    m = basis.shape[1]
    _, g = _grad_rows(model, flat, pi, pj, shape, batch_size, cost)
    gnorm = g.norm(dim=1).clamp_min(torch.finfo(flat.dtype).tiny)
    normal = g / gnorm.unsqueeze(1)
    v = _project(random_unit_vectors(n, n_dirs, d, generator=gen, dtype=flat.dtype, device=flat.device), normal)
    v = v / v.norm(dim=2, keepdim=True)
    pu = _project(basis.T.unsqueeze(0).expand(n, m, d), normal)  # (n, m, D)
    pun = pu.norm(dim=2)
    dirs = torch.cat([pu / pun.clamp_min(1e-30).unsqueeze(2), v], 1)  # (n, m + T, D)
    r = m + n_dirs
    rows = flat.unsqueeze(1).expand(n, r, d).reshape(-1, d)
    q = _second_diff_rows(model, rows, dirs.reshape(-1, d), hs.repeat_interleave(r), shape, scheme,
                          batch_size, cost, base_logits=logits.repeat_interleave(r, 0))
    form = (-_pair_values(q, pi.repeat_interleave(r), pj.repeat_interleave(r))).reshape(n, r) / gnorm.unsqueeze(1)
    return form, pun


def subspace_fraction(v: Tensor, U) -> Tensor:
    """||P_S v|| / ||v|| per row, S = span(U).

    Args:
        v: (N, *shape) vectors, finite, no zero row.
        U: (D, m) orthonormal columns, (m, *shape) orthonormal rows, or :class:`SharedDirections`;
            D = prod(shape).
    Returns:
        (N,) Tensor of fractions in [0, 1], dtype of v (a plain tensor, not a result class).
    """
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


def _noisy_hits(model, flat, labels, basis, radius, n_draws, shape, batch_size, cost, gen) -> Tensor:
    """(2, n, n_draws) bool: whether copies of the samples flat (n, D) with Gaussian noise of norm
    radius inside span(basis) (row 0) and inside its complement (row 1) keep their labels (n,).
    The noise is drawn per sample (2, n_draws, D each), so chunks draw the numbers of one draw."""
    n, d = flat.shape
    g = per_sample_randn(n, (2, n_draws, d), generator=gen, dtype=flat.dtype, device=flat.device).transpose(0, 1)
    inside = (g[0] @ basis) @ basis.T
    outside = g[1] - (g[1] @ basis) @ basis.T
    noise = torch.stack([inside, outside])
    noise = radius * noise / noise.norm(dim=-1, keepdim=True)
    rows = (flat.reshape(1, n, 1, d) + noise).reshape(-1, d)
    pred = logits_rows(model, rows, shape, batch_size, cost).argmax(1).reshape(2, n, n_draws)
    return pred == labels.reshape(1, n, 1)


def noise_accuracy(
    model: Callable,
    x: Tensor,
    labels: Tensor,
    U,
    *,
    radius: float,
    n_draws: int = 10,
    seed: int | None = 0,
    batch_size: int | None = None,
) -> NoiseAccuracy:
    """Accuracy under random Gaussian noise of L2 norm ``radius`` inside span(U) vs its complement.

    Args:
        model: callable (N, *shape) -> (N, L) logits (left unchanged).
        x: (N, *shape) inputs, at least 2 features each.
        labels: (N,) int64 true classes the accuracies are measured against.
        U: (D, m) orthonormal columns, (m, *shape) orthonormal rows, or :class:`SharedDirections`;
            D = prod(shape).
        radius: > 0, the L2 norm of every noise draw (input units).
        n_draws: noise draws per sample and per space (>= 1, default 10).
        seed: seeds the Gaussian noise, drawn per sample so that the numbers do not depend on
            the batching (default 0; None: torch's global generator, not reproducible).
        batch_size: input rows per model call (None: automatic).
    Returns:
        :class:`NoiseAccuracy`.
    """
    check_model(model)
    x = check_curvature_inputs(x)
    n_draws = check_int("n_draws", n_draws, minimum=1)
    radius = check_number("radius", radius, minimum=0, strict_minimum=True)
    n, shape, d = x.shape[0], tuple(x.shape[1:]), x[0].numel()
    lab = check_labels(labels, n, device=x.device)
    basis = _check_basis(U, d, x.dtype, x.device)
    batch_size = forward_batch_size(model, x, batch_size)
    gen = make_generator(seed, x.device)
    cost = RowCost()
    flat = x.reshape(n, d)
    with model_guard(model):
        clean = logits_rows(model, flat, shape, batch_size, cost).argmax(1)
        # samples per chunk: their 2 n_draws noisy copies are ~batch_size rows
        hit = torch.cat([_noisy_hits(model, flat[sl], lab[sl], basis, radius, n_draws, shape, batch_size, cost, gen)
                         for sl in chunks(n, max(1, batch_size // (2 * n_draws)))], 1)
    return NoiseAccuracy(clean=float((clean == lab).double().mean()), subspace=float(hit[0].double().mean()),
                         complement=float(hit[1].double().mean()), radius=radius, n_draws=n_draws)

"""Mean curvature of the boundaries between a reference class and the others (Hutchinson and trace
form estimators)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..._utils.batching import chunks
from ..._utils.model import model_guard
from ..._utils.results import Result
from ..._utils.rng import random_unit_vectors
from ..._utils.validation import check_choice, check_int, check_labels, check_model
from .hvp import (
    DEFAULT_H_REL,
    SCHEMES,
    _fd_setup,
    _grad_rows,
    _pair_values,
    _second_diff_rows,
    check_curvature_inputs,
    curvature_batch_size,
    logits_rows,
)

__all__ = ["MeanCurvature", "mean_curvature"]


@dataclass
class MeanCurvature(Result):
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
        h: (N,) finite-difference steps (input units).
        n_dirs: int, T, the random directions per sample.
        n_forward, n_backward: int, input rows sent forward / backward through the model (a row
            of a reverse pass counts once per reverse pass).
        n_classes: L, the number of classes of the model.
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
    n_classes: int = 0

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
    if isinstance(classes, int) and not isinstance(classes, bool):
        if classes < 1:
            raise ValueError(f"classes as a count must be >= 1 (the k most likely other classes), got {classes}")
        # the k other classes with the largest logits, most likely first
        others = logits.scatter(1, ref.unsqueeze(1), float("-inf"))
        return others.topk(min(classes, n_classes - 1), dim=1).indices.contiguous()
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
    batch_size: int | None = None,
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
        classes: None (all classes but ref), an int k (the k other classes with the largest
            logits, most likely first; all when k >= L - 1), a list of class indices, or an (N, J)
            int64 tensor.
        labels: (N,) int64 reference classes; None: the predicted labels.
        n_dirs: T >= 1 random directions per sample.
        h, h_rel: finite-difference step (input units); see :func:`finite_difference_step`.
        scheme: 'central', 'forward' or 'exact' (see the module docstring).
        estimator: 'hutchinson', 'trace' or 'both'.
        seed: seeds the directions (same seed -> same numbers).
        batch_size: input rows per model call (None: automatic).
    Returns:
        :class:`MeanCurvature` (curvatures in 1 / input units).
    """
    check_model(model)
    x = check_curvature_inputs(x)
    scheme = check_choice("scheme", scheme, SCHEMES)
    n_dirs = check_int("n_dirs", n_dirs, minimum=1)
    batch_size = curvature_batch_size(model, x, batch_size, scheme)
    if estimator not in ("hutchinson", "trace", "both"):
        raise ValueError(f"estimator must be 'hutchinson', 'trace' or 'both', got {estimator!r}")
    n, shape, d = x.shape[0], tuple(x.shape[1:]), x[0].numel()
    hs, cost, flat, gen = _fd_setup(x, d, h, h_rel, seed)
    with model_guard(model):
        logits = logits_rows(model, flat, shape, batch_size, cost)
        if labels is None:
            ref = logits.argmax(1)
        else:
            ref = check_labels(labels, n, n_classes=logits.shape[1], device=x.device)
        cls = _resolve_classes(classes, logits, ref)
        # samples per chunk: their T directions each are ~batch_size rows (see _mean_curvature_samples)
        parts = [
            _mean_curvature_samples(model, flat[sl], logits[sl], cls[sl], ref[sl], hs[sl], shape, scheme,
                                    estimator, n_dirs, batch_size, cost, gen)
            for sl in chunks(n, max(1, batch_size // n_dirs))
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
        n_classes=int(logits.shape[1]),
        **cost.counts(),
    )


def _mean_curvature_samples(model, flat, logits, cls, ref, hs, shape, scheme, estimator, n_dirs, batch_size, cost,
                            gen):
    """Estimates for one chunk of n samples (flat (n, D)): hutchinson, its se, trace, grad norms,
    values (each (n, J)).

    Memory stays within a few (batch_size, D) tensors whatever J (999 other classes of an ImageNet
    model): the classes are taken in chunks of ~batch_size (sample, class[, direction]) rows. The
    T directions are drawn per sample (:func:`pyboundary._utils.rng.random_unit_vectors`), so the numbers do not depend on the chunks.
    """
    n, d = flat.shape
    u = random_unit_vectors(n, n_dirs, d, generator=gen, dtype=flat.dtype, device=flat.device)  # (n, T, D)
    trace_h = None
    if estimator in ("trace", "both"):
        trace_h = _hessian_traces(model, flat, u, hs, logits, shape, scheme, batch_size, cost)
    per = max(1, batch_size // (n * (n_dirs if estimator != "trace" else 1)))
    parts = [
        _mean_curvature_classes(model, flat, u, logits, cls[:, sl], ref, hs, trace_h, shape, scheme, estimator,
                                batch_size, cost)
        for sl in chunks(cls.shape[1], per)
    ]
    return tuple(torch.cat([p[k] for p in parts], 1) for k in range(5))


def _mean_curvature_classes(model, flat, u, logits, cls, ref, hs, trace_h, shape, scheme, estimator, batch_size,
                            cost):
    """Estimates of _mean_curvature_samples for the classes cls (n, J) of its samples; trace_h: (n, L)
    Hessian traces of the logits (:func:`_hessian_traces`) or None (no trace form)."""
    n, d = flat.shape
    j = cls.shape[1]
    rows = flat.unsqueeze(1).expand(n, j, d).reshape(-1, d)
    ci, cr = cls.reshape(-1), ref.repeat_interleave(j)
    values, grads = _grad_rows(model, rows, ci, cr, shape, batch_size, cost)
    gnorm = grads.norm(dim=1)
    safe = gnorm.clamp_min(torch.finfo(flat.dtype).tiny)
    normal = grads / safe.unsqueeze(1)
    del grads
    nan = torch.full((n, j), float("nan"), dtype=flat.dtype, device=flat.device)
    hut, hut_se, trace = nan, nan, nan
    if estimator in ("hutchinson", "both"):
        hut, hut_se = _hutchinson(model, flat, u, normal, safe, hs, cls, ref, shape, scheme, batch_size, cost, logits)
    if trace_h is not None:
        trace = _trace_form(model, rows, normal, safe, hs, cls, ref, trace_h, shape, scheme, batch_size, cost, logits)
    flat_grad = (gnorm == 0).reshape(n, j)  # no level set: NaN, never a number
    hut, hut_se, trace = (t.masked_fill(flat_grad, float("nan")) for t in (hut, hut_se, trace))
    return hut, hut_se, trace, gnorm.reshape(n, j), values.reshape(n, j)


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
    form = (-_pair_values(q, ci, cr)).reshape(n, j, t) / gnorm.reshape(n, j, 1)
    est = form.mean(2)
    se = form.std(2) / math.sqrt(t) if t > 1 else torch.full_like(est, float("nan"))
    return est, se


def _hessian_traces(model, flat, u, hs, logits, shape, scheme, batch_size, cost):
    """tr(H_{f_l}) (n, L) of every logit at the samples flat (n, D): D times the mean of u^T H u over
    their T unit directions u (n, T, D), shared by every class."""
    n, t, d = u.shape
    rows_u = flat.unsqueeze(1).expand(n, t, d).reshape(-1, d)
    base_u = logits.repeat_interleave(t, 0)
    qu = _second_diff_rows(model, rows_u, u.reshape(-1, d), hs.repeat_interleave(t), shape, scheme,
                           batch_size, cost, base_logits=base_u).reshape(n, t, -1)
    return d * qu.mean(1)


def _trace_form(model, rows, normal, gnorm, hs, cls, ref, trace_h, shape, scheme, batch_size, cost, logits):
    """Trace-form mean curvature (n, J) from the (sample, class) rows (n J, D) at the samples, their
    unit normals (n J, D) and gradient norms (n J,), and the Hessian traces trace_h (n, L)."""
    n, j = cls.shape
    d = rows.shape[1]
    base_n = logits.repeat_interleave(j, 0)
    qn = _second_diff_rows(model, rows, normal, hs.repeat_interleave(j), shape, scheme, batch_size,
                           cost, base_logits=base_n)
    ci, cr = cls.reshape(-1), ref.repeat_interleave(j)
    nhn = _pair_values(qn, ci, cr).reshape(n, j)  # n^T H n
    tr = trace_h.gather(1, cls) - trace_h.gather(1, ref.unsqueeze(1))
    g = gnorm.reshape(n, j)
    # (g^T H g - tr H |g|^2) / ((D-1) |g|^3) = (n^T H n - tr H) / ((D-1) |g|)
    return (nhn - tr) / ((d - 1) * g)

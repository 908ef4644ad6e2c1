"""The fine-tuning experiment (Ortiz-Jimenez et al. 2020): train on x + delta(x) for a subset of
samples and compare the margins along each sample's own DeepFool direction before and after."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._utils.model import model_guard, predict
from .._utils.results import Result
from .._utils.stats import summarize
from ..attacks.deepfool import deepfool
from ..attacks.pgd import _flat_norm
from ..geometry.topology import first_crossing
from ..subspaces import Directions
from ..zoo.training import train

__all__ = ["FinetuneResult", "directional_margins", "finetune_experiment"]


# ------------------------------------------------------------------- fine-tuning experiment
@dataclass
class FinetuneResult(Result):
    """Margins along each sample's original DeepFool direction, before and after fine-tuning.

    Attributes:
        before_p: (|P|,) margins (input units, dtype of x) of the replaced samples P along their
            own delta directions, on the original model (inf = not found).
        after_p: (|P|,) the same on the fine-tuned model.
        before_u: (|U|,) margins of the untouched control samples U along their delta
            directions, on the original model (inf = not found).
        after_u: (|U|,) the same on the fine-tuned model.
        model: the fine-tuned copy, in eval mode (the input model is left unchanged).
    """

    before_p: Tensor
    after_p: Tensor
    before_u: Tensor
    after_u: Tensor
    model: object

    def summary(self) -> dict:
        return {k: summarize(getattr(self, k).cpu().numpy())
                for k in ("before_p", "after_p", "before_u", "after_u")}


def directional_margins(model, x: Tensor, directions: Tensor, *, method: str = "deepfool",
                        max_radius=None, **deepfool_kw) -> Tensor:
    """Margin of each x_n inside the 1-D subspace spanned by its own direction d_n.

    method 'deepfool': L2 DeepFool in a :class:`pyboundary.subspaces.Directions` family with one
    1-D member per sample (the distance to the nearest boundary point the iteration finds along
    ±d_n); 'line': the first crossing along +d_n and -d_n by grid + bisection
    (:func:`pyboundary.geometry.topology.first_crossing`, range ``max_radius``, default 10 ||x_n||).

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
        sub = Directions(list(unit.detach().flatten(1).unsqueeze(1)), tuple(x.shape[1:]))
        idx = torch.arange(x.shape[0], device=x.device)
        res = deepfool(model, x, p=2, subspace=sub, subspace_index=idx, **deepfool_kw)
        return torch.where(res.converged, res.margin, torch.full_like(res.margin, math.inf))
    if method == "line":
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
    labels: Tensor,
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
    The training set x (N, C, H, W), labels (N,) has x[P] replaced by x[P] + delta (labels kept) and is
    used to fine-tune a deep copy of ``model`` for ``epochs`` epochs with
    :func:`pyboundary.zoo.train`. Margins inside the 1-D subspace spanned by each sample's own
    delta (:func:`directional_margins` with ``method``) are measured before and after, for P and
    for the untouched control set U. Inputs are clipped to [0, 1] after adding delta.

    Args:
        model: an ``nn.Module`` (N, C, H, W) -> (N, L) logits; deep-copied, never modified.
        x: (N, C, H, W) training inputs in [0, 1].
        labels: (N,) int64 training labels (kept for the replaced samples).
        p_index: (|P|,) int64 indices into x of the samples P replaced by x + delta (non-empty).
        u_index: (|U|,) int64 indices of the control samples U, disjoint from p_index
            (non-empty).
        epochs: fine-tuning epochs (default 2).
        method: how the directional margins are measured (:func:`directional_margins`):
            'deepfool' (default, L2 DeepFool inside each sample's 1-D subspace) or 'line' (grid +
            bisection along +-delta).
        train_kwargs: extra keyword arguments of :func:`pyboundary.zoo.train` (e.g. ``lr``,
            ``train_batch_size``, ``seed``).
        deepfool_kwargs: extra keyword arguments of the L2 DeepFool calls (the one computing delta
            and, with method='deepfool', the directional margins); ``p`` is fixed to 2.
    Returns:
        :class:`FinetuneResult`. ValueError when DeepFool does not converge on a sample of P or U.
    """
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
    tuned = train(tuned, x_new, labels, epochs=epochs, **(train_kwargs or {}))
    tuned.eval()
    after = directional_margins(tuned, x[both], dirs.view_as(delta), method=method, **dkw)
    k = p_index.numel()
    return FinetuneResult(before[:k], after[:k], before[k:], after[k:], tuned)

"""Batched multi-class DeepFool: minimal L2 / L-inf perturbations, in the whole space or in subspaces.

Algorithm (per chunk of ``batch_size`` samples, all samples of a chunk in one batch):

1. One forward pass at the clean inputs gives the reference class (the prediction, or ``labels``)
   and the candidate classes: the top-``candidates`` classes of the clean logits, the reference
   included (as in the original method and foolbox), fixed for the run. With ``target`` the only
   candidate is the target and the reference is the current runner-up at each iterate.
2. Per iteration, over the *active* samples only (converged ones leave the batch): one forward
   pass at x0 + (1 + overshoot) * synthesis(r), the candidate gap gradients (see ``grad_strategy``),
   their coordinates in the subspace (``analysis``, the adjoint of ``synthesis``), then
   :func:`pyboundary.ops.deepfool_select` picks the closest linearised boundary and the step,
   which is added to the coordinates r. The overshoot scales the accumulated perturbation; it is
   not compounded per step.
3. Refinement (``refine=True``): along the final perturbation delta, the boundary crossing
   t* in (0, 1] of s(x0 + t delta) (s > 0 iff adversarial) is bracketed by safeguarded secant
   steps, each evaluating two points t_est -/+ tol*hi/4 in one forward pass, with bisection when a
   round does not halve the bracket, until (hi - lo) <= tol * hi. The reported perturbation is
   hi * delta (still adversarial), the margin its norm; the DeepFool norm is kept as raw_margin.
   With ``clamp=(lo, hi)`` (whole space only) the iterate is clamp(x0 + (1 + overshoot) r) and the
   state r is projected after each step so that it equals the realised perturbation (the part the
   box cuts off is dropped, as in adv-lib); the step gets an extra push of 1e-3 x max|logit| past
   the linearised boundary (foolbox adds 1e-4 logits). The step solves the linearised problem over
   the box (:func:`_box_step`: for p = inf coordinates move by min(t, room to the face), for p = 2
   by min(lambda |g_i|, room); the candidate with the smallest box-aware step wins), its first step
   aiming at ``_CLAMP_LINF_FIRST_FRACTION`` (0.7) / ``_CLAMP_L2_FIRST_FRACTION`` (0.6) of the gap:
   ~3 instead of ~5.2 (L-inf) / ~6 (L2) iterations of projected steps, at the same margins.
4. Failures (``max_iter`` steps without a label change) get ``converged=False`` and margin inf.
   ``noise_retries`` restarts them from a seeded Gaussian start in the subspace.

Subspaces: the engine works in the subspace's coordinates (``Subspace.analysis/synthesis``), so the
perturbation has no component outside the member. For families whose coordinates are the
projected vector itself (:class:`pyboundary.subspaces.Directions` complement members, "projection
coordinates"), the same code applies unchanged for p = 2: the coordinate gradient is the projected
gradient, every step is a multiple of it and stays in the member, and the coordinate norm equals
the input-space norm. p = inf is rejected for such members. For p = inf in a subspace with a
basis the norm is the L-inf norm of the *coordinates* (for the whole space: of the pixels).

Cost model (reported in :class:`DeepFoolResult`): ``n_forward`` batched forward passes and
``n_backward`` reverse passes (a batched reverse pass over several candidates counts as one);
``trace`` lists per forward pass (rows, reverse passes on its graph) so benchmarks can replay the
same work as plain passes.

Candidate pruning (``prune=True``): the gradient norms of each candidate are remembered; a
candidate whose estimated distance |gap_now| / ||g_last||_q exceeds ``PRUNE_FACTOR`` (2) times the
best estimate gets no gradient (unknown norms count as twice the row's largest known one). In the
first iteration of a whole-space run no norm is known and candidates with |gap| > ``FIRST_PRUNE_FACTOR``
(3) times the smallest |gap| are skipped. A reverse pass costs as much for rows that need nothing,
so rows that keep several candidates are re-forwarded alone for their extra gradients
(:func:`_pruned_gradients`). ``prune='audit'`` computes all gradients, steps with the pruned choice
and counts how often it differs from the full choice (``prune_choices``, ``prune_mismatch``);
measured: never, in 9,365 audited choices (benchmarks/README.md).

Dtypes: the search runs in the input's dtype (float32 or float64). Logits of another floating
dtype (a float64 model fed float32 inputs, or a float16 head) are cast to the input dtype as they
leave the model, so the gaps, scores and the gradients (which autograd returns in the input's
dtype) meet in one dtype in :func:`pyboundary.ops.deepfool_select`; the float-noise bands of the
flip test then use the input dtype's epsilon. Casting rather than rejecting: the input's precision
bounds the precision of the perturbation anyway, and rejecting would force every caller to wrap
models that upcast internally. For full float64 accuracy pass float64 inputs.

Rows that share an input (a margin scan's (image, subspace) pairs) share the first forward pass
and the first candidate gradients (computed in the whole space, then analysed per member).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

from .. import ops
from .._utils.batching import DEFAULT_BATCH_SIZE, BackoffState, map_with_backoff, plan_batch_size
from .._utils.model import check_logits, explain_input_errors, model_guard
from .._utils.results import Result
from .._utils.rng import make_generator
from .._utils.stats import summarize
from .._utils.validation import (
    check_choice,
    check_clamp,
    check_in_box,
    check_index_tensor,
    check_inputs,
    check_int,
    check_model,
    check_number,
    check_p,
)
from ..subspaces import FullSpace, Subspace
from ._boundary import NOISE_ULPS as _NOISE_ULPS
from ._boundary import box_moves as _box_moves
from ._boundary import dual_norm as _dual_norm
from ._boundary import norm as _norm
from ._boundary import robust_score as _robust_score
from ._boundary import score as _score
from .tight import TIGHT_CLASS_POOL, TIGHT_CLASS_RATIO, TIGHT_CLASSES, TIGHT_STEPS, min_norm_point, tighten

__all__ = ["deepfool", "DeepFoolResult", "DEFAULT_TOL", "PRUNE_FACTOR", "DEFAULT_GRAD_STRATEGY"]

#: Default refinement tolerance, relative to the margin: (hi - lo) <= tol * hi on the ray.
DEFAULT_TOL = 1e-4
#: Pruning keeps candidates whose estimated distance is <= PRUNE_FACTOR x the best estimate.
PRUNE_FACTOR = 2.0
#: First iteration (no gradient norms known): keep candidates with |gap| <= this x the smallest.
#: Measured on the reference CNN (500 inputs): the full choice was never outside the kept set at 3
#: (0.4 % at 2); 5.8 of 9 candidates kept on average.
FIRST_PRUNE_FACTOR = 3.0
#: First iteration of a whole-space run, once the two candidates with the smallest gaps are
#: differentiated (exact distances d_0, d_1 and gradient norms n_0, n_1): a further candidate c is
#: differentiated only if |gap_c| <= SECOND_STAGE_FACTOR * max(n_0, n_1) * min(d_0, d_1), i.e.
#: if its gradient norm would need to be at most this factor above the larger known one for it
#: to win. Measured on train splits (500 inputs each; benchmarks/README.md): reference CNN, the
#: winner never needed more than 1.53 (kept 5.87 -> 4.68 per input at 2, 5.74 at 2.5); reference
#: MLP, 2 added 7 changed choices to the gap rule's 4 in 866, 2.5 added none. With a clamp, d_0 and
#: d_1 (and d_0 of the later stage) are the box-aware distances (:func:`_box_distances`), never
#: below |gap| / norm, so the bounds rest on the same norm assumption in the box.
SECOND_STAGE_FACTOR = 2.5
#: Later iterations (gradient norms known from the previous one), once the candidate with the
#: smallest estimate is differentiated (exact distance d_0, its norm drift rho_0 = now / last):
#: a further candidate c is differentiated only if |gap_c| <= LATER_STAGE_FACTOR * d_0 * rho_0 *
#: (c's last norm), i.e. if c could win with a norm drift up to this factor above slot 0's.
#: Measured on train splits: reference CNN (all gradients computed, 5,210 later-iteration choices
#: over L2/L-inf/clamp and a DCT scan) no winner missed at 1.5 (10 at 1.2), candidates kept per
#: row 1.13-1.36 -> 1.03-1.13; reference MLP, a DCT scan: 1.5 missed 5 of 332, 2 none.
LATER_STAGE_FACTOR = 2.0
#: Default of grad_strategy='auto' per device type. CPU measured (LeNet/Fashion-MNIST, batch 100,
#: one thread): 'loop' 4.36 ms/sample vs 'batched' 4.94 unpruned, 1.76 vs 2.97 pruned. CUDA: not
#: measured yet (no GPU); 'batched' by the design's expectation (fewer kernel launches).
DEFAULT_GRAD_STRATEGY = {"cpu": "loop", "cuda": "batched"}
#: Standard deviation of the noise_retries start, relative to the RMS of each input.
DEFAULT_NOISE_SCALE = 1e-2
_MAX_REFINE_ROUNDS = 60
#: Inside a subspace, a candidate's coordinate gradient shorter than this many ulps of its
#: whole-space gradient is rounding noise of the analysis (the model is invariant inside the
#: member): it is zeroed, so that candidate is never chosen (distance inf) instead of giving a
#: step of ~1e15 along noise that "crosses" the boundary through the rounding error.
_INVARIANT_ULPS = 64
#: Pruned gradients re-forward the rows that keep several candidates when they are at most this
#: fraction of the batch (see _split_gradients).
_SPLIT_FRACTION = 0.5
#: With clamp, extra push past the linearised boundary, relative to the largest |logit|: the box
#: cuts off part of every step, so the iterates creep up to the boundary and need a finite push
#: (foolbox adds 1e-4 logits). 1e-3 (~1e-2 logits on the reference CNN) cut the clipped L2 run
#: from 11.0 (1e-4 logits) to 6.4 iterations per sample at +0.1 % median margin (measured with the
#: former projected L2 steps; the box-aware steps need ~3).
_CLAMP_PUSH = 1e-3
#: With clamp the steps solve the linearised problem over the box
#: (:func:`_box_step`); for p = inf the first step, from the clean input, aims at this fraction
#: of the linearised gap only. Full box-aware steps from the start halved the iterations but gave 4-5 %
#: larger margins per sample (the sign direction at the clean input is the least reliable
#: linearisation); measured on the reference CNN, 1000 inputs, per-sample margin ratio to the
#: former creeping steps (geometric mean) / forward passes: 1.0 -> +5.0 % / -46 %, 0.8 -> +1.2 %,
#: 0.7 -> +0.35 % / -32 %, 0.6 -> 0.0 % / -27 %.
_CLAMP_LINF_FIRST_FRACTION = 0.7
#: The same box-aware steps for p = 2 (:func:`_box_step`: min ||step||_2 over the box, coordinate i
#: moving by min(lambda |g_i|, room_i)), the first step at this fraction of the gap. Measured on the
#: train split (reference CNN, 1000 inputs, refined margins, per-sample ratio to the former
#: projected steps, geometric mean / iterations, was 6.0): 1.0 -> +5.9 % / 2.5, 0.8 -> +1.4 % / 2.9,
#: 0.7 -> +0.24 % / 3.0, 0.6 -> -0.25 % / 3.1, 0.5 -> -0.16 % / 3.2.
_CLAMP_L2_FIRST_FRACTION = 0.6


@dataclass
class DeepFoolResult(Result):
    """Result of :func:`deepfool`; tensors on the input's device, N = number of inputs.

    Attributes:
        perturbation: (N, ...) like x; x + perturbation is adversarial for converged samples
            (the refined point when refine=True), zeros for failures and misclassified samples.
        margin: (N,) norm of the perturbation (L2, or L-inf for p = inf; in a subspace the norm
            of its coordinates), in input units; +inf when not converged, 0 when misclassified.
        raw_margin: (N,) norm of the unrefined DeepFool perturbation (overshoot included).
        iterations: (N,) int64 DeepFool steps until the label changed (of the last attempt).
        converged: (N,) bool.
        orig_label: (N,) int64 reference class (prediction, or the given label).
        adv_label: (N,) int64 class at x + perturbation.
        retries: (N,) int64 noise restarts used.
        misclassified: (N,) bool, given labels that the model already gets wrong (margin 0).
        n_forward, n_backward: batched forward / reverse passes of the call.
        sample_forward: (N,) int64 forward evaluations each sample took part in.
        sample_gradients: (N,) int64 candidate gradients computed for each sample.
        trace: per forward pass, (rows, gradient rows per sample); for cost replays.
        prune_choices, prune_mismatch: with prune='audit', number of (sample, iteration) choices
            and how many of them differ between the pruned and the full candidate set.
        p: the norm used (2.0 or inf).
        deepfool_margin: (N,) the plain DeepFool margin (refined when refine=True); equals margin
            unless tight=True, where margin <= deepfool_margin per sample.
        tight: whether the tight mode ran.
        tight_steps: (N,) int64 tightening steps per sample (0 without tight mode).
        tight_forward, tight_backward: batched forward / reverse passes spent by the tight mode
            (included in n_forward / n_backward), its final bracketing included.
    """

    perturbation: Tensor
    margin: Tensor
    raw_margin: Tensor
    iterations: Tensor
    converged: Tensor
    orig_label: Tensor
    adv_label: Tensor
    retries: Tensor
    misclassified: Tensor
    n_forward: int = 0
    n_backward: int = 0
    sample_forward: Tensor | None = None
    sample_gradients: Tensor | None = None
    trace: list = field(default_factory=list, repr=False)
    prune_choices: int = 0
    prune_mismatch: int = 0
    p: float = 2.0
    deepfool_margin: Tensor | None = None
    tight: bool = False
    tight_steps: Tensor | None = None
    tight_forward: int = 0
    tight_backward: int = 0

    def summary(self) -> dict:
        """Counts, margin statistics over converged samples (input units), mean iterations and
        the pass counts, as plain numbers."""
        stats = summarize(self.margin.cpu().numpy(), self.converged.cpu().numpy())
        it = self.iterations[self.converged].double()
        out = {
            "p": "inf" if math.isinf(self.p) else "2",
            "n": int(self.margin.numel()),
            "n_converged": stats["n_converged"],
            "n_failed": stats["n_failed"],
            "n_misclassified": int(self.misclassified.sum()),
            "n_retried": int((self.retries > 0).sum()),
            "margin": {k: stats[k] for k in ("median", "p5", "p95", "mean", "se")},
            "mean_iterations": float(it.mean()) if it.numel() else float("nan"),
            "n_forward": self.n_forward,
            "n_backward": self.n_backward,
        }
        if self.prune_choices:
            out["prune_audit"] = {"choices": self.prune_choices, "mismatch": self.prune_mismatch}
        if self.tight:
            ok = self.converged & ~self.misclassified
            gain = (self.margin[ok] / self.deepfool_margin[ok]).double()
            out["tight"] = {
                "median_ratio_to_deepfool": float(gain.median()) if gain.numel() else float("nan"),
                "mean_steps": float(self.tight_steps[ok].double().mean()) if gain.numel() else float("nan"),
                "n_forward": self.tight_forward,
                "n_backward": self.tight_backward,
            }
        return out

    def format_summary(self) -> str:
        """A small table of the run."""
        s = self.summary()
        m = s["margin"]
        norm = "Linf" if s["p"] == "inf" else "L2"
        lines = [
            f"DeepFool ({norm}): {s['n']} inputs, {s['n_converged']} converged, {s['n_failed']} failed, "
            f"{s['n_misclassified']} misclassified, {s['n_retried']} retried",
            f"  margin  median {m['median']:.4g}  p5 {m['p5']:.4g}  p95 {m['p95']:.4g}  "
            f"mean {m['mean']:.4g}  se {m['se']:.3g}",
            f"  iterations mean {s['mean_iterations']:.3g}  "
            f"passes: {s['n_forward']} forward, {s['n_backward']} backward",
        ]
        if "prune_audit" in s:
            lines.append(f"  pruning audit: {self.prune_mismatch}/{self.prune_choices} choices differ")
        if "tight" in s:
            t = s["tight"]
            lines.append(f"  tight: median margin / DeepFool's {t['median_ratio_to_deepfool']:.4g}, "
                         f"{t['mean_steps']:.3g} steps, extra passes {t['n_forward']} forward, "
                         f"{t['n_backward']} backward")
        return "\n".join(lines)


@dataclass
class _Ctx:
    model: Callable
    p: float
    space: object
    overshoot: float
    max_iter: int
    refine: bool
    tol: float
    clamp: tuple | None
    strategy: str
    prune: object
    n_cand: int
    noise_retries: int
    noise_scale: float
    gen: torch.Generator | None
    whole_space: bool = True
    tight: bool = False
    tight_steps: int = 16
    class_estimates: bool = False
    tight_forward: int = 0
    tight_backward: int = 0
    n_forward: int = 0
    n_backward: int = 0
    prune_choices: int = 0
    prune_mismatch: int = 0
    trace: list = field(default_factory=list)
    batched_ok: bool = False  # a batched reverse pass (grad_strategy="batched") has worked with this model


# ----------------------------------------------------------------------------------------------
# validation


def _resolve_strategy(strategy: str, device) -> str:
    if strategy not in ("auto", "loop", "batched"):
        raise ValueError(f"grad_strategy must be 'auto', 'loop' or 'batched', got {strategy!r}")
    if strategy == "auto":
        return DEFAULT_GRAD_STRATEGY.get(torch.device(device).type, "loop")
    return strategy


def _resolve_space(subspace, subspace_index, x, p):
    n = x.shape[0]
    if subspace is None:
        if subspace_index is not None:
            raise ValueError("subspace_index was given but subspace is None")
        return FullSpace(x.shape[1:]), torch.zeros(n, dtype=torch.int64, device=x.device)
    if not isinstance(subspace, Subspace):
        raise TypeError(f"subspace must be a pyboundary Subspace or None, got {type(subspace).__name__}")
    view = subspace.for_input_shape(x.shape[1:])
    if view is None:
        raise ValueError(
            f"x has per-sample shape {tuple(x.shape[1:])} but the subspace {subspace.spec_or_name()} "
            f"expects {subspace.image_shape}"
        )
    if subspace_index is not None:
        check_index_tensor("subspace_index", subspace_index, n, x.device)
    idx = subspace._check_idx(subspace_index, n, x.device)
    subspace.check_p(p, idx)
    if isinstance(subspace, FullSpace):
        return FullSpace(x.shape[1:]), idx
    return view, idx


# ----------------------------------------------------------------------------------------------
# the search


def _forward(ctx: _Ctx, xa: Tensor, grad_rows: int = 0) -> Tensor:
    """model(xa), validated, in xa's dtype (see "Dtypes" in the module docstring)."""
    logits = ctx.model(xa)
    try:
        check_logits(logits, xa.shape[0])
    except ValueError as err:
        if not bool(torch.isfinite(xa).all()):
            # x is checked finite on entry: the search's own step overflowed (and the model's
            # output at a non-finite point is no fault of the model)
            raise FloatingPointError(
                f"a DeepFool step overflowed in {xa.dtype}: the model's logit differences or their "
                "gradients are too small (or large) for this precision (e.g. logits scaled by 1e-30); "
                "rescale the logits or run in float64") from err
        raise
    if logits.dtype != xa.dtype:
        logits = logits.to(xa.dtype)  # differentiable; the gaps then meet the gradients' dtype
    ctx.n_forward += 1
    ctx.trace.append((int(xa.shape[0]), int(grad_rows)))
    return logits


def _point(ctx: _Ctx, x0: Tensor, delta: Tensor) -> Tensor:
    xa = x0 + delta
    if ctx.clamp is not None:
        xa = xa.clamp(ctx.clamp[0], ctx.clamp[1])
    return xa


def _gradients(ctx: _Ctx, xa: Tensor, gap: Tensor, mask: Tensor | None) -> Tensor:
    """d gap[:, j] / d xa for all slots j -> (J, rows, ...) (masked slots get zero gradient)."""
    J = gap.shape[1]
    if mask is not None:
        gap = gap * mask.to(gap.dtype)
    if ctx.strategy == "batched" and J > 1:
        eye = torch.eye(J, dtype=gap.dtype, device=gap.device)
        go = eye.unsqueeze(1).expand(J, gap.shape[0], J)
        try:
            # until one batched pass has worked, keep the graph: a failed one may have freed it,
            # and the loop below needs it
            (g,) = torch.autograd.grad(gap, xa, grad_outputs=go, is_grads_batched=True,
                                       retain_graph=not ctx.batched_ok)
            ctx.batched_ok = True
            ctx.n_backward += 1
            return g
        except RuntimeError:
            ctx.strategy = "loop"  # the model does not support vmap over backward
    grads = []
    for j in range(J):
        (g,) = torch.autograd.grad(gap[:, j].sum(), xa, retain_graph=j < J - 1)
        grads.append(g)
        ctx.n_backward += 1
    return torch.stack(grads)


class _Chunk:
    """State of one chunk of samples: fixed references, per-sample outputs, pruning memory."""

    def __init__(self, ctx: _Ctx, x0, idx, labels, target):
        n = x0.shape[0]
        dev, dt = x0.device, x0.dtype
        self.x0, self.idx, self.labels, self.target = x0, idx, labels, target
        self.r = x0.new_zeros(n, ctx.space.dim)
        self.ref = torch.zeros(n, dtype=torch.int64, device=dev)
        self.cand = None  # (n, J) candidate classes
        self.gnorm = None  # (n, J) last gradient dual norms, for pruning
        self.done = torch.zeros(n, dtype=torch.bool, device=dev)
        self.conv = torch.zeros(n, dtype=torch.bool, device=dev)
        self.mis = torch.zeros(n, dtype=torch.bool, device=dev)
        self.iters = torch.zeros(n, dtype=torch.int64, device=dev)
        self.adv = torch.zeros(n, dtype=torch.int64, device=dev)
        self.retries = torch.zeros(n, dtype=torch.int64, device=dev)
        self.s_clean = torch.zeros(n, dtype=dt, device=dev)
        self.s_flip = torch.zeros(n, dtype=dt, device=dev)
        self.fwd = torch.zeros(n, dtype=torch.int64, device=dev)
        self.ngrad = torch.zeros(n, dtype=torch.int64, device=dev)


def _init_refs(ctx: _Ctx, ch: _Chunk, a: Tensor, logits: Tensor) -> None:
    """From the clean logits of rows a: reference class, candidates, misclassification."""
    L = logits.shape[1]
    pred = logits.argmax(1)
    if ch.labels is not None:
        lab = ch.labels[a]
        if int(lab.min()) < 0 or int(lab.max()) >= L:
            raise ValueError(f"labels must lie in [0, {L - 1}] for a model with {L} classes, "
                             f"got range [{int(lab.min())}, {int(lab.max())}]")
        ch.ref[a] = lab
        ch.mis[a] = pred != lab
    else:
        ch.ref[a] = pred
    if ch.target is not None:
        tgt = ch.target[a]
        if int(tgt.min()) < 0 or int(tgt.max()) >= L:
            raise ValueError(f"target must lie in [0, {L - 1}], got range [{int(tgt.min())}, {int(tgt.max())}]")
        same = tgt == ch.ref[a]
        if bool(same.any()):
            bad = int(a[same][0])
            raise ValueError(f"target equals the current class for {int(same.sum())} input(s) "
                             f"(e.g. input {bad}: class {int(tgt[same][0])}); nothing to search")
        ch.cand = ch.target.unsqueeze(1).clone() if ch.cand is None else ch.cand
        return
    k = min(ctx.n_cand, L)
    if ch.cand is None:
        ch.cand = torch.zeros(ch.x0.shape[0], k - 1, dtype=torch.int64, device=ch.x0.device)
    top = logits.detach().topk(k, dim=1).indices
    # the reference class is top-1 for every sample that is searched; drop it
    not_ref = top != ch.ref[a].unsqueeze(1)
    order = torch.argsort((~not_ref).to(torch.int8), dim=1, stable=True)
    ch.cand[a] = top.gather(1, order)[:, : k - 1]


def _select_slots(ctx: _Ctx, ch: _Chunk, a: Tensor, gap_all: Tensor):
    """Candidates to differentiate for rows a (pruning; see the module docstring).

    Estimated distance of candidate c: |gap_c| / ||g_c|| with the last known gradient norm;
    a candidate without a known norm uses twice the row's largest known norm; a row without any
    known norm (first iteration) compares the gaps alone, with FIRST_PRUNE_FACTOR (whole space
    only: inside a subspace the projected norms differ too much between classes, so the first
    iteration there differentiates every candidate).
    Returns (slots (n, J') candidate positions sorted by estimate, mask (n, J') kept slots
    (kept ones first), keep (n, J)), or (None, None, keep) for prune='audit', or all None.
    """
    J = gap_all.shape[1]
    if not ctx.prune or J == 1:
        return None, None, None
    norms = ch.gnorm[a] if ch.gnorm is not None else torch.full_like(gap_all, math.inf)
    known = torch.isfinite(norms)
    any_known = known.any(1, keepdim=True)
    if not ctx.whole_space and not bool(any_known.all()):
        # projected gradient norms vary too much across classes for the gap-only rule
        return None, None, None
    fill = 2 * torch.where(known, norms, torch.zeros_like(norms)).amax(1, keepdim=True)
    norm_est = torch.where(known, norms, torch.where(any_known, fill, torch.ones_like(norms)))
    est = torch.nan_to_num(gap_all.abs() / norm_est, nan=math.inf)
    factor = torch.where(any_known, PRUNE_FACTOR, FIRST_PRUNE_FACTOR).to(est.dtype)
    best = est.min(1, keepdim=True).values
    keep = (est <= factor * best) | (est == best)
    if ctx.prune == "audit":
        return None, None, keep
    n_keep = int(keep.sum(1).max())
    order = torch.argsort(est.masked_fill(~keep, math.inf), dim=1)[:, :n_keep]
    return order, keep.gather(1, order), keep


def _mark_flips(ctx: _Ctx, ch: _Chunk, a: Tensor, lg: Tensor, it: int, first_attempt: bool) -> Tensor:
    """Record the rows a whose label changed at this forward; returns the positions still active."""
    if it == 0 and first_attempt:
        _init_refs(ctx, ch, a, lg)
        ch.s_clean[a] = _score(lg, ch.ref[a], None if ch.target is None else ch.target[a])
        mis = ch.mis[a]
        if bool(mis.any()):
            ch.done[a[mis]] = True
            ch.conv[a[mis]] = True
            ch.adv[a[mis]] = lg.argmax(1)[mis]
    tgt = None if ch.target is None else ch.target[a]
    score = _robust_score(lg, ch.ref[a], tgt)
    flipped = (score > 0) & ~ch.done[a]
    if bool(flipped.any()):
        f = a[flipped]
        ch.done[f] = True
        ch.conv[f] = True
        ch.iters[f] = it
        ch.adv[f] = lg.argmax(1)[flipped]
        ch.s_flip[f] = score[flipped]
    return (~ch.done[a]).nonzero().squeeze(1)


def _candidate_gaps(ch: _Chunk, ar: Tensor, logits: Tensor) -> Tensor:
    """(n, J) f_c - f_ref for the candidates of rows ar (<= 0 while the label holds)."""
    if ch.target is None:
        ref_now = ch.ref[ar]
    else:
        ref_now = logits.detach().scatter(1, ch.target[ar].unsqueeze(1), -math.inf).argmax(1)
    return logits.gather(1, ch.cand[ar]) - logits.gather(1, ref_now.unsqueeze(1))


def _remember_norms(ch: _Chunk, ar: Tensor, norms: Tensor, slots, mask) -> None:
    """Store the candidates' gradient dual norms (only the computed slots) for pruning."""
    if ch.gnorm is None:
        ch.gnorm = torch.full(ch.cand.shape, math.inf, dtype=norms.dtype, device=norms.device)
    if slots is None:
        ch.gnorm[ar] = norms
        return
    old = ch.gnorm[ar]
    computed = torch.zeros_like(old, dtype=torch.bool).scatter(1, slots, mask)
    ch.gnorm[ar] = torch.where(computed, old.scatter(1, slots, norms), old)


def _step(ctx: _Ctx, ch: _Chunk, ar: Tensor, xa: Tensor, rows: Tensor, logits: Tensor):
    """Gradients of the (kept) candidate gaps of rows ar, then :func:`_apply_step`.

    logits: (n, L) at the current iterate of rows ar (attached to the graph of xa)."""
    gap_all = _candidate_gaps(ch, ar, logits)
    slots, mask, keep = _select_slots(ctx, ch, ar, gap_all.detach())
    gap = gap_all if slots is None else gap_all.gather(1, slots)
    ctx.trace[-1] = (ctx.trace[-1][0], gap.shape[1])
    if mask is not None and ctx.strategy == "loop":
        scale = logits.detach().abs().amax(1, keepdim=True)
        g, mask = _pruned_gradients(ctx, ch, ar, xa, rows, gap, slots, mask, scale)
    else:
        g = _gradients(ctx, xa, gap, mask)[:, rows].transpose(0, 1)  # (n, J', ...)
    _apply_step(ctx, ch, ar, g, gap.detach(), logits.detach(), slots, mask, keep)


def _pruned_gradients(ctx: _Ctx, ch: _Chunk, ar: Tensor, xa: Tensor, rows: Tensor, gap: Tensor,
                      slots: Tensor, mask: Tensor, logit_scale: Tensor) -> Tensor:
    """Kept candidate gradients, slot by slot -> (g (n, J', ...) (zeros where not kept), the
    final mask (n, J') of differentiated slots).

    A reverse pass costs as much for rows that need nothing as for the others, so once at most
    _SPLIT_FRACTION of the current rows keep a further candidate, those rows are re-forwarded
    alone and their remaining slots differentiated on that smaller graph. In the first iteration
    of a whole-space run, slots from 2 on are pruned again once slots 0 and 1 are known
    (:func:`_second_stage_mask`).
    """
    n, Jp = gap.shape
    g = None
    cur, x_cur, gap_cur, rows_cur = torch.arange(n, device=gap.device), xa, gap, rows
    ctx.trace[-1] = (ctx.trace[-1][0], 0)
    # rows in their first iteration (no gradient norm known yet): second-stage pruning after slot 1
    first = (torch.ones(n, dtype=torch.bool, device=gap.device) if ch.gnorm is None
             else ~torch.isfinite(ch.gnorm[ar]).any(1))
    second_stage = ctx.whole_space and Jp > 2 and bool(first.any())
    later_stage = Jp > 1 and not bool(first.all())
    last = None if not later_stage else ch.gnorm[ar].gather(1, slots)
    mask = mask.clone()
    for j in range(Jp):
        more = mask[cur, j + 1] if j + 1 < Jp else torch.zeros_like(cur, dtype=torch.bool)
        n_more = int(more.sum())
        split = 0 < n_more <= _SPLIT_FRACTION * cur.numel()
        stage = (j == 1 and second_stage) or (j == 0 and later_stage)
        # a stage's pruning only removes slots, so a split decided before it stays a split (or
        # nothing is left): the full graph is not needed again then
        retain = n_more > 0 and not split
        need = mask[cur, j].to(gap_cur.dtype)
        (gj,) = torch.autograd.grad((gap_cur[:, j] * need).sum(), x_cur, retain_graph=retain)
        ctx.n_backward += 1
        ctx.trace[-1] = (ctx.trace[-1][0], ctx.trace[-1][1] + 1)
        if g is None:
            g = gj.new_zeros((n, Jp) + gj.shape[1:])
        g[cur, j] = gj[rows_cur]
        if stage and n_more > 0:
            with torch.no_grad():
                gap_abs = gap.detach().abs()
                # with a clamp: box distances for the gains the step will aim at (_box_step)
                gain = None if ctx.clamp is None else _box_gain(_pushed_gap(ctx, gap.detach(), logit_scale))
                if j == 1:  # first iteration (whole space): slots 0 and 1 known
                    g01 = g[:, :2].reshape(n, 2, -1)
                    dist = None if ctx.clamp is None else _box_distances(ctx, ch, ar, g01, gain[:, :2])
                    new = _second_stage_mask(gap_abs, _dual_norm(g01, ctx.p), mask, dist)
                    mask = torch.where(first.unsqueeze(1), new, mask)
                else:  # later iterations: slot 0 known
                    g0 = ctx.space._analysis(g[:, 0], ch.idx[ar])
                    dist = (None if ctx.clamp is None else
                            _box_distances(ctx, ch, ar, g0.unsqueeze(1), gain[:, :1]).squeeze(1))
                    new = _later_stage_mask(gap_abs, _dual_norm(g0, ctx.p), last, mask, dist)
                    mask = torch.where(first.unsqueeze(1), mask, new)
            more = mask[cur, j + 1]
            n_more = int(more.sum())
            split = 0 < n_more <= _SPLIT_FRACTION * cur.numel()
        if n_more == 0:
            break
        if split:
            cur = cur[more]
            x_cur = xa.detach()[rows[cur]].requires_grad_(True)
            gap_cur = _candidate_gaps(ch, ar[cur], _forward(ctx, x_cur)).gather(1, slots[cur])
            ch.fwd[ar[cur]] += 1
            rows_cur = torch.arange(cur.numel(), device=gap.device)
    return g, mask


def _second_stage_mask(gap_abs: Tensor, norms01: Tensor, mask: Tensor, dist01: Tensor | None = None) -> Tensor:
    """First-iteration pruning once slots 0 and 1 (the two smallest gaps) are differentiated:
    keep a further slot only if |gap| <= SECOND_STAGE_FACTOR * max(n_0, n_1) * min(d_0, d_1).

    gap_abs: (n, J') |gaps| in slot order; norms01: (n, 2) dual norms of slots 0 and 1; mask:
    (n, J') kept slots; dist01: (n, 2) the distances d_0, d_1 when they are not |gap| / norm
    (with a clamp: the box-aware distances of :func:`_box_distances`, which are never smaller, so
    a candidate that wins has |gap| / its norm <= its box distance <= min(d_0, d_1)). Returns the
    new mask (slots 0 and 1 unchanged)."""
    tiny = torch.finfo(gap_abs.dtype).tiny
    d = gap_abs[:, :2] / norms01.clamp_min(tiny) if dist01 is None else dist01
    d = d.masked_fill(~mask[:, :2], math.inf)
    bound = SECOND_STAGE_FACTOR * norms01.masked_fill(~mask[:, :2], 0).amax(1) * d.amin(1)
    keep = gap_abs <= bound.unsqueeze(1)
    keep[:, :2] = True
    return mask & keep


def _later_stage_mask(gap_abs: Tensor, now0: Tensor, last: Tensor, mask: Tensor,
                      dist0: Tensor | None = None) -> Tensor:
    """Later-iteration pruning once slot 0 (the smallest estimate) is differentiated: keep a
    further slot c only if |gap_c| <= LATER_STAGE_FACTOR * d_0 * rho_0 * last_c.

    gap_abs: (n, J') |gaps| in slot order; now0: (n,) slot 0's dual norm now; last: (n, J') the
    last known dual norms in slot order (inf where unknown: kept); mask: (n, J'); dist0: (n,) d_0
    when it is not |gap_0| / now0 (with a clamp: slot 0's box-aware distance, see
    :func:`_second_stage_mask`). Returns the new mask (slot 0 unchanged)."""
    tiny = torch.finfo(gap_abs.dtype).tiny
    d0 = gap_abs[:, 0] / now0.clamp_min(tiny) if dist0 is None else dist0
    rho0 = now0 / last[:, 0].clamp_min(tiny)
    keep = gap_abs <= (LATER_STAGE_FACTOR * d0 * rho0).unsqueeze(1) * last
    keep |= ~torch.isfinite(last)
    keep[:, 0] = True
    return mask & keep


def _step_shared(ctx: _Ctx, ch: _Chunk, ar: Tensor, xa: Tensor, rows: Tensor, logits: Tensor,
                 rep_rows: Tensor, inverse: Tensor):
    """First step when several rows share an input (e.g. one image x many subspaces): gradients
    are computed once per distinct input (xa, logits: (n_u, ...)) and shared by its rows."""
    gap_u = _candidate_gaps(ch, rep_rows, logits)
    ctx.trace[-1] = (ctx.trace[-1][0], gap_u.shape[1])
    g_u = _gradients(ctx, xa, gap_u, None)  # (J, n_u, ...)
    sel = inverse[rows]
    g = g_u[:, sel].transpose(0, 1)
    _apply_step(ctx, ch, ar, g, gap_u.detach()[sel], logits.detach()[sel], None, None, None)


def _apply_step(ctx: _Ctx, ch: _Chunk, ar: Tensor, g: Tensor, gap: Tensor, logits: Tensor,
                slots, mask, keep) -> None:
    """Candidate gradients g (n, J', ...) -> coordinates, select, and the update of r[ar]."""
    n, Jp = g.shape[:2]
    first_rows = (None if keep is None else torch.ones(n, dtype=torch.bool, device=g.device)
                  if ch.gnorm is None else ~torch.isfinite(ch.gnorm[ar]).any(1))
    last_norms = None if keep is None or ch.gnorm is None else ch.gnorm[ar].clone()
    with torch.no_grad():
        gc = ctx.space._analysis(g.reshape((n * Jp,) + g.shape[2:]), ch.idx[ar].repeat_interleave(Jp))
        gc = gc.reshape(n, Jp, -1)
        if not ctx.whole_space:
            noise = _INVARIANT_ULPS * torch.finfo(gc.dtype).eps * g.reshape(n, Jp, -1).norm(dim=2)
            gc = gc.masked_fill((gc.norm(dim=2) <= noise).unsqueeze(2), 0.0)
        ch.ngrad[ar] += Jp if mask is None else mask.sum(1)
        _remember_norms(ch, ar, _dual_norm(gc, ctx.p), slots, mask)
        # aim past the float-noise band of the flip test (and further with a clamp)
        gap = _pushed_gap(ctx, gap, logits.abs().amax(1, keepdim=True))
        box = ctx.clamp is not None
        audit = keep is not None and ctx.prune == "audit"
        if audit and keep.shape[1] > 1:
            dist = None if not box else _box_distances(ctx, ch, ar, gc, _box_gain(gap))
            keep = _audit_stages(ctx, gap, _dual_norm(gc, ctx.p), keep, first_rows, last_norms, dist)
        if audit and not box:
            _, full_idx, _ = ops.deepfool_select(gap, gc, ctx.p)
            step, idx_p, _ = ops.deepfool_select(gap, gc * keep.unsqueeze(2).to(gc.dtype), ctx.p)
            ctx.prune_choices += n
            ctx.prune_mismatch += int((idx_p != full_idx).sum())
        else:
            step, _, _ = ops.deepfool_select(gap, gc, ctx.p)
        if box:
            step = _box_step(ctx, ch, ar, gap, gc, step, keep if audit else None)
        r_new = ch.r[ar] + step
        if ctx.clamp is not None:
            # keep the state equal to the realised perturbation: the part of the accumulated
            # perturbation that the box cuts off is dropped (projected iterate, as in adv-lib)
            scale = 1.0 + ctx.overshoot
            x0f = ch.x0[ar].reshape(n, -1)
            r_new = ((x0f + scale * r_new).clamp(*ctx.clamp) - x0f) / scale
        ch.r[ar] = r_new


def _audit_stages(ctx: _Ctx, gap: Tensor, norms: Tensor, keep: Tensor, first_rows: Tensor,
                  last: Tensor | None, dist: Tensor | None = None) -> Tensor:
    """The kept set of the staged pruning (:func:`_second_stage_mask` in a first iteration of the
    whole space, :func:`_later_stage_mask` in later iterations) for the audit, where every
    candidate is differentiated: gap, norms (now), keep, last, dist (box distances with a clamp,
    else None) (n, J) in candidate order."""
    gap_abs = gap.abs()
    out = keep
    if ctx.whole_space and keep.shape[1] > 2:
        order = torch.argsort(gap_abs.masked_fill(~keep, math.inf), dim=1)
        m = _second_stage_mask(gap_abs.gather(1, order), norms.gather(1, order[:, :2]), keep.gather(1, order),
                               None if dist is None else dist.gather(1, order[:, :2]))
        out = torch.where(first_rows.unsqueeze(1), torch.zeros_like(keep).scatter(1, order, m), out)
    if last is not None:
        est = torch.nan_to_num(gap_abs / last, nan=math.inf).masked_fill(~keep, math.inf)
        order = torch.argsort(est, dim=1)
        lo = last.gather(1, order)
        m = _later_stage_mask(gap_abs.gather(1, order), norms.gather(1, order[:, :1]).squeeze(1), lo,
                              keep.gather(1, order), None if dist is None else dist.gather(1, order[:, :1]).squeeze(1))
        out = torch.where(first_rows.unsqueeze(1), out, torch.zeros_like(keep).scatter(1, order, m))
    return out


def _pushed_gap(ctx: _Ctx, gap: Tensor, logit_scale: Tensor) -> Tensor:
    """The gaps (n, J) <= 0 a step aims at: past the float-noise band of the flip test (and further
    with a clamp), relative to logit_scale (n, 1), the largest |logit| of each row."""
    push = 2 * _NOISE_ULPS * torch.finfo(gap.dtype).eps + (_CLAMP_PUSH if ctx.clamp else 0.0)
    return gap - push * logit_scale


def _box_gain(pushed_gap: Tensor) -> Tensor:
    """The gain b > 0 a box-aware step must make along its gradient (as :func:`ops.deepfool_select`
    aims: the pushed gap, slightly more)."""
    return (1.0 + ops.DEFAULT_SELECT_EPS) * pushed_gap.abs() + ops.SELECT_ABS_PUSH * ops.DEFAULT_SELECT_EPS


def _box_distances(ctx: _Ctx, ch: _Chunk, ar: Tensor, gc: Tensor, b: Tensor, with_room: bool = False):
    """Box-aware linearised distances from the iterates of rows ar (clamp set, whole space): per
    candidate, the norm of the smallest step that gains b along its gradient inside the box
    (:func:`_box_step`), +inf where the box cannot. gc: (n, k, M) gradients, b: (n, k) gains > 0.
    Never below the unconstrained |b| / dual norm. Returns (n, k), and the rooms (n, k, M) of
    the coordinates towards sign(gc) with ``with_room``."""
    n, k, M = gc.shape
    s = 1.0 + ctx.overshoot
    x0 = ch.x0[ar].reshape(n, 1, M)
    r = ch.r[ar].reshape(n, 1, M)
    room = torch.where(gc > 0, ((ctx.clamp[1] - x0) / s - r).clamp_min(0),
                       (r - (ctx.clamp[0] - x0) / s).clamp_min(0))
    a = gc.abs()
    moves, feasible = _box_moves(a, room, b, ctx.p)
    value = _norm(moves.reshape(n * k, M), ctx.p).reshape(n, k)
    value = value.masked_fill(~(feasible & (a.sum(-1) > 0)), math.inf)
    return (value, room) if with_room else value


def _box_step(ctx: _Ctx, ch: _Chunk, ar: Tensor, gap: Tensor, gc: Tensor, step: Tensor,
              keep: Tensor | None) -> Tensor:
    """Box-aware step (clamp set, whole space): the linearised problem over the box.

    From the iterate x0 + s r (s = 1 + overshoot, inside the box), coordinate i can move the
    state by at most room_i = (hi - x0_i)/s - r_i in the direction sign(g_i) > 0 (r_i - (lo -
    x0_i)/s for sign(g_i) < 0). min ||step||_p s.t. <g, step> >= b over that box
    (:func:`pyboundary.attacks._boundary.box_moves`): for p = inf step_i = sign(g_i) min(t, room_i), t the root of
    sum_i |g_i| min(t, room_i) = b; for p = 2 step_i = sign(g_i) min(lambda |g_i|, room_i), lambda
    the root of sum_i |g_i| min(lambda |g_i|, room_i) = b. b is the
    push of :func:`ops.deepfool_select` (the gap, slightly more). The candidate with the smallest
    box-aware step norm wins (pruned candidates, zero gradient, are never chosen); the first step
    from the clean input then goes ``_CLAMP_LINF_FIRST_FRACTION`` / ``_CLAMP_L2_FIRST_FRACTION``
    of the way (the solution for that fraction of the winner's gap). Rows where no candidate can
    reach its linearised boundary inside the box keep the unconstrained step of
    ``deepfool_select`` (the projection cuts it).

    gap: (n, J') pushed gaps (<= 0); gc: (n, J', M) gradients; step: (n, M) unconstrained step;
    keep: (n, J') candidates kept by pruning in audit mode (gc holds all candidates; the step
    uses the kept ones and prune_choices / prune_mismatch count the box-aware choices), else
    None (pruned slots have zero gradients). Returns the (n, M) step.
    """
    n, _, M = gc.shape
    b = _box_gain(gap)
    # (n, 1): the step from the clean input, when it is not the only step allowed (max_iter=1, e.g.
    # foolbox's steps=1: then the full way, or the single step could never reach the boundary)
    first = (ch.r[ar] == 0).all(-1, keepdim=True) & (ctx.max_iter > 1)
    first_fraction = _CLAMP_LINF_FIRST_FRACTION if math.isinf(ctx.p) else _CLAMP_L2_FIRST_FRACTION
    frac = torch.where(first, first_fraction, 1.0)
    # the class is chosen on the full linearised gap (exact on affine models), the first step then
    # goes the fraction of the way along the chosen class's solution path
    value, room = _box_distances(ctx, ch, ar, gc, b, with_room=True)
    a = gc.abs()
    v_best, c = (value if keep is None else value.masked_fill(~keep, math.inf)).min(1)
    if keep is not None:  # audit: the choice among all candidates vs the pruned one
        full = value.min(1)
        ctx.prune_choices += n
        ctx.prune_mismatch += int((full.indices != c).sum())
    found = torch.isfinite(v_best).unsqueeze(1)
    pick = c.view(n, 1, 1).expand(n, 1, M)
    a_c, room_c = a.gather(1, pick), room.gather(1, pick)  # (n, 1, M)
    b_c = torch.where(found, (frac * b).gather(1, c.unsqueeze(1)), torch.ones_like(v_best.unsqueeze(1)))
    moves_c, _ = _box_moves(a_c, room_c, b_c, ctx.p)
    box_step = gc.gather(1, pick).sign() * moves_c
    return torch.where(found, box_step.squeeze(1), step)


def _duplicate_groups(ch: _Chunk, a: Tensor):
    """Rows of a with identical inputs (and identical given labels / targets), as
    (representative positions in a (n_u,), group of each row (n,)); None if all rows differ.

    Rows are grouped by exact equality (``torch.unique(dim=0)``, about as cheap as one pass over
    the batch); if rows with equal inputs have different labels or targets, sharing is off.
    """
    n = a.numel()
    if n < 2:
        return None
    flat = ch.x0[a].reshape(n, -1)
    uniq, inverse = torch.unique(flat, dim=0, return_inverse=True)
    n_u = uniq.shape[0]
    if n_u == n:
        return None
    pos = torch.arange(n, device=a.device)
    rep = torch.full((n_u,), n, dtype=torch.int64, device=a.device)
    rep = rep.scatter_reduce(0, inverse, pos, reduce="amin")
    back = rep[inverse]
    for t in (ch.labels, ch.target):
        if t is not None and not torch.equal(t[a], t[a][back]):
            return None
    return rep, inverse


def _iterate(ctx: _Ctx, ch: _Chunk, a: Tensor, first_attempt: bool) -> None:
    """Run DeepFool iterations for rows a of the chunk (their r already initialised).

    On the first forward of the first attempt (r = 0), rows that share an input share the
    forward and the candidate gradients (:func:`_duplicate_groups`)."""
    scale = 1.0 + ctx.overshoot
    for it in range(ctx.max_iter + 1):
        if a.numel() == 0:
            return
        groups = _duplicate_groups(ch, a) if it == 0 and first_attempt else None
        src = a if groups is None else a[groups[0]]
        with torch.no_grad():
            xa = _point(ctx, ch.x0[src], scale * ctx.space._synthesis(ch.r[src], ch.idx[src]))
        xa.requires_grad_(True)
        logits = _forward(ctx, xa)
        ch.fwd[a] += 1
        full = logits.detach() if groups is None else logits.detach()[groups[1]]
        rows = _mark_flips(ctx, ch, a, full, it, first_attempt)
        if it == ctx.max_iter or rows.numel() == 0:
            ch.iters[a[rows]] = ctx.max_iter
            return
        ar = a[rows]
        if groups is None:
            _step(ctx, ch, ar, xa, rows, logits[rows])
        else:
            _step_shared(ctx, ch, ar, xa, rows, logits, a[groups[0]], groups[1])
        # drop this iterate's graph (retained when pruning re-forwarded a subset) before the
        # next forward: holding it there doubled the peak memory of a batch
        del xa, logits
        a = ar


def _refine(ctx: _Ctx, ch: _Chunk, a: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Boundary crossing along delta for rows a: returns hi (n,) with x0 + hi*delta adversarial
    and the robust score (n,) there. Starts from the bracket [0, 1] with the scores ch.s_clean
    and ch.s_flip of rows a at its ends."""
    n = a.numel()
    dt = ch.x0.dtype
    lo = torch.zeros(n, dtype=dt, device=delta.device)
    hi = torch.ones(n, dtype=dt, device=delta.device)
    s_lo = ch.s_clean[a].clone()
    s_hi = ch.s_flip[a].clone()
    adv = ch.adv[a].clone()
    secant = torch.ones(n, dtype=torch.bool, device=delta.device)
    act = torch.arange(n, device=delta.device)
    view = (-1,) + (1,) * (delta.dim() - 1)
    tgt_all = None if ch.target is None else ch.target[a]
    for _ in range(_MAX_REFINE_ROUNDS):
        width = hi[act] - lo[act]
        open_ = width > ctx.tol * hi[act]
        act = act[open_]
        if act.numel() == 0:
            break
        l, h, sl, sh = lo[act], hi[act], s_lo[act], s_hi[act]
        w = h - l
        frac = (-sl / (sh - sl).clamp_min(torch.finfo(dt).tiny)).clamp(0.0, 1.0)
        t_est = torch.where(secant[act], l + frac * w, l + 0.5 * w)
        e = ctx.tol * h / 4
        ta = torch.maximum(t_est - e, l)
        tb = torch.minimum(t_est + e, h)
        ts = torch.cat([ta, tb])
        rows = torch.cat([a[act], a[act]])
        d2 = torch.cat([delta[act], delta[act]]) * ts.reshape(view)
        logits = _forward(ctx, _point(ctx, ch.x0[rows], d2))
        ch.fwd[a[act]] += 1
        tg = None if tgt_all is None else tgt_all[act].repeat(2)
        s = _robust_score(logits, ch.ref[rows], tg)
        pred = logits.argmax(1)
        m = act.numel()
        sa, sb, pa, pb = s[:m], s[m:], pred[:m], pred[m:]
        a_out, b_out = sa > 0, (sa <= 0) & (sb > 0)
        new_lo = torch.where(a_out, l, torch.where(b_out, ta, tb))
        new_slo = torch.where(a_out, sl, torch.where(b_out, sa, sb))
        new_hi = torch.where(a_out, ta, torch.where(b_out, tb, h))
        new_shi = torch.where(a_out, sa, torch.where(b_out, sb, sh))
        adv[act] = torch.where(a_out, pa, torch.where(b_out, pb, adv[act]))
        secant[act] = (new_hi - new_lo) <= 0.5 * w
        lo[act], hi[act], s_lo[act], s_hi[act] = new_lo, new_hi, new_slo, new_shi
    ch.adv[a] = adv
    return hi, s_hi


def _run_chunk(ctx: _Ctx, x0, idx, labels, target) -> dict:
    ch = _Chunk(ctx, x0, idx, labels, target)
    n = x0.shape[0]
    all_rows = torch.arange(n, device=x0.device)
    _iterate(ctx, ch, all_rows, first_attempt=True)
    for _ in range(ctx.noise_retries):
        failed = (~ch.done).nonzero().squeeze(1)
        if failed.numel() == 0:
            break
        xf = x0[failed]
        rms = xf.reshape(failed.numel(), -1).pow(2).mean(1).sqrt().clamp_min(1e-3)
        noise = torch.randn(xf.shape, generator=ctx.gen, dtype=x0.dtype, device=x0.device)
        noise = noise * (ctx.noise_scale * rms).reshape((-1,) + (1,) * (xf.dim() - 1))
        with torch.no_grad():
            ch.r[failed] = ctx.space._analysis(noise, idx[failed]) / (1.0 + ctx.overshoot)
        ch.retries[failed] += 1
        ch.gnorm = None if ch.gnorm is None else ch.gnorm.index_fill(0, failed, math.inf)
        _iterate(ctx, ch, failed, first_attempt=False)
    scale = 1.0 + ctx.overshoot
    with torch.no_grad():
        ok = ch.conv & ~ch.mis
        coords = torch.where(ok.unsqueeze(1), ch.r * scale, torch.zeros_like(ch.r))
        delta = ctx.space._synthesis(coords, idx)
        if ctx.clamp is None:
            raw_pert, raw = delta, _norm(coords, ctx.p)
        else:
            raw_pert = _point(ctx, x0, delta) - x0
            raw = _norm(raw_pert, ctx.p)
        pert, margin = raw_pert, raw.clone()
        rows = (ok & (ch.iters > 0) | ok & (ch.retries > 0)).nonzero().squeeze(1)
        if ctx.refine and rows.numel():
            hi, s_hi = _refine(ctx, ch, rows, delta[rows])
            coords = coords.index_copy(0, rows, coords[rows] * hi.unsqueeze(1))
            ch.s_flip[rows] = s_hi
            view = (-1,) + (1,) * (x0.dim() - 1)
            if ctx.clamp is None:
                pert = pert.index_copy(0, rows, delta[rows] * hi.reshape(view))
                margin = margin.index_copy(0, rows, raw[rows] * hi)
            else:
                p_rows = _point(ctx, x0[rows], delta[rows] * hi.reshape(view)) - x0[rows]
                pert = pert.index_copy(0, rows, p_rows)
                margin = margin.index_copy(0, rows, _norm(p_rows, ctx.p))
        df_margin = margin
    steps = torch.zeros(n, dtype=torch.int64, device=x0.device)
    extra = {}
    if ctx.tight:
        pert, margin = _tight(ctx, ch, ok.nonzero().squeeze(1), coords, pert, margin, steps)
    if ctx.class_estimates:
        est = _class_estimates(ctx, ch, ok.nonzero().squeeze(1))
        extra = {"_class_estimates": est, "_classes": ch.cand[:, :est.shape[1]]}
    with torch.no_grad():
        inf = torch.full_like(margin, math.inf)
        margin = torch.where(ch.conv, margin, inf)
        df_margin = torch.where(ch.conv, df_margin, inf)
        raw = torch.where(ch.conv, raw, inf)
    adv = torch.where(ch.conv, ch.adv, ch.ref)
    return dict(perturbation=pert, margin=margin, raw_margin=raw, iterations=ch.iters,
                converged=ch.conv, orig_label=ch.ref, adv_label=adv, retries=ch.retries,
                misclassified=ch.mis, sample_forward=ch.fwd, sample_gradients=ch.ngrad,
                deepfool_margin=df_margin, tight_steps=steps, **extra)


def _class_estimates(ctx: _Ctx, ch: _Chunk, rows: Tensor) -> Tensor:
    """Linearised distance at the clean input to each candidate class's boundary, for rows
    (converged, correctly classified): the nearest point of f_c - f_ref >= 0 linearised at x0 (in
    the coordinates of the member, inside the box with a clamp). (n, J) for the chunk's first J =
    min(candidates - 1, TIGHT_CLASS_POOL) candidates ch.cand (the most likely other classes), inf
    for other rows and for classes the box keeps out of reach. One forward and J reverse rows per
    distinct input (rows sharing an input, e.g. one image x many subspaces, share them), counted as
    tight passes."""
    n, J = ch.cand.shape[0], min(ch.cand.shape[1], TIGHT_CLASS_POOL)
    est = torch.full((n, J), math.inf, dtype=ch.x0.dtype, device=ch.x0.device)
    if rows.numel() == 0:
        return est
    f0, b0 = ctx.n_forward, ctx.n_backward
    groups = _duplicate_groups(ch, rows)
    src = rows if groups is None else rows[groups[0]]
    xa = ch.x0[src].detach().requires_grad_(True)
    gap = _candidate_gaps(ch, src, _forward(ctx, xa, grad_rows=J))[:, :J]
    g = _gradients(ctx, xa, gap, None)  # (J, distinct inputs, ...)
    gap = gap.detach() if groups is None else gap.detach()[groups[1]]
    ch.fwd[rows] += 1
    ch.ngrad[rows] += J
    with torch.no_grad():
        lo = hi = None
        if ctx.clamp is not None:
            x0f = ch.x0[rows].reshape(rows.numel(), -1)
            lo, hi = ctx.clamp[0] - x0f, ctx.clamp[1] - x0f
        for j in range(J):
            gc = ctx.space._analysis(g[j] if groups is None else g[j][groups[1]], ch.idx[rows])
            _, est[rows, j] = min_norm_point(gc.unsqueeze(1), -gap[:, j:j + 1], lo, hi, ctx.p)
    ctx.tight_forward += ctx.n_forward - f0
    ctx.tight_backward += ctx.n_backward - b0
    return est


def _tight(ctx: _Ctx, ch: _Chunk, rows: Tensor, coords: Tensor, pert: Tensor, margin: Tensor,
           steps: Tensor) -> tuple[Tensor, Tensor]:
    """Tight mode for rows (the converged, correctly classified samples of the chunk): from
    DeepFool's point (coordinates coords (n, m); pert (n, ...) and margin (n,) as reported) to
    the best point of :func:`pyboundary.attacks.tight.tighten`, bracketed on its ray to tol.
    Rows where the search finds nothing better keep DeepFool's point. Returns (pert, margin);
    writes the steps taken into steps (n,) and the passes into ctx.tight_forward/backward."""
    if rows.numel() == 0:
        return pert, margin
    f0, b0 = ctx.n_forward, ctx.n_backward
    if ctx.clamp is not None:  # the realised perturbation: x0 + c lies in the box
        coords = pert.reshape(pert.shape[0], -1)

    def grad(out, xa):
        ctx.n_backward += 1
        ctx.trace[-1] = (ctx.trace[-1][0], ctx.trace[-1][1] + 1)
        return torch.autograd.grad(out, xa)[0]

    tgt = None if ch.target is None else ch.target[rows]
    res = tighten(lambda xa: _forward(ctx, xa), grad, lambda x0, d: _point(ctx, x0, d), ctx.space,
                  ch.x0[rows], ch.idx[rows], ch.ref[rows], tgt, coords[rows], ch.s_flip[rows],
                  ch.adv[rows], p=ctx.p, clamp=ctx.clamp, steps=ctx.tight_steps)
    ch.fwd[rows] += res.forward
    ch.ngrad[rows] += res.gradients
    steps[rows] = res.steps
    better = res.improved.nonzero().squeeze(1)
    if better.numel():
        rb = rows[better]
        ch.s_flip[rb], ch.adv[rb] = res.score[better], res.adv[better]
        with torch.no_grad():
            delta = ctx.space._synthesis(res.coords[better], ch.idx[rb])
            hi, _ = _refine(ctx, ch, rb, delta)
            view = (-1,) + (1,) * (delta.dim() - 1)
            p_rows = _point(ctx, ch.x0[rb], delta * hi.reshape(view)) - ch.x0[rb]
            pert = pert.index_copy(0, rb, p_rows)
            m_rows = res.norm[better] * hi if ctx.clamp is None else _norm(p_rows, ctx.p)
            margin = margin.index_copy(0, rb, m_rows)
    ctx.tight_forward += ctx.n_forward - f0
    ctx.tight_backward += ctx.n_backward - b0
    return pert, margin


def deepfool(
    model: Callable,
    x: Tensor,
    labels: Tensor | None = None,
    *,
    p=2,
    subspace: Subspace | None = None,
    subspace_index: Tensor | None = None,
    candidates: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 50,
    refine: bool = True,
    tol: float | None = None,
    clamp: tuple | None = None,
    batch_size: int | None = None,
    memory_budget=None,
    noise_retries: int = 0,
    seed: int | None = None,
    target: Tensor | None = None,
    grad_strategy: str = "auto",
    prune=True,
    noise_scale: float = DEFAULT_NOISE_SCALE,
    tight: bool = False,
    tight_steps: int | None = None,
    tight_classes: int | None = None,
    tight_class_ratio: float | None = None,
    _calls: BackoffState | None = None,
) -> DeepFoolResult:
    """Minimal adversarial perturbations (distance to the decision boundary) by batched DeepFool.

    Args:
        model: callable (N, ...) -> (N, L) logits. Left as found (mode, requires_grad, .grad).
        x: (N, ...) float32/float64 inputs, finite. Not modified.
        labels: optional (N,) int64 reference classes; samples the model already gets wrong get
            margin 0 and ``misclassified=True``. Default: the model's predictions.
        p: 2 or inf (also 'inf'/'linf').
        subspace: a :class:`pyboundary.subspaces.Subspace` (x of shape (N, *image_shape));
            None = the whole space.
        subspace_index: (N,) int64 member of the family per sample (needed unless it has one member).
        candidates: number of top classes of the clean logits considered, the reference included
            (>= 2; all classes if the model has fewer; None: all classes).
        overshoot: the accumulated perturbation is scaled by (1 + overshoot).
        max_iter: DeepFool steps before a sample is declared failed (margin inf).
        refine: bracket the boundary along the final perturbation (see module docstring).
        tol: refinement tolerance relative to the margin (default :data:`DEFAULT_TOL` = 1e-4).
        clamp: optional (lo, hi) box for the adversarial point (whole space only).
        batch_size: input rows (samples) processed together (a memory bound). None: the largest
            number that fits ``memory_budget``, from a probe of this call on the first rows
            (:func:`pyboundary._utils.batching.plan_batch_size`); a given size is checked the
            same way and refused (MemoryBudgetError, a ValueError) before any work when it
            cannot fit. A chunk that still runs out of memory (CUDA) is retried in halves.
        memory_budget: bytes the batches may use (int, ``'6GB'``, ``'40%'`` of the memory
            available now), ``'off'`` (no probe: batches of 256), or None (the default fraction
            of the available memory, :mod:`pyboundary._utils.memory`).
        noise_retries: restarts of failed samples from x + seeded Gaussian noise of standard
            deviation ``noise_scale`` x RMS(x) (projected on the subspace).
        seed: seed of the retry noise.
        target: optional (N,) int64 target classes: the smallest perturbation making the model
            predict them (targeted DeepFool); ValueError if a target is the current class, or
            when ``labels`` are given too (they define the untargeted search).
        grad_strategy: 'loop' (one reverse pass per candidate over the retained graph),
            'batched' (one vmapped reverse pass) or 'auto' (:data:`DEFAULT_GRAD_STRATEGY` per device).
        prune: skip the gradients of candidates that cannot win (True), compute all (False), or
            'audit' (compute all, step with the pruned choice, count differences).
        noise_scale: relative standard deviation of the retry noise.
        tight: search, from DeepFool's point, for a nearer boundary point (see
            :mod:`pyboundary.attacks.tight`); the margin is then per sample the smaller of the
            two, bracketed on its ray to ``tol`` (always, whatever ``refine``), and
            ``deepfool_margin`` keeps DeepFool's.
        tight_steps: norm-budget steps of the tight search per sample (default
            :data:`pyboundary.attacks.tight.TIGHT_STEPS`: 16 for p = 2, 20 for p = inf); one forward
            and one reverse row each, plus a few polish steps and the final bracketing.
        tight_classes: with ``tight`` and no ``target``: also run the targeted tight search
            towards up to ``tight_classes`` other classes per sample and keep the nearest point.
            The classes considered are the sample's most likely other classes (the candidates,
            at most :data:`pyboundary.attacks.tight.TIGHT_CLASS_POOL` = 9 of them), ranked by
            their linearised distance at the clean input (the nearest point of f_c - f_ref >= 0
            linearised at x, inside the box; the class the untargeted search ended at excluded);
            only classes within ``tight_class_ratio`` times the nearest class's distance are
            searched: the nearest boundary piece often belongs to a class other than the one
            the untargeted walk ends at, and one walk cannot leave its class's region. Cost: one
            forward and J = min(candidates, number of classes, 10) - 1 reverse rows per distinct
            input for the distances, plus one targeted tight run per class searched (0.6 per
            sample on average on the reference LeNet; benchmarks/README.md, "Tight margins").
            None: 2 (:data:`pyboundary.attacks.tight.TIGHT_CLASSES`) with ``tight``, else 0; 0:
            the untargeted search only. With ``candidates=2`` there is no other class to search.
        tight_class_ratio: the screening ratio of ``tight_classes`` (>= 1; inf: no screening).
            None: :data:`pyboundary.attacks.tight.TIGHT_CLASS_RATIO` (1.2).
        _calls: internal (the margin scan): the :class:`~pyboundary._utils.batching.BackoffState`
            that sizes the calls, shared across calls so that a lowered size stays lowered.
    Returns:
        :class:`DeepFoolResult`.
    Raises:
        ValueError: bad arguments, or x outside the clamp box (the margin would include the move
            into the box).
    """
    check_model(model)
    x = check_inputs("x", x)
    p = check_p(p)
    n = x.shape[0]
    labels = check_index_tensor("labels", labels, n, x.device)
    target = check_index_tensor("target", target, n, x.device)
    if labels is not None and target is not None:
        # the two define different searches; together an input misclassified w.r.t. labels
        # would report margin 0 although its distance to the target's region is not 0
        raise ValueError("give labels (untargeted: the margin of the labelled class, 0 for misclassified "
                         "inputs) or target (the distance to the target class's region), not both")
    candidates = check_int("candidates", candidates, minimum=2, allow_none=True)
    n_cand = sys.maxsize if candidates is None else candidates  # the engine takes min(n_cand, L)
    max_iter = check_int("max_iter", max_iter, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1, allow_none=True)
    noise_retries = check_int("noise_retries", noise_retries, minimum=0)
    overshoot = check_number("overshoot", overshoot, minimum=0, maximum=10, strict_maximum=True)
    tol = check_number("tol", DEFAULT_TOL if tol is None else tol, minimum=0, maximum=1,
                       strict_minimum=True, strict_maximum=True)
    noise_scale = check_number("noise_scale", noise_scale, minimum=0, strict_minimum=True)
    check_choice("prune", prune, (True, False, "audit"))
    clamp = check_clamp(clamp)
    check_in_box("x", x, clamp)
    if not isinstance(tight, bool):
        raise TypeError(f"tight must be a bool, got {tight!r}")
    tight_steps = check_int("tight_steps", TIGHT_STEPS[p] if tight_steps is None else tight_steps, minimum=1)
    if tight_classes is None:
        tight_classes = TIGHT_CLASSES if tight and target is None else 0
    tight_classes = check_int("tight_classes", tight_classes, minimum=0)
    if tight_class_ratio is not None and not tight:
        raise ValueError("tight_class_ratio needs tight=True (it screens the tight searches towards other classes)")
    tight_class_ratio = check_number("tight_class_ratio",
                                     TIGHT_CLASS_RATIO if tight_class_ratio is None else tight_class_ratio, minimum=1,
                                     finite=False)
    if tight_classes and not tight:
        raise ValueError("tight_classes needs tight=True (it widens the tight search)")
    if tight_classes and target is not None:
        raise ValueError("tight_classes is for untargeted searches (a target fixes the class)")
    space, idx = _resolve_space(subspace, subspace_index, x, p)
    whole_space = isinstance(space, FullSpace)
    if clamp is not None and not whole_space:
        raise ValueError("clamp is only supported in the whole space (a clamped perturbation "
                         f"would leave the subspace {space.spec_or_name()})")
    strategy = _resolve_strategy(grad_strategy, x.device)
    ctx = _Ctx(model=model, p=p, space=space, overshoot=float(overshoot), max_iter=max_iter,
               refine=bool(refine), tol=float(tol), clamp=clamp, strategy=strategy, prune=prune,
               n_cand=n_cand, noise_retries=noise_retries, noise_scale=float(noise_scale),
               gen=make_generator(seed, x.device),
               whole_space=whole_space, tight=bool(tight), tight_steps=tight_steps,
               class_estimates=bool(tight_classes) and n_cand > 2)

    def chunk(c: _Ctx, s: int, e: int) -> dict:
        return _run_chunk(c, x[s:e], idx[s:e], None if labels is None else labels[s:e],
                          None if target is None else target[s:e])

    def probe(r: int) -> None:  # the same call on the first r rows, counted and seeded apart
        chunk(replace(ctx, n_forward=0, n_backward=0, prune_choices=0, prune_mismatch=0, trace=[],
                      tight_forward=0, tight_backward=0, gen=make_generator(seed, x.device)), 0, r)

    with model_guard(model), torch.enable_grad(), explain_input_errors(model, x):
        plan = plan_batch_size(probe, n, device=x.device, batch_size=batch_size, memory_budget=memory_budget,
                               default=DEFAULT_BATCH_SIZE, unit="samples", reuse=(model, _probe_key(ctx, x)))
        calls = plan.state() if _calls is None else _calls
        parts = map_with_backoff(lambda s, e: chunk(ctx, s, e), n, calls, device=x.device) if n else []
    if parts:
        out = {k: torch.cat([q[k] for q in parts]) for k in parts[0]}
    else:
        z = torch.zeros(0, dtype=torch.int64, device=x.device)
        f = torch.zeros(0, dtype=x.dtype, device=x.device)
        out = dict(perturbation=torch.zeros_like(x), margin=f, raw_margin=f, iterations=z,
                   converged=z.bool(), orig_label=z, adv_label=z, retries=z, misclassified=z.bool(),
                   sample_forward=z, sample_gradients=z, deepfool_margin=f, tight_steps=z)
    estimates, classes = out.pop("_class_estimates", None), out.pop("_classes", None)
    res = DeepFoolResult(**out, n_forward=ctx.n_forward, n_backward=ctx.n_backward, trace=ctx.trace,
                         prune_choices=ctx.prune_choices, prune_mismatch=ctx.prune_mismatch, p=p,
                         tight=bool(tight), tight_forward=ctx.tight_forward,
                         tight_backward=ctx.tight_backward)
    if tight_classes and n:

        def targeted(rows: Tensor, classes: Tensor) -> DeepFoolResult:
            return deepfool(model, x[rows], target=classes, p=p,
                            subspace=subspace, subspace_index=None if subspace is None else idx[rows],
                            candidates=candidates, overshoot=overshoot, max_iter=max_iter,
                            refine=refine, tol=tol, clamp=clamp, batch_size=batch_size,
                            memory_budget=memory_budget, noise_retries=noise_retries, seed=seed,
                            grad_strategy=grad_strategy, prune=prune, noise_scale=noise_scale,
                            tight=True, tight_steps=tight_steps, tight_classes=0)

        if estimates is not None:
            _tighten_towards_other_classes(res, estimates, classes, tight_classes, tight_class_ratio, targeted)
    return res


def _probe_key(ctx: _Ctx, x: Tensor) -> tuple:
    """What the engine's memory per sample depends on, besides the model (see plan_batch_size's
    ``reuse``): the input's shape, dtype and device, the space and the options that change the
    rows or graphs kept per sample."""
    space = ctx.space.spec_or_name() if hasattr(ctx.space, "spec_or_name") else type(ctx.space).__name__
    return (tuple(x.shape[1:]), x.dtype, str(x.device), space, id(ctx.space) if not ctx.whole_space else 0,
            ctx.p, ctx.clamp, ctx.strategy, ctx.prune, ctx.n_cand, ctx.refine, ctx.tight, ctx.tight_steps,
            ctx.class_estimates, ctx.noise_retries)


def _tighten_towards_other_classes(res: DeepFoolResult, estimates: Tensor, classes: Tensor, k: int, ratio: float,
                                   targeted: Callable[[Tensor, Tensor], DeepFoolResult]) -> None:
    """Update res in place with targeted tight searches towards up to k other classes per sample.

    estimates: (N, J) linearised distances at the clean inputs to the boundaries of the candidate
    classes classes (N, J) (:func:`_class_estimates`). For the samples the untargeted search
    flipped (converged, not misclassified), the classes other than the one already reached whose
    distance is at most ratio x the smallest one, nearest first; for rank j < k,
    ``targeted(rows, classes)`` runs on every sample that has a j-th such class, and a nearer point
    replaces the sample's perturbation, margin and adversarial class. All its passes count as tight
    passes (``tight_forward`` / ``tight_backward``, ``n_forward`` / ``n_backward``).
    """
    rows = (res.converged & ~res.misclassified).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    est, cls = estimates[rows], classes[rows]
    nearest = est.min(1, keepdim=True).values
    eligible = (cls != res.adv_label[rows, None]) & torch.isfinite(est) & (est <= ratio * nearest)
    order = est.masked_fill(~eligible, math.inf).argsort(dim=1, stable=True)
    ranked = cls.gather(1, order)
    usable = eligible.gather(1, order)
    for j in range(min(k, ranked.shape[1])):
        have = usable[:, j]
        if not bool(have.any()):
            break
        sub = rows[have]
        t = targeted(sub, ranked[have, j])
        better = t.converged & (t.margin < res.margin[sub])
        res.tight_steps[sub] += t.tight_steps
        res.sample_forward[sub] += t.sample_forward
        res.sample_gradients[sub] += t.sample_gradients
        res.n_forward += t.n_forward
        res.n_backward += t.n_backward
        res.tight_forward += t.n_forward
        res.tight_backward += t.n_backward
        won = sub[better]
        res.perturbation[won] = t.perturbation[better]
        res.margin[won] = t.margin[better]
        res.adv_label[won] = t.adv_label[better]


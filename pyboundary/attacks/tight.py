"""Tight mode of the DeepFool engine: from DeepFool's boundary point towards the nearest one.

DeepFool finds *a* boundary point; its norm is an upper bound on the distance to the boundary.
:func:`tighten` walks from that point towards a nearer one with norm-budget steps (the idea of
FMN, Pintor et al. 2021; our own implementation): at the iterate delta (in the coordinates of the
subspace member; the flattened perturbation in the whole space) with budget eps,

1. one forward and one reverse pass give the robust score s (> 0: adversarial) and the gradient
   g of the attacking logit gap F = f_c - f_ref (c: the strongest other class at the iterate; for a
   targeted search F = f_t - max_{c != t} f_c);
2. adversarial iterates shrink the budget, eps <- min(eps (1 - gamma), best norm); others grow it,
   eps <- eps (1 + gamma);
3. delta moves along the gradient by alpha ||delta|| (L2: the normalised gradient; L-inf: its sign),
   then is projected onto the eps ball of the norm and, with a clamp box, into the box.

alpha and gamma decay from (``ALPHA[0]``, ``GAMMA[0]``) to (``ALPHA[1]``, ``GAMMA[1]``) on a cosine
over the steps. The smallest adversarial iterate of each row is kept (the start included, so the
result is never worse than DeepFool's point); the engine then brackets the boundary along it.
A row leaves the batch (compaction) after its ``steps`` or after ``PATIENCE`` steps without a
better point. Constants were chosen on the train split of Fashion-MNIST (benchmarks/README.md,
"Tight margins"), not on the images that the benchmark reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ._boundary import box_moves, norm, robust_score

#: Default number of norm-budget steps per norm (one forward and one reverse row each, per sample).
#: Measured on the train split (200 inputs, reference LeNet, box [0, 1]), median ratio to the best
#: known margin: L2 12 / 16 / 20 steps 1.0096 / 1.0066 / ~1.007; L-inf 12 / 16 / 20 steps
#: 1.0129 / 1.0107 / 1.0083 (benchmarks/README.md, "Tight margins").
TIGHT_STEPS = {2.0: 16, math.inf: 20}
#: Other classes the tight mode also searches towards by default (``deepfool``'s ``tight_classes``):
#: the nearest boundary piece often belongs to a class other than the one the untargeted walk ends
#: at, and one walk cannot leave its class's region.
TIGHT_CLASSES = 2
#: A class is searched towards only if its linearised distance at the clean input (the nearest
#: point of f_c - f_ref >= 0 linearised at x, inside the box) is at most this factor times the
#: smallest such distance over the candidate classes. Measured on the train split (500 inputs,
#: reference LeNet, box [0, 1], every class's targeted tight margin computed; p90 of the per-sample
#: ratio to the best known / targeted runs per sample, 2 classes): L2 no screening 1.0223 / 2.0,
#: ratio 1.5 1.0223 / 1.11, **1.2 1.0223 / 0.59**, 1.1 1.0261 / 0.34; L-inf no screening 1.0198 /
#: 2.0, 1.2 1.0200 / 0.65, 1.1 1.0217 / 0.38. Ranking the classes by this distance beat ranking them
#: by clean logit at every ratio (L2, 1.2: p90 1.0223 vs 1.0234). benchmarks/README.md, "Tight margins".
TIGHT_CLASS_RATIO = 1.2
#: The classes screened are at most this many of the most likely other classes (the engine's
#: candidates, by clean logit): the study above screened all 9 other classes of a 10-class model,
#: and one reverse row per class screened must stay small next to a tight run on 1000 classes.
TIGHT_CLASS_POOL = 9
#: Step length relative to the iterate's norm, first and last step (cosine decay).
ALPHA = (2.0, 0.02)
#: Relative change of the norm budget per step, first and last step (cosine decay).
GAMMA = (0.05, 0.001)
#: A row stops after this many steps without a better adversarial point (None: never).
PATIENCE = None
#: L-inf step: "l2" (alpha ||delta||_inf sqrt(M) g/||g||_2, the scaled normalised gradient as in
#: FMN) or "sign" (alpha ||delta||_inf sign(g)). Train split, 12 steps: median ratio 1.0129 vs 1.0255.
LINF_STEP = "l2"
#: At most this many polish steps after the budget steps (min-norm points of linearisations); a
#: row stops earlier after two polish queries in a row that find nothing better.
POLISH_STEPS = 8
#: The polish aims this many ulps of the largest |logit| past the linearised boundary: past the
#: float-noise band of the adversarial test (robust_score), and no further (a larger push bends
#: the direction of a box-clipped point away from the optimum's).
_POLISH_PUSH_ULPS = 64


@dataclass
class TightOut:
    """Per row (n = rows tightened): best coordinates (n, m), their norm (n,), robust score (n,)
    and predicted class (n,) there, whether it beats the start (n,) bool, steps taken (n,),
    forward evaluations (n,) and gradients (n,) of the row (int64)."""

    coords: Tensor
    norm: Tensor
    score: Tensor
    adv: Tensor
    improved: Tensor
    steps: Tensor
    forward: Tensor
    gradients: Tensor


def _cosine(i: int, steps: int, pair) -> float:
    c = (1 + math.cos(math.pi * i / max(steps, 1))) / 2
    return pair[1] + (pair[0] - pair[1]) * c


def _attack_gap(logits: Tensor, ref: Tensor, target: Tensor | None) -> Tensor:
    """F (n,) to increase: f_c - f_ref with c the strongest other class, or f_t - max_{c != t} f_c."""
    if target is None:
        c = logits.detach().scatter(1, ref.unsqueeze(1), -math.inf).argmax(1)
        return logits.gather(1, c.unsqueeze(1)).squeeze(1) - logits.gather(1, ref.unsqueeze(1)).squeeze(1)
    c = logits.detach().scatter(1, target.unsqueeze(1), -math.inf).argmax(1)
    return logits.gather(1, target.unsqueeze(1)).squeeze(1) - logits.gather(1, c.unsqueeze(1)).squeeze(1)


def _project(c: Tensor, eps: Tensor, p: float) -> Tensor:
    """Rows of c (n, m) onto the eps (n,) ball of the norm p."""
    if math.isinf(p):
        e = eps.unsqueeze(1)
        return torch.maximum(torch.minimum(c, e), -e)
    nc = c.norm(dim=1).clamp_min(torch.finfo(c.dtype).tiny)
    return c * torch.clamp(eps / nc, max=1.0).unsqueeze(1)


def _step(c: Tensor, gc: Tensor, nd: Tensor, alpha: float, p: float) -> Tensor:
    tiny = torch.finfo(c.dtype).tiny
    if math.isinf(p):
        if LINF_STEP == "sign":
            return c + alpha * nd.unsqueeze(1) * gc.sign()
        scale = alpha * nd * math.sqrt(c.shape[1]) / gc.norm(dim=1).clamp_min(tiny)
        return c + scale.unsqueeze(1) * gc
    return c + (alpha * nd / gc.norm(dim=1).clamp_min(tiny)).unsqueeze(1) * gc


def min_norm_point(G: Tensor, beta: Tensor, lo: Tensor | None, hi: Tensor | None, p: float):
    """Nearest point to 0 of the linearised boundaries: argmin ||d||_p s.t. G[:, j] . d >= beta[:, j]
    for j < k and lo <= d <= hi.

    G: (n, k, m), k = 1 or 2 (row 0 the latest linearisation); beta: (n, k); lo <= 0 <= hi: (n, m)
    bounds of d or None (no box). Both constraints are used for p = 2 without a box (closed form:
    one constraint alone when its point satisfies the other, else d = G^T (G G^T)^-1 beta); in the
    other cases only row 0 (the exact two-constraint problem is a small LP / box QP, not solved
    here). Returns (d (n, m), value (n,)); value = +inf where the box cannot reach the constraint.
    """
    d0, v0 = _single(G[:, 0], beta[:, 0], lo, hi, p)
    if G.shape[1] == 1 or lo is not None or math.isinf(p):
        return d0, v0
    d1, v1 = _single(G[:, 1], beta[:, 1], lo, hi, p)

    def slack(d):
        return torch.einsum("nkm,nm->nk", G, d) - beta

    tol = 1e-9 * beta.abs().amax(1)
    ok0 = slack(d0)[:, 1] >= -tol
    ok1 = slack(d1)[:, 0] >= -tol
    gram = G @ G.transpose(1, 2)  # (n, 2, 2)
    det = gram[:, 0, 0] * gram[:, 1, 1] - gram[:, 0, 1] ** 2
    safe = det > 1e-12 * gram[:, 0, 0] * gram[:, 1, 1]
    adj = torch.stack([torch.stack([gram[:, 1, 1], -gram[:, 0, 1]], 1),
                       torch.stack([-gram[:, 0, 1], gram[:, 0, 0]], 1)], 1)
    mu = (adj @ beta.unsqueeze(2)).squeeze(2) / det.where(safe, torch.ones_like(det)).unsqueeze(1)
    d2 = (G.transpose(1, 2) @ mu.unsqueeze(2)).squeeze(2)  # both constraints active
    both = safe & (mu >= 0).all(1)
    pick = torch.where(ok0, 0, torch.where(ok1, 1, torch.where(both, 2, 0)))
    d = torch.stack([d0, d1, d2], 1).gather(1, pick.view(-1, 1, 1).expand(-1, 1, d0.shape[1])).squeeze(1)
    v = torch.stack([v0, v1, norm(d2, p)], 1).gather(1, pick.unsqueeze(1)).squeeze(1)
    return d, v


def _single(g: Tensor, beta: Tensor, lo: Tensor | None, hi: Tensor | None, p: float):
    """argmin ||d||_p s.t. g . d >= beta, lo <= d <= hi (rows): coordinates move towards sign(g)
    by min(lambda |g_i|, room_i) (p = 2) or min(t, room_i) (p = inf)
    (:func:`pyboundary.attacks._boundary.box_moves`). g: (n, m); beta: (n,). -> (d, value)."""
    a = g.abs()
    if lo is None:
        room = torch.full_like(g, math.inf)
    else:
        room = torch.where(g > 0, hi, -lo).clamp_min(0)
    moves, feasible = box_moves(a, room, beta.clamp_min(0), p)
    d = g.sign() * moves
    d = torch.where(feasible.unsqueeze(1), d, g.sign() * room.nan_to_num(posinf=0.0))
    d = torch.where((beta > 0).unsqueeze(1), d, torch.zeros_like(d))
    val = torch.where(feasible | (beta <= 0), norm(d, p), torch.full_like(beta, math.inf))
    return d, val


def tighten(forward: Callable[[Tensor], Tensor], grad: Callable[[Tensor, Tensor], Tensor],
            point: Callable[[Tensor, Tensor], Tensor], space,
            x0: Tensor, idx: Tensor, ref: Tensor, target: Tensor | None, c0: Tensor, s0: Tensor,
            adv0: Tensor, *, p: float, clamp: tuple | None, steps: int) -> TightOut:
    """Search for nearer adversarial points than the start c0, rows in one batch (see the module
    docstring).

    Args:
        forward: xa (k, ...) -> logits (k, L) in xa's dtype (the engine's counted forward).
        grad: (scalar, xa) -> d scalar / d xa (the engine's counted reverse pass).
        point: (x0 rows, perturbation rows) -> input points (clamped to the box when there is one).
        space: the engine's coordinate space (``_analysis``/``_synthesis`` with member indices).
        x0: (n, ...) inputs; idx: (n,) members; ref: (n,) reference classes; target: (n,) or None.
        c0: (n, m) coordinates of the start, an adversarial point (with a clamp, x0 + c0 lies in
            the box); s0: (n,) its robust score (> 0); adv0: (n,) its class.
        p: 2.0 or inf (norm of the coordinates); clamp: (lo, hi) or None (whole space only).
        steps: maximal steps per row (>= 1).
    Returns:
        :class:`TightOut`.
    """
    n = c0.shape[0]
    dev = c0.device
    best = c0.clone()
    best_n = norm(c0, p)
    best_s, best_adv = s0.clone(), adv0.clone()
    improved = torch.zeros(n, dtype=torch.bool, device=dev)
    taken = torch.zeros(n, dtype=torch.int64, device=dev)
    fwd = torch.zeros(n, dtype=torch.int64, device=dev)
    grads = torch.zeros(n, dtype=torch.int64, device=dev)
    stale = torch.zeros(n, dtype=torch.int64, device=dev)
    # linearisations g . d >= beta of the attack gap: [last query, previous query, best point]
    lin_g = torch.zeros((n, 3) + c0.shape[1:], dtype=c0.dtype, device=dev)
    lin_b = torch.full((n, 3), math.inf, dtype=c0.dtype, device=dev)  # (inf: none yet)
    best_is_last = torch.zeros(n, dtype=torch.bool, device=dev)
    last_c = c0.clone()  # coordinates of the last query
    scale = torch.zeros(n, dtype=c0.dtype, device=dev)  # largest |logit| seen, for the push
    cur, eps = c0.clone(), best_n.clone()
    x0f = x0.reshape(n, -1) if clamp is not None else None

    def query(a, c, i):
        """Forward (and reverse) at coordinates c of rows a; records the best points and the
        linearisation of the attack gap. Returns (score, norm, gradient coordinates, better)."""
        with torch.no_grad():
            xa = point(x0[a], space._synthesis(c, idx[a]))
        xa.requires_grad_(True)
        logits = forward(xa)
        fwd[a] += 1
        tg = None if target is None else target[a]
        gap = _attack_gap(logits, ref[a], tg)
        g = grad(gap.sum(), xa)
        grads[a] += 1
        with torch.no_grad():
            lg = logits.detach()
            s = robust_score(lg, ref[a], tg)
            nd = norm(c, p)
            better = (s > 0) & (nd < best_n[a])
            rows = a[better]
            best[rows], best_n[rows], best_s[rows] = c[better], nd[better], s[better]
            best_adv[rows] = lg[better].argmax(1)
            improved[rows] = True
            stale[a] = torch.where(better, torch.zeros_like(stale[a]), stale[a] + 1)
            gc = space._analysis(g, idx[a])
            lin_g[a, 1], lin_b[a, 1] = lin_g[a, 0], lin_b[a, 0]
            lin_g[a, 0], lin_b[a, 0] = gc, (gc * c).sum(1) - gap.detach()
            at_best = better | (i == 0)  # the start is the best point until beaten
            rb = a[at_best]
            lin_g[rb, 2], lin_b[rb, 2] = lin_g[rb, 0], lin_b[rb, 0]
            best_is_last[a] = at_best
            last_c[a] = c
            scale[a] = torch.maximum(scale[a], lg.abs().amax(1))
        return s, nd, gc, better

    # 1. norm-budget steps
    a = torch.arange(n, device=dev)
    for i in range(steps + 1):
        if a.numel() == 0:
            break
        c = cur[a]
        s, nd, gc, _ = query(a, c, i)
        if i > 0:
            taken[a] += 1
        if i == steps:
            break
        with torch.no_grad():
            gamma, alpha = _cosine(i, steps, GAMMA), _cosine(i, steps, ALPHA)
            e = eps[a]
            e = torch.where(s > 0, torch.minimum(e * (1 - gamma), best_n[a]), e * (1 + gamma))
            eps[a] = e
            c = _project(_step(c, gc, nd, alpha, p), e, p)
            if clamp is not None:
                c = (x0f[a] + c).clamp(clamp[0], clamp[1]) - x0f[a]
            cur[a] = c
            if PATIENCE is not None:
                a = a[stale[a] < PATIENCE]
    # 2. polish, from the linearisations of the queries (g . d >= beta). A row whose last query
    # found a better point (or that starts) queries the min-norm point of the latest
    # linearisation (an SQP step). A row whose last query found nothing better queries two
    # points: the min-norm point of the latest linearisation together with the one at the best
    # point (the previous one when both are the same piece): exact on a
    # piecewise-affine boundary once both pieces are known; and the point on the ray through the
    # last query, last (1 + 2 eta), eta the Newton step of its linearisation along the ray (a
    # curved, e.g. convex, adversarial set is approached from outside; the ray's direction is what
    # counts, the final bracketing finds its crossing). A row stops after two rounds in a row
    # that find nothing better, or when no candidate could beat its best.
    a = torch.arange(n, device=dev)
    fails = torch.zeros(n, dtype=torch.int64, device=dev)
    for _ in range(POLISH_STEPS):
        if a.numel() == 0:
            break
        with torch.no_grad():
            push = _POLISH_PUSH_ULPS * torch.finfo(scale.dtype).eps * scale[a]
            lo = hi = None
            if clamp is not None:
                lo, hi = clamp[0] - x0f[a], clamp[1] - x0f[a]
            retry = ~best_is_last[a]  # the last query did not find the best point
            gl, gb = lin_g[a, 0], lin_g[a, 2]
            cos = (gl * gb).sum(1) / (gl.norm(dim=1) * gb.norm(dim=1)).clamp_min(torch.finfo(gl.dtype).tiny)
            # pair the latest with the best point's linearisation, or the previous one when that
            # one is the same piece (or the latest query found the best)
            other = torch.where(retry & (cos < 1 - 1e-9), 2, 1)
            G = torch.stack([lin_g[a, 0], lin_g[a, other]], 1)
            B = torch.stack([lin_b[a, 0], lin_b[a, other]], 1) + push.unsqueeze(1)
            # per row (results must not depend on the batch): two constraints after a failed
            # query when a second linearisation exists, else the latest alone (a duplicate)
            two = retry & torch.isfinite(B[:, 1])
            G[:, 1] = torch.where(two.unsqueeze(1), G[:, 1], G[:, 0])
            B[:, 1] = torch.where(two, B[:, 1], B[:, 0])
            d, val = min_norm_point(G, B, lo, hi, p)
            lc = last_c[a]
            along = (lin_g[a, 0] * lc).sum(1)
            ratio = B[:, 0] / along.where(along > 0, torch.ones_like(along))
            dr = lc * (2 * ratio - 1).unsqueeze(1)
            if clamp is not None:
                dr = (x0f[a] + dr).clamp(clamp[0], clamp[1]) - x0f[a]
            vr = torch.where(retry & (along > 0) & (ratio > 1), norm(dr, p), torch.full_like(val, math.inf))
            use_p = torch.isfinite(val) & (val < best_n[a])
            use_r = torch.isfinite(vr) & (vr < best_n[a])
        if not bool((use_p | use_r).any()):
            break
        success = torch.zeros(a.numel(), dtype=torch.bool, device=dev)
        for use, pts in ((use_p, d), (use_r, dr)):
            if bool(use.any()):
                success[use] |= query(a[use], pts[use], None)[3]
        taken[a[use_p | use_r]] += 1
        fails[a] = torch.where(success, torch.zeros_like(fails[a]), fails[a] + 1)
        a = a[(fails[a] < 2) & (use_p | use_r)]
    return TightOut(coords=best, norm=best_n, score=best_s, adv=best_adv, improved=improved, steps=taken,
                    forward=fwd, gradients=grads)

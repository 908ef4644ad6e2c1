"""Scores and norms shared by the DeepFool engine and its tight mode.

A score s(x) > 0 means "adversarial" (the label changed, or the target won); the robust score
subtracts the float noise of the logits so that a point reported adversarial stays adversarial
when it is evaluated again in another batch composition.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Scores within this many ulps of the largest |logit| count as "not adversarial".
NOISE_ULPS = 16


def score(logits: Tensor, ref: Tensor, target: Tensor | None) -> Tensor:
    """s > 0 iff adversarial: max_{c != ref} f_c - f_ref, or f_t - max_{c != t} f_c (targeted).

    logits (n, L); ref, target (n,) int64 -> (n,)."""
    cls = ref if target is None else target
    own = logits.gather(1, cls.unsqueeze(1)).squeeze(1)
    other = logits.scatter(1, cls.unsqueeze(1), -math.inf).max(1).values
    return other - own if target is None else own - other


def robust_score(logits: Tensor, ref: Tensor, target: Tensor | None) -> Tensor:
    """:func:`score` minus the float noise of the logits: > 0 means clearly adversarial."""
    noise = NOISE_ULPS * torch.finfo(logits.dtype).eps * logits.abs().amax(1)
    return score(logits, ref, target) - noise


def norm(v: Tensor, p: float) -> Tensor:
    """Per-row L2 or L-inf norm of (n, ...) -> (n,)."""
    if v.shape[0] == 0:
        return v.new_zeros(0)
    flat = v.reshape(v.shape[0], -1)
    return flat.abs().amax(1) if math.isinf(p) else flat.norm(dim=1)


def dual_norm(g: Tensor, p: float) -> Tensor:
    """Dual norm over the last dimension: L1 for p = inf, L2 for p = 2."""
    return g.abs().sum(-1) if math.isinf(p) else g.norm(dim=-1)


def box_root(w: Tensor, room: Tensor, b: Tensor, max_rounds: int = 50):
    """Smallest t >= 0 with phi(t) = sum_i w_i min(t, room_i) >= b, by Newton steps from below.

    phi is concave, non-decreasing and piecewise linear, so Newton steps from the lower bound
    b / sum(w) never pass the root and reach it after at most one round per breakpoint crossed
    (a handful in practice). w, room: (..., M) >= 0; b: (...) > 0. Returns t (...) and feasible
    (...) bool (sum_i w_i room_i >= b; t is meaningless where False)."""
    tiny = torch.finfo(w.dtype).tiny
    # room may be +inf (no box); a coordinate with w = 0 then adds nothing (not 0 * inf)
    feasible = torch.where(w > 0, w * room, torch.zeros_like(w)).sum(-1) >= b
    t = b / w.sum(-1).clamp_min(tiny)
    for _ in range(max_rounds):
        te = t.unsqueeze(-1)
        phi = (w * torch.minimum(te, room)).sum(-1)
        slope = (w * (room > te)).sum(-1)
        short = feasible & (phi < b * (1 - 4 * torch.finfo(w.dtype).eps)) & (slope > 0)
        if not bool(short.any()):
            break
        t = torch.where(short, t + (b - phi) / slope.clamp_min(tiny), t)
    return t, feasible


def box_moves(a: Tensor, room: Tensor, b: Tensor, p: float):
    """The minimum-norm way to gain b along non-negative weights inside a box, per row of (..., M):
    argmin ||m||_p s.t. sum_i a_i m_i >= b, 0 <= m_i <= room_i. For p = inf m_i = min(t, room_i),
    for p = 2 m_i = min(lambda a_i, room_i), the scalar the root found by :func:`box_root` (for
    p = 2 on weights a_i^2 and rooms room_i / a_i). a, room: (..., M) >= 0 (room may be +inf);
    b: (...) > 0. Returns moves (..., M) and feasible (...) (moves are meaningless where False).
    A signed step towards sign(g) is ``g.sign() * moves`` with a = |g|."""
    if math.isinf(p):
        t, feasible = box_root(a, room, b)
        return torch.minimum(t.unsqueeze(-1), room), feasible
    scaled = torch.where(a > 0, room / a.clamp_min(torch.finfo(a.dtype).tiny), torch.full_like(room, math.inf))
    lam, feasible = box_root(a * a, scaled, b)
    return torch.minimum(lam.unsqueeze(-1) * a, room), feasible

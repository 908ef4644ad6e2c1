"""Study: candidate algorithms for the tight mode (minimal perturbation from the DeepFool point).

Prototypes in plain torch (whole space, box [0, 1]) compared on the *tuning* split (train images
by default; the report uses the test split) against the best known margins cached by
``bench_tight.py`` (run it first for the same split, n and p)::

    .venv/bin/python benchmarks/study_tight.py --split train --n 200 --p 2

Every prototype starts from pyboundary's refined DeepFool point and ends with a bisection of its
best adversarial point along the ray from x; rows through the model are counted per sample.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _peers import Counted, norms  # noqa: E402
from bench_tight import load_problem  # noqa: E402

import pyboundary  # noqa: E402
from pyboundary.attacks._boundary import box_root as _box_linf_root  # noqa: E402

LO, HI = 0.0, 1.0


def flat(t):
    return t.reshape(t.shape[0], -1)


def top_other(logits, labels, k=1):
    """(N, k) classes with the largest logits other than the label."""
    return logits.scatter(1, labels[:, None], -math.inf).topk(k, dim=1).indices


def lin_solve(g, beta, x0, p):
    """argmin ||d||_p s.t. <g, d> >= beta, LO <= x0 + d <= HI (rows). g, x0: (N, D); beta (N,).

    Rows with beta <= 0 get d = 0. Infeasible rows get the box corner that maximises <g, d>."""
    room = torch.where(g > 0, HI - x0, x0 - LO).clamp_min(0)
    a = g.abs()
    b = beta.clamp_min(0)
    if math.isinf(p):
        t, feas = _box_linf_root(a, room, b)
        d = g.sign() * torch.minimum(t[:, None], room)
    else:
        rr = torch.where(a > 0, room / a.clamp_min(1e-30), torch.full_like(room, math.inf))
        lam, feas = _box_linf_root(a * a, rr, b)
        d = g.sign() * torch.minimum(lam[:, None] * a, room)
    d = torch.where(feas[:, None], d, g.sign() * room)
    return torch.where((beta > 0)[:, None], d, torch.zeros_like(d))


def grad_gap(model, x0, d, labels, cls):
    """F = f_cls - f_label at x0 + d, its gradient (N, D) and the logits; 1 forward + 1 reverse row."""
    xa = (x0 + d).detach().requires_grad_(True)
    lg = model(xa.reshape((-1, 1, 28, 28)))
    F = lg.gather(1, cls[:, None]).squeeze(1) - lg.gather(1, labels[:, None]).squeeze(1)
    (g,) = torch.autograd.grad(F.sum(), xa)
    return F.detach(), g, lg.detach()


def bisect(model, x0, d, labels, steps=14):
    """Smallest t in (0, 1] (to 2^-steps) with x0 + t d adversarial; d adversarial. -> t d."""
    lo = torch.zeros(d.shape[0])
    hi = torch.ones(d.shape[0])
    with torch.no_grad():
        for _ in range(steps):
            mid = (lo + hi) / 2
            adv = model((x0 + mid[:, None] * d).reshape(-1, 1, 28, 28)).argmax(1) != labels
            hi = torch.where(adv, mid, hi)
            lo = torch.where(adv, lo, mid)
    return hi[:, None] * d


def newton(model, x0, labels, d0, p, iters=10, eta=1.0, k=1, eta_decay=1.0):
    """Project x0 onto the linearised boundary at the iterate, repeatedly (SQP without Hessian).

    k candidate classes (top-k other logits at the iterate); the one whose linearised boundary is
    closest to x0 is used. eta damps the move towards the projection."""
    d = d0.clone()
    best = d0.clone()
    best_n = norms(d0, p)
    e = eta
    for it in range(iters):
        xa = (x0 + d).detach().requires_grad_(True)
        lg = model(xa.reshape(-1, 1, 28, 28))
        cls = top_other(lg.detach(), labels, k)
        own = lg.gather(1, labels[:, None])
        gaps = lg.gather(1, cls) - own  # (N, k)
        adv = gaps.detach().max(1).values > 0
        n_d = norms(d, p)
        better = adv & (n_d < best_n)
        best = torch.where(better[:, None], d, best)
        best_n = torch.where(better, n_d, best_n)
        if it == iters - 1:
            break
        gs = []
        for j in range(k):
            (g,) = torch.autograd.grad(gaps[:, j].sum(), xa, retain_graph=j < k - 1)
            gs.append(g)
        cand_d, cand_n = [], []
        for j in range(k):
            g = gs[j]
            beta = (g * d).sum(1) - gaps[:, j].detach()
            dj = lin_solve(g, beta, x0, p)
            cand_d.append(dj)
            cand_n.append(norms(dj, p))
        nn_ = torch.stack(cand_n, 1)
        j = nn_.argmin(1)
        target = torch.stack(cand_d, 1)[torch.arange(d.shape[0]), j]
        d = d + e * (target - d)
        d = (x0 + d).clamp(LO, HI) - x0
        e = max(e * eta_decay, 0.3)
    return bisect(model, x0, best, labels)


def sdf_like(model, x0, labels, d0, p, iters=5):
    """Tangent projection of x0 at the boundary point, then one DeepFool-like step back to the
    boundary from there (single class), ray bisection of the better points."""
    d = d0.clone()
    best = d0.clone()
    best_n = norms(d0, p)
    for it in range(iters):
        xa = (x0 + d).detach().requires_grad_(True)
        lg = model(xa.reshape(-1, 1, 28, 28))
        cls = top_other(lg.detach(), labels, 1)[:, 0]
        F = lg.gather(1, cls[:, None]).squeeze(1) - lg.gather(1, labels[:, None]).squeeze(1)
        (g,) = torch.autograd.grad(F.sum(), xa)
        # tangent plane through the current (boundary) point, F term ignored
        beta = (g * d).sum(1)
        t = lin_solve(g, beta, x0, p)
        # DF step from t to the boundary
        xt = (x0 + t).detach().requires_grad_(True)
        lg2 = model(xt.reshape(-1, 1, 28, 28))
        F2 = lg2.gather(1, cls[:, None]).squeeze(1) - lg2.gather(1, labels[:, None]).squeeze(1)
        (g2,) = torch.autograd.grad(F2.sum(), xt)
        beta2 = (g2 * t).sum(1) - F2.detach() * 1.02
        d_new = lin_solve(g2, beta2, x0, p)
        with torch.no_grad():
            adv = model((x0 + d_new).reshape(-1, 1, 28, 28)).argmax(1) != labels
        dn = bisect(model, x0, d_new, labels, steps=8)
        n_new = norms(dn, p)
        better = adv & (n_new < best_n)
        best = torch.where(better[:, None], dn, best)
        best_n = torch.where(better, n_new, best_n)
        d = torch.where(adv[:, None], dn, best)
    return bisect(model, x0, best, labels)


def fmn_like(model, x0, labels, d0, p, steps=30, gamma0=0.05, gamma1=0.001, alpha0=1.0, newton=0, rel_alpha=0, target=None, bisect_steps=14, momentum=0.0):
    """FMN-style: norm budget eps decreased when adversarial, increased otherwise; normalised
    gradient steps on the logit difference, projection on the eps ball and the box."""
    d = d0.clone()
    best = d0.clone()
    best_n = norms(d0, p)
    eps = best_n.clone()
    a1 = alpha0 / 100
    for i in range(steps):
        cos = (1 + math.cos(math.pi * i / steps)) / 2
        alpha = a1 + (alpha0 - a1) * cos
        gamma = gamma1 + (gamma0 - gamma1) * cos
        xa = (x0 + d).detach().requires_grad_(True)
        lg = model(xa.reshape(-1, 1, 28, 28))
        top = top_other(lg.detach(), labels, 1)[:, 0]
        cls = top if target is None else target
        F = lg.gather(1, cls[:, None]).squeeze(1) - lg.gather(1, labels[:, None]).squeeze(1)
        (g,) = torch.autograd.grad(F.sum(), xa)
        adv = (lg.detach().gather(1, top[:, None]) > lg.detach().gather(1, labels[:, None])).squeeze(1)
        n_d = norms(d, p)
        better = adv & (n_d < best_n)
        best = torch.where(better[:, None], d, best)
        best_n = torch.where(better, n_d, best_n)
        if newton:
            gq = g.norm(p=1.0 if math.isinf(p) else 2.0, dim=1).clamp_min(1e-12)
            lin = n_d - F.detach() / gq  # linearised boundary norm
            eps = torch.where(adv, torch.minimum(torch.maximum(lin, eps * (1 - newton * gamma)), best_n),
                              torch.minimum(lin, eps * (1 + newton * gamma)))
        else:
            eps = torch.where(adv, torch.minimum(eps * (1 - gamma), best_n), eps * (1 + gamma))
        step = alpha * (n_d[:, None] if rel_alpha else 1.0)
        gu = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if momentum:
            mom = gu if i == 0 else momentum * mom + (1 - momentum) * gu  # noqa: F821 (set at i == 0)
            gu = mom / mom.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = d + step * gu
        if math.isinf(p):
            d = torch.maximum(torch.minimum(d, eps[:, None]), -eps[:, None])
        else:
            nd = d.norm(dim=1, keepdim=True)
            d = d * torch.clamp(eps[:, None] / nd.clamp_min(1e-12), max=1.0)
        d = (x0 + d).clamp(LO, HI) - x0
    return bisect(model, x0, best, labels, steps=bisect_steps)


def multi(model, x0, labels, d0, p, rho=1.25, steps=15, max_extra=1):
    """fmn_like from the DeepFool point, plus, for the classes whose linearised distance at x0
    is within rho of the smallest (at most max_extra of them, DeepFool's class excluded), a
    targeted DeepFool start and fmn_like on that class; the best per sample."""
    n = x0.shape[0]
    shape = (n, 1, 28, 28)
    xa = x0.clone().requires_grad_(True)
    lg = model(xa.reshape(shape))
    own = lg.gather(1, labels[:, None]).squeeze(1)
    est = torch.full((n, 10), math.inf)
    for c in range(10):
        (g,) = torch.autograd.grad((lg[:, c] - own).sum(), xa, retain_graph=c < 9)
        est[:, c] = (lg[:, c] - own).detach().abs() / norms(g, p if False else p).clamp_min(1e-12) if False else \
            (lg[:, c] - own).detach().abs() / g.norm(p=1.0 if math.isinf(p) else 2.0, dim=1).clamp_min(1e-12)
    est.scatter_(1, labels[:, None], math.inf)
    with torch.no_grad():
        c_df = model((x0 + d0).reshape(shape)).argmax(1)
    est_min = est.min(1).values.clamp_min(1e-12)
    est.scatter_(1, c_df[:, None], math.inf)
    best = fmn_like(model, x0, labels, d0, p, steps=steps)
    best_n = norms(best, p)
    order = est.argsort(1)
    for j in range(max_extra):
        t = order[:, j]
        sel = est.gather(1, t[:, None]).squeeze(1) <= rho * est_min
        rows = sel.nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        r = pyboundary.deepfool(model, x0[rows].reshape((-1, 1, 28, 28)), labels=labels[rows], p=p,
                                clamp=(LO, HI), target=t[rows])
        ok = r.converged
        rows = rows[ok]
        d1 = fmn_like(model, x0[rows], labels[rows], flat(r.perturbation[ok]), p, steps=steps, target=t[rows])
        n1 = norms(d1, p)
        better = n1 < best_n[rows]
        best[rows[better]] = d1[better]
        best_n[rows[better]] = n1[better]
    return best


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="train")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--ref-n", type=int, default=500, help="n of the cached bench_tight run")
    ap.add_argument("--p", default="2")
    ap.add_argument("--cache", default="out/tight")
    ap.add_argument("--only", default=None)
    ap.add_argument("--grid", default=None, help="variants 'fn:k=v,k=v;fn:...'")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    p = math.inf if args.p in ("inf", "linf") else 2.0
    tag = "inf" if math.isinf(p) else "2"
    ref = torch.load(os.path.join(args.cache, f"best-lenet-{args.split}-n{args.ref_n}-p{tag}.pt"), weights_only=True)
    model, x, labels = load_problem(args.split, args.ref_n)
    x, labels, best_known = x[: args.n], labels[: args.n], ref["best"][: args.n]
    assert torch.equal(x, ref["x"][: args.n])
    counted = Counted(model)
    x0 = flat(x)
    r = pyboundary.deepfool(model, x, labels=labels, p=p, clamp=(LO, HI))
    d0 = flat(r.perturbation)
    variants = {"df": lambda: d0}
    for spec in (args.grid or "").split(";"):
        if spec:
            kind, kw = spec.split(":", 1) if ":" in spec else (spec, "")
            kwargs = {k: float(v) if "." in v else int(v) for k, v in (t.split("=") for t in kw.split(",") if t)}
            fn = globals()[kind]
            variants[f"{kind} {kw}"] = (lambda fn=fn, kwargs=kwargs: fn(counted, x0, labels, d0, p, **kwargs))
    if args.only:
        variants = {k: v for k, v in variants.items() if any(s in k for s in args.only.split(","))}
    print(f"| variant (n={args.n}, {args.split}, p={args.p}) | median | p90 | max | fails | fwd rows | rev rows | ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, fn in variants.items():
        counted.reset()
        t0 = time.process_time()
        d = fn()
        secs = time.process_time() - t0
        xa = (x0 + d).clamp(LO, HI)
        with torch.no_grad():
            adv = model(xa.reshape(x.shape)).argmax(1) != labels
        m = torch.where(adv, norms(xa - x0, p), torch.full((args.n,), math.inf))
        ratio = (m / best_known).double()
        q = torch.quantile(ratio, torch.tensor([0.5, 0.9], dtype=torch.float64), interpolation="higher")
        print(f"| {name} | {float(q[0]):.4f} | {float(q[1]):.4f} | {float(ratio.max()):.3f} | {int((~adv).sum())} | "
              f"{counted.forward_rows / args.n:.1f} | {counted.backward_rows / args.n:.1f} | "
              f"{1000 * secs / args.n:.2f} |", flush=True)



def score(model, xa, labels):
    """max_{c != label} f_c - f_label (> 0 iff adversarial), no graph."""
    with torch.no_grad():
        lg = model(xa.reshape(-1, 1, 28, 28))
    own = lg.gather(1, labels[:, None]).squeeze(1)
    return lg.scatter(1, labels[:, None], -math.inf).max(1).values - own


def path(x0, t, s):
    """Point at parameter s (N,) on the clipped ray x0 + s t."""
    return (x0 + s[:, None] * t).clamp(LO, HI)


def ray_search(model, x0, t, labels, s_max, f0, rounds=6, rel=1e-3):
    """Smallest s in (0, s_max] with path(s) adversarial, by secant/bisection on the score.
    Returns (s, found) with path(s) adversarial where found."""
    n = x0.shape[0]
    lo = torch.zeros(n)
    f_lo = f0.clone()
    hi = s_max.clone()
    f_hi = score(model, path(x0, t, hi), labels)
    found = f_hi > 0
    for _ in range(rounds):
        w = hi - lo
        frac = (-f_lo / (f_hi - f_lo).clamp_min(1e-12)).clamp(0.05, 0.95)
        s = lo + frac * w
        f = score(model, path(x0, t, s), labels)
        adv = f > 0
        hi = torch.where(adv, s, hi)
        f_hi = torch.where(adv, f, f_hi)
        lo = torch.where(adv, lo, s)
        f_lo = torch.where(adv, f_lo, f)
    return hi, found


def walk(model, x0, labels, d0, p, iters=6, eta0=1.0, k=1):
    """Boundary walk: at the boundary point b, linearise the active class, take the box-aware
    min-norm point t of the linearisation (the projection of x0 on the tangent plane), then the
    boundary crossing along the clipped ray x0 + s t, accepted when it is closer than b;
    otherwise the next direction is damped towards the previous one."""
    n = x0.shape[0]
    f0 = score(model, x0, labels)
    d = d0.clone()
    best_n = norms(d, p)
    eta = torch.full((n,), eta0)
    for it in range(iters):
        xa = (x0 + d).detach().requires_grad_(True)
        lg = model(xa.reshape(-1, 1, 28, 28))
        cls = top_other(lg.detach(), labels, 1)[:, 0]
        F = lg.gather(1, cls[:, None]).squeeze(1) - lg.gather(1, labels[:, None]).squeeze(1)
        (g,) = torch.autograd.grad(F.sum(), xa)
        beta = (g * d).sum(1) - F.detach()
        t = lin_solve(g, beta, x0, p)
        t = d + eta[:, None] * (t - d)
        # s_max: where the clipped path reaches the current best norm (bisection on the norm)
        tn = norms(t, p).clamp_min(1e-12)
        s_max = (best_n / tn).clamp_min(1.0) * 1.0
        # the box only shortens the path, so ||path(s)|| <= s ||t||: s_max from the unclipped norm
        s, found = ray_search(model, x0, t, labels, s_max, f0)
        cand = path(x0, t, s) - x0
        cn = norms(cand, p)
        better = found & (cn < best_n)
        d = torch.where(better[:, None], cand, d)
        best_n = torch.where(better, cn, best_n)
        eta = torch.where(better, torch.clamp(eta * 1.5, max=1.0), eta * 0.5)
    return bisect(model, x0, d, labels)



def sphere(model, x0, labels, d0, p, steps=20, alpha0=0.5, alpha1=0.05, rho=1.0, cap=0.1, target=None):
    """Norm-radial Newton + angular gradient steps: at the iterate delta (norm eps), F and g of
    the active class; eps_new = eps - rho F / ||g||_q (clipped to eps (1 +- cap)); direction
    turned towards the gradient by alpha (cosine-annealed alpha0 -> alpha1), rescaled to eps_new,
    clipped to the box. Keeps the best adversarial iterate; bisects it at the end."""
    d = d0.clone()
    best = d0.clone()
    best_n = norms(d0, p)
    for i in range(steps):
        cos = (1 + math.cos(math.pi * i / steps)) / 2
        alpha = alpha1 + (alpha0 - alpha1) * cos
        xa = (x0 + d).detach().requires_grad_(True)
        lg = model(xa.reshape(-1, 1, 28, 28))
        cls = top_other(lg.detach(), labels, 1)[:, 0] if target is None else target
        F = lg.gather(1, cls[:, None]).squeeze(1) - lg.gather(1, labels[:, None]).squeeze(1)
        (g,) = torch.autograd.grad(F.sum(), xa)
        F = F.detach()
        n_d = norms(d, p)
        adv = F > 0
        better = adv & (n_d < best_n)
        best = torch.where(better[:, None], d, best)
        best_n = torch.where(better, n_d, best_n)
        if i == steps - 1:
            break
        q = 1.0 if math.isinf(p) else 2.0
        gq = g.norm(p=q, dim=1).clamp_min(1e-12)
        eps = n_d - rho * F / gq
        eps = torch.minimum(torch.maximum(eps, n_d * (1 - cap)), n_d * (1 + cap))
        if math.isinf(p):
            u = d + alpha * n_d[:, None] * g.sign()
            u = torch.maximum(torch.minimum(u, n_d[:, None]), -n_d[:, None])  # stay on the cube
            un = norms(u, p).clamp_min(1e-12)
            d = u * (eps / un)[:, None]
        else:
            dn = d / n_d[:, None].clamp_min(1e-12)
            gt = g / gq[:, None]
            gt = gt - (gt * dn).sum(1, keepdim=True) * dn  # tangential part
            u = dn + alpha * gt
            d = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12) * eps[:, None]
        d = (x0 + d).clamp(LO, HI) - x0
    return bisect(model, x0, best, labels)


if __name__ == "__main__":
    sys.exit(main())

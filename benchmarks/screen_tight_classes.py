"""How the tight mode chooses the other classes it searches towards (``tight_classes``,
``TIGHT_CLASS_RATIO``): measured on the *train* split, never on the reported test images.

Run (after ``bench_tight.py --split train --n 500 --p 2|inf``, which stores the best known
per-sample margins in ``out/tight``)::

    .venv/bin/python benchmarks/screen_tight_classes.py --p 2
    .venv/bin/python benchmarks/screen_tight_classes.py --p inf

For each input: the untargeted tight margin (``tight_classes=0``), the targeted tight margin
towards every other class, and the linearised distance at the input to every class's boundary
(nearest point of f_c - f_ref >= 0 linearised at x, inside the box [0, 1], by
:func:`pyboundary.attacks.tight.min_norm_point`). Then, per screening rule (rank the other
classes by linearised distance or by clean logit, search at most k of them, only those within R x
the nearest class's distance), the median / p90 / p95 of the per-sample ratio to the best known
and the targeted searches per input.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_tight import load_problem

import pyboundary
from pyboundary.attacks.tight import min_norm_point

BOX = (0.0, 1.0)


def linearised_distances(model, x, labels, p):
    """(n, L) distance at x to each class's linearised boundary, in the box (inf: the reference)."""
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    n, L = out.shape
    xf = x.reshape(n, -1).double()
    est = torch.full((n, L), math.inf, dtype=torch.float64)
    for c in range(L):
        gap = out[:, c] - out.gather(1, labels[:, None]).squeeze(1)
        (g,) = torch.autograd.grad(gap.sum(), xr, retain_graph=True)
        _, est[:, c] = min_norm_point(g.reshape(n, 1, -1).double(), -gap.detach().double()[:, None],
                                      BOX[0] - xf, BOX[1] - xf, p)
    est.scatter_(1, labels[:, None], math.inf)
    return est, out.detach().double()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p", default="2")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--split", default="train")
    ap.add_argument("--cache", default="out/tight")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    p = math.inf if args.p in ("inf", "linf") else 2.0
    tag = "inf" if math.isinf(p) else "2"
    model, x, labels = load_problem(args.split, args.n)
    best = torch.load(os.path.join(args.cache, f"best-lenet-{args.split}-n{args.n}-p{tag}.pt"),
                      weights_only=True)["best"].double()
    kw = {"p": p, "clamp": BOX, "batch_size": 100, "tight": True}
    base = pyboundary.deepfool(model, x, labels=labels, tight_classes=0, **kw)
    m0, adv = base.margin.double(), base.adv_label
    n = x.shape[0]
    targeted = torch.full((n, 10), math.inf, dtype=torch.float64)
    for c in range(10):
        rows = (labels != c).nonzero().squeeze(1)
        t = pyboundary.deepfool(model, x[rows], labels=labels[rows], target=torch.full_like(rows, c), **kw)
        targeted[rows, c] = torch.where(t.converged, t.margin.double(), torch.full_like(t.margin.double(), math.inf))
    est, logits = linearised_distances(model, x, labels, p)
    nearest = est.min(1).values
    by_est = est.scatter(1, adv[:, None], math.inf).argsort(1)
    lg = logits.scatter(1, labels[:, None], -math.inf).scatter(1, adv[:, None], -math.inf)
    by_logit = lg.argsort(1, descending=True)

    def q(v):
        return (f"median {float(v.median()):.4f} p90 {float(torch.quantile(v, 0.9)):.4f} "
                f"p95 {float(torch.quantile(v, 0.95)):.4f}")

    print(f"# {args.split}, {n} inputs, p={args.p}: untargeted only: {q(m0 / best)}; "
          f"every class: {q(torch.minimum(m0, targeted.min(1).values) / best)}")
    for ratio in (1.1, 1.2, 1.3, 1.5, 2.0, math.inf):
        for k in (1, 2, 3):
            for name, order in (("distance", by_est), ("logit", by_logit)):
                m, runs = m0.clone(), 0
                for j in range(k):
                    c = order[:, j:j + 1]
                    e = est.gather(1, c).squeeze(1)
                    sel = torch.isfinite(e) & (e <= ratio * nearest)
                    runs += int(sel.sum())
                    m = torch.where(sel, torch.minimum(m, targeted.gather(1, c).squeeze(1)), m)
                print(f"R {ratio:4} k {k} ranked by {name:8}: {runs / n:.2f} searches per input, {q(m / best)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How often candidate pruning changes DeepFool's choice, and what it does to the margins.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prune_audit_deepfool.py --n 500

For each mode: prune='audit' (all gradients computed, the step taken with the pruned choice)
counts the (sample, iteration) choices where the pruned argmin differs from the full one; then
prune=True vs prune=False margins per sample (max and 99th percentile of the relative difference).
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyboundary import zoo as models  # noqa: E402
from pyboundary.attacks.deepfool import (  # noqa: E402
    FIRST_PRUNE_FACTOR, PRUNE_FACTOR, SECOND_STAGE_FACTOR, deepfool,
)
from pyboundary.subspaces import DCTDiagonal  # noqa: E402
from pyboundary.zoo import data  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--split", default="test", help="data split (constants were chosen on 'train')")
    ap.add_argument("--arch", default="lenet", help="reference model architecture (lenet, mlp, ...)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = models.reference_model(args.arch, "fashion-mnist", progress=False).eval()
    x = data.load_dataset("fashion-mnist", args.split, limit=args.n, seed=0).x
    print(f"PRUNE_FACTOR = {PRUNE_FACTOR}, FIRST_PRUNE_FACTOR = {FIRST_PRUNE_FACTOR}, "
          f"SECOND_STAGE_FACTOR = {SECOND_STAGE_FACTOR}; {args.arch}, {args.split} split, {x.shape[0]} inputs")
    print("| mode | choices | differing | gradients pruned/unpruned | max rel. margin diff | p99 | median margin pruned / unpruned |")
    print("|---|---|---|---|---|---|---|")
    sub = DCTDiagonal(tuple(x.shape[1:]), K=8, T=1)
    n_img = max(1, args.n // 20)
    xs = x[:n_img].repeat_interleave(sub.n_members, 0)
    idx = torch.arange(sub.n_members).repeat(n_img)
    cases = [(f"{'Linf' if math.isinf(p) else 'L2'} {'clamp' if clamp else 'unclipped'}", x,
              dict(p=p, clamp=clamp, batch_size=100)) for clamp in (None, (0.0, 1.0)) for p in (2, math.inf)]
    cases.append((f"L2 {sub.spec}, {n_img} images x {sub.n_members}", xs,
                  dict(p=2, subspace=sub, subspace_index=idx, batch_size=420)))
    for mode, xx, kw in cases:
        audit = deepfool(model, xx, prune="audit", **kw)
        pruned = deepfool(model, xx, prune=True, **kw)
        full = deepfool(model, xx, prune=False, **kw)
        ok = pruned.converged & full.converged
        rel = (pruned.margin[ok] / full.margin[ok] - 1).abs()
        print(f"| {mode} | {audit.prune_choices} | {audit.prune_mismatch} | "
              f"{int(pruned.sample_gradients.sum())}/{int(full.sample_gradients.sum())} | "
              f"{float(rel.max()):.2e} | {float(rel.quantile(0.99)):.2e} | "
              f"{float(pruned.margin[ok].median()):.4f} / {float(full.margin[ok].median()):.4f} |", flush=True)


if __name__ == "__main__":
    main()

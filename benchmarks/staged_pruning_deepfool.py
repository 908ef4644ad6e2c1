"""Staged candidate pruning on vs off (SECOND_STAGE_FACTOR / LATER_STAGE_FACTOR = inf gives the
former rules), same process, same inputs: rows per sample and CPU time at one thread.

    .venv/bin/python benchmarks/staged_pruning_deepfool.py --n 500 [--split test] [--subspace]
"""

import argparse
import math
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pyboundary.attacks.deepfool as engine  # noqa: E402
from _peers import Counted  # noqa: E402
from pyboundary import zoo  # noqa: E402
from pyboundary.subspaces import DCTDiagonal  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--split", default="test")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = zoo.reference_model("lenet", "fashion-mnist", progress=False).eval()
    x = zoo.load_dataset("fashion-mnist", args.split, limit=args.n, seed=0).x
    sub = DCTDiagonal(tuple(x.shape[1:]), K=8, T=1)
    n_img = max(1, args.n // 20)
    xs = x[:n_img].repeat_interleave(sub.n_members, 0)
    idx = torch.arange(sub.n_members).repeat(n_img)
    cases = [(f"{'Linf' if math.isinf(p) else 'L2'} {'clamp' if clamp else 'unclipped'}", x,
              dict(p=p, clamp=clamp)) for clamp in (None, (0.0, 1.0)) for p in (2, math.inf)]
    cases.append((f"L2 dct:K=8,T=1 ({n_img} images x {sub.n_members})", xs, dict(subspace=sub, subspace_index=idx)))
    counted = Counted(model)
    saved = engine.SECOND_STAGE_FACTOR, engine.LATER_STAGE_FACTOR
    print(f"# lenet/fashion-mnist {args.split}, batches of 100 rows, refine off, 1 thread, CPU time best of {args.repeats}")
    print("| mode | rules | ms/row | fwd rows/row | rev rows/row | gradients/row | median margin |")
    print("|---|---|---|---|---|---|---|")
    for name, xx, kw in cases:
        for label, factors in (("former", (math.inf, math.inf)), ("staged", saved)):
            engine.SECOND_STAGE_FACTOR, engine.LATER_STAGE_FACTOR = factors
            best = math.inf
            for _ in range(args.repeats):
                counted.reset()
                t0 = time.process_time()
                r = engine.deepfool(counted, xx, refine=False, batch_size=100, **kw)
                best = min(best, time.process_time() - t0)
            n = xx.shape[0]
            print(f"| {name} | {label} | {1000 * best / n:.3f} | {counted.forward_rows / n:.2f} | "
                  f"{counted.backward_rows / n:.2f} | {float(r.sample_gradients.double().mean()):.2f} | "
                  f"{float(r.margin[r.converged].median()):.4f} |", flush=True)
    engine.SECOND_STAGE_FACTOR, engine.LATER_STAGE_FACTOR = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure the two gradient strategies of pyboundary.deepfool (the default of grad_strategy='auto').

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/strategy_deepfool.py --n 500 --batch-size 100

CPU time per sample (one thread) of 'loop' (k reverse passes over the retained graph) and
'batched' (one vmapped reverse pass), pruned and unpruned, on the reference LeNet/Fashion-MNIST.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyboundary import zoo as models  # noqa: E402
from pyboundary.attacks.deepfool import deepfool  # noqa: E402
from pyboundary.zoo import data  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    model = models.reference_model("lenet", "fashion-mnist", progress=False).to(dev).eval()
    x = data.load_dataset("fashion-mnist", "test", limit=args.n, seed=0).x.to(dev)
    clock = time.process_time if dev.type == "cpu" else time.perf_counter
    print(f"| strategy | prune | ms/sample | reverse passes |  (batch {args.batch_size}, {dev})")
    for prune in (False, True):
        for strategy in ("loop", "batched"):
            best = float("inf")
            for _ in range(args.repeats):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = clock()
                res = deepfool(model, x, prune=prune, refine=False, grad_strategy=strategy,
                               batch_size=args.batch_size)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, clock() - t0)
            print(f"| {strategy} | {prune} | {1000 * best / x.shape[0]:.2f} | {res.n_backward} |", flush=True)


if __name__ == "__main__":
    main()

"""Margin dynamics on Fashion-MNIST: standard vs PGD (L-inf) training of the reference LeNet.

Budget version for a 2-core CPU: trains on a seeded subset of the training set and tracks the
L2 and L-inf DeepFool margins of seeded train/test subsets at every epoch (0 = initialisation).
Writes per run: <work>/<name>/track.sqlite and plots, <work>/<name>.pt (state dict), and a JSON
summary <work>/<name>.json (per-epoch table and transitions). Usage:

    python examples/track_fmnist.py --n-train 10000 --epochs 10 --n-track 500 --work /tmp/pyb_eval
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pyboundary.experiments.tracking_run import track


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n-track", type=int, default=500)
    ap.add_argument("--attack", default="pgd-linf:eps=0.1,steps=7,frac=0.5")
    ap.add_argument("--runs", default="standard,pgd")
    ap.add_argument("--work", default="/tmp/pyb_eval")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for name in args.runs.split(","):
        adv = None if name == "standard" else args.attack
        t0 = time.time()
        run = track("lenet", "fashion-mnist", epochs=args.epochs, adversarial=adv, n_track=args.n_track,
                          n_train=args.n_train, out=work / name, seed=0, progress=False,
                          deepfool_kwargs={"max_iter": 50})
        model, tr = run.model, run.tracker
        torch.save(model.state_dict(), work / f"{name}.pt")
        trans = {s: [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in t.items()}
                     for t in tr.transitions(s)] for s in tr.splits}
        summary = {"name": name, "attack": adv, "n_train": args.n_train, "epochs": args.epochs,
                   "n_track": args.n_track, "seconds": time.time() - t0, "table": tr.table(),
                   "transitions": trans}
        (work / f"{name}.json").write_text(json.dumps(summary, indent=1, default=float))
        print(f"{name}: done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

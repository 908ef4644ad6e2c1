"""Region topology, random-direction robustness, perturbation spectra, frequency masks and the
fine-tuning experiment on the Fashion-MNIST LeNets trained by ``examples/track_fmnist.py``.

Budget version for a 2-core CPU. Reads <work>/{standard,pgd}.pt, writes <work>/topology.json and
figures to --figures. Usage:

    python examples/topology_fmnist.py --work /tmp/pyb_eval --figures examples/figures
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pyboundary import zoo as models
from pyboundary._utils.model import predict
from pyboundary._utils.stats import summarize
from pyboundary.attacks.deepfool import deepfool
from pyboundary.experiments.finetune import finetune_experiment
from pyboundary.geometry import masks, topology
from pyboundary.geometry.spectral import band_energy, plot_band_energy
from pyboundary.subspaces import DCTDiagonal, DCTGrid
from pyboundary.zoo import data


def _load(work: Path, name: str):
    state = torch.load(work / f"{name}.pt", weights_only=True)
    # rebuild with the widths stored in the checkpoint (the default width may have changed)
    model = models.build("lenet", (1, 28, 28), 10, width=state["features.0.weight"].shape[0],
                         hidden=state["classifier.1.weight"].shape[0])
    model.load_state_dict(state)
    return model.eval()


def _timed(fn, *a, **k):
    t = time.time()
    out = fn(*a, **k)
    return out, time.time() - t


def topology_block(model, x, args) -> dict:
    out = {}
    for scen in ("same-label", "adversarial", "random-sphere"):
        res, sec = _timed(topology.path_connectivity, model, x, scenario=scen, n_pairs=args.n_pairs,
                          seed=0, max_depth=args.max_depth, n_check=args.n_check)
        ratios = np.array(res.ratios)
        # independent re-check of every valid path with 16x denser sampling of its segments
        dense = []
        for r in res.results:
            if r.valid:
                a, b = r.anchors[:-1], r.anchors[1:]
                with torch.no_grad():
                    dense.append(bool(topology._segments_ok(model, a, b, r.label, 16 * args.n_check, 1024, None).all()))
        out[scen] = {"n_pairs": res.n_pairs, "n_skipped": res.n_skipped, "n_valid": res.n_valid,
                     "rate": res.rate, "dense_valid": int(sum(dense)), "ratio_median": float(np.median(ratios)) if ratios.size else None,
                     "ratio_max": float(ratios.max()) if ratios.size else None,
                     "anchors_median": float(np.median([r.anchors.shape[0] for r in res.results])),
                     "calls_median": float(np.median([r.n_calls for r in res.results])),
                     "reasons": sorted({r.reason for r in res.results if r.reason})[:3], "seconds": sec}
        print(scen, out[scen], flush=True)
    pred = predict(model, x)
    conv = {}
    for c in range(10):
        xs = x[pred == c][: args.n_region]
        if xs.shape[0] < 10:
            continue
        r = topology.convex_combination_probability(model, xs, k=range(2, 11), n_trials=args.n_trials, seed=c)
        conv[c] = r.probability.tolist()
    out["convex"] = {"per_class": conv, "mean": np.mean(list(conv.values()), axis=0).tolist()}
    print("convex", out["convex"]["mean"], flush=True)
    rd, sec = _timed(topology.random_direction_robustness, model, x[: args.n_random], n_directions=20, seed=0,
                     n_bisect=12)
    out["random_direction"] = dict(rd.summary(), seconds=sec)
    print("random", out["random_direction"], flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/pyb_eval")
    ap.add_argument("--figures", default="examples/figures")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--n-pairs", type=int, default=20)
    ap.add_argument("--max-depth", type=int, default=8)
    ap.add_argument("--n-check", type=int, default=16)
    ap.add_argument("--n-region", type=int, default=100)
    ap.add_argument("--n-trials", type=int, default=300)
    ap.add_argument("--n-random", type=int, default=50)
    ap.add_argument("--n-bands", type=int, default=500)
    ap.add_argument("--parts", default="topology,bands,masks,finetune")
    ap.add_argument("--models", default="standard,pgd")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work, figs = Path(args.work), Path(args.figures)
    figs.mkdir(parents=True, exist_ok=True)
    test = data.load_dataset("fashion-mnist", "test", limit=args.n_test, seed=1)
    nets = {name: _load(work, name) for name in args.models.split(",")
            if (work / f"{name}.pt").exists()}
    parts = args.parts.split(",")
    path = work / "topology.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    for name, model in nets.items():
        r = result.setdefault(name, {})
        r["test_accuracy"] = models.accuracy(model, test.x, test.labels)
        if "topology" in parts:
            r["topology"] = topology_block(model, test.x, args)
        if "bands" in parts:
            xb = test.x[: args.n_bands]
            df = deepfool(model, xb, p=2, clamp=(0.0, 1.0))
            delta = df.perturbation[df.converged]
            diag = band_energy(delta, DCTDiagonal((1, 28, 28), K=4, T=4), quantile=95)
            grid = band_energy(delta, DCTGrid((1, 28, 28), K=4), quantile=95)
            r["bands"] = {"diag_p95": diag.per_band.tolist(), "diag_mean": diag.mean.tolist(),
                          "grid_mean": grid.mean.reshape(7, 7).tolist(),
                          "margin": summarize(df.margin.numpy(), df.converged.numpy())}
            nets[name]._bands = diag
            nets[name]._grid = grid
        if "masks" in parts:
            m = masks.learn_mask(model, test.x, test.labels, lam=0.05, steps=300, lr=0.05, train_batch_size=128)
            r["mask"] = m.summary()
            m.plot(figs / f"mask_{name}.png")
            print(name, "mask", r["mask"], flush=True)
    if "bands" in parts and nets:
        plot_band_energy({n: m._bands for n, m in nets.items()}, figs / "band_energy.png")
    if "finetune" in parts and "standard" in nets:
        train = data.load_dataset("fashion-mnist", "train", limit=10000, seed=0)
        model = nets["standard"]
        pred = predict(model, train.x)
        ok = (pred == train.labels).nonzero().squeeze(1)
        gen = torch.Generator().manual_seed(0)
        pick = ok[torch.randperm(ok.numel(), generator=gen)[:400]]
        res, sec = _timed(finetune_experiment, model, train.x, train.labels, pick[:200], pick[200:],
                          epochs=2, train_kwargs={"progress": False, "seed": 1},
                          deepfool_kwargs={"clamp": None})
        gp = (res.after_p / res.before_p)
        gu = (res.after_u / res.before_u)
        result["finetune"] = {"summary": res.summary(), "gain_p_median": float(gp.median()),
                              "gain_u_median": float(gu.median()), "seconds": sec}
        print("finetune", result["finetune"], flush=True)
    path.write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tight margins: pyboundary's tight mode vs adv-lib's minimal-perturbation attacks.

Run (from the repository root; peers from ``make .venv/.peers``)::

    .venv/bin/python benchmarks/bench_tight.py --split test --n 500 --p 2
    .venv/bin/python benchmarks/bench_tight.py --split test --n 500 --p inf

Model: ``reference_model('lenet', 'fashion-mnist')``; inputs: the first ``--n`` correctly
classified images of a seeded subset of the split, in [0, 1]; every method keeps its points in the
box [0, 1]. Methods (all batches of ``--batch-size``):

* ``deepfool``: pyboundary plain DeepFool (refined), ``deepfool-tight``: the tight mode with its
  defaults (``tight_classes=2``), ``deepfool-tight-classes-0`` / ``-1``: with ``tight_classes=0`` / ``1``;
* adv-lib ``sdf`` (SuperDeepFool, L2 only, its defaults), ``ddn`` (1000 steps, no quantisation,
  L2 only), ``fmn`` cold and warm-started from pyboundary's DeepFool point, 100 and 1000 steps.

Best known per sample = the smallest adversarial norm any method found (all methods of the run,
and of earlier runs cached in ``--cache``); ratio = method / best known, per sample; a failure
counts as +inf. Time = CPU time of the process per sample (``time.process_time``) at
``--threads`` (default 1, OMP/MKL limited before torch loads), or wall time with ``--clock wall``.
Rows = forward / reverse rows through the model per sample (counted by a wrapper).

Expensive peers are cached per (split, n, p, method) in ``--cache`` (default out/tight) so that a
rerun only recomputes what is missing (``--fresh`` recomputes everything).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

if __name__ == "__main__":  # before numpy / torch load
    _t = "1"
    for _i, _a in enumerate(sys.argv):
        if _a == "--threads" and _i + 1 < len(sys.argv):
            _t = sys.argv[_i + 1]
        elif _a.startswith("--threads="):
            _t = _a.split("=", 1)[1]
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, _t)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _peers import Counted, adversarial_norms, advlib_attack, in_batches  # noqa: E402

import pyboundary  # noqa: E402

CLOCK = time.process_time


def load_problem(split: str, n: int, arch: str = "lenet", dataset: str = "fashion-mnist"):
    """(model, x (n, 1, 28, 28) in [0, 1], labels (n,)): the first n correctly classified inputs."""
    from pyboundary import zoo as models
    from pyboundary.zoo import data

    model = models.reference_model(arch, dataset, progress=False).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ds = data.load_dataset(dataset, split, limit=int(n * 1.3) + 20, seed=0)
    with torch.no_grad():
        ok = model(ds.x).argmax(1) == ds.labels
    x, labels = ds.x[ok][:n].contiguous(), ds.labels[ok][:n].contiguous()
    if x.shape[0] < n:
        raise RuntimeError(f"only {x.shape[0]} correctly classified inputs, wanted {n}")
    return model, x, labels


def run_method(name, fn, counted, x, labels, p):
    """Time fn() (returns adversarial inputs), count rows; -> dict of per-sample norms and costs."""
    counted.reset()
    t0 = CLOCK()
    adv = fn()
    secs = CLOCK() - t0
    d = adversarial_norms(counted.model, x, labels, adv.detach(), p)
    n = x.shape[0]
    return dict(method=name, ms=1000 * secs / n, norms=d, fwd_rows=counted.forward_rows / n,
                rev_rows=counted.backward_rows / n)


def methods(counted, x, labels, p, bs, which):
    """name -> zero-argument callable returning adversarial inputs (N, ...)."""
    box = (0.0, 1.0)
    out = {}

    def ours(tight, tight_classes=None):
        def run():
            r = pyboundary.deepfool(counted, x, labels=labels, p=p, clamp=box, batch_size=bs,
                                    **({"tight": True, "tight_classes": tight_classes} if tight else {}))
            return (x + r.perturbation).clamp(*box)
        return run

    out["deepfool"] = ours(False)
    out["deepfool-tight"] = ours(True)  # the default: tight_classes=2, screened
    out["deepfool-tight-classes-0"] = ours(True, 0)
    out["deepfool-tight-classes-1"] = ours(True, 1)
    def warm():  # the warm start is part of the method: timed and counted with it
        r = pyboundary.deepfool(counted, x, labels=labels, p=p, clamp=box, batch_size=bs)
        return (x + r.perturbation).clamp(*box)

    def fmn(steps, warm_start):
        f = advlib_attack("fast_minimum_norm", "fmn")

        def run():
            starts = warm() if warm_start else None
            if starts is None:
                return in_batches(lambda xb, yb: f(counted, xb, yb, norm=p, steps=steps), x, labels, bs)
            return in_batches(lambda xb, yb, sb: f(counted, xb, yb, norm=p, steps=steps, starting_points=sb),
                              x, labels, bs, starts)
        return run

    for steps in (100, 1000):
        out[f"fmn-{steps}"] = fmn(steps, False)
        out[f"fmn-warm-{steps}"] = fmn(steps, True)
    if p == 2:
        def sdf():
            f = advlib_attack("superdeepfool", "sdf")
            return in_batches(lambda xb, yb: f(counted, xb, yb), x, labels, bs)

        def ddn():
            f = advlib_attack("decoupled_direction_norm", "ddn")
            return in_batches(lambda xb, yb: f(counted, xb, yb, steps=1000, levels=None), x, labels, bs)
        out["sdf"] = sdf
        out["ddn-1000"] = ddn
    return {k: v for k, v in out.items() if which is None or k in which}


def cache_path(cache, split, n, p, method, arch):
    tag = "inf" if math.isinf(p) else "2"
    return os.path.join(cache, f"{arch}-{split}-n{n}-p{tag}-{method}.pt")


def summarise(rows, best):
    lines = ["| method | ms/sample | median ratio | p90 ratio | max ratio | success | fwd rows | rev rows |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["norms"] / best
        fin = torch.isfinite(r["norms"])
        q = torch.quantile(ratio.double(), torch.tensor([0.5, 0.9], dtype=torch.float64),
                           interpolation="higher")  # well defined with +inf (failures)
        lines.append(f"| {r['method']} | {r['ms']:.2f} | {float(q[0]):.4f} | {float(q[1]):.4f} | "
                     f"{float(ratio.max()):.3f} | {float(fin.double().mean()):.3f} | "
                     f"{r['fwd_rows']:.1f} | {r['rev_rows']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--p", default="2")
    ap.add_argument("--arch", default="lenet")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    ap.add_argument("--cache", default="out/tight")
    ap.add_argument("--fresh", action="store_true", help="recompute cached peers")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    p = math.inf if args.p in ("inf", "linf") else 2.0
    model, x, labels = load_problem(args.split, args.n, args.arch)
    counted = Counted(model).eval()
    which = None if args.methods is None else set(args.methods.split(","))
    os.makedirs(args.cache, exist_ok=True)
    print(f"# {args.arch}/fashion-mnist {args.split}: {x.shape[0]} correctly classified inputs, p={args.p}, "
          f"box [0, 1], batch {args.batch_size}, {args.threads} thread(s), {args.clock} time, "
          f"torch {torch.__version__}", flush=True)
    rows = []
    for name, fn in methods(counted, x, labels, p, args.batch_size, which).items():
        path = cache_path(args.cache, args.split, args.n, p, name, args.arch)
        ours = name.startswith("deepfool")
        if os.path.exists(path) and not args.fresh and not ours:
            r = torch.load(path, weights_only=True)
            print(f"# {name}: cached ({path})", flush=True)
        else:
            try:
                r = run_method(name, fn, counted, x, labels, p)
            except Exception as e:  # a missing peer is skipped, with the reason
                print(f"# {name}: skipped ({type(e).__name__}: {e})", flush=True)
                continue
            torch.save(r, path)
            print(f"# {name}: {r['ms']:.2f} ms/sample", flush=True)
        rows.append(r)
    best = torch.stack([r["norms"] for r in rows]).min(0).values
    # earlier runs of other methods count towards the best known too
    for f in os.listdir(args.cache):
        if f.startswith(f"{args.arch}-{args.split}-n{args.n}-p{'inf' if math.isinf(p) else '2'}-"):
            best = torch.minimum(best, torch.load(os.path.join(args.cache, f), weights_only=True)["norms"])
    torch.save(dict(best=best, x=x, labels=labels), os.path.join(
        args.cache, f"best-{args.arch}-{args.split}-n{args.n}-p{'inf' if math.isinf(p) else '2'}.pt"))
    print(summarise(rows, best))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in rows],
                      fh)
    return 0


def test_tight_vs_fmn_warm(benchmark):
    """`make bench`: the tight mode vs adv-lib's FMN warm-started from our DeepFool point (100
    steps), 100 correctly classified test images, L2 and L-inf with the box; per-sample ratios of
    the tight margin to FMN's and the CPU-time ratio in extra_info."""
    import pytest

    if importlib.util.find_spec("adv_lib") is None:
        pytest.skip("adv-lib is not installed (make .venv/.peers)")
    model, x, labels = load_problem("test", 100)
    counted = Counted(model).eval()
    results = {}

    def measure():
        for p in (2.0, math.inf):
            m = methods(counted, x, labels, p, 100, {"deepfool", "deepfool-tight", "fmn-warm-100"})
            rows = {name: run_method(name, fn, counted, x, labels, p) for name, fn in m.items()}
            tight, fmn, plain = rows["deepfool-tight"], rows["fmn-warm-100"], rows["deepfool"]
            ratio = tight["norms"] / fmn["norms"]
            results["Linf" if math.isinf(p) else "L2"] = dict(
                tight_ms=tight["ms"], fmn_warm_100_ms=fmn["ms"], speed_ratio=fmn["ms"] / tight["ms"],
                median_ratio_to_fmn=float(ratio.median()), p90_ratio_to_fmn=float(ratio.quantile(0.9)),
                never_above_deepfool=bool((tight["norms"] <= plain["norms"] * (1 + 1e-6)).all()))

    benchmark.group = "tight mode vs FMN warm-started (LeNet, 100 images, box [0, 1], CPU time)"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(results)
    for norm_name, r in results.items():
        print(f"\n{norm_name}: tight {r['tight_ms']:.2f} ms vs FMN-warm-100 {r['fmn_warm_100_ms']:.2f} ms "
              f"({r['speed_ratio']:.1f}x); tight / FMN median {r['median_ratio_to_fmn']:.4f}, "
              f"p90 {r['p90_ratio_to_fmn']:.4f}")
        assert r["never_above_deepfool"], norm_name
        assert r["median_ratio_to_fmn"] < 1.02, (norm_name, r)  # within 2 % of FMN in median


if __name__ == "__main__":
    sys.exit(main())

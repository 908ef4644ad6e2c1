"""DeepFool engine vs peer libraries, and vs the cost floor of its own passes.

Run (from the repository root)::

    .venv/bin/python benchmarks/bench_deepfool.py --n 500 --threads 1 --json out/bench_deepfool.json

Model: ``pyboundary.reference_model('lenet', 'fashion-mnist')`` (trained once on CPU and
cached), the first ``--n`` Fashion-MNIST test images (seeded subset), labels = the model's
predictions (every method measures the margin of the predicted class).

Modes, like with like:

* unclipped (the margin is the distance to the boundary in R^D): pyboundary ``clamp=None`` vs
  foolbox 3 (``L2DeepFoolAttack`` / ``LinfDeepFoolAttack`` with bounds (-1e6, 1e6)) and ART
  ``DeepFool`` (L2 only, no clip values);
* clipped to [0, 1]: pyboundary ``clamp=(0, 1)`` vs adv-lib ``df`` (L2, Linf), torchattacks
  ``DeepFool`` (L2) and foolbox with bounds (0, 1).

All use 50 steps, overshoot 0.02 and the top-10 classes where the method has that option.
pyboundary is timed with ``refine=False`` (the peers do not refine; their margins include the
overshoot) and, separately, with the default refinement. Peers that are not installed are skipped
with a message. The floor replays our unpruned run's passes (the same batch sizes, one forward and
the same number of reverse passes per iteration) with nothing else: overhead = our time / floor.
The oracle floor replays the same iterations with one reverse pass each (the gradient of the
winning candidate only, as if an oracle pruned every other one): no pruning rule can go below it
without changing the number of iterations.

Time per sample = CPU time of the process (``time.process_time``) for the whole call / n, best of
``--repeats`` for the fast methods. Everything runs on one thread (``--threads 1``, OMP/MKL limited
to one thread before numpy and torch load), so CPU time is the work done and does not depend on
what else runs on the machine; ``--clock wall`` uses wall time instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

if __name__ == "__main__":  # before numpy / torch load: one thread everywhere (ART uses numpy)
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyboundary._utils.model import model_guard  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _peers import Counted  # noqa: E402
from pyboundary.attacks.deepfool import deepfool  # noqa: E402


def _norm(d: torch.Tensor, p: float) -> torch.Tensor:
    flat = d.reshape(d.shape[0], -1)
    return flat.abs().amax(1) if math.isinf(p) else flat.norm(dim=1)


def _outcome(model, x, y, adv, p):
    with torch.no_grad():
        success = model(adv).argmax(1) != y
    margins = _norm(adv - x, p)[success]
    return float(margins.median()) if margins.numel() else float("nan"), float(success.float().mean())


CLOCK = time.process_time
DEVICE = torch.device("cpu")


def _timed(fn, repeats):
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = CLOCK()
        out = fn()
        if DEVICE.type == "cuda":  # asynchronous work counts until it has finished
            torch.cuda.synchronize()
        best = min(best, CLOCK() - t0)
    return best, out


# ---------------------------------------------------------------------------------- methods


def ours(counted, x, y, p, clamp, prune, refine, batch_size, repeats):
    def run():
        return deepfool(counted, x, p=p, clamp=clamp, prune=prune, refine=refine,
                        batch_size=batch_size, candidates=10, overshoot=0.02, max_iter=50)

    counted.reset()
    secs, res = _timed(run, repeats)
    ok = res.converged
    n = x.shape[0]
    return dict(secs=secs, median=float(res.margin[ok].median()), success=float(ok.float().mean()),
                forward=res.n_forward, backward=res.n_backward, trace=res.trace,
                fwd_rows=counted.forward_rows / repeats / n, rev_rows=counted.backward_rows / repeats / n)


def foolbox_df(counted, x, y, p, bounds, batch_size, repeats):
    import foolbox as fb

    fmodel = fb.PyTorchModel(counted, bounds=bounds, device=DEVICE)
    cls = fb.attacks.LinfDeepFoolAttack if math.isinf(p) else fb.attacks.L2DeepFoolAttack
    attack = cls(steps=50, candidates=10, overshoot=0.02, loss="logits")

    def run():
        outs = []
        for s in range(0, x.shape[0], batch_size):
            xb, yb = x[s : s + batch_size], y[s : s + batch_size]
            raw, _, _ = attack(fmodel, xb, fb.criteria.Misclassification(yb), epsilons=None)
            outs.append(raw)
        return torch.cat(outs)

    return run, repeats


def advlib_df(counted, x, y, p, batch_size, repeats):
    spec = importlib.util.find_spec("adv_lib")
    if spec is None:
        raise ImportError("adv-lib is not installed (pip install --no-deps adv-lib)")
    # import the attack's file alone: adv_lib.attacks/__init__ needs torchvision (LPIPS)
    path = os.path.join(os.path.dirname(spec.origin), "attacks", "deepfool.py")
    mspec = importlib.util.spec_from_file_location("_advlib_deepfool", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)

    def run():
        return torch.cat([mod.df(counted, x[s : s + batch_size], y[s : s + batch_size], steps=50,
                                 overshoot=0.02, norm=p) for s in range(0, x.shape[0], batch_size)])

    return run, repeats


def torchattacks_df(counted, x, y, p, batch_size, repeats):
    import torchattacks

    attack = torchattacks.DeepFool(counted, steps=50, overshoot=0.02)
    return (lambda: attack(x, y)), 1


def art_df(counted, x, y, p, clip, batch_size, repeats):
    from art.attacks.evasion import DeepFool
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(model=counted, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=10, clip_values=clip, device_type="gpu" if DEVICE.type == "cuda" else "cpu")
    attack = DeepFool(clf, max_iter=50, epsilon=0.02, nb_grads=10, batch_size=batch_size, verbose=False)
    return (lambda: torch.from_numpy(attack.generate(x.cpu().numpy())).to(DEVICE)), 1


def floor_time(model, x, trace, repeats, max_reverse=None):
    """Replay (rows, reverse passes) of a trace as plain forward + reverse passes (at most
    ``max_reverse`` reverse passes per step when given)."""
    if max_reverse is not None:
        trace = [(rows, min(n_rev, max_reverse)) for rows, n_rev in trace]

    def run():
        with model_guard(model), torch.enable_grad():
            for rows, n_rev in trace:
                reps = -(-rows // x.shape[0])
                xb = x.repeat((reps,) + (1,) * (x.dim() - 1))[:rows].clone().requires_grad_(True)
                out = model(xb)
                for j in range(n_rev):
                    torch.autograd.grad(out[:, j + 1].sum(), xb, retain_graph=j < n_rev - 1)

    secs, _ = _timed(run, repeats)
    return secs


# ---------------------------------------------------------------------------------- driver


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="number of test inputs")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats of the fast methods")
    ap.add_argument("--skip", default="", help="comma-separated peers to skip (foolbox,art,advlib,torchattacks)")
    ap.add_argument("--json", default=None, help="write all figures to this JSON file")
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="process CPU time (default on cpu) or wall time (default, and forced, on cuda)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (model, inputs and every method)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK, DEVICE
    DEVICE = torch.device(args.device)
    args.clock = "wall" if DEVICE.type == "cuda" else (args.clock or "cpu")
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    from pyboundary import zoo as models
    from pyboundary.zoo import data

    model = models.reference_model("lenet", "fashion-mnist", progress=False).to(DEVICE).eval()
    ds = data.load_dataset("fashion-mnist", "test", limit=args.n, seed=0)
    x = ds.x.float().to(DEVICE)
    with torch.no_grad():
        y = model(x).argmax(1)
    acc = float((y.cpu() == ds.labels).float().mean())
    counted = Counted(model).eval()
    n, bs, rep = x.shape[0], args.batch_size, args.repeats
    skip = set(filter(None, args.skip.split(",")))
    print(f"# model lenet/fashion-mnist (accuracy on these {n}: {acc:.3f}), batch {bs}, "
          f"{args.threads} thread(s), {args.clock} time, device {DEVICE}, torch {torch.__version__}", flush=True)

    rows = []

    def record(mode, method, stats):
        stats = {k: v for k, v in stats.items() if k != "trace"}
        stats.update(mode=mode, method=method, ms=1000 * stats["secs"] / n)
        rows.append(stats)
        rows_f = f"{stats['fwd_rows']:.2f}" if "fwd_rows" in stats else "-"
        rows_r = f"{stats['rev_rows']:.2f}" if "rev_rows" in stats else "-"
        print(f"| {mode} | {method} | {stats['ms']:.2f} | {stats.get('median', float('nan')):.4f} | "
              f"{stats.get('success', float('nan')):.3f} | {stats.get('forward', '-')} | "
              f"{stats.get('backward', '-')} | {rows_f} | {rows_r} |", flush=True)

    def peer(mode, method, make, p):
        name = method.split()[0]
        if name in skip:
            print(f"# {method}: skipped (--skip)")
            return
        try:
            run, reps = make()
        except Exception as e:  # a missing peer is skipped, with the reason
            print(f"# {method}: skipped ({type(e).__name__}: {e})", flush=True)
            return
        counted.reset()
        try:
            secs, adv = _timed(run, reps)
        except Exception as e:
            print(f"# {method}: failed ({type(e).__name__}: {e})", flush=True)
            return
        med, succ = _outcome(model, x, y, adv.float(), p)
        record(mode, method, dict(secs=secs, median=med, success=succ,
                                  forward=counted.forward_calls // reps, backward=counted.backward_calls // reps,
                                  fwd_rows=counted.forward_rows / reps / n, rev_rows=counted.backward_rows / reps / n))

    print("| mode | method | ms/sample | median margin | success | forward passes | reverse passes | "
          "forward rows/sample | reverse rows/sample |")
    print("|---|---|---|---|---|---|---|---|---|")
    for clip in (False, True):
        for p in (2.0, math.inf):
            norm = "Linf" if math.isinf(p) else "L2"
            mode = f"{norm} {'clamp (0,1)' if clip else 'unclipped'}"
            clamp = (0.0, 1.0) if clip else None
            base = ours(counted, x, y, p, clamp, False, False, bs, rep)
            record(mode, "pyboundary unpruned", base)
            record(mode, "pyboundary pruned", ours(counted, x, y, p, clamp, True, False, bs, rep))
            record(mode, "pyboundary pruned+refine", ours(counted, x, y, p, clamp, True, True, bs, rep))
            fsecs = floor_time(model, x, base["trace"], rep)
            record(mode, "floor (unpruned passes)", dict(secs=fsecs, forward=base["forward"],
                                                         backward=base["backward"]))
            osecs = floor_time(model, x, base["trace"], rep, max_reverse=1)
            record(mode, "oracle floor (1 gradient / iteration)",
                   dict(secs=osecs, forward=base["forward"],
                        backward=sum(min(k, 1) for _, k in base["trace"])))
            bounds = (0.0, 1.0) if clip else (-1e6, 1e6)
            peer(mode, "foolbox", lambda: foolbox_df(counted, x, y, p, bounds, bs, rep), p)
            if clip:
                peer(mode, "advlib", lambda: advlib_df(counted, x, y, p, bs, rep), p)
                if p == 2.0:
                    peer(mode, "torchattacks", lambda: torchattacks_df(counted, x, y, p, bs, rep), p)
            if p == 2.0:
                peer(mode, "art", lambda: art_df(counted, x, y, p, (0.0, 1.0) if clip else None, bs, rep), p)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(dict(n=n, batch_size=bs, threads=args.threads, clock=args.clock, device=str(DEVICE),
                           accuracy=acc, rows=rows), fh, indent=1)
    return 0


# ---------------------------------------------------------------------- pytest-benchmark entry

_MODES = [(2.0, False), (math.inf, False), (2.0, True), (math.inf, True)]


def _bench_problem(n: int = 200):
    from pyboundary import zoo as models
    from pyboundary.zoo import data

    model = models.reference_model("lenet", "fashion-mnist", progress=False).eval()
    x = data.load_dataset("fashion-mnist", "test", limit=n, seed=0).x.float()
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_deepfool_vs_fastest_peer(benchmark):
    """`make bench`: ours (pruned, unrefined) vs the fastest installed peer of each mode (foolbox
    unclipped, adv-lib with the box), 200 images, one run; ratios and rows in extra_info."""
    import pytest

    pytest.importorskip("foolbox")
    model, x, y = _bench_problem()
    counted = Counted(model).eval()
    n, bs = x.shape[0], 100
    results = {}

    def measure():
        for p, clip in _MODES:
            mode = f"{'Linf' if math.isinf(p) else 'L2'} {'clamp' if clip else 'unclipped'}"
            clamp = (0.0, 1.0) if clip else None
            mine = ours(counted, x, y, p, clamp, True, False, bs, 2)
            make = (lambda: advlib_df(counted, x, y, p, bs, 2)) if clip and importlib.util.find_spec("adv_lib") \
                else (lambda: foolbox_df(counted, x, y, p, clamp or (-1e6, 1e6), bs, 2))
            run, reps = make()
            counted.reset()
            secs, adv = _timed(run, reps)
            med, succ = _outcome(model, x, y, adv.float(), p)
            results[mode] = dict(ours_ms=1000 * mine["secs"] / n, peer_ms=1000 * secs / n,
                                 ratio=secs / mine["secs"], ours_median=mine["median"], peer_median=med,
                                 peer_success=succ, ours_rev_rows=mine["rev_rows"],
                                 peer_rev_rows=counted.backward_rows / reps / n)

    benchmark.group = "DeepFool vs the fastest peer (LeNet, 200 Fashion-MNIST images, CPU time)"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(results)
    for mode, r in results.items():
        print(f"\n{mode}: ours {r['ours_ms']:.2f} ms, peer {r['peer_ms']:.2f} ms ({r['ratio']:.1f}x); "
              f"reverse rows {r['ours_rev_rows']:.1f} vs {r['peer_rev_rows']:.1f}")
        # the same boundary: medians within 2 % (ours unrefined, overshoot included like the peers')
        assert abs(r["ours_median"] / r["peer_median"] - 1) < 0.02, (mode, r)
        assert r["ours_rev_rows"] < r["peer_rev_rows"], (mode, r)


if __name__ == "__main__":
    sys.exit(main())

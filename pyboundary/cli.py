"""The ``pyboundary`` command line.

Subcommands::

    pyboundary demo [--out DIR] [--n N]          reference CNN on Fashion-MNIST, DCT diagonal scan
    pyboundary scan --model M --data D --subspaces S --out DIR [--resume] [--limit N]
                    [--batch-size B] [--device cpu|cuda] [--p 2|inf] ...
    pyboundary show DIR                          summary table and plots of a stored scan

and the subcommands that ``pyboundary.detection``, ``pyboundary.tracking`` and
``pyboundary.topology`` add through their ``register_cli(subparsers)``.

A scan directory holds ``scan.sqlite`` (the result store), ``summary.txt`` and the PNG figures.
Under ``torchrun --nproc_per_node=N -m pyboundary scan ...`` the samples are sharded across the
ranks (see :mod:`pyboundary.distributed`). Bad arguments print a message and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser", "STORE_NAME"]

STORE_NAME = "scan.sqlite"
_PLUGINS = ("detection", "tracking", "topology", "curvature")


class UsageError(ValueError):
    """A command-line argument that cannot be used (reported with exit code 2)."""


# ------------------------------------------------------------------------------ parser
def _p_value(text: str) -> float:
    if text.lower() in ("inf", "linf"):
        return math.inf
    if text == "2":
        return 2.0
    raise argparse.ArgumentTypeError(f"--p must be 2 or inf, got {text!r}")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (plugins' ``register_cli`` use it too)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_engine_args(p) -> None:
    p.add_argument("--p", type=_p_value, default=2.0, help="margin norm: 2 or inf (default 2)")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="(sample, subspace) pairs per engine call (default 256)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="engine device (default cpu)")
    p.add_argument("--candidates", type=positive_int, default=10, help="DeepFool candidate classes (default 10)")
    p.add_argument("--max-iter", type=positive_int, default=50, help="DeepFool iterations (default 50)")
    p.add_argument("--overshoot", type=float, default=0.02, help="DeepFool overshoot (default 0.02)")
    p.add_argument("--resume", action="store_true", help="continue the scan stored in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyboundary",
        description="Geometry of classifiers' decision boundaries: margins in subspaces, curvature, detection.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="scan a reference CNN on Fashion-MNIST along the DCT diagonal",
                          description="Train (or load from the cache) a LeNet-style CNN on Fashion-MNIST, "
                                      "measure margins of test images in the 21 DCT blocks (K=8, T=1) of "
                                      "28x28 images, print the summary table and write the plots.")
    demo.add_argument("--out", default="pyboundary-demo", help="output folder (default ./pyboundary-demo)")
    demo.add_argument("--n", type=positive_int, default=200, help="number of test images (default 200)")
    _add_engine_args(demo)
    demo.set_defaults(func=cmd_demo)

    scan = sub.add_parser("scan", help="margins of a dataset in a subspace family, stored in --out",
                          description="Measure the margin of every (sample, subspace) pair with batched "
                                      "DeepFool; results go to OUT/scan.sqlite while the scan runs.")
    scan.add_argument("--model", required=True,
                      help="model spec: built-in (lenet-fmnist, mlp-digits, ...), module:function, "
                           "a TorchScript file, or arch@state_dict.pt")
    scan.add_argument("--data", required=True, help="dataset name (digits, fashion-mnist, ...) or image folder")
    scan.add_argument("--split", default="test", help="dataset split (default test)")
    scan.add_argument("--subspaces", required=True, help="subspace spec, e.g. dct:K=8,T=1, dct-grid:K=8, full")
    scan.add_argument("--out", required=True, help="output folder (scan.sqlite, summary.txt, PNG plots)")
    scan.add_argument("--limit", type=positive_int, default=None, help="scan a seeded subset of N samples")
    scan.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    _add_engine_args(scan)
    scan.set_defaults(func=cmd_scan)

    show = sub.add_parser("show", help="summary table and plots of a stored scan")
    show.add_argument("dir", help="scan folder (or its scan.sqlite)")
    show.add_argument("--no-plot", action="store_true", help="print the table only")
    show.set_defaults(func=cmd_show)

    for name in _PLUGINS:
        _register_plugin(name, sub)
    return parser


def _register_plugin(name: str, sub) -> None:
    """Let an optional pipeline module add its subcommand (skipped if absent or without a hook)."""
    try:
        module = importlib.import_module(f"pyboundary.{name}")
    except ModuleNotFoundError as exc:
        if exc.name in (f"pyboundary.{name}",):
            return
        raise
    hook = getattr(module, "register_cli", None)
    if callable(hook):
        hook(sub)


# ------------------------------------------------------------------------------ commands
def _device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    return name


def _engine_options(args) -> dict:
    if not args.overshoot >= 0 or not math.isfinite(args.overshoot):
        raise UsageError(f"--overshoot must be a finite number >= 0, got {args.overshoot}")
    return {"candidates": args.candidates, "max_iter": args.max_iter, "overshoot": args.overshoot}


def _prepare_out(out: str, resume: bool, check_existing: bool = True) -> Path:
    """The store path in the --out folder (created); refuses an existing scan without --resume.

    Under torchrun only rank 0 checks (the others could otherwise see the store rank 0 has just
    created); rank 0 refuses again when it creates the store.
    """
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out!r} exists and is not a folder")
    store = out_dir / STORE_NAME
    if check_existing and store.exists() and not resume:
        raise UsageError(f"{str(store)!r} already holds a scan; pass --resume to continue it, "
                         "or choose another --out (results are never overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)
    return store


def _run_scan(model, ds, subspaces: str, args, model_name: str):
    """Single- or multi-process scan into args.out; returns the MarginScan (None on ranks > 0)."""
    from . import distributed
    from .margins import margin_scan

    env = distributed.world_from_env()
    store = _prepare_out(args.out, args.resume, check_existing=env is None or env[0] == 0)
    dev = _device(args.device)
    kwargs = dict(p=args.p, batch_size=args.batch_size, model_name=model_name, **_engine_options(args))
    if env is not None:
        rank, world, local = env
        if dev == "cuda":
            import torch

            torch.cuda.set_device(local)
            dev = f"cuda:{local}"
        model = model.to(dev)
        return distributed.distributed_scan(model, ds, subspaces, store=store, resume=args.resume, device=dev,
                                            progress=not args.no_progress, **kwargs)
    model = model.to(dev)
    if args.resume and distributed.leftover_parts(store):
        print(f"merged {distributed.merge_parts(store)} pairs from the parts of an interrupted multi-process scan")
    return margin_scan(model, ds, subspaces, store=store, resume=args.resume, device=dev,
                       progress=not args.no_progress, **kwargs)


def _report(scan, out: Path) -> None:
    table = scan.format_summary()
    print(table)
    (out / "summary.txt").write_text(table + "\n")
    paths = scan.plot(out)
    print("wrote " + ", ".join(str(p) for p in [out / STORE_NAME, out / "summary.txt", *paths]))


def cmd_scan(args) -> int:
    from . import data, models

    ds = data.load_dataset(args.data, split=args.split, limit=args.limit, seed=args.seed)
    model = models.load_model(args.model, in_shape=tuple(ds.x.shape[1:]), n_classes=len(ds.classes))
    t0 = time.perf_counter()
    scan = _run_scan(model, ds, args.subspaces, args, model_name=args.model)
    if scan is not None:
        pairs = scan.n_samples * scan.n_subspaces
        print(f"scanned {pairs} pairs in {time.perf_counter() - t0:.1f} s")
        _report(scan, Path(args.out))
    return 0


def cmd_demo(args) -> int:
    from . import data, models

    t0 = time.perf_counter()
    print("loading the reference LeNet trained on Fashion-MNIST (trained and cached on first use)...")
    model = models.reference_model("lenet", "fashion-mnist", progress=not args.no_progress)
    ds = data.load_dataset("fashion-mnist", split="test", limit=args.n, seed=0)
    print(f"model ready in {time.perf_counter() - t0:.0f} s; scanning {ds.x.shape[0]} test images x 21 DCT blocks")
    if (Path(args.out) / STORE_NAME).exists() and not args.resume:
        # Running the demo again continues (or just shows) the earlier run; the store still
        # refuses it if the settings differ.
        print(f"{args.out}/{STORE_NAME} exists: resuming it (finished pairs are not recomputed)")
        args.resume = True
    scan = _run_scan(model, ds, "dct:K=8,T=1", args, model_name="lenet-fmnist (reference)")
    if scan is not None:
        _report(scan, Path(args.out))
        print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_show(args) -> int:
    from .margins import MarginScan

    path = Path(args.dir)
    store = path / STORE_NAME if path.is_dir() else path
    if not store.exists():
        raise UsageError(f"no scan at {args.dir!r} (expected {str(store)!r})")
    scan = MarginScan.load(store)
    print(scan.format_summary())
    if not args.no_plot:
        out = store.parent
        paths = scan.plot(out)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


# ------------------------------------------------------------------------------ entry
def main(argv=None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad arguments or unusable input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, _missing_source_error()) as exc:
        print(f"pyboundary {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _missing_source_error():
    try:
        from .data import MissingSourceError

        return MissingSourceError
    except ImportError:  # pragma: no cover
        return ValueError


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

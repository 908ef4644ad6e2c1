"""``pyboundary demo | scan | show``: margin scans over a dataset and a subspace family.

A scan folder holds ``scan.sqlite`` (the result store), ``summary.txt`` and the PNG figures.
Under ``torchrun --nproc_per_node=N -m pyboundary scan ...`` the samples are sharded across the
ranks (see :mod:`pyboundary.scans.distributed`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from .allocator import allocator_in_use, tcmalloc_missing
from .args import (
    UsageError,
    add_deepfool_args,
    add_memory_args,
    add_model_data,
    add_run_args,
    add_stream_args,
    deepfool_kwargs,
    device,
    load_model_and_data,
    positive_int,
)

__all__ = ["STORE_NAME", "register"]

#: inputs of at least this many values per sample (224x224x3 is 150,528) make activations of tens
#: of MiB, which glibc's malloc maps and unmaps on every use (benchmarks/README.md, "Margin scan
#: at 224x224": tcmalloc ran such a scan 1.8x faster on CPU, see pyboundary.cli.allocator)
LARGE_INPUT = 100_000

#: pyboundary.scans.margins.RUN_STORE_NAME, spelled out so that the command line starts without
#: importing torch (tests/cli/test_cli_compare.py checks that the two agree)
STORE_NAME = "scan.sqlite"


def register(sub) -> None:
    demo = sub.add_parser("demo", help="scan a reference CNN on Fashion-MNIST along the DCT diagonal",
                          description="Train (or load from the cache) a LeNet-style CNN on Fashion-MNIST, "
                                      "measure margins of test images in the 21 DCT blocks (K=8, T=1) of "
                                      "28x28 images, print the summary table and write the plots.")
    demo.add_argument("--limit", type=positive_int, default=200, help="number of test images (default 200)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the test-image subset (default 0)")
    add_run_args(demo, out_default="pyboundary-demo",
                 batch_size_help="(sample, subspace) pairs per engine call, each one input row (default: automatic)")
    add_memory_args(demo)
    add_deepfool_args(demo)
    demo.add_argument("--resume", action="store_true", help="continue the scan stored in --out")
    demo.set_defaults(func=cmd_demo)

    scan = sub.add_parser("scan", help="margins of a dataset in a subspace family, stored in --out",
                          description="Measure the margin of every (sample, subspace) pair with batched "
                                      "DeepFool; results go to OUT/scan.sqlite while the scan runs.")
    add_model_data(scan)
    scan.add_argument("--subspaces", required=True, help="subspace spec, e.g. dct:K=8,T=1, dct-grid:K=8, full")
    add_run_args(scan, out_required=True,
                 batch_size_help="(sample, subspace) pairs per engine call, each one input row (default: the "
                                 "largest batch that fits --memory-budget, from a probe of the model)")
    add_memory_args(scan)
    add_stream_args(scan)
    add_deepfool_args(scan)
    scan.add_argument("--resume", action="store_true", help="continue the scan stored in --out")
    scan.set_defaults(func=cmd_scan)

    show = sub.add_parser("show", help="summary table and plots of a stored scan; export it as CSV/Parquet",
                          description="Print the summary table of a stored scan and write its plots next to "
                                      "it (into the run folder; for a store file of another name, NAME.sqlite, "
                                      "into NAME-plots/); --csv / --parquet export every (sample, subspace) "
                                      "pair in long format (MarginScan.to_pandas).")
    show.add_argument("run", help="scan folder (or its scan.sqlite, or any store file)")
    show.add_argument("--no-plot", action="store_true", help="print the table only")
    show.add_argument("--csv", metavar="FILE", default=None,
                      help="write one row per (sample, subspace) pair to FILE (CSV; needs pandas)")
    show.add_argument("--parquet", metavar="FILE", default=None,
                      help="the same rows as Parquet, with the scan's attributes (needs pandas and pyarrow)")
    show.set_defaults(func=cmd_show)


def _prepare_out(out: str, resume: bool, check_existing: bool = True) -> Path:
    """The store path in the --out folder (created); refuses an existing scan without --resume.

    Under torchrun only rank 0 checks (the others could otherwise see the store rank 0 has just
    created); rank 0 refuses again when it creates the store.
    """
    from ..scans.store import is_empty_store

    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out!r} exists and is not a folder")
    store = out_dir / STORE_NAME
    if check_existing and store.exists() and not resume and not is_empty_store(store):
        raise UsageError(f"{str(store)!r} already holds a scan; pass --resume to continue it, "
                         "or choose another --out (results are never overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)
    return store


def _run_scan(model, ds, subspaces: str, args, model_name: str):
    """Single- or multi-process scan into args.out; returns the MarginScan (None on ranks > 0)."""
    from ..scans import distributed
    from ..scans.margins import margin_scan

    env = distributed.world_from_env()
    store = _prepare_out(args.out, args.resume, check_existing=env is None or env[0] == 0)
    dev = device(args.device)
    kwargs = dict(p=args.p, batch_size=args.batch_size, model_name=model_name,
                  deepfool_kwargs=deepfool_kwargs(args), memory_budget=args.memory_budget,
                  workers=getattr(args, "workers", None))
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


def allocator_tip(image_shape, device_name: str, environ=os.environ, platform: str = sys.platform,
                  exists=os.path.exists) -> str | None:
    """A one-line tip for CPU scans of large inputs under glibc's malloc when tcmalloc is not
    installed (None when it does not apply: see :mod:`pyboundary.cli.allocator`)."""
    if not str(device_name).startswith("cpu"):
        return None
    if math.prod(image_shape) < LARGE_INPUT or not tcmalloc_missing("scan", environ, platform=platform,
                                                                     exists=exists):
        return None
    return ("tip: on CPU, inputs this large spend much time in glibc's malloc mapping memory; with "
            "tcmalloc installed (Debian/Ubuntu package libtcmalloc-minimal4) pyboundary runs under it, "
            "which made a 224x224 scan 1.8x faster (see pyboundary's benchmarks/README.md)")


def cmd_scan(args) -> int:
    model, ds = load_model_and_data(args, stream=True)
    tip = allocator_tip(tuple(ds.image_shape), device(args.device))
    if tip and os.environ.get("RANK", "0") == "0":
        print(tip, file=sys.stderr)
    t0 = time.perf_counter()
    scan = _run_scan(model, ds, args.subspaces, args, model_name=args.model)
    if scan is not None:
        pairs = scan.n_samples * scan.n_subspaces
        print(f"{pairs} pairs stored; this run took {time.perf_counter() - t0:.1f} s ({_peak_memory()}, "
              f"malloc: {allocator_in_use()})")
        _report(scan, Path(args.out))
    return 0


def _peak_memory() -> str:
    """'peak resident memory X GiB' of this process (or of rank 0)."""
    from .._utils.memory import format_bytes, peak_rss

    peak = peak_rss()
    return "peak resident memory unknown" if peak is None else f"peak resident memory {format_bytes(peak)}"


def cmd_demo(args) -> int:
    from .. import zoo

    t0 = time.perf_counter()
    print("loading the reference LeNet trained on Fashion-MNIST (trained and cached on first use)...")
    model = zoo.reference_model("lenet", "fashion-mnist", progress=not args.no_progress)
    ds = zoo.load_dataset("fashion-mnist", split="test", limit=args.limit, seed=args.seed)
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
    from ..scans import distributed
    from ..scans.margins import MarginScan, store_path

    exports = [(flag, Path(f)) for flag, f in (("--csv", args.csv), ("--parquet", args.parquet)) if f]
    for flag, f in exports:
        if f.exists():
            raise UsageError(f"{flag} {str(f)!r} exists; refusing to overwrite it")
    if args.parquet:
        _require_pyarrow()
    store = store_path(args.run)
    if distributed.leftover_parts(store):  # a multi-process scan running, or interrupted
        scan, from_parts = distributed.load_with_parts(store)
        print(f"({from_parts} pairs are in the part stores of a multi-process scan that is running or was "
              "interrupted; shown here, merged into the store when it ends or is resumed)")
    else:
        scan = MarginScan.load(store)  # read-only, from one snapshot: works while a scan is writing
    print(scan.format_summary())
    written = []
    if exports:
        frame = scan.to_pandas()
        for flag, f in exports:
            f.parent.mkdir(parents=True, exist_ok=True)
            if flag == "--csv":
                frame.to_csv(f, index=False)
            else:
                frame.to_parquet(f, index=False)
            written.append(f)
    if not args.no_plot:
        written += scan.plot(_plot_folder(store))
    if written:
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _plot_folder(store: Path) -> Path:
    """Where ``show`` writes a store's plots: its run folder, or for a store file of another name
    (several stores in one folder) a folder of its own, ``<stem>-plots``, so plots of different
    stores do not overwrite each other."""
    return store.parent if store.name == STORE_NAME else store.parent / f"{store.stem}-plots"


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UsageError("--parquet needs pyarrow (pip install pyarrow); --csv needs only pandas") from None

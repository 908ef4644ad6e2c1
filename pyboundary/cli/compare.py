"""``pyboundary compare RUN RUN [...] --out DIR``: stored scans side by side.

Writes ``DIR/comparison.txt`` (the table of :meth:`pyboundary.scans.ScanComparison.format_summary`),
``DIR/comparison.json`` (the whole result, :meth:`~pyboundary.scans.ScanComparison.save`) and
``DIR/comparison.png`` (medians with 5-95 % bands, differences with their bootstrap CI). Existing
outputs are never overwritten.
"""

from __future__ import annotations

from pathlib import Path

from .args import UsageError, positive_int

__all__ = ["register", "OUTPUTS"]

#: files written into --out
OUTPUTS = ("comparison.txt", "comparison.json", "comparison.png")


def register(sub) -> None:
    cmp = sub.add_parser(
        "compare", help="compare stored scans of one subspace family (table, plot, bootstrap CIs)",
        description="Put stored scans (of different models, trainings or norms) over the same subspace "
                    "family side by side: median, p5-p95 and ratio to the first run per subspace, and the "
                    "difference of medians to the first run with a bootstrap confidence interval. Scans of "
                    "different families are refused; scans of different samples too, unless "
                    "--common-samples or --independent-samples says how to compare them.")
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="scan folders (or their scan.sqlite), the first is the reference")
    cmp.add_argument("--out", required=True, help="output folder (comparison.txt, comparison.json, comparison.png)")
    mode = cmp.add_mutually_exclusive_group()
    mode.add_argument("--common-samples", action="store_const", dest="samples", const="common",
                      help="compare on the samples every run holds (matched by content), paired")
    mode.add_argument("--independent-samples", action="store_const", dest="samples", const="independent",
                      help="runs over different samples (e.g. other seeded subsets): unpaired bootstrap")
    cmp.set_defaults(samples="same")
    cmp.add_argument("--names", nargs="+", default=None, metavar="NAME",
                     help="display names, one per run (default: the model names stored with the runs)")
    cmp.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
    cmp.add_argument("--confidence", type=float, default=0.95, help="confidence level of the CIs (default 0.95)")
    cmp.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    cmp.add_argument("--no-plot", action="store_true", help="write no figure")
    cmp.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from ..scans.comparison import compare

    if len(args.runs) < 2:
        raise UsageError(f"compare needs at least two runs, got {len(args.runs)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} exists and is not a folder")
    taken = [str(out / f) for f in OUTPUTS if (out / f).exists()]
    if taken:
        raise UsageError(f"--out {args.out!r} already holds a comparison ({', '.join(taken)}); "
                         "choose another folder (results are never overwritten)")
    comp = compare(args.runs, names=args.names, samples=args.samples, n_boot=args.n_boot,
                   confidence=args.confidence, seed=args.seed)
    table = comp.format_summary()
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUTS[0]).write_text(table + "\n")
    comp.save(out / OUTPUTS[1])
    written = [out / OUTPUTS[0], out / OUTPUTS[1]]
    if not args.no_plot:
        written.append(comp.plot(out / OUTPUTS[2]))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0

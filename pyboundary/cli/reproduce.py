"""``pyboundary reproduce``: run a published experiment and write its report (parsing and dispatch only).

    pyboundary reproduce --list
    pyboundary reproduce NAME [--scale budget|full] --out DIR [--seed S] [--threads N] [--no-progress]
"""

from __future__ import annotations

from .args import UsageError, positive_int

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser(
        "reproduce", help="run a published experiment (offline data and models) and write its report",
        description="Run one entry of pyboundary.experiments.reproduce: a published experiment on "
                    "offline data and cached models; writes report.md (published numbers beside ours, "
                    "scale, measured time), PNG figures and results.json into --out.")
    p.add_argument("name", nargs="?", default=None, help="entry name (see --list)")
    p.add_argument("--list", action="store_true", help="list the entries and exit")
    p.add_argument("--scale", choices=("budget", "full"), default="budget",
                   help="budget: minutes of CPU; full: the paper's sizes where possible (default budget)")
    p.add_argument("--out", default=None, help="output folder (required to run an entry)")
    p.add_argument("--seed", type=int, default=0, help="base seed of subsets, directions and training (default 0)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads for the run (default: torch's; 1 is fastest on a shared machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> int:
    from ..experiments.reproduce import list_entries, run_entry

    if args.list:
        for e in list_entries():
            print(f"{e.name:<24} {e.what}")
            print(f"{'':<24} {e.paper}; budget run ~{e.budget_cpu_s:g} s CPU")
        return 0
    if args.name is None:
        raise UsageError("give an entry NAME (pyboundary reproduce --list shows them) or --list")
    if args.out is None:
        raise UsageError("--out DIR is required to run an entry")
    res = run_entry(args.name, scale=args.scale, out=args.out, seed=args.seed, progress=not args.no_progress,
                    threads=args.threads)
    print(res.format_summary())
    return 0

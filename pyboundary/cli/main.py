"""The ``pyboundary`` command line: a fixed table of commands, one module per command group.

    pyboundary demo                      reference CNN on Fashion-MNIST, DCT diagonal scan
    pyboundary scan | show               margin scans over a dataset and a subspace family
    pyboundary compare                   stored scans side by side (table, plot, bootstrap CIs)
    pyboundary detect | curvature | topology   boundary geometry of a model on a dataset
    pyboundary track                     margins while a network trains
    pyboundary reproduce                 a published experiment, its report beside the paper's numbers

Shared flags have one meaning everywhere (:mod:`pyboundary.cli.args`). Bad arguments print a
message and exit with code 2. Heavy commands run under tcmalloc when it is installed
(:mod:`pyboundary.cli.allocator`; ``PYBOUNDARY_MALLOC=system`` keeps the system allocator).
"""

from __future__ import annotations

import argparse
import sys

from . import allocator, compare, dynamics, geometry, reproduce, scan
from .args import UsageError

__all__ = ["main", "build_parser", "COMMANDS"]

#: command group modules, in --help order; each adds its subcommands with register(subparsers)
_GROUPS = (scan, compare, geometry, dynamics, reproduce)
#: every command of the CLI (tests assert this exact set)
COMMANDS = ("demo", "scan", "show", "compare", "detect", "curvature", "topology", "track", "reproduce")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyboundary",
        description="Geometry of classifiers' decision boundaries: margins in subspaces, curvature, detection.",
    )
    parser.add_argument("--version", action="version", version=f"pyboundary {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in _GROUPS:
        group.register(sub)
    return parser


def _version() -> str:
    from .._version import __version__

    return __version__


def _user_errors() -> tuple:
    """Exceptions that mean "the input cannot be used" (exit code 2, message, no traceback)."""
    from ..scans.store import StoreError
    from ..zoo.data import MissingSourceError

    return (UsageError, ValueError, TypeError, FileNotFoundError, StoreError, MissingSourceError)


def main(argv=None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad arguments or unusable input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        if argv is None:  # the program itself (not an in-process call): maybe run under tcmalloc
            allocator.maybe_reexec(args.command)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        print(f"pyboundary {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

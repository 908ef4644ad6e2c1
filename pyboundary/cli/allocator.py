"""The command line's memory allocator: heavy commands run under tcmalloc when it is installed.

Why: at 224x224 a model's activations are tens of MiB each, and glibc's malloc gives every freed
block above its mmap threshold back to the kernel, which maps and zeroes it again on the next
use: a third of an ImageNet scan's CPU time was system time. tcmalloc keeps and reuses them. The
README's ImageNet scan, same code and machine: 227 s under glibc, 128 s under tcmalloc, peak
resident memory 6.0 and 6.3 GiB (benchmarks/README.md).

An allocator must be loaded before the interpreter starts, so a heavy command started as the
``pyboundary`` program (or ``python -m pyboundary``, also under torchrun) re-executes itself once,
at its start, with ``LD_PRELOAD`` naming the library, when all of these hold:

* Linux, and a tcmalloc library at one of :data:`CANDIDATES` (Debian/Ubuntu:
  ``apt-get install libtcmalloc-minimal4``; Fedora: ``gperftools-libs``);
* ``LD_PRELOAD`` does not already name tcmalloc or jemalloc;
* ``PYBOUNDARY_MALLOC`` is unset or ``tcmalloc`` (``system`` keeps the system allocator).

The Python API never changes the process's allocator: only this command line does, and
``pyboundary scan`` names the allocator it ran under on its summary line.
"""

from __future__ import annotations

import os
import sys

__all__ = ["CANDIDATES", "ENV", "HEAVY_COMMANDS", "allocator_in_use", "find_tcmalloc", "maybe_reexec",
           "reexec_environment", "tcmalloc_missing"]

#: the variable that chooses: unset/"tcmalloc" (use it when installed) or "system"
ENV = "PYBOUNDARY_MALLOC"
#: set in the re-executed process (never re-execute twice)
_MARKER = "_PYBOUNDARY_REEXECUTED"
#: commands that push many rows through a model (the others read stores or print)
HEAVY_COMMANDS = frozenset({"demo", "scan", "detect", "curvature", "topology", "track", "reproduce"})
#: where distributions install tcmalloc (minimal first: no heap profiler)
CANDIDATES = tuple(
    f"{d}/{name}"
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
              "/usr/local/lib")
    for name in ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
)


def allocator_in_use(environ=os.environ) -> str:
    """'tcmalloc', 'jemalloc' or 'system': what ``LD_PRELOAD`` names for this process."""
    preload = environ.get("LD_PRELOAD", "")
    for name in ("tcmalloc", "jemalloc"):
        if name in preload:
            return name
    return "system"


def find_tcmalloc(exists=os.path.exists) -> str | None:
    """Path of an installed tcmalloc library (None when there is none)."""
    return next((path for path in CANDIDATES if exists(path)), None)


def _wants_tcmalloc(command: str, environ, platform: str) -> bool:
    """Whether ``command`` should run under tcmalloc here (whether or not it is installed)."""
    choice = environ.get(ENV, "tcmalloc").strip().lower()
    if choice not in ("tcmalloc", "system"):
        raise ValueError(f"{ENV} must be 'tcmalloc' or 'system', got {environ.get(ENV)!r}")
    return (choice == "tcmalloc" and command in HEAVY_COMMANDS and platform.startswith("linux")
            and not environ.get(_MARKER) and allocator_in_use(environ) == "system")


def tcmalloc_missing(command: str, environ=os.environ, *, platform: str = sys.platform,
                     exists=os.path.exists) -> bool:
    """True when ``command`` would run under tcmalloc but no tcmalloc library is installed."""
    return _wants_tcmalloc(command, environ, platform) and find_tcmalloc(exists) is None


def reexec_environment(command: str, environ=os.environ, *, platform: str = sys.platform,
                       exists=os.path.exists) -> dict | None:
    """The environment to re-execute ``command`` with (tcmalloc preloaded), or None to run as is."""
    if not _wants_tcmalloc(command, environ, platform):
        return None
    library = find_tcmalloc(exists)
    if library is None:
        return None
    preload = " ".join(filter(None, [library, environ.get("LD_PRELOAD", "")]))
    return {**environ, "LD_PRELOAD": preload, _MARKER: "1"}


def maybe_reexec(command: str) -> None:
    """Re-execute this process under tcmalloc when :func:`reexec_environment` says so.

    Only for the ``pyboundary`` program itself (``sys.argv[0]`` is its script or
    ``pyboundary/__main__.py``): a program that calls :func:`pyboundary.cli.main` in-process is
    never replaced. Returns (doing nothing) when the re-execution cannot start."""
    program = os.path.basename(sys.argv[0] or "")
    is_cli = program == "pyboundary" or (program == "__main__.py" and "pyboundary" in sys.argv[0])
    if not is_cli:
        return
    env = reexec_environment(command)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # the interpreter's own command line (keeps options such as -u or -X), else the module form
    orig = getattr(sys, "orig_argv", None)
    args = orig[1:] if orig else ["-m", "pyboundary", *sys.argv[1:]]
    try:
        os.execve(sys.executable, [sys.executable, *args], env)
    except OSError:  # pragma: no cover - e.g. no permission to execute: run as is
        return

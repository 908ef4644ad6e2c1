"""Memory, measured: what is available now, what a budget allows, and the peak of a piece of work.

The batch-size planner (:mod:`pyboundary._utils.batching`) builds on these:

* :func:`available_memory`: CPU: ``MemAvailable`` of ``/proc/meminfo`` (free memory plus
  reclaimable caches) bounded by the cgroup limit; CUDA: the device's free memory plus what
  torch's caching allocator holds unused.
* :func:`resolve_budget`: ``memory_budget`` (bytes, a size string such as ``'6GB'``/``'512MiB'``,
  a percentage ``'40%'`` of the memory available now, or ``'off'``); default
  :data:`DEFAULT_BUDGET_FRACTION` of the memory available now.
* :func:`measure_peak`: the peak memory a call adds. CPU: the process's peak resident set size
  (``VmHWM``), reset before the call through ``/proc/self/clear_refs`` after ``malloc_trim`` has
  handed freed heap pages back, so the peak counts the memory the call really touches (model
  activations, retained graphs, oneDNN scratch space: everything the kernel's OOM killer
  counts). CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  what was allocated before.
* :func:`memory_in_use`, :func:`start_peak_window`, :func:`peak_since_window`: the process's
  memory now and the peak a piece of work reached (the per-batch check of
  :class:`pyboundary._utils.batching.BackoffState`; on CPU it reads the process's peak without
  resetting it).
* :func:`probe_memory`: a linear model ``need(b) = fixed + b * per_row`` from two measured runs.

Units: bytes everywhere.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = [
    "DEFAULT_BUDGET_FRACTION", "DEFAULT_PROBE_ROWS", "SAFETY", "MemoryProbe", "available_memory",
    "parse_memory_budget", "resolve_budget", "measure_peak", "probe_memory", "cpu_peak_supported",
    "format_bytes", "peak_rss", "memory_in_use", "start_peak_window", "peak_since_window",
]

#: fraction of the memory available now that an automatic batch may use, per device type. On CPU
#: the rest is left to other processes, to the data loader and to allocator fragmentation; on a
#: GPU the probe counts the caching allocator exactly, so more of the free memory is usable.
DEFAULT_BUDGET_FRACTION = {"cpu": 0.25, "cuda": 0.7}
#: rows of the two measured probe runs (a warm-up run on the first size precedes them)
DEFAULT_PROBE_ROWS = (2, 4)
#: the per-row estimate is scaled by this before dividing the budget (probe noise, growth of
#: allocator fragmentation with the batch)
SAFETY = 1.15

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def format_bytes(n: float) -> str:
    """Human-readable size with binary prefixes (``1.5 GiB``)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


# ------------------------------------------------------------------------------ memory now
def _device(device) -> torch.device:
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (None: no limit or unknown)."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                raw = f.read().strip()
            if raw == "max":
                return None
            limit = int(raw)
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit >= 2**60:  # cgroup v1 "no limit"
            return None
        return max(0, limit - usage)
    return None


def available_memory(device=None) -> int:
    """Bytes a new allocation on ``device`` can use now.

    CPU: ``MemAvailable`` from ``/proc/meminfo`` (free memory plus reclaimable caches), bounded by
    the room left under the cgroup memory limit; elsewhere the free physical pages. CUDA: the
    device's free memory (``torch.cuda.mem_get_info``) plus the memory torch's caching allocator
    has reserved but not allocated (reusable by this process).
    """
    dev = _device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free + max(0, cached))
    avail = _meminfo_available()
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
            avail = 4 * 2**30
    room = _cgroup_room()
    return int(avail if room is None else min(avail, room))


def parse_memory_budget(value):
    """Normalise a memory budget: None (default), ``'off'`` (no probing), bytes, or a fraction.

    Accepted: None; ``'off'``/``False`` (no probe, no check); a positive int (bytes); a string
    with a unit, ``'6GB'`` (10^9), ``'6GiB'``/``'6G'`` (2^30), ``'512MB'``, ``'512M'``; a
    percentage ``'40%'`` of the memory available now. Returns None, ``'off'``, an int (bytes) or
    a float in (0, 1] (a fraction of the available memory).
    Raises TypeError/ValueError naming ``memory_budget`` and the value seen.
    """
    if value is None:
        return None
    if value is False or (isinstance(value, str) and value.strip().lower() in ("off", "none", "no")):
        return "off"
    if isinstance(value, bool):
        raise TypeError(f"memory_budget must be bytes (int), a size string or 'off', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"memory_budget must be > 0 bytes, got {value}")
        return int(value)
    if isinstance(value, float):
        raise TypeError(f"memory_budget: give bytes as an int, a size such as '6GB', or a percentage "
                        f"such as '40%', got the float {value!r}")
    if not isinstance(value, str):
        raise TypeError(f"memory_budget must be bytes (int), a size string or 'off', got {type(value).__name__}")
    text = value.strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)%", text)
    if m:
        frac = float(m.group(1)) / 100
        if not 0 < frac <= 1:
            raise ValueError(f"memory_budget percentage must be in (0, 100], got {value!r}")
        return frac
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([a-z]*)", text)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"memory_budget must look like '6GB', '6GiB', '512MB', '40%' or 'off', got {value!r}")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size <= 0:
        raise ValueError(f"memory_budget must be > 0 bytes, got {value!r}")
    return size


def resolve_budget(memory_budget, device=None) -> tuple[int | None, int, str]:
    """(budget bytes or None when 'off', available bytes, a description of the budget's origin)."""
    dev = _device(device)
    spec = parse_memory_budget(memory_budget)
    avail = available_memory(dev)
    if spec == "off":
        return None, avail, "off"
    if spec is None:
        frac = DEFAULT_BUDGET_FRACTION.get(dev.type, DEFAULT_BUDGET_FRACTION["cpu"])
        return int(frac * avail), avail, f"default: {frac:.0%} of {format_bytes(avail)} available"
    if isinstance(spec, float):
        return int(spec * avail), avail, f"{spec:.0%} of {format_bytes(avail)} available"
    return spec, avail, f"given: {format_bytes(spec)}"


# ------------------------------------------------------------------------------ peak memory
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


_release_calls = None


def _heap_releasers() -> list:
    """The calls that hand an allocator's freed pages back to the kernel, for the allocators
    loaded in this process (looked up once): glibc ``malloc_trim(0)``, a preloaded tcmalloc's
    ``MallocExtension_ReleaseFreeMemory()`` and a preloaded jemalloc's purge of every arena
    (``mallctl("arena.4096.purge")``, 4096 = MALLCTL_ARENAS_ALL)."""
    global _release_calls
    if _release_calls is None:
        _release_calls = []
        try:
            process = ctypes.CDLL(None)  # the global namespace: libc and any LD_PRELOADed allocator
        except OSError:  # pragma: no cover - no dynamic loader
            return _release_calls
        if hasattr(process, "malloc_trim"):
            _release_calls.append(lambda: process.malloc_trim(0))
        if hasattr(process, "MallocExtension_ReleaseFreeMemory"):
            _release_calls.append(process.MallocExtension_ReleaseFreeMemory)
        if hasattr(process, "mallctl"):
            _release_calls.append(lambda: process.mallctl(b"arena.4096.purge", None, None, None, 0))
    return _release_calls


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS, so a run that reuses them shows up in the resident
    set size again. Without this a caching allocator (tcmalloc: the command line's) serves a probe
    from pages an earlier phase freed, its resident set does not grow, and the probe measures
    almost nothing: a curvature report's second probe chose 256 ImageNet rows (21 GiB) instead
    of ~55."""
    for release in _heap_releasers():
        release()


#: the largest VmHWM seen before a reset (KiB): the measurements reset the kernel's peak, the
#: process's lifetime peak is the larger of this and the current VmHWM
_hwm_before_resets_kib = 0


def _hwm_bytes() -> int | None:
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib * 1024


def peak_rss() -> int | None:
    """The process's peak resident set size so far in bytes (None off Linux): ``VmHWM``, or the
    larger peak it had before a measurement here reset it."""
    hwm = _hwm_bytes()
    return None if hwm is None else max(hwm, _hwm_before_resets_kib * 1024)


def _reset_rss_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to the current RSS (the peak so far is kept for
    :func:`peak_rss`); False where Linux does not let us."""
    global _hwm_before_resets_kib
    kib = _proc_status_kib("VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    _hwm_before_resets_kib = max(_hwm_before_resets_kib, kib or 0)
    return True


@functools.cache
def cpu_peak_supported() -> bool:
    """Whether :func:`measure_peak` can measure on CPU here (Linux ``/proc`` with a resettable
    peak; tried once per process)."""
    return _proc_status_kib("VmHWM") is not None and _reset_rss_peak()


def memory_in_use(device=None) -> int | None:
    """Bytes this process uses now: CPU resident set size (None off Linux); CUDA bytes allocated
    by torch on the device."""
    dev = _device(device)
    if dev.type == "cuda":
        return int(torch.cuda.memory_allocated(dev))
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def start_peak_window(device=None) -> int | None:
    """Start watching the peak memory of a piece of work; pass the result to
    :func:`peak_since_window`. CUDA: resets torch's peak allocated bytes (returns 0; so
    ``torch.cuda.max_memory_allocated`` read later covers only the work since). CPU: reads the
    kernel's peak resident set size (``VmHWM``) without resetting it (only the memory probe,
    :func:`measure_peak`, resets it, once per plan; :func:`peak_rss` keeps the peak from before
    such resets); None off Linux."""
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return 0
    return _hwm_bytes()


def peak_since_window(start: int | None, device=None) -> int | None:
    """The peak bytes in use since :func:`start_peak_window` returned ``start``, or None where
    unknown. CUDA: torch's peak allocated bytes (after a synchronisation). CPU: the process's new
    peak resident set size if the work raised it above ``start``, else None (the work stayed
    below a peak reached earlier)."""
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev))
    now = _hwm_bytes()
    if start is None or now is None or now <= start:
        return None
    return now


def measure_peak(fn: Callable[[], object], device=None) -> int:
    """Peak memory (bytes) that ``fn()`` adds above what was in use when it started.

    CPU: peak resident set size during the call minus the resident set size before it (Linux;
    raises RuntimeError where ``/proc/self/clear_refs`` cannot reset the peak). CUDA: peak of
    ``torch.cuda.memory_allocated`` during the call minus its value before. The result of
    ``fn`` is dropped before measuring ends.
    """
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = memory_in_use(dev)
        start = start_peak_window(dev)
        fn()
        return max(0, peak_since_window(start, dev) - base)
    _trim_heap()
    if not _reset_rss_peak():
        raise RuntimeError("measuring CPU memory needs Linux /proc/self/clear_refs")
    base = _proc_status_kib("VmRSS")
    fn()
    peak = _proc_status_kib("VmHWM")
    return max(0, (peak - base) * 1024)


@dataclass(frozen=True)
class MemoryProbe:
    """Linear memory model ``need(b) = fixed + b * per_row`` (bytes) from two probe runs."""

    rows: tuple
    peaks: tuple
    per_row: float
    fixed: float

    def need(self, rows: int) -> float:
        return self.fixed + rows * self.per_row * SAFETY


def probe_memory(run: Callable[[int], object], device=None, rows: Sequence[int] = DEFAULT_PROBE_ROWS) -> MemoryProbe:
    """Measure ``run(r)`` on two row counts (after one warm-up run) and fit the linear model.

    Args:
        run: one unit of the real work on the first ``r`` rows of the real input.
        rows: (r1, r2) with 1 <= r1 < r2.
    """
    r1, r2 = int(rows[0]), int(rows[1])
    if not 1 <= r1 < r2:
        raise ValueError(f"probe rows must satisfy 1 <= r1 < r2, got {tuple(rows)}")
    run(r1)  # warm-up: lazy initialisation, kernel caches, first-touch of the weights
    p1 = measure_peak(lambda: run(r1), device)
    p2 = measure_peak(lambda: run(r2), device)
    per_row = (p2 - p1) / (r2 - r1)
    if _device(device).type != "cuda" or per_row <= 0:
        # On CPU the slope is the difference of two noisy peaks: whether glibc reuses a block
        # freed during the run changes a peak by up to ~1.5x. The average per row of the larger
        # run is the conservative bound there. (CUDA's allocated-bytes statistics are exact.)
        per_row = max(per_row, p2 / r2)
    fixed = max(0.0, p1 - r1 * per_row)
    return MemoryProbe(rows=(r1, r2), peaks=(p1, p2), per_row=float(per_row), fixed=float(fixed))

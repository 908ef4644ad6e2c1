"""Memory-aware batch sizes: probe the real work on a few rows, scale to a memory budget.

Every pipeline that pushes many rows through a model (the margin scan, ``deepfool``, curvature,
detection) sizes its batches here instead of trusting a fixed default:

1. **Probe.** The caller hands over ``run(r)``, one unit of its real work on ``r`` rows of the
   real input (e.g. one DeepFool iteration on ``r`` (sample, subspace) pairs). It runs once to
   warm up (lazy initialisation is not per-row memory), then on ``r1`` and ``r2`` rows while
   the peak memory is measured (:func:`measure_peak`):

   * CPU: the process's peak resident set size (``VmHWM``), reset before each run through
     ``/proc/self/clear_refs`` after ``malloc_trim`` has handed freed heap pages back, so the
     peak counts the memory the run really touches (model activations, retained graphs,
     oneDNN scratch space: everything the kernel's OOM killer would count);
   * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
     allocated before.

   The two peaks give a linear model ``need(b) = fixed + b * per_row`` (bytes).
2. **Budget.** ``memory_budget`` (bytes, a size string such as ``'6GB'``/``'512MiB'``, or a
   percentage ``'40%'`` of the memory available now); default :data:`DEFAULT_BUDGET_FRACTION` of
   the memory available now (:func:`available_memory`: ``MemAvailable`` of ``/proc/meminfo``,
   bounded by the cgroup limit; on CUDA the free device memory plus what torch's caching
   allocator holds unused).
3. **Choice.** Automatic: the largest ``b`` with ``need(b) <= budget``, at most the number of
   rows (and an optional cap). Explicit ``batch_size``: kept, but refused with
   :class:`MemoryBudgetError` before any work when ``need(batch_size)`` exceeds the budget (the
   given one, or else all the memory available), with the estimate and the limit in the message.
4. **Back-off** (:func:`map_with_backoff`): a chunk that still raises an out-of-memory error
   (``torch.OutOfMemoryError``, i.e. ``torch.cuda.OutOfMemoryError``, or the CPU allocator's
   "can't allocate memory") is retried in halves, down to one row, and later chunks keep the
   smaller size. On CPU the kernel usually kills a process before an allocation fails, which is
   why the probe and the budget come first.

The chosen size and its evidence are a :class:`BatchPlan` (``summary()`` is recorded in result
stores). Units: bytes everywhere; ``rows`` is whatever the caller batches (pairs for the scan,
samples for ``deepfool``, model rows for curvature).
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = [
    "BatchPlan", "MemoryBudgetError", "DEFAULT_BUDGET_FRACTION", "DEFAULT_PROBE_ROWS",
    "available_memory", "parse_memory_budget", "resolve_budget", "measure_peak", "probe_memory",
    "plan_batch_size", "map_with_backoff", "is_out_of_memory", "format_bytes", "BackoffState",
    "reuse_freed_memory", "peak_rss",
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


class MemoryBudgetError(ValueError):
    """A batch that cannot fit in the memory budget (raised before the work starts)."""


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


_libc = None


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so a run that reuses them
    shows up in the resident set size again."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    if _libc:
        try:
            _libc.malloc_trim(0)
        except AttributeError:  # pragma: no cover - not glibc
            pass


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it (process-wide, Linux).

    By default glibc serves every allocation above 32 MiB with its own ``mmap`` and returns it
    with ``munmap`` when freed, so each such tensor costs the kernel a page fault per 4 KiB page
    (and zeroing) on every use. At 224x224 a batch of 28 (image, subspace) pairs through
    EfficientNet-Lite0 makes many 40+ MiB activations per DeepFool iteration: measured on this
    2-core machine, 43 % of the scan's CPU time was system time, and the scan took 0.81 CPU-s
    per pair against 0.64 with this setting (``M_MMAP_MAX=0``: no per-allocation mappings,
    ``M_TRIM_THRESHOLD`` high: freed memory stays in the heap for the next batch). The resident
    set then stays near the peak of a batch instead of shrinking between batches, which the
    batch budget already allows for. The command line applies it to its own process; library
    users may call it. Returns False where it does not apply (not glibc).
    """
    global _libc
    _trim_heap()  # loads libc
    if not _libc:
        return False
    try:
        ok = _libc.mallopt(-4, 0)  # M_MMAP_MAX
        ok = _libc.mallopt(-1, 2**30) and ok  # M_TRIM_THRESHOLD (int: 1 GiB of free top memory kept)
    except AttributeError:  # pragma: no cover - not glibc
        return False
    return bool(ok)


def peak_rss() -> int | None:
    """The process's peak resident set size so far in bytes (``VmHWM``; None off Linux)."""
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib * 1024


def _reset_rss_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to the current RSS; False where Linux does not let us."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_supported() -> bool:
    """Whether :func:`measure_peak` can measure on CPU here (Linux ``/proc`` with a resettable peak)."""
    return _proc_status_kib("VmHWM") is not None and _reset_rss_peak()


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
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return max(0, int(torch.cuda.max_memory_allocated(dev) - base))
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


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class BatchPlan:
    """A chosen batch size and the evidence for it.

    Attributes:
        batch_size: rows per batch.
        source: 'auto' (chosen from the probe), 'explicit' (given, checked), 'unchecked' (given
            or defaulted without a probe: ``memory_budget='off'`` or no way to measure), 'all'
            (the whole input fits the probe sizes, no probe run).
        device: where the rows run.
        budget: bytes the batch may use (None when not checked).
        available: bytes available when planned.
        per_row, fixed: the probe's linear model in bytes (None without a probe).
        need: estimated peak bytes of one batch of ``batch_size`` rows (None without a probe).
        budget_origin: how the budget was set (text).
        unit: what a row is ('pairs', 'samples', 'rows').
    """

    batch_size: int
    source: str
    device: str
    budget: int | None = None
    available: int | None = None
    per_row: float | None = None
    fixed: float | None = None
    need: float | None = None
    budget_origin: str = ""
    unit: str = "rows"

    def summary(self) -> dict:
        return {"batch_size": self.batch_size, "source": self.source, "device": self.device,
                "budget_bytes": self.budget, "available_bytes": self.available,
                "per_row_bytes": None if self.per_row is None else round(self.per_row),
                "fixed_bytes": None if self.fixed is None else round(self.fixed),
                "estimated_peak_bytes": None if self.need is None else round(self.need),
                "budget_origin": self.budget_origin, "unit": self.unit}

    def format_summary(self) -> str:
        text = f"batch of {self.batch_size} {self.unit} ({self.source}"
        if self.need is not None:
            text += f"; estimated peak {format_bytes(self.need)}"
            if self.budget is not None:
                text += f" of a {format_bytes(self.budget)} budget"
            text += f", {format_bytes(self.per_row)} per {self.unit.rstrip('s')}"
        elif self.budget_origin:
            text += f"; {self.budget_origin}"
        return text + f", {self.device})"


def plan_batch_size(
    run: Callable[[int], object],
    n_rows: int,
    *,
    device=None,
    batch_size: int | None = None,
    memory_budget=None,
    default: int | None = None,
    max_batch_size: int | None = None,
    probe_rows: Sequence[int] = DEFAULT_PROBE_ROWS,
    unit: str = "rows",
    what: str = "batch_size",
) -> BatchPlan:
    """Choose (or check) the number of rows per batch for ``n_rows`` rows of work.

    Args:
        run: ``run(r)`` does one unit of the real work on the first ``r`` rows (see
            :func:`probe_memory`); only called when a probe is needed.
        n_rows: total rows the caller will process.
        device: where the work runs (CPU RSS or CUDA allocator statistics).
        batch_size: an explicit size (kept when it fits, else :class:`MemoryBudgetError`).
        memory_budget: see :func:`parse_memory_budget`; ``'off'`` skips the probe and the check.
        default: the size used without a probe (``memory_budget='off'``, or where memory cannot
            be measured); None = all rows.
        max_batch_size: upper bound of an automatic choice (None: ``n_rows``).
        probe_rows: the two probe sizes (capped below ``n_rows``).
        unit: what a row is, for messages ('pairs', 'samples').
        what: the argument's name in messages ('batch_size', '--batch-size').
    Returns:
        :class:`BatchPlan`.
    """
    dev = _device(device)
    n_rows = max(int(n_rows), 1)
    cap = n_rows if max_batch_size is None else max(1, min(n_rows, int(max_batch_size)))
    budget, avail, origin = resolve_budget(memory_budget, dev)
    if batch_size is not None:
        batch_size = min(int(batch_size), n_rows)
    fallback = batch_size if batch_size is not None else min(n_rows, default or n_rows)
    if budget is None:
        return BatchPlan(fallback, "unchecked", str(dev), None, avail, budget_origin="memory_budget='off'", unit=unit)
    r1, r2 = int(probe_rows[0]), int(probe_rows[1])
    if n_rows <= r2:
        # all the work is as small as a probe: probing would cost as much as doing it
        return BatchPlan(fallback, "all", str(dev), budget, avail, budget_origin=origin, unit=unit)
    if dev.type == "cpu" and not cpu_peak_supported():
        warnings.warn("cannot measure CPU memory on this platform (no resettable /proc peak); batch "
                      f"sizes are not checked against memory (using {fallback})", stacklevel=3)
        return BatchPlan(fallback, "unchecked", str(dev), None, avail, budget_origin="not measurable here", unit=unit)
    probe = probe_memory(run, dev, (r1, r2))
    if batch_size is not None:
        need = probe.need(batch_size)
        limit = budget if parse_memory_budget(memory_budget) is not None else avail
        if need > limit:
            fits = _largest_fit(probe, limit, cap)
            what_limit = (f"the memory budget of {format_bytes(limit)} ({origin})"
                          if parse_memory_budget(memory_budget) is not None
                          else f"the {format_bytes(limit)} of memory available now")
            raise MemoryBudgetError(
                f"{what}={batch_size} cannot fit: one batch of {batch_size} {unit} needs an estimated "
                f"{format_bytes(need)} ({format_bytes(probe.per_row)} per {unit.rstrip('s')} + "
                f"{format_bytes(probe.fixed)}, measured on {r1} and {r2} {unit} on {dev}), more than "
                f"{what_limit}. "
                + (f"Use {what} <= {fits}, or leave it unset to choose automatically." if fits >= 1
                   else "Not even one fits: free memory or use a smaller model/input.")
            )
        return BatchPlan(batch_size, "explicit", str(dev), budget, avail, probe.per_row, probe.fixed, need, origin, unit)
    size = _largest_fit(probe, budget, cap)
    if size < 1:
        one = probe.need(1)
        if one > avail:
            raise MemoryBudgetError(
                f"one {unit.rstrip('s')} needs an estimated {format_bytes(one)} on {dev}, more than the "
                f"{format_bytes(avail)} available now: free memory or use a smaller model/input")
        warnings.warn(f"one {unit.rstrip('s')} needs an estimated {format_bytes(one)}, more than the memory "
                      f"budget of {format_bytes(budget)} ({origin}); running one at a time", stacklevel=3)
        size = 1
    return BatchPlan(size, "auto", str(dev), budget, avail, probe.per_row, probe.fixed, probe.need(size), origin, unit)


def _largest_fit(probe: MemoryProbe, limit: float, cap: int) -> int:
    """Largest b <= cap with need(b) <= limit (0 if none)."""
    room = limit - probe.fixed
    if room <= 0:
        return 0
    per = probe.per_row * SAFETY
    return int(min(cap, math.floor(room / per))) if per > 0 else cap


# ------------------------------------------------------------------------------ back-off
def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's out-of-memory errors (CUDA or the CPU allocator failing)."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


class BackoffState:
    """Rows per call after back-offs, shared by successive :func:`map_with_backoff` calls."""

    def __init__(self, batch_size: int):
        self.batch_size = int(batch_size)
        self.backoffs = 0

    def __repr__(self) -> str:
        return f"BackoffState(batch_size={self.batch_size}, backoffs={self.backoffs})"


def map_with_backoff(fn: Callable[[int, int], object], n: int, batch_size: int | BackoffState, *,
                     device=None, on_backoff: Callable[[int, int], None] | None = None) -> list:
    """``[fn(start, stop) for consecutive chunks of [0, n)]``, halving the chunk on out-of-memory.

    A chunk whose call raises an out-of-memory error (:func:`is_out_of_memory`) is retried from
    the same start with half the rows (torch's CUDA cache emptied first); later chunks keep the
    smaller size (also across calls when a :class:`BackoffState` is passed). A one-row chunk
    that runs out of memory re-raises. ``fn`` must not have side effects that a retry would
    repeat. ``on_backoff(old, new)`` is called at each halving. Returns the results in order.
    """
    state = batch_size if isinstance(batch_size, BackoffState) else BackoffState(batch_size)
    out, start = [], 0
    while start < n:
        stop = min(n, start + state.batch_size)
        failed = False
        try:
            out.append(fn(start, stop))
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(exc) or stop - start <= 1:
                raise
            failed = True  # retried below, once the traceback (and the tensors it holds) is gone
        if not failed:
            start = stop
            continue
        _free_cached(device)
        old = stop - start
        state.batch_size = max(1, old // 2)
        state.backoffs += 1
        if on_backoff is not None:
            on_backoff(old, state.batch_size)
        else:
            print(f"out of memory with {old} rows per batch; retrying with {state.batch_size}", file=sys.stderr)
    return out


def _free_cached(device) -> None:
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()

"""Batch sizes: one unit (input rows pushed through the model together), chosen to fit in memory.

``batch_size=None`` everywhere means "choose automatically". Two ways to choose:

* :func:`plan_batch_size` (the pipelines that push many rows through a model: the margin scan,
  ``deepfool``, curvature, detection): the caller hands over ``run(r)``, one unit of its real
  work on the first ``r`` rows of the real input; it runs once to warm up and then on
  :data:`~pyboundary._utils.memory.DEFAULT_PROBE_ROWS` rows while the peak memory is measured
  (:func:`pyboundary._utils.memory.probe_memory`: CPU resident set size, CUDA allocator
  statistics), giving ``need(b) = fixed + b * per_row``. Automatic: the largest ``b`` with
  ``need(b) <= budget`` (default budget: a fraction of the memory available now, see
  :func:`pyboundary._utils.memory.resolve_budget`), at most the number of rows or a cap. An
  explicit ``batch_size`` is kept, but refused with :class:`MemoryBudgetError` *before any work*
  when ``need(batch_size)`` exceeds the budget (the one given, or else all the memory available
  now), with the estimate and the limit in the message. The result is a :class:`BatchPlan`,
  whose ``summary()`` result stores record. A caller that passes ``reuse=(owner, key)`` (e.g.
  the model and the input shape and options) gets the probe of an earlier call with the same
  owner object and key again instead of a new one (the budget and the available memory are
  re-read every call): a loop of ``deepfool`` calls over batches probes once.
* :func:`resolve_batch_size`: :data:`DEFAULT_BATCH_SIZE` for light work that needs no probe.

:func:`map_with_backoff` runs chunks (with a :class:`BackoffState` that has a budget, each one's
peak is measured and a chunk over the budget lowers the size of the chunks after it) and, when
one still raises an out-of-memory error
(``torch.OutOfMemoryError``, i.e. ``torch.cuda.OutOfMemoryError``, or the CPU allocator's "can't
allocate memory"), retries it in halves down to one row; later chunks keep the smaller size. On
CPU the kernel usually kills a process before an allocation fails, which is why the probe and
the budget come first.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .memory import (DEFAULT_PROBE_ROWS, SAFETY, MemoryProbe, _device, cpu_peak_supported, format_bytes,
                     memory_in_use, parse_memory_budget, peak_since_window, probe_memory, resolve_budget,
                     start_peak_window)
from .validation import check_int

__all__ = [
    "DEFAULT_BATCH_SIZE", "resolve_batch_size", "chunks", "BatchPlan", "MemoryBudgetError",
    "plan_batch_size", "map_with_backoff", "BackoffState", "is_out_of_memory",
]

#: Input rows per model call when the caller does not choose (batch_size=None) and nothing is probed.
DEFAULT_BATCH_SIZE = 256


def resolve_batch_size(batch_size: int | None, n: int | None = None) -> int:
    """The batch size to use: ``batch_size`` validated (an int >= 1), or the automatic choice
    (:data:`DEFAULT_BATCH_SIZE`, at most ``n`` when given and >= 1)."""
    batch_size = check_int("batch_size", batch_size, minimum=1, allow_none=True)
    if batch_size is not None:
        return batch_size
    if n is not None and n >= 1:
        return min(DEFAULT_BATCH_SIZE, n)
    return DEFAULT_BATCH_SIZE


def chunks(n: int, batch_size: int):
    """Slices [s, s + batch_size) covering range(n)."""
    for s in range(0, n, batch_size):
        yield slice(s, min(n, s + batch_size))


class MemoryBudgetError(ValueError):
    """A batch that cannot fit in the memory budget (raised before the work starts)."""


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

    def state(self, align: int = 1, *, budget: int | None = None, fixed: float | None = None) -> BackoffState:
        """The :class:`BackoffState` to run this plan with: an automatic choice is checked batch by
        batch against the budget (and lowered when a batch goes over it); an explicit or unchecked
        size is kept (but for out-of-memory back-off). ``budget`` / ``fixed``: check against these
        instead (the automatic plan another process made, e.g. rank 0 of a distributed scan)."""
        if budget is None:
            budget, fixed = (self.budget if self.source == "auto" else None), self.fixed
        return BackoffState(self.batch_size, budget=budget, fixed=fixed or 0.0, device=self.device,
                            align=align, unit=self.unit)

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
    align: int = 1,
    unit: str = "rows",
    what: str = "batch_size",
    reuse: tuple | None = None,
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
        probe_rows: the two probe sizes.
        align: round an automatic choice of at least ``align`` rows down to a multiple of it
            (the scan aligns batches with whole images: all members of an image in one batch
            share the engine's first forward and reverse passes).
        unit: what a row is, for messages ('pairs', 'samples').
        what: the argument's name in messages ('batch_size', '--batch-size').
        reuse: optional ``(owner, key)``: the probe is remembered for the owner object (held
            weakly; e.g. the model) under the hashable key (what the memory per row depends on:
            input shape, dtype, options), and an earlier probe with the same owner, key, device
            and probe rows is used instead of running ``run`` again.
    Returns:
        :class:`BatchPlan`.
    """
    batch_size = check_int(what, batch_size, minimum=1, allow_none=True)
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
    probe = _reused_probe(run, dev, (r1, r2), reuse)
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
    if align > 1 and size >= align:
        size -= size % align
    return BatchPlan(size, "auto", str(dev), budget, avail, probe.per_row, probe.fixed, probe.need(size), origin, unit)


#: probes remembered per owner object (weakly held), then per (key, device, probe rows)
_PROBES: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _reused_probe(run: Callable[[int], object], dev: torch.device, rows: tuple, reuse) -> MemoryProbe:
    """probe_memory(run, dev, rows), or the remembered probe of ``reuse = (owner, key)``."""
    if reuse is None:
        return probe_memory(run, dev, rows)
    owner, key = reuse
    try:
        table = _PROBES.setdefault(owner, {})
    except TypeError:  # an owner that cannot be weakly referenced: probe every time
        return probe_memory(run, dev, rows)
    full_key = (key, str(dev), rows)
    if full_key not in table:
        table[full_key] = probe_memory(run, dev, rows)
    return table[full_key]


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
    """Rows per call, shared by successive :func:`map_with_backoff` calls: lowered after an
    out-of-memory error, and (with a ``budget``) after a call whose measured peak went over it.

    The probe behind an automatic batch size measures a few rows; a model whose memory grows
    faster than linearly with the batch, or an allocator that fragments more on larger batches,
    can make a full batch need more than estimated. With ``budget`` set, every call's peak is
    measured from the memory in use when the call starts (CPU: when the call raises the
    process's peak resident set size; CUDA: torch's peak allocated bytes, whose statistics are
    reset per call), and a call that used more than ``budget`` lowers the rows of the calls after
    it to what fits with its measured cost per row beyond ``fixed`` (rounded down to a multiple of
    ``align`` when at least ``align``), with a warning.

    Attributes:
        batch_size: rows per call now.
        backoffs: halvings after out-of-memory errors.
        shrinks: reductions after calls measured over the budget.
        peak_used: the largest measured use of one call (bytes; 0 when none was measured).
    """

    def __init__(self, batch_size: int, *, budget: int | None = None, fixed: float = 0.0, device=None,
                 align: int = 1, unit: str = "rows"):
        self.batch_size = int(batch_size)
        self.backoffs = 0
        self.shrinks = 0
        self.peak_used = 0
        self.budget, self.fixed, self.device = budget, max(0.0, float(fixed or 0.0)), device
        self.align, self.unit = max(1, int(align)), unit

    def __repr__(self) -> str:
        return (f"BackoffState(batch_size={self.batch_size}, backoffs={self.backoffs}, "
                f"shrinks={self.shrinks})")

    def call(self, fn: Callable[[], object], rows: int):
        """``fn()``, measured against the budget when there is one (see the class docstring)."""
        if self.budget is None:
            return fn()
        in_use = memory_in_use(self.device)
        start = start_peak_window(self.device)
        out = fn()
        peak = peak_since_window(start, self.device)
        if peak is not None and in_use is not None:
            self.after(rows, peak - in_use)
        return out

    def aligned(self, rows: int) -> int:
        """rows rounded down to a multiple of ``align`` when at least ``align`` (at least 1)."""
        rows = max(1, int(rows))
        return rows - rows % self.align if rows >= self.align else rows

    def after(self, rows: int, used: int) -> None:
        """Record that a call of ``rows`` rows used ``used`` bytes; shrink when over the budget."""
        self.peak_used = max(self.peak_used, int(used))
        if self.budget is None or used <= self.budget or rows <= 1:
            return
        fixed = min(self.fixed, 0.5 * used)  # a probe's intercept cannot explain most of a measured peak
        per_row = (used - fixed) / rows
        new = self.aligned(int((self.budget - fixed) / per_row))
        if new >= self.batch_size:
            return
        warnings.warn(f"a batch of {rows} {self.unit} used {format_bytes(used)}, more than the memory "
                      f"budget of {format_bytes(self.budget)}; continuing with {new} {self.unit} per batch",
                      stacklevel=_caller_stacklevel())
        self.batch_size = new
        self.shrinks += 1


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this package, for warnings about the
    caller's call (the depth of the library frames in between varies)."""
    package = Path(__file__).resolve().parents[1]
    frame, level = sys._getframe(1), 1
    while frame is not None:
        try:
            inside = Path(frame.f_code.co_filename).resolve().is_relative_to(package)
        except (OSError, ValueError):
            inside = False
        if not inside:
            return level
        frame, level = frame.f_back, level + 1
    return 1


def map_with_backoff(fn: Callable[[int, int], object], n: int, batch_size: int | BackoffState, *,
                     device=None, on_backoff: Callable[[int, int], None] | None = None) -> list:
    """``[fn(start, stop) for consecutive chunks of [0, n)]``, halving the chunk on out-of-memory.

    A chunk whose call raises an out-of-memory error (:func:`is_out_of_memory`) is retried from
    the same start with half the rows (torch's CUDA cache emptied first); later chunks keep the
    smaller size (also across calls when a :class:`BackoffState` is passed; one with a budget
    also measures every chunk and shrinks later ones after a chunk over it). A one-row chunk
    that runs out of memory re-raises. ``fn`` must not have side effects that a retry would
    repeat. ``on_backoff(old, new)`` is called at each halving. Returns the results in order.
    """
    state = batch_size if isinstance(batch_size, BackoffState) else BackoffState(batch_size)
    out, start = [], 0
    while start < n:
        stop = min(n, start + state.batch_size)
        failed = False
        try:
            out.append(state.call(functools.partial(fn, start, stop), stop - start))
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(exc) or stop - start <= 1:
                raise
            failed = True  # retried below, once the traceback (and the tensors it holds) is gone
        if not failed:
            start = stop
            continue
        _free_cached(device)
        old = stop - start
        state.batch_size = state.aligned(old // 2)
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

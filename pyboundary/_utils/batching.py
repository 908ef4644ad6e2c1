"""Batch sizes: one unit (input rows pushed through the model together) and one default.

``batch_size=None`` everywhere means "choose automatically"; :func:`resolve_batch_size` is the
single place that makes that choice.
"""

from __future__ import annotations

from .validation import check_int

__all__ = ["DEFAULT_BATCH_SIZE", "resolve_batch_size", "chunks"]

#: Input rows per model call when the caller does not choose (batch_size=None).
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

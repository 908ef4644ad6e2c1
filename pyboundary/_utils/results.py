"""The protocol every public result class follows.

``summary() -> dict`` (plain Python numbers and strings, JSON-serialisable), ``format_summary()
-> str`` (a short human-readable table; prints nothing), ``to_numpy() -> dict`` (every field, tensors
as numpy arrays), and ``save(path)`` / ``load(path)`` for results that are stored. Results are
never pickled.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import fields, is_dataclass
from typing import Iterator

import numpy as np
from torch import Tensor

__all__ = ["Result", "format_mapping", "to_numpy_value", "reading_saved"]


@contextlib.contextmanager
def reading_saved(path, what: str) -> Iterator[None]:
    """Around the code that reads a saved result: a file that is not one (corrupt, truncated,
    another kind) raises ValueError naming the file and what was expected, instead of the parser's
    own error (a JSONDecodeError, an IndexError from an unpickler, a KeyError of a missing field).
    A missing file stays FileNotFoundError; ValueErrors already naming the file pass through."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:
        if isinstance(e, ValueError) and str(path) in str(e):
            raise
        raise ValueError(f"{str(path)!r} is not a readable saved {what} (corrupt or another kind of file): "
                         f"{type(e).__name__}: {e}") from e


def to_numpy_value(value):
    """A tensor as a numpy array (detached, on the CPU); containers converted element-wise."""
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: to_numpy_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
        return type(value)(to_numpy_value(v) for v in value)
    return value


def _format_value(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, np.generic):
        return _format_value(value.item())
    return str(value)


def format_mapping(title: str, mapping: dict) -> str:
    """``title`` then one indented ``key: value`` line per entry (nested dicts indented further)."""
    lines = [title]

    def add(d: dict, indent: str) -> None:
        for key, value in d.items():
            if isinstance(value, dict):
                lines.append(f"{indent}{key}:")
                add(value, indent + "  ")
            else:
                lines.append(f"{indent}{key}: {_format_value(value)}")

    add(mapping, "  ")
    return "\n".join(lines)


class Result:
    """Mixin for result dataclasses: ``to_numpy`` and a default ``format_summary``.

    Subclasses implement :meth:`summary` and may override :meth:`format_summary` for a table.
    """

    def summary(self) -> dict:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def format_summary(self) -> str:
        """The summary as readable text (``key: value`` lines under the class name)."""
        return format_mapping(type(self).__name__, self.summary())

    def to_numpy(self) -> dict:
        """Every field, tensors converted to numpy arrays (other values unchanged)."""
        if not is_dataclass(self):  # pragma: no cover
            raise TypeError(f"{type(self).__name__} is not a dataclass")
        return {f.name: to_numpy_value(getattr(self, f.name)) for f in fields(self)}

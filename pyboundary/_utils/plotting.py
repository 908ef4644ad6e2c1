"""matplotlib setup shared by every figure of pyboundary.

Figures are written as PNG files. pyboundary never changes a backend that the user (or a
notebook) has already chosen: the non-interactive Agg backend is selected only when pyplot has
not been imported yet, so scripts and servers without a display work out of the box.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["pyplot", "save_figure", "DPI"]

#: Resolution of saved figures.
DPI = 110


def pyplot():
    """matplotlib.pyplot, with the Agg backend unless pyplot was already imported."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, *, close: bool = True):
    """Lay out ``fig`` and write it to ``path`` (parents created); returns the Path.

    With ``path=None`` the figure is left open and returned instead (for notebooks)."""
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    if close:
        pyplot().close(fig)
    return path

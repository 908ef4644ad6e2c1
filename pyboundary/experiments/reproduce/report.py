"""The markdown report of a reproduction: the published numbers beside ours, figures, scale, cost.

An entry fills a :class:`Report` (sections, tables, figures, machine-readable numbers) through the
:class:`Context` it is given; :func:`pyboundary.experiments.reproduce.run_entry` adds the header
(paper, scale, measured time) and writes ``report.md``, the PNG figures and ``results.json``.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..._utils.plotting import pyplot

__all__ = ["Report", "Context", "fmt", "pct"]


def fmt(value, digits: int = 3) -> str:
    """A number for a markdown table: significant digits, 'inf', '-' for None/NaN; strings unchanged."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value.replace("|", "\\|")  # a bare | would split the table cell
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    v = float(value)
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v != 0 and (abs(v) >= 10 ** (digits + 2) or abs(v) < 10 ** -(digits + 1)):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def pct(value, decimals: int = 1) -> str:
    """A fraction as a percentage ('-' for None/NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * float(value):.{decimals}f}%"


@dataclass
class Report:
    """What an entry found, in the order it is written.

    Attributes:
        blocks: markdown blocks (headings, paragraphs, tables, figure links) in order.
        figures: file names of the PNGs written into the output folder.
        numbers: machine-readable results (JSON-serialisable), written to results.json.
    """

    blocks: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    numbers: dict = field(default_factory=dict)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append("#" * level + " " + text)

    def text(self, markdown: str) -> None:
        self.blocks.append(markdown.strip())

    def table(self, header: list, rows: list, note: str | None = None) -> None:
        """A markdown table; cells are formatted with :func:`fmt`."""
        lines = ["| " + " | ".join(str(h) for h in header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        for row in rows:
            if len(row) != len(header):
                raise ValueError(f"table row {row!r} has {len(row)} cells, the header {len(header)}")
            lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
        self.blocks.append("\n".join(lines))
        if note:
            self.blocks.append(note.strip())

    def markdown(self) -> str:
        return "\n\n".join(self.blocks) + "\n"


class Context:
    """What an entry gets: where to write, the scale and its parameters, the report to fill.

    Attributes:
        out: output folder (exists); scale: 'budget' or 'full'; params: the entry's parameters at
        that scale; seed: base seed; progress: show tqdm bars; report: the :class:`Report`.
    """

    def __init__(self, out: Path, scale: str, params: dict, seed: int = 0, progress: bool = True):
        self.out, self.scale, self.params = Path(out), scale, dict(params)
        self.seed, self.progress = int(seed), bool(progress)
        self.report = Report()

    def figure(self, fig, name: str, caption: str, dpi: int = 80) -> Path:
        """Save a matplotlib figure as ``name`` (a small PNG) and link it in the report."""
        if not name.endswith(".png") or "/" in name:
            raise ValueError(f"figure name must be a plain file name ending in .png, got {name!r}")
        plt = pyplot()
        path = self.out / name
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        self.report.figures.append(name)
        self.report.blocks.append(f"![{caption}]({name})\n\n*{caption}*")
        return path


def environment() -> dict:
    """Versions and machine facts recorded in every report."""
    import torch

    from ..._version import __version__

    return {"pyboundary": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads()}


def write(out: Path, header: str, report: Report, numbers: dict) -> tuple[Path, Path]:
    """Write report.md (header + blocks) and results.json into ``out``."""
    md = out / "report.md"
    md.write_text(header.rstrip() + "\n\n" + report.markdown())
    js = out / "results.json"
    js.write_text(json.dumps(numbers, indent=1, default=_json_default, sort_keys=True) + "\n")
    return md, js


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().tolist()
    except ImportError:  # pragma: no cover
        pass
    return repr(obj)

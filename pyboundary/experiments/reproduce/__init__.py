"""``pyboundary reproduce``: published experiments, run on offline data and models, reported side by side.

Each entry runs one published experiment at a chosen scale and writes, into its output folder,
``report.md`` (the published numbers or claims beside ours, the setup, what differs from the
paper, the scale and the measured time), small PNG figures and ``results.json``.

* ``budget`` scale: minutes of CPU on a 2-core machine (fewer inputs, smaller scans, fewer epochs);
* ``full`` scale: the paper's sizes where the offline data allow (hours of CPU, or a GPU).

Models are trained once and cached (:mod:`pyboundary.experiments.reproduce.models`); nothing is
downloaded. :func:`list_entries` lists the registry, :func:`run_entry` runs one entry.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..._utils.results import Result, reading_saved
from ..._utils.validation import check_int

__all__ = ["Entry", "ENTRIES", "SCALES", "list_entries", "run_entry", "ReproduceResult"]

SCALES = ("budget", "full")


@dataclass(frozen=True)
class Entry:
    """One reproducible experiment.

    Attributes:
        name: registry key (``holdmetight-table1``, ...).
        paper: the publication (authors, year, title, venue).
        what: one line: which table or figure, on what.
        target: ``module:function`` in this package running it (called with a Context).
        budget_cpu_s: CPU seconds of the committed budget run (``examples/reproduce/``; one torch
            thread on the 2-core development machine; its report says what was trained first).
    """

    name: str
    paper: str
    what: str
    target: str
    budget_cpu_s: float

    def function(self):
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), func)

    def params(self, scale: str) -> dict:
        module = importlib.import_module(f"{__name__}.{self.target.partition(':')[0]}")
        return dict(module.PARAMS[self.name][scale])


_HMT = ('Ortiz-Jimenez, Modas, Moosavi-Dezfooli, Frossard (2020), "Hold me tight! Influence of '
        'discriminative features on deep network boundaries", NeurIPS 2020 (arXiv:2002.06349)')
_MICKISCH = ('Mickisch, Assion, Gressner, Guenther, Motta (2020), "Understanding the decision boundary '
             'of deep neural networks: an empirical study" (arXiv:2002.01810)')
_FAWZI = ('Fawzi, Moosavi-Dezfooli, Frossard, Soatto (2018), "Empirical study of the topology and geometry '
          'of deep networks", CVPR 2018 (extended: arXiv:1705.09552)')

ENTRIES: dict[str, Entry] = {e.name: e for e in (
    Entry("holdmetight-table1", _HMT,
          "Table 1: margins of an MLP on synthetic T1/T2 (D=100) along u1, its orthogonal complement, "
          "S_orth and S_rand (5/50/95th percentiles)", "holdmetight:table1", 3),
    Entry("holdmetight-frequency", _HMT,
          "Figs. 2-4: margins along the DCT diagonal (low -> high frequency): Fashion-MNIST LeNet "
          "(standard, trained on DCT-flipped data, PGD-trained) and ImageNet EfficientNet-Lite0",
          "holdmetight:frequency", 177),
    Entry("mickisch-dynamics", _MICKISCH,
          "Figs. 2-5: mean DeepFool margin of train/test inputs over training, standard vs PGD "
          "adversarial training, split by correct/wrong", "mickisch:dynamics", 47),
    Entry("fawzi-curvature", _FAWZI,
          "Sec. 4: curvature profile (sorted principal curvatures), shared curved directions, noise "
          "inside/outside them, and a universal perturbation's energy in them", "fawzi:curvature", 45),
    Entry("fawzi-detection", _FAWZI,
          "Sec. 5: curvature-based detection of DeepFool-perturbed ImageNet inputs with EfficientNet-Lite0 (AUC "
          "with CI, TPR at calibrated 5% FPR, label recovery, noise control, Table II), via detection_study",
          "fawzi:detection", 222),
    Entry("fawzi-topology", _FAWZI,
          "Sec. 3: path connectivity of classification regions (three scenarios) and convex "
          "combinations of same-class inputs", "fawzi:topology", 6),
)}


def list_entries() -> list[Entry]:
    """The registry, in a fixed order."""
    return list(ENTRIES.values())


@dataclass
class ReproduceResult(Result):
    """What :func:`run_entry` produced.

    Attributes:
        name, scale: the entry and the scale it ran at.
        out: str, the output folder.
        report: str, path of the report.md written into ``out``.
        figures: list of the PNG file names (relative to ``out``) the entry wrote, in order.
        wall_s: float, wall-clock seconds of the entry's run (``time.perf_counter``; not the
            writing of the report).
        cpu_s: float, CPU seconds of this process (``time.process_time``, all threads) over the
            same span.
        numbers: the entry's machine-readable results (also in results.json).
    """

    name: str
    scale: str
    out: str
    report: str
    figures: list = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    numbers: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "numbers"}

    def format_summary(self) -> str:
        return (f"{self.name} ({self.scale} scale): {self.wall_s:.0f} s wall, {self.cpu_s:.0f} s CPU; "
                f"report {self.report} with {len(self.figures)} figures")

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1, default=str) + "\n")

    @classmethod
    def load(cls, path) -> "ReproduceResult":
        with reading_saved(path, "ReproduceResult"):
            return cls(**json.loads(Path(path).read_text()))


def run_entry(name: str, *, scale: str = "budget", out, seed: int = 0, progress: bool = True,
              threads: int | None = None, params: dict | None = None, overwrite: bool = False) -> ReproduceResult:
    """Run the entry ``name`` at ``scale`` and write its report into the folder ``out``.

    Args:
        name: a key of :data:`ENTRIES`.
        scale: 'budget' or 'full'.
        out: output folder (created); an existing report.md is refused unless ``overwrite``.
        seed: base seed of data subsets, directions and training.
        progress: tqdm bars.
        threads: torch intra-op threads for the run (restored afterwards; None: unchanged). On a
            loaded machine 1 thread is much faster for these small models (no spinning threads).
        params: overrides of the scale's parameters (keys must exist; the report lists the values
            used and says that they were overridden).
        overwrite: allow a folder ``out`` that already holds a report.md (default False: refused
            with ValueError). report.md, results.json and the figures of this run are rewritten;
            other files of the earlier run are left in place.
    Returns:
        :class:`ReproduceResult`.
    """
    import torch

    from .report import Context, environment, write

    if name not in ENTRIES:
        raise ValueError(f"unknown entry {name!r}; entries: {', '.join(ENTRIES)}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    threads = check_int("threads", threads, minimum=1, allow_none=True)
    entry = ENTRIES[name]
    values = entry.params(scale)
    unknown = sorted(set(params or {}) - set(values))
    if unknown:
        raise ValueError(f"params: unknown parameter(s) {unknown} for {name}; known: {sorted(values)}")
    values.update(params or {})
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} exists and is not a folder")
    if (out / "report.md").exists() and not overwrite:
        raise ValueError(f"{str(out / 'report.md')!r} already exists; choose another folder "
                         "(reports are never overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out, scale, values, seed=seed, progress=progress)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        env = environment()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        entry.function()(ctx)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        torch.set_num_threads(before)
    header = "\n".join([
        f"# `{name}`: {entry.what}",
        "",
        f"**Paper:** {entry.paper}.",
        "",
        f"**Scale:** {scale} (`pyboundary reproduce {name} --scale {scale}`). Parameters: "
        + ", ".join(f"`{k}={v}`" for k, v in ctx.params.items())
        + (f" (overridden: {', '.join(sorted(params))})" if params else "") + ".",
        "",
        f"**Measured:** {wall:.0f} s wall, {cpu:.0f} s CPU (this process, all threads; models from the "
        f"cache when present, else trained first) with pyboundary {env['pyboundary']}, torch {env['torch']}, "
        f"{env['threads']} torch thread(s), seed {seed}.",
    ])
    numbers = {"entry": name, "scale": scale, "params": ctx.params, "overridden": sorted(params or {}),
               "seed": seed, "wall_s": wall, "cpu_s": cpu,
               "environment": env, "results": ctx.report.numbers}
    md, _ = write(out, header, ctx.report, numbers)
    return ReproduceResult(name=name, scale=scale, out=str(out), report=str(md), figures=list(ctx.report.figures),
                           wall_s=wall, cpu_s=cpu, numbers=ctx.report.numbers)

"""Stored margin scans side by side: per-subspace statistics, ratios, bootstrap differences.

:func:`compare` takes scans of different models (or trainings, or norms) over the same subspace
family and returns a :class:`ScanComparison`: per subspace and run the median margin and its 5th
and 95th percentiles, the ratio of each run's median to the first run's, and the difference of
medians (run k minus the first run) with a percentile bootstrap confidence interval.

Which samples are compared (``samples``):

* ``'same'`` (default): the scans must hold the same samples in the same order (same data
  identity and, where stored, the same per-sample keys); the bootstrap resamples samples jointly
  for all runs (a paired comparison: differences between models are not blurred by the spread
  between samples).
* ``'common'``: only the samples present in every scan (matched by their per-sample content
  keys, in the first run's order), then paired as above.
* ``'independent'``: the scans may hold different samples (e.g. two seeded subsets of a test
  set); each run is resampled on its own (an unpaired comparison).

Statistics are over the converged margins of each (run, subspace) (failed pairs are counted in
``n_converged`` and left out, as in :meth:`pyboundary.scans.margins.MarginScan.subspace_stats`). Scans over
different subspace families or image shapes, incomplete scans, and (for ``'same'``) scans of
different samples are refused with a message naming what differs. Scans of different norms are
allowed (their table rows say which norm); their differences mix units, their ratios do not.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from .._utils.results import Result, reading_saved
from .._utils.validation import check_choice, check_int, check_number
from .margins import MarginScan
from .plots import plot_comparison

__all__ = ["compare", "ScanComparison", "SAMPLE_MODES"]

SAMPLE_MODES = ("same", "common", "independent")
#: bootstrap resamples are drawn in chunks of about this many gathered margins (memory bound)
_CHUNK_VALUES = 4_000_000


@dataclass
class ScanComparison(Result):
    """Result of :func:`compare`: R runs over one family of S subspaces.

    Attributes:
        names: (R,) run names (first = the reference of ratios and differences).
        subspace_spec: str, the family's spec (shared by all runs).
        subspace_labels: (S,) list of the members' labels (e.g. DCT block origins), in the
            family's order (the columns of the (R, S) arrays).
        norms: (R,) what each run's margins measure ('L2', 'L-inf', ...).
        samples: 'same', 'common' or 'independent' (see the module docstring).
        n_samples: (R,) int samples compared per run.
        median, p5, p95: (R, S) float64 statistics of the converged margins (input units).
        n_converged: (R, S) int converged pairs.
        ratio: (R, S) median / the first run's median (row 0 is 1).
        difference: (R - 1, S) median of run k minus the first run's, k = 1..R-1.
        ci_low, ci_high: (R - 1, S) percentile bootstrap confidence interval of ``difference``.
        confidence: float, the CI's level (e.g. 0.95).
        n_boot: int, bootstrap resamples behind ci_low / ci_high (the ``n_boot`` argument).
        seed: int, seed of the bootstrap resampling (numpy ``default_rng``).
        sources: (R,) where each scan came from (path, or '' for a scan object).
        tight: (R,) bool, whether each run's margins come from the engine's tight mode (the
            nearest boundary point found) rather than DeepFool's point (empty for comparisons
            saved before this field existed).
    """

    names: list
    subspace_spec: str
    subspace_labels: list
    norms: list
    samples: str
    n_samples: np.ndarray
    median: np.ndarray
    p5: np.ndarray
    p95: np.ndarray
    n_converged: np.ndarray
    ratio: np.ndarray
    difference: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    confidence: float = 0.95
    n_boot: int = 1000
    seed: int = 0
    sources: list = field(default_factory=list)
    tight: list = field(default_factory=list)

    @property
    def n_runs(self) -> int:
        return len(self.names)

    @property
    def n_subspaces(self) -> int:
        return len(self.subspace_labels)

    @property
    def significant(self) -> np.ndarray:
        """(R - 1, S) bool: the confidence interval of the difference excludes 0."""
        return (self.ci_low > 0) | (self.ci_high < 0)

    # -- result protocol ---------------------------------------------------------------------
    def summary(self) -> dict:
        """Everything as plain Python values: the settings and one row per (subspace, run)."""
        rows = []
        for j, member in enumerate(self.subspace_labels):
            for r, name in enumerate(self.names):
                row = {"subspace": j, "member": member, "run": r, "name": name,
                       "median": float(self.median[r, j]), "p5": float(self.p5[r, j]),
                       "p95": float(self.p95[r, j]), "n_converged": int(self.n_converged[r, j]),
                       "n_samples": int(self.n_samples[r]), "ratio": float(self.ratio[r, j])}
                if r:
                    row.update(difference=float(self.difference[r - 1, j]),
                               ci_low=float(self.ci_low[r - 1, j]), ci_high=float(self.ci_high[r - 1, j]),
                               significant=bool(self.significant[r - 1, j]))
                rows.append(row)
        return {"names": list(self.names), "sources": list(self.sources), "subspace_spec": self.subspace_spec,
                "subspace_labels": list(self.subspace_labels), "norms": list(self.norms),
                "tight": list(self.tight),
                "samples": self.samples, "confidence": self.confidence, "n_boot": self.n_boot,
                "seed": self.seed, "rows": rows}

    def format_summary(self) -> str:
        """A text table: per subspace, one line per run (median, p5, p95, converged/n, ratio to
        the first run, difference to it with its CI; '*' marks a CI that excludes 0)."""
        level = f"{100 * self.confidence:g} %"
        pairing = {"same": "paired, same samples", "common": "paired, common samples",
                   "independent": "unpaired, independent samples"}[self.samples]
        lines = [f"{self.n_runs} runs in {self.subspace_spec} ({pairing}; differences of medians to run 0 "
                 f"with {level} bootstrap CI, {self.n_boot} resamples, seed {self.seed})"]
        for r, name in enumerate(self.names):
            src = f"  [{self.sources[r]}]" if r < len(self.sources) and self.sources[r] else ""
            kind = "tight " if r < len(self.tight) and self.tight[r] else ""
            lines.append(f"  run {r}: {name} ({kind}{self.norms[r]} margins, {int(self.n_samples[r])} samples){src}")
        if len(set(self.norms)) > 1:
            lines.append("  note: the runs measure different norms; compare their ratios, not differences")
        if len(set(self.tight)) > 1:
            lines.append("  note: tight runs measure the nearest boundary point found, the others DeepFool's "
                         "(an upper bound on it)")
        w = max(8, max(len(n) for n in self.names) + 3)
        lines.append(f"{'#':>3} {'member':>8} {'run':<{w}} {'median':>9} {'p5':>9} {'p95':>9} {'conv/n':>9} "
                     f"{'ratio':>7}  difference [{level} CI]")
        for j, member in enumerate(self.subspace_labels):
            for r, name in enumerate(self.names):
                head = f"{j:>3} {member:>8}" if r == 0 else " " * 12
                conv = f"{int(self.n_converged[r, j])}/{int(self.n_samples[r])}"
                line = (f"{head} {f'{r}: {name}':<{w}} {_num(self.median[r, j])} {_num(self.p5[r, j])} "
                        f"{_num(self.p95[r, j])} {conv:>9} {self.ratio[r, j]:7.3f}")
                if r:
                    k = r - 1
                    line += (f"  {self.difference[k, j]:+.4g} [{self.ci_low[k, j]:+.4g}, {self.ci_high[k, j]:+.4g}]"
                             + (" *" if self.significant[k, j] else ""))
                lines.append(line)
        return "\n".join(lines)

    def to_pandas(self):
        """The summary rows as a pandas DataFrame (one row per (subspace, run); needs pandas)."""
        from .margins import _pandas

        return _pandas("to_pandas").DataFrame(self.summary()["rows"])

    def save(self, path) -> None:
        """Write the comparison as JSON (refuses an existing file; NaN and inf kept)."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{str(path)!r} exists; refusing to overwrite it")
        data = {f.name: (getattr(self, f.name).tolist() if isinstance(getattr(self, f.name), np.ndarray)
                         else getattr(self, f.name)) for f in fields(self)}
        path.write_text(json.dumps({"kind": "scan_comparison", "version": 1, **data}, indent=1))

    @classmethod
    def load(cls, path) -> "ScanComparison":
        """Read a comparison written by :meth:`save`."""
        with reading_saved(path, "scan comparison"):
            data = json.loads(Path(path).read_text())
            if not isinstance(data, dict) or data.pop("kind", None) != "scan_comparison":
                raise ValueError(f"{str(path)!r} does not hold a scan comparison")
            data.pop("version", None)
            arrays = {"n_samples", "median", "p5", "p95", "n_converged", "ratio", "difference", "ci_low", "ci_high"}
            kwargs = {k: (np.asarray(v, dtype=np.int64 if k in ("n_samples", "n_converged") else np.float64)
                          if k in arrays else v) for k, v in data.items()}
            r, s = len(kwargs["names"]), len(kwargs["subspace_labels"])
            for k in ("difference", "ci_low", "ci_high"):
                kwargs[k] = kwargs[k].reshape(r - 1, s)
            return cls(**kwargs)

    def plot(self, path) -> Path:
        """Write the figure (see :func:`pyboundary.scans.plots.plot_comparison`); returns its path."""
        return plot_comparison(self, path)


def _num(v: float) -> str:
    return f"{v:9.4g}" if math.isfinite(v) else f"{'-':>9}"


# ---------------------------------------------------------------------------------- compare
def compare(scans: Sequence, *, names: Sequence[str] | None = None, samples: str = "same",
            n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> ScanComparison:
    """Compare margin scans of the same subspace family (see the module docstring).

    Args:
        scans: two or more :class:`~pyboundary.scans.margins.MarginScan` objects or paths of stored
            scans (a run folder written by ``pyboundary scan``, or its ``scan.sqlite``;
            see :meth:`~pyboundary.scans.margins.MarginScan.load`).
        names: one display name per scan (default: the model name stored with each scan, with
            the source added where names repeat).
        samples: 'same', 'common' or 'independent'.
        n_boot: bootstrap resamples (>= 100).
        confidence: level of the confidence intervals, in (0, 1).
        seed: seed of the bootstrap resampling.
    Returns:
        :class:`ScanComparison`.
    Raises:
        TypeError: a scan that is neither a MarginScan nor a path.
        ValueError: fewer than two scans, bad options, incomplete scans, different families,
            or different samples (message says what differs and what to pass instead).
    """
    if isinstance(scans, (str, Path)) or not isinstance(scans, Sequence):
        raise TypeError(f"scans must be a sequence of MarginScan objects or paths, got {type(scans).__name__}")
    if len(scans) < 2:
        raise ValueError(f"compare needs at least two scans, got {len(scans)}")
    check_choice("samples", samples, SAMPLE_MODES)
    check_int("n_boot", n_boot, minimum=100)
    confidence = check_number("confidence", confidence, minimum=0.0, maximum=1.0, strict_minimum=True,
                              strict_maximum=True)
    seed = check_int("seed", seed)
    loaded, sources = zip(*(_as_scan(s, k) for k, s in enumerate(scans)))
    labels = _run_names(loaded, sources, names)
    _check_complete(loaded, labels)
    _check_family(loaded, labels)
    rows = _sample_rows(loaded, labels, samples)
    margins = [_converged_margins(scan, idx) for scan, idx in zip(loaded, rows)]
    stats = _statistics(margins)
    lo, hi = _bootstrap(margins, paired=samples != "independent", n_boot=n_boot, confidence=confidence, seed=seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = stats["median"] / stats["median"][:1]
    return ScanComparison(
        names=labels, subspace_spec=loaded[0].subspace_spec, subspace_labels=list(loaded[0].subspace_labels),
        norms=[s.norm_name for s in loaded], tight=[bool(s.tight) for s in loaded], samples=samples,
        n_samples=np.array([m.shape[0] for m in margins], dtype=np.int64), ratio=ratio,
        difference=stats["median"][1:] - stats["median"][:1], ci_low=lo, ci_high=hi,
        confidence=confidence, n_boot=n_boot, seed=seed, sources=list(sources),
        median=stats["median"], p5=stats["p5"], p95=stats["p95"], n_converged=stats["n_converged"],
    )


def _as_scan(scan, k: int):
    """(MarginScan, source string)."""
    if isinstance(scan, MarginScan):
        return scan, ""
    if isinstance(scan, (str, Path)):
        return MarginScan.load(scan), str(scan)
    raise TypeError(f"scans[{k}] must be a MarginScan or the path of a stored scan, got {type(scan).__name__}")


def _run_names(scans, sources, names) -> list:
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(scans):
            raise ValueError(f"names must have one entry per scan ({len(scans)}), got {len(names)}")
        return names
    base = [str((s.meta.get("model") or {}).get("name") or f"run {k}") for k, s in enumerate(scans)]
    out = []
    for k, name in enumerate(base):
        if base.count(name) > 1:
            name = f"{name} ({sources[k] or f'#{k}'})"
        out.append(name)
    return out


def _check_complete(scans, names) -> None:
    for scan, name in zip(scans, names):
        if not scan.complete:
            done = int(scan.done.sum())
            raise ValueError(f"run {name!r} is incomplete ({done} of {scan.margins.numel()} pairs computed); "
                             "resume it (pyboundary scan ... --resume) before comparing")


def _check_family(scans, names) -> None:
    ref = scans[0]
    shape0 = ref.meta.get("image_shape")
    for scan, name in zip(scans[1:], names[1:]):
        if scan.subspace_spec != ref.subspace_spec or list(scan.subspace_labels) != list(ref.subspace_labels):
            raise ValueError(
                f"runs {names[0]!r} and {name!r} are over different subspace families: "
                f"{ref.subspace_spec!r} ({ref.n_subspaces} members) vs {scan.subspace_spec!r} "
                f"({scan.n_subspaces} members); only scans of one family can be compared")
        shape = scan.meta.get("image_shape")
        if shape0 is not None and shape is not None and list(shape) != list(shape0):
            raise ValueError(f"runs {names[0]!r} and {name!r} are on images of different shapes: "
                             f"{tuple(shape0)} vs {tuple(shape)}")


def _data_description(scan) -> str:
    data = scan.meta.get("data") or {}
    return f"{data.get('name', '?')} (identity {data.get('identity', '?')}, {scan.n_samples} samples)"


def _sample_keys(scan):
    keys = getattr(scan, "sample_keys", None)
    return None if keys is None else np.asarray(keys, dtype=np.int64)


def _sample_rows(scans, names, mode: str) -> list:
    """Per scan, the rows (sample indices) to compare, as int64 arrays."""
    if mode == "independent":
        return [np.arange(s.n_samples) for s in scans]
    if mode == "same":
        ref = scans[0]
        for scan, name in zip(scans[1:], names[1:]):
            k0, k = _sample_keys(ref), _sample_keys(scan)
            same_data = (ref.meta.get("data") or {}).get("identity") == (scan.meta.get("data") or {}).get("identity")
            if k0 is not None and k is not None:
                same = k0.shape == k.shape and bool((k0 == k).all())
            else:
                same = same_data and scan.n_samples == ref.n_samples
            if not same:
                raise ValueError(
                    f"runs {names[0]!r} and {name!r} hold different samples: {_data_description(ref)} vs "
                    f"{_data_description(scan)}. Compare them on their common samples "
                    "(samples='common', --common-samples) or as independent sample sets "
                    "(samples='independent', --independent-samples)")
        return [np.arange(s.n_samples) for s in scans]
    keys = [_sample_keys(s) for s in scans]
    missing = [n for n, k in zip(names, keys) if k is None]
    if missing:
        raise ValueError(f"samples='common' needs per-sample keys, which runs {missing} do not have "
                         "(scanned before they were stored); rescan them or use samples='independent'")
    common = set(keys[0].tolist())
    for k in keys[1:]:
        common &= set(k.tolist())
    if len(common) < 2:
        raise ValueError(f"the runs have {len(common)} sample(s) in common; at least 2 are needed "
                         "(use samples='independent' for disjoint sample sets)")
    order = [int(v) for v in keys[0] if int(v) in common]
    out = []
    for k in keys:
        pos = {int(v): i for i, v in enumerate(k)}
        out.append(np.array([pos[v] for v in order], dtype=np.int64))
    return out


def _converged_margins(scan, rows) -> np.ndarray:
    """(n, S) float64 margins of the selected rows, NaN where the pair did not converge."""
    m = scan.margins.numpy()[rows].astype(np.float64)
    ok = scan.converged.numpy()[rows] & np.isfinite(m)
    return np.where(ok, m, np.nan)


def _statistics(margins: list) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN subspaces give NaN, by design
        return {
            "median": np.stack([np.nanmedian(m, axis=0) for m in margins]),
            "p5": np.stack([np.nanpercentile(m, 5, axis=0) for m in margins]),
            "p95": np.stack([np.nanpercentile(m, 95, axis=0) for m in margins]),
            "n_converged": np.stack([np.isfinite(m).sum(0) for m in margins]).astype(np.int64),
        }


def _bootstrap(margins: list, *, paired: bool, n_boot: int, confidence: float, seed: int):
    """Percentile bootstrap CI of median_k - median_0 per subspace: (ci_low, ci_high), each (R-1, S).

    Paired: one draw of sample indices per resample, shared by all runs (they hold the same
    samples in the same order). Unpaired: each run is resampled on its own.
    """
    rng = np.random.default_rng(seed)
    n_runs, s = len(margins), margins[0].shape[1]
    boot = np.empty((n_runs, n_boot, s))
    chunk = max(1, _CHUNK_VALUES // max(1, max(m.shape[0] for m in margins) * s))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for start in range(0, n_boot, chunk):
            c = min(chunk, n_boot - start)
            shared = rng.integers(0, margins[0].shape[0], size=(c, margins[0].shape[0])) if paired else None
            for r, m in enumerate(margins):
                idx = shared if paired else rng.integers(0, m.shape[0], size=(c, m.shape[0]))
                boot[r, start:start + c] = np.nanmedian(m[idx], axis=1)
        diffs = boot[1:] - boot[:1]  # (R-1, B, S)
        alpha = (1 - confidence) / 2
        lo = np.nanpercentile(diffs, 100 * alpha, axis=1)
        hi = np.nanpercentile(diffs, 100 * (1 - alpha), axis=1)
    return lo, hi

"""Margin scans: the margin of every (sample, subspace) pair of a dataset and a subspace family.

:func:`margin_scan` flattens the (sample, member) pairs sample-major, cuts them into a fixed
grid of batches of ``batch_size`` pairs that mix samples and members, and sends each batch through
ONE call of the batched engine ``pyboundary.attacks.deepfool(..., subspace=family,
subspace_index=members)``. Finished batches go to a crash-safe
:class:`~pyboundary.scans.store.ResultStore` (one transaction each), so a killed scan resumes without
recomputing or duplicating a pair; since the batch grid is fixed, a resumed (or multi-process)
scan computes each pair in the same batch as an uninterrupted one and gets the same numbers. The result is a
:class:`MarginScan` (tables of margins, per-subspace summaries, plots).

Units: a margin is the norm of the minimal perturbation found inside the subspace member, in
input units (the data's pixel scale, e.g. [0, 1]): L2 for p = 2 (the same in pixels and in the
member's orthonormal coordinates); for p = inf, the L-inf norm of the pixels in the whole space
but of the member's *coordinates* inside a subspace (the engine's convention, see
:mod:`pyboundary.attacks.deepfool`; :attr:`MarginScan.norm_name` says which). A pair the
engine could not flip has margin +inf and ``converged`` False; it is never averaged in.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .._utils.batching import BackoffState, BatchPlan, plan_batch_size
from .._utils.memory import DEFAULT_PROBE_ROWS, format_bytes
from .._utils.model import model_device
from .._utils.results import Result
from .._utils.stats import summarize
from .._utils.validation import check_int, check_p, is_inf
from ..attacks.deepfool import deepfool
from ..attacks.tight import TIGHT_CLASS_RATIO, TIGHT_CLASSES
from ..subspaces import Subspace, parse_subspaces
from ..zoo.cache import weights_hash
from ..zoo.data import subset_indices
from .feeding import BatchFeeder, ScanProgress, to_device
from .plots import plot_scan
from .store import ResultStore, StoreError, is_empty_store

__all__ = ["margin_scan", "MarginScan", "prepare_scan", "plan_scan_batches", "scan_from_store", "scan_metadata",
           "sample_keys", "store_path", "RUN_STORE_NAME", "PANDAS_COLUMNS"]

#: the result store inside a run folder written by ``pyboundary scan --out RUN``
RUN_STORE_NAME = "scan.sqlite"
#: columns of :meth:`MarginScan.to_pandas`, in order
PANDAS_COLUMNS = ("sample", "subspace", "member", "margin", "raw_margin", "iterations", "converged",
                  "adv_label", "label", "prediction", "correct", "sample_key")

#: engine arguments that margin_scan sets itself (not engine options)
_OWN_ARGS = {"model", "x", "labels", "subspace", "subspace_index", "target", "batch_size", "memory_budget", "p",
             "_calls"}
_GROUPS = ("all", "correct", "wrong")


# ---------------------------------------------------------------------------------- result
@dataclass
class MarginScan(Result):
    """Margins of n_samples inputs in n_subspaces subspace members.

    Attributes:
        margins: (n_samples, n_subspaces) float64 margins in input units; +inf where the engine
            failed, NaN where the pair has not been computed (an interrupted scan).
        raw_margins: (n_samples, n_subspaces) float64 margins before refinement/overshoot
            bookkeeping, as reported by the engine's ``raw_margin``.
        iterations: (n_samples, n_subspaces) int64 DeepFool iterations (-1 if not computed).
        converged: (n_samples, n_subspaces) bool.
        adv_labels: (n_samples, n_subspaces) int64 label after the perturbation (-1 if not computed).
        labels: (n_samples,) int64 true labels, or None when unknown.
        predictions: (n_samples,) int64 the model's clean predictions (the reference class).
        subspace_spec: spec of the family (``dct:K=8,T=1`` ...).
        subspace_labels: one label per member.
        grid_shape: (rows, cols) for grid families, else None.
        p: 2.0 or inf.
        meta: the metadata the scan was stored with (model, data, parameters, versions).
        sample_keys: (n_samples,) int64 content key of each input (:func:`sample_keys`), or None
            (scans stored before keys existed); identifies samples across scans.
    """

    margins: Tensor
    raw_margins: Tensor
    iterations: Tensor
    converged: Tensor
    adv_labels: Tensor
    labels: Tensor | None
    predictions: Tensor
    subspace_spec: str
    subspace_labels: list
    grid_shape: tuple | None = None
    p: float = 2.0
    meta: dict = field(default_factory=dict)
    sample_keys: Tensor | None = None

    @property
    def n_samples(self) -> int:
        return int(self.margins.shape[0])

    @property
    def n_subspaces(self) -> int:
        return int(self.margins.shape[1])

    @property
    def correct(self) -> Tensor | None:
        """(n_samples,) bool: prediction == label (None when labels are unknown)."""
        return None if self.labels is None else self.predictions == self.labels

    @property
    def done(self) -> Tensor:
        """(n_samples, n_subspaces) bool: pairs that were computed (NaN margin = not yet)."""
        return ~torch.isnan(self.margins)

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    # -- summaries ---------------------------------------------------------------------
    def summary(self) -> dict:
        """The scan in plain numbers: norm, family, sizes, completeness and the per-subspace
        statistics of :meth:`subspace_stats` (under ``"subspaces"``)."""
        return {
            "norm": self.norm_name,
            "subspaces": self.subspace_spec,
            "n_samples": self.n_samples,
            "n_subspaces": self.n_subspaces,
            "pairs_done": int(self.done.sum()),
            "complete": self.complete,
            "batch_size": self.meta.get("batch_size"),
            "tight": self.tight,
            "per_subspace": self.subspace_stats(),
        }

    def subspace_stats(self) -> list:
        """Per-subspace statistics of the margins (via :func:`pyboundary._utils.stats.summarize`).

        Returns:
            list of dicts, one per (subspace, group) with keys subspace (index), member (label),
            group ('all', and 'correct' / 'wrong' when labels are known), and the keys of
            ``summarize`` (n, n_converged, n_failed, median, p5, p95, mean, se). Pairs not yet
            computed are left out of n.
        """
        margins, conv, done = self.margins.numpy(), self.converged.numpy(), self.done.numpy()
        groups = {"all": np.ones(self.n_samples, dtype=bool)}
        if self.labels is not None:
            ok = self.correct.numpy()
            groups.update(correct=ok, wrong=~ok)
        rows = []
        for j, member in enumerate(self.subspace_labels):
            for group, mask in groups.items():
                sel = mask & done[:, j]
                stats = summarize(margins[sel, j], conv[sel, j])
                rows.append({"subspace": j, "member": member, "group": group, **stats})
        return rows

    @property
    def tight(self) -> bool:
        """Whether the margins come from the engine's tight mode (``deepfool_kwargs={'tight': True}``,
        ``pyboundary scan --tight``): the nearest boundary point found, not DeepFool's."""
        return bool((self.meta or {}).get("params", {}).get("tight", False))

    @property
    def norm_name(self) -> str:
        """What the margins measure: 'L2', 'L-inf' (pixels, whole space) or 'L-inf of subspace
        coordinates' (p = inf inside a subspace family)."""
        if not is_inf(self.p):
            return "L2"
        return "L-inf" if self.subspace_spec == "full" else "L-inf of subspace coordinates"

    def format_summary(self) -> str:
        """The summary as a text table (one line per subspace; medians of correct/wrong samples
        when labels are known)."""
        rows = self.subspace_stats()
        by = {(r["subspace"], r["group"]): r for r in rows}
        split = self.labels is not None
        norm = self.norm_name
        head = f"{'#':>3} {'member':>10} {'conv/n':>9} {'median':>9} {'p5':>9} {'p95':>9} {'mean':>9} {'se':>9}"
        if split:
            head += f" {'med.ok':>9} {'med.wrong':>9}"
        n_ok = int(self.correct.sum()) if split else None
        kind = "tight " if self.tight else ""
        lines = [
            f"{kind}{norm} margins in {self.subspace_spec} ({self.n_samples} samples, {self.n_subspaces} subspaces"
            + (f", {n_ok} correctly classified)" if split else ")"),
            head,
        ]
        fmt = lambda v: f"{v:9.4g}" if math.isfinite(v) else f"{'-':>9}"  # noqa: E731
        for j, member in enumerate(self.subspace_labels):
            a = by[(j, "all")]
            line = f"{j:>3} {member:>10} {a['n_converged']:>4}/{a['n']:<4} " + " ".join(
                fmt(a[k]) for k in ("median", "p5", "p95", "mean", "se")
            )
            if split:
                line += " " + fmt(by[(j, "correct")]["median"]) + " " + fmt(by[(j, "wrong")]["median"])
            lines.append(line)
        if not self.complete:
            lines.append(f"(incomplete: {int(self.done.sum())} of {self.margins.numel()} pairs computed)")
        batch = self.batch_description()
        if batch:
            lines.append(batch)
        return "\n".join(lines)

    def batch_description(self) -> str:
        """One line on the batch size the scan ran with (from the metadata; '' when unknown)."""
        grid = self.meta.get("batch_size")
        if grid is None:
            return ""
        info = self.meta.get("batching") or {}
        text = f"batches of {grid} pairs"
        if info.get("batch_size") not in (None, grid):
            text += f" (engine calls of {info['batch_size']})"
        source = info.get("source")
        if source:
            text += f", {source}"
        if info.get("estimated_peak_bytes") is not None:
            text += f": estimated peak {format_bytes(info['estimated_peak_bytes'])}"
            if info.get("budget_bytes") is not None:
                text += f" of a {format_bytes(info['budget_bytes'])} budget ({info.get('budget_origin', '')})"
        return text

    def to_pandas(self):
        """The scan as a long-format pandas DataFrame: one row per (sample, subspace) pair, sample-major.

        Columns (:data:`PANDAS_COLUMNS`): sample, subspace (indices), member (label), margin and
        raw_margin (float64, input units; +inf failed, NaN not computed), iterations (-1 not
        computed), converged, adv_label, label (nullable Int64, <NA> when unknown), prediction,
        correct (nullable boolean), sample_key (nullable Int64). ``frame.attrs`` holds what the
        rows do not: subspace_spec, subspace_labels, grid_shape, p, norm and the scan's meta, so
        :meth:`from_pandas` rebuilds the scan exactly (``frame.attrs`` survives Parquet, not CSV).
        Needs pandas.
        """
        pd = _pandas("to_pandas")
        n, s = self.n_samples, self.n_subspaces
        sample = np.repeat(np.arange(n), s)
        frame = pd.DataFrame({
            "sample": sample,
            "subspace": np.tile(np.arange(s), n),
            "member": np.tile(np.array(self.subspace_labels, dtype=object), n),
            "margin": self.margins.numpy().reshape(-1),
            "raw_margin": self.raw_margins.numpy().reshape(-1),
            "iterations": self.iterations.numpy().reshape(-1),
            "converged": self.converged.numpy().reshape(-1),
            "adv_label": self.adv_labels.numpy().reshape(-1),
            "label": _nullable(pd, None if self.labels is None else self.labels.numpy()[sample], n * s, "Int64"),
            "prediction": self.predictions.numpy()[sample],
            "correct": _nullable(pd, None if self.labels is None else self.correct.numpy()[sample], n * s, "boolean"),
            "sample_key": _nullable(pd, None if self.sample_keys is None else self.sample_keys.numpy()[sample],
                                    n * s, "Int64"),
        })
        frame.attrs.update(subspace_spec=self.subspace_spec, subspace_labels=list(self.subspace_labels),
                           grid_shape=None if self.grid_shape is None else list(self.grid_shape),
                           p=float(self.p), norm=self.norm_name, meta=self.meta)
        return frame

    #: the former name of :meth:`to_pandas` (same frame)
    to_dataframe = to_pandas

    @classmethod
    def from_pandas(cls, frame, *, subspace_spec: str | None = None, p=None, grid_shape=None,
                    meta: dict | None = None) -> "MarginScan":
        """The scan held by a frame of :meth:`to_pandas` (e.g. read back from CSV or Parquet).

        Pairs absent from the frame are "not computed" (NaN). ``subspace_spec``, ``p``,
        ``grid_shape`` and ``meta`` default to ``frame.attrs`` (written by :meth:`to_pandas`);
        a frame without them (CSV) needs ``subspace_spec`` and ``p``.
        Raises ValueError for missing columns or attributes and repeated (sample, subspace) pairs.
        """
        attrs = dict(getattr(frame, "attrs", {}) or {})
        spec = subspace_spec if subspace_spec is not None else attrs.get("subspace_spec")
        p = p if p is not None else attrs.get("p")
        if spec is None or p is None:
            raise ValueError("from_pandas: the frame has no subspace_spec/p attributes (e.g. it was read "
                             "from CSV); pass subspace_spec=... and p=...")
        missing = [c for c in PANDAS_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"from_pandas: the frame lacks the columns {missing}")
        i = frame["sample"].to_numpy(dtype=np.int64)
        j = frame["subspace"].to_numpy(dtype=np.int64)
        if i.size and (i.min() < 0 or j.min() < 0):
            raise ValueError("from_pandas: sample and subspace indices must be >= 0")
        n = int(i.max()) + 1 if i.size else 0
        members = attrs.get("subspace_labels")
        if members is None:  # e.g. from CSV: the member labels of the rows
            members = dict(zip(j.tolist(), frame["member"].astype(str).tolist()))
            if sorted(members) != list(range(len(members))):
                raise ValueError("from_pandas: without subspace_labels attributes every subspace "
                                 f"0..{int(j.max()) if j.size else -1} needs at least one row")
            members = [members[k] for k in range(len(members))]
        members = [str(m) for m in members]
        s = len(members)
        if j.size and int(j.max()) >= s:
            raise ValueError(f"from_pandas: subspace index {int(j.max())} for a family of {s} members")
        if np.unique(i * s + j).size != i.size:
            raise ValueError("from_pandas: the frame repeats (sample, subspace) pairs")
        margins, raw = np.full((n, s), np.nan), np.full((n, s), np.nan)
        iters, adv = np.full((n, s), -1, dtype=np.int64), np.full((n, s), -1, dtype=np.int64)
        conv = np.zeros((n, s), dtype=bool)
        margins[i, j] = frame["margin"].to_numpy(dtype=np.float64)
        raw[i, j] = frame["raw_margin"].to_numpy(dtype=np.float64)
        iters[i, j] = frame["iterations"].to_numpy(dtype=np.int64)
        conv[i, j] = frame["converged"].to_numpy(dtype=bool)
        adv[i, j] = frame["adv_label"].to_numpy(dtype=np.int64)
        per_sample = frame.drop_duplicates("sample").sort_values("sample")
        if per_sample.shape[0] != n:
            raise ValueError(f"from_pandas: samples 0..{n - 1} must each have at least one row")
        preds = per_sample["prediction"].to_numpy(dtype=np.int64, copy=True)
        labels = None if per_sample["label"].isna().any() else per_sample["label"].to_numpy(dtype=np.int64, copy=True)
        keys = (None if per_sample["sample_key"].isna().any()
                else per_sample["sample_key"].to_numpy(dtype=np.int64, copy=True))
        grid = grid_shape if grid_shape is not None else attrs.get("grid_shape")
        return cls(
            margins=torch.from_numpy(margins), raw_margins=torch.from_numpy(raw), iterations=torch.from_numpy(iters),
            converged=torch.from_numpy(conv), adv_labels=torch.from_numpy(adv),
            labels=None if labels is None else torch.from_numpy(labels), predictions=torch.from_numpy(preds),
            subspace_spec=str(spec), subspace_labels=members, grid_shape=None if grid is None else tuple(grid),
            p=float(p), meta=dict(meta if meta is not None else attrs.get("meta") or {}),
            sample_keys=None if keys is None else torch.from_numpy(keys),
        )

    def plot(self, path) -> list:
        """Write the figures (see :func:`pyboundary.scans.plots.plot_scan`); returns the paths written.

        ``path`` is a folder (margins.png, histograms.png and, for grid families, heatmap.png) or
        a .png file for the main figure only.
        """

        return plot_scan(self, path)

    # -- storage -----------------------------------------------------------------------
    def save(self, path) -> None:
        """Write this scan to a new result store (refuses an existing file)."""
        with ResultStore(path, mode="create", meta=self.meta) as st:
            _write_scan(st, self)

    @classmethod
    def load(cls, path) -> "MarginScan":
        """Read a scan back from a result store (missing pairs are NaN): its file, or the run
        folder ``pyboundary scan --out RUN`` wrote (see :func:`store_path`)."""
        with ResultStore(store_path(path), mode="read") as st:
            return scan_from_store(st)

    def __eq__(self, other) -> bool:  # tensors compare element-wise; NaN == NaN here
        if not isinstance(other, MarginScan):
            return NotImplemented
        same = lambda a, b: (a is None and b is None) or (  # noqa: E731
            a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b) or (
                a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))))
        return (
            all(same(getattr(self, k), getattr(other, k)) for k in
                ("margins", "raw_margins", "iterations", "converged", "adv_labels", "labels", "predictions"))
            and self.subspace_spec == other.subspace_spec
            and list(self.subspace_labels) == list(other.subspace_labels)
            and self.p == other.p
        )


def _write_scan(st: ResultStore, scan: MarginScan) -> None:
    labels = None if scan.labels is None else scan.labels.numpy()
    st.write_samples(np.arange(scan.n_samples), labels, scan.predictions.numpy())
    if scan.sample_keys is not None:
        st.write_sample_keys(np.arange(scan.n_samples), scan.sample_keys.numpy())
    done = scan.done.numpy()
    s, j = np.nonzero(done)
    st.write_pairs(s, j, scan.margins.numpy()[s, j], scan.raw_margins.numpy()[s, j],
                   scan.iterations.numpy()[s, j], scan.converged.numpy()[s, j], scan.adv_labels.numpy()[s, j])


def scan_from_store(st: ResultStore) -> MarginScan:
    """Assemble the :class:`MarginScan` held by a store (pairs not stored are NaN / -1), from one
    consistent snapshot (the store may be growing: a scan still running)."""
    with st.snapshot():
        return _scan_from_snapshot(st)


def _scan_from_snapshot(st: ResultStore) -> MarginScan:
    meta = st.meta
    try:
        n, s = int(meta["n_samples"]), int(meta["n_subspaces"])
        spec, members = meta["subspaces"], list(meta["subspace_labels"])
    except KeyError as exc:
        raise StoreError(f"{str(st.path)!r} does not hold a margin scan (metadata key {exc} missing)") from None
    grid = meta.get("grid_shape")
    margins = np.full((n, s), np.nan)
    raw = np.full((n, s), np.nan)
    iters = np.full((n, s), -1, dtype=np.int64)
    conv = np.zeros((n, s), dtype=bool)
    adv = np.full((n, s), -1, dtype=np.int64)
    pairs = st.read_pairs()
    i, j = pairs["sample"], pairs["subspace"]
    margins[i, j], raw[i, j], iters[i, j] = pairs["margin"], pairs["raw_margin"], pairs["iterations"]
    conv[i, j], adv[i, j] = pairs["converged"], pairs["adv_label"]
    smp = st.read_samples()
    preds = np.full(n, -1, dtype=np.int64)
    preds[smp["sample"]] = smp["prediction"]
    labels = None
    if meta.get("has_labels"):
        labels = np.full(n, -1, dtype=np.int64)
        if smp["label"] is not None:
            labels[smp["sample"]] = smp["label"]
    keys = st.read_sample_keys(n)
    return MarginScan(
        margins=torch.from_numpy(margins), raw_margins=torch.from_numpy(raw),
        iterations=torch.from_numpy(iters), converged=torch.from_numpy(conv),
        adv_labels=torch.from_numpy(adv), labels=None if labels is None else torch.from_numpy(labels),
        predictions=torch.from_numpy(preds), subspace_spec=spec, subspace_labels=members,
        grid_shape=None if grid is None else tuple(grid), p=float(meta["params"]["p"]), meta=meta,
        sample_keys=None if keys is None else torch.from_numpy(keys),
    )


def store_path(path) -> Path:
    """The result store file of ``path``: the path itself, or ``path/scan.sqlite`` for a run folder.

    Raises FileNotFoundError naming what was looked for when neither exists.
    """
    path = Path(path)
    store = path / RUN_STORE_NAME if path.is_dir() else path
    if not store.exists():
        raise FileNotFoundError(f"no scan at {str(path)!r} (expected a result store file or a run folder "
                                f"holding {RUN_STORE_NAME})")
    return store


def sample_keys(x: Tensor) -> np.ndarray:
    """(N,) int64 content keys of the inputs x (N, ...): the first 8 bytes of a BLAKE2b hash of
    each input's dtype, shape and values, so equal inputs (bit for bit) get equal keys."""
    x = x.detach().cpu().contiguous()
    head = f"{x.dtype}{tuple(x.shape[1:])}".encode()
    flat = x.reshape(x.shape[0], -1).view(torch.uint8).numpy() if x.numel() else np.zeros((x.shape[0], 0), np.uint8)
    out = np.empty(x.shape[0], dtype=np.int64)
    for k in range(x.shape[0]):
        out[k] = np.frombuffer(hashlib.blake2b(head + flat[k].tobytes(), digest_size=8).digest(), dtype="<i8")[0]
    return out


def _pandas(what: str):
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is optional
        raise ImportError(f"{what} needs pandas: pip install pandas") from None
    return pd


def _nullable(pd, values, n: int, dtype: str):
    """A pandas nullable column (all <NA> when values is None)."""
    return pd.array([pd.NA] * n if values is None else values, dtype=dtype)


# ---------------------------------------------------------------------------------- inputs
class _Source:
    """The scan's samples: an in-memory tensor, or a map-style dataset read batch by batch.

    Attributes:
        data: (N, C, H, W) tensor, or a dataset whose items are ``(image (C, H, W), label)``.
        labels: (N,) int64 or None; identity, name: for the metadata; image_shape: (C, H, W).
    """

    def __init__(self, data, labels, identity, name, image_shape):
        self.data, self.labels, self.identity, self.name = data, labels, identity, name
        self.image_shape = tuple(image_shape)

    def __len__(self) -> int:
        return int(self.data.shape[0]) if isinstance(self.data, Tensor) else len(self.data)

    @property
    def streamed(self) -> bool:
        return not isinstance(self.data, Tensor)

    def images(self, samples) -> Tensor:
        """(k, C, H, W) the images of ``samples`` (read directly, for the memory probe)."""
        if not self.streamed:
            return self.data[torch.as_tensor(samples, dtype=torch.int64)]
        return torch.stack([torch.as_tensor(self.data[int(i)][0]) for i in samples])


class _Indexed(torch.utils.data.Dataset):
    """The items ``indices`` of a map-style dataset (a seeded subset of a stream)."""

    def __init__(self, data, indices):
        self.data, self.indices = data, [int(i) for i in indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.data[self.indices[i]]


def _check_labels(y, n: int):
    y = torch.as_tensor(y)
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or y.shape != (n,):
        raise ValueError(f"labels must be an integer tensor of shape ({n},), got {y.dtype} {tuple(y.shape)}")
    return y.to(torch.int64).cpu()


def _unpack_data(data, labels, limit, seed) -> _Source:
    """The scan's :class:`_Source` from a tensor, an in-memory dataset (``.x``) or a streamed one."""
    limit = check_int("limit", limit, minimum=1, allow_none=True)
    if isinstance(data, Tensor) or hasattr(data, "x"):
        return _unpack_tensor(data, labels, limit, seed)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and hasattr(data, "image_shape"):
        return _unpack_stream(data, labels, limit, seed)
    raise TypeError("data must be a tensor (N, C, H, W), a dataset with .x and .labels, or a streamed "
                    "dataset with __getitem__, __len__ and image_shape (pyboundary.zoo.open_image_folder), "
                    f"got {type(data).__name__}")


def _unpack_tensor(data, labels, limit, seed) -> _Source:
    if isinstance(data, Tensor):
        x, y, identity, name = data, None, None, "tensor"
    else:
        x, y = data.x, getattr(data, "labels", None)
        identity, name = getattr(data, "identity", None), str(getattr(data, "name", type(data).__name__))
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"data: x must be a floating-point tensor (N, ...), got {getattr(x, 'shape', type(x))}")
    if labels is not None:
        y = labels
    if y is not None:
        y = _check_labels(y, x.shape[0])
    pick = subset_indices(x.shape[0], limit, seed)
    if pick is not None:
        x, y = x[pick], (None if y is None else y[pick])
    if identity is None or labels is not None:
        h = hashlib.sha256()
        h.update(str(tuple(x.shape)).encode())
        h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        if y is not None:
            h.update(y.numpy().tobytes())
        identity = h.hexdigest()[:16]
    elif pick is not None:
        identity = f"{identity}[limit={limit},seed={seed}]"
    return _Source(x, y, identity, name, x.shape[1:])


def _unpack_stream(data, labels, limit, seed) -> _Source:
    n, shape = len(data), tuple(data.image_shape)
    name = str(getattr(data, "name", None) or type(data).__name__)
    y = labels if labels is not None else getattr(data, "labels", None)
    if y is not None:
        y = _check_labels(y, n)
        if bool((y < 0).any()):
            y = None  # an unlabelled stream marks labels as -1
    identity = getattr(data, "identity", None)
    if not identity:
        raise ValueError("a streamed dataset needs an .identity (a content key for the result store); "
                         "open folders with pyboundary.zoo.open_image_folder")
    if labels is not None:
        identity = hashlib.sha256(f"{identity}\0".encode() + y.numpy().tobytes()).hexdigest()[:16]
    pick = subset_indices(n, limit, seed)
    if pick is not None:
        data, y = _Indexed(data, pick), (None if y is None else y[pick])
        identity = f"{identity}[limit={limit},seed={seed}]"
    return _Source(data, y, identity, name, shape)


def _engine():
    """The engine a scan calls (a seam for tests)."""
    return deepfool


def _engine_params(p, options: dict) -> dict:
    """Every engine parameter that shapes the results: given options over the engine's defaults."""
    sig = inspect.signature(deepfool)
    unknown = sorted(set(options) - set(sig.parameters) - _OWN_ARGS)
    bad = sorted(set(options) & _OWN_ARGS)
    if unknown or bad:
        raise TypeError(f"margin_scan: unknown deepfool_kwargs key(s) {unknown + bad}; "
                        f"the engine's options are {sorted(set(sig.parameters) - _OWN_ARGS)}")
    params = {k: v.default for k, v in sig.parameters.items()
              if k not in _OWN_ARGS and v.default is not inspect.Parameter.empty}
    params.update(options)
    params["p"] = check_p(p)
    if not params.get("tight"):  # stores of plain scans keep the parameters they had before tight mode
        params.pop("tight", None)
        params.pop("tight_steps", None)
        params.pop("tight_classes", None)
        params.pop("tight_class_ratio", None)
    else:  # the engine's defaults, stored as the values they mean (a later default cannot mix runs)
        if params.get("tight_classes") is None:
            params["tight_classes"] = TIGHT_CLASSES
        if params.get("tight_class_ratio") is None:
            params["tight_class_ratio"] = TIGHT_CLASS_RATIO
    return params


def _model_identity(model, model_name) -> dict:
    name = model_name or getattr(model, "__qualname__", None) or type(model).__name__
    try:
        digest = weights_hash(model)
    except TypeError:
        digest = None  # a plain callable: only its name identifies it
    return {"name": name, "weights_hash": digest}


def scan_metadata(model, family, src, params, model_name=None) -> dict:
    """The metadata that defines a scan (what a resume must match); the batch grid
    (``batch_size``) is added by :func:`margin_scan` once planned."""
    return {
        "kind": "margin_scan",
        "model": _model_identity(model, model_name),
        "data": {"name": src.name, "identity": src.identity},
        "n_samples": len(src),
        "image_shape": list(src.image_shape),
        "has_labels": src.labels is not None,
        "subspaces": family.spec_or_name(),
        "n_subspaces": int(family.n_members),
        "subspace_labels": list(family.member_labels()),
        "grid_shape": None if family.grid_shape is None else list(family.grid_shape),
        "params": {k: (repr(v) if not isinstance(v, (int, float, str, bool, type(None))) else v)
                   for k, v in sorted(params.items())},
    }


def _resolve_family(subspaces, image_shape: tuple):
    if isinstance(subspaces, str):
        return parse_subspaces(subspaces, tuple(image_shape))
    if not isinstance(subspaces, Subspace):
        raise TypeError(f"subspaces must be a Subspace or a spec string, got {type(subspaces).__name__}")
    if tuple(subspaces.image_shape) != tuple(image_shape):
        raise ValueError(f"subspaces are for image shape {subspaces.image_shape}, data has {tuple(image_shape)}")
    return subspaces


def _open_store(store, resume, meta):
    """(ResultStore or None, whether we opened it)."""
    if store is None:
        if resume:
            raise ValueError("resume=True needs a store to resume from")
        return None, False
    if isinstance(store, ResultStore):
        store.check_meta(meta)
        return store, False
    return ResultStore(store, mode="resume" if resume else "create", meta=meta), True


# ---------------------------------------------------------------------------------- scan
def prepare_scan(model, data, subspaces, *, p=2, labels=None, limit=None, seed=0, model_name=None,
                 deepfool_kwargs=None):
    """Validate a scan's inputs: (source, family, engine params, metadata).

    Same arguments as :func:`margin_scan`. The metadata is what a resumed store must match, but
    for the batch grid (``meta['batch_size']``), which :func:`plan_scan_batches` adds.
    """
    src = _unpack_data(data, labels, limit, seed)
    family = _resolve_family(subspaces, src.image_shape)
    if deepfool_kwargs is not None and not isinstance(deepfool_kwargs, dict):
        raise TypeError(f"deepfool_kwargs must be a dict or None, got {type(deepfool_kwargs).__name__}")
    params = _engine_params(p, dict(deepfool_kwargs or {}))
    family.check_p(params["p"], torch.arange(family.n_members))
    meta = scan_metadata(model, family, src, params, model_name)
    return src, family, params, meta


#: most pairs per batch an automatic choice makes on CPU: at 28x28 throughput is flat from 256 to
#: 1260 pairs (benchmarks/README.md), while a larger batch shows progress later and loses more
#: work when killed; on CUDA larger batches keep the device busy
MAX_AUTO_PAIRS = {"cpu": 256, "cuda": 4096}
#: the grid of stores written before batch sizes were recorded (the former default)
LEGACY_BATCH_SIZE = 256


def _stored_grid(store, resume: bool) -> int | None:
    """The batch grid of the store a resume continues (None: a new scan)."""
    if not resume or store is None:
        return None
    if isinstance(store, ResultStore):
        meta = store.meta
    elif Path(store).exists() and not is_empty_store(store):  # (empty: killed while being created)
        with ResultStore(store, mode="read") as st:
            meta = st.meta
    else:
        return None
    return int(meta.get("batch_size") or LEGACY_BATCH_SIZE)


def plan_scan_batches(model, src: _Source, family, params: dict, device, *, batch_size=None, memory_budget=None,
                      grid: int | None = None, layout=torch.contiguous_format) -> tuple[int, BatchPlan]:
    """(grid batch size, :class:`BatchPlan` of the engine calls) for a scan.

    A new scan (``grid`` None) probes the engine on the first pairs (one warm-up and two measured
    runs of full DeepFool calls, see :func:`pyboundary._utils.batching.plan_batch_size`) and
    takes the largest batch that fits the memory budget, at most :data:`MAX_AUTO_PAIRS` and
    rounded down to whole images (all members of an image in one batch share the engine's first
    passes); an explicit ``batch_size`` is checked instead and refused
    (:class:`~pyboundary._utils.batching.MemoryBudgetError`) when it cannot fit. A resumed scan
    keeps its stored ``grid`` (so every pair is computed in the same batch as before); its
    engine calls take the largest part of a grid batch that fits now (or the explicit
    ``batch_size``, checked), so a batch of the grid may be split into several calls.
    """
    dev = torch.device(device)
    n_pairs = len(src) * family.n_members
    cap = MAX_AUTO_PAIRS.get(dev.type, MAX_AUTO_PAIRS["cpu"]) if grid is None else grid
    wanted = batch_size if grid is None or batch_size is None else min(batch_size, grid)
    run = _probe_run(model, src, family, params, dev, layout)
    plan = plan_batch_size(run, n_pairs, device=dev, batch_size=wanted, memory_budget=memory_budget,
                           default=cap, max_batch_size=cap, align=family.n_members, unit="pairs")
    return (plan.batch_size if grid is None else grid), plan


def _probe_run(model, src: _Source, family, params, dev, layout):
    """run(r): one engine call on the first r pairs of the grid (for the memory probe)."""
    n_images = min(len(src), -(-max(DEFAULT_PROBE_ROWS) // family.n_members))
    images = src.images(range(n_images))
    pairs = torch.stack([torch.arange(n_images).repeat_interleave(family.n_members),
                         torch.arange(family.n_members).repeat(n_images)], 1)
    opts = {k: v for k, v in params.items() if k != "p"}
    engine = _engine()

    def run(r: int):
        xb = to_device(images[pairs[:r, 0]], dev).contiguous(memory_format=layout)
        engine(model, xb, p=params["p"], subspace=family, subspace_index=pairs[:r, 1].to(dev),
               batch_size=r, memory_budget="off", **opts)

    return run


def margin_scan(
    model: Callable,
    data,
    subspaces,
    *,
    p=2,
    labels=None,
    batch_size: int | None = None,
    memory_budget=None,
    store=None,
    resume: bool = False,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
    device=None,
    workers: int | None = None,
    model_name: str | None = None,
    shard: tuple[int, int] | None = None,
    channels_last: bool | None = None,
    deepfool_kwargs: dict | None = None,
    _batch_check: dict | None = None,
) -> MarginScan:
    """Margins of every (sample, subspace member) pair, batched through the DeepFool engine.

    Args:
        model: callable (N, C, H, W) -> (N, L) logits (left unchanged: eval mode inside).
        data: tensor x (N, C, H, W); a dataset with ``.x`` (and ``.labels``, ``.identity``,
            ``.name``); or a streamed dataset of ``(image, label)`` items with ``image_shape``,
            ``labels`` and ``identity`` (:func:`pyboundary.zoo.open_image_folder`), read batch
            by batch by a DataLoader (see :mod:`pyboundary.scans.feeding`).
        subspaces: a :class:`~pyboundary.subspaces.Subspace` family or a spec (``dct:K=8,T=1``).
        p: 2 or inf (norm of the margins).
        labels: (N,) int64 true labels (default ``data.labels``); used to split the summary by
            correctly/wrongly classified samples. The margin is always measured from the model's
            own prediction.
        batch_size: (sample, member) pairs per engine call, each one input row. None: the
            largest batch that fits ``memory_budget``, measured by probing the engine on the
            first pairs (:func:`plan_scan_batches`). A given size is checked the same way and
            refused before any work when it cannot fit. The batch size fixes the batch grid
            (recorded as ``meta['batch_size']``, with the evidence under ``meta['batching']``);
            a resumed scan keeps the grid of its store.
        memory_budget: bytes the engine's batches may use: an int, ``'6GB'``, ``'40%'`` (of the
            memory available now), or ``'off'`` (no probe, no check; default batch 256). Default:
            :data:`pyboundary._utils.memory.DEFAULT_BUDGET_FRACTION` of the memory available now.
        store: None, a path of a result store (SQLite), or an open ResultStore. A path that
            exists is refused unless ``resume``.
        resume: continue the scan in ``store`` (its metadata must match; done pairs are skipped).
        limit, seed: scan a seeded random subset of ``limit`` samples of ``data`` (sorted indices;
            the subset for a smaller limit is part of the one for a larger limit), the same subset
            as ``pyboundary.zoo.load_dataset(name, limit=limit, seed=seed)`` and as
            ``pyboundary scan --limit --seed``. The data identity records it. A streamed
            dataset reads only the chosen images.
        progress: tqdm bar over pairs (rate of this run in pairs/s, ETA).
        device: where the engine runs (default: the model's parameters' device, else CPU);
            the data is moved there batch by batch (pinned, non-blocking copies on CUDA).
        workers: loader processes for a streamed dataset (None: 1 on CPU, 4 on CUDA; 0: read
            in this process).
        model_name: recorded in the metadata (default: the model's class name).
        shard: (rank, world): scan only the batches b of the fixed batch grid with
            b % world == rank (used by :mod:`pyboundary.scans.distributed`); the returned scan has NaN
            for the other pairs.
        channels_last: run the engine on a private copy of the model converted to the
            channels-last memory format, with channels-last inputs (None = automatic: on CPU for
            an nn.Module with Conv2d layers and 4-D inputs). On CPU this makes the input
            gradients of convolutions ~2x faster (LeNet: scan throughput x1.45); the numbers
            agree with the plain layout to float rounding. The caller's model is not changed.
        deepfool_kwargs: options of :func:`pyboundary.attacks.deepfool` (candidates, overshoot,
            max_iter, refine, tol, clamp, ...); all of them, with the engine's defaults filled
            in, are part of the stored metadata.
        _batch_check: internal (a rank of :func:`pyboundary.scans.distributed.distributed_scan`):
            ``{"budget": bytes, "fixed": bytes}`` of rank 0's automatic plan, to check the engine's calls
            batch by batch while ``batch_size`` is rank 0's choice and ``memory_budget`` 'off'.

    Returns:
        MarginScan (CPU tensors). With a store, it is read back from the store, so it includes
        pairs computed by earlier (interrupted) runs.
    Raises:
        MemoryBudgetError (a ValueError): ``batch_size`` cannot fit in the memory budget.
    """
    batch_size = check_int("batch_size", batch_size, minimum=1, allow_none=True)
    src, family, params, meta = prepare_scan(model, data, subspaces, p=p, labels=labels, limit=limit, seed=seed,
                                             model_name=model_name, deepfool_kwargs=deepfool_kwargs)
    dev = torch.device(device) if device is not None else model_device(model, "cpu")
    _check_shard(shard)
    if store is not None and meta["model"]["weights_hash"] is None and model_name is None:
        raise ValueError(
            "margin_scan: the model is a plain callable, so a store cannot verify on resume that "
            "it is the same model; pass model_name='...' naming it uniquely (or scan an nn.Module, "
            "whose weights are hashed)"
        )
    fast = _channels_last_copy(model, src.image_shape, dev, channels_last)
    engine_model, layout = (model, torch.contiguous_format) if fast is None else (fast, torch.channels_last)
    grid, plan = plan_scan_batches(engine_model, src, family, params, dev, batch_size=batch_size,
                                   memory_budget=memory_budget, grid=_stored_grid(store, resume), layout=layout)
    meta["batch_size"] = grid
    meta["batching"] = plan.summary()
    st, opened = _open_store(store, resume, meta)
    try:
        if st is not None and resume:  # the store describes the batching of its latest run
            st.record_meta({"batching": meta["batching"]})
        batches = _batch_grid(len(src), family.n_members, grid, shard)
        total = sum(int(b.shape[0]) for b in batches)
        if st is not None:
            batches = _drop_done(batches, family.n_members, st)
        acc = _Accumulator(len(src), family.n_members)
        left = sum(int(b.shape[0]) for b in batches)
        with ScanProgress(total, total - left, enabled=progress, note=f"batch {plan.batch_size}") as bar:
            _run_pairs(engine_model, src, family, batches, params, dev, st, acc, bar, layout,
                       plan.state(align=family.n_members, **(_batch_check or {})), workers)
        if st is not None:
            return scan_from_store(st)
        return acc.to_scan(src.labels, family, params["p"], meta)
    finally:
        if opened:
            st.close()


def _check_shard(shard) -> None:
    if shard is None:
        return
    ok = isinstance(shard, tuple) and len(shard) == 2 and all(isinstance(v, int) for v in shard)
    if not ok or not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")


def _batch_grid(n: int, n_members: int, batch_size: int, shard) -> list:
    """The fixed grid of batches: all (sample, member) pairs sample-major, cut every batch_size.

    Batch b holds pairs [b*batch_size, (b+1)*batch_size); with shard=(rank, world) only batches
    b % world == rank are kept. Because the grid does not depend on what is already done or on
    the number of processes, a resumed or multi-process scan computes every pair in the same
    batch as an uninterrupted single-process scan (stores write whole batches), hence the same
    numbers. Returns a list of (P_b, 2) int64 tensors.
    """
    s = torch.arange(n).repeat_interleave(n_members)
    j = torch.arange(n_members).repeat(n)
    batches = [b for b in torch.stack([s, j], 1).split(max(batch_size, 1)) if b.shape[0]]
    if shard is not None:
        rank, world = shard
        batches = batches[rank::world]
    return batches


def _drop_done(batches: list, n_members: int, st) -> list:
    """Remove the pairs already in the store (and batches left empty)."""
    if not st.count_pairs():
        return batches
    done = np.array(sorted(st.done_pairs()), dtype=np.int64).reshape(-1, 2)
    done_keys = done[:, 0] * n_members + done[:, 1]
    out = []
    for b in batches:
        keep = ~np.isin(b[:, 0].numpy() * n_members + b[:, 1].numpy(), done_keys)
        if keep.any():
            out.append(b[torch.from_numpy(keep)])
    return out


class _Accumulator:
    """In-memory (n_samples, n_subspaces) tables filled batch by batch (no-store scans)."""

    def __init__(self, n: int, s: int):
        self.margins = torch.full((n, s), math.nan, dtype=torch.float64)
        self.raw = torch.full((n, s), math.nan, dtype=torch.float64)
        self.iters = torch.full((n, s), -1, dtype=torch.int64)
        self.conv = torch.zeros((n, s), dtype=torch.bool)
        self.adv = torch.full((n, s), -1, dtype=torch.int64)
        self.preds = torch.full((n,), -1, dtype=torch.int64)
        self.keys = np.zeros(n, dtype=np.int64)
        self.has_key = np.zeros(n, dtype=bool)

    def add(self, si, sj, res) -> None:
        self.margins[si, sj] = res.margin.detach().cpu().double()
        self.raw[si, sj] = res.raw_margin.detach().cpu().double()
        self.iters[si, sj] = res.iterations.detach().cpu().long()
        self.conv[si, sj] = res.converged.detach().cpu().bool()
        self.adv[si, sj] = res.adv_label.detach().cpu().long()
        # the engine's reference class of every pair is the clean prediction of its sample
        self.preds[si] = res.orig_label.detach().cpu().long()

    def add_keys(self, si: Tensor, xb: Tensor) -> np.ndarray:
        """Content keys of the batch's samples (from their first pair's image); returns
        (samples, keys) of the samples seen for the first time."""
        samples, first = np.unique(si.numpy(), return_index=True)
        new = ~self.has_key[samples]
        if new.any():
            self.keys[samples[new]] = sample_keys(xb[torch.from_numpy(first[new]).to(xb.device)])
            self.has_key[samples[new]] = True
        return samples[new], self.keys[samples[new]]

    def to_scan(self, y, family, p, meta) -> MarginScan:
        keys = torch.from_numpy(self.keys) if self.has_key.all() else None  # a shard knows only its samples
        return MarginScan(self.margins, self.raw, self.iters, self.conv, self.adv, y, self.preds,
                          family.spec_or_name(), list(family.member_labels()),
                          family.grid_shape, p, meta, keys)


def _channels_last_copy(model, image_shape: tuple, dev, wanted: bool | None):
    """A channels-last copy of the model for the engine, or None (see margin_scan's channels_last)."""
    if wanted is False or len(image_shape) != 3 or not isinstance(model, torch.nn.Module):
        return None
    if wanted is None:
        has_conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        if torch.device(dev).type != "cpu" or not has_conv:
            return None
    try:
        return copy.deepcopy(model).to(memory_format=torch.channels_last)
    except Exception as exc:  # noqa: BLE001 - an uncopyable model just runs as given
        if wanted:
            raise ValueError(f"channels_last=True: cannot copy/convert the model ({exc})") from None
        return None


def _run_pairs(model, src: _Source, family, batches, params, dev, st, acc, bar, layout, calls: BackoffState,
               workers) -> None:
    """One engine call per batch of mixed (sample, member) pairs, split by the engine into calls of
    ``calls.batch_size`` pairs (each measured against the memory budget and halved on
    out-of-memory errors; a lowered size stays lowered for the batches after); each batch stored
    as it finishes."""
    deepfool = _engine()
    opts = {k: v for k, v in params.items() if k != "p"}
    feeder = BatchFeeder(src.data, batches, dev, workers=workers, layout=layout)
    for chunk, xb in feeder:
        si, sj = chunk[:, 0], chunk[:, 1]
        res = deepfool(model, xb, p=params["p"], subspace=family, subspace_index=sj.to(dev),
                       batch_size=min(calls.batch_size, int(chunk.shape[0])), memory_budget="off",
                       _calls=calls, **opts)
        acc.add(si, sj, res)
        new_samples, new_keys = acc.add_keys(si, xb)
        if st is not None:
            samples = torch.unique(si)
            st.write_samples(samples.numpy(), None if src.labels is None else src.labels[samples].numpy(),
                             acc.preds[samples].numpy())
            if new_samples.size:
                st.write_sample_keys(new_samples, new_keys)
            st.write_pairs(si.numpy(), sj.numpy(), acc.margins[si, sj].numpy(), acc.raw[si, sj].numpy(),
                           acc.iters[si, sj].numpy(), acc.conv[si, sj].numpy(), acc.adv[si, sj].numpy())
        bar.update(int(chunk.shape[0]))

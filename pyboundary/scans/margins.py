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

from .._utils.batching import resolve_batch_size
from .._utils.model import model_device, predict
from .._utils.results import Result
from .._utils.stats import summarize
from .._utils.validation import check_int, is_inf
from ..attacks.deepfool import deepfool
from ..subspaces import Subspace, parse_subspaces
from ..zoo.cache import weights_hash
from ..zoo.data import subset_indices
from .plots import plot_scan
from .store import ResultStore, StoreError

__all__ = ["margin_scan", "MarginScan", "prepare_scan", "scan_from_store", "scan_metadata", "sample_keys",
           "store_path", "RUN_STORE_NAME", "PANDAS_COLUMNS"]

#: the result store inside a run folder written by ``pyboundary scan --out RUN``
RUN_STORE_NAME = "scan.sqlite"
#: columns of :meth:`MarginScan.to_pandas`, in order
PANDAS_COLUMNS = ("sample", "subspace", "member", "margin", "raw_margin", "iterations", "converged",
                  "adv_label", "label", "prediction", "correct", "sample_key")

#: engine arguments that margin_scan sets itself (not engine options)
_OWN_ARGS = {"model", "x", "labels", "subspace", "subspace_index", "target", "batch_size", "p"}
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
        lines = [
            f"{norm} margins in {self.subspace_spec} ({self.n_samples} samples, {self.n_subspaces} subspaces"
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
        return "\n".join(lines)

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
    """Assemble the :class:`MarginScan` held by a store (pairs not stored are NaN / -1)."""
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
def _unpack_data(data, labels, limit, seed):
    """(x (N, ...) float, labels (N,) int64 or None, identity str, name str)."""
    if isinstance(data, Tensor):
        x, y, identity, name = data, None, None, "tensor"
    elif hasattr(data, "x"):
        x, y = data.x, getattr(data, "labels", None)
        identity, name = getattr(data, "identity", None), str(getattr(data, "name", type(data).__name__))
    else:
        raise TypeError(f"data must be a tensor (N, C, H, W) or a dataset with .x and .labels, got {type(data).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"data: x must be a floating-point tensor (N, ...), got {getattr(x, 'shape', type(x))}")
    if labels is not None:
        y = labels
    if y is not None:
        y = torch.as_tensor(y)
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or y.shape != (x.shape[0],):
            raise ValueError(f"labels must be an integer tensor of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        y = y.to(torch.int64).cpu()
    limit = check_int("limit", limit, minimum=1, allow_none=True)
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
    return x, y, identity, name


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
    params["p"] = math.inf if is_inf(p) else float(p)
    return params


def _model_identity(model, model_name) -> dict:
    name = model_name or getattr(model, "__qualname__", None) or type(model).__name__
    try:
        digest = weights_hash(model)
    except TypeError:
        digest = None  # a plain callable: only its name identifies it
    return {"name": name, "weights_hash": digest}


def scan_metadata(model, family, x, y, identity, data_name, params, model_name=None) -> dict:
    """The metadata that defines a scan (what a resume must match)."""
    return {
        "kind": "margin_scan",
        "model": _model_identity(model, model_name),
        "data": {"name": data_name, "identity": identity},
        "n_samples": int(x.shape[0]),
        "image_shape": list(x.shape[1:]),
        "has_labels": y is not None,
        "subspaces": family.spec_or_name(),
        "n_subspaces": int(family.n_members),
        "subspace_labels": list(family.member_labels()),
        "grid_shape": None if family.grid_shape is None else list(family.grid_shape),
        "params": {k: (repr(v) if not isinstance(v, (int, float, str, bool, type(None))) else v)
                   for k, v in sorted(params.items())},
    }


def _resolve_family(subspaces, x):
    if isinstance(subspaces, str):
        return parse_subspaces(subspaces, tuple(x.shape[1:]))
    if not isinstance(subspaces, Subspace):
        raise TypeError(f"subspaces must be a Subspace or a spec string, got {type(subspaces).__name__}")
    if tuple(subspaces.image_shape) != tuple(x.shape[1:]):
        raise ValueError(f"subspaces are for image shape {subspaces.image_shape}, data has {tuple(x.shape[1:])}")
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
def prepare_scan(model, data, subspaces, *, p=2, labels=None, batch_size=None, limit=None, seed=0,
                 model_name=None, deepfool_kwargs=None):
    """Validate a scan's inputs: (x, labels or None, family, engine params, metadata).

    Same arguments as :func:`margin_scan`; the metadata is what a resumed store must match.
    """
    x, y, identity, data_name = _unpack_data(data, labels, limit, seed)
    family = _resolve_family(subspaces, x)
    if deepfool_kwargs is not None and not isinstance(deepfool_kwargs, dict):
        raise TypeError(f"deepfool_kwargs must be a dict or None, got {type(deepfool_kwargs).__name__}")
    params = _engine_params(p, dict(deepfool_kwargs or {}))
    family.check_p(params["p"], torch.arange(family.n_members))
    meta = scan_metadata(model, family, x, y, identity, data_name, params, model_name)
    # the batch grid decides which pairs share an engine call, hence the numbers: part of the scan
    meta["batch_size"] = resolve_batch_size(batch_size)
    return x, y, family, params, meta


def margin_scan(
    model: Callable,
    data,
    subspaces,
    *,
    p=2,
    labels=None,
    batch_size: int | None = None,
    store=None,
    resume: bool = False,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
    device=None,
    model_name: str | None = None,
    shard: tuple[int, int] | None = None,
    channels_last: bool | None = None,
    deepfool_kwargs: dict | None = None,
) -> MarginScan:
    """Margins of every (sample, subspace member) pair, batched through the DeepFool engine.

    Args:
        model: callable (N, C, H, W) -> (N, L) logits (left unchanged: eval mode inside).
        data: tensor x (N, C, H, W), or a dataset with ``.x`` (and ``.labels``, ``.identity``, ``.name``).
        subspaces: a :class:`~pyboundary.subspaces.Subspace` family or a spec (``dct:K=8,T=1``).
        p: 2 or inf (norm of the margins).
        labels: (N,) int64 true labels (default ``data.labels``); used to split the summary by
            correctly/wrongly classified samples. The margin is always measured from the model's
            own prediction.
        batch_size: (sample, member) pairs per engine call, each one input row (None: automatic);
            bounds memory. It fixes the batch grid, so a resumed scan must use the same value.
        store: None, a path of a result store (SQLite), or an open ResultStore. A path that
            exists is refused unless ``resume``.
        resume: continue the scan in ``store`` (its metadata must match; done pairs are skipped).
        limit, seed: scan a seeded random subset of ``limit`` samples of ``data`` (sorted indices;
            the subset for a smaller limit is part of the one for a larger limit), the same subset
            as ``pyboundary.zoo.load_dataset(name, limit=limit, seed=seed)`` and as
            ``pyboundary scan --limit --seed``. The data identity records it.
        progress: tqdm bar over pairs.
        device: where the engine runs (default: the model's parameters' device, else CPU);
            the data is moved there batch by batch.
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

    Returns:
        MarginScan (CPU tensors). With a store, it is read back from the store, so it includes
        pairs computed by earlier (interrupted) runs.
    """
    x, y, family, params, meta = prepare_scan(model, data, subspaces, p=p, labels=labels, batch_size=batch_size,
                                              limit=limit, seed=seed, model_name=model_name,
                                              deepfool_kwargs=deepfool_kwargs)
    batch_size = meta["batch_size"]
    dev = torch.device(device) if device is not None else model_device(model, "cpu")
    _check_shard(shard)
    if store is not None and meta["model"]["weights_hash"] is None and model_name is None:
        raise ValueError(
            "margin_scan: the model is a plain callable, so a store cannot verify on resume that "
            "it is the same model; pass model_name='...' naming it uniquely (or scan an nn.Module, "
            "whose weights are hashed)"
        )
    st, opened = _open_store(store, resume, meta)
    try:
        batches = _batch_grid(x.shape[0], family.n_members, batch_size, shard)
        samples = torch.unique(torch.cat([b[:, 0] for b in batches])) if batches else torch.arange(0)
        preds = torch.full((x.shape[0],), -1, dtype=torch.int64)
        preds[samples] = predict(model, x[samples], batch_size=batch_size, device=dev).cpu()
        keys = sample_keys(x)
        if st is not None:
            st.write_samples(samples.numpy(), None if y is None else y[samples].numpy(), preds[samples].numpy())
            st.write_sample_keys(samples.numpy(), keys[samples.numpy()])
            batches = _drop_done(batches, family.n_members, st)
        acc = _Accumulator(x.shape[0], family.n_members)
        fast = _channels_last_copy(model, x, dev, channels_last)
        engine_model, layout = (model, torch.contiguous_format) if fast is None else (fast, torch.channels_last)
        _run_pairs(engine_model, x, family, batches, params, dev, st, acc, progress, layout)
        if st is not None:
            return scan_from_store(st)
        return acc.to_scan(y, preds, family, params["p"], meta, keys)
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
    batches = list(torch.stack([s, j], 1).split(batch_size))
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

    def add(self, si, sj, res) -> None:
        self.margins[si, sj] = res.margin.detach().cpu().double()
        self.raw[si, sj] = res.raw_margin.detach().cpu().double()
        self.iters[si, sj] = res.iterations.detach().cpu().long()
        self.conv[si, sj] = res.converged.detach().cpu().bool()
        self.adv[si, sj] = res.adv_label.detach().cpu().long()

    def to_scan(self, y, preds, family, p, meta, keys) -> MarginScan:
        return MarginScan(self.margins, self.raw, self.iters, self.conv, self.adv, y, preds,
                          family.spec_or_name(), list(family.member_labels()),
                          family.grid_shape, p, meta, torch.from_numpy(keys))


def _channels_last_copy(model, x: Tensor, dev, wanted: bool | None):
    """A channels-last copy of the model for the engine, or None (see margin_scan's channels_last)."""
    if wanted is False or x.dim() != 4 or not isinstance(model, torch.nn.Module):
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


def _run_pairs(model, x, family, batches, params, dev, st, acc, progress, layout=torch.contiguous_format) -> None:
    """One engine call per batch of mixed (sample, member) pairs; each batch stored as it finishes."""
    from tqdm.auto import tqdm

    deepfool = _engine()
    opts = {k: v for k, v in params.items() if k != "p"}
    total = sum(int(b.shape[0]) for b in batches)
    bar = tqdm(total=total, unit="pair", desc="margin scan", disable=not progress, leave=False)
    try:
        for chunk in batches:
            si, sj = chunk[:, 0], chunk[:, 1]
            xb = x[si].to(dev).contiguous(memory_format=layout)
            res = deepfool(model, xb, p=params["p"], subspace=family, subspace_index=sj.to(dev),
                           batch_size=int(chunk.shape[0]), **opts)
            acc.add(si, sj, res)
            if st is not None:
                st.write_pairs(si.numpy(), sj.numpy(), acc.margins[si, sj].numpy(), acc.raw[si, sj].numpy(),
                               acc.iters[si, sj].numpy(), acc.conv[si, sj].numpy(), acc.adv[si, sj].numpy())
            bar.update(int(chunk.shape[0]))
    finally:
        bar.close()

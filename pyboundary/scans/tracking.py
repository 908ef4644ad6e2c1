"""Margin dynamics during training: DeepFool margins of fixed samples, measured per epoch.

:class:`MarginTracker` is a callback ``tracker(epoch, model)`` (the ``on_epoch_end`` of
:func:`pyboundary.zoo.train`, or any loop). Each measurement runs DeepFool (L2 and L-inf by
default) on fixed, seeded subsets of the training and test data; the margin of a sample is its
distance to the boundary of its *predicted* class (so misclassified samples have a margin too)
and samples are split by correctness of that prediction. Failed searches (no boundary within
``max_iter``) are counted, never averaged in (:func:`pyboundary._utils.stats.summarize`).
Units: margins in input units (pixel intensity for images in [0, 1]).
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .._utils.model import model_device
from .._utils.plotting import pyplot, save_figure
from .._utils.stats import summarize
from .._utils.validation import check_finite, check_int, check_labels, is_inf
from ..attacks.deepfool import deepfool

__all__ = ["MarginTracker", "TABLE"]


#: name of the store table holding one row per (epoch, split, norm, sample)
TABLE = "tracker_margins"


_COLUMNS = {"epoch": "INTEGER", "split": "TEXT", "norm": "TEXT", "sample": "INTEGER", "label": "INTEGER",
            "prediction": "INTEGER", "margin": "REAL", "converged": "INTEGER"}


_KEY = ["epoch", "split", "norm", "sample"]


def _norm_name(p) -> str:
    if is_inf(p):
        return "linf"
    if float(p) == 2:
        return "l2"
    raise ValueError(f"ps must contain 2 and/or inf, got {p!r}")


def _subset(n: int, k: int, seed: int) -> Tensor:
    """Sorted seeded subset of min(k, n) indices of range(n)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=gen)[: min(k, n)].sort().values


class MarginTracker:
    """Per-epoch DeepFool margins of fixed train/test subsets, with statistics, store and plots.

    Args:
        x_train, labels_train, x_test, labels_test: (N, C, H, W) float inputs and (N,) int64
            labels; either split may be None (not tracked).
        n_track: samples per split (a seeded subset; all if fewer).
        seed: seed of the subsets.
        ps: the norms p measured, a subset of (2, inf).
        deepfool_kwargs: extra arguments of :func:`pyboundary.attacks.deepfool` (e.g. max_iter, clamp).
        store: optional :class:`pyboundary.scans.store.ResultStore` (opened writable) receiving one row
            per (epoch, split, norm, sample) in table :data:`TABLE`, one transaction per
            measurement.
        every: measure only when ``epoch % every == 0`` (epoch 0 is always measured).
        progress: print one line per measurement to stderr.

    Results (filled by :meth:`measure`): ``epochs`` (measured epochs, in order),
    ``margins[(split, norm)][epoch]`` (n,) float64 (inf = failed),
    ``converged[(split, norm)][epoch]`` (n,) bool, ``predictions[split][epoch]`` (n,) int64,
    ``labels[split]`` (n,), ``indices[split]`` the tracked indices into the given data.
    """

    def __init__(
        self,
        x_train: Tensor | None,
        labels_train: Tensor | None,
        x_test: Tensor | None = None,
        labels_test: Tensor | None = None,
        *,
        n_track: int = 1000,
        seed: int = 0,
        ps: Sequence = (2, math.inf),
        deepfool_kwargs: dict | None = None,
        store=None,
        every: int = 1,
        progress: bool = False,
    ):
        n_track = check_int("n_track", n_track, minimum=1)
        every = check_int("every", every, minimum=1)
        self.norms = [_norm_name(p) for p in ps]
        if not self.norms or len(set(self.norms)) != len(self.norms):
            raise ValueError(f"ps must be a non-empty subset of (2, inf) without repeats, got {ps!r}")
        self.x, self.labels, self.indices = {}, {}, {}
        for split, xs, ys in (("train", x_train, labels_train), ("test", x_test, labels_test)):
            if xs is None and ys is None:
                continue
            if not isinstance(xs, Tensor) or not isinstance(ys, Tensor):
                raise TypeError(f"x_{split} and labels_{split} must both be tensors (or both None)")
            check_finite(f"x_{split}", xs)
            ys = check_labels(ys, xs.shape[0], name=f"labels_{split}")
            idx = _subset(xs.shape[0], n_track, seed + (0 if split == "train" else 1))
            self.indices[split] = idx
            self.x[split] = xs[idx].detach()
            self.labels[split] = ys[idx].cpu().numpy()
        if not self.x:
            raise ValueError("give at least one of (x_train, labels_train) and (x_test, labels_test)")
        self.splits = list(self.x)
        self.deepfool_kwargs = dict(deepfool_kwargs or {})
        self.every = every
        self.progress = progress
        self.store = store
        if store is not None:
            store.create_table(TABLE, _COLUMNS, _KEY)
        self.epochs: list[int] = []
        self.margins: dict = {(s, n): {} for s in self.splits for n in self.norms}
        self.converged: dict = {(s, n): {} for s in self.splits for n in self.norms}
        self.predictions: dict = {s: {} for s in self.splits}

    # ------------------------------------------------------------------ measuring
    def __call__(self, epoch: int, model: Callable) -> None:
        """Callback form: measure when ``epoch % every == 0``."""
        if epoch % self.every == 0:
            self.measure(epoch, model)

    def measure(self, epoch: int, model: Callable) -> dict:
        """Measure all splits and norms at ``epoch`` (an int, not measured before); returns the
        statistics of this epoch (see :meth:`stats`)."""
        epoch = check_int("epoch", epoch, minimum=0)
        if epoch in self.epochs:
            raise ValueError(f"epoch {epoch} was already measured")
        rows = {c: [] for c in _COLUMNS}
        # the tracked inputs follow the model (e.g. trained on CUDA while the subsets live on CPU)
        device = model_device(model)
        for split in self.splits:
            x = self.x[split] if device is None else self.x[split].to(device)
            pred = None
            for norm in self.norms:
                p = math.inf if norm == "linf" else 2
                res = deepfool(model, x, p=p, **self.deepfool_kwargs)
                conv = res.converged.cpu().numpy().astype(bool)
                margin = np.where(conv, res.margin.detach().double().cpu().numpy(), np.inf)
                pred = res.orig_label.cpu().numpy()
                self.margins[(split, norm)][epoch] = margin
                self.converged[(split, norm)][epoch] = conv
                n = margin.shape[0]
                for col, val in (("epoch", [epoch] * n), ("split", [split] * n), ("norm", [norm] * n),
                                 ("sample", self.indices[split].numpy()), ("label", self.labels[split]),
                                 ("prediction", pred), ("margin", margin), ("converged", conv.astype(int))):
                    rows[col].append(np.asarray(val))
            self.predictions[split][epoch] = pred
        self.epochs.append(epoch)
        if self.store is not None:
            self.store.write_rows(TABLE, {c: np.concatenate(v) for c, v in rows.items()})
        stats = self.stats(epoch)
        if self.progress:
            parts = [f"{s}/{n} {st['all']['mean']:.4g}+-{st['all']['se']:.2g}"
                     for (s, n), st in stats.items()]
            print(f"[track] epoch {epoch}: mean margin " + ", ".join(parts), file=sys.stderr)
        return stats

    # ------------------------------------------------------------------ result protocol
    def summary(self) -> dict:
        """Statistics of the last measured epoch: {"epoch", "<split>/<norm>": {accuracy, mean, se,
        median, n_failed}}; empty before the first measurement."""
        if not self.epochs:
            return {}
        e = self.epochs[-1]
        out = {"epoch": e}
        for (split, norm), st in self.stats(e).items():
            out[f"{split}/{norm}"] = {"accuracy": st["accuracy"], **{k: st["all"][k] for k in
                                                                    ("mean", "se", "median", "n_failed")}}
        return out

    def format_summary(self) -> str:
        """One line per (epoch, split, norm): accuracy, mean margin and SE, correct/wrong means, failures."""
        lines = [f"{'epoch':>5} {'split':>5} {'norm':>4} {'acc':>6} {'mean':>9} {'se':>8} "
                 f"{'correct':>9} {'wrong':>9} {'failed':>6}"]
        for r in self.table():
            lines.append(f"{r['epoch']:>5} {r['split']:>5} {r['norm']:>4} {r['accuracy']:>6.3f} "
                         f"{r['all_mean']:>9.4g} {r['all_se']:>8.2g} {r['correct_mean']:>9.4g} "
                         f"{r['wrong_mean']:>9.4g} {r['all_n_failed']:>6}")
        return "\n".join(lines)

    def to_numpy(self) -> dict:
        """Measured epochs, margins, convergence flags, predictions, labels and tracked indices, as
        numpy arrays keyed '<split>/<norm>/<epoch>' (margins, converged) and '<split>/<epoch>'."""
        out = {"epochs": np.asarray(self.epochs)}
        for (split, norm), per_epoch in self.margins.items():
            for e, m in per_epoch.items():
                out[f"margins/{split}/{norm}/{e}"] = m
                out[f"converged/{split}/{norm}/{e}"] = self.converged[(split, norm)][e]
        for split, per_epoch in self.predictions.items():
            for e, pred in per_epoch.items():
                out[f"predictions/{split}/{e}"] = pred
            out[f"labels/{split}"] = np.asarray(self.labels[split])
            out[f"indices/{split}"] = self.indices[split].numpy()
        return out

    # ------------------------------------------------------------------ statistics
    def correct(self, split: str, epoch: int) -> np.ndarray:
        """(n,) bool: prediction == label at ``epoch``."""
        return self.predictions[split][epoch] == self.labels[split]

    def stats(self, epoch: int) -> dict:
        """{(split, norm): {'all'|'correct'|'wrong': summarize(...), 'accuracy': float}} at epoch."""
        out = {}
        for (split, norm), per_epoch in self.margins.items():
            m = per_epoch[epoch]
            conv = self.converged[(split, norm)][epoch]
            ok = self.correct(split, epoch)
            out[(split, norm)] = {
                "all": summarize(m, conv),
                "correct": summarize(m[ok], conv[ok]),
                "wrong": summarize(m[~ok], conv[~ok]),
                "accuracy": float(ok.mean()) if ok.size else float("nan"),
            }
        return out

    def table(self) -> list[dict]:
        """One flat row per (epoch, split, norm): accuracy, mean/se/median per group, failures."""
        rows = []
        for e in self.epochs:
            for (split, norm), st in self.stats(e).items():
                row = {"epoch": e, "split": split, "norm": norm, "accuracy": st["accuracy"]}
                for grp in ("all", "correct", "wrong"):
                    for key in ("mean", "se", "median", "n_converged", "n_failed"):
                        row[f"{grp}_{key}"] = st[grp][key]
                rows.append(row)
        return rows

    def transitions(self, split: str) -> list[dict]:
        """Correct/wrong changes between consecutive measurements of ``split``.

        Returns per pair of consecutive measured epochs (e0, e1): counts 'right_right',
        'right_wrong', 'wrong_right', 'wrong_wrong' (summing to n) and the tracked sample indices
        that moved: 'to_right', 'to_wrong' (indices into the data given to the tracker).
        """
        out = []
        for e0, e1 in zip(self.epochs[:-1], self.epochs[1:]):
            a, b = self.correct(split, e0), self.correct(split, e1)
            idx = self.indices[split].numpy()
            out.append({
                "from": e0, "to": e1,
                "right_right": int((a & b).sum()), "right_wrong": int((a & ~b).sum()),
                "wrong_right": int((~a & b).sum()), "wrong_wrong": int((~a & ~b).sum()),
                "to_right": idx[~a & b], "to_wrong": idx[a & ~b],
            })
        return out

    @classmethod
    def from_store(cls, store) -> "MarginTracker":
        """Rebuild the results of a tracker from its store (for plots and tables; cannot measure)."""
        t = cls.__new__(cls)
        data = store.read_table(TABLE)
        t.splits = [s for s in ("train", "test") if s in set(data["split"].tolist())]
        t.norms = [n for n in ("l2", "linf") if n in set(data["norm"].tolist())]
        t.epochs = sorted(set(int(e) for e in data["epoch"]))
        t.margins = {(s, n): {} for s in t.splits for n in t.norms}
        t.converged = {(s, n): {} for s in t.splits for n in t.norms}
        t.predictions, t.labels, t.indices = {s: {} for s in t.splits}, {}, {}
        t.store, t.x, t.every, t.progress, t.deepfool_kwargs = None, {}, 1, False, {}
        for s in t.splits:
            for n in t.norms:
                for e in t.epochs:
                    sel = (data["split"] == s) & (data["norm"] == n) & (data["epoch"] == e)
                    order = np.argsort(data["sample"][sel], kind="stable")
                    t.margins[(s, n)][e] = data["margin"][sel][order]
                    t.converged[(s, n)][e] = data["converged"][sel][order].astype(bool)
                    t.predictions[s][e] = data["prediction"][sel][order]
                    t.labels[s] = data["label"][sel][order]
                    t.indices[s] = torch.from_numpy(data["sample"][sel][order].copy())
        return t

    # ------------------------------------------------------------------ plots
    def plot_curves(self, path=None):
        """Mean margin +- SE vs epoch: one panel per (norm, split), lines all / correct / wrong."""
        plt = pyplot()
        fig, axes = plt.subplots(len(self.norms), len(self.splits), squeeze=False,
                                 figsize=(4.2 * len(self.splits), 3.0 * len(self.norms)))
        for i, norm in enumerate(self.norms):
            for j, split in enumerate(self.splits):
                ax = axes[i][j]
                for grp, color in (("all", "k"), ("correct", "tab:green"), ("wrong", "tab:red")):
                    mean = np.array([self.stats(e)[(split, norm)][grp]["mean"] for e in self.epochs])
                    se = np.array([self.stats(e)[(split, norm)][grp]["se"] for e in self.epochs])
                    ax.plot(self.epochs, mean, marker="o", ms=3, color=color, label=grp)
                    ax.fill_between(self.epochs, mean - se, mean + se, color=color, alpha=0.2)
                ax.set_title(f"{split}, {'L2' if norm == 'l2' else 'L-inf'}")
                ax.set_xlabel("epoch")
                ax.set_ylabel("mean margin +- SE")
                ax.legend(fontsize=7)
        return save_figure(fig, path)

    def plot_histograms(self, split: str = "test", norm: str = "l2", epochs=None, path=None):
        """Per-epoch margin histograms, correct vs wrong (failed searches left out)."""
        plt = pyplot()
        epochs = list(self.epochs if epochs is None else epochs)
        if len(epochs) > 6:  # keep the figure readable: 6 epochs spread over the run
            epochs = [epochs[int(round(i))] for i in np.linspace(0, len(epochs) - 1, 6)]
        fig, axes = plt.subplots(1, len(epochs), squeeze=False, figsize=(2.6 * len(epochs), 2.6), sharey=True)
        allm = np.concatenate([self.margins[(split, norm)][e] for e in epochs])
        allm = allm[np.isfinite(allm)]
        bins = np.linspace(0, float(allm.max()) if allm.size else 1.0, 30)
        for ax, e in zip(axes[0], epochs):
            m = self.margins[(split, norm)][e]
            ok = self.correct(split, e)
            fin = np.isfinite(m)
            for sel, color, label in ((ok & fin, "tab:green", "correct"), (~ok & fin, "tab:red", "wrong")):
                if sel.any():
                    ax.hist(m[sel], bins=bins, alpha=0.6, color=color, label=label, density=True)
            ax.set_title(f"epoch {e}", fontsize=9)
            ax.set_xlabel("margin")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{split} margins ({'L2' if norm == 'l2' else 'L-inf'})", fontsize=10)
        return save_figure(fig, path)

    def plot_transitions(self, split: str = "test", path=None):
        """Alluvial (Sankey-style) chart of correct/wrong counts and the flows between epochs."""
        plt = pyplot()
        trans = self.transitions(split)
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(self.epochs)), 3.2))
        n = len(self.labels[split])
        width = 0.12
        s = np.linspace(0, 1, 30)
        smooth = 3 * s**2 - 2 * s**3
        colors = {"right_right": "tab:green", "wrong_wrong": "tab:red",
                  "right_wrong": "tab:orange", "wrong_right": "tab:blue"}
        for k, e in enumerate(self.epochs):
            right = int(self.correct(split, e).sum())
            ax.bar(k, right, width=width, color="tab:green", edgecolor="k")
            ax.bar(k, n - right, bottom=right, width=width, color="tab:red", edgecolor="k")
        labelled = set()  # each transition kind in the legend once, from its first band
        for k, t in enumerate(trans):
            # left stacks: right block [rr, rw], wrong block [wr, ww]; right stacks: [rr, wr] [rw, ww]
            r0 = t["right_right"] + t["right_wrong"]
            r1 = t["right_right"] + t["wrong_right"]
            left = {"right_right": 0, "right_wrong": t["right_right"], "wrong_right": r0,
                    "wrong_wrong": r0 + t["wrong_right"]}
            rightpos = {"right_right": 0, "wrong_right": t["right_right"], "right_wrong": r1,
                        "wrong_wrong": r1 + t["right_wrong"]}
            x = k + width / 2 + (1 - width) * s
            for key, color in colors.items():
                if t[key] == 0:
                    continue
                lo = left[key] + (rightpos[key] - left[key]) * smooth
                ax.fill_between(x, lo, lo + t[key], color=color, alpha=0.45, lw=0,
                                label=None if key in labelled else key.replace("_", " -> "))
                labelled.add(key)
        ax.set_xticks(range(len(self.epochs)))
        ax.set_xticklabels([str(e) for e in self.epochs])
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{split} samples (of {n})")
        if labelled:  # a single measured epoch has no transitions
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        return save_figure(fig, path)

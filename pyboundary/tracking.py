"""Margin dynamics during training: DeepFool margins of fixed samples, measured per epoch.

:class:`MarginTracker` is a callback ``tracker(epoch, model)`` (the ``on_epoch_end`` of
:func:`pyboundary.models.train`, or any loop). Each measurement runs DeepFool (L2 and L-inf by
default) on fixed, seeded subsets of the training and test data; the margin of a sample is its
distance to the boundary of its *predicted* class (so misclassified samples have a margin too)
and samples are split by correctness of that prediction. Failed searches (no boundary within
``max_iter``) are counted, never averaged in (:func:`pyboundary.stats.summarize`).
Units: margins in input units (pixel intensity for images in [0, 1]).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .stats import summarize
from .utils import check_finite, is_inf

__all__ = ["MarginTracker", "track", "register_cli", "TABLE"]

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
    raise ValueError(f"norms must contain 2 and/or inf, got {p!r}")


def _subset(n: int, k: int, seed: int) -> Tensor:
    """Sorted seeded subset of min(k, n) indices of range(n)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=gen)[: min(k, n)].sort().values


class MarginTracker:
    """Per-epoch DeepFool margins of fixed train/test subsets, with statistics, store and plots.

    Args:
        x_train, y_train, x_test, y_test: (N, C, H, W) float inputs and (N,) int64 labels; either
            split may be None (not tracked).
        n_track: samples per split (a seeded subset; all if fewer).
        seed: seed of the subsets.
        norms: subset of (2, inf).
        deepfool_kwargs: extra arguments of :func:`pyboundary.deepfool` (e.g. max_iter, clamp).
        store: optional :class:`pyboundary.store.ResultStore` (opened writable) receiving one row
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
        y_train: Tensor | None,
        x_test: Tensor | None = None,
        y_test: Tensor | None = None,
        *,
        n_track: int = 1000,
        seed: int = 0,
        norms: Sequence = (2, math.inf),
        deepfool_kwargs: dict | None = None,
        store=None,
        every: int = 1,
        progress: bool = False,
    ):
        if isinstance(n_track, bool) or not isinstance(n_track, int) or n_track < 1:
            raise ValueError(f"n_track must be an integer >= 1, got {n_track!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.norms = [_norm_name(p) for p in norms]
        if not self.norms or len(set(self.norms)) != len(self.norms):
            raise ValueError(f"norms must be a non-empty subset of (2, inf) without repeats, got {norms!r}")
        self.x, self.labels, self.indices = {}, {}, {}
        for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
            if xs is None and ys is None:
                continue
            if not isinstance(xs, Tensor) or not isinstance(ys, Tensor):
                raise TypeError(f"x_{split} and y_{split} must both be tensors (or both None)")
            check_finite(f"x_{split}", xs)
            if ys.dtype != torch.int64 or ys.shape != xs.shape[:1]:
                raise ValueError(f"y_{split} must be int64 of shape ({xs.shape[0]},), got "
                                 f"{ys.dtype} {tuple(ys.shape)}")
            idx = _subset(xs.shape[0], n_track, seed + (0 if split == "train" else 1))
            self.indices[split] = idx
            self.x[split] = xs[idx].detach()
            self.labels[split] = ys[idx].cpu().numpy()
        if not self.x:
            raise ValueError("give at least one of (x_train, y_train) and (x_test, y_test)")
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
        from .deepfool import deepfool

        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if epoch in self.epochs:
            raise ValueError(f"epoch {epoch} was already measured")
        rows = {c: [] for c in _COLUMNS}
        # the tracked inputs follow the model (e.g. trained on CUDA while the subsets live on CPU)
        param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        for split in self.splits:
            x = self.x[split] if param is None else self.x[split].to(param.device)
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
        plt = _pyplot()
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
        fig.tight_layout()
        return _save(fig, path)

    def plot_histograms(self, split: str = "test", norm: str = "l2", epochs=None, path=None):
        """Per-epoch margin histograms, correct vs wrong (failed searches left out)."""
        plt = _pyplot()
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
        fig.tight_layout()
        return _save(fig, path)

    def plot_transitions(self, split: str = "test", path=None):
        """Alluvial (Sankey-style) chart of correct/wrong counts and the flows between epochs."""
        plt = _pyplot()
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
                                label=key.replace("_", " -> ") if k == 0 else None)
        ax.set_xticks(range(len(self.epochs)))
        ax.set_xticklabels([str(e) for e in self.epochs])
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{split} samples (of {n})")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        return _save(fig, path)


def _pyplot():
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    if path is not None:
        fig.savefig(path, dpi=110)
        _pyplot().close(fig)
    return fig


# ------------------------------------------------------------------------- end to end
def track(
    arch: str = "lenet",
    data: str = "fashion-mnist",
    *,
    epochs: int = 10,
    adversarial: str | None = None,
    n_track: int = 1000,
    n_train: int | None = None,
    out=None,
    seed: int = 0,
    lr: float = 1e-3,
    batch_size: int = 128,
    deepfool_kwargs: dict | None = None,
    progress: bool = True,
):
    """Train ``arch`` on ``data`` (standard, or adversarial with spec e.g.
    'pgd-linf:eps=0.1,steps=7,frac=0.5') with a :class:`MarginTracker` measuring at epochs
    0..epochs. With ``out`` (a directory), writes ``track.sqlite`` (refusing an existing one)
    and the plots ``curves.png``, ``hist_<split>_<norm>.png``, ``transitions_<split>.png``.
    Returns (model, tracker)."""
    from . import data as data_mod
    from . import models
    from .adversarial import parse_attack, pgd_batch_transform

    transform = None
    if adversarial:
        transform = pgd_batch_transform(**parse_attack(adversarial), seed=seed)
    train_set = data_mod.load_dataset(data, split="train", limit=n_train, seed=seed)
    test_set = data_mod.load_dataset(data, split="test")
    store = None
    if out is not None:
        from .store import ResultStore

        out = Path(out)
        if (out / "track.sqlite").exists():
            raise ValueError(f"{str(out / 'track.sqlite')!r} already holds a tracked training run; a "
                             "training run cannot be resumed, so choose another --out (results are "
                             "never overwritten)")
        out.mkdir(parents=True, exist_ok=True)
        meta = {"pipeline": "tracking", "arch": arch, "data": data, "train_identity": train_set.identity,
                "test_identity": test_set.identity, "epochs": epochs, "adversarial": adversarial or "",
                "n_track": n_track, "seed": seed, "lr": lr, "batch_size": batch_size,
                "deepfool": {k: repr(v) for k, v in (deepfool_kwargs or {}).items()}}
        store = ResultStore(out / "track.sqlite", mode="create", meta=meta)
    try:
        torch.manual_seed(seed)
        model = models.build(arch, train_set.image_shape, train_set.n_classes)
        tracker = MarginTracker(train_set.x, train_set.y, test_set.x, test_set.y, n_track=n_track,
                                seed=seed, deepfool_kwargs=deepfool_kwargs, store=store, progress=progress)
        tracker.measure(0, model)
        models.train(model, train_set.x, train_set.y, epochs=epochs, batch_size=batch_size, lr=lr,
                     seed=seed, batch_transform=transform, on_epoch_end=tracker, progress=progress)
    finally:
        if store is not None:
            store.close()
    if out is not None:
        tracker.plot_curves(out / "curves.png")
        for split in tracker.splits:
            tracker.plot_transitions(split, out / f"transitions_{split}.png")
            for norm in tracker.norms:
                tracker.plot_histograms(split, norm, path=out / f"hist_{split}_{norm}.png")
    return model, tracker


def _format_table(tracker: MarginTracker) -> str:
    lines = [f"{'epoch':>5} {'split':>5} {'norm':>4} {'acc':>6} {'mean':>9} {'se':>8} "
             f"{'correct':>9} {'wrong':>9} {'failed':>6}"]
    for r in tracker.table():
        lines.append(f"{r['epoch']:>5} {r['split']:>5} {r['norm']:>4} {r['accuracy']:>6.3f} "
                     f"{r['all_mean']:>9.4g} {r['all_se']:>8.2g} {r['correct_mean']:>9.4g} "
                     f"{r['wrong_mean']:>9.4g} {r['all_n_failed']:>6}")
    return "\n".join(lines)


def _cli_track(args) -> int:
    dkw = {"max_iter": args.max_iter}
    _, tracker = track(args.model, args.data, epochs=args.epochs, adversarial=args.adversarial,
                       n_track=args.n_track, n_train=args.n_train, out=args.out, seed=args.seed,
                       lr=args.lr, batch_size=args.batch_size, deepfool_kwargs=dkw,
                       progress=not args.quiet)
    print(_format_table(tracker))
    for split in tracker.splits:
        for t in tracker.transitions(split):
            print(f"{split} {t['from']}->{t['to']}: wrong->right {t['wrong_right']}, "
                  f"right->wrong {t['right_wrong']}")
    if args.out:
        print(f"results and plots in {args.out}")
    return 0


def register_cli(subparsers) -> None:
    """Add ``pyboundary track`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "track", help="train a model and track its DeepFool margins per epoch",
        description="Train --model on --data (standard or adversarial) and measure the L2 and L-inf "
                    "DeepFool margins of fixed train/test subsets at every epoch (0 = init).")
    p.add_argument("--model", default="lenet", help="architecture: lenet, mlp, resnet-small")
    p.add_argument("--data", default="fashion-mnist", help="dataset name (default fashion-mnist)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--adversarial", default=None,
                   help="e.g. pgd-linf:eps=0.1,steps=7,frac=0.5 or pgd-l2:eps=1.0,steps=7,frac=1")
    p.add_argument("--n-track", type=int, default=1000, help="tracked samples per split")
    p.add_argument("--n-train", type=int, default=None, help="train on a seeded subset of this size")
    p.add_argument("--out", default=None, help="directory for track.sqlite and plots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-iter", type=int, default=50, help="DeepFool iterations per sample")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli_track)

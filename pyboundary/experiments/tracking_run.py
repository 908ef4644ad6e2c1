"""A margin-dynamics study in one call: train a reference architecture (standard or adversarial)
while a :class:`pyboundary.scans.tracking.MarginTracker` measures margins at every epoch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._utils.results import Result
from ..attacks.pgd import parse_attack, pgd_batch_transform
from ..scans.store import ResultStore, remove_store
from ..scans.tracking import MarginTracker
from ..zoo.architectures import build
from ..zoo.data import load_dataset
from ..zoo.training import check_training_settings, train

__all__ = ["TrackingRun", "track"]

#: Name of the results store inside a tracking run's output folder.
TRACK_STORE = "track.sqlite"


@dataclass
class TrackingRun(Result):
    """Outcome of :func:`track`: the trained model, its tracker and the files written.

    Attributes:
        model: the trained nn.Module (eval mode).
        tracker: the :class:`MarginTracker` with every measured epoch.
        out: output folder (None when nothing was written).
        paths: tuple of the Paths written into ``out`` (the store, then the plots; empty
            without ``out``).
    """

    model: nn.Module
    tracker: MarginTracker
    out: Path | None = None
    paths: tuple = ()

    def summary(self) -> dict:
        return self.tracker.summary()

    def format_summary(self) -> str:
        lines = [self.tracker.format_summary()]
        for split in self.tracker.splits:
            for t in self.tracker.transitions(split):
                lines.append(f"{split} {t['from']}->{t['to']}: wrong->right {t['wrong_right']}, "
                             f"right->wrong {t['right_wrong']}")
        return "\n".join(lines)

    def to_numpy(self) -> dict:
        return self.tracker.to_numpy()


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
    train_batch_size: int = 128,
    deepfool_kwargs: dict | None = None,
    progress: bool = True,
) -> TrackingRun:
    """Train ``arch`` on ``data`` and track its DeepFool margins at epochs 0..epochs.

    Args:
        arch: an architecture of :func:`pyboundary.zoo.build`.
        data: a dataset name with a train and a test split.
        epochs: training epochs.
        adversarial: None (standard training) or an attack spec such as
            'pgd-linf:eps=0.1,steps=7,frac=0.5' (:func:`pyboundary.attacks.pgd.parse_attack`).
        n_track: tracked samples per split.
        n_train: train on a seeded subset of this size (None: the whole train split).
        out: a folder: writes ``track.sqlite`` (refusing an existing one: a training run cannot
            be resumed) and the plots ``curves.png``, ``hist_<split>_<norm>.png``,
            ``transitions_<split>.png``.
        seed, lr, train_batch_size: training settings (Adam).
        deepfool_kwargs: options of the tracker's DeepFool calls (:class:`MarginTracker`).
        progress: progress bars and one line per measurement.
    Returns:
        :class:`TrackingRun`.
    """
    transform = None
    if adversarial:
        transform = pgd_batch_transform(**parse_attack(adversarial), seed=seed)
    epochs, train_batch_size, lr = check_training_settings(epochs, train_batch_size, lr)
    train_set = load_dataset(data, split="train", limit=n_train, seed=seed)
    test_set = load_dataset(data, split="test")
    # everything that can be refused is checked before the store exists: a refused run must not
    # leave a track.sqlite that blocks the corrected one
    torch.manual_seed(seed)
    model = build(arch, train_set.image_shape, train_set.n_classes)
    store = None
    if out is not None:
        out = Path(out)
        if (out / TRACK_STORE).exists():
            raise ValueError(f"{str(out / TRACK_STORE)!r} already holds a tracked training run; a "
                             "training run cannot be resumed, so choose another --out (results are "
                             "never overwritten)")
        out.mkdir(parents=True, exist_ok=True)
        meta = {"pipeline": "tracking", "arch": arch, "data": data, "train_identity": train_set.identity,
                "test_identity": test_set.identity, "epochs": epochs, "adversarial": adversarial or "",
                "n_track": n_track, "seed": seed, "lr": lr, "batch_size": train_batch_size,
                "deepfool": {k: repr(v) for k, v in (deepfool_kwargs or {}).items()}}
        store = ResultStore(out / TRACK_STORE, mode="create", meta=meta)
    measured = False
    try:
        tracker = MarginTracker(train_set.x, train_set.labels, test_set.x, test_set.labels, n_track=n_track,
                                seed=seed, deepfool_kwargs=deepfool_kwargs, store=store, progress=progress)
        tracker.measure(0, model)
        measured = True
        train(model, train_set.x, train_set.labels, epochs=epochs, train_batch_size=train_batch_size, lr=lr,
              seed=seed, batch_transform=transform, on_epoch_end=tracker, progress=progress)
    finally:
        if store is not None:
            store.close()
            if not measured:  # refused before any result (e.g. bad DeepFool options): leave no store
                remove_store(out / TRACK_STORE)
    paths = []
    if out is not None:
        paths.append(out / TRACK_STORE)
        paths.append(tracker.plot_curves(out / "curves.png"))
        for split in tracker.splits:
            paths.append(tracker.plot_transitions(split, out / f"transitions_{split}.png"))
            for norm in tracker.norms:
                paths.append(tracker.plot_histograms(split, norm, path=out / f"hist_{split}_{norm}.png"))
    return TrackingRun(model=model, tracker=tracker, out=out, paths=tuple(paths))

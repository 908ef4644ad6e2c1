"""Mickisch et al. (2020): how the margins of train and test inputs evolve during training.

A LeNet is trained on Fashion-MNIST twice, normally and with PGD (half of every batch replaced by
PGD examples); the weights after every epoch are cached (trained once), and the L2 and L-inf
DeepFool margins of fixed seeded train/test subsets are measured at every epoch, 0 included
(:class:`pyboundary.scans.tracking.MarginTracker`). The longer study of this kind is in
``examples/track_fmnist.py`` (10 epochs, 10k images, 500 tracked inputs).
"""

from __future__ import annotations

import numpy as np

from ..._utils.plotting import pyplot
from ...scans.tracking import MarginTracker
from ...zoo.data import load_dataset
from .models import trained

__all__ = ["dynamics", "PARAMS"]

PARAMS = {
    "mickisch-dynamics": {
        "budget": {"n_train": 10000, "epochs": 8, "n_track": 300, "lr": 1e-3,
                   "pgd": "pgd-linf:eps=0.1,steps=7,frac=0.5", "max_iter": 50},
        "full": {"n_train": None, "epochs": 20, "n_track": 1000, "lr": 1e-3,
                 "pgd": "pgd-linf:eps=0.1,steps=7,frac=0.5", "max_iter": 50},
    },
}


def dynamics(ctx) -> None:
    """Mean margins over training, standard vs PGD (see the module docstring)."""
    prm, rep = ctx.params, ctx.report
    train = load_dataset("fashion-mnist", "train", limit=prm["n_train"], seed=ctx.seed)
    test = load_dataset("fashion-mnist", "test")
    runs, numbers = {}, {}
    for name, adversarial in (("standard", None), ("PGD", prm["pgd"])):
        checkpoints = trained("lenet", train, epochs=prm["epochs"], seed=ctx.seed, lr=prm["lr"],
                              adversarial=adversarial, checkpoints=True, progress=ctx.progress)
        tracker = MarginTracker(train.x, train.labels, test.x, test.labels, n_track=prm["n_track"], seed=ctx.seed,
                                deepfool_kwargs={"max_iter": prm["max_iter"]})
        for epoch, model in enumerate(checkpoints):
            tracker.measure(epoch, model)
        runs[name] = tracker
        numbers[name] = tracker.table()
    rep.numbers.update(numbers)
    _text(ctx, runs)
    _figure(ctx, runs)


def _series(tracker, split: str, norm: str, group: str = "all"):
    means, ses, acc = [], [], []
    for e in tracker.epochs:
        st = tracker.stats(e)[(split, norm)]
        means.append(st[group]["mean"])
        ses.append(st[group]["se"])
        acc.append(st["accuracy"])
    return np.array(means), np.array(ses), np.array(acc)


def _text(ctx, runs) -> None:
    prm, rep = ctx.params, ctx.report
    rep.heading("Setup")
    rep.text(
        f"Fashion-MNIST, LeNet (`lenet`), Adam lr {prm['lr']}, batch 128, {prm['epochs']} epochs on "
        + ("all 60,000" if prm["n_train"] is None else f"a seeded subset of {prm['n_train']}")
        + f" training images; `standard` and `PGD` ({prm['pgd']}: half of every batch replaced by PGD "
        "examples, the setting of the paper's adversarial runs). The weights after every epoch are "
        f"cached. Margins: L2 and L-inf DeepFool (refined, max_iter {prm['max_iter']}) of {prm['n_track']} "
        "seeded training and test images at every epoch (0 = initialisation), to the boundary of the "
        "predicted class; mean +- SE (SE = sqrt(sum (d - mean)^2) / n), failed searches excluded.")
    rep.heading("Published vs ours")
    rep.text(
        "**Published (Figs. 2-5, MNIST / Fashion-MNIST / CIFAR-10).** \"The decision boundary moves closer "
        "to natural images over training\", \"even in the late epochs of training, where the classifier "
        "already obtains low training and test error rates\"; \"adversarial training appears to have the "
        "potential to prevent this undesired convergence of the decision boundary\" (abstract; the paper "
        "shows it in figures of the mean margin per epoch, no table). Ours: mean margin of the tracked "
        "test inputs at epoch 1 (after the first jump), at the last epoch, and the change.")
    rows, checks = [], {}
    for name, tracker in runs.items():
        for split in ("train", "test"):
            for norm in ("l2", "linf"):
                mean, se, acc = _series(tracker, split, norm)
                first, last = mean[1], mean[-1]
                rows.append([name, split, norm, acc[-1], mean[0], first, last, f"{100 * (last / first - 1):+.0f}%"])
                checks[f"{name}/{split}/{norm}"] = float(last / first - 1)
    rep.table(["training", "split", "norm", "accuracy (last)", "mean margin epoch 0", "epoch 1", "last epoch",
               "change 1 -> last"], rows)
    std = checks["standard/test/l2"]
    pgd = checks["PGD/test/l2"]
    s_mean = _series(runs["standard"], "test", "l2")[0][-1]
    p_mean = _series(runs["PGD"], "test", "l2")[0][-1]
    rep.text(
        f"**Reading.** Standard training: the mean test L2 margin changes by {100 * std:+.0f}% from epoch 1 to "
        f"the last epoch ({'shrinks, as published' if std < 0 else 'does NOT shrink at this scale'}); PGD "
        f"training: {100 * pgd:+.0f}% ({'kept from shrinking, as published' if pgd > std else 'not better'}), "
        f"ending at {p_mean / s_mean:.1f}x the standard margin.")
    wrong = []
    for name, tracker in runs.items():
        st = tracker.stats(tracker.epochs[-1])[("test", "l2")]
        wrong.append(f"{name}: correct {st['correct']['mean']:.3g}, wrong {st['wrong']['mean']:.3g}")
    rep.text("Mean test L2 margin at the last epoch by correctness of the prediction: " + "; ".join(wrong) + ".")
    rep.numbers["change_epoch1_to_last"] = checks


def _figure(ctx, runs) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.2))
    for ax, norm in zip(axes, ("l2", "linf")):
        for i, (name, tracker) in enumerate(runs.items()):
            for split, style in (("train", "--"), ("test", "-")):
                mean, se, _ = _series(tracker, split, norm)
                ep = np.array(tracker.epochs)
                ax.plot(ep, mean, style, color=f"C{i}", label=f"{name} {split}")
                ax.fill_between(ep, mean - se, mean + se, color=f"C{i}", alpha=0.15)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"mean {'L2' if norm == 'l2' else 'L-inf'} margin")
        ax.legend(fontsize=7)
    ctx.figure(fig, "dynamics.png", "Mean DeepFool margin (+- SE) of the tracked inputs per epoch, "
               "standard vs PGD training")

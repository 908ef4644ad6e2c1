"""A plain seeded training loop (with hooks for adversarial training and trackers) and accuracy."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .._utils.model import predict
from .._utils.validation import check_int, check_labels, check_number

__all__ = ["train", "accuracy"]


def _check_data(x, labels) -> Tensor:
    """The labels as int64 after checking x and them."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}"
                        + (f" of {x.dtype}" if isinstance(x, Tensor) else ""))
    return check_labels(labels, x.shape[0])


def check_training_settings(epochs, train_batch_size, lr) -> tuple[int, int, float]:
    """(epochs, train_batch_size, lr) of :func:`train`, checked (epochs >= 0, batch >= 1, lr > 0):
    for pipelines that must refuse bad settings before they create anything."""
    return (check_int("epochs", epochs, minimum=0),
            check_int("train_batch_size", train_batch_size, minimum=1),
            check_number("lr", lr, minimum=0, strict_minimum=True))


def train(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    train_batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    batch_transform: Callable | None = None,
    on_epoch_end: Callable | None = None,
    progress: bool = True,
    device="cpu",
    history: list | None = None,
) -> nn.Module:
    """Train ``model`` with Adam (learning rate ``lr``) on the cross-entropy loss.

    Each epoch visits the samples in a fresh order drawn from a generator seeded with ``seed``
    (the same seed, data and initial weights give the same weights). The last batch may be smaller.

    Args:
        model: nn.Module mapping (B, C, H, W) -> (B, L) logits; trained in place.
        x: (N, C, H, W) float inputs.
        labels: (N,) int64 classes.
        epochs: number of passes over the data (0 allowed: nothing is trained).
        train_batch_size: samples per optimisation step (a training hyperparameter, not a
            memory knob: it changes the trained weights).
        lr: Adam learning rate.
        seed: seed of the shuffling.
        batch_transform: optional ``f(model, xb, yb) -> (xb, yb)`` called on every batch (already
            on ``device``) before the loss, e.g. to replace part of it with adversarial examples.
            The model is in train mode when it is called; wrap the attack in
            :func:`pyboundary._utils.model.model_guard` to run it in eval mode without touching ``.grad``.
        on_epoch_end: optional ``f(epoch, model)`` called after each epoch (epoch = 1, 2, ...),
            with the model in eval mode; training resumes in train mode afterwards.
        progress: show a tqdm bar (total steps, running loss).
        device: where to train; the model is moved there.
        history: optional list; the mean training loss of each epoch is appended to it.
    Returns:
        the same model, in eval mode, on ``device``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    labels = _check_data(x, labels)
    epochs, batch_size, lr = check_training_settings(epochs, train_batch_size, lr)
    device = torch.device(device)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    steps = math.ceil(n / batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps, desc="train", unit="batch", leave=False)
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(n, generator=gen)
            total, count = 0.0, 0
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                xb, yb = x[idx].to(device), labels[idx].to(device)
                if batch_transform is not None:
                    xb, yb = batch_transform(model, xb, yb)
                    model.train()
                loss = loss_fn(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * yb.shape[0]
                count += yb.shape[0]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{total / count:.4f}")
            if history is not None:
                history.append(total / max(count, 1))
            if on_epoch_end is not None:
                model.eval()
                on_epoch_end(epoch, model)
    finally:
        if bar is not None:
            bar.close()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    return model


def accuracy(model: Callable, x: Tensor, labels: Tensor, *, batch_size: int | None = None) -> float:
    """Fraction of samples of x (N, ...) whose predicted class equals labels (N,).

    Args:
        model: callable (N, ...) -> (N, L) logits (left as found).
        x: (N, ...) inputs.
        labels: (N,) int64 classes.
        batch_size: input rows per model call (None: automatic).
    Returns:
        the accuracy, a float in [0, 1].
    """
    labels = _check_data(x, labels)
    if x.shape[0] == 0:
        raise ValueError("x is empty: accuracy is undefined")
    return float((predict(model, x, batch_size=batch_size) == labels.to(x.device)).double().mean())

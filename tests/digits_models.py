"""Small classifiers trained in seconds on scikit-learn's 8x8 digits, for the adapter and compare tests.

Trained once per test process (cached here, never on disk): a one-hidden-layer MLP (64 units,
20 epochs of Adam, ~2 s of CPU time, ~95 % test accuracy), optionally adversarially trained with
PGD L-inf (eps 0.1, 5 steps, every training sample replaced): a "robust" model whose L2 margins
are clearly larger (median ~0.60 vs ~0.45 on the test split).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from pyboundary.attacks.pgd import pgd_batch_transform
from pyboundary.zoo.data import load_dataset
from pyboundary.zoo.training import train as train_model


@functools.lru_cache(maxsize=None)
def digits(split: str = "test"):
    """The digits split as an ImageDataset (x (N, 1, 8, 8) in [0, 1])."""
    return load_dataset("digits", split)


@functools.lru_cache(maxsize=None)
def digits_mlp(seed: int = 0, robust: bool = False, hidden: int = 64) -> nn.Module:
    """A trained MLP in eval mode; do not modify it (it is shared by the tests of a process)."""
    train = digits("train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    transform = pgd_batch_transform(0.1, 5, frac=1.0, p=math.inf, seed=seed) if robust else None
    train_model(net, train.x, train.labels, epochs=20, train_batch_size=64, lr=3e-3, seed=seed,
                batch_transform=transform, progress=False)
    return net.eval()


def digits_cnn(seed: int, dtype: torch.dtype = torch.float32, train_batch_size: int = 128):
    """(model, x (1797, 1, 8, 8) in [0, 1] of dtype, labels): a small conv net (8 channels, max
    pooling, 32 hidden units) trained with Adam (8 epochs) on the first 1400 of scikit-learn's
    digits (all 1797, not the load_dataset split), in eval mode; the rest is held out."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=dtype).reshape(-1, 1, 8, 8) / 16.0
    labels = torch.tensor(d.target, dtype=torch.int64)
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(8 * 16, 32), nn.ReLU(), nn.Linear(32, 10)).to(dtype)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(8):
        perm = torch.randperm(1400)
        for s in range(0, 1400, train_batch_size):
            b = perm[s:s + train_batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[b]), labels[b]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return m.eval(), x, labels


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    """One intra-op thread for a whole test module, module-scoped fixtures included (import this
    name into a test module to use it): on two shared cores, tiny models run several times
    faster at one thread than at two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

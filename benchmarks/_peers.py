"""Shared helpers of the benchmarks: peer-library loaders, pass counting, per-sample norms.

adv-lib's package ``__init__`` files import torchvision (LPIPS) and its DDN module imports visdom
(a logger used only when a callback is given); neither is installed with the pinned CPU torch. The
attacks are loaded from their files under a stand-in ``adv_lib.attacks`` package so that their
relative imports resolve without running that ``__init__``; ``visdom`` gets an empty stand-in.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import types

import torch
from torch import nn


def advlib_attack(module: str, name: str):
    """adv-lib's ``adv_lib.attacks.<module>.<name>`` without importing torchvision or visdom."""
    spec = importlib.util.find_spec("adv_lib")
    if spec is None:
        raise ImportError("adv-lib is not installed (make .venv/.peers)")
    sys.modules.setdefault("visdom", types.ModuleType("visdom"))
    if "adv_lib.attacks" not in sys.modules:
        pkg = types.ModuleType("adv_lib.attacks")
        pkg.__path__ = [os.path.join(os.path.dirname(spec.origin), "attacks")]
        sys.modules["adv_lib.attacks"] = pkg
    return getattr(importlib.import_module(f"adv_lib.attacks.{module}"), name)


class Counted(nn.Module):
    """Wraps a model; counts forward calls / rows and reverse passes / rows through its output."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.reset()

    def reset(self):
        self.forward_calls = self.backward_calls = 0
        self.forward_rows = self.backward_rows = 0

    def forward(self, x):
        out = self.model(x)
        self.forward_calls += 1
        self.forward_rows += int(x.shape[0])
        if out.requires_grad:
            rows = int(x.shape[0])

            def hook(grad):
                self.backward_calls += 1
                self.backward_rows += rows

            out.register_hook(hook)
        return out


def norms(d: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sample L2 or L-inf norm of (N, ...) -> (N,)."""
    flat = d.reshape(d.shape[0], -1)
    return flat.abs().amax(1) if math.isinf(p) else flat.norm(dim=1)


def adversarial_norms(model, x, labels, adv, p) -> torch.Tensor:
    """(N,) ||adv - x||_p where model(adv) != labels and adv is in [0, 1], +inf elsewhere."""
    with torch.no_grad():
        ok = model(adv).argmax(1) != labels
    ok &= (adv >= 0).reshape(adv.shape[0], -1).all(1) & (adv <= 1).reshape(adv.shape[0], -1).all(1)
    d = norms(adv - x, p)
    return torch.where(ok, d, torch.full_like(d, math.inf))


def in_batches(fn, x, labels, batch_size, *extra):
    """torch.cat of fn(x[s:e], labels[s:e], *extra[s:e]) over batches."""
    outs = []
    for s in range(0, x.shape[0], batch_size):
        e = s + batch_size
        outs.append(fn(x[s:e], labels[s:e], *(t[s:e] for t in extra)))
    return torch.cat(outs)

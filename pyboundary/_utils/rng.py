"""Seeded randomness: every random draw of pyboundary goes through an explicit generator."""

from __future__ import annotations

import torch

__all__ = ["make_generator"]


def make_generator(seed: int | None, device="cpu") -> torch.Generator | None:
    """A torch.Generator seeded with ``seed`` on ``device`` (None when seed is None)."""
    if seed is None:
        return None
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen

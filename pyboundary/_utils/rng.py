"""Seeded randomness: every random draw of pyboundary goes through an explicit generator."""

from __future__ import annotations

import torch

__all__ = ["make_generator", "per_sample_randn", "random_unit_vectors"]


def make_generator(seed: int | None, device="cpu") -> torch.Generator | None:
    """A torch.Generator seeded with ``seed`` on ``device`` (None when seed is None)."""
    if seed is None:
        return None
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen


def per_sample_randn(n: int, shape, *, generator, dtype, device) -> torch.Tensor:
    """(n, *shape) standard normal numbers drawn one sample at a time, in sample order: drawing
    for chunks of samples in turn gives the numbers of one draw for all of them (one torch.randn
    of the whole block does not: its numbers depend on the block's size)."""
    return torch.stack([torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
                        for _ in range(n)]) if n else torch.zeros((0, *shape), dtype=dtype, device=device)


def random_unit_vectors(n: int, t: int, d: int, *, generator, dtype, device) -> torch.Tensor:
    """(n, t, d) uniform unit vectors, t per sample, drawn per sample (:func:`per_sample_randn`)."""
    v = per_sample_randn(n, (t, d), generator=generator, dtype=dtype, device=device)
    return v / v.norm(dim=2, keepdim=True)

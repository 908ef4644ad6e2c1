"""The models of the reproduce entries: trained once and cached (:func:`pyboundary.zoo.train_cached`).

Adversarial training is given as an attack spec (``pgd-linf:eps=0.1,steps=7,frac=0.5``, see
:func:`pyboundary.attacks.pgd.parse_attack`); the spec and the seed of its random draws identify
the batch transform in the cache key.
"""

from __future__ import annotations

from ...attacks.pgd import parse_attack, pgd_batch_transform
from ...zoo.cache import train_cached

__all__ = ["trained"]


def trained(arch: str, data, *, epochs: int, seed: int = 0, lr: float = 3e-3, adversarial: str | None = None,
            checkpoints: bool = False, progress: bool = True):
    """``arch`` trained on ``data`` (standard, or with the attack spec ``adversarial``), cached.

    Returns the model, or with ``checkpoints`` the models after every epoch (0 = initial weights).
    """
    transform = spec = None
    if adversarial:
        transform = pgd_batch_transform(**parse_attack(adversarial), seed=seed)
        spec = f"{adversarial};seed={seed}"
    return train_cached(arch, data, epochs=epochs, seed=seed, lr=lr, batch_transform=transform,
                        transform_spec=spec, checkpoints=checkpoints, progress=progress)

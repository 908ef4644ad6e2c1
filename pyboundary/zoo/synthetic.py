"""Synthetic datasets with one known discriminative direction (margin-in-subspace studies).

Both live in R^D, rotated by a seeded random orthogonal matrix U (D x D, Haar distributed);
the coordinates before rotation are z, and x = U z.

* T1(eps, sigma, D, N): z = (eps * y, noise), y uniform in {-1, +1}, noise ~ N(0, sigma^2 I_{D-1}).
  Linearly separable along u1 = U[:, 0] with margin eps; the other D-1 directions carry noise.
* T2(rho, eps, sigma, K, D, N): z = (eps * y, s, noise), s = rho * k for y = +1 and
  rho * (k + 1/2) for y = -1, k uniform in {-K, ..., K-1}, noise ~ N(0, sigma^2 I_{D-2}).
  Separable along u1 (margin eps) and, in a non-linear way, along u2 = U[:, 1] (period rho).

``U`` is exposed so u1 and its orthogonal complement U[:, 1:] can be scanned with the engine's
``Directions`` subspace. Labels for classifiers are ``y`` in {0, 1} (``sign`` holds -1/+1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._utils.results import Result
from .._utils.rng import make_generator
from .._utils.validation import check_int, check_number

__all__ = ["SyntheticDataset", "T1", "T2", "random_orthogonal"]


@dataclass
class SyntheticDataset(Result):
    """A synthetic dataset.

    Attributes:
        x: (N, D) float32 inputs, or (N, *shape) when a shape was asked for.
        labels: (N,) int64 class labels in {0, 1} (1 for sign +1).
        sign: (N,) int64 the labels in {-1, +1}.
        U: (D, D) float64 orthogonal matrix; x = U z (flattened).
        z: (N, D) float64 coordinates before rotation.
        name: e.g. 'T1(eps=1,sigma=0.5,D=100,N=1000,seed=0)'; identity: same string.
        classes: ('-1', '+1').
    """

    x: Tensor
    labels: Tensor
    sign: Tensor
    U: Tensor
    z: Tensor
    name: str
    classes: tuple = ("-1", "+1")

    @property
    def identity(self) -> str:
        return self.name

    @property
    def u1(self) -> Tensor:
        """(D,) the discriminative direction U[:, 0]."""
        return self.U[:, 0]

    @property
    def complement(self) -> Tensor:
        """(D, D-1) orthonormal basis of the orthogonal complement of u1."""
        return self.U[:, 1:]

    def __len__(self) -> int:
        return self.x.shape[0]

    def summary(self) -> dict:
        return {"name": self.name, "n": len(self), "shape": list(self.x.shape[1:]),
                "class_counts": [int((self.labels == c).sum()) for c in range(2)]}


def random_orthogonal(D: int, seed: int = 0) -> Tensor:
    """Haar-random (D, D) orthogonal matrix in float64 (QR of a seeded Gaussian, signs fixed)."""
    gen = make_generator(seed, "cpu")
    a = torch.randn(D, D, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _finish(z: Tensor, sign: Tensor, U: Tensor, name: str, shape) -> SyntheticDataset:
    x = (z @ U.T).to(torch.float32)
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if torch.Size(shape).numel() != U.shape[0]:
            raise ValueError(f"shape {shape} has {torch.Size(shape).numel()} elements, D is {U.shape[0]}")
        x = x.reshape(x.shape[0], *shape)
    y = ((sign + 1) // 2).to(torch.int64)
    return SyntheticDataset(x=x, labels=y, sign=sign, U=U, z=z, name=name)


def _signs(N: int, gen) -> Tensor:
    return torch.randint(0, 2, (N,), generator=gen, dtype=torch.int64) * 2 - 1


def T1(eps: float, sigma: float, D: int, N: int, *, seed: int = 0, shape=None) -> SyntheticDataset:
    """x = U (eps * y  ⊕  noise), y uniform in {-1, +1}, noise ~ N(0, sigma^2 I_{D-1}).

    Args:
        eps: half the class separation along u1 (> 0, input units).
        sigma: noise standard deviation (>= 0) in the D-1 other directions.
        D: dimension (>= 2).
        N: number of samples (>= 1).
        seed: seeds U (with ``seed``) and the samples (with ``seed + 1``).
        shape: optional per-sample shape (e.g. (1, 28, 28)) for x, prod(shape) == D.
    """
    eps, sigma = check_number("eps", eps, minimum=0, strict_minimum=True), check_number("sigma", sigma, minimum=0)
    D, N = check_int("D", D, minimum=2), check_int("N", N, minimum=1)
    U = random_orthogonal(D, seed)
    gen = make_generator(seed + 1, "cpu")
    sign = _signs(N, gen)
    z = torch.empty(N, D, dtype=torch.float64)
    z[:, 0] = eps * sign
    z[:, 1:] = sigma * torch.randn(N, D - 1, generator=gen, dtype=torch.float64)
    return _finish(z, sign, U, f"T1(eps={eps:g},sigma={sigma:g},D={D},N={N},seed={seed})", shape)


def T2(rho: float, eps: float, sigma: float, K: int, D: int, N: int, *, seed: int = 0, shape=None) -> SyntheticDataset:
    """x = U (eps * y  ⊕  s  ⊕  noise) with s = rho*k (y = +1) or rho*(k + 1/2) (y = -1),
    k uniform in {-K, ..., K-1}, noise ~ N(0, sigma^2 I_{D-2}).

    Args:
        rho: period of the class pattern along u2 (> 0).
        eps: half the class separation along u1 (> 0).
        sigma: noise standard deviation (>= 0).
        K: number of periods on each side (>= 1).
        D: dimension (>= 3).
        N: number of samples (>= 1).
        seed, shape: as in :func:`T1`.
    """
    rho, eps = check_number("rho", rho, minimum=0, strict_minimum=True), check_number("eps", eps, minimum=0, strict_minimum=True)
    sigma = check_number("sigma", sigma, minimum=0)
    K, D, N = check_int("K", K, minimum=1), check_int("D", D, minimum=3), check_int("N", N, minimum=1)
    U = random_orthogonal(D, seed)
    gen = make_generator(seed + 1, "cpu")
    sign = _signs(N, gen)
    k = torch.randint(-K, K, (N,), generator=gen, dtype=torch.int64).to(torch.float64)
    z = torch.empty(N, D, dtype=torch.float64)
    z[:, 0] = eps * sign
    z[:, 1] = torch.where(sign > 0, rho * k, rho * (k + 0.5))
    z[:, 2:] = sigma * torch.randn(N, D - 2, generator=gen, dtype=torch.float64)
    name = f"T2(rho={rho:g},eps={eps:g},sigma={sigma:g},K={K},D={D},N={N},seed={seed})"
    return _finish(z, sign, U, name, shape)

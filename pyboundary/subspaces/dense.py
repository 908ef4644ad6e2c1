"""Families given by dense orthonormal bases: seeded random subspaces and user bases."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from .._utils.validation import check_int
from .base import Subspace, _image_shape

__all__ = ["RandomSubspaces", "UserBasis"]


def _orthonormality_error(basis: Tensor) -> float:
    """max |B^T B - I| over members, basis (n, D, m), computed in float64."""
    b = basis.to(torch.float64)
    gram = b.transpose(1, 2) @ b
    eye = torch.eye(b.shape[2], dtype=torch.float64, device=b.device)
    return float((gram - eye).abs().max()) if b.numel() else 0.0


#: Gathered-basis path (batches holding several members): at most this many gathered basis entries
#: (rows x D x r) exist at once; rows are processed in chunks of that size.
_GATHER_ELEMS = 1 << 22


#: ... and it is taken when gathering costs less than the per-member loop, modelled as
#: (rows - members) * D * r extra copies <= members * _LOOP_COST (one loop iteration, ~6 small
#: kernels, costs about as much as copying 2**15 numbers on a CPU). So one member per row always
#: gathers; a few dense members shared by many rows (random:dim=192) keep the loop.
_LOOP_COST = 1 << 15


def _gather_pays(n_rows: int, n_present: int, D: int, r: int) -> bool:
    """True when the batched gather path is cheaper than a loop over the members present."""
    return n_present > 1 and (n_rows - n_present) * D * r <= n_present * _LOOP_COST


def _per_row_basis(bank: Tensor, which: Tensor, v: Tensor, adjoint: bool) -> Tensor:
    """out[n] = B_n^T v[n] (adjoint) or B_n v[n], with B_n = bank[which[n]] (D, r).

    bank (u, D, r), which (N,) int64 in [0, u), v (N, D) or (N, r) -> (N, r) or (N, D).
    Chunked over rows so that at most ``_GATHER_ELEMS`` gathered entries exist at once.
    """
    D, r = bank.shape[1], bank.shape[2]
    step = max(1, _GATHER_ELEMS // (D * r))
    outs = []
    for s in range(0, v.shape[0], step):
        b = bank[which[s : s + step]]
        b = b.transpose(1, 2) if adjoint else b
        outs.append(torch.bmm(b, v[s : s + step].unsqueeze(2)).squeeze(2))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class _DenseBases(Subspace):
    """Members given by dense orthonormal bases B_i (D, m): analysis B^T x, synthesis B c.

    A batch with one member is one matmul. With several members, either each row's basis is
    gathered into (rows, D, m) chunks for one batched matmul (when that is cheaper, see
    :func:`_gather_pays`: e.g. one member per row), or the members present are processed in turn
    (a loop over members, never over samples).
    """

    def __init__(self, image_shape, dim: int, n_members: int):
        super().__init__(image_shape)
        self.dim = int(dim)
        self.n_members = int(n_members)
        self._cast: dict = {}

    def basis(self, member: int) -> Tensor:
        """(D, dim) float64 orthonormal basis of one member."""
        raise NotImplementedError

    def _basis_as(self, member: int, dtype, device) -> Tensor:
        key = (member, dtype, str(device))
        b = self._cast.get(key)
        if b is None:
            b = self.basis(member).to(dtype=dtype, device=device)
            if len(self._cast) > 64:
                self._cast.clear()
            self._cast[key] = b
        return b

    def _bank(self, idx: Tensor, like: Tensor):
        """(members present (u,), inverse (N,), bank (u, D, dim) or None if the loop is cheaper)."""
        members, inv = torch.unique(idx, return_inverse=True)
        if not _gather_pays(idx.shape[0], members.numel(), self.D, self.dim):
            return members, inv, None
        bank = torch.stack([self._basis_as(m, like.dtype, like.device) for m in members.tolist()])
        return members, inv, bank

    def _analysis(self, x, idx):
        flat = x.reshape(x.shape[0], -1)
        members, inv, bank = self._bank(idx, x)
        if bank is not None:
            return _per_row_basis(bank, inv, flat, adjoint=True)
        out = flat.new_zeros(x.shape[0], self.dim)
        for member in members.tolist():
            rows = (idx == member).nonzero().squeeze(1)
            out[rows] = flat[rows] @ self._basis_as(member, x.dtype, x.device)
        return out

    def _synthesis(self, coeffs, idx):
        members, inv, bank = self._bank(idx, coeffs)
        if bank is not None:
            out = _per_row_basis(bank, inv, coeffs, adjoint=False)
            return out.reshape((coeffs.shape[0],) + self.image_shape)
        out = coeffs.new_zeros(coeffs.shape[0], self.D)
        for member in members.tolist():
            rows = (idx == member).nonzero().squeeze(1)
            out[rows] = coeffs[rows] @ self._basis_as(member, coeffs.dtype, coeffs.device).T
        return out.reshape((coeffs.shape[0],) + self.image_shape)


class RandomSubspaces(_DenseBases):
    """``n`` random orthonormal subspaces of dimension ``dim`` (Haar-distributed, seeded).

    Member i's basis is the Q factor (sign-fixed) of a D x dim Gaussian matrix drawn from a
    generator seeded with (seed, i), so it depends only on (image_shape, dim, seed, i); bases are
    generated on first use and cached (D * dim float64 numbers per member).

    Args:
        image_shape: per-sample shape ((C, H, W), (H, W) for C = 1, or (D,)).
        dim: dimension of each subspace, 1 <= dim <= D.
        n: number of subspaces (members), >= 1 (default 1).
        seed: base seed of the bases (default 0).
    """

    name = "random"

    def __init__(self, image_shape, dim: int, n: int = 1, seed: int = 0):
        shape = _image_shape(image_shape)
        D = math.prod(shape)
        dim, n = check_int("dim", dim), check_int("n", n)
        # member i's generator is seeded with seed * 1_000_003 + i, which must fit in 64 bits
        bound = 2**63 // 1_000_003 - 1
        seed = check_int("seed", seed, minimum=-bound, maximum=bound)
        if not 1 <= dim <= D:
            raise ValueError(f"dim must be in [1, {D}] for image shape {shape}, got dim={dim}")
        if n < 1:
            raise ValueError(f"n (number of random subspaces) must be >= 1, got n={n}")
        super().__init__(shape, dim, n)
        self.seed = seed
        self._bases: dict[int, Tensor] = {}

    @property
    def spec(self) -> str:
        return f"random:dim={self.dim},n={self.n_members},seed={self.seed}"

    def member_labels(self) -> list[str]:
        return [f"random{i}" for i in range(self.n_members)]

    def basis(self, member: int) -> Tensor:
        b = self._bases.get(member)
        if b is None:
            gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(member))
            g = torch.randn(self.D, self.dim, generator=gen, dtype=torch.float64)
            q, r = torch.linalg.qr(g)
            b = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1)
            self._bases[member] = b
        return b


def _as_member_matrices(b: Tensor, shape: tuple, D: int) -> Tensor | None:
    """A user basis as (n, D, m): its layout is ([n,] X, m) with X = D, the image shape (C, H, W)
    or, for one channel, (H, W); None when it is none of these."""
    tails = [(D,), shape] + ([shape[1:]] if len(shape) == 3 and shape[0] == 1 else [])
    for tail in tails:
        k = len(tail)
        if b.dim() in (k + 1, k + 2) and tuple(b.shape[-1 - k:-1]) == tuple(tail):
            n = b.shape[0] if b.dim() == k + 2 else 1
            return b.reshape(n, D, b.shape[-1])
    return None


class UserBasis(_DenseBases):
    """User-given orthonormal bases: ``basis`` (D, m) for one member or (n, D, m) for n members.

    Columns must be orthonormal (max |B^T B - I| <= ``atol``, default 1e-5 for float32 input and
    1e-10 for float64); a ValueError reports the error seen otherwise. D may also be given as the
    image shape: (C, H, W, m) or (n, C, H, W, m) are flattened, and so are (H, W, m) and
    (n, H, W, m) for one-channel images.

    Args:
        basis: floating (D, m), (n, D, m), (C, H, W, m) or (n, C, H, W, m) (one channel: also
            (H, W, m) or (n, H, W, m)) finite tensor of orthonormal columns.
        image_shape: per-sample shape ((C, H, W), (H, W) for C = 1, or (D,)), D = its product.
        atol: tolerance of the orthonormality check (None: 1e-5 for float32, 1e-10 for float64).
    """

    name = "user"

    def __init__(self, basis: Tensor, image_shape, atol: float | None = None):
        shape = _image_shape(image_shape)
        D = math.prod(shape)
        if not isinstance(basis, Tensor):
            raise TypeError(f"basis must be a torch.Tensor, got {type(basis).__name__}")
        if not basis.is_floating_point():
            raise TypeError(f"basis must be floating point, got {basis.dtype}")
        b = _as_member_matrices(basis.detach(), shape, D)
        if b is None or b.shape[2] < 1:
            raise ValueError(
                f"basis must have shape (D, m) or (n, D, m) with D = {D} for image shape {shape} "
                f"(or the image shape in place of D), got {tuple(basis.shape)}"
            )
        if not bool(torch.isfinite(b).all()):
            raise ValueError("basis contains non-finite values")
        tol = atol if atol is not None else (1e-10 if b.dtype == torch.float64 else 1e-5)
        err = _orthonormality_error(b)
        if err > tol:
            raise ValueError(
                f"basis columns must be orthonormal: max |B^T B - I| = {err:.3g} > atol = {tol:.3g} "
                "(orthonormalise them first, e.g. with torch.linalg.qr)"
            )
        super().__init__(shape, b.shape[2], b.shape[0])
        self._b = b.to(torch.float64).cpu().contiguous()
        digest = hashlib.sha256(self._b.numpy().tobytes()).hexdigest()[:12]
        self._digest = digest

    @property
    def spec(self) -> str:
        return f"user:m={self.dim},n={self.n_members},sha256={self._digest}"

    def member_labels(self) -> list[str]:
        return [f"user{i}" for i in range(self.n_members)]

    def basis(self, member: int) -> Tensor:
        return self._b[member]

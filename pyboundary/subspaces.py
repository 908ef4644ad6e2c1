"""Subspaces of input space for margin measurements: families of members selected per sample.

A :class:`Subspace` is a *family* of ``n_members`` linear subspaces of R^D, D = C*H*W, with an
orthonormal coordinate system for each member:

* ``analysis(x, idx) -> (N, m)``: coordinates of x[n] in member ``idx[n]`` (the adjoint of
  synthesis; for orthonormal coordinates ||analysis(x)|| = ||project(x)||),
* ``synthesis(coeffs, idx) -> (N, C, H, W)``: the input-space vector with those coordinates,
* ``project(x, idx) = synthesis(analysis(x, idx), idx)``: the orthogonal projection.

``idx`` is an (N,) int64 tensor, so one batch can hold many (sample, member) pairs; the DeepFool
engine (:mod:`pyboundary.deepfool`) works in coordinates and only synthesises the accumulated
perturbation, so the perturbation never leaves the member.

Coordinates have one fixed width ``dim`` per family. Members of smaller true dimension
(``member_dims()``) pad with zeros: padding carries no norm and the engine's steps keep it at
zero (the gradient is zero there for p = 2 and its sign is zero for p = inf).

Families:

=====================  =============================  =================================================
class                  text spec                      members
=====================  =============================  =================================================
:class:`FullSpace`     ``full``                       the whole space (coordinates = flattened pixels)
:class:`DCTDiagonal`   ``dct:K=8,T=2``                K x K DCT blocks at (iT, iT), low to high freq.
:class:`DCTGrid`       ``dct-grid:K=8`` (``,T=4``)    all K x K DCT blocks at (aT, bT), T defaults to K
:class:`RandomSubspaces` ``random:dim=192,n=10,seed=0``  seeded random orthonormal subspaces (via QR)
:class:`UserBasis`     (none: built from tensors)     given orthonormal bases (validated)
:class:`Directions`    (none: built from tensors)     spans of direction sets and their complements
=====================  =============================  =================================================

DCT blocks apply to every channel separately (dimension C*K^2) and use the block ops of
:mod:`pyboundary.ops`; no dense basis is ever built for them.

*Projection coordinates.* The orthogonal complement of r directions has dimension D - r; a basis of
it would be a dense D x (D - r) matrix. :class:`Directions` instead uses the projected vector itself
(flattened, width D) as the "coordinates" of a complement member: analysis = synthesis = projection
x - V V^T x. This is still an isometry onto the member and analysis is still the adjoint of
synthesis, so the engine's L2 steps (which are multiples of projected gradients) stay in the member
and the L2 margin is exact. L-inf in coordinates has no meaning there (the coordinates are not a
basis), so :meth:`Subspace.check_p` rejects p = inf for such members.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
from torch import Tensor

from . import ops
from .utils import check_index_tensor

__all__ = [
    "Subspace",
    "FullSpace",
    "DCTDiagonal",
    "DCTGrid",
    "RandomSubspaces",
    "UserBasis",
    "Directions",
    "parse_subspaces",
]


def _image_shape(image_shape) -> tuple[int, int, int]:
    """Normalise (C, H, W) or (H, W) to a (C, H, W) tuple of positive ints."""
    try:
        shape = tuple(int(s) for s in image_shape)
    except TypeError:
        raise TypeError(f"image_shape must be a sequence (C, H, W) or (H, W), got {image_shape!r}")
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) or (H, W) of positive sizes, got {image_shape!r}")
    return shape


class Subspace:
    """Base class of subspace families. See the module docstring for the contract.

    Attributes:
        image_shape: (C, H, W) of the inputs.
        n_members: number of members of the family (valid ``idx`` values are 0..n_members-1).
        dim: width of the coordinate vectors (the largest member dimension).
        name: short human-readable name.
        grid_shape: (rows, cols) for grid families (member = row * cols + col), else None.
    """

    name: str = "subspace"
    grid_shape: tuple[int, int] | None = None

    def __init__(self, image_shape):
        self.image_shape = _image_shape(image_shape)
        self.D = int(math.prod(self.image_shape))

    # -- contract -------------------------------------------------------------------------
    n_members: int = 1
    dim: int = 0

    def member_dims(self) -> list[int]:
        """True dimension of each member (<= ``dim``; smaller ones are zero-padded)."""
        return [self.dim] * self.n_members

    def member_labels(self) -> list[str]:
        """A short label per member (block origins, etc.), for tables and plots."""
        return [str(i) for i in range(self.n_members)]

    @property
    def spec(self) -> str:
        """The text spec that re-creates this family with :func:`parse_subspaces`."""
        raise NotImplementedError

    def analysis(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        """Coordinates of x in the members idx: x (N, C, H, W) -> (N, dim), same dtype."""
        x, idx = self._check(x, idx, "x")
        return self._analysis(x, idx)

    def synthesis(self, coeffs: Tensor, idx: Tensor | None = None) -> Tensor:
        """Input-space vectors from coordinates: (N, dim) -> (N, C, H, W), same dtype."""
        if not isinstance(coeffs, Tensor):
            raise TypeError(f"coeffs must be a torch.Tensor, got {type(coeffs).__name__}")
        if coeffs.dim() != 2 or coeffs.shape[1] != self.dim:
            raise ValueError(
                f"coeffs must have shape (N, {self.dim}) for {self.spec_or_name()}, "
                f"got {tuple(coeffs.shape)}"
            )
        idx = self._check_idx(idx, coeffs.shape[0], coeffs.device)
        return self._synthesis(coeffs, idx)

    def project(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        """Orthogonal projection of x (N, C, H, W) onto the members idx (same shape)."""
        x, idx = self._check(x, idx, "x")
        return self._synthesis(self._analysis(x, idx), idx)

    def check_p(self, p: float, idx: Tensor) -> None:
        """Raise ValueError if the norm p is not supported for the members idx."""

    # -- helpers --------------------------------------------------------------------------
    def spec_or_name(self) -> str:
        try:
            return self.spec
        except NotImplementedError:
            return self.name

    def _check(self, x: Tensor, idx, name: str) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 1 or tuple(x.shape[1:]) != self.image_shape:
            if x.dim() == 2 and x.shape[1] == self.D:
                x = x.reshape((x.shape[0],) + self.image_shape)
            else:
                raise ValueError(
                    f"{name} must have shape (N, {', '.join(map(str, self.image_shape))}) for "
                    f"{self.spec_or_name()}, got {tuple(x.shape)}"
                )
        return x, self._check_idx(idx, x.shape[0], x.device)

    def _check_idx(self, idx, n: int, device) -> Tensor:
        if idx is None:
            if self.n_members != 1:
                raise ValueError(
                    f"subspace_index is required: {self.spec_or_name()} has {self.n_members} members"
                )
            return torch.zeros(n, dtype=torch.int64, device=device)
        if isinstance(idx, int):
            idx = torch.full((n,), idx, dtype=torch.int64, device=device)
        check_index_tensor("subspace_index", idx, n)
        if n and (int(idx.min()) < 0 or int(idx.max()) >= self.n_members):
            raise ValueError(
                f"subspace_index values must lie in [0, {self.n_members - 1}] for "
                f"{self.spec_or_name()}, got range [{int(idx.min())}, {int(idx.max())}]"
            )
        return idx.to(device)

    def _analysis(self, x: Tensor, idx: Tensor) -> Tensor:
        raise NotImplementedError

    def _synthesis(self, coeffs: Tensor, idx: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec_or_name()!r}, image_shape={self.image_shape})"


class FullSpace(Subspace):
    """The whole input space: one member, coordinates = the flattened input (dim D)."""

    name = "full"

    def __init__(self, image_shape):
        super().__init__(image_shape)
        self.n_members = 1
        self.dim = self.D

    @property
    def spec(self) -> str:
        return "full"

    def member_labels(self) -> list[str]:
        return ["full"]

    def _analysis(self, x, idx):
        return x.reshape(x.shape[0], -1)

    def _synthesis(self, coeffs, idx):
        return coeffs.reshape((coeffs.shape[0],) + self.image_shape)


class _DCTBlocks(Subspace):
    """K x K blocks of the 2-D DCT at given (row, col) origins, each channel; dim C*K^2."""

    def __init__(self, image_shape, K: int, origins: list[tuple[int, int]]):
        super().__init__(image_shape)
        self.K = int(K)
        self.n_members = len(origins)
        self.dim = self.image_shape[0] * self.K * self.K
        self._origins = torch.tensor(origins, dtype=torch.int64).reshape(-1, 2)
        self._origins_on: dict = {}

    def origins(self) -> Tensor:
        """(n_members, 2) int64 (row0, col0) frequency origin of each block."""
        return self._origins.clone()

    def member_labels(self) -> list[str]:
        return [f"({r},{c})" for r, c in self._origins.tolist()]

    def _rc(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        key = str(idx.device)
        table = self._origins_on.get(key)
        if table is None:
            table = self._origins.to(idx.device)
            self._origins_on[key] = table
        rc = table[idx]
        return rc[:, 0].contiguous(), rc[:, 1].contiguous()

    def _analysis(self, x, idx):
        row0, col0 = self._rc(idx)
        coeffs = ops.dct_block_analysis(x, row0, col0, self.K, self.K)
        return coeffs.reshape(x.shape[0], self.dim)

    def _synthesis(self, coeffs, idx):
        row0, col0 = self._rc(idx)
        c, h, w = self.image_shape
        blocks = coeffs.reshape(coeffs.shape[0], c, self.K, self.K)
        return ops.dct_block_synthesis(blocks, row0, col0, h, w)


def _check_block(K, T, image_shape) -> tuple[int, int]:
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"K must be an int, got {K!r}")
    if isinstance(T, bool) or not isinstance(T, int):
        raise TypeError(f"T must be an int, got {T!r}")
    if K < 1:
        raise ValueError(f"block size K must be >= 1, got K={K}")
    if T < 1:
        raise ValueError(f"stride T must be >= 1, got T={T}")
    _, h, w = image_shape
    if K > min(h, w):
        raise ValueError(f"block size K={K} is larger than the image ({h}x{w})")
    return K, T


class DCTDiagonal(_DCTBlocks):
    """K x K DCT blocks on the diagonal, origins (iT, iT) for i = 0..n-1, low to high frequency.

    n = floor((min(H, W) - K) / T) + 1 (e.g. 28x28, K=8, T=1: 21 members). Each member spans
    the frequencies [iT, iT+K) x [iT, iT+K) of every channel: dim C*K^2.
    """

    name = "dct"

    def __init__(self, image_shape, K: int = 8, T: int = 1):
        shape = _image_shape(image_shape)
        K, T = _check_block(K, T, shape)
        n = (min(shape[1], shape[2]) - K) // T + 1
        super().__init__(shape, K, [(i * T, i * T) for i in range(n)])
        self.T = T

    @property
    def spec(self) -> str:
        return f"dct:K={self.K},T={self.T}"


class DCTGrid(_DCTBlocks):
    """The full grid of K x K DCT blocks, origins (aT, bT), for 2-D frequency maps.

    ``grid_shape`` = (floor((H-K)/T)+1, floor((W-K)/T)+1); member index = a * cols + b.
    T defaults to K (non-overlapping tiles; with H not a multiple of K the last partial strip
    of frequencies is not covered).
    """

    name = "dct-grid"

    def __init__(self, image_shape, K: int = 8, T: int | None = None):
        shape = _image_shape(image_shape)
        K, T = _check_block(K, K if T is None else T, shape)
        rows = (shape[1] - K) // T + 1
        cols = (shape[2] - K) // T + 1
        super().__init__(shape, K, [(a * T, b * T) for a in range(rows) for b in range(cols)])
        self.T = T
        self.grid_shape = (rows, cols)

    @property
    def spec(self) -> str:
        return f"dct-grid:K={self.K}" + ("" if self.T == self.K else f",T={self.T}")


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
    """

    name = "random"

    def __init__(self, image_shape, dim: int, n: int = 1, seed: int = 0):
        shape = _image_shape(image_shape)
        D = math.prod(shape)
        for arg, val in (("dim", dim), ("n", n), ("seed", seed)):
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"{arg} must be an int, got {val!r}")
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


class UserBasis(_DenseBases):
    """User-given orthonormal bases: ``basis`` (D, m) for one member or (n, D, m) for n members.

    Columns must be orthonormal (max |B^T B - I| <= ``atol``, default 1e-5 for float32 input and
    1e-10 for float64); a ValueError reports the error seen otherwise. D may also be given as the
    image shape: (C, H, W, m) or (n, C, H, W, m) are flattened.
    """

    name = "user"

    def __init__(self, basis: Tensor, image_shape, atol: float | None = None):
        shape = _image_shape(image_shape)
        D = math.prod(shape)
        if not isinstance(basis, Tensor):
            raise TypeError(f"basis must be a torch.Tensor, got {type(basis).__name__}")
        if not basis.is_floating_point():
            raise TypeError(f"basis must be floating point, got {basis.dtype}")
        b = basis.detach()
        if b.dim() >= 4:
            b = b.reshape(-1, D, b.shape[-1]) if b.dim() == 5 else b.reshape(1, D, b.shape[-1])
        elif b.dim() == 2:
            b = b.unsqueeze(0)
        if b.dim() != 3 or b.shape[1] != D or b.shape[2] < 1:
            raise ValueError(
                f"basis must have shape (D, m) or (n, D, m) with D = {D} for image shape {shape}, "
                f"got {tuple(basis.shape)}"
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


class Directions(Subspace):
    """Explicit direction sets: member s spans set s; optionally its orthogonal complement too.

    Args:
        sets: a tensor (r, D) / (r, C, H, W) of r directions (one set), or a list of such tensors.
            Each set is orthonormalised (QR); linearly dependent directions raise ValueError.
        image_shape: (C, H, W).
        complement: also add, after the spans, one member per set for the orthogonal complement
            of the set (dimension D - r), projected as x - V V^T x without any D x D matrix.

    Coordinates: span members use their r orthonormal coefficients, zero-padded; complement members
    use *projection coordinates* (the flattened projected vector), so ``dim`` = D as soon as one
    complement member exists, else the largest r. Projection coordinates support p = 2 only.
    Members: ``span0, span1, ..., perp0, perp1, ...``.
    """

    name = "directions"

    def __init__(self, sets, image_shape, complement: bool = False):
        super().__init__(image_shape)
        if isinstance(sets, Tensor):
            sets = [sets]
        if not isinstance(sets, (list, tuple)) or not sets:
            raise TypeError("sets must be a tensor of directions or a non-empty list of tensors")
        bases = []
        for s, v in enumerate(sets):
            if not isinstance(v, Tensor) or not v.is_floating_point():
                raise TypeError(f"sets[{s}] must be a floating-point tensor, got {type(v).__name__}")
            v = v.detach().to(torch.float64).cpu()
            if v.dim() == len(self.image_shape) and tuple(v.shape) == self.image_shape:
                v = v.unsqueeze(0)
            v = v.reshape(v.shape[0], -1) if v.dim() >= 1 else v
            if v.dim() != 2 or v.shape[1] != self.D or v.shape[0] < 1:
                raise ValueError(
                    f"sets[{s}] must have shape (r, {self.D}) or (r, {', '.join(map(str, self.image_shape))}), "
                    f"got {tuple(sets[s].shape)}"
                )
            if v.shape[0] >= self.D:
                raise ValueError(f"sets[{s}] has {v.shape[0]} directions; at most D - 1 = {self.D - 1}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"sets[{s}] contains non-finite values")
            q, r = torch.linalg.qr(v.T)
            diag = torch.diagonal(r).abs()
            if bool((diag <= 1e-10 * max(float(diag.max()), 1e-300)).any()):
                raise ValueError(f"sets[{s}]: the directions are linearly dependent (or zero)")
            bases.append(q.contiguous())  # (D, r)
        self._sets = bases
        hasher = hashlib.sha256()
        for b in bases:
            hasher.update(b.numpy().tobytes())
        self._digest = hasher.hexdigest()[:12]
        self.complement = bool(complement)
        self.n_sets = len(bases)
        self.n_members = self.n_sets * (2 if self.complement else 1)
        self.dim = self.D if self.complement else max(b.shape[1] for b in bases)
        self._cast: dict = {}

    @property
    def spec(self) -> str:
        """An identifying string (not parseable: Directions are built from tensors)."""
        rs = "+".join(str(b.shape[1]) for b in self._sets)
        return f"directions:r={rs},complement={int(self.complement)},sha256={self._digest}"

    def member_dims(self) -> list[int]:
        spans = [b.shape[1] for b in self._sets]
        return spans + ([self.D - r for r in spans] if self.complement else [])

    def member_labels(self) -> list[str]:
        labels = [f"span{s}" for s in range(self.n_sets)]
        return labels + ([f"perp{s}" for s in range(self.n_sets)] if self.complement else [])

    def is_projection_member(self, idx: Tensor) -> Tensor:
        """(N,) bool: which members use projection coordinates (the complements)."""
        return idx >= self.n_sets

    def check_p(self, p: float, idx: Tensor) -> None:
        if math.isinf(float(p)) and bool(self.is_projection_member(idx).any()):
            raise ValueError(
                "p=inf is not supported for orthogonal-complement members of Directions "
                "(projection coordinates are not a basis); use p=2"
            )

    def set_basis(self, s: int) -> Tensor:
        """(D, r) float64 orthonormal basis of set s."""
        return self._sets[s]

    def _v(self, s: int, dtype, device) -> Tensor:
        key = (s, dtype, str(device))
        v = self._cast.get(key)
        if v is None:
            v = self._sets[s].to(dtype=dtype, device=device)
            self._cast[key] = v
        return v

    def _bank(self, idx: Tensor, like: Tensor):
        """(members present (u,), bank (n_sets, D, r) or None): the bank of all sets when they
        have equal rank r and gathering pays (:func:`_gather_pays`), else None (member loop)."""
        members = torch.unique(idx)
        r = self._sets[0].shape[1]
        if any(b.shape[1] != r for b in self._sets) or not _gather_pays(
            idx.shape[0], members.numel(), self.D, r
        ):
            return members, None
        key = ("bank", like.dtype, str(like.device))
        bank = self._cast.get(key)
        if bank is None:
            bank = torch.stack(self._sets).to(dtype=like.dtype, device=like.device)
            self._cast[key] = bank
        return members, bank

    def _analysis(self, x, idx):
        flat = x.reshape(x.shape[0], -1)
        out = flat.new_zeros(x.shape[0], self.dim)
        members, bank = self._bank(idx, x)
        if bank is not None:
            r = bank.shape[2]
            span = idx < self.n_sets
            for rows, is_span in ((span.nonzero().squeeze(1), True), ((~span).nonzero().squeeze(1), False)):
                if rows.numel():
                    s = idx[rows] % self.n_sets
                    coef = _per_row_basis(bank, s, flat[rows], adjoint=True)
                    if is_span:
                        out[rows, :r] = coef
                    else:
                        out[rows] = flat[rows] - _per_row_basis(bank, s, coef, adjoint=False)
            return out
        for member in members.tolist():
            rows = (idx == member).nonzero().squeeze(1)
            s = member % self.n_sets
            v = self._v(s, x.dtype, x.device)
            coef = flat[rows] @ v
            if member < self.n_sets:
                out[rows, : v.shape[1]] = coef
            else:
                out[rows] = flat[rows] - coef @ v.T
        return out

    def _synthesis(self, coeffs, idx):
        out = coeffs.new_zeros(coeffs.shape[0], self.D)
        members, bank = self._bank(idx, coeffs)
        if bank is not None:
            r = bank.shape[2]
            span = idx < self.n_sets
            for rows, is_span in ((span.nonzero().squeeze(1), True), ((~span).nonzero().squeeze(1), False)):
                if rows.numel():
                    s = idx[rows] % self.n_sets
                    if is_span:
                        out[rows] = _per_row_basis(bank, s, coeffs[rows, :r], adjoint=False)
                    else:
                        c = coeffs[rows]
                        vtc = _per_row_basis(bank, s, c, adjoint=True)
                        out[rows] = c - _per_row_basis(bank, s, vtc, adjoint=False)
            return out.reshape((coeffs.shape[0],) + self.image_shape)
        for member in members.tolist():
            rows = (idx == member).nonzero().squeeze(1)
            s = member % self.n_sets
            v = self._v(s, coeffs.dtype, coeffs.device)
            if member < self.n_sets:
                out[rows] = coeffs[rows, : v.shape[1]] @ v.T
            else:
                c = coeffs[rows]
                out[rows] = c - (c @ v) @ v.T
        return out.reshape((coeffs.shape[0],) + self.image_shape)


_SPEC_RE = re.compile(r"^\s*([a-zA-Z][\w-]*)\s*(?::\s*(.*))?$")
_KNOWN = {
    "full": set(),
    "dct": {"K", "T"},
    "dct-grid": {"K", "T"},
    "random": {"dim", "n", "seed"},
}


def _parse_args(kind: str, text: str | None, spec: str) -> dict[str, int]:
    args: dict[str, int] = {}
    if text is None or not text.strip():
        return args
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"subspace spec {spec!r}: expected key=value, got {part.strip()!r}")
        key, val = (s.strip() for s in part.split("=", 1))
        if key not in _KNOWN[kind]:
            allowed = ", ".join(sorted(_KNOWN[kind])) or "none"
            raise ValueError(f"subspace spec {spec!r}: unknown parameter {key!r} for {kind!r} (allowed: {allowed})")
        if key in args:
            raise ValueError(f"subspace spec {spec!r}: parameter {key!r} given twice")
        try:
            args[key] = int(val)
        except ValueError:
            raise ValueError(f"subspace spec {spec!r}: {key} must be an integer, got {val!r}") from None
    return args


def parse_subspaces(spec: str, image_shape) -> Subspace:
    """Build a subspace family from a text spec.

    Specs: ``full``; ``dct:K=8,T=2`` (DCT diagonal, T defaults to 1); ``dct-grid:K=8`` (optional
    ``T``, default K); ``random:dim=192,n=10,seed=0`` (n defaults to 1, seed to 0).

    Args:
        spec: the text spec (what :attr:`Subspace.spec` returns).
        image_shape: (C, H, W) or (H, W) of the inputs.
    Raises:
        ValueError naming the spec for unknown families or parameters, missing K/dim, and
        impossible settings (block larger than the image, T < 1, dim > D, ...).
    """
    if not isinstance(spec, str):
        raise TypeError(f"subspace spec must be a string, got {type(spec).__name__}")
    shape = _image_shape(image_shape)
    m = _SPEC_RE.match(spec)
    kind = m.group(1).lower() if m else None
    if kind in ("user", "directions"):
        raise ValueError(
            f"subspace spec {spec!r}: {kind} subspaces are built from tensors "
            "(UserBasis / Directions), not from a text spec"
        )
    if kind not in _KNOWN:
        raise ValueError(
            f"unknown subspace spec {spec!r}; expected one of: full, dct:K=8,T=1, dct-grid:K=8, "
            "random:dim=192,n=10,seed=0"
        )
    args = _parse_args(kind, m.group(2), spec)
    try:
        if kind == "full":
            return FullSpace(shape)
        if kind in ("dct", "dct-grid"):
            if "K" not in args:
                raise ValueError("K (block size) is required")
            if kind == "dct":
                return DCTDiagonal(shape, args["K"], args.get("T", 1))
            return DCTGrid(shape, args["K"], args.get("T"))
        if "dim" not in args:
            raise ValueError("dim is required")
        return RandomSubspaces(shape, args["dim"], args.get("n", 1), args.get("seed", 0))
    except ValueError as err:
        raise ValueError(f"subspace spec {spec!r} for image shape {shape}: {err}") from None

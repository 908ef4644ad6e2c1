"""Spans of direction sets and their orthogonal complements (projection coordinates)."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from . import dense
from .base import Subspace

__all__ = ["Directions"]


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
        if any(b.shape[1] != r for b in self._sets) or not dense._gather_pays(
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
                    coef = dense._per_row_basis(bank, s, flat[rows], adjoint=True)
                    if is_span:
                        out[rows, :r] = coef
                    else:
                        out[rows] = flat[rows] - dense._per_row_basis(bank, s, coef, adjoint=False)
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
                        out[rows] = dense._per_row_basis(bank, s, coeffs[rows, :r], adjoint=False)
                    else:
                        c = coeffs[rows]
                        vtc = dense._per_row_basis(bank, s, c, adjoint=True)
                        out[rows] = c - dense._per_row_basis(bank, s, vtc, adjoint=False)
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

"""The Subspace protocol (a family of members with orthonormal coordinates, selected per sample)
and the whole space as a one-member family."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._utils.validation import check_index_tensor

__all__ = ["Subspace", "FullSpace"]


def _image_shape(image_shape) -> tuple[int, ...]:
    """Normalise a per-sample input shape to a tuple of positive ints; (H, W) becomes (1, H, W).

    Images are (C, H, W); flat vectors (D,) and other shapes are kept as given."""
    try:
        shape = tuple(int(s) for s in image_shape)
    except TypeError:
        raise TypeError(f"image_shape must be a sequence of ints such as (C, H, W), (H, W) or (D,), "
                        f"got {image_shape!r}") from None
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) < 1 or min(shape) < 1:
        raise ValueError(f"image_shape must be a non-empty shape of positive sizes, got {image_shape!r}")
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
        idx = check_index_tensor("subspace_index", idx, n)
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

    def for_input_shape(self, shape) -> Subspace | None:
        """This family for inputs of per-sample ``shape``: itself when shape is its image_shape;
        for (H, W) inputs of a (1, H, W) family (2-D inputs are one-channel images here), a view
        whose _analysis / _synthesis take and give (n, H, W) with the same coordinates (one per
        family and shape, so callers that key caches on it see one object); else None."""
        shape = tuple(int(s) for s in shape)
        if shape == self.image_shape:
            return self
        if len(shape) != 2 or (1,) + shape != self.image_shape:
            return None
        views = self.__dict__.setdefault("_input_views", {})
        if shape not in views:
            views[shape] = _InputShapeView(self, shape)
        return views[shape]


class _InputShapeView:
    """A subspace family seen through inputs of another per-sample shape of the same size
    (:meth:`Subspace.for_input_shape`): everything but the image shape is the family's."""

    def __init__(self, family: Subspace, shape: tuple):
        self.family, self.image_shape = family, shape

    def __getattr__(self, name):
        return getattr(self.family, name)

    def _analysis(self, x: Tensor, idx: Tensor) -> Tensor:
        return self.family._analysis(x.reshape((x.shape[0],) + self.family.image_shape), idx)

    def _synthesis(self, coeffs: Tensor, idx: Tensor) -> Tensor:
        return self.family._synthesis(coeffs, idx).reshape((coeffs.shape[0],) + self.image_shape)


class FullSpace(Subspace):
    """The whole input space: one member, coordinates = the flattened input (dim D).

    ``image_shape`` may be any per-sample shape (images, flat vectors, sequences); unlike the
    other families it is kept exactly as given (no (H, W) -> (1, H, W) normalisation), so the
    DeepFool engine uses it for inputs of any shape.

    Args:
        image_shape: the per-sample input shape (any sequence of positive ints).
    """

    name = "full"

    def __init__(self, image_shape):
        super().__init__(image_shape)
        exact = tuple(int(s) for s in image_shape)
        if exact and min(exact) >= 1:
            self.image_shape = exact
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

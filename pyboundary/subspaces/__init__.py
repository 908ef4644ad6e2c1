"""Subspaces of input space for margin measurements: families of members selected per sample.

A :class:`Subspace` is a *family* of ``n_members`` linear subspaces of R^D, D = C*H*W, with an
orthonormal coordinate system for each member:

* ``analysis(x, idx) -> (N, m)``: coordinates of x[n] in member ``idx[n]`` (the adjoint of
  synthesis; for orthonormal coordinates ||analysis(x)|| = ||project(x)||),
* ``synthesis(coeffs, idx) -> (N, C, H, W)``: the input-space vector with those coordinates,
* ``project(x, idx) = synthesis(analysis(x, idx), idx)``: the orthogonal projection.

``idx`` is an (N,) int64 tensor, so one batch can hold many (sample, member) pairs; the DeepFool
engine (:mod:`pyboundary.attacks.deepfool`) works in coordinates and only synthesises the accumulated
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

from .base import FullSpace, Subspace
from .dct import DCTDiagonal, DCTGrid
from .dense import RandomSubspaces, UserBasis
from .directions import Directions
from .spec import parse_subspaces

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

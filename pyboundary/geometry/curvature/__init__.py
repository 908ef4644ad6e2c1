"""Curvature of decision boundaries in input space.

Notation: ``f`` maps inputs x (N, *shape), D = prod(shape), to logits (N, L). For a pair of
classes ``(i, j)`` the pairwise function is ``F = f_i - f_j``; its level set through the point
of evaluation is the (pairwise) boundary surface studied here (at a boundary point F = 0).

Sign convention (used everywhere in this module and in :mod:`pyboundary.geometry.detection`)
-----------------------------------------------------------------------------------
* normal ``n = grad F / ||grad F||``: it points to the side where F grows, i.e. towards class
  ``i`` (the first class of the pair);
* tangent projector ``P = I - n n^T``;
* shape operator ``S = -P H P / ||grad F||`` (H the input Hessian of F), restricted to the
  tangent space (D - 1 dimensions): its eigenvalues are the **principal curvatures**, its
  eigenvectors the principal directions. This is the second fundamental form of the level set
  with respect to ``n``: ``kappa > 0`` means that along that direction the surface bends towards
  ``n``, so if every kappa > 0 the region ``{F > 0}`` (where ``i`` beats ``j``) is locally convex.
  Example (tested): F(x) = x_1 - 1/2 sum_{i>=2} a_i x_i^2 has kappa = a_i at the origin, with
  directions e_i. Swapping the pair flips every sign.
* **mean curvature** = the mean of the D - 1 principal curvatures = tr(S) / (D - 1)
  = (grad F^T H grad F - tr(H) ||grad F||^2) / ((D - 1) ||grad F||^3)   (the "trace form").
  (DESIGN.md's ``G = P H P / ||grad F||`` is ``-S``; its trace formula, with 2 in place of
  D - 1, is ours.)
* functions that take a reference class (``mean_curvature``, the detector) use
  ``F_i = f_i - f_ref`` for every other class ``i``, ``ref`` the predicted label by default:
  the normal points out of the region of the predicted class.

Derivatives
-----------
Hessian-vector products and quadratic forms come from finite differences of gradients
(``scheme='central'``: (grad F(x + h w) - grad F(x - h w)) / 2h; ``'forward'``: (grad F(x + h w)
- grad F(x)) / h) or, for quadratic forms, of values ((F(x + h w) - 2 F(x) + F(x - h w)) / h^2),
or exactly (``scheme='exact'``: double backward / nested forward mode; smooth models only).
Networks with ReLUs are piecewise linear: their Hessian is zero almost everywhere and an
infinitesimal step sees no curvature at all. The finite-difference step ``h`` (in input units,
the length of the step along a unit direction) must therefore span many linear pieces, on the
scale of the boundary's distance: the default is ``h = h_rel * ||x||_2`` per sample with
``h_rel = 0.05`` (DeepFool margins of small image classifiers are a few percent of ||x||).
For such models the finite-difference "Hessian" is a smoothed one and depends on h; the
operator is then only approximately linear and symmetric (the dense method symmetrises it).

Every evaluation is batched: the (sample, direction[, class]) rows are stacked into one batch
and evaluated in chunks of ``batch_size`` rows; counts of rows sent forward and backward through
the model are returned as the cost (``n_forward``, ``n_backward``).
"""

from .hvp import DEFAULT_H_REL, finite_difference_step, hessian_vector_product
from .mean import MeanCurvature, mean_curvature
from .principal import PrincipalCurvatures, principal_curvatures
from .relative import (
    NoiseAccuracy,
    RelativeCurvature,
    noise_accuracy,
    relative_curvature,
    subspace_fraction,
)
from .shared import SharedDirections, shared_curved_directions

__all__ = [
    "DEFAULT_H_REL",
    "finite_difference_step",
    "hessian_vector_product",
    "PrincipalCurvatures",
    "principal_curvatures",
    "MeanCurvature",
    "mean_curvature",
    "SharedDirections",
    "shared_curved_directions",
    "RelativeCurvature",
    "relative_curvature",
    "subspace_fraction",
    "NoiseAccuracy",
    "noise_accuracy",
]

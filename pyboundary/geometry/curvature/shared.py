"""Directions of high curvature shared across samples (SVD of stacked principal directions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..._utils.results import Result
from ..._utils.validation import check_int
from .principal import PrincipalCurvatures, principal_curvatures

__all__ = ["SharedDirections", "shared_curved_directions"]


@dataclass
class SharedDirections(Result):
    """Directions of high curvature shared across samples.

    Attributes:
        directions: (m, *shape) orthonormal shared directions u_1..u_m (most shared first).
        singular_values: (m,) of the stacked principal-direction matrix.
        curvatures: the :class:`PrincipalCurvatures` they were computed from.
    """

    directions: Tensor
    singular_values: Tensor
    curvatures: PrincipalCurvatures

    def summary(self) -> dict:
        return {"m": int(self.directions.shape[0]), "singular_values": [float(v) for v in self.singular_values],
                "n_samples": int(self.curvatures.valid.numel()), "n_valid": int(self.curvatures.valid.sum())}

    def to_numpy(self) -> dict:
        return {"directions": self.directions.detach().cpu().numpy(),
                "singular_values": self.singular_values.detach().cpu().numpy(),
                "curvatures": self.curvatures.to_numpy()}

    def basis(self) -> Tensor:
        """(D, m) matrix with the directions as orthonormal columns."""
        return self.directions.reshape(self.directions.shape[0], -1).T


def shared_curved_directions(model: Callable, xs: Tensor, m: int, *, k: int = 5, **kwargs) -> SharedDirections:
    """The m directions most shared by the high-curvature principal directions of many samples.

    For each sample the k principal directions of largest |curvature| (from both ends of the
    spectrum, by :func:`principal_curvatures` with ``kwargs``) are stacked into a (N k, D)
    matrix; its top-m right singular vectors are the shared directions.

    Args:
        model, xs: as :func:`principal_curvatures` (N samples, N k >= m).
        m: number of shared directions (1 <= m <= min(N k, D)).
        k: principal directions per sample.
    Returns:
        :class:`SharedDirections`.
    """
    m = check_int("m", m, minimum=1)
    pc = principal_curvatures(model, xs, k=k, **kwargs)
    n, d = xs.shape[0], xs[0].numel()
    vals = torch.cat([pc.largest, pc.smallest], 1)
    dirs = torch.cat([pc.largest_dirs.reshape(n, k, d), pc.smallest_dirs.reshape(n, k, d)], 1)
    order = vals.abs().nan_to_num(-1.0).argsort(1, descending=True)[:, :k]
    top = dirs.gather(1, order.unsqueeze(2).expand(n, k, d))[pc.valid].reshape(-1, d)
    if m > min(top.shape[0], d):
        raise ValueError(f"m must be <= min(N_valid * k, D) = {min(top.shape[0], d)}, got {m}")
    _, s, vh = torch.linalg.svd(top, full_matrices=False)
    return SharedDirections(directions=vh[:m].reshape(m, *xs.shape[1:]), singular_values=s[:m], curvatures=pc)

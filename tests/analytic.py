"""Analytic models shared by the tests: classifiers whose margins, boundaries and curvatures are
known in closed form (import with ``from analytic import ...``; tests/ is on sys.path through
tests/conftest.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Affine", "affine_margin", "BinaryAffine", "Quadric", "Annulus", "TwoSlabs", "TwoParaboloids",
           "CurvedRegion", "paraboloid_clean_points"]


class Affine(nn.Module):
    """logits = W flat(x) + b: the region of class k is a polytope, margins have a closed form
    (:func:`affine_margin`)."""

    def __init__(self, W, b):
        super().__init__()
        self.W = nn.Parameter(torch.as_tensor(W))
        self.b = nn.Parameter(torch.as_tensor(b))

    @classmethod
    def random(cls, d: int, n_classes: int = 3, seed: int = 0, dtype=torch.float64) -> "Affine":
        """Gaussian W (n_classes, d) and b (n_classes,) from a generator seeded with ``seed``."""
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n_classes, d, generator=g, dtype=dtype)
        b = torch.randn(n_classes, generator=g, dtype=dtype)
        return cls(W, b)

    def forward(self, x):
        return x.reshape(x.shape[0], -1) @ self.W.T + self.b


def affine_margin(model: Affine, x, q: float = 2.0, project=None):
    """min_j |F_j| / ||P (w_j - w_ref)||_q: the exact distance from x to the complement of its
    region (q = 2 for L2 margins, q = 1 for L-inf margins); ``project`` maps (N, L, D) weight
    differences into a subspace's coordinates."""
    with torch.no_grad():
        f = model(x)
        ref = f.argmax(1)
        F = (f - f.gather(1, ref[:, None])).abs()  # (N, L)
        dw = model.W[None] - model.W[ref][:, None]  # (N, L, D)
        if project is not None:
            dw = project(dw)
        nrm = dw.norm(p=q, dim=2)
        return (F / nrm).masked_fill(nrm == 0, math.inf).min(1).values


class BinaryAffine(nn.Module):
    """Two classes, logits [w.x + b, 0]: margins |w.x + b| / ||w||_2 (L2) and / ||w||_1 (L-inf)."""

    def __init__(self, w, b):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(float(b), dtype=torch.float64))

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([s, torch.zeros_like(s)], 1)

    def margins(self, x):
        """(L2, L-inf) margins of x (N, ...)."""
        s = (x.flatten(1) @ self.w + self.b).abs().detach()
        return s / self.w.detach().norm(), s / self.w.detach().abs().sum()


class Quadric(nn.Module):
    """F(x) = x_1 - c - 1/2 sum_{i>=2} a_i x_i^2 (x flattened): at points with x_i = 0 (i >= 2) the
    level set of F has principal curvatures exactly a_i (central differences are exact for a
    quadratic), mean curvature mean(a).

    ``layout='split'``: logits (F/2, -F/2) (f_0 - f_1 = F); ``layout='zero-first'``: logits (0, F)
    (f_1 - f_0 = F)."""

    def __init__(self, a, c: float = 0.0, layout: str = "split"):
        super().__init__()
        self.a = nn.Parameter(torch.as_tensor(a, dtype=torch.float64).clone())
        self.c = c
        if layout not in ("split", "zero-first"):
            raise ValueError(layout)
        self.layout = layout

    def forward(self, x):
        z = x.reshape(x.shape[0], -1).to(torch.float64)
        f = z[:, 0] - self.c - 0.5 * (self.a * z[:, 1:] ** 2).sum(1)
        if self.layout == "split":
            return torch.stack([f / 2, -f / 2], 1)
        return torch.stack([torch.zeros_like(f), f], 1)


class Annulus(nn.Module):
    """Class 0 iff 1 < r < 2 in the first two coordinates (a connected, non-convex region);
    ``scale`` and ``transform`` change the logits without changing the region."""

    def __init__(self, scale: float = 1.0, transform=None):
        super().__init__()
        self.scale = scale
        self.transform = transform

    def forward(self, x):
        r2 = x.flatten(1)[:, :2].pow(2).sum(1)
        s = (r2 - 1) * (4 - r2)
        if self.transform is not None:
            s = self.transform(s)
        s = self.scale * s
        return torch.stack([s, torch.zeros_like(s)], 1)


class TwoSlabs(nn.Module):
    """Class 0 iff |x_0| > 1: two disconnected half-spaces."""

    def forward(self, x):
        s = x.flatten(1)[:, 0].pow(2) - 1
        return torch.stack([s, torch.zeros_like(s)], 1)


class TwoParaboloids(nn.Module):
    """Class 0 outside two paraboloids, classes 1 and 2 inside them (x flattened, D >= 2).

    f_0 = 0, f_1 = x_1 - 1 - a/2 |y|^2, f_2 = -x_1 - 1 - a/2 |y|^2 (y = the other coordinates).
    From class 0 the boundaries with 1 and 2 have mean curvature +a-ish (they bend towards the
    other class); a point pushed into class 1 sees the boundary with class 0 with kappa < 0 and
    a flat boundary with class 2 (f_2 - f_1 = -2 x_1).
    """

    def __init__(self, a=2.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))

    def forward(self, x):
        z = x.reshape(x.shape[0], -1)
        x1, y2 = z[:, 0], (z[:, 1:] ** 2).sum(1)
        f1 = x1 - 1 - 0.5 * self.a * y2
        f2 = -x1 - 1 - 0.5 * self.a * y2
        return torch.stack([torch.zeros_like(x1), f1, f2], 1)


class CurvedRegion(nn.Module):
    """Two classes; class 0 is a curved region given by a signed distance F (> 0 inside):

    * 'annulus': r1 < r < r2 in the first two coordinates (F = min(r - r1, r2 - r));
    * 'ball-exterior': ||x|| > 1 (F = ||x|| - 1);
    * 'crescent': inside the disk of radius 2 about 0 and outside the disk of radius 1.5 about
      (0.8, 0), first two coordinates.

    The logit gap is g(F) for a ``transform`` g that keeps the sign, so every transform has the
    same region: 'x<c>' (c F, e.g. 'x1e-3'), 'square' (F |F|), 'cube' (F^3), 'sdf' (F itself).
    """

    def __init__(self, kind: str = "annulus", transform: str = "sdf", r1: float = 1.0, r2: float = 2.0):
        super().__init__()
        self.kind, self.transform, self.r1, self.r2 = kind, transform, r1, r2

    def signed_distance(self, x):
        z = x.flatten(1)
        if self.kind == "annulus":
            r = z[:, :2].norm(dim=1)
            return torch.minimum(r - self.r1, self.r2 - r)
        if self.kind == "ball-exterior":
            return z.norm(dim=1) - 1.0
        if self.kind == "crescent":
            outer = 2.0 - z[:, :2].norm(dim=1)
            inner = (z[:, :2] - torch.tensor([0.8, 0.0], dtype=z.dtype)).norm(dim=1) - 1.5
            return torch.minimum(outer, inner)
        raise ValueError(f"unknown kind {self.kind!r}")

    def forward(self, x):
        f = self.signed_distance(x)
        t = self.transform
        if t.startswith("x"):
            g = float(t[1:]) * f
        elif t == "square":
            g = f * f.abs()
        elif t == "cube":
            g = f ** 3
        elif t == "sdf":
            g = f
        else:
            raise ValueError(f"unknown transform {t!r}")
        return torch.stack([g, torch.zeros_like(g)], 1)


def paraboloid_clean_points(n: int, seed: int = 0):
    """(n, 1, 3, 3) points of class 0 of :class:`TwoParaboloids` (|x_1| < 0.25, the rest ~ N(0, 0.3^2))."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 1, 3, 3, generator=g)
    x[:, 0, 0, 0] = 0.5 * (torch.rand(n, generator=g) - 0.5)  # |x_1| < 0.25: class 0
    return x

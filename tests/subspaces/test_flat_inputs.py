"""Subspaces of flat inputs (vectors of shape (D,)): families, the engine and margin scans.

Ground truth: for an affine binary classifier F(x) = w.x + b (logits (F, 0), tests/analytic.py), the L2 margin of x
inside a subspace S with orthonormal basis B is |F(x)| / ||B^T w||, and inside the orthogonal
complement of span(V) it is |F(x)| / ||w - V V^T w||.
"""

import math

import pytest
import torch
from analytic import BinaryAffine

import pyboundary as pb

D = 100


def _orthonormal(d, m, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))
    return q


def _close_above(margin, exact, tol=1e-4):
    """The engine's refined margin lies in [exact, exact (1 + tol)] (tol: its default refinement)."""
    ratio = margin / exact
    assert bool((ratio >= 1 - 1e-12).all()) and bool((ratio <= 1 + tol).all()), ratio


@pytest.fixture
def affine():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(12, D, generator=g, dtype=torch.float64)
    return BinaryAffine(w, 0.3), x, w


def test_user_basis_on_vectors_round_trips():
    b = _orthonormal(D, 7, 1)
    s = pb.UserBasis(b, (D,))
    assert s.image_shape == (D,) and s.D == D and s.dim == 7
    x = torch.randn(5, D, dtype=torch.float64)
    c = s.analysis(x)
    assert c.shape == (5, 7)
    torch.testing.assert_close(c, x @ b)
    y = s.synthesis(c)
    assert y.shape == (5, D)
    torch.testing.assert_close(s.project(x), x @ b @ b.T)
    # several members (n, D, m)
    two = pb.UserBasis(torch.stack([b, _orthonormal(D, 7, 2)]), (D,))
    idx = torch.tensor([0, 1, 1, 0, 1])
    assert two.analysis(x, idx).shape == (5, 7)


def test_random_full_directions_and_specs_on_vectors():
    x = torch.randn(4, D, dtype=torch.float64)
    r = pb.RandomSubspaces((D,), dim=10, n=3, seed=2)
    basis = r.basis(1)
    torch.testing.assert_close(r.project(x, 1), x @ basis @ basis.T)
    f = pb.FullSpace((D,))
    torch.testing.assert_close(f.synthesis(f.analysis(x)), x)
    u = torch.randn(2, D, dtype=torch.float64)
    d = pb.Directions(u, (D,), complement=True)
    assert d.member_labels() == ["span0", "perp0"] and d.dim == D
    q = d.set_basis(0)
    torch.testing.assert_close(d.project(x, 1), x - x @ q @ q.T)
    assert isinstance(pb.parse_subspaces("full", (D,)), pb.FullSpace)
    spec = pb.parse_subspaces("random:dim=5,n=2,seed=1", (D,))
    assert spec.image_shape == (D,) and spec.n_members == 2


@pytest.mark.parametrize("spec", ["dct:K=8", "dct-grid:K=4"])
def test_dct_families_refuse_vectors_clearly(spec):
    with pytest.raises(ValueError, match=r"DCT subspaces need images of shape \(C, H, W\) or \(H, W\), "
                                         r"got \(100,\)"):
        pb.parse_subspaces(spec, (D,))
    with pytest.raises(ValueError, match=r"DCT subspaces need images"):
        pb.DCTDiagonal((D,), K=8)


@pytest.mark.parametrize("shape", [(0,), (), (3, 0)])
def test_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"image_shape must be a non-empty shape of positive sizes"):
        pb.FullSpace(shape)


def test_engine_margins_in_flat_subspaces_match_closed_form(affine):
    model, x, w = affine
    f = (x @ w + 0.3).abs()
    b = _orthonormal(D, 5, 3)
    res = pb.deepfool(model, x, subspace=pb.UserBasis(b, (D,)))
    _close_above(res.margin, f / (b.T @ w).norm())
    v = torch.randn(1, D, dtype=torch.float64)
    dirs = pb.Directions(v, (D,), complement=True)
    res = pb.deepfool(model, x, subspace=dirs, subspace_index=torch.ones(12, dtype=torch.int64))
    q = dirs.set_basis(0)
    perp = w - q @ (q.T @ w)
    _close_above(res.margin, f / perp.norm())


def test_margin_scan_of_vector_data(affine, tmp_path):
    model, x, w = affine
    f = (x @ w + 0.3).abs()
    u = w / w.norm()
    fam = pb.Directions(u.unsqueeze(0), (D,), complement=True)
    scan = pb.margin_scan(model, x, fam, p=2, progress=False, store=tmp_path / "s.sqlite")
    # along w itself the margin is |F| / ||w||; its complement never reaches the boundary
    _close_above(scan.margins[:, 0], f / w.norm())
    assert bool(torch.isinf(scan.margins[:, 1]).all()) and not bool(scan.converged[:, 1].any())
    back = pb.MarginScan.load(tmp_path / "s.sqlite")
    assert torch.equal(back.margins, scan.margins)
    assert "span0" in scan.format_summary()
    rnd = pb.margin_scan(model, x, "random:dim=10,n=2", p=math.inf, progress=False)
    assert rnd.margins.shape == (12, 2) and bool(torch.isfinite(rnd.margins).all())

"""Subspace families: orthonormality, adjointness, agreement with the full 2-D DCT, specs, errors."""

import math

import pytest
import torch

from pyboundary import ops
from pyboundary.subspaces import (
    DCTDiagonal,
    DCTGrid,
    Directions,
    FullSpace,
    RandomSubspaces,
    Subspace,
    UserBasis,
    parse_subspaces,
)

SHAPE = (2, 12, 10)


def _x(n=6, shape=SHAPE, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + tuple(shape), generator=g, dtype=dtype)


def _families():
    g = torch.Generator().manual_seed(3)
    D = math.prod(SHAPE)
    q, _ = torch.linalg.qr(torch.randn(D, 5, generator=g, dtype=torch.float64))
    v = torch.randn(2, D, generator=g, dtype=torch.float64)
    return [
        FullSpace(SHAPE),
        DCTDiagonal(SHAPE, K=4, T=2),
        DCTGrid(SHAPE, K=3),
        RandomSubspaces(SHAPE, dim=7, n=3, seed=1),
        UserBasis(q, SHAPE),
        Directions([v, v[:1]], SHAPE, complement=True),
    ]


def _idx(sub, n):
    return torch.arange(n, dtype=torch.int64) % sub.n_members


@pytest.mark.parametrize("sub", _families(), ids=lambda s: type(s).__name__)
def test_orthonormal_and_adjoint(sub: Subspace):
    n = 6
    x = _x(n)
    idx = _idx(sub, n)
    c = sub.analysis(x, idx)
    assert c.shape == (n, sub.dim) and c.dtype == x.dtype
    proj = sub.project(x, idx)
    # coefficient norms equal projected norms (orthonormal coordinates)
    torch.testing.assert_close(c.norm(dim=1), proj.reshape(n, -1).norm(dim=1), rtol=1e-12, atol=1e-12)
    # projection is idempotent and the residual is orthogonal to the member
    torch.testing.assert_close(sub.project(proj, idx), proj, rtol=1e-10, atol=1e-10)
    resid = x - proj
    assert sub.analysis(resid, idx).abs().max() < 1e-10
    # synthesis is the adjoint of analysis: <analysis(x), y> = <x, synthesis(y)>
    y = sub.analysis(_x(n, seed=5), idx)
    lhs = (c * y).sum(1)
    rhs = (x * sub.synthesis(y, idx)).reshape(n, -1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)
    assert len(sub.member_labels()) == sub.n_members
    assert len(sub.member_dims()) == sub.n_members and max(sub.member_dims()) <= sub.dim


def test_dct_diagonal_matches_full_dct():
    sub = DCTDiagonal((3, 28, 28), K=8, T=1)
    assert sub.n_members == 21 and sub.dim == 3 * 64 and sub.spec == "dct:K=8,T=1"
    x = _x(4, (3, 28, 28))
    idx = torch.tensor([0, 5, 20, 13])
    full = ops.dct2(x)
    c = sub.analysis(x, idx).reshape(4, 3, 8, 8)
    for n, i in enumerate(idx.tolist()):
        torch.testing.assert_close(c[n], full[n, :, i : i + 8, i : i + 8], rtol=1e-10, atol=1e-10)
    # projection = inverse DCT of the masked spectrum
    mask = torch.zeros_like(full)
    for n, i in enumerate(idx.tolist()):
        mask[n, :, i : i + 8, i : i + 8] = 1
    torch.testing.assert_close(sub.project(x, idx), ops.idct2(full * mask), rtol=1e-10, atol=1e-10)


def test_dct_grid_shape_and_origins():
    sub = DCTGrid((1, 32, 24), K=8)
    assert sub.grid_shape == (4, 3) and sub.n_members == 12 and sub.spec == "dct-grid:K=8"
    assert sub.origins()[5].tolist() == [8, 16]  # member = row * cols + col: (1, 2)
    assert sub.member_labels()[5] == "(8,16)"
    sub2 = DCTGrid((1, 32, 32), K=8, T=4)
    assert sub2.grid_shape == (7, 7) and sub2.spec == "dct-grid:K=8,T=4"
    assert DCTDiagonal((1, 32, 20), K=8, T=4).n_members == 4  # limited by the smaller side


def test_random_subspaces_seeded():
    a = RandomSubspaces(SHAPE, dim=5, n=3, seed=7)
    b = RandomSubspaces(SHAPE, dim=5, n=3, seed=7)
    c = RandomSubspaces(SHAPE, dim=5, n=3, seed=8)
    torch.testing.assert_close(a.basis(2), b.basis(2), rtol=0, atol=0)
    assert (a.basis(2) - c.basis(2)).abs().max() > 0.1
    assert (a.basis(0) - a.basis(1)).abs().max() > 0.1
    gram = a.basis(1).T @ a.basis(1)
    torch.testing.assert_close(gram, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert a.spec == "random:dim=5,n=3,seed=7"
    with pytest.raises(ValueError, match="seed must be <="):  # seed * 1_000_003 + i must fit in 64 bits
        RandomSubspaces(SHAPE, dim=5, seed=2**62)


def test_float32_and_mixed_members():
    sub = DCTDiagonal(SHAPE, K=4, T=2)
    x = _x(5).float()
    idx = torch.tensor([0, 2, 1, 2, 0])
    c = sub.analysis(x, idx)
    assert c.dtype == torch.float32
    ref = sub.analysis(x.double(), idx)
    torch.testing.assert_close(c.double(), ref, rtol=1e-5, atol=1e-5)
    # a batch with mixed members equals one-member-at-a-time
    for m in range(sub.n_members):
        rows = (idx == m).nonzero().squeeze(1)
        one = sub.analysis(x[rows], torch.full((rows.numel(),), m))
        torch.testing.assert_close(c[rows], one)


def test_directions_vector_and_complement():
    D = math.prod(SHAPE)
    v = _x(1, seed=2).reshape(1, D)
    sub = Directions(v, SHAPE, complement=True)
    assert sub.n_members == 2 and sub.member_dims() == [1, D - 1] and sub.dim == D
    assert sub.member_labels() == ["span0", "perp0"]
    x = _x(3)
    span = sub.project(x, torch.zeros(3, dtype=torch.int64))
    perp = sub.project(x, torch.ones(3, dtype=torch.int64))
    torch.testing.assert_close(span + perp, x, rtol=1e-12, atol=1e-12)
    u = v / v.norm()
    assert (perp.reshape(3, -1) @ u.T).abs().max() < 1e-10
    # the span coefficient is <x, u>, padded with zeros
    c = sub.analysis(x, torch.zeros(3, dtype=torch.int64))
    torch.testing.assert_close(c[:, 0], (x.reshape(3, -1) @ u.T).squeeze(1))
    assert c[:, 1:].abs().max() == 0
    with pytest.raises(ValueError, match="p=inf"):
        sub.check_p(math.inf, torch.ones(1, dtype=torch.int64))
    sub.check_p(math.inf, torch.zeros(1, dtype=torch.int64))  # span member: fine
    with pytest.raises(ValueError, match="linearly dependent"):
        Directions(torch.cat([v, 2 * v]), SHAPE)


def test_user_basis_validation():
    D = math.prod(SHAPE)
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, 4, generator=g, dtype=torch.float64))
    UserBasis(q, SHAPE)
    UserBasis(q.float(), SHAPE)
    UserBasis(torch.stack([q, -q]), SHAPE)
    with pytest.raises(ValueError, match="orthonormal"):
        UserBasis(q * 1.01, SHAPE)
    with pytest.raises(ValueError, match="orthonormal"):
        UserBasis(torch.cat([q, q[:, :1]], 1), SHAPE)
    with pytest.raises(ValueError, match="shape"):
        UserBasis(q[:-1], SHAPE)
    with pytest.raises(ValueError, match="user"):
        parse_subspaces(UserBasis(q, SHAPE).spec, SHAPE)



def test_user_basis_layouts_give_the_same_members():
    """(D, m), (C, H, W, m), and for one-channel images (H, W, m), with or without a member axis."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(2, 7 * 9, 3, generator=g, dtype=torch.float64))
    ref = UserBasis(q, (7, 9))
    x = torch.randn(2, 1, 7, 9, generator=g, dtype=torch.float64)
    idx = torch.tensor([0, 1])
    for layout in (q.reshape(2, 1, 7, 9, 3), q.reshape(2, 7, 9, 3)):
        for image_shape in ((7, 9), (1, 7, 9)):
            other = UserBasis(layout, image_shape)
            assert other.spec == ref.spec
            torch.testing.assert_close(other.analysis(x, idx), ref.analysis(x, idx), rtol=0, atol=0)
    assert UserBasis(q[0].reshape(7, 9, 3), (7, 9)).n_members == 1
    with pytest.raises(ValueError, match=r"image shape in place of D\), got \(2, 9, 7, 3\)"):
        UserBasis(q.reshape(2, 9, 7, 3), (7, 9))


@pytest.mark.parametrize(
    "spec,cls,n",
    [("full", FullSpace, 1), ("dct:K=4,T=2", DCTDiagonal, 5), ("dct:K=4", DCTDiagonal, 9),
     ("dct-grid:K=5", DCTGrid, 4), ("dct-grid:K=4,T=2", DCTGrid, 25),
     ("random:dim=3,n=2,seed=4", RandomSubspaces, 2), ("random:dim=3", RandomSubspaces, 1)],
)
def test_parse_round_trip(spec, cls, n):
    sub = parse_subspaces(spec, (1, 12, 12))
    assert isinstance(sub, cls) and sub.n_members == n
    again = parse_subspaces(sub.spec, (1, 12, 12))
    assert again.spec == sub.spec and again.n_members == sub.n_members and again.dim == sub.dim
    assert parse_subspaces(spec, (12, 12)).image_shape == (1, 12, 12)


@pytest.mark.parametrize(
    "spec,match",
    [("dct:K=40", "larger than the image"), ("dct:K=4,T=0", "T must be >= 1"), ("dct:T=2", "K"),
     ("dct:K=4,Q=1", "unknown parameter"), ("dct:K=four", "integer"), ("wavelet:K=4", "unknown subspace"),
     ("random:dim=1000", "dim must be in"), ("random:n=3", "dim is required"), ("dct:K", "key=value"),
     ("dct-grid:K=0", "K must be >= 1"), ("random:dim=4,n=0", "n ")],
)
def test_parse_errors(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_subspaces(spec, (1, 12, 12))
    assert spec in str(info.value) or "unknown subspace" in str(info.value)


def test_bad_index_and_shapes():
    sub = DCTDiagonal(SHAPE, K=4, T=2)
    x = _x(3)
    with pytest.raises(ValueError, match="subspace_index is required"):
        sub.analysis(x)
    with pytest.raises(TypeError, match="integer tensor"):
        sub.analysis(x, torch.zeros(3))
    # narrower integer indices are the same members as int64 ones
    idx = torch.tensor([0, 2, 3])
    torch.testing.assert_close(sub.analysis(x, idx.int()), sub.analysis(x, idx), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        sub.analysis(x, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        sub.analysis(x, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="shape"):
        sub.analysis(_x(3, (2, 12, 11)), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="coeffs"):
        sub.synthesis(torch.zeros(3, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="K must be an int"):
        DCTDiagonal(SHAPE, K=4.0)
    with pytest.raises(ValueError, match="image_shape"):
        FullSpace((0, 3, 3))


def _many_member_families():
    """Families whose batches hold (nearly) one member per row: the gathered-basis path."""
    D = math.prod(SHAPE)
    g = torch.Generator().manual_seed(5)
    sets1 = list(torch.randn(30, 1, D, generator=g, dtype=torch.float64))  # one direction per sample
    sets2 = list(torch.randn(30, 2, D, generator=g, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(30, D, 3, generator=g, dtype=torch.float64))
    return [
        Directions(sets1, SHAPE),
        Directions(sets2, SHAPE, complement=True),
        UserBasis(q, SHAPE),
        RandomSubspaces(SHAPE, dim=2, n=30, seed=4),
    ]


@pytest.mark.parametrize("sub", _many_member_families(), ids=lambda s: f"{type(s).__name__}-{s.dim}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_many_members_per_batch_gathered_equals_member_loop(sub, dtype, monkeypatch):
    import pyboundary.subspaces.dense as mod

    n = 40
    g = torch.Generator().manual_seed(8)
    idx = torch.randint(0, sub.n_members, (n,), generator=g)
    idx[:sub.n_members // 2 + 1] = torch.arange(sub.n_members // 2 + 1) * 2 % sub.n_members
    x = _x(n, seed=9, dtype=dtype)
    coeffs = torch.randn(n, sub.dim, generator=g, dtype=torch.float64).to(dtype)
    if isinstance(sub, Directions) and sub.complement:  # projection coordinates live in the member
        coeffs = sub.analysis(x, idx)
    calls = []
    real = mod._per_row_basis
    monkeypatch.setattr(mod, "_per_row_basis", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(mod, "_GATHER_ELEMS", 7 * sub.D * 3)  # several chunks per call
    fast_a, fast_s = sub.analysis(x, idx), sub.synthesis(coeffs, idx)
    assert calls, "the gathered path was not taken"
    monkeypatch.setattr(mod, "_gather_pays", lambda *a: False)
    calls.clear()
    loop_a, loop_s = sub.analysis(x, idx), sub.synthesis(coeffs, idx)
    assert not calls
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(fast_a, loop_a, rtol=tol, atol=tol)
    torch.testing.assert_close(fast_s, loop_s, rtol=tol, atol=tol)
    assert fast_a.dtype == dtype and fast_s.shape == (n,) + SHAPE
    # and the loop itself agrees with one sample at a time for a few rows
    for i in (0, 5, n - 1):
        one = sub.analysis(x[i : i + 1], idx[i : i + 1])
        torch.testing.assert_close(fast_a[i : i + 1], one, rtol=tol, atol=tol)


def test_gather_cost_model_keeps_loop_for_few_dense_members():
    import pyboundary.subspaces.dense as mod

    assert mod._gather_pays(100, 100, 784, 1)  # one direction per sample
    assert not mod._gather_pays(100, 10, 784, 192)  # random:dim=192,n=10 shared by many rows
    assert not mod._gather_pays(100, 1, 784, 1)  # a single member: one matmul already

import pytest
import torch

from pyboundary.zoo.synthetic import T1, T2, random_orthogonal


def test_random_orthogonal_seeded():
    u = random_orthogonal(10, seed=3)
    torch.testing.assert_close(u.T @ u, torch.eye(10, dtype=torch.float64))
    torch.testing.assert_close(u, random_orthogonal(10, seed=3), rtol=0, atol=0)
    assert not torch.allclose(u, random_orthogonal(10, seed=4))


def test_t1_structure():
    ds = T1(eps=0.7, sigma=0.3, D=20, N=4000, seed=1)
    assert ds.x.shape == (4000, 20) and ds.x.dtype == torch.float32
    coords = ds.x.double() @ ds.U  # back to z (up to float32 rounding)
    torch.testing.assert_close(coords, ds.z, atol=1e-5, rtol=1e-5)
    # along u1: exactly eps * sign
    torch.testing.assert_close(ds.x.double() @ ds.u1, 0.7 * ds.sign.double(), atol=1e-5, rtol=0)
    assert set(ds.labels.tolist()) == {0, 1} and torch.equal(ds.labels, (ds.sign + 1) // 2)
    assert abs(ds.sign.double().mean()) < 0.05  # balanced classes
    # complement: zero-mean noise with variance sigma^2 in each direction, independent of the class
    noise = ds.x.double() @ ds.complement
    assert noise.shape == (4000, 19)
    assert noise.mean(0).abs().max() < 0.03
    assert (noise.var(0) - 0.09).abs().max() < 0.015
    for s in (-1, 1):
        assert noise[ds.sign == s].mean(0).abs().max() < 0.04
    assert ds.identity == ds.name and "T1(eps=0.7" in ds.name


def test_t2_structure():
    ds = T2(rho=0.5, eps=0.2, sigma=0.1, K=3, D=12, N=3000, seed=2)
    z = ds.z
    torch.testing.assert_close(z[:, 0], 0.2 * ds.sign.double())
    k_pos = z[ds.sign > 0, 1] / 0.5
    k_neg = z[ds.sign < 0, 1] / 0.5 - 0.5
    for k in (k_pos, k_neg):
        torch.testing.assert_close(k, k.round())  # integer k
        assert set(k.round().long().tolist()) == set(range(-3, 3))
    assert (z[:, 2:].var(0) - 0.01).abs().max() < 0.002
    torch.testing.assert_close(ds.x.double() @ ds.U[:, 1], z[:, 1], atol=1e-5, rtol=0)


def test_seeded_and_shape():
    a = T1(1.0, 0.5, 16, 10, seed=5, shape=(1, 4, 4))
    b = T1(1.0, 0.5, 16, 10, seed=5)
    assert a.x.shape == (10, 1, 4, 4)
    torch.testing.assert_close(a.x.reshape(10, 16), b.x, rtol=0, atol=0)
    assert not torch.equal(T1(1.0, 0.5, 16, 10, seed=6).x, b.x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="eps"):
        T1(0.0, 1.0, 5, 5)
    with pytest.raises(ValueError, match="sigma"):
        T1(1.0, -1.0, 5, 5)
    with pytest.raises(ValueError, match="D must be >= 3"):
        T2(1.0, 1.0, 1.0, 2, 2, 5)
    with pytest.raises(TypeError, match="K must be an int"):
        T2(1.0, 1.0, 1.0, 2.5, 5, 5)
    with pytest.raises(ValueError, match="shape"):
        T1(1.0, 1.0, 10, 5, shape=(3, 3))

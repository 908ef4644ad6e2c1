import numpy as np
import pytest
import scipy.fft
import torch

from pyboundary.geometry.spectral import (
    DCTFlip,
    DCTLowpass,
    band_energy,
    dct_flip,
    dct_lowpass,
    plot_band_energy,
)


def _x(shape=(3, 2, 6, 5), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_flip_twice_is_identity_and_norm_preserving():
    x = _x()
    y = dct_flip(x)
    assert not torch.allclose(y, x)
    torch.testing.assert_close(dct_flip(y), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(y.norm(), x.norm())


def test_flip_matches_scipy_definition():
    x = _x((2, 7, 4))
    c = scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1))
    want = scipy.fft.idctn(c[..., ::-1, ::-1], type=2, norm="ortho", axes=(-2, -1))
    torch.testing.assert_close(dct_flip(x), torch.from_numpy(want.copy()))


def test_flip_moves_constant_image_to_highest_frequency():
    x = torch.ones(1, 4, 4, dtype=torch.float64)
    c = scipy.fft.dctn(dct_flip(x).numpy(), type=2, norm="ortho", axes=(-2, -1))
    assert abs(c[0, 3, 3] - 4.0) < 1e-12
    assert abs(c).sum() - 4.0 < 1e-10


def test_lowpass_is_orthogonal_projection():
    x, z = _x(seed=1), _x(seed=2)
    px = dct_lowpass(x, 3)
    torch.testing.assert_close(dct_lowpass(px, 3), px, rtol=0, atol=1e-12)  # idempotent
    # self-adjoint: <P x, z> == <x, P z>
    torch.testing.assert_close((px * z).sum(), (x * dct_lowpass(z, 3)).sum())
    # keeps exactly the top-left block
    c = scipy.fft.dctn(px.numpy(), type=2, norm="ortho", axes=(-2, -1))
    c_in = scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1))
    assert abs(c[..., 3:, :]).max() < 1e-12 and abs(c[..., :, 3:]).max() < 1e-12
    assert abs(c[..., :3, :3] - c_in[..., :3, :3]).max() < 1e-12
    sq = _x((2, 5, 5), seed=3)
    torch.testing.assert_close(dct_lowpass(sq, 5), sq)  # B = H = W keeps everything


def test_dataset_transform_callables_and_float32():
    x = _x((1, 8, 8)).float()
    torch.testing.assert_close(DCTFlip()(x), dct_flip(x))
    torch.testing.assert_close(DCTLowpass(4)(x), dct_lowpass(x, 4))
    assert DCTFlip()(x).dtype == torch.float32
    assert "B=4" in repr(DCTLowpass(4))


@pytest.mark.parametrize("B", [0, 9, -1])
def test_lowpass_bad_block(B):
    with pytest.raises(ValueError, match="B must be"):
        dct_lowpass(torch.zeros(1, 8, 8), B)


def test_bad_inputs():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        dct_flip([[1.0]])
    with pytest.raises(TypeError, match="floating"):
        dct_flip(torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="H, W"):
        dct_lowpass(torch.zeros(4), 1)
    with pytest.raises(TypeError, match="B must be an int"):
        dct_lowpass(torch.zeros(4, 4), 2.0)


class _BlockFamily:
    """Partition of an 8-dim vector (1, 1, 2, 4) into 4 coordinate pairs (orthonormal members)."""

    n_members = 4
    name = "pairs"

    def analysis(self, x, idx):
        flat = x.flatten(1)
        cols = (2 * idx).unsqueeze(1) + torch.arange(2).unsqueeze(0)
        return flat.gather(1, cols)

    def member_labels(self):
        return ["a", "b", "c", "d"]


def test_band_energy_against_hand_computation():
    d = torch.tensor([[3.0, 4.0, 0, 0, 0, 0, 0, 0], [1.0, 0, 1.0, 0, 1.0, 0, 1.0, 0]]).view(2, 1, 2, 4)
    res = band_energy(d, _BlockFamily(), quantile=50, batch_size=3)
    np.testing.assert_allclose(res.fractions, [[1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_allclose(res.per_band, [0.625, 0.125, 0.125, 0.125])
    np.testing.assert_allclose(res.mean, [0.625, 0.125, 0.125, 0.125])
    assert res.labels == ["a", "b", "c", "d"]
    zero = band_energy(torch.zeros(1, 1, 2, 4), _BlockFamily())
    assert np.isnan(zero.fractions).all()
    with pytest.raises(ValueError, match="quantile"):
        band_energy(d, _BlockFamily(), quantile=120)


def test_band_energy_takes_a_spec_like_scans():
    from pyboundary.subspaces import DCTDiagonal

    d = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(band_energy(d, "dct:K=4,T=1").fractions,
                               band_energy(d, DCTDiagonal((1, 8, 8), K=4, T=1)).fractions)


def test_band_energy_on_dct_grid_sums_to_one():
    from pyboundary import subspaces
    fam = subspaces.DCTGrid((1, 8, 8), 4)
    d = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    res = band_energy(d, fam)
    assert res.fractions.shape == (5, fam.n_members)
    np.testing.assert_allclose(res.fractions.sum(1), 1.0, rtol=1e-5)
    # a perturbation that is one low-frequency DCT basis image sits entirely in band 0
    from pyboundary import ops

    coeff = torch.zeros(1, 1, 8, 8)
    coeff[0, 0, 1, 2] = 1.0
    low = band_energy(ops.idct2(coeff), fam)
    assert low.fractions[0].argmax() == 0 and low.fractions[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_plot_band_energy(tmp_path):
    d = torch.rand(4, 1, 2, 4)
    res = band_energy(d, _BlockFamily())
    plot_band_energy({"a": res, "b": res}, path=tmp_path / "bands.png")
    assert (tmp_path / "bands.png").stat().st_size > 1000

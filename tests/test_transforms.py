import pytest
import scipy.fft
import torch

from pyboundary.transforms import DCTFlip, DCTLowpass, dct_flip, dct_lowpass


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

import numpy as np
import pytest
import scipy.fft
import torch
from torch import nn

from pyboundary import ops
from pyboundary.geometry import masks

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class LowFreqModel(nn.Module):
    """Linear classifier of the 3x3 lowest DCT coefficients of each 8x8 image (ignores the rest)."""

    def __init__(self, k=3, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.k = k
        self.lin = nn.Linear(k * k, classes)

    def forward(self, x):
        c = ops.dct2(x)[:, 0, : self.k, : self.k]
        return self.lin(c.flatten(1)) * 4


def _images(n=256, seed=0):
    # zero-mean noise: every DCT coefficient is N(0, 1), so each of the 9 low ones matters
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_apply_mask_matches_scipy_and_identity():
    x = _images(4).double()
    ones = torch.ones(8, 8, dtype=torch.float64)
    torch.testing.assert_close(masks.apply_mask(x, ones), x)
    m = torch.zeros(8, 8, dtype=torch.float64)
    m[:2, :3] = 1
    coeff = scipy.fft.dctn(x.numpy(), type=2, axes=(-2, -1), norm="ortho") * m.numpy()
    expected = scipy.fft.idctn(coeff, type=2, axes=(-2, -1), norm="ortho")
    np.testing.assert_allclose(masks.apply_mask(x, m).numpy(), expected, atol=1e-12)
    torch.testing.assert_close(masks.apply_mask(x, torch.ones(8, 5, dtype=torch.float64), "fft"), x)
    with pytest.raises(ValueError, match="mask must have shape"):
        masks.apply_mask(x, torch.ones(7, 8))
    with pytest.raises(ValueError, match="basis"):
        masks.apply_mask(x, ones, basis="wavelet")


def test_mask_of_low_frequency_model_sits_on_low_frequencies(tmp_path):
    model = LowFreqModel()
    x = _images()
    res = masks.learn_mask(model, x, lam=0.5, steps=100, lr=0.05, train_batch_size=128, seed=0)
    m = res.mask
    low = m[:3, :3]
    high = m.clone()
    high[:3, :3] = float("nan")
    assert float(low.mean()) > 0.7
    assert float(np.nanmax(high.numpy())) < 0.1
    assert res.accuracy_clean == 1.0  # targets are the model's own predictions
    assert res.accuracy_masked > 0.95
    assert res.accuracy_complement < res.accuracy_masked - 0.2
    assert 0 < res.density < 0.3
    assert res.history[-1] < res.history[0]
    res.plot(tmp_path / "mask.png")
    assert (tmp_path / "mask.png").stat().st_size > 2000
    # the model itself is untouched
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_without_penalty_the_mask_keeps_what_the_model_uses():
    model = LowFreqModel()
    res = masks.learn_mask(model, _images(64), lam=0.0, steps=20)
    assert float(res.mask[:3, :3].min()) > 0.9 and res.accuracy_masked == 1.0


def test_learn_mask_bad_arguments():
    model = LowFreqModel()
    x = _images(8)
    for kw, match in ((dict(lam=-1.0), "lam"), (dict(penalty_exponent=0), "penalty_exponent must"), (dict(steps=0), "steps"),
                      (dict(basis="haar"), "basis"), (dict(lr=0.0), "lr")):
        with pytest.raises(ValueError, match=match):
            masks.learn_mask(model, x, **kw)
    with pytest.raises(ValueError, match="labels must"):
        masks.learn_mask(model, x, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must"):
        masks.learn_mask(model, x[0])


def test_a_mini_batch_over_the_budget_is_accumulated_over_smaller_passes(monkeypatch):
    """When the memory plan allows fewer rows per pass than train_batch_size, each Adam step sums
    the gradients of smaller passes: the same mask and loss history as one pass."""
    from types import SimpleNamespace

    model = LowFreqModel().double()
    x = _images(40).double()
    whole = masks.learn_mask(model, x, lam=0.3, steps=8, train_batch_size=32, seed=1)
    monkeypatch.setattr(masks, "plan_batch_size", lambda *a, **k: SimpleNamespace(batch_size=5))
    parts = masks.learn_mask(model, x, lam=0.3, steps=8, train_batch_size=32, seed=1)
    # the first loss is on the same mini-batch before any update: equal up to summation order; later
    # steps agree only closely (|CE(masked) - CE(clean)| starts at 0, where the order of float sums
    # picks the sign of its subgradient, and Adam normalises such tiny gradients to full steps)
    assert parts.history[0] == pytest.approx(whole.history[0], rel=1e-12)
    torch.testing.assert_close(parts.mask, whole.mask, rtol=0, atol=0.03)
    np.testing.assert_allclose(parts.history, whole.history, rtol=0.03)

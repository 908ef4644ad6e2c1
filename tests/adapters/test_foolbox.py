"""pyboundary.adapters.foolbox: real foolbox 3 attacks, checked the way foolbox checks its own
(accuracy drops, perturbations within the epsilons, bounds kept, success = criterion), and equal
to pyboundary.deepfool on the same inputs."""

import functools
import importlib
import math
import sys

import pytest
import torch

fb = pytest.importorskip("foolbox")  # a peer library (base dependency of the test setup)
ep = pytest.importorskip("eagerpy")

import pyboundary as pb  # noqa: E402
from pyboundary.adapters import foolbox as pbfb  # noqa: E402
from digits_models import digits, digits_mlp, one_thread_module  # noqa: E402,F401

ATTACKS = [(pbfb.L2DeepFoolAttack, 2, fb.distances.l2), (pbfb.LinfDeepFoolAttack, math.inf, fb.distances.linf)]
MEAN, STD = 0.3, 0.4


@pytest.fixture(scope="module")
def setup():
    """A digits MLP behind foolbox's preprocessing (the net sees (x - MEAN) / STD), 64 test images."""
    net = digits_mlp(seed=0)
    ds = digits("test")
    x, y = ds.x[:64], ds.labels[:64]

    class Normalised(torch.nn.Module):  # what the foolbox model computes, as a plain torch model
        def forward(self, t):
            return net((t - MEAN) / STD)

    # the net was trained on raw [0, 1] inputs; behind the preprocessing it is another
    # classifier (still ~90 % accurate), on which foolbox and pyboundary must agree
    fmodel = fb.PyTorchModel(net, bounds=(0, 1), preprocessing=dict(mean=MEAN, std=STD))
    return net, Normalised().eval(), fmodel, x, y


def _accuracy(fmodel, x, labels):
    return fb.utils.accuracy(fmodel, x, labels)


@pytest.mark.parametrize("attack_cls, p, dist", ATTACKS)
def test_is_a_foolbox_minimization_attack(attack_cls, p, dist):
    attack = attack_cls()
    assert isinstance(attack, fb.attacks.base.MinimizationAttack)
    assert attack.distance is dist
    # foolbox's own argument names and defaults
    ref = (fb.attacks.L2DeepFoolAttack if p == 2 else fb.attacks.LinfDeepFoolAttack)()
    for name in ("steps", "candidates", "overshoot", "loss"):
        assert getattr(attack, name) == getattr(ref, name)


@pytest.mark.parametrize("attack_cls, p, dist", ATTACKS)
def test_untargeted_like_foolbox_checks(setup, attack_cls, p, dist):
    net, normalised, fmodel, x, y = setup
    attack = attack_cls(steps=50, candidates=10, overshoot=0.02)
    epsilons = [None, 0.05, 0.3, 1.0] if p == 2 else [None, 0.01, 0.05, 0.2]
    raw, clipped, success = attack(fmodel, x, fb.criteria.Misclassification(y), epsilons=epsilons)
    assert isinstance(raw, list) and isinstance(raw[0], torch.Tensor) and success.shape == (4, 64)
    clean = _accuracy(fmodel, x, y)
    assert clean > 0.8
    # every input the engine flips is adversarial at epsilon None; accuracy drops to 0
    assert _accuracy(fmodel, raw[0], y) == 0.0 < clean
    assert bool(success[0].all())
    for k, eps in enumerate(epsilons):
        assert float(raw[k].min()) >= 0.0 and float(raw[k].max()) <= 1.0  # bounds kept
        if eps is not None:
            assert bool((dist(x, clipped[k]) <= eps + 1e-6).all())
        # success is foolbox's criterion evaluated at the clipped points
        pred = fmodel(clipped[k]).argmax(1)
        assert torch.equal(success[k], pred != y)
    # success grows with epsilon (more budget, more adversarials), strictly across the range
    rates = success.float().mean(1)
    assert bool((rates[2:] >= rates[1:-1]).all()) and rates[1] < rates[3]


@pytest.mark.parametrize("attack_cls, p, dist", ATTACKS)
def test_equals_pyboundary_deepfool(setup, attack_cls, p, dist):
    net, normalised, fmodel, x, y = setup
    raw, _, _ = attack_cls()(fmodel, x, fb.criteria.Misclassification(y), epsilons=None)
    res = pb.deepfool(normalised, x, labels=y, p=p, clamp=(0.0, 1.0), candidates=10, overshoot=0.02, max_iter=50)
    assert torch.equal(raw, (x + res.perturbation).clamp(0, 1))
    # the perturbation norms are the engine's margins (to float rounding of x + delta - x)
    conv = res.converged & ~res.misclassified
    norms = dist(x, raw)
    torch.testing.assert_close(norms[conv], res.margin[conv], rtol=1e-5, atol=1e-6)
    # options under foolbox's names and deepfool_kwargs reach the engine
    attack = attack_cls(steps=1, candidates=3, overshoot=0.1, deepfool_kwargs={"refine": False})
    raw, _, _ = attack(fmodel, x, fb.criteria.Misclassification(y), epsilons=None)
    res = pb.deepfool(normalised, x, labels=y, p=p, clamp=(0.0, 1.0), candidates=3, overshoot=0.1,
                      max_iter=1, refine=False)
    assert torch.equal(raw, (x + res.perturbation).clamp(0, 1))
    assert not bool(res.converged.all())  # 1 step leaves some unflipped: they come back unchanged
    assert torch.equal(raw[~res.converged], x[~res.converged])


def test_candidates_none_and_crossentropy_loss(setup):
    net, normalised, fmodel, x, y = setup
    crit = fb.criteria.Misclassification(y)
    a, _, _ = pbfb.L2DeepFoolAttack(candidates=None)(fmodel, x, crit, epsilons=None)
    res = pb.deepfool(normalised, x, labels=y, clamp=(0.0, 1.0), candidates=10)  # 10 = all classes
    assert torch.equal(a, (x + res.perturbation).clamp(0, 1))
    b, _, _ = pbfb.L2DeepFoolAttack(loss="crossentropy")(fmodel, x, crit, epsilons=None)
    assert torch.equal(a, b)  # the cross-entropy gap is the logit gap


@pytest.mark.parametrize("attack_cls, p, dist", ATTACKS)
def test_targeted(setup, attack_cls, p, dist):
    net, normalised, fmodel, x, y = setup
    pred = fmodel(x).argmax(1)
    target = (pred + 3) % 10
    target[:5] = pred[:5]  # already classified as the target: must come back unchanged
    crit = fb.criteria.TargetedMisclassification(target)
    raw, clipped, success = attack_cls()(fmodel, x, crit, epsilons=[None, 1e-3])
    # foolbox's targeted check: accuracy w.r.t. the targets rises
    assert _accuracy(fmodel, raw[0], target) == 1.0 > _accuracy(fmodel, x, target)
    assert bool(success[0].all())
    assert torch.equal(raw[0][:5], x[:5])
    assert float(raw[0].min()) >= 0 and float(raw[0].max()) <= 1
    res = pb.deepfool(normalised, x[5:], target=target[5:], p=p, clamp=(0.0, 1.0))
    assert torch.equal(raw[0][5:], (x[5:] + res.perturbation).clamp(0, 1))
    # a tiny epsilon succeeds only where nothing had to move
    assert torch.equal(success[1], dist(x, raw[0]) <= 1e-3)


def test_eagerpy_in_eagerpy_out_and_misclassified_unchanged(setup):
    net, normalised, fmodel, x, y = setup
    wrong = (fmodel(x).argmax(1) + 1) % 10  # labels the model gets "wrong" everywhere
    raw, clipped, success = pbfb.L2DeepFoolAttack()(fmodel, ep.astensor(x), ep.astensor(wrong), epsilons=0.5)
    assert isinstance(raw, ep.PyTorchTensor) and isinstance(success, ep.PyTorchTensor)
    assert torch.equal(raw.raw, x) and bool(success.raw.all())


def test_bounds_through_the_box():
    """A model with bounds (0, 255): the clamp is the model's bounds, the search runs in them."""
    net = digits_mlp(seed=0)
    x, y = digits("test").x[:32] * 255, digits("test").labels[:32]
    fmodel = fb.PyTorchModel(net, bounds=(0, 255), preprocessing=dict(mean=0.0, std=255.0))
    raw, clipped, success = pbfb.LinfDeepFoolAttack()(fmodel, x, y, epsilons=[None, 255 * 0.05])
    assert float(raw[0].min()) >= 0 and float(raw[0].max()) <= 255
    assert fb.utils.accuracy(fmodel, raw[0], y) == 0.0
    scaled = lambda t: net(t / 255.0)  # noqa: E731
    res = pb.deepfool(scaled, x, labels=y, p=math.inf, clamp=(0.0, 255.0))
    assert torch.equal(raw[0], (x + res.perturbation).clamp(0, 255))
    # without the box, inputs at the pixel limits move outside: the box is active here
    free = pb.deepfool(scaled, x, labels=y, p=math.inf)
    assert float((x + free.perturbation).min()) < 0 or float((x + free.perturbation).max()) > 255
    # run directly (foolbox's __call__ asserts the bounds first) refuses inputs outside them
    with pytest.raises(ValueError, match=r"bounds \[0, 255\]"):
        pbfb.LinfDeepFoolAttack().run(fmodel, x + 300, fb.criteria.Misclassification(y))


def test_refusals(setup):
    net, normalised, fmodel, x, y = setup
    bad_loss = pbfb.L2DeepFoolAttack(loss="hinge")  # accepted here and refused by run, as in foolbox
    with pytest.raises(ValueError, match="expected loss to be 'logits' or 'crossentropy', got 'hinge'"):
        bad_loss(fmodel, x, y, epsilons=None)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        pbfb.L2DeepFoolAttack(steps=0)
    with pytest.raises(TypeError, match="steps must be an int"):
        pbfb.L2DeepFoolAttack(steps=2.0)
    with pytest.raises(ValueError, match="candidates"):
        pbfb.L2DeepFoolAttack(candidates=1)
    with pytest.raises(TypeError, match=r"\['clamp'\] are set by the attack"):
        pbfb.L2DeepFoolAttack(deepfool_kwargs={"clamp": (0, 1)})
    with pytest.raises(TypeError, match=r"pass them as \{'max_iter': 'steps'\}"):
        pbfb.L2DeepFoolAttack(deepfool_kwargs={"max_iter": 3})
    with pytest.raises(TypeError, match="unknown engine option") as err:
        pbfb.L2DeepFoolAttack(deepfool_kwargs={"stepsize": 3})
    assert "_calls" not in str(err.value) and "'refine'" in str(err.value)  # private arguments are not options
    with pytest.raises(TypeError, match="unknown engine option"):
        pbfb.L2DeepFoolAttack(deepfool_kwargs={"_calls": None})

    class Custom(fb.criteria.Criterion):
        def __call__(self, perturbed, outputs):
            return outputs.argmax(axis=-1) == 0

        def __repr__(self):
            return "Custom()"

    with pytest.raises(TypeError, match="Misclassification and TargetedMisclassification"):
        pbfb.L2DeepFoolAttack()(fmodel, x, Custom(), epsilons=None)
    with pytest.raises(ValueError, match=r"shape \(64,\)"):
        pbfb.L2DeepFoolAttack()(fmodel, x, y[:10], epsilons=None)
    with pytest.raises(TypeError, match="unexpected keyword"):
        pbfb.L2DeepFoolAttack().run(fmodel, x, y, steps=3)
    with pytest.raises(TypeError, match="PyTorch"):
        pbfb.L2DeepFoolAttack().run(fmodel, x.numpy(), y.numpy())


def test_model_left_as_found(setup):
    net, normalised, fmodel, x, y = setup
    flags = [p.requires_grad for p in net.parameters()]
    pbfb.L2DeepFoolAttack()(fmodel, x, y, epsilons=None)
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    assert not net.training


def test_missing_foolbox_gives_a_clear_message(monkeypatch):
    monkeypatch.delitem(sys.modules, "pyboundary.adapters.foolbox")
    monkeypatch.setitem(sys.modules, "foolbox", None)
    monkeypatch.setitem(sys.modules, "foolbox.attacks.base", None)
    with pytest.raises(ImportError, match=r"needs foolbox 3 \(pip install 'foolbox>=3.3'\)"):
        importlib.import_module("pyboundary.adapters.foolbox")
    import pyboundary.adapters  # the package itself imports no peer library  # noqa: F401


def test_another_engine_mode_is_a_subclass(setup):
    """How the tight minimal-perturbation attacks plug in (issue 11): a subclass that fixes engine
    options (``_engine_mode``) or swaps the engine function (``_engine``, same signature)."""
    net, normalised, fmodel, x, y = setup
    calls = []

    @functools.wraps(pb.deepfool)
    def engine(*args, **kwargs):
        calls.append(kwargs)
        return pb.deepfool(*args, **kwargs)

    class Unrefined(pbfb.L2DeepFoolAttack):
        _engine_mode = {"refine": False}
        _engine = staticmethod(engine)

    raw, _, _ = Unrefined()(fmodel, x, y, epsilons=None)
    assert len(calls) == 1 and calls[0]["refine"] is False and calls[0]["clamp"] == (0.0, 1.0)
    res = pb.deepfool(normalised, x, labels=y, clamp=(0.0, 1.0), refine=False)
    assert torch.equal(raw, (x + res.perturbation).clamp(0, 1))
    with pytest.raises(TypeError, match="unknown engine option"):  # options checked against that engine
        Unrefined(deepfool_kwargs={"nope": 1})


MINIMAL = [(pbfb.L2MinimalAttack, pbfb.L2DeepFoolAttack, 2, fb.distances.l2),
           (pbfb.LinfMinimalAttack, pbfb.LinfDeepFoolAttack, math.inf, fb.distances.linf)]


@pytest.mark.parametrize("minimal_cls, deepfool_cls, p, dist", MINIMAL)
def test_minimal_attack_is_the_tight_engine_and_never_farther(setup, minimal_cls, deepfool_cls, p, dist):
    net, normalised, fmodel, x, y = setup
    attack = minimal_cls(tight_steps=8)
    assert isinstance(attack, fb.attacks.base.MinimizationAttack) and attack.distance is dist
    assert "tight_steps=8" in repr(attack)
    raw, clipped, success = attack(fmodel, x, fb.criteria.Misclassification(y), epsilons=[None])
    res = pb.deepfool(normalised, x, labels=y, p=p, clamp=(0.0, 1.0), tight=True, tight_steps=8)
    assert res.tight and torch.equal(raw[0], (x + res.perturbation).clamp(0, 1))
    # every point is adversarial, in the bounds, and per input never farther than DeepFool's
    assert bool(success[0].all()) and float(raw[0].min()) >= 0 and float(raw[0].max()) <= 1
    plain, _, _ = deepfool_cls()(fmodel, x, fb.criteria.Misclassification(y), epsilons=None)
    d_min, d_plain = dist(x, raw[0]), dist(x, plain)
    assert bool((d_min <= d_plain * (1 + 1e-5) + 1e-7).all())
    assert float(d_min.median()) < float(d_plain.median())  # and nearer on typical inputs


def test_minimal_attack_refusals():
    with pytest.raises(TypeError, match="'tight' is set by the attack itself"):
        pbfb.L2MinimalAttack(deepfool_kwargs={"tight": False})
    with pytest.raises(TypeError, match="tight_steps given twice"):
        pbfb.LinfMinimalAttack(tight_steps=4, deepfool_kwargs={"tight_steps": 8})
    with pytest.raises(ValueError, match="tight_steps"):
        pbfb.L2MinimalAttack(tight_steps=0)

"""The peer libraries' own checks of their DeepFool attacks, and of what every attack of theirs
must do, run against our drop-ins (written anew in our style; the checks, not their code).

foolbox 3.3 (bethgelab/foolbox, tests/):
* test_attacks.py::test_untargeted_attacks, its DeepFool entries (L2DeepFoolAttack(steps=50) with
  loss 'logits' and 'crossentropy', LinfDeepFoolAttack(steps=50)), on conftest.py's PyTorch models
  for attacks: pytorch_simple_model_default and _default_flip (the channel means of 8 of foolbox's
  sample images, bounds (0, 1), preprocessing flip_axis=-3), after transform_bounds((0, 1)): the
  accuracy drops. Here the samples are its CIFAR-10 ones (32x32; the PyTorch fixtures take its
  224x224 ImageNet ones, the other backends' simple models CIFAR-10), to keep the file fast. Our
  tight-mode attacks go through the same checks.
* test_attacks.py::test_targeted_attacks (foolbox lists no DeepFool there; ours are targeted too):
  more inputs reach their targets (y + 1) % L after the attack than before.
* test_attacks_base.py::test_call_one_epsilon (one float epsilon: tensors back, not lists, also
  through .repeat(3)) and ::test_model_bounds (run on inputs outside the bounds: AssertionError).
* test_attacks_raise.py::test_deepfool_run_raises (a bad loss is accepted by the constructor, run
  raises ValueError 'expected loss to') and ::test_targeted_attacks_call_raises_exception (target
  classes of the wrong length and an unsupported criterion: ValueError).

torchattacks 3.5.1 (Harry24k/adversarial-attacks-pytorch, code_coverage/test_atks.py::
test_atks_on_cifar10, DeepFool's entry): constructed with the model alone, called under
torch.no_grad() with torch.enable_grad() around the attack, then in set_mode_targeted_random; the
robust accuracy never exceeds the clean one. Their suite has no other DeepFool test; the checks
after it cover the base-class machinery their users rely on (Attack.save / Attack.load,
MultiAttack and its save, settings that MultiAttack passes on, a model without parameters,
attributes read at each call).
"""

import pytest
import torch

from digits_models import digits, digits_mlp, one_thread_module  # noqa: F401


# ---------------------------------------------------------------------------------------- foolbox


def _foolbox():
    fb = pytest.importorskip("foolbox")
    ep = pytest.importorskip("eagerpy")
    from pyboundary.adapters import foolbox as pbfb
    return fb, ep, pbfb


class _ChannelMeans(torch.nn.Module):
    """foolbox's simple test model: (N, 3, H, W) -> the 3 channel means as logits."""

    def forward(self, t):
        return t.mean(3).mean(2)


@pytest.fixture(scope="module", params=["default", "flip"])
def simple_fmodel(request):
    """(fmodel, x, y) as foolbox's conftest builds them: 8 of its samples, labels = the
    model's own predictions, as eagerpy tensors; 'flip' reverses the channels in preprocessing."""
    fb, ep, _ = _foolbox()
    preprocessing = dict(flip_axis=-3) if request.param == "flip" else None
    fmodel = fb.PyTorchModel(_ChannelMeans().eval(), bounds=(0, 1), preprocessing=preprocessing)
    x, _ = fb.samples(fmodel, dataset="cifar10", batchsize=8)
    x = ep.astensor(x)
    return fmodel, x, fmodel(x).argmax(axis=-1)


def _attacks(pbfb):
    return [pbfb.L2DeepFoolAttack(steps=50, loss="logits"), pbfb.L2DeepFoolAttack(steps=50, loss="crossentropy"),
            pbfb.LinfDeepFoolAttack(steps=50), pbfb.L2MinimalAttack(tight_steps=4),
            pbfb.LinfMinimalAttack(tight_steps=4)]


ATTACK_IDS = ["L2-logits", "L2-crossentropy", "Linf", "L2Minimal", "LinfMinimal"]


@pytest.mark.parametrize("k", range(len(ATTACK_IDS)), ids=ATTACK_IDS)
def test_foolbox_untargeted_attacks(simple_fmodel, k):
    fb, ep, pbfb = _foolbox()
    fmodel, x, y = simple_fmodel
    x = (x - fmodel.bounds.lower) / (fmodel.bounds.upper - fmodel.bounds.lower)
    fmodel = fmodel.transform_bounds((0, 1))
    clean = fb.accuracy(fmodel, x, y)
    assert clean > 0
    advs, _, success = _attacks(pbfb)[k](fmodel, x, y, epsilons=None)
    assert isinstance(advs, ep.PyTorchTensor) and advs.shape == x.shape
    assert fb.accuracy(fmodel, advs, y) < clean
    assert bool(success.raw.all())  # stronger than foolbox asks: every input flipped


@pytest.mark.parametrize("k", range(len(ATTACK_IDS)), ids=ATTACK_IDS)
def test_foolbox_targeted_attacks(simple_fmodel, k):
    fb, ep, pbfb = _foolbox()
    fmodel, x, y = simple_fmodel
    fmodel = fmodel.transform_bounds((0, 1))
    n_classes = fmodel(x).shape[-1]
    criterion = fb.TargetedMisclassification((y + 1) % n_classes)
    before = criterion(x, fmodel(x))
    assert not bool(before.raw.all())
    advs, _, _ = _attacks(pbfb)[k](fmodel, x, criterion, epsilons=None)
    after = criterion(advs, fmodel(advs))
    assert after.sum().item() > before.sum().item()
    assert bool(after.raw.all())  # stronger than foolbox asks: every target reached


def test_foolbox_call_one_epsilon_and_repeat(simple_fmodel):
    fb, ep, pbfb = _foolbox()
    fmodel, x, y = simple_fmodel
    for attack in (pbfb.L2DeepFoolAttack(), pbfb.LinfDeepFoolAttack().repeat(3)):
        raw, clipped, success = attack(fmodel, x, y, epsilons=1.0)
        assert all(ep.istensor(t) for t in (raw, clipped, success))
        assert raw.shape == x.shape and clipped.shape == x.shape and success.shape == (len(x),)


def test_foolbox_model_bounds(simple_fmodel):
    """Inputs outside the bounds: AssertionError from run, as foolbox's attacks (ours is also a
    ValueError with a message); foolbox's __call__ asserts the bounds before run."""
    fb, ep, pbfb = _foolbox()
    fmodel, x, y = simple_fmodel
    attack = pbfb.L2DeepFoolAttack()
    with pytest.raises(AssertionError):
        attack.run(fmodel, x * 0.0 - 0.1, y)
    with pytest.raises(AssertionError, match=r"bounds \[0, 1\]"):
        attack.run(fmodel, x * 0.0 + 1.1, y)
    with pytest.raises(ValueError, match=r"bounds \[0, 1\]"):
        attack.run(fmodel, x * 0.0 + 1.1, y)
    with pytest.raises(AssertionError):
        attack(fmodel, x * 0.0 + 1.1, y, epsilons=None)


def test_foolbox_deepfool_run_raises(simple_fmodel):
    fb, ep, pbfb = _foolbox()
    fmodel, x, y = simple_fmodel
    for attack_cls in (pbfb.L2DeepFoolAttack, pbfb.LinfMinimalAttack):
        attack = attack_cls(loss="invalid")  # the constructor takes it, as foolbox's does
        with pytest.raises(ValueError, match="expected loss to"):
            attack.run(fmodel, x, y)


def test_foolbox_criterion_raises(simple_fmodel):
    fb, ep, pbfb = _foolbox()
    fmodel, x, y = simple_fmodel
    n_classes = fmodel(x).shape[-1]
    targets = (y + 1) % n_classes

    class Dummy(fb.Criterion):
        def __repr__(self):
            return "Dummy()"

        def __call__(self, perturbed, outputs):
            return perturbed

    for attack in (pbfb.L2DeepFoolAttack(), pbfb.L2MinimalAttack()):
        with pytest.raises(ValueError):
            attack(fmodel, x, fb.TargetedMisclassification(ep.concatenate((targets, targets), 0)),
                   epsilons=1000.0)
        with pytest.raises(ValueError):
            attack(fmodel, x, Dummy(), epsilons=1000.0)
        with pytest.raises(TypeError, match="Misclassification and TargetedMisclassification"):
            attack(fmodel, x, Dummy(), epsilons=1000.0)  # and our own type: a TypeError too


def test_foolbox_attributes_are_read_when_the_attack_runs(simple_fmodel):
    """foolbox's attacks keep their options as attributes and read them in run."""
    fb, ep, pbfb = _foolbox()
    fmodel, x, y = simple_fmodel
    attack = pbfb.L2DeepFoolAttack(deepfool_kwargs={"refine": False})
    attack.overshoot = 0.5
    want = pbfb.L2DeepFoolAttack(overshoot=0.5, deepfool_kwargs={"refine": False}).run(fmodel, x, y)
    assert torch.equal(attack.run(fmodel, x, y).raw, want.raw)
    assert not torch.equal(pbfb.L2DeepFoolAttack(deepfool_kwargs={"refine": False}).run(fmodel, x, y).raw,
                           want.raw)
    attack.steps = 0
    with pytest.raises(ValueError, match="steps must be >= 1"):
        attack.run(fmodel, x, y)
    minimal = pbfb.L2MinimalAttack()
    minimal.tight_steps = 0
    with pytest.raises(ValueError, match="tight_steps"):
        minimal.run(fmodel, x, y)


# ------------------------------------------------------------------------------------ torchattacks


@pytest.fixture(scope="module")
def ta_setup():
    torchattacks = pytest.importorskip("torchattacks")
    from pyboundary.adapters.torchattacks import DeepFool
    net = digits_mlp(seed=0)
    ds = digits("test")
    return torchattacks, DeepFool, net, ds.x[:16], ds.labels[:16]


def _accuracy(net, images, labels):
    with torch.no_grad():
        return float((net(images).argmax(1) == labels).float().mean())


@torch.no_grad()
def test_torchattacks_atks_on_images(ta_setup):
    torchattacks, DeepFool, net, x, y = ta_setup
    clean = _accuracy(net, x, y)
    atk = DeepFool(net)  # the model alone, as their suite constructs every attack
    with torch.enable_grad():
        adv = atk(x, y)
    assert _accuracy(net, adv, y) <= clean
    assert _accuracy(net, adv, y) == 0.0  # stronger than torchattacks asks: every image flipped
    assert "targeted" in atk.supported_mode
    atk.set_mode_targeted_random(quiet=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        target = atk.get_random_target_label(x, y)
        torch.manual_seed(0)
        with torch.enable_grad():
            adv = atk(x, y)
    assert _accuracy(net, adv, y) <= clean
    assert torch.equal(net(adv).argmax(1), target)  # stronger: every image at its random target


def test_torchattacks_least_likely_mode(ta_setup):
    torchattacks, DeepFool, net, x, y = ta_setup
    atk = DeepFool(net)
    atk.set_mode_targeted_least_likely(quiet=True)
    target = net(x).argmin(1)  # kth_min=1 among the classes other than the label
    assert bool((target != y).all())
    assert torch.equal(net(atk(x, y)).argmax(1), target)


def test_torchattacks_save_and_load(ta_setup, tmp_path):
    torchattacks, DeepFool, net, x, y = ta_setup
    atk = DeepFool(net)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    path = tmp_path / "adv.pt"
    rob_acc, l2, _ = atk.save(loader, save_path=str(path), verbose=False, return_verbose=True,
                              save_predictions=True, save_clean_inputs=True)
    adv = torch.cat([atk(images, labels) for images, labels in loader])  # save's batches
    assert rob_acc == 0.0
    # torchattacks' L2: the mean over the images misclassified after the attack (here all of them)
    assert l2 == pytest.approx(float((adv - x).flatten(1).norm(dim=1).mean()), rel=1e-5)
    saved_adv, labels, preds, clean = next(iter(_load_all(torchattacks, path, len(x))))
    assert torch.equal(saved_adv, adv) and torch.equal(labels, y) and torch.equal(clean, x)
    assert torch.equal(preds, net(adv).argmax(1))
    atk.save(loader, save_path=str(path), verbose=False, save_type="int")
    saved_adv, _ = next(iter(torchattacks.attack.Attack.load(str(path), batch_size=len(x))))
    assert (saved_adv - adv).abs().max() <= 1 / 255 + 1e-6


def _load_all(torchattacks, path, batch_size):
    """Attack.load of everything save stored: (adv_inputs, labels, preds, clean_inputs) batches."""
    return torchattacks.attack.Attack.load(str(path), batch_size=batch_size, load_predictions=True,
                                           load_clean_inputs=True)


def test_torchattacks_multiattack(ta_setup):
    torchattacks, DeepFool, net, x, y = ta_setup
    fgsm, ours = torchattacks.FGSM(net, eps=0.05), DeepFool(net)
    multi = torchattacks.MultiAttack([fgsm, ours])
    adv = multi(x, y)
    assert _accuracy(net, adv, y) == 0.0
    first = fgsm(x, y)
    by_fgsm = net(first).argmax(1) != y
    assert 0 < int(by_fgsm.sum()) < len(x)  # both attacks take part
    assert torch.equal(adv[by_fgsm], first[by_fgsm])
    assert torch.equal(adv[~by_fgsm], ours(x[~by_fgsm], y[~by_fgsm]))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    rob_acc, success_rates, _, _ = multi.save(loader, verbose=False, return_verbose=True)
    assert rob_acc == 0.0 and len(success_rates) == 2 and success_rates[-1] == pytest.approx(100.0)


def test_torchattacks_settings_passed_on_by_multiattack(ta_setup):
    """MultiAttack passes set_normalization_used (and the modes) on to its attacks: ours then
    works on the [0, 1] images behind the normalised ones."""
    torchattacks, DeepFool, net, x, y = ta_setup
    mean, std = [0.25], [0.5]
    ours = DeepFool(net)
    multi = torchattacks.MultiAttack([torchattacks.FGSM(net, eps=0.0), ours])
    multi.set_normalization_used(mean=mean, std=std)
    assert ours.normalization_used is not None
    adv_n = multi((x - 0.25) / 0.5, y)
    assert _accuracy(net, adv_n, y) == 0.0
    alone = DeepFool(net)
    alone.set_normalization_used(mean=mean, std=std)
    torch.testing.assert_close(adv_n, alone((x - 0.25) / 0.5, y), rtol=0, atol=1e-6)


def test_torchattacks_model_without_parameters(ta_setup, capsys):
    torchattacks, DeepFool, net, x, y = ta_setup

    class Wrapped(torch.nn.Module):  # no parameters of its own: torchattacks cannot find a device
        def __init__(self):
            super().__init__()
            self.__dict__["inner"] = net  # not registered as a submodule

        def forward(self, t):
            return self.inner(t)

    atk = DeepFool(Wrapped())
    assert atk.device is None and "set_device" in capsys.readouterr().out
    assert _accuracy(net, atk(x, y), y) == 0.0
    atk.set_device(torch.device("cpu"))
    assert _accuracy(net, atk(x, y), y) == 0.0


def test_torchattacks_attributes_are_read_at_each_call(ta_setup):
    torchattacks, DeepFool, net, x, y = ta_setup
    atk = DeepFool(net)
    atk.steps, atk.overshoot = 1, 0.3
    assert "steps=1" in repr(atk)
    options = {"refine": False}
    atk.deepfool_kwargs = options
    assert torch.equal(atk(x, y), DeepFool(net, steps=1, overshoot=0.3, deepfool_kwargs=options)(x, y))
    atk.p = float("inf")
    assert torch.equal(atk(x, y), DeepFool(net, steps=1, overshoot=0.3, p="inf", deepfool_kwargs=options)(x, y))
    atk.steps = 0
    with pytest.raises(ValueError, match="steps must be >= 1"):
        atk(x, y)

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyboundary.attacks import pgd as adv

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _mlp(seed=0, d=12, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, classes))


def _data(n=32, shape=(1, 3, 4), seed=1, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_ball_and_box_and_raises_loss(norm):
    p = {"linf": float("inf"), "l2": 2}[norm]
    model = _mlp()
    x, y = _data()
    eps = 0.1 if norm == "linf" else 0.5
    x_adv = adv.pgd(model, x, y, eps=eps, p=p, steps=10, seed=0)
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-5)
    assert float(size.max()) > 0.5 * eps  # it moved
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    model.eval()
    with torch.no_grad():
        l0 = F.cross_entropy(model(x), y, reduction="none")
        l1 = F.cross_entropy(model(x_adv), y, reduction="none")
        # a random start alone (steps with step_size ~ 0) as the baseline
        x_rnd = adv.pgd(model, x, y, eps=eps, p=p, steps=1, step_size=1e-12, seed=0)
        l_rnd = F.cross_entropy(model(x_rnd), y, reduction="none")
    assert bool((l1 >= l0 - 1e-6).all())
    assert float((l1 - l0).mean()) > 5 * abs(float((l_rnd - l0).mean()))


@pytest.mark.parametrize("p", [float("inf"), 2.0])
def test_pgd_in_batches_gives_the_numbers_of_one_batch(p):
    """batch_size cuts the samples into chunks (each runs every step; the memory of one step is
    planned from a probe when None): samples are independent, so nothing changes."""
    model = _mlp().double()
    x, y = _data(n=11)
    x = x.double()
    whole = adv.pgd(model, x, y, eps=0.1, p=p, steps=5, seed=3)
    torch.testing.assert_close(adv.pgd(model, x, y, eps=0.1, p=p, steps=5, seed=3, batch_size=4), whole)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        adv.pgd(model, x, y, eps=0.1, batch_size=0)


def test_pgd_linf_solves_linear_model_exactly():
    # two-class linear model: the L-inf maximiser of the loss is x - eps * sign(w) for label 0
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.zero_()
    x = torch.full((4, 3), 0.5)
    y = torch.zeros(4, dtype=torch.int64)
    x_adv = adv.pgd(lin, x, y, eps=0.2, steps=5, clamp=None, random_start=False)
    expected = x - 0.2 * torch.sign(w[0])
    torch.testing.assert_close(x_adv, expected.expand_as(x_adv))
    x_t = adv.pgd(lin, x, y, eps=0.2, steps=5, clamp=None, random_start=False, targeted=True)
    torch.testing.assert_close(x_t, (x + 0.2 * torch.sign(w[0])).expand_as(x_t))


def test_pgd_l2_solves_linear_model_exactly():
    # L2 maximiser of the loss of label 0 for logits (w.x, 0): x - eps * w / ||w||
    w = torch.tensor([[3.0, -4.0, 0.0], [0.0, 0.0, 0.0]])
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.zero_()
    x = torch.full((2, 3), 0.5)
    y = torch.zeros(2, dtype=torch.int64)
    x_adv = adv.pgd(lin, x, y, eps=0.5, p=2, steps=4, clamp=None, random_start=False)
    expected = x - 0.5 * w[0] / 5.0
    torch.testing.assert_close(x_adv, expected.expand_as(x_adv), rtol=0, atol=1e-5)


def test_pgd_leaves_model_unchanged_and_is_seeded():
    model = _mlp()
    model.train()
    x, y = _data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = adv.pgd(model, x, y, eps=0.1, steps=3, seed=5)
    b = adv.pgd(model, x, y, eps=0.1, steps=3, seed=5)
    assert torch.equal(a, b)  # seeded start, eval mode inside (dropout off)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert torch.equal(adv.pgd(model, x, y, eps=0.0, steps=3), x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=-0.1), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(eps=0.1, steps=0), "steps"),
        (dict(eps=0.1, p=1), "p must be 2 or inf"),
        (dict(eps=0.1, step_size=-1.0), "step_size"),
        (dict(eps=0.1, clamp=(1.0, 0.0)), "clamp"),
    ],
)
def test_pgd_bad_arguments(kwargs, match):
    x, y = _data()
    with pytest.raises(ValueError, match=match):
        adv.pgd(_mlp(), x, y, **kwargs)


def test_pgd_refuses_inputs_outside_its_box():
    """Normalised inputs with the default box (0, 1): the projection would move x by far more
    than eps, so pgd and the training transform refuse them; clamp=None attacks them in the ball."""
    model = _mlp()
    x, y = _data()
    xn = (x - 0.5) / 0.25
    with pytest.raises(ValueError, match=r"x must lie inside the clamp box \[0, 1\]"):
        adv.pgd(model, xn, y, eps=0.05, steps=2)
    with pytest.raises(ValueError, match="clamp box"):
        adv.pgd_batch_transform(0.05, 2, frac=1.0)(model, xn, y)
    out = adv.pgd(model, xn, y, eps=0.05, steps=2, clamp=None, seed=0)
    assert float((out - xn).abs().max()) <= 0.05 + 1e-6


def test_pgd_bad_labels():
    x, y = _data()
    with pytest.raises(ValueError, match="labels"):
        adv.pgd(_mlp(), x, y[:-1], eps=0.1)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        adv.pgd(_mlp(), x, y.float(), eps=0.1)
    model = _mlp()
    torch.testing.assert_close(adv.pgd(model, x, y.int(), eps=0.1, seed=1), adv.pgd(model, x, y, eps=0.1, seed=1),
                               rtol=0, atol=0)


def test_parse_attack():
    assert adv.parse_attack("pgd-linf:eps=0.1,steps=7,frac=0.5") == {
        "p": float("inf"), "eps": 0.1, "steps": 7, "frac": 0.5}
    assert adv.parse_attack("pgd-l2:eps=1.5")["p"] == 2
    for bad in ["fgsm:eps=0.1", "pgd-linf:steps=3", "pgd-linf:eps=x", "pgd-linf:eps=0.1,foo=2", "pgd-linf"]:
        with pytest.raises(ValueError):
            adv.parse_attack(bad)


def test_batch_transform_replaces_fraction_and_restores_train_mode():
    model = _mlp()
    model.train()
    x, y = _data(n=20)
    tr = adv.pgd_batch_transform(eps=0.1, steps=2, frac=0.5, seed=3)
    xb, yb = tr(model, x, y)
    changed = (xb - x).flatten(1).abs().amax(1) > 0
    assert int(changed.sum()) == 10
    assert float((xb - x).abs().max()) <= 0.1 + 1e-6
    assert torch.equal(yb, y)
    assert model.training and all(p.requires_grad for p in model.parameters())
    xb_all, _ = adv.pgd_batch_transform(eps=0.1, steps=2, frac=1.0)(model, x, y)
    assert bool(((xb_all - x).flatten(1).abs().amax(1) > 0).all())
    with pytest.raises(ValueError, match="frac"):
        adv.pgd_batch_transform(eps=0.1, steps=2, frac=1.5)
    with pytest.raises(ValueError, match="eps"):
        adv.pgd_batch_transform(eps=-1, steps=2)


def _linear_margin(lin, x):
    w = lin.weight[0] - lin.weight[1]
    b = lin.bias[0] - lin.bias[1]
    return ((x @ w + b).abs() / w.norm()).detach()


def _train_linear(x, y, transform=None, epochs=15, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(x.shape[1], 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    for _ in range(epochs):
        for s in range(0, len(x), 50):
            xb, yb = x[s:s + 50], y[s:s + 50]
            if transform is not None:
                xb, yb = transform(lin, xb, yb)
            opt.zero_grad()
            F.cross_entropy(lin(xb), yb).backward()
            opt.step()
    return lin


def test_adversarial_training_increases_the_margin():
    # features 1..16: tiny but perfectly predictive (non-robust); feature 0: large, noisy (robust).
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=g)
    s = (1.0 - 2.0 * y.double()).unsqueeze(1)  # +1 for class 0
    robust = 1.0 * s + 1.2 * torch.randn(200, 1, generator=g, dtype=torch.float64)
    x = torch.cat([robust, 0.05 * s.expand(200, 16)], 1).float()
    std = _train_linear(x, y)
    rob = _train_linear(x, y, adv.pgd_batch_transform(eps=0.1, steps=5, frac=1.0, p=float("inf"), clamp=None))
    m_std = _linear_margin(std, x)
    m_rob = _linear_margin(rob, x)
    # the standard model leans on the non-robust feature: smaller margins
    assert float(m_rob.median()) > 2 * float(m_std.median())
    w_rob = (rob.weight[0] - rob.weight[1]).detach().abs()
    assert float(w_rob[0]) > float(w_rob[1:].norm())  # robust model relies on the robust feature

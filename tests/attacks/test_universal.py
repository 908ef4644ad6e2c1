"""Universal perturbations: closed form on a linear binary classifier, a small CNN, bad input."""

import math

import pytest
import torch
from analytic import BinaryAffine
from digits_models import digits_cnn

from pyboundary.attacks.deepfool import deepfool
from pyboundary.attacks.universal import (
    UniversalPerturbation,
    evaluate_universal,
    fooling_rate,
    project_lp,
    universal_perturbation,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _linear_case(D=20, N=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=g, dtype=torch.float64)
    model = BinaryAffine(w, 0.5)  # logits (w.x + b, 0)
    # inputs all on the class-0 side with known scores t_i = w.x_i + b in [0.2, 3]
    t = 0.2 + 2.8 * torch.rand(N, generator=g, dtype=torch.float64)
    noise = torch.randn(N, D, generator=g, dtype=torch.float64)
    noise -= (noise @ w).unsqueeze(1) * w / (w @ w)  # no component along w
    x = noise + ((t - 0.5) / (w @ w)).unsqueeze(1) * w
    return model, x, w, t


@pytest.mark.parametrize("p", [2, math.inf])
def test_linear_binary_closed_form(p):
    """All inputs on one side of w.x + b = 0: the optimal universal perturbation is -s w/||w||
    (p = 2) or -s sign(w) (p = inf), s the q-quantile of the margins t_i / ||w||_{2 or 1}."""
    model, x, w, t = _linear_case()
    q = 0.8
    res = universal_perturbation(model, x, p=p, fooling_rate=q, seed=3)
    assert res.reached and res.fooling_rate >= q
    dual = w.abs().sum() if math.isinf(p) else w.norm()
    margins = (t / dual).sort().values
    k = math.ceil(q * x.shape[0])
    opt = float(margins[k - 1])  # fooling k inputs needs a norm just above the k-th smallest margin
    assert opt <= res.norm <= opt * (1 + 1e-3) + 1e-9
    v = res.perturbation
    direction = -torch.sign(w) if math.isinf(p) else -w / w.norm()
    if math.isinf(p):
        assert torch.allclose(v, res.norm * direction, atol=1e-9 * res.norm)
    else:
        assert float(v @ direction) / float(v.norm()) > 1 - 1e-9
    # the reported rate is the rate of the returned perturbation
    assert fooling_rate(model, x, v) == pytest.approx(res.fooling_rate)


def test_fixed_radius_too_small_is_not_reached():
    model, x, w, t = _linear_case(N=60)
    small = float((t / w.norm()).min()) * 0.5  # fools nothing
    res = universal_perturbation(model, x, p=2, fooling_rate=0.5, eps=small, max_passes=3)
    assert not res.reached and res.fooling_rate == 0.0 and res.passes == 3
    assert res.norm == pytest.approx(small)  # saturated on the ball
    big = float((t / w.norm()).max()) * 1.01
    res = universal_perturbation(model, x, p=2, fooling_rate=0.5, eps=big, refine=False)
    assert res.reached and res.norm <= big * (1 + 1e-12) and res.passes == 1


def test_projection():
    v = torch.tensor([3.0, -4.0])
    assert torch.allclose(project_lp(v, 1.0, 2), v / 5)
    assert torch.allclose(project_lp(v, 10.0, 2), v)
    assert torch.allclose(project_lp(v, 2.0, "inf"), torch.tensor([2.0, -2.0]))


def _digits_cnn():
    m, x, _ = digits_cnn(seed=0)
    return m, x


@pytest.fixture(scope="module")
def cnn():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the one_thread fixture
    try:
        return _digits_cnn()
    finally:
        torch.set_num_threads(n)


def test_small_cnn_beats_random_noise_by_far(cnn):
    model, x = cnn
    train, held = x[1400:1600], x[1600:]
    before = [q.detach().clone() for q in model.parameters()]
    res = universal_perturbation(model, train, p=2, fooling_rate=0.6, chunk_size=8, seed=0)
    assert res.reached and res.fooling_rate >= 0.6
    assert res.history and res.history[-1]["fooling_rate"] >= res.fooling_rate  # refine only shrinks
    ev = evaluate_universal(model, res, held, n_random=5)
    assert ev.norm == pytest.approx(res.norm, rel=1e-5)
    # the universal perturbation transfers to held-out inputs and beats random noise of its norm
    assert ev.fooling_rate > 0.4
    assert ev.fooling_rate > 3 * ev.random_fooling_rate
    assert not model.training and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(q.grad is None for q in model.parameters())
    # one perturbation for most inputs is longer than the typical per-input minimal perturbation
    assert res.norm > float(deepfool(model, train).margin.median())


def test_energy_in_a_subspace(cnn):
    model, x = cnn
    v = torch.zeros(1, 8, 8)
    v[0, 0, 0], v[0, 1, 1] = 3.0, 4.0
    basis = torch.zeros(64, 2)
    basis[0, 0] = 1.0
    basis[5, 1] = 1.0
    ev = evaluate_universal(model, v, x[:50], p=2, basis=basis, n_random=2)
    assert ev.subspace_energy == pytest.approx(9 / 25)
    assert ev.complement_energy == pytest.approx(16 / 25)
    assert ev.random_energy == pytest.approx(2 / 64) and ev.subspace_dim == 2


def test_save_load_round_trip(tmp_path):
    model, x, w, t = _linear_case(N=40)
    res = universal_perturbation(model, x, p="linf", fooling_rate=0.5)
    res.save(tmp_path / "u.pt")
    back = UniversalPerturbation.load(tmp_path / "u.pt")
    assert torch.equal(back.perturbation, res.perturbation.cpu())
    assert back.summary() == res.summary() and math.isinf(back.p)
    assert "fooling rate" in res.format_summary()
    for name, blob in (("text.pt", b"some text"), ("cut.pt", (tmp_path / "u.pt").read_bytes()[:200])):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=f"{name}' is not a readable saved UniversalPerturbation"):
            UniversalPerturbation.load(tmp_path / name)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a saved UniversalPerturbation"):
        UniversalPerturbation.load(tmp_path / "other.pt")


def test_bad_arguments():
    model, x, w, t = _linear_case(N=10)
    with pytest.raises(ValueError, match="p must be 2 or inf"):
        universal_perturbation(model, x, p=1)
    with pytest.raises(ValueError, match="fooling_rate"):
        universal_perturbation(model, x, fooling_rate=1.5)
    with pytest.raises(ValueError, match="eps"):
        universal_perturbation(model, x, eps=-1.0)
    with pytest.raises(TypeError, match="chunk_size"):
        universal_perturbation(model, x, chunk_size=2.0)
    with pytest.raises(ValueError, match="growth"):
        universal_perturbation(model, x, growth=1.0)
    with pytest.raises(ValueError, match="must not set 'p'"):
        universal_perturbation(model, x, deepfool_kwargs={"p": 2})
    with pytest.raises(ValueError, match="non-finite"):
        universal_perturbation(model, x * float("nan"))
    with pytest.raises(ValueError, match="per-input shape"):
        fooling_rate(model, x, torch.zeros(3))
    with pytest.raises(ValueError, match="p is required"):
        evaluate_universal(model, torch.ones(20, dtype=torch.float64), x)

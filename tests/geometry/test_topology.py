import math

import numpy as np
import pytest
import torch
from analytic import Annulus, TwoSlabs
from torch import nn

from pyboundary.geometry import topology as topo

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _linear(seed=0, d=5, classes=4):
    torch.manual_seed(seed)
    return nn.Linear(d, classes).double()


def _on_segment_fraction(model, a, b, label, n=400):
    t = torch.linspace(0, 1, n, dtype=a.dtype).view(-1, 1)
    pts = a.unsqueeze(0) + t * (b - a).unsqueeze(0)
    return float((model(pts).argmax(1) == label).double().mean())


def test_annulus_path_bends_around_the_hole():
    model = Annulus()
    x1 = torch.tensor([1.5, 0.0], dtype=torch.float64)
    x2 = torch.tensor([-1.5, 0.3], dtype=torch.float64)
    assert _on_segment_fraction(model, x1, x2, 0) < 0.9  # the straight segment crosses the hole
    res = topo.find_path(model, x1, x2, max_depth=8, n_check=32)
    assert res.valid, res.reason
    assert res.label == 0
    assert torch.equal(res.anchors[0], x1) and torch.equal(res.anchors[-1], x2)
    # independent dense check of every segment, and all anchors in the annulus
    for a, b in zip(res.anchors[:-1], res.anchors[1:]):
        assert _on_segment_fraction(model, a, b, 0) == 1.0
    r = res.anchors.norm(dim=1)
    assert bool(((r > 1) & (r < 2)).all())
    assert res.ratio > 1.2  # bent: longer than the straight segment
    assert res.length == pytest.approx(float(res.anchors.diff(dim=0).norm(dim=1).sum()))
    assert res.n_calls > 0 and res.n_inputs > 0


def test_straight_segment_in_convex_region_needs_no_anchor():
    model = _linear()
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(200, 5, generator=g, dtype=torch.float64)
    pred = model(xs).argmax(1)
    pair = xs[pred == pred[0]][:2]
    res = topo.find_path(model, pair[0], pair[1])
    assert res.valid and res.anchors.shape[0] == 2 and res.depth == 0 and res.ratio == 1.0


def test_disconnected_regions_report_failure():
    model = TwoSlabs()
    x1 = torch.tensor([-2.0, 0.0], dtype=torch.float64)
    x2 = torch.tensor([2.5, 0.1], dtype=torch.float64)
    res = topo.find_path(model, x1, x2, max_depth=5)
    assert not res.valid
    assert res.reason
    # never report a path that leaves the region: some segment must cross the gap
    crossing = [_on_segment_fraction(model, a, b, 0) < 1.0 for a, b in zip(res.anchors[:-1], res.anchors[1:])]
    assert any(crossing)


def test_find_path_bad_arguments():
    model = Annulus()
    a = torch.tensor([1.5, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="same region"):
        topo.find_path(model, a, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        topo.find_path(model, a, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_depth"):
        topo.find_path(model, a, a, max_depth=-1)
    with pytest.raises(ValueError, match="n_check"):
        topo.find_path(model, a, a, n_check=0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    img = torch.rand(1, 1, 6, 6)  # a batch of one: find_path wants img[0]
    conv(img)
    with pytest.raises(ValueError, match="without a batch dimension"):
        topo.find_path(conv, img, img)


def test_targeted_deepfool_rejects_target_equal_to_current_class():
    from pyboundary.attacks.deepfool import deepfool

    x = torch.tensor([[1.5, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="target"):
        deepfool(Annulus(), x, target=torch.tensor([0]))


def test_convex_combinations_of_a_linear_region_stay_inside():
    model = _linear()
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(400, 5, generator=g, dtype=torch.float64)
    pred = model(xs).argmax(1)
    region = xs[pred == pred[0]]
    res = topo.convex_combination_probability(model, region, k=range(2, 11), n_trials=300, seed=0)
    assert res.ks == list(range(2, 11))
    np.testing.assert_array_equal(res.probability, 1.0)
    assert res.label == int(pred[0])


def test_convex_combinations_of_the_annulus_leave_it():
    model = Annulus()
    g = torch.Generator().manual_seed(2)
    ang = torch.rand(300, generator=g, dtype=torch.float64) * 2 * math.pi
    xs = torch.stack([ang.cos(), ang.sin()], 1) * 1.5
    res = topo.convex_combination_probability(model, xs, k=[2, 10], n_trials=2000, seed=0)
    # k = 2: exact probability for r = 1.5 points: P(|w a + (1-w) b| > 1) with uniform w, angle
    w = torch.rand(200000, generator=g, dtype=torch.float64)
    th = torch.rand(200000, generator=g, dtype=torch.float64) * 2 * math.pi
    r = 1.5 * (w**2 + (1 - w) ** 2 + 2 * w * (1 - w) * th.cos()).sqrt()
    expected = float((r > 1).double().mean())
    assert res.probability[0] == pytest.approx(expected, abs=4 * res.se[0] + 0.01)
    assert res.probability[1] < res.probability[0]  # more points average towards the hole


def test_convex_bad_arguments():
    model = _linear()
    xs = torch.randn(10, 5, dtype=torch.float64)
    pred = model(xs).argmax(1)
    region = xs[pred == pred[0]]
    with pytest.raises(ValueError, match="k must"):
        topo.convex_combination_probability(model, region, k=1)
    with pytest.raises(ValueError, match="k must"):
        topo.convex_combination_probability(model, region, k=region.shape[0] + 1)
    with pytest.raises(ValueError, match="n_trials"):
        topo.convex_combination_probability(model, region, k=2, n_trials=0)
    if bool((pred != pred[0]).any()):
        with pytest.raises(ValueError, match="same class"):
            topo.convex_combination_probability(model, xs, k=2)


def test_first_crossing_on_a_halfspace_is_exact():
    # boundary x_0 = 1 of TwoSlabs; from the origin along v: t = 1 / |v_0|
    model = TwoSlabs()
    v = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    x = torch.zeros(4, 2, dtype=torch.float64)
    d = topo.first_crossing(model, x, v, torch.ones(4, dtype=torch.int64), 5.0, n_bisect=30)
    assert d[:3].tolist() == pytest.approx([1.0, 1 / 0.6, 1 / 0.6], rel=1e-6)
    assert math.isinf(float(d[3]))
    # chunked evaluation (2 rows of 32 grid points per chunk) gives the same distances
    counter = topo.CallCounter()
    d_small = topo.first_crossing(model, x, v, torch.ones(4, dtype=torch.int64), 5.0, n_bisect=30, batch_size=64,
                                  counter=counter)
    torch.testing.assert_close(d_small, d)
    # two grid calls (2 rays of 32 points each), then the 3 rays that cross are bisected together:
    # one call per bisection step, not one per grid chunk
    assert counter.calls == 2 + 30 and counter.inputs == 4 * 32 + 3 * 30
    z = topo.first_crossing(model, x[:1], torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.int64), 5.0)
    assert math.isinf(float(z[0]))
    with pytest.raises(ValueError, match="n_grid"):
        topo.first_crossing(model, x, v, torch.ones(4, dtype=torch.int64), 5.0, n_grid=0)


def test_random_direction_ratio_on_an_affine_model():
    # two-class affine model: distance along unit v = margin / |cos(v, w)|
    d = 20
    lin = nn.Linear(d, 2).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, d, generator=g, dtype=torch.float64)
    w = (lin.weight[0] - lin.weight[1]).detach()
    b = float((lin.bias[0] - lin.bias[1]).detach())
    margin = ((x @ w + b).abs() / w.norm()).detach()
    res = topo.random_direction_robustness(lin, x, n_directions=8, margin=margin, seed=0, n_bisect=40,
                                           max_radius=1e3)
    # rebuild the directions with the same seed to get the exact expectation (drawn per sample)
    gen = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn((1, 8, d), generator=gen, dtype=torch.float64) for _ in range(6)])
    v = v / v.norm(dim=2, keepdim=True)
    cos = (v @ w / w.norm()).abs()
    expected = margin.unsqueeze(1) / cos
    found = torch.isfinite(res.distance)
    assert bool((expected[~found] > 1e3 - 1e-6).all())
    torch.testing.assert_close(res.distance[found], expected[found], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(res.ratio, res.distance / margin.unsqueeze(1))
    s = res.summary()
    assert s["sqrt_d"] == pytest.approx(math.sqrt(d))
    # chunks of one sample (16 rays = the batch) give the same numbers as one chunk
    small = topo.random_direction_robustness(lin, x, n_directions=8, margin=margin, seed=0, n_bisect=40,
                                             max_radius=1e3, batch_size=16)
    torch.testing.assert_close(small.distance, res.distance)


def test_random_direction_uses_deepfool_margin_by_default():
    lin = nn.Linear(4, 2).double()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = (lin.weight[0] - lin.weight[1]).detach()
    margin = ((x @ w + float((lin.bias[0] - lin.bias[1]).detach())).abs() / w.norm()).detach()
    res = topo.random_direction_robustness(lin, x, n_directions=2)
    torch.testing.assert_close(res.margin, margin, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="n_directions"):
        topo.random_direction_robustness(lin, x, n_directions=0)


@pytest.mark.parametrize("scenario", ["same-label", "adversarial", "random-sphere"])
def test_path_connectivity_scenarios_on_linear_model(scenario):
    # regions of a linear classifier are convex: every formed pair is connected (straight)
    model = _linear(d=4, classes=3)
    x = torch.randn(60, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = topo.path_connectivity(model, x, scenario=scenario, n_pairs=4, seed=0, max_depth=3)
    assert out.n_pairs >= 3 and out.n_skipped == 4 - out.n_pairs
    assert out.rate == 1.0 and out.n_valid == out.n_pairs
    summary = out.summary()
    assert summary["rate"] == 1.0 and summary["median_ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="scenario"):
        topo.path_connectivity(model, x, scenario="nope")


def test_path_connectivity_when_no_pair_can_be_formed():
    """Every input predicted a different class (4 ImageNet images): no same-label pair exists, and
    one input has no partner of another class; the pairs are counted as skipped, not an error."""
    from analytic import Affine

    model = Affine.random(6, 4, 0, torch.float64)
    x = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pred = model(x).argmax(1)
    one_each = x[torch.stack([(pred == c).nonzero()[0, 0] for c in pred.unique()])]
    same = topo.path_connectivity(model, one_each, scenario="same-label", n_pairs=3)
    assert same.summary()["n_skipped"] == 3 and same.summary()["n_pairs"] == 0
    alone = topo.path_connectivity(model, one_each[:1], scenario="adversarial", n_pairs=3)
    assert alone.summary()["n_skipped"] == 3
    assert topo.path_connectivity(model, one_each, scenario="adversarial", n_pairs=3).summary()["n_pairs"] == 3


def test_progress_bars_show_the_long_searches_and_change_no_number(capsys):
    model = _linear(d=4, classes=3)
    x = torch.randn(30, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    quiet = topo.path_connectivity(model, x, scenario="same-label", n_pairs=3, max_depth=2)
    capsys.readouterr()
    shown = topo.path_connectivity(model, x, scenario="same-label", n_pairs=3, max_depth=2, progress=True)
    assert "paths (same-label)" in capsys.readouterr().err
    assert shown.summary() == quiet.summary()
    rd = topo.random_direction_robustness(model, x[:5], n_directions=2, progress=True)
    assert "random directions" in capsys.readouterr().err
    torch.testing.assert_close(rd.distance, topo.random_direction_robustness(model, x[:5], n_directions=2).distance)

"""Curvature against analytic geometry: quadric boundaries, flat boundaries, smooth models."""

import math

import pytest
import torch
from analytic import Affine, Quadric
from torch import nn

from pyboundary.geometry import curvature as C
from pyboundary.geometry.curvature import hvp

A = torch.tensor([3.0, 1.5, 0.5, -0.7, -2.0, 0.25, 0.1], dtype=torch.float64)  # D = 8


def smooth_mlp(d, n_classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 12), nn.Softplus(),
                         nn.Linear(12, n_classes)).double()


def origin(n=2, d=8):
    return torch.zeros(n, d, dtype=torch.float64)


# ----------------------------------------------------------------------------- principal curvatures


@pytest.mark.parametrize("method", ["dense", "lanczos"])
@pytest.mark.parametrize("scheme", ["central", "forward", "exact"])
def test_quadric_principal_curvatures(method, scheme):
    res = C.principal_curvatures(Quadric(A), origin(), pair=(0, 1), k=3, method=method, scheme=scheme, h=0.1)
    srt = A.sort().values
    # finite differences of gradients are exact on a quadratic: ~1e-15 achieved
    torch.testing.assert_close(res.largest, srt.flip(0)[:3].expand(2, 3), rtol=0, atol=1e-12)
    torch.testing.assert_close(res.smallest, srt[:3].expand(2, 3), rtol=0, atol=1e-12)
    # directions: e_{i+1} for curvature a_i (up to sign)
    top = res.largest_dirs[0, 0].abs()
    assert float(top[1]) == pytest.approx(1.0, abs=1e-12)  # a_1 = 3 is the largest, coordinate 1
    bottom = res.smallest_dirs[0, 0].abs()
    assert float(bottom[5]) == pytest.approx(1.0, abs=1e-12)  # a_5 = -2 is the smallest
    assert bool(res.valid.all())
    if method == "dense":
        torch.testing.assert_close(res.spectrum[0], srt, rtol=0, atol=1e-12)


def test_pair_orientation_flips_sign():
    pos = C.principal_curvatures(Quadric(A), origin(1), pair=(0, 1), k=2, method="dense", h=0.1)
    neg = C.principal_curvatures(Quadric(A), origin(1), pair=(1, 0), k=2, method="dense", h=0.1)
    torch.testing.assert_close(neg.largest, -pos.smallest)
    torch.testing.assert_close(neg.smallest, -pos.largest)


def test_quadric_away_from_vertex_matches_analytic_shape_operator():
    # at a general point: S = -P H P / |g| with H = -diag(0, a), g = (1, -a y)
    x = torch.tensor([[0.3, 0.2, -0.1, 0.4, 0.0, 0.1, -0.3, 0.2]], dtype=torch.float64)
    res = C.principal_curvatures(Quadric(A), x, pair=(0, 1), k=7, method="dense", scheme="exact")
    g = torch.cat([torch.ones(1, dtype=torch.float64), -A * x[0, 1:]])
    n = g / g.norm()
    hess = -torch.diag(torch.cat([torch.zeros(1, dtype=torch.float64), A]))
    p = torch.eye(8, dtype=torch.float64) - torch.outer(n, n)
    s = -p @ hess @ p / g.norm()
    ev = torch.linalg.eigvalsh(s)
    # drop the eigenvalue 0 of the normal direction
    drop = int((ev.abs() - 0).abs().argmin())
    expected = torch.cat([ev[:drop], ev[drop + 1:]])
    torch.testing.assert_close(res.spectrum[0], expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_flat_boundary_has_zero_curvature(method):
    x = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    res = C.principal_curvatures(Affine.random(9), x, k=2, method=method)
    assert float(res.largest.abs().max()) < 1e-8
    assert float(res.smallest.abs().max()) < 1e-8
    mc = C.mean_curvature(Affine.random(9), x, n_dirs=4)
    assert float(mc.hutchinson.abs().max()) < 1e-8 and float(mc.trace.abs().max()) < 1e-8


def test_lanczos_matches_dense_on_smooth_model():
    model = smooth_mlp(20)
    x = torch.randn(3, 20, dtype=torch.float64)
    dense = C.principal_curvatures(model, x, k=2, method="dense", scheme="exact")
    lan = C.principal_curvatures(model, x, k=2, method="lanczos", scheme="exact", n_iter=19)
    torch.testing.assert_close(lan.largest, dense.largest, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(lan.smallest, dense.smallest, rtol=1e-6, atol=1e-8)
    # fewer iterations: the extremes are still close
    few = C.principal_curvatures(model, x, k=1, method="lanczos", scheme="exact", n_iter=12)
    torch.testing.assert_close(few.largest, dense.largest[:, :1], rtol=0.05, atol=1e-4)


def test_boundary_point_curvature_uses_engine():
    # from x = 0 (class 1) the closest boundary point of x_1 = c + 1/2 sum a y^2 (a > 0) is (c, 0...)
    a = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    model = Quadric(a, c=0.2)
    x = torch.zeros(2, 4, dtype=torch.float64)
    res = C.principal_curvatures(model, x, k=1, at="boundary", method="dense")
    assert bool(res.valid.all())
    assert res.pair.tolist() == [[0, 1], [0, 1]]
    # the boundary point is found to the engine's tolerance (1e-4 relative; 5e-6 achieved here)
    torch.testing.assert_close(res.points[:, 0], torch.full((2,), 0.2, dtype=torch.float64), rtol=1e-4, atol=0)
    torch.testing.assert_close(res.spectrum, a.sort().values.expand(2, 3), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- derivatives


def test_finite_differences_match_exact_on_smooth_model():
    model = smooth_mlp(12)
    x = torch.randn(4, 12, dtype=torch.float64)
    v = torch.randn(4, 3, 12, dtype=torch.float64)
    exact = C.hessian_vector_product(model, x, v, pair=(1, 0), scheme="exact")
    central = C.hessian_vector_product(model, x, v, pair=(1, 0), scheme="central", h=1e-4)
    forward = C.hessian_vector_product(model, x, v, pair=(1, 0), scheme="forward", h=1e-6)
    assert float(exact.abs().max()) > 1e-3  # not trivially zero
    torch.testing.assert_close(central, exact, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(forward, exact, rtol=1e-3, atol=1e-4)
    # symmetric: u^T H v = v^T H u
    hu = C.hessian_vector_product(model, x, v[:, :1], pair=(1, 0), scheme="exact")
    torch.testing.assert_close((hu[:, 0] * v[:, 1]).sum(1), (exact[:, 1] * v[:, 0]).sum(1))


def test_hvp_batched_equals_one_sample_at_a_time():
    model = smooth_mlp(12)
    x = torch.randn(3, 12, dtype=torch.float64)
    v = torch.randn(3, 2, 12, dtype=torch.float64)
    full = C.hessian_vector_product(model, x, v, pair=(2, 3), h=1e-3, batch_size=5)
    for s in range(3):
        one = C.hessian_vector_product(model, x[s:s + 1], v[s:s + 1], pair=(2, 3), h=1e-3)
        torch.testing.assert_close(full[s:s + 1], one)


def test_second_differences_match_exact():
    model = smooth_mlp(10)
    x = torch.randn(5, 10, dtype=torch.float64)
    u = torch.randn(5, 10, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    hs = torch.full((5,), 1e-3, dtype=torch.float64)
    ex = hvp._second_diff_rows(model, x, u, hs, (10,), "exact", 64, hvp.RowCost())
    ce = hvp._second_diff_rows(model, x, u, hs, (10,), "central", 64, hvp.RowCost())
    torch.testing.assert_close(ce, ex, rtol=1e-4, atol=1e-6)


def test_default_step_is_relative_to_input_norm():
    x = torch.ones(2, 1, 4, 4)
    x[1] *= 3
    torch.testing.assert_close(C.finite_difference_step(x), C.DEFAULT_H_REL * torch.tensor([4.0, 12.0]))
    torch.testing.assert_close(C.finite_difference_step(torch.zeros(1, 9)), torch.tensor([C.DEFAULT_H_REL * 3.0]))


# ----------------------------------------------------------------------------- mean curvature


def test_mean_curvature_sign_and_magnitude_on_quadric():
    model = Quadric(A)
    x = origin(3)
    truth = float(A.sum() / 7)
    up = C.mean_curvature(model, x, labels=torch.ones(3, dtype=torch.int64), n_dirs=400, h=0.1)
    assert up.classes.tolist() == [[0]] * 3
    for est in (up.hutchinson, up.trace):
        assert float(est.mean()) == pytest.approx(truth, rel=0.1)
    down = C.mean_curvature(model, x, labels=torch.zeros(3, dtype=torch.int64), n_dirs=400, h=0.1)
    torch.testing.assert_close(down.hutchinson, -up.hutchinson)
    torch.testing.assert_close(down.trace, -up.trace)
    narrow = C.mean_curvature(model, x, labels=torch.zeros(3, dtype=torch.int32), n_dirs=400, h=0.1)
    torch.testing.assert_close(narrow.trace, down.trace, rtol=0, atol=0)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        C.mean_curvature(model, x, labels=torch.zeros(3), n_dirs=4)
    with pytest.raises(ValueError, match="labels must lie in"):
        C.mean_curvature(model, x, labels=torch.full((3,), 2), n_dirs=4)


def test_mean_curvature_exact_for_umbilic_quadric():
    # all a_i equal: every tangent direction has curvature a, so Hutchinson has zero variance
    a = torch.full((5,), 0.8, dtype=torch.float64)
    mc = C.mean_curvature(Quadric(a), origin(2, 6), labels=torch.ones(2, dtype=torch.int64), n_dirs=3,
                          estimator="hutchinson", h=0.3)
    torch.testing.assert_close(mc.hutchinson, torch.full((2, 1), 0.8, dtype=torch.float64))
    assert bool(torch.isnan(mc.trace).all())


def test_mean_curvature_estimators_agree_with_dense_spectrum():
    # mean of the dense spectrum = the mean curvature; Hutchinson within 4 standard errors
    model = smooth_mlp(10, n_classes=3)
    x = torch.randn(2, 10, dtype=torch.float64)
    mc = C.mean_curvature(model, x, n_dirs=1000, h=1e-3, seed=1)
    for c in range(2):
        pair = torch.stack([mc.classes[:, c], mc.reference], 1)
        pc = C.principal_curvatures(model, x, pair=pair, k=1, method="dense", scheme="exact")
        truth = pc.spectrum.mean(1)
        assert bool(((mc.hutchinson[:, c] - truth).abs() <= 4 * mc.hutchinson_se[:, c]).all())
        scale = float(pc.spectrum.abs().max())
        torch.testing.assert_close(mc.trace[:, c], truth, rtol=0, atol=0.03 * scale)


def test_seed_reproducible():
    model = smooth_mlp(10)
    x = torch.randn(2, 10, dtype=torch.float64)
    a = C.mean_curvature(model, x, n_dirs=5, seed=7)
    b = C.mean_curvature(model, x, n_dirs=5, seed=7)
    c = C.mean_curvature(model, x, n_dirs=5, seed=8)
    torch.testing.assert_close(a.trace, b.trace)
    assert not torch.allclose(a.trace, c.trace)


# ----------------------------------------------------------------------------- shared directions


def test_shared_directions_and_relative_curvature():
    a = torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    model = Quadric(a)
    g = torch.Generator().manual_seed(0)
    xs = 0.01 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    sd = C.shared_curved_directions(model, xs, 1, k=1, method="dense", scheme="exact")
    assert float(sd.directions[0, 1].abs()) == pytest.approx(1.0, abs=1e-3)
    rc = C.relative_curvature(model, xs, sd, n_dirs=200, h=0.1)
    # E|v^T S v| over tangent directions is ~ 4 / 7 for one curved direction among 7
    assert float(rc.mean[0]) == pytest.approx(7.0, rel=0.2)
    frac = C.subspace_fraction(torch.tensor([[0.0, 3.0, 4.0, 0, 0, 0, 0, 0]], dtype=torch.float64), sd)
    assert float(frac[0]) == pytest.approx(0.6, abs=1e-3)


def test_relative_curvature_chunked_over_samples_matches_one_batch():
    model = smooth_mlp(10, n_classes=5)
    xs = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    basis = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))[0]
    a = C.relative_curvature(model, xs, basis, n_dirs=5, h=1e-3, batch_size=8)  # one sample per chunk
    b = C.relative_curvature(model, xs, basis, n_dirs=5, h=1e-3, batch_size=10_000)
    for f in ("rho", "directional", "random_mean_abs"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f))
    assert a.n_forward == b.n_forward


def test_noise_accuracy_inside_vs_complement():
    # boundary x_1 = 0.5 (flat, normal e_1): noise of norm 1 along e_1 flips half the labels,
    # noise orthogonal to e_1 never does
    class Step(nn.Module):
        def forward(self, x):
            z = x.reshape(x.shape[0], -1)
            return torch.stack([z[:, 0] - 0.5, 0.5 - z[:, 0]], 1)

    x = torch.zeros(50, 6)
    labels = torch.ones(50, dtype=torch.int64)
    u = torch.zeros(6, 1)
    u[0, 0] = 1
    acc = C.noise_accuracy(Step(), x, labels, u, radius=1.0, n_draws=20)
    assert acc.clean == 1.0
    assert acc.complement == 1.0
    assert 0.35 < acc.subspace < 0.65
    assert acc.summary()["accuracy_subspace"] == acc.subspace and acc.radius == 1.0
    # chunks of one sample (its 40 noisy copies) give the numbers of one chunk
    assert C.noise_accuracy(Step(), x, labels, u, radius=1.0, n_draws=20, batch_size=40) == acc


# ----------------------------------------------------------------------------- hygiene and errors


def test_model_left_unchanged():
    model = smooth_mlp(10)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 10, dtype=torch.float64)
    C.principal_curvatures(model, x, k=1, method="lanczos", n_iter=4)
    C.mean_curvature(model, x, n_dirs=2, scheme="exact")
    assert model.training
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"h": 0.0}, "h must be > 0"),
        ({"h": -1.0}, "h must be > 0"),
        ({"h_rel": 0.0, "h": None}, "h_rel"),
        ({"pair": (1, 1)}, r"pair must name two different classes, got \(1, 1\)"),
        ({"pair": (0, 5)}, "pair class j"),
        ({"k": 0}, "k must be >= 1"),
        ({"k": 8}, "k must be <= D - 1 = 7"),
        ({"method": "qr"}, "method must be"),
        ({"scheme": "backward"}, "scheme must be"),
        ({"at": "edge"}, "at must be"),
    ],
)
def test_principal_curvature_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        C.principal_curvatures(Quadric(A), origin(1), **kwargs)


def test_input_errors():
    x = origin(2)
    bad = x.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="x contains non-finite values"):
        C.mean_curvature(Quadric(A), bad)
    with pytest.raises(ValueError, match="n_dirs must be >= 1, got 0"):
        C.mean_curvature(Quadric(A), x, n_dirs=0)
    with pytest.raises(TypeError, match="n_dirs must be an int"):
        C.mean_curvature(Quadric(A), x, n_dirs=2.5)
    with pytest.raises(ValueError, match="x is empty"):
        C.mean_curvature(Quadric(A), x[:0])
    with pytest.raises(ValueError, match="classes include the reference class"):
        C.mean_curvature(Quadric(A), x, classes=[0], labels=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="model must be callable"):
        C.mean_curvature("net", x)
    with pytest.raises(ValueError, match="v must have shape"):
        C.hessian_vector_product(Quadric(A), x, torch.ones(2, 3), pair=(0, 1))
    with pytest.raises(ValueError, match="orthonormal"):
        C.subspace_fraction(torch.ones(1, 8), 2 * torch.eye(8)[:, :2])
    with pytest.raises(ValueError, match="radius must be"):
        C.noise_accuracy(Quadric(A), x, torch.zeros(2, dtype=torch.int64), torch.eye(8)[:, :1], radius=-1.0)


def test_mean_curvature_holds_about_batch_size_rows_whatever_the_classes(monkeypatch):
    """999 other classes of an ImageNet model must not mean (J x T, D) tensors per sample: every
    block of (sample, class[, direction]) rows handed to the model helpers stays within batch_size
    (T rows when a sample's T directions alone exceed it), and chunking the classes changes no
    number."""
    from pyboundary.geometry.curvature import mean

    model = smooth_mlp(10, n_classes=60)
    x = torch.randn(5, 10, dtype=torch.float64)
    sizes = []
    for name in ("_grad_rows", "_second_diff_rows"):
        real = getattr(mean, name)

        def spy(model_, rows, *args, _real=real, **kwargs):
            sizes.append(rows.shape[0])
            return _real(model_, rows, *args, **kwargs)

        monkeypatch.setattr(mean, name, spy)
    small = C.mean_curvature(model, x, n_dirs=6, batch_size=12)
    assert sizes and max(sizes) <= 12
    sizes.clear()
    C.mean_curvature(model, x, n_dirs=20, batch_size=12, estimator="hutchinson")
    assert max(sizes) <= 20
    monkeypatch.undo()
    whole = C.mean_curvature(model, x, n_dirs=6, batch_size=10_000)
    assert small.classes.shape == (5, 59)
    for f in ("hutchinson", "hutchinson_se", "trace", "grad_norm", "values"):
        torch.testing.assert_close(getattr(small, f), getattr(whole, f))
    assert small.n_forward == whole.n_forward and small.n_backward == whole.n_backward


def test_mean_curvature_independent_of_batch_size():
    model = smooth_mlp(10)
    x = torch.randn(5, 10, dtype=torch.float64)
    a = C.mean_curvature(model, x, n_dirs=4, batch_size=7)
    b = C.mean_curvature(model, x, n_dirs=4, batch_size=1000)
    for f in ("hutchinson", "hutchinson_se", "trace", "grad_norm", "values"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f))
    assert a.n_forward == b.n_forward and a.n_backward == b.n_backward


@pytest.mark.cuda
def test_cuda_matches_cpu():
    model = Quadric(A)
    x = origin(2)
    cpu = C.principal_curvatures(model, x, pair=(0, 1), k=2, method="lanczos", h=0.1)
    gpu = C.principal_curvatures(model.cuda(), x.cuda(), pair=(0, 1), k=2, method="lanczos", h=0.1)
    torch.testing.assert_close(gpu.largest.cpu(), cpu.largest, rtol=1e-6, atol=1e-8)
    mc = C.mean_curvature(model, x.cuda(), labels=torch.ones(2, dtype=torch.int64, device="cuda"), n_dirs=8)
    assert mc.trace.device.type == "cuda" and bool(torch.isfinite(mc.trace).all())


def test_dense_chunked_over_samples_matches_one_batch():
    model = smooth_mlp(12)
    x = torch.randn(3, 12, dtype=torch.float64)
    a = C.principal_curvatures(model, x, k=2, method="dense", h=1e-3, batch_size=12)  # one sample per chunk
    b = C.principal_curvatures(model, x, k=2, method="dense", h=1e-3, batch_size=10000)
    torch.testing.assert_close(a.spectrum, b.spectrum)


def test_lanczos_runs_on_chunks_of_samples_with_the_numbers_of_one_batch(monkeypatch):
    """The Lanczos vectors (n_iter per sample, D each) are held for one chunk of ~batch_size / 2
    samples at a time, not for all N (an ImageNet scan of many inputs), and the chunks change no
    number: start vectors are drawn for all samples at once."""
    from pyboundary.geometry.curvature import principal

    model = smooth_mlp(12)
    x = torch.randn(7, 12, dtype=torch.float64)
    seen = []
    real = principal._lanczos
    monkeypatch.setattr(principal, "_lanczos", lambda op, v0, m, gen: seen.append(v0.shape[0]) or real(op, v0, m, gen))
    a = C.principal_curvatures(model, x, k=2, h=1e-3, n_iter=8, batch_size=4)
    assert seen == [2, 2, 2, 1]
    monkeypatch.undo()
    b = C.principal_curvatures(model, x, k=2, h=1e-3, n_iter=8, batch_size=10000)
    for f in ("largest", "smallest", "largest_dirs", "smallest_dirs", "grad_norm"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f))
    assert a.n_forward == b.n_forward and a.n_backward == b.n_backward


def test_zero_gradient_gives_nan_not_a_number():
    class Dead(nn.Module):  # f_1 - f_0 has zero gradient at x (ReLU off everywhere nearby)
        def forward(self, x):
            z = x.reshape(x.shape[0], -1)
            return torch.stack([torch.zeros_like(z[:, 0]), torch.relu(z[:, 0] - 5.0) - 1.0], 1)

    x = torch.zeros(2, 4, dtype=torch.float64)
    x[1, 0] = 6.0  # here the gradient is e_1: a flat boundary, curvature 0
    pc = C.principal_curvatures(Dead(), x, pair=(1, 0), k=1, method="dense", h=0.01)
    assert pc.valid.tolist() == [False, True]
    assert math.isnan(float(pc.largest[0, 0])) and float(pc.largest[1, 0]) == 0.0
    lan = C.principal_curvatures(Dead(), x, pair=(1, 0), k=1, n_iter=3, h=0.01)
    assert math.isnan(float(lan.largest[0, 0])) and float(lan.largest[1, 0]) == 0.0
    mc = C.mean_curvature(Dead(), x, labels=torch.zeros(2, dtype=torch.int64), n_dirs=3, h=0.01)
    assert math.isnan(float(mc.trace[0, 0])) and math.isnan(float(mc.hutchinson[0, 0]))
    assert float(mc.trace[1, 0]) == 0.0


def test_mean_curvature_classes_as_a_count_takes_the_most_likely_others():
    model = Affine.random(6, n_classes=7, seed=2)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits = model(x)
    ref = logits.argmax(1)
    mc = C.mean_curvature(model, x, classes=3, n_dirs=2, estimator="trace")
    expect = logits.scatter(1, ref.unsqueeze(1), float("-inf")).topk(3, dim=1).indices
    assert torch.equal(mc.classes, expect) and mc.n_classes == 7
    # a count of L - 1 or more: every other class, most likely first
    every = C.mean_curvature(model, x, classes=50, n_dirs=2, estimator="trace")
    assert every.classes.shape == (5, 6) and bool((every.classes != ref.unsqueeze(1)).all())
    # with given labels the reference is excluded even when it is not the argmax
    labels = (ref + 1) % 7
    other = C.mean_curvature(model, x, classes=2, labels=labels, n_dirs=2, estimator="trace")
    assert bool((other.classes != labels.unsqueeze(1)).all())
    with pytest.raises(ValueError, match="classes"):
        C.mean_curvature(model, x, classes=0)


def test_a_float64_input_to_a_float32_model_is_a_clear_type_error():
    from pyboundary.geometry.detection import CurvatureDetector

    model = smooth_mlp(8).float()
    x = torch.randn(6, 8, dtype=torch.float64)
    calls = (lambda: C.mean_curvature(model, x, n_dirs=2), lambda: C.principal_curvatures(model, x, k=1),
             lambda: C.hessian_vector_product(model, x, torch.randn(6, 1, 8, dtype=torch.float64), pair=(0, 1)),
             lambda: CurvatureDetector(model, n_dirs=2).score(x))
    for call in calls:
        with pytest.raises(TypeError, match=r"x of dtype torch.float64.*parameters are torch.float32"):
            call()


def test_a_model_that_detaches_its_logits_is_a_clear_error():
    model = smooth_mlp(8)
    x = torch.randn(3, 8, dtype=torch.float64)
    detached = lambda z: model(z).detach()  # noqa: E731
    for call in (lambda: C.principal_curvatures(detached, x, k=1), lambda: C.mean_curvature(detached, x, n_dirs=2)):
        with pytest.raises(ValueError, match="logits do not depend on its input through autograd"):
            call()

"""The batched DeepFool engine: closed-form margins of affine models, trained nets, errors."""

import copy
import math
import weakref

import pytest
import torch
from analytic import Affine, affine_margin
from torch import nn

from pyboundary._utils import model as utils
from pyboundary.attacks.deepfool import _CLAMP_PUSH, DeepFoolResult, deepfool
from pyboundary.subspaces import DCTDiagonal, Directions, FullSpace, RandomSubspaces

# ------------------------------------------------------------------------------ affine models


def _affine(D=30, L=6, N=40, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(L, D, generator=g, dtype=torch.float64)
    b = torch.randn(L, generator=g, dtype=torch.float64)
    x = torch.randn((N,) + (shape or (D,)), generator=g, dtype=torch.float64)
    return Affine(W, b), x


_closed_form = affine_margin


@pytest.mark.parametrize("p,q", [(2, 2.0), (math.inf, 1.0)])
def test_affine_whole_space_closed_form(p, q):
    model, x = _affine()
    res = deepfool(model, x, p=p, tol=1e-10)
    exact = _closed_form(model, x, q)
    assert res.converged.all()
    torch.testing.assert_close(res.margin, exact, rtol=1e-6, atol=0)
    assert (res.raw_margin >= res.margin).all()
    # the perturbation's norm is the margin, and it changes the label
    norms = res.perturbation.abs().amax(1) if math.isinf(p) else res.perturbation.norm(dim=1)
    torch.testing.assert_close(norms, res.margin, rtol=1e-9, atol=0)
    assert (model(x + res.perturbation).argmax(1) != res.orig_label).all()
    assert (res.iterations == 1).all()  # affine: one linearised step is exact


def test_affine_unrefined_is_overshoot_times_margin():
    model, x = _affine(seed=3)
    res = deepfool(model, x, refine=False, overshoot=0.05, prune=False)
    exact = _closed_form(model, x)
    # one step lands just past the boundary (relative push 1e-4), then the 1.05 overshoot
    ratio = res.margin / exact
    assert ((ratio > 1.05) & (ratio < 1.05 * 1.0002)).all()
    assert res.n_forward == 2 and res.n_backward == 5  # clean + one step; L - 1 candidates
    pruned = deepfool(model, x, refine=False, overshoot=0.05)
    torch.testing.assert_close(pruned.margin, res.margin)
    assert pruned.sample_gradients.sum() < res.sample_gradients.sum()
    assert pruned.n_forward == len(pruned.trace) and pruned.n_backward == sum(t[1] for t in pruned.trace)


def _dct_project(sub, idx):
    def project(dw):  # (N, L, D) -> projected rows
        n, L, _ = dw.shape
        flat = dw.reshape((n * L,) + sub.image_shape)
        out = sub.project(flat, idx.repeat_interleave(L))
        return out.reshape(n, L, -1)

    return project


@pytest.mark.parametrize("family", ["dct", "random", "perp"])
def test_affine_subspace_closed_form(family):
    shape = (2, 8, 8)
    model, x = _affine(D=128, L=5, N=24, seed=1, shape=shape)
    if family == "dct":
        sub = DCTDiagonal(shape, K=3, T=2)
    elif family == "random":
        sub = RandomSubspaces(shape, dim=6, n=3, seed=2)
    else:
        g = torch.Generator().manual_seed(9)
        sub = Directions(torch.randn(3, 128, generator=g, dtype=torch.float64), shape, complement=True)
    idx = torch.arange(24) % sub.n_members
    res = deepfool(model, x, subspace=sub, subspace_index=idx, tol=1e-10)
    exact = _closed_form(model, x, 2.0, _dct_project(sub, idx))
    assert res.converged.all()
    torch.testing.assert_close(res.margin, exact, rtol=1e-6, atol=0)
    # no component outside the member
    outside = res.perturbation - sub.project(res.perturbation, idx)
    assert outside.reshape(24, -1).norm(dim=1).max() < 1e-10 * res.margin.max()
    torch.testing.assert_close(res.perturbation.reshape(24, -1).norm(dim=1), res.margin)


def test_affine_subspace_linf_in_coordinates():
    shape = (1, 8, 8)
    model, x = _affine(D=64, L=4, N=16, seed=2, shape=shape)
    sub = DCTDiagonal(shape, K=4, T=2)
    idx = torch.arange(16) % sub.n_members
    res = deepfool(model, x, p="inf", subspace=sub, subspace_index=idx, tol=1e-10)

    def coords(dw):  # L1 norm of the coordinates of w_j - w_ref is the dual of coordinate L-inf
        n, L, _ = dw.shape
        return sub.analysis(dw.reshape((n * L,) + shape), idx.repeat_interleave(L)).reshape(n, L, -1)

    torch.testing.assert_close(res.margin, _closed_form(model, x, 1.0, coords), rtol=1e-6, atol=0)


class _UpcastAffine(Affine):
    """Parameters in float64; casts the input up (float32 in -> float64 logits)."""

    def forward(self, x):
        return super().forward(x.double())


class _DowncastAffine(Affine):
    """Parameters in float32; casts the input down (float64 in -> float32 logits)."""

    def forward(self, x):
        return super().forward(x.float())


@pytest.mark.parametrize("p,q", [(2, 2.0), (math.inf, 1.0)])
@pytest.mark.parametrize("subspace", [False, True])
def test_logits_dtype_differs_from_input_dtype(p, q, subspace):
    # used to raise "Index put requires the source and destination dtypes match"
    shape = (1, 4, 4)
    model, x = _affine(D=16, L=4, N=12, seed=4, shape=shape)
    sub = DCTDiagonal(shape, K=2, T=2) if subspace else None
    idx = torch.arange(12) % 2 if subspace else None
    coords = None
    if subspace:
        def coords(dw):
            n, L, _ = dw.shape
            return sub.analysis(dw.reshape((n * L,) + shape), idx.repeat_interleave(L)).reshape(n, L, -1)
    exact = _closed_form(model, x, q, coords)  # float64 ground truth
    up = _UpcastAffine(model.W.detach().clone(), model.b.detach().clone())
    res32 = deepfool(up, x.float(), p=p, subspace=sub, subspace_index=idx)
    assert res32.perturbation.dtype == torch.float32 and res32.margin.dtype == torch.float32
    assert res32.converged.all()
    torch.testing.assert_close(res32.margin.double(), exact, rtol=1e-4, atol=0)
    flipped = up(x.float() + res32.perturbation.reshape(x.shape)).argmax(1)
    assert (flipped != res32.orig_label).all()
    down = _DowncastAffine(model.W.detach().float(), model.b.detach().float())
    res64 = deepfool(down, x, p=p, subspace=sub, subspace_index=idx)
    assert res64.perturbation.dtype == torch.float64 and res64.converged.all()
    torch.testing.assert_close(res64.margin, exact, rtol=1e-4, atol=0)


def test_targeted_affine():
    model, x = _affine(L=4, N=20, seed=5)
    with torch.no_grad():
        pred = model(x).argmax(1)
    target = (pred + 1) % 4
    res = deepfool(model, x, target=target, tol=1e-8)
    assert res.converged.all() and (res.adv_label == target).all()
    assert (model(x + res.perturbation).argmax(1) == target).all()
    untargeted = deepfool(model, x, tol=1e-8)
    assert (res.margin >= untargeted.margin * (1 - 1e-6)).all()
    # with two classes targeted = untargeted
    m2, x2 = _affine(L=2, N=10, seed=6)
    t2 = 1 - m2(x2).argmax(1)
    torch.testing.assert_close(deepfool(m2, x2, target=t2).margin, deepfool(m2, x2).margin)
    with pytest.raises(ValueError, match="target equals the current class"):
        deepfool(model, x, target=pred)


def test_misclassified_and_failures():
    model, x = _affine(L=3, N=10, seed=4)
    with torch.no_grad():
        pred = model(x).argmax(1)
    labels = pred.clone()
    labels[:3] = (pred[:3] + 1) % 3
    res = deepfool(model, x, labels=labels)
    assert res.misclassified.tolist() == [True] * 3 + [False] * 7
    assert (res.margin[:3] == 0).all() and (res.perturbation[:3] == 0).all()
    assert (res.margin[3:] > 0).all() and (res.orig_label == labels).all()

    def constant(z):  # no boundary at all: every sample must fail, never a made-up margin
        return torch.tensor([2.0, 0.0], dtype=z.dtype).expand(z.shape[0], 2) + 0 * z.sum(1, keepdim=True)

    res = deepfool(constant, x, max_iter=3, noise_retries=2, seed=0)
    assert not res.converged.any() and torch.isinf(res.margin).all() and torch.isinf(res.raw_margin).all()
    assert (res.retries == 2).all() and (res.iterations == 3).all()
    assert (res.perturbation == 0).all() and (res.adv_label == res.orig_label).all()


# ------------------------------------------------------------------------------ trained nets


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return x, y


def _train(model, x, y, epochs, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0])
        for s in range(0, x.shape[0], 256):
            b = perm[s : s + 256]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return _digits()


@pytest.fixture(scope="module")
def mlp(digits):
    x, y = digits
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    return _train(m, x[:1400], y[:1400], epochs=10)


@pytest.fixture(scope="module")
def cnn(digits):
    x, y = digits
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 16, 32), nn.ReLU(), nn.Linear(32, 10),
    )
    return _train(m, x[:1400], y[:1400], epochs=8)


def _check_result(model, x, res: DeepFoolResult, tol):
    ok = res.converged
    assert ok.float().mean() > 0.95
    with torch.no_grad():
        logits = model(x[ok] + res.perturbation[ok])
    assert (logits.argmax(1) != res.orig_label[ok]).all()
    assert (logits.argmax(1) == res.adv_label[ok]).all()
    assert (res.margin[ok] <= res.raw_margin[ok] * (1 + 1e-6)).all()
    # refined point within tol of the boundary: the reference logit nearly equals the top one
    own = logits.gather(1, res.orig_label[ok, None]).squeeze(1)
    gap = logits.max(1).values - own
    scale = logits.abs().max(1).values
    assert (gap >= 0).all() and (gap <= 50 * tol * scale + 1e-4).all()


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("p", [2, math.inf])
def test_trained_nets(net, p, digits, request):
    model = request.getfixturevalue(net)
    x = digits[0][1400:1520]
    res = deepfool(model, x, p=p)
    _check_result(model, x, res, 1e-4)
    assert res.margin[res.converged].median() > 0
    # pruning: margins within 1% of the unpruned run
    full = deepfool(model, x, p=p, prune=False)
    both = res.converged & full.converged
    rel = (res.margin[both] / full.margin[both] - 1).abs()
    assert rel.median() < 1e-3 and (rel < 0.01).float().mean() > 0.97
    assert res.n_backward < full.n_backward


def test_batched_strategy_falls_back_to_the_loop_on_a_model_vmap_cannot_batch():
    """A backward that vmap cannot batch (here: it reads a value with .item()) makes the batched
    strategy fall back to the loop, on the same graph: the failed batched pass must not free it."""

    class ReadingRelu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            ctx.save_for_backward(z)
            return z.clamp_min(0)

        @staticmethod
        def backward(ctx, g):
            float(g.abs().max())  # .item() inside backward: not batchable by vmap
            return g * (ctx.saved_tensors[0] > 0)

    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(12, 16).double(), nn.Linear(16, 5).double()

    def model(z):
        return lin2(ReadingRelu.apply(lin1(z)))

    x = torch.randn(6, 12, dtype=torch.float64)
    loop = deepfool(model, x, grad_strategy="loop")
    batched = deepfool(model, x, grad_strategy="batched")
    torch.testing.assert_close(batched.margin, loop.margin)
    assert bool(batched.converged.all())


def test_two_dimensional_inputs_in_subspaces_are_one_channel_images():
    """Inputs (N, H, W): a subspace family of (H, W) images is one of (1, H, W) images; the margins
    and perturbations (in x's shape) are those of the (N, 1, H, W) inputs, for DCT blocks, random
    subspaces, the tight mode and a margin scan."""
    from pyboundary.scans.margins import margin_scan
    from pyboundary.subspaces import RandomSubspaces, parse_subspaces

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 63, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)

    def model(z):
        return z.reshape(z.shape[0], -1) @ w.T + b

    x = torch.rand(6, 7, 9, generator=g, dtype=torch.float64)
    for fam in (parse_subspaces("dct:K=4,T=1", (7, 9)), RandomSubspaces((7, 9), dim=5, n=2)):
        assert fam.image_shape == (1, 7, 9)
        idx = torch.arange(6) % fam.n_members
        for tight in (False, True):
            flat = deepfool(model, x, subspace=fam, subspace_index=idx, tight=tight)
            chan = deepfool(model, x.unsqueeze(1), subspace=fam, subspace_index=idx, tight=tight)
            assert flat.perturbation.shape == x.shape
            torch.testing.assert_close(flat.margin, chan.margin)
            torch.testing.assert_close(flat.perturbation, chan.perturbation.squeeze(1))
            assert bool((model(x + flat.perturbation).argmax(1) != flat.orig_label).all())
    scan = margin_scan(model, x, "dct:K=4,T=1", progress=False, model_name="affine")
    torch.testing.assert_close(scan.margins, margin_scan(model, x.unsqueeze(1), "dct:K=4,T=1", progress=False,
                                                         model_name="affine").margins)
    with pytest.raises(ValueError, match="per-sample shape"):
        deepfool(model, x.reshape(6, 9, 7), subspace=parse_subspaces("dct:K=4,T=1", (7, 9)),
                 subspace_index=torch.zeros(6, dtype=torch.int64))


def test_batched_vs_one_at_a_time(cnn, digits):
    x = digits[0][1600:1610]
    batched = deepfool(cnn, x, prune=False)
    single = deepfool(cnn, x, batch_size=1, prune=False)
    torch.testing.assert_close(batched.margin, single.margin, rtol=1e-4, atol=1e-6)
    assert torch.equal(batched.iterations, single.iterations)
    assert torch.equal(batched.adv_label, single.adv_label)
    chunks = deepfool(cnn, x, batch_size=5)
    torch.testing.assert_close(chunks.margin, deepfool(cnn, x).margin, rtol=1e-4, atol=1e-6)


def test_grad_strategies_agree(cnn, digits):
    x = digits[0][1600:1640]
    loop = deepfool(cnn, x, grad_strategy="loop", prune=False, refine=False)
    batched = deepfool(cnn, x, grad_strategy="batched", prune=False, refine=False)
    torch.testing.assert_close(loop.margin, batched.margin, rtol=1e-4, atol=1e-6)
    assert batched.n_backward < loop.n_backward  # a batched pass counts once


def test_subspace_on_cnn(cnn, digits):
    x = digits[0][1600:1640]
    sub = DCTDiagonal((1, 8, 8), K=4, T=2)
    idx = torch.arange(40) % sub.n_members
    res = deepfool(cnn, x, subspace=sub, subspace_index=idx, max_iter=100)
    ok = res.converged
    assert ok.float().mean() > 0.8
    with torch.no_grad():
        assert (cnn(x[ok] + res.perturbation[ok]).argmax(1) != res.orig_label[ok]).all()
    pert = res.perturbation[ok]
    outside = (pert - sub.project(pert, idx[ok])).reshape(pert.shape[0], -1).norm(dim=1)
    assert (outside <= 1e-5 * pert.reshape(pert.shape[0], -1).norm(dim=1)).all()
    # margins inside a 16-dim subspace are larger than in the whole space (DeepFool is a
    # heuristic, so compare medians rather than every sample)
    whole = deepfool(cnn, x)
    assert res.margin[ok].median() > 1.2 * whole.margin[ok].median()
    fs = deepfool(cnn, x, subspace=FullSpace((1, 8, 8)))
    torch.testing.assert_close(fs.margin, whole.margin)


def test_clamp_keeps_box(cnn, digits):
    x = digits[0][1600:1640]
    res = deepfool(cnn, x, clamp=(0.0, 1.0))
    adv = x + res.perturbation
    assert adv.min() >= 0 and adv.max() <= 1
    ok = res.converged
    with torch.no_grad():
        assert (cnn(adv[ok]).argmax(1) != res.orig_label[ok]).all()
    free = deepfool(cnn, x)
    assert res.margin[ok].median() >= free.margin[ok].median() * 0.999


def _box_linf_closed_form(model, x, lo, hi, push=0.0):
    """Exact L-inf distance from x to the complement of its affine region inside [lo, hi]^D:
    min_j t_j with sum_i |dw_ji| min(t_j, room_ji) = |F_j| (room: distance to the face that
    sign(dw_ji) points to), each root found by bisection in float64. push: the target is
    |F_j| + push * max|logit| (F_j != 0) instead of |F_j|."""
    with torch.no_grad():
        f = model(x)
        ref = f.argmax(1)
        F = (f - f.gather(1, ref[:, None])).abs()  # (N, L)
        F = torch.where(F > 0, F + push * f.abs().amax(1, keepdim=True), F)
        dw = model.W[None] - model.W[ref][:, None]  # (N, L, D)
        room = torch.where(dw > 0, hi - x[:, None], x[:, None] - lo)
        w = dw.abs()
        t_lo, t_hi = torch.zeros_like(F), torch.ones_like(F) * (hi - lo)
        for _ in range(200):
            mid = (t_lo + t_hi) / 2
            reach = (w * torch.minimum(mid[..., None], room)).sum(2) >= F
            t_lo, t_hi = torch.where(reach, t_lo, mid), torch.where(reach, mid, t_hi)
        reachable = (w * room).sum(2) >= F
        t = torch.where(reachable & (F > 0), t_hi, torch.full_like(t_hi, math.inf))
        return t.min(1).values


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_one_step_with_a_box_reaches_an_affine_boundary(p):
    """max_iter=1 (foolbox / torchattacks steps=1) with a clamp: the only step goes the whole way
    (the first step of a longer run aims short of the linearised boundary); on an affine model
    inside the box it flips every sample, as without the box."""
    model, x = _affine(D=30, L=4, N=16, seed=3)
    x = 0.25 + 0.5 * torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    one = deepfool(model, x, p=p, clamp=(0.0, 1.0), max_iter=1)
    assert bool(one.converged.all())
    with torch.no_grad():
        assert bool((model(x + one.perturbation).argmax(1) != one.orig_label).all())
    many = deepfool(model, x, p=p, clamp=(0.0, 1.0))
    torch.testing.assert_close(one.margin, many.margin, rtol=1e-3, atol=0)


def test_affine_clamp_linf_box_closed_form():
    # box-aware L-inf steps: with a third of the coordinates at a face of the box, the margin is
    # the exact box-constrained distance, reached in 2 steps (the first aims at
    # _CLAMP_LINF_FIRST_FRACTION of the gap); clipped sign steps would creep up for many more
    model, x = _affine(D=30, L=4, N=24, seed=5)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(x.shape, generator=g, dtype=torch.float64)
    x[:, :10] = 0.0
    x[:, 10:15] = 1.0
    with torch.no_grad():
        model.b.mul_(0.1)
    exact = _box_linf_closed_form(model, x, 0.0, 1.0)
    assert torch.isfinite(exact).all()
    free = _closed_form(model, x, 1.0)
    assert (exact > free * 1.05).all()  # the box matters for every sample
    res = deepfool(model, x, p=math.inf, clamp=(0.0, 1.0), overshoot=0.0, refine=False)
    assert res.converged.all()
    assert (res.iterations <= 2).all()
    adv = x + res.perturbation
    assert adv.min() >= 0 and adv.max() <= 1
    assert (model(adv).argmax(1) != res.orig_label).all()
    # the step aims past the boundary by _CLAMP_PUSH x max|logit|, and the select push (1e-4)
    assert (res.margin >= exact * (1 - 1e-9)).all()
    pushed = _box_linf_closed_form(model, x, 0.0, 1.0, push=_CLAMP_PUSH)
    assert (pushed > exact * 1.001).all()
    # (max|logit| is taken at each iterate, so the push is only approximately the clean one)
    torch.testing.assert_close(res.margin, pushed, rtol=1e-3, atol=0)
    # the audit counts the box-aware choices, steps with the pruned one (here: the same)
    aud = deepfool(model, x, p=math.inf, clamp=(0.0, 1.0), overshoot=0.0, refine=False, prune="audit")
    assert aud.prune_choices > 0 and aud.prune_mismatch == 0
    torch.testing.assert_close(aud.margin, res.margin)
    # L2 with a clamp: box-aware steps too (coordinate i moves by min(lambda |g_i|, room_i)),
    # exact in 2 steps (the first aims at _CLAMP_L2_FIRST_FRACTION of the gap)
    l2_exact = _box_l2_closed_form(model, x, 0.0, 1.0)
    assert (l2_exact > _closed_form(model, x, 2.0) * 1.05).all()  # the box matters for every sample
    l2 = deepfool(model, x, p=2, clamp=(0.0, 1.0), overshoot=0.0, refine=False)
    assert l2.converged.all() and (l2.iterations <= 2).all()
    adv = x + l2.perturbation
    assert adv.min() >= 0 and adv.max() <= 1 and (model(adv).argmax(1) != l2.orig_label).all()
    assert (l2.margin >= l2_exact * (1 - 1e-9)).all()
    torch.testing.assert_close(l2.margin, _box_l2_closed_form(model, x, 0.0, 1.0, push=_CLAMP_PUSH),
                               rtol=1e-3, atol=0)
    # refined: bracketed on the ray through the pushed point, so between the exact distance and
    # the pushed margin (the box-clipped solution bends with the gap: the ray misses it slightly)
    refined = deepfool(model, x, p=2, clamp=(0.0, 1.0), overshoot=0.0, tol=1e-9)
    assert (refined.margin >= l2_exact * (1 - 1e-9)).all() and (refined.margin <= l2.margin * (1 + 1e-9)).all()
    torch.testing.assert_close(refined.margin, l2_exact, rtol=2e-3, atol=0)


def _box_l2_closed_form(model, x, lo, hi, push=0.0):
    """Exact L2 distance from x to the complement of its affine region inside [lo, hi]^D: per
    class j, d_i = sign(dw_ji) min(lambda |dw_ji|, room_ji) with sum_i |dw_ji| min(lambda |dw_ji|,
    room_ji) = |F_j| (bisection in float64); the smallest ||d||_2. push as in _box_linf_closed_form."""
    with torch.no_grad():
        f = model(x)
        ref = f.argmax(1)
        F = (f - f.gather(1, ref[:, None])).abs()
        F = torch.where(F > 0, F + push * f.abs().amax(1, keepdim=True), F)
        dw = model.W[None] - model.W[ref][:, None]
        room = torch.where(dw > 0, hi - x[:, None], x[:, None] - lo)
        a = dw.abs()
        l_lo, l_hi = torch.zeros_like(F), torch.full_like(F, 1e6)
        for _ in range(300):
            mid = (l_lo + l_hi) / 2
            reach = (a * torch.minimum(mid[..., None] * a, room)).sum(2) >= F
            l_lo, l_hi = torch.where(reach, l_lo, mid), torch.where(reach, mid, l_hi)
        d = torch.minimum(l_hi[..., None] * a, room)
        reachable = (a * room).sum(2) >= F
        v = torch.where(reachable & (F > 0), d.norm(dim=2), torch.full_like(F, math.inf))
        return v.min(1).values


def test_seeded_retries_deterministic(mlp, digits):
    x = digits[0][1600:1664]
    kw = dict(max_iter=1, overshoot=0.0, noise_retries=2, noise_scale=0.5)
    a = deepfool(mlp, x, seed=3, **kw)
    b = deepfool(mlp, x, seed=3, **kw)
    retried = (a.retries > 0) & a.converged
    assert retried.any()
    assert torch.equal(a.margin, b.margin) and torch.equal(a.perturbation, b.perturbation)
    assert torch.equal(a.retries, b.retries)
    c = deepfool(mlp, x, seed=4, **kw)
    assert not torch.equal(a.perturbation[retried], c.perturbation[retried])
    with torch.no_grad():
        assert (mlp(x[retried] + a.perturbation[retried]).argmax(1) != a.orig_label[retried]).all()


def test_model_left_unchanged(digits):
    x = digits[0][:8]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 10))
    model.train()
    model[1].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = deepfool(model, x)
    assert res.converged.all()  # dropout was off (eval mode) during the search
    assert model.training and all(m.training for m in model.modules())
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not res.perturbation.requires_grad and res.perturbation.grad_fn is None
    x2 = x.clone()
    deepfool(model, x2)
    assert torch.equal(x, x2)


def test_pass_counts_and_audit(cnn, digits):
    x = digits[0][1600:1700]
    res = deepfool(cnn, x, prune="audit")
    assert res.prune_choices > 0 and res.prune_mismatch / res.prune_choices < 0.05
    assert res.n_forward == len(res.trace)
    assert (res.sample_forward >= res.iterations + 1).all()
    assert res.sample_gradients.sum() > 0
    text = res.format_summary()
    assert "converged" in text and "pruning audit" in text
    summary = res.summary()
    assert summary["n"] == 100 and summary["prune_audit"]["choices"] == res.prune_choices
    assert summary["n_forward"] == res.n_forward and set(summary["margin"]) == {"median", "p5", "p95", "mean", "se"}


def test_probability_warning_once_per_model(mlp, digits):
    import warnings

    x = digits[0][:4]
    softmax = nn.Sequential(mlp, nn.Softmax(1))
    with pytest.warns(UserWarning, match=r"model \(Sequential\) outputs look like probabilities"):
        deepfool(softmax, x, max_iter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deepfool(softmax, x, max_iter=2)  # this model was warned about already
    with pytest.warns(UserWarning, match="probabilities"):  # another model is warned about again
        deepfool(lambda z: mlp(z).softmax(1), x, max_iter=2)


def test_narrow_integer_labels_and_indices(mlp, digits):
    """int32 / uint8 labels, targets and member indices (as numpy and datasets hand them out) give
    the numbers of int64 ones; bools and floats stay refused."""
    x, y = digits[0][:6], digits[1][:6]
    sub = DCTDiagonal((1, 8, 8), K=4, T=2)
    idx = torch.tensor([0, 1, 2, 0, 1, 2])
    ref = deepfool(mlp, x, labels=y, subspace=sub, subspace_index=idx)
    for dtype in (torch.int32, torch.uint8):
        got = deepfool(mlp, x, labels=y.to(dtype), subspace=sub, subspace_index=idx.to(dtype))
        torch.testing.assert_close(got.margin, ref.margin, rtol=0, atol=0)
        assert got.orig_label.dtype == torch.int64
    target = (y + 1) % 10
    torch.testing.assert_close(deepfool(mlp, x, target=target.int()).margin,
                               deepfool(mlp, x, target=target).margin, rtol=0, atol=0)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        deepfool(mlp, x, labels=y.bool())
    with pytest.raises(ValueError, match="give labels .* or target .*, not both"):
        deepfool(mlp, x, labels=y, target=target)


def test_bad_inputs(mlp, digits):
    x = digits[0][:4]
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains non-finite"):
        deepfool(mlp, bad)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        deepfool(mlp, x, labels=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        deepfool(mlp, x, labels=torch.zeros(4))
    with pytest.raises(ValueError, match="labels must lie in"):
        deepfool(mlp, x, labels=torch.full((4,), 12))
    sub = DCTDiagonal((1, 8, 8), K=4, T=2)
    with pytest.raises(ValueError, match=r"subspace_index must have shape \(4,\)"):
        deepfool(mlp, x, subspace=sub, subspace_index=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="subspace_index is required"):
        deepfool(mlp, x, subspace=sub)
    with pytest.raises(ValueError, match="expects"):
        deepfool(mlp, x, subspace=DCTDiagonal((1, 9, 9), K=4))
    with pytest.raises(ValueError, match="p must be 2 or inf, got 3"):
        deepfool(mlp, x, p=3)
    with pytest.raises(ValueError, match="candidates must be >= 2, got 0"):
        deepfool(mlp, x, candidates=0)
    with pytest.raises(ValueError, match="candidates must be >= 2"):
        deepfool(mlp, x, candidates=1)
    every = deepfool(mlp, x, candidates=None)  # None: all classes
    torch.testing.assert_close(every.margin, deepfool(mlp, x, candidates=mlp(x).shape[1]).margin)
    with pytest.raises(ValueError, match=r"shape \(N, L\) = \(4, L\)"):
        deepfool(lambda z: mlp(z)[:2], x)
    with pytest.raises(ValueError, match=r"at least 2 classes.*torch.cat\(\[torch.zeros_like\(z\), z\], 1\)"):
        deepfool(lambda z: mlp(z)[:, :1], x)
    with pytest.raises(ValueError, match="grad_strategy"):
        deepfool(mlp, x, grad_strategy="fast")
    with pytest.raises(ValueError, match="clamp"):
        deepfool(mlp, x, subspace=sub, subspace_index=torch.zeros(4, dtype=torch.int64), clamp=(0, 1))
    with pytest.raises(ValueError, match="clamp must be finite with lo < hi"):
        deepfool(mlp, x, clamp=(1, 0))
    with pytest.raises(ValueError, match="tol"):
        deepfool(mlp, x, tol=0)
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        deepfool(mlp, x.to(torch.int64))
    with pytest.raises(ValueError, match="subspace_index was given"):
        deepfool(mlp, x, subspace_index=torch.zeros(4, dtype=torch.int64))
    g = torch.Generator().manual_seed(0)
    d = Directions(torch.randn(1, 64, generator=g), (1, 8, 8), complement=True)
    with pytest.raises(ValueError, match="p=inf"):
        deepfool(mlp, x, p="inf", subspace=d, subspace_index=torch.ones(4, dtype=torch.int64))
    empty = deepfool(mlp, x[:0])
    assert empty.margin.shape == (0,)
    boxed = deepfool(mlp, x[:0].clamp(0, 1), clamp=(0.0, 1.0))  # nothing to check against the box
    assert boxed.margin.shape == (0,) and boxed.perturbation.shape == (0, *x.shape[1:])


@pytest.mark.cuda
def test_cuda_matches_cpu(cnn, digits):
    import copy

    model, x = _affine(seed=7)
    exact = _closed_form(model, x)
    res = deepfool(copy.deepcopy(model).cuda(), x.cuda(), tol=1e-10)
    torch.testing.assert_close(res.margin.cpu(), exact, rtol=1e-6, atol=0)
    xs = digits[0][1600:1664]
    cpu = deepfool(cnn, xs, prune=False, refine=False)
    gpu_cnn = copy.deepcopy(cnn).cuda()
    for strategy in ("loop", "batched"):
        gpu = deepfool(gpu_cnn, xs.cuda(), prune=False, refine=False, grad_strategy=strategy)
        torch.testing.assert_close(gpu.margin.cpu(), cpu.margin, rtol=1e-3, atol=1e-5)
    sub = DCTDiagonal((1, 8, 8), K=4, T=2)
    idx = (torch.arange(64) % sub.n_members).cuda()
    res = deepfool(gpu_cnn, xs.cuda(), subspace=sub, subspace_index=idx)
    ok = res.converged
    pert = res.perturbation[ok]
    outside = pert - sub.project(pert, idx[ok])
    assert ok.float().mean() > 0.8 and outside.norm() <= 1e-5 * pert.norm()


def test_shared_first_step_for_repeated_inputs(cnn, digits):
    """(sample, subspace) pairs of one image share the first forward and gradients; the result
    equals separate runs."""
    x = digits[0][1600:1603]
    sub = DCTDiagonal((1, 8, 8), K=4, T=2)
    xs = x.repeat_interleave(sub.n_members, 0)
    idx = torch.arange(sub.n_members).repeat(3)
    shared = deepfool(cnn, xs, subspace=sub, subspace_index=idx, max_iter=100)
    assert shared.trace[0][0] == 3  # one forward row per distinct image
    single = deepfool(cnn, xs, subspace=sub, subspace_index=idx, max_iter=100, batch_size=1)
    assert single.trace[0][0] == 1
    torch.testing.assert_close(shared.margin, single.margin, rtol=1e-4, atol=1e-6)
    assert torch.equal(shared.converged, single.converged)
    # different labels for the same image: no sharing, still correct
    labels = cnn(x).argmax(1).repeat_interleave(sub.n_members)
    labels[0] = (labels[0] + 1) % 10
    res = deepfool(cnn, xs, labels=labels, subspace=sub, subspace_index=idx, max_iter=100)
    assert res.trace[0][0] == xs.shape[0] and res.misclassified[0] and res.margin[0] == 0
    torch.testing.assert_close(res.margin[1:], shared.margin[1:], rtol=1e-4, atol=1e-6)


def test_runs_inside_inference_mode_and_keeps_callers_grad_mode():
    model, x = _affine(D=12, L=4, N=6)
    expected = deepfool(model, x).margin
    with torch.inference_mode():
        got = deepfool(model, x).margin
    assert torch.allclose(got, expected)
    with torch.no_grad():
        with utils.model_guard(model):
            assert not torch.is_grad_enabled()


def test_compiled_graphs_keep_their_buffers_inside_the_guard():
    """Inside model_guard torch.compile builds backward graphs that allow several reverse passes
    through one forward (donated buffers forbid them; the engine differentiates several candidates
    per forward), and the caller's setting is back afterwards."""
    from torch._functorch import config

    before = config.donated_buffer
    with utils.model_guard(nn.Linear(3, 2)):
        assert config.donated_buffer is False
    assert config.donated_buffer == before


@pytest.mark.slow
def test_a_torch_compiled_model_runs_every_engine_path():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                        nn.Linear(128, 10)).eval()
    compiled = torch.compile(net)
    x = torch.rand(4, 3, 12, 12)
    for kwargs in ({}, {"tight": True}, {"grad_strategy": "batched"}):
        res = deepfool(compiled, x, **kwargs)
        torch.testing.assert_close(res.margin, deepfool(net, x, **kwargs).margin, rtol=1e-3, atol=1e-5)


def test_float64_input_to_float32_model_is_a_clear_type_error():
    model, x = _affine(D=12, L=4, N=6)
    model = model.float()
    with pytest.raises(TypeError, match=r"x of dtype torch.float64.*parameters are torch.float32"):
        deepfool(model, x.double())


def test_input_of_the_wrong_shape_is_a_clear_value_error():
    """(N, H, W) for a conv model that takes (N, 1, H, W): the error names x and its shape, with
    torch's message kept; other model failures pass through unchanged."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"failed on x, inputs of shape \(8, 8\).*to have 1 channels"):
        deepfool(net, x[:, 0])
    with pytest.raises(ValueError, match=r"inputs of shape \(1, 6, 8\).*shapes cannot be multiplied"):
        deepfool(net, x[:, :, :6])

    with pytest.raises(ValueError, match="logits do not depend on its input through autograd"):
        deepfool(lambda z: net(z).detach(), x)

    def broken(z):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="^boom$"):
        deepfool(broken, x)


def test_tiny_logits_overflow_the_step_with_a_clear_error_in_float32_only():
    """Logits scaled by 1e-30: squared gradient norms underflow float32 and the step overflows;
    the error says so (it used to blame the model for non-finite logits). float64 is exact."""
    model, x = _affine(D=12, L=4, N=5)
    single = copy.deepcopy(model).float()
    with pytest.raises(FloatingPointError, match="DeepFool step overflowed in torch.float32"):
        deepfool(lambda z: single(z) * 1e-30, x.float())
    # both within the refinement tolerance (1e-4 relative) of the boundary
    torch.testing.assert_close(deepfool(lambda z: model(z) * 1e-30, x).margin, deepfool(model, x).margin,
                               rtol=2e-4, atol=0)


def test_model_invariant_inside_a_member_fails_instead_of_a_huge_margin():
    """The boundary of a binary affine model whose w has no component in a DCT block never meets
    that block: the margin there is inf (not the ~1e15 a step along rounding noise would give),
    while a block that w touches keeps its exact margin."""
    from analytic import BinaryAffine

    from pyboundary import ops

    g = torch.Generator().manual_seed(5)
    coeffs = torch.randn(1, 1, 16, 16, generator=g, dtype=torch.float64)
    coeffs[..., :4, :4] = 0.0  # no low-frequency component
    w = ops.idct2(coeffs).reshape(-1)
    model = BinaryAffine(w, 0.2)
    x = torch.randn(6, 1, 16, 16, generator=g, dtype=torch.float64)
    fam = DCTDiagonal((1, 16, 16), K=4, T=4)
    res = deepfool(model, x, subspace=fam, subspace_index=torch.zeros(6, dtype=torch.int64))
    assert not bool(res.converged.any()) and bool(torch.isinf(res.margin).all())
    res = deepfool(model, x, subspace=fam, subspace_index=torch.ones(6, dtype=torch.int64))
    proj = fam.project(w.reshape(1, 1, 16, 16), torch.ones(1, dtype=torch.int64)).reshape(-1)
    exact = (x.flatten(1) @ w + 0.2).abs() / proj.norm()
    assert bool(res.converged.all())
    ratio = res.margin / exact
    assert bool((ratio >= 1 - 1e-12).all() and (ratio <= 1 + 1e-4).all())


class _GraphToken(torch.autograd.Function):
    """Identity that saves a token tensor for its backward: the token lives exactly as long as
    the saved tensors of the graph of the forward that made it (freed by a backward without
    retain_graph, or when the graph's outputs are dropped)."""

    live = 0

    @staticmethod
    def _gone():
        _GraphToken.live -= 1

    @staticmethod
    def forward(ctx, x):
        token = torch.zeros(1)
        _GraphToken.live += 1
        weakref.finalize(token, _GraphToken._gone)
        ctx.save_for_backward(token)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


@pytest.mark.parametrize("case", ["whole space", "subspace", "stages prune all"])
def test_no_forward_runs_while_an_earlier_graph_is_alive(cnn, digits, monkeypatch, case):
    """Memory: a batch's graph is gone before the next forward (holding it there doubled the peak
    of ImageNet batches): an iterate's graph is dropped before the next iterate's forward, and a
    graph is not retained for slots that a split re-forward computes instead. 'stages prune all'
    makes every pruning stage drop all further slots, so graphs retained for them are never used
    again (only dropping the iterate frees them)."""
    import inspect

    import pyboundary.attacks.deepfool as engine

    seen = []
    forward = engine._forward

    def counted(ctx, xa, grad_rows=0):
        seen.append((inspect.stack()[1].function, _GraphToken.live))
        return forward(ctx, xa, grad_rows)

    monkeypatch.setattr(engine, "_forward", counted)
    if case == "stages prune all":
        def first_two(gap_abs, norms01, mask, dist01=None):
            return mask & (torch.arange(mask.shape[1]) < 2)

        def first_only(gap_abs, now0, last, mask, dist0=None):
            return mask & (torch.arange(mask.shape[1]) < 1)

        monkeypatch.setattr(engine, "_second_stage_mask", first_two)
        monkeypatch.setattr(engine, "_later_stage_mask", first_only)

    def model(x):
        return cnn(_GraphToken.apply(x) if x.requires_grad else x)

    x = digits[0][1600:1664]
    kw = {}
    if case == "subspace":
        sub = DCTDiagonal((1, 8, 8), K=4, T=2)
        kw = {"subspace": sub, "subspace_index": torch.arange(64) % sub.n_members, "max_iter": 100}
    res = deepfool(model, x, memory_budget="off", **kw)
    iterates = [live for caller, live in seen if caller == "_iterate"]
    assert len(iterates) >= 3 and res.iterations.float().mean() > 1.2  # several iterates
    assert max(live for _, live in seen) == 0, seen
    if case != "stages prune all":
        assert any(caller == "_pruned_gradients" for caller, _ in seen)  # the split path ran

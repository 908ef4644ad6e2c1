"""Tight mode of the DeepFool engine (``deepfool(..., tight=True)``): exact minimal perturbations on
piecewise-affine models (a wedge, affine models in a box) and a curved 2-D toy, where plain DeepFool
is visibly not minimal; invariants on a trained CNN; the min-norm solver of the polish against scipy."""

import math

import numpy as np
import pytest
import torch
from analytic import Affine
from digits_models import digits_cnn
from scipy.optimize import linprog, minimize
from torch import nn

from pyboundary.attacks.deepfool import deepfool
from pyboundary.attacks.tight import TIGHT_CLASS_POOL, TIGHT_CLASS_RATIO, min_norm_point
from pyboundary.subspaces import RandomSubspaces

# ------------------------------------------------------------------------------ references


def _min_norm_reference(A, c, p, lo=None, hi=None):
    """min ||d||_p s.t. A d >= c (rows), lo <= d <= hi, by scipy in float64 (LP for p = inf)."""
    k, m = A.shape
    bounds = [(None, None)] * m if lo is None else list(zip(lo, hi))
    if math.isinf(p):
        obj = np.r_[np.zeros(m), 1.0]
        rows, ub = [], []
        for j in range(m):
            for sgn in (1.0, -1.0):
                r = np.zeros(m + 1)
                r[j], r[m] = sgn, -1.0
                rows.append(r)
                ub.append(0.0)
        for i in range(k):
            rows.append(np.r_[-A[i], 0.0])
            ub.append(-c[i])
        res = linprog(obj, A_ub=np.array(rows), b_ub=np.array(ub), bounds=bounds + [(0, None)], method="highs")
        assert res.status == 0
        return res.fun, res.x[:m]
    cons = [{"type": "ineq", "fun": (lambda z, i=i: A[i] @ z - c[i]), "jac": (lambda z, i=i: A[i])}
            for i in range(k)]
    res = minimize(lambda z: 0.5 * z @ z, np.zeros(m), jac=lambda z: z, constraints=cons,
                   bounds=None if lo is None else bounds, method="SLSQP",
                   options={"ftol": 1e-16, "maxiter": 1000})
    assert res.success
    return math.sqrt(2 * res.fun), res.x


class Wedge(nn.Module):
    """Class 1 iff x lies in the wedge {a_1 . x + b_1 > 0, a_2 . x + b_2 > 0}: logits (0, min(l_1, l_2))
    (piecewise affine; the nearest point of the wedge from outside is the projection onto a
    convex polytope, on a facet or on the edge)."""

    def __init__(self, A, b):
        super().__init__()
        self.A = nn.Parameter(torch.as_tensor(A))
        self.b = nn.Parameter(torch.as_tensor(b))

    def forward(self, x):
        lin = x.reshape(x.shape[0], -1) @ self.A.T + self.b
        f = lin.min(1).values
        return torch.stack([torch.zeros_like(f), f], 1)


def _wedge_cases(D, seed, n, *, p, box, sub=None, edge):
    """Seeded wedges and inputs outside them (class 0): (model, x, exact margin) for cases whose
    optimum has ``edge`` (True: both facets active; False: one) and where plain DeepFool's margin
    is > 0.1 % above the exact one. Facet cases are built so that DeepFool's first step goes to the
    other facet: the optimum y on facet 2 lies inside facet 1, x = y - t u (u the steepest
    direction of l_2 for the norm), and l_1(x) < l_2(x) (DeepFool linearises the smaller piece)."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for _ in range(400):
        A = torch.randn(2, D, generator=g, dtype=torch.float64)
        if edge:
            A[1] = -0.5 * A[0] + torch.randn(D, generator=g, dtype=torch.float64)
            b = torch.randn(2, generator=g, dtype=torch.float64)
            x = torch.rand(1, D, generator=g, dtype=torch.float64) if box else torch.randn(1, D, generator=g, dtype=torch.float64)
        else:
            A[0] = 2 * A[1] + 0.7 * A[0]
            y = 0.25 + 0.5 * torch.rand(D, generator=g, dtype=torch.float64)
            t = 0.1 + 0.1 * float(torch.rand(1, generator=g))
            u = A[1].sign() if math.isinf(p) else A[1] / A[1].norm()
            x = (y - t * u).unsqueeze(0)
            b2 = -(A[1] @ y)
            l2x = A[1] @ x[0] + b2
            b1 = -(A[0] @ x[0]) + 1.5 * l2x  # l_1(x) = 1.5 l_2(x) < l_2(x) < 0
            b = torch.stack([b1, b2])
        model = Wedge(A, b)
        with torch.no_grad():
            if model(x).argmax(1).item() != 0:
                continue
        B = np.eye(D) if sub is None else sub.basis(0).numpy()
        An = (A.numpy() @ B)
        cn = -(b.numpy() + A.numpy() @ x[0].numpy())
        lo = hi = None
        if box:
            if x.min() < 0 or x.max() > 1:
                continue
            lo, hi = -x[0].numpy(), 1 - x[0].numpy()
        try:
            val, d = _min_norm_reference(An, cn, p, lo, hi)
        except AssertionError:
            continue
        slack = An @ d - cn
        n_active = int((np.abs(slack) <= 1e-7 * max(1.0, abs(val))).sum())
        if (n_active == 2) != edge:
            continue
        clamp = (0.0, 1.0) if box else None
        plain = deepfool(model, x, p=p, clamp=clamp, subspace=sub, tol=1e-10)
        if not plain.converged.all() or plain.margin[0] <= val * (1 + 1e-3):
            continue  # keep the wedges where plain DeepFool is visibly not minimal
        cases.append((model, x, val))
        if len(cases) == n:
            break
    return cases


def _check(model, x, res, exact, p, rtol):
    with torch.no_grad():
        assert (model(x + res.perturbation).argmax(1) != res.orig_label).all()
    torch.testing.assert_close(res.margin, exact, rtol=rtol, atol=0)
    assert (res.margin <= res.deepfool_margin * (1 + 1e-12)).all()


@pytest.mark.parametrize("p,box,edge", [
    (2, False, True), (2, False, False), (2, True, False), (math.inf, False, False), (math.inf, True, False),
])
def test_wedge_whole_space_exact(p, box, edge):
    """The nearest point of a wedge: on its edge (two facets; p = 2 without a box, where the polish
    solves the two-constraint problem) or on one facet (every norm, box or not). Plain DeepFool
    follows the active piece at x and lands elsewhere on the boundary."""
    p = math.inf if p == math.inf else 2.0
    cases = _wedge_cases(6, seed=1, n=5, p=p, box=box, edge=edge)
    assert len(cases) >= 3
    for model, x, val in cases:  # (plain DeepFool is > 0.1 % above the exact margin on each)
        clamp = (0.0, 1.0) if box else None
        res = deepfool(model, x, p=p, clamp=clamp, tight=True, tol=1e-10)
        exact = torch.tensor([val], dtype=torch.float64)
        _check(model, x, res, exact, p, rtol=1e-6)
        assert res.deepfool_margin[0] > exact[0] * (1 + 1e-3)
        assert res.tight_forward > 0 and res.tight_backward > 0


def test_wedge_random_subspace_exact():
    """Inside a random 4-dim subspace of R^8 (coordinates of the member), edge optimum, L2."""
    sub = RandomSubspaces((8,), dim=4, n=1, seed=3)
    cases = _wedge_cases(8, seed=2, n=4, p=2.0, box=False, sub=sub, edge=True)
    assert len(cases) >= 3
    for model, x, val in cases:
        res = deepfool(model, x, subspace=sub, tight=True, tol=1e-10)
        _check(model, x, res, torch.tensor([val], dtype=torch.float64), 2.0, rtol=1e-6)
        # the perturbation stays in the member
        pert = res.perturbation
        assert (pert - sub.project(pert, torch.zeros(1, dtype=torch.int64))).norm() <= 1e-9 * pert.norm()
        assert res.deepfool_margin[0] > val * (1 + 1e-3)


def _affine_box_exact(model, x, p, lo, hi):
    """Exact distance from x to the complement of its affine region inside [lo, hi]^D (any norm):
    the smallest over classes c of the box-constrained distance to {f_c >= f_ref}."""
    out = []
    with torch.no_grad():
        f = model(x)
        ref = f.argmax(1)
    for i in range(x.shape[0]):
        best = math.inf
        for c in range(f.shape[1]):
            if c == int(ref[i]):
                continue
            a = (model.W[c] - model.W[ref[i]]).detach().numpy()[None]
            rhs = -(f[i, c] - f[i, ref[i]]).item()
            try:
                val, _ = _min_norm_reference(a, np.array([rhs]), p, lo - x[i].numpy(), hi - x[i].numpy())
            except AssertionError:
                continue
            best = min(best, val)
        out.append(best)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("p", [2, math.inf])
def test_affine_in_box_exact(p):
    """Affine classifier, inputs in [0, 1]^D with coordinates at the faces: the margin inside the
    box is the box-constrained distance to the nearest facet (multi-class), and the tight mode
    keeps it exact (its polish solves the linearised box problem exactly; the wedges above are
    the cases where plain DeepFool is not minimal in a box)."""
    p = math.inf if p == math.inf else 2.0
    model = Affine.random(12, n_classes=4, seed=4)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(10, 12, generator=g, dtype=torch.float64)
    x[:, :4] = 0.0
    x[:, 4:6] = 1.0
    with torch.no_grad():
        model.b.mul_(0.1)
    exact = _affine_box_exact(model, x, p, 0.0, 1.0)
    assert torch.isfinite(exact).all()
    res = deepfool(model, x, p=p, clamp=(0.0, 1.0), tight=True, tol=1e-10)
    adv = x + res.perturbation
    assert adv.min() >= 0 and adv.max() <= 1
    _check(model, x, res, exact, p, rtol=1e-6)


class Parabola(nn.Module):
    """2-D, class 1 above the parabola x_2 = a x_1^2 + 1: logits (0, x_2 - a x_1^2 - 1)."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x):
        return torch.stack([torch.zeros_like(x[:, 0]), x[:, 1] - self.a * x[:, 0] ** 2 - 1], 1)

    def distance(self, x):
        """To the nearest point (t, a t^2 + 1): d/dt of the squared distance / 2 is the cubic
        2 a^2 t^3 + (1 + 2 a (1 - x_2)) t - x_1; the best of its real roots."""
        out = []
        for x1, x2 in x.tolist():
            roots = np.roots([2 * self.a ** 2, 0.0, 1.0 + 2 * self.a * (1.0 - x2), -x1])
            real = roots[np.abs(roots.imag) < 1e-9].real
            out.append(min(math.hypot(t - x1, self.a * t * t + 1 - x2) for t in real))
        return torch.tensor(out, dtype=torch.float64)


def test_curved_toy_within_1e4():
    """A convex adversarial set (above a parabola of curvature 2a = 0.6 at its vertex) seen from
    points at distance 0.4-1.4: curvature x distance < 1, where the linearised steps of the polish
    converge. DeepFool follows the gradient, not the normal through x, and lands elsewhere."""
    x = torch.tensor([[1.0, 0.0], [0.5, -0.3], [-1.5, 0.5], [2.0, 1.0], [0.2, 0.3], [-0.8, 0.2]],
                     dtype=torch.float64)
    model = Parabola(0.3)
    exact = model.distance(x)
    res = deepfool(model, x, tight=True, tol=1e-10)
    assert res.converged.all()
    assert ((res.margin - exact).abs() <= 1e-4 * exact).all()
    assert (res.deepfool_margin > exact * (1 + 1e-3)).sum() >= 3  # DeepFool is visibly above


def test_min_norm_point_against_scipy():
    g = torch.Generator().manual_seed(0)
    n, m = 4, 9
    G = torch.randn(n, 2, m, generator=g, dtype=torch.float64)
    beta = torch.rand(n, 2, generator=g, dtype=torch.float64) + 0.1
    x = torch.rand(n, m, generator=g, dtype=torch.float64)
    for p in (2.0, math.inf):
        for box in (False, True):
            lo, hi = (-x, 1 - x) if box else (None, None)
            k = 2 if (p == 2.0 and not box) else 1  # the constraints the solver uses exactly
            d, val = min_norm_point(G[:, :k], beta[:, :k], lo, hi, p)
            for i in range(n):
                ref, _ = _min_norm_reference(G[i, :k].numpy(), beta[i, :k].numpy(), p,
                                             None if lo is None else lo[i].numpy(),
                                             None if hi is None else hi[i].numpy())
                assert abs(val[i].item() - ref) <= 1e-8 * ref
                assert (G[i, :k] @ d[i] - beta[i, :k]).min() >= -1e-9
                if box:
                    assert (d[i] >= lo[i] - 1e-12).all() and (d[i] <= hi[i] + 1e-12).all()


# ------------------------------------------------------------------------------ trained CNN


@pytest.fixture(scope="module")
def cnn64():
    m, x, _ = digits_cnn(seed=1, dtype=torch.float64, train_batch_size=256)
    return m, x[1600:1640]


@pytest.mark.parametrize("p,clamp", [(2, None), (2, (0.0, 1.0)), (math.inf, (0.0, 1.0)), (math.inf, None)])
def test_trained_cnn_invariants(cnn64, p, clamp):
    model, x = cnn64
    tol = 1e-4
    res = deepfool(model, x, p=p, clamp=clamp, tight=True, tol=tol)
    plain = deepfool(model, x, p=p, clamp=clamp, tol=tol)
    ok = res.converged
    assert ok.all()
    torch.testing.assert_close(res.deepfool_margin, plain.margin)
    assert (res.margin <= plain.margin).all()  # never worse than plain DeepFool, per sample
    assert (res.margin < plain.margin * 0.999).float().mean() > 0.5  # and mostly better
    adv = x + res.perturbation
    if clamp is not None:
        assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        logits = model(adv)
        inner = model(x + res.perturbation * (1 - 2 * tol))
    assert (logits.argmax(1) != res.orig_label).all()  # adversarial
    assert (logits.argmax(1) == res.adv_label).all()
    assert (inner.argmax(1) == res.orig_label).all()  # on the boundary within tol along its ray
    norms = adv.sub(x).flatten(1)
    norms = norms.abs().amax(1) if p == math.inf else norms.norm(dim=1)
    torch.testing.assert_close(norms, res.margin, rtol=1e-9, atol=0)
    s = res.summary()
    assert s["tight"]["n_backward"] == res.tight_backward and s["tight"]["median_ratio_to_deepfool"] < 1
    assert "tight:" in res.format_summary()


def test_trained_cnn_batched_equals_one_at_a_time(cnn64):
    model, x = cnn64
    x = x[:8]
    batched = deepfool(model, x, clamp=(0.0, 1.0), tight=True)
    single = deepfool(model, x, clamp=(0.0, 1.0), tight=True, batch_size=1)
    torch.testing.assert_close(batched.margin, single.margin, rtol=1e-9, atol=0)
    torch.testing.assert_close(batched.perturbation, single.perturbation, rtol=1e-9, atol=1e-12)
    assert torch.equal(batched.adv_label, single.adv_label)
    # a polish query whose bound ties the best within float rounding (the model's batched and
    # single-row arithmetic differ in the last bits) may or may not be made, and then the next
    # one: two polish steps at most, the same point and margin either way (checked above)
    assert (batched.tight_steps - single.tight_steps).abs().max() <= 2


def test_tight_in_subspace_and_targeted(cnn64):
    model, x = cnn64
    sub = RandomSubspaces((1, 8, 8), dim=16, n=3, seed=0)
    idx = torch.arange(x.shape[0]) % 3
    res = deepfool(model, x, subspace=sub, subspace_index=idx, tight=True, max_iter=100)
    ok = res.converged
    assert ok.float().mean() > 0.8
    assert (res.margin[ok] <= res.deepfool_margin[ok]).all()
    assert (res.margin[ok] < res.deepfool_margin[ok] * 0.999).float().mean() > 0.3
    pert = res.perturbation[ok]
    outside = (pert - sub.project(pert, idx[ok])).flatten(1).norm(dim=1)
    assert (outside <= 1e-9 * pert.flatten(1).norm(dim=1)).all()
    with torch.no_grad():
        assert (model(x[ok] + pert).argmax(1) != res.orig_label[ok]).all()
    with torch.no_grad():
        target = model(x).topk(3, dim=1).indices[:, 2]
    tres = deepfool(model, x, target=target, tight=True)
    ok = tres.converged
    assert ok.float().mean() > 0.9
    assert (tres.margin[ok] <= tres.deepfool_margin[ok]).all()
    assert (tres.margin[ok] < tres.deepfool_margin[ok] * 0.999).any()
    with torch.no_grad():
        assert (model(x[ok] + tres.perturbation[ok]).argmax(1) == target[ok]).all()


def test_inputs_outside_the_box_are_refused(cnn64):
    model, x = cnn64
    with pytest.raises(ValueError, match="inside the clamp box"):
        deepfool(model, x + 5, clamp=(0.0, 1.0))
    with pytest.raises(ValueError, match="input 3"):
        y = x.clone()
        y[3, 0, 0, 0] = -0.5
        deepfool(model, y, clamp=(0.0, 1.0))
    with pytest.raises(TypeError, match="tight"):
        deepfool(model, x, tight="yes")
    with pytest.raises(ValueError, match="tight_steps"):
        deepfool(model, x, tight=True, tight_steps=0)


def _linearised_class_distances(model, x, labels, p, clamp, space=None, idx=None):
    """(N, L) float64 distance at x to each class's linearised boundary {f_c - f_ref >= 0}, in the
    box / the member's coordinates, by scipy (inf for the reference class)."""
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    n, L = out.shape
    dist = np.full((n, L), np.inf)
    for c in range(L):
        gap = out[:, c] - out.gather(1, labels[:, None]).squeeze(1)
        (g,) = torch.autograd.grad(gap.sum(), xr, retain_graph=True)
        g = g.flatten(1) if space is None else space._analysis(g, idx)
        gap = gap.detach()
        for i in range(n):
            if c == int(labels[i]):
                continue
            lo = hi = None
            if clamp is not None:
                xi = x[i].flatten().double().numpy()
                lo, hi = clamp[0] - xi, clamp[1] - xi
            dist[i, c] = _one_constraint_distance(g[i].double().numpy(), -float(gap[i]), p, lo, hi)
    return dist


def _one_constraint_distance(g, b, p, lo=None, hi=None):
    """min ||d||_p s.t. g . d >= b, lo <= d <= hi, float64: coordinate i moves towards sign(g_i) by
    min(lam |g_i|, room_i) (p = 2) or min(lam, room_i) (p = inf), lam found by bisection."""
    if b <= 0:
        return 0.0
    a = np.abs(g)
    room = np.full_like(a, np.inf) if lo is None else np.where(g > 0, hi, -lo).clip(min=0)
    if (a * room).sum() < b:
        return np.inf

    def moves(lam):
        return np.minimum(lam * a, room) if p == 2 else np.minimum(lam, room) * (a > 0)

    lo_l, hi_l = 0.0, 1.0
    while (a * moves(hi_l)).sum() < b:
        hi_l *= 2
    for _ in range(200):
        mid = (lo_l + hi_l) / 2
        lo_l, hi_l = (mid, hi_l) if (a * moves(mid)).sum() < b else (lo_l, mid)
    d = moves(hi_l)
    return float(np.sqrt((d * d).sum()) if p == 2 else d.max())


@pytest.mark.parametrize("p, clamp, in_subspace", [(2, (0.0, 1.0), False), (math.inf, None, False), (2, None, True)])
def test_tight_classes_is_the_nearest_of_the_targeted_searches(cnn64, p, clamp, in_subspace):
    """tight_classes=k: per sample the nearest of the untargeted tight point and the targeted tight
    points towards up to k other classes: those (reference and reached class excluded) whose
    linearised distance at x is within TIGHT_CLASS_RATIO of the nearest class's, nearest first."""
    model, x = cnn64
    x = x[:24]
    kw = dict(p=p, clamp=clamp, tight=True)
    space = idx = None
    if in_subspace:
        space, idx = RandomSubspaces((1, 8, 8), dim=16, n=2, seed=0), torch.arange(24) % 2
        kw.update(subspace=space, subspace_index=idx, max_iter=100)
    base = deepfool(model, x, tight_classes=0, **kw)
    wide = deepfool(model, x, tight_classes=2, **kw)
    default = deepfool(model, x, **kw)
    ok = base.converged & ~base.misclassified
    assert bool(ok.all() if not in_subspace else ok.float().mean() > 0.8)
    dist = _linearised_class_distances(model, x, base.orig_label, p, clamp, space, idx)
    expect = base.margin.clone()
    searched = 0
    for i in ok.nonzero().squeeze(1).tolist():
        d = dist[i].copy()
        near = d.min()
        d[int(base.adv_label[i])] = np.inf
        for c in [c for c in np.argsort(d, kind="stable") if d[c] <= TIGHT_CLASS_RATIO * near][:2]:
            one = dict(kw, subspace_index=idx[i:i + 1]) if in_subspace else kw
            t = deepfool(model, x[i:i + 1], target=torch.tensor([int(c)]), **one)
            if bool(t.converged[0]):
                expect[i] = min(expect[i], t.margin[0])
            searched += 1
    assert 0 < searched < 2 * int(ok.sum())  # the screening searched some classes, not all
    # one at a time vs batched: the same points up to the batch's rounding
    torch.testing.assert_close(wide.margin[ok], expect[ok], rtol=1e-6, atol=0)
    torch.testing.assert_close(default.margin, wide.margin, rtol=0, atol=0)
    assert bool((wide.margin[ok] <= base.margin[ok]).all())
    assert bool((wide.margin[ok] < base.margin[ok] * 0.999).any())  # another class is nearer somewhere
    # the returned points are adversarial, of the class reported, with the reported norm
    pert = wide.perturbation[ok]
    with torch.no_grad():
        pred = model(x[ok] + pert).argmax(1)
    assert torch.equal(pred, wide.adv_label[ok]) and bool((pred != wide.orig_label[ok]).all())
    if not in_subspace:
        norms = pert.flatten(1).norm(p=p, dim=1)
        torch.testing.assert_close(norms, wide.margin[ok], rtol=1e-9, atol=1e-12)
    # the extra passes are counted as tight passes; deepfool_margin stays DeepFool's
    assert wide.tight_forward > base.tight_forward and wide.n_backward > base.n_backward
    assert torch.equal(wide.deepfool_margin, base.deepfool_margin)


def test_tight_classes_refusals(cnn64):
    model, x = cnn64
    with pytest.raises(ValueError, match="tight_classes needs tight=True"):
        deepfool(model, x[:2], tight_classes=1)
    with pytest.raises(ValueError, match="untargeted"):
        deepfool(model, x[:2], tight=True, tight_classes=1, target=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="tight_classes"):
        deepfool(model, x[:2], tight=True, tight_classes=-1)


def test_class_distances_shared_by_rows_of_one_input(cnn64):
    """The linearised class distances of the tight_classes screening are computed once per
    distinct input (one image x many subspaces, as in a scan), with the results of rows alone."""
    model, x = cnn64
    space = RandomSubspaces((1, 8, 8), dim=16, n=4, seed=0)
    xs, idx = x[:6].repeat_interleave(4, dim=0), torch.arange(24) % 4
    kw = dict(subspace=space, subspace_index=idx, tight=True, max_iter=100)
    shared = deepfool(model, xs, batch_size=24, **kw)
    alone = deepfool(model, xs, batch_size=1, **kw)
    torch.testing.assert_close(shared.margin, alone.margin, rtol=1e-6, atol=0)
    assert torch.equal(shared.adv_label, alone.adv_label)
    # the engine's first step and the distances: one forward of the 6 images each, 9 classes
    assert shared.trace.count((6, 9)) == 2 and (24, 9) not in shared.trace


def test_tight_class_screening_options(cnn64, monkeypatch):
    """tight_class_ratio=inf searches the nearest two classes by linearised distance unscreened;
    at most TIGHT_CLASS_POOL classes are screened; candidates=2 leaves no class to screen."""
    import pyboundary.attacks.deepfool as engine

    model, x = cnn64
    x = x[:16]
    screened = deepfool(model, x, tight=True)
    wide = deepfool(model, x, tight=True, tight_class_ratio=math.inf)
    assert wide.n_backward > screened.n_backward  # more classes searched
    assert bool((wide.margin <= screened.margin * (1 + 1e-9)).all())
    with pytest.raises(ValueError, match="tight_class_ratio"):
        deepfool(model, x[:2], tight=True, tight_class_ratio=0.5)
    with pytest.raises(ValueError, match="tight_class_ratio needs tight=True"):
        deepfool(model, x[:2], tight_class_ratio=2.0)

    shapes = []
    estimates = engine._class_estimates

    def spy(ctx, ch, rows):
        est = estimates(ctx, ch, rows)
        shapes.append(tuple(est.shape))
        return est

    monkeypatch.setattr(engine, "_class_estimates", spy)
    wide_model = nn.Sequential(model, nn.Linear(10, 20).double())  # 20 classes
    deepfool(wide_model, x[:4], tight=True, candidates=20, max_iter=200)
    assert shapes and all(s[1] == TIGHT_CLASS_POOL for s in shapes)  # not all 19 other classes
    shapes.clear()
    two = deepfool(model, x[:4], tight=True, candidates=2)
    assert not shapes  # nothing to screen
    torch.testing.assert_close(two.margin, deepfool(model, x[:4], tight=True, tight_classes=0, candidates=2).margin)

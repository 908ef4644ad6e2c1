"""find_path does not depend on how the logits of a region are scaled (issue 14, part 3).

The same curved regions (an annulus, the outside of a ball, a crescent) are given by several
logit functions (the signed distance, scaled by 1e-3 and 1e3, squared, cubed): with the defaults
every pair must be joined by a valid path, and by the same path whatever the logits.
"""

import pytest
import torch
from analytic import Annulus, CurvedRegion

from pyboundary.geometry import topology as topo

pytestmark = pytest.mark.usefixtures("one_thread")

TRANSFORMS = ("sdf", "x1e-3", "x1e3", "square", "cube")
PAIRS = {
    # segments through the hole / the ball / the bite of the crescent; annulus points get three
    # extra coordinates (the hole is a cylinder in R^5)
    "annulus": [([1.5, 0.0, 0, 0, 0], [-1.5, 0.3, 0, 0, 0]), ([0.0, 1.2, 0, 0, 0], [0.1, -1.8, 0, 0, 0]),
                ([1.2, 1.0, 0, 0, 0], [-1.3, -0.9, 0, 0, 0])],
    "ball-exterior": [([1.5, 0, 0, 0, 0.1], [-1.5, 0.1, 0, 0, 0]), ([0, 2.0, 0.2, 0, 0], [0.1, -1.3, 0, 0.3, 0])],
    "crescent": [([0.5, 1.8], [0.4, -1.85]), ([-0.2, 1.95], [0.1, -1.9])],
}


def _inside(model, a, b, n=2000):
    t = torch.linspace(0, 1, n, dtype=a.dtype).view(-1, 1)
    return bool((model(a + t * (b - a)).argmax(1) == 0).all())


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_same_path_for_every_logit_function_of_the_region(kind):
    for a, b in PAIRS[kind]:
        x1, x2 = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        assert not _inside(CurvedRegion(kind), x1, x2), "the straight segment must leave the region"
        results = {t: topo.find_path(CurvedRegion(kind, t), x1, x2) for t in TRANSFORMS}
        for t, res in results.items():
            assert res.valid, (kind, t, res.reason)
            model = CurvedRegion(kind)
            for p, q in zip(res.anchors[:-1], res.anchors[1:]):
                assert _inside(model, p, q), (kind, t)
        # the outcome is the region's, not the logits': same anchors for every logit function
        ref = results["sdf"]
        for t, res in results.items():
            assert res.anchors.shape == ref.anchors.shape and res.depth == ref.depth, (kind, t)
            torch.testing.assert_close(res.anchors, ref.anchors, atol=0.05, rtol=0), (kind, t)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("transform", [None, lambda s: s * s.abs(), lambda s: s ** 3])
def test_polynomial_annulus_under_scalings(scale, transform):
    # the shared test model (logit gap (r^2 - 1)(4 - r^2)), rescaled and raised to powers. (A
    # saturating transform such as tanh is out of scope: DeepFool's linear model of a flat,
    # saturated gap sends the midpoint across the ring, so no direction into the region is found.)
    model = Annulus(scale=scale, transform=transform)
    x1 = torch.tensor([1.5, 0.0], dtype=torch.float64)
    x2 = torch.tensor([-1.5, 0.3], dtype=torch.float64)
    res = topo.find_path(model, x1, x2)
    assert res.valid, res.reason
    assert res.anchors.shape[0] <= 6 and res.ratio > 1.2


def test_repaired_midpoint_sits_at_the_depth_asked_for():
    # segment (1.5, 0) -> (-1.5, 0.3): the midpoint (0, 0.15) is in the hole; DeepFool's
    # direction there is radial, the crossing is at r = 1 and the point goes on by
    # push_depth * |segment| (the ring is 1 wide: no second crossing within that depth)
    model = CurvedRegion("annulus", "x1e3")
    x1 = torch.tensor([1.5, 0.0], dtype=torch.float64)
    x2 = torch.tensor([-1.5, 0.3], dtype=torch.float64)
    seg = float((x2 - x1).norm())
    for depth in (0.05, 0.1, 0.2):
        res = topo.find_path(model, x1, x2, push_depth=depth, max_depth=1)
        r = float(res.anchors[1].norm())
        assert abs(r - (1 + depth * seg)) <= 0.02 * depth * seg + 1e-9, (depth, r)


def test_thin_region_gets_the_middle_of_the_chord():
    # ring 1 < r < 1.05: the asked depth (0.1 x 3) exceeds the width, so the point lands midway
    model = CurvedRegion("annulus", "sdf", r1=1.0, r2=1.05)
    x1 = torch.tensor([1.02, 0.0], dtype=torch.float64)
    x2 = torch.tensor([-1.02, 0.1], dtype=torch.float64)
    first = topo.find_path(model, x1, x2, max_depth=1)
    assert abs(float(first.anchors[1].norm()) - 1.025) < 0.01
    res = topo.find_path(model, x1, x2)
    assert res.valid, res.reason
    for p, q in zip(res.anchors[:-1], res.anchors[1:]):
        assert _inside(model, p, q)


def test_push_depth_is_validated():
    model = CurvedRegion("annulus")
    x1 = torch.tensor([1.5, 0.0], dtype=torch.float64)
    x2 = torch.tensor([-1.5, 0.3], dtype=torch.float64)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="push_depth"):
            topo.find_path(model, x1, x2, push_depth=bad)
    with pytest.raises(TypeError, match="push_depth"):
        topo.find_path(model, x1, x2, push_depth="deep")

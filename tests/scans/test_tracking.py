import math

import numpy as np
import pytest
import torch
from analytic import BinaryAffine
from torch import nn

from pyboundary.scans.tracking import MarginTracker

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    y = (x.flatten(1)[:, 0] < 0).long()  # class 0 iff x_0 > 0
    return x, y


def _se(v):
    v = np.asarray(v, dtype=np.float64)
    return math.sqrt(((v - v.mean()) ** 2).sum()) / v.size


def test_statistics_match_hand_computation():
    x, y = _data()
    xt, yt = _data(30, seed=1)
    model = BinaryAffine([1.0, 0.5, -0.3, 0.2], 0.1)
    tr = MarginTracker(x, y, xt, yt, n_track=25, seed=3, deepfool_kwargs={"tol": 1e-8})
    tr.measure(0, model)
    assert tr.epochs == [0]
    for split, xs, ys in (("train", x, y), ("test", xt, yt)):
        idx = tr.indices[split]
        assert len(idx) == 25 and len(set(idx.tolist())) == 25
        xx, yy = xs[idx], ys[idx].numpy()
        l2, linf = model.margins(xx)
        pred = model(xx).argmax(1).numpy()
        ok = pred == yy
        assert 0 < ok.sum() < 25  # both groups present
        st = tr.stats(0)
        for norm, ref in (("l2", l2.numpy()), ("linf", linf.numpy())):
            np.testing.assert_allclose(tr.margins[(split, norm)][0], ref, rtol=1e-5)
            s = st[(split, norm)]
            assert s["accuracy"] == pytest.approx(ok.mean())
            assert s["all"]["mean"] == pytest.approx(ref.mean(), rel=1e-5)
            assert s["all"]["se"] == pytest.approx(_se(ref), rel=1e-4)
            assert s["correct"]["mean"] == pytest.approx(ref[ok].mean(), rel=1e-5)
            assert s["wrong"]["mean"] == pytest.approx(ref[~ok].mean(), rel=1e-5)
            assert s["wrong"]["se"] == pytest.approx(_se(ref[~ok]), rel=1e-4)
            assert s["correct"]["n_converged"] == ok.sum() and s["all"]["n_failed"] == 0


class HalfFlat(nn.Module):
    """[x_0, 0] where x_1 > 0; constant [2, 0] elsewhere (no boundary reachable: DeepFool fails)."""

    def forward(self, x):
        f = x.flatten(1)
        s = torch.where(f[:, 1] > 0, f[:, 0], 2 * torch.ones_like(f[:, 0]) + 0 * f[:, 0])
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_failed_margins_are_counted_not_averaged():
    x, y = _data(20, seed=2)
    tr = MarginTracker(x, y, n_track=20, ps=(2,), deepfool_kwargs={"max_iter": 5})
    st = tr.measure(0, HalfFlat())
    f = x.flatten(1)
    flat = (f[:, 1] <= 0).numpy()
    m = tr.margins[("train", "l2")][0]
    assert np.isinf(m[flat[tr.indices["train"].numpy()]]).all()
    s = st[("train", "l2")]["all"]
    assert s["n_failed"] == int(flat.sum()) and s["n_converged"] == 20 - int(flat.sum())
    good = m[np.isfinite(m)]
    assert s["mean"] == pytest.approx(good.mean()) and np.isfinite(s["mean"])


def test_transitions_follow_per_epoch_correctness(tmp_path):
    from pyboundary.scans.store import ResultStore

    x, y = _data(30)
    models = [BinaryAffine([1.0, 0, 0, 0], 0.0), BinaryAffine([-1.0, 0, 0, 0], 0.0),
              BinaryAffine([1.0, 1.0, 0, 0], 0.0), BinaryAffine([1.0, 1.0, 0, 0], 0.0)]
    store = ResultStore(tmp_path / "t.sqlite", mode="create", meta={"test": 1})
    tr = MarginTracker(x, y, n_track=30, store=store, every=1)
    for e, m in enumerate(models):
        tr(e, m)
    store.close()
    trans = tr.transitions("train")
    assert [(t["from"], t["to"]) for t in trans] == [(0, 1), (1, 2), (2, 3)]
    for t in trans:
        a, b = tr.correct("train", t["from"]), tr.correct("train", t["to"])
        assert t["right_right"] == (a & b).sum() and t["wrong_wrong"] == (~a & ~b).sum()
        assert t["wrong_right"] == (~a & b).sum() and t["right_wrong"] == (a & ~b).sum()
        assert sum(t[k] for k in ("right_right", "right_wrong", "wrong_right", "wrong_wrong")) == 30
        idx = tr.indices["train"].numpy()
        np.testing.assert_array_equal(t["to_right"], idx[~a & b])
    # model 0 is the true rule (all right), model 1 its negation (all wrong)
    assert trans[0]["right_wrong"] == 30 and trans[0]["wrong_right"] == 0
    assert trans[1]["right_wrong"] == 0 and trans[2]["right_right"] + trans[2]["wrong_wrong"] == 30
    # the store holds every row and rebuilds the same results
    back = MarginTracker.from_store(ResultStore(tmp_path / "t.sqlite"))
    assert back.epochs == [0, 1, 2, 3] and back.splits == ["train"] and back.norms == ["l2", "linf"]
    for e in back.epochs:
        np.testing.assert_allclose(back.margins[("train", "linf")][e], tr.margins[("train", "linf")][e])
        np.testing.assert_array_equal(back.correct("train", e), tr.correct("train", e))
    assert [t["wrong_right"] for t in back.transitions("train")] == [t["wrong_right"] for t in trans]
    # plots
    tr.plot_curves(tmp_path / "c.png")
    tr.plot_histograms("train", "l2", path=tmp_path / "h.png")
    tr.plot_transitions("train", path=tmp_path / "s.png")
    for f in ("c.png", "h.png", "s.png"):
        assert (tmp_path / f).stat().st_size > 2000


def test_every_and_bad_arguments():
    x, y = _data(10)
    model = BinaryAffine([1.0, 0, 0, 0], 0.0)
    tr = MarginTracker(x, y, n_track=5, every=2, ps=("inf",))
    for e in range(4):
        tr(e, model)
    assert tr.epochs == [0, 2] and tr.norms == ["linf"]
    with pytest.raises(ValueError, match="already measured"):
        tr.measure(2, model)
    with pytest.raises(ValueError, match="n_track"):
        MarginTracker(x, y, n_track=0)
    with pytest.raises(ValueError, match="ps must"):
        MarginTracker(x, y, ps=(1,))
    with pytest.raises(ValueError, match="labels_train"):
        MarginTracker(x, y[:-1])
    with pytest.raises(ValueError, match="at least one"):
        MarginTracker(None, None)


def test_tracker_as_train_callback_with_adversarial_training():
    from pyboundary import zoo as models
    from pyboundary.attacks.pgd import pgd_batch_transform

    g = torch.Generator().manual_seed(0)
    x = torch.rand(96, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    torch.manual_seed(0)
    model = models.build("mlp", (1, 8, 8), 2)
    tr = MarginTracker(x, y, n_track=16, ps=(2,), deepfool_kwargs={"max_iter": 20})
    tr.measure(0, model)
    models.train(model, x, y, epochs=2, train_batch_size=32, seed=0, on_epoch_end=tr, progress=False,
                 batch_transform=pgd_batch_transform(eps=0.05, steps=2, frac=0.5))
    assert tr.epochs == [0, 1, 2]
    assert not model.training
    assert len(tr.transitions("train")) == 2

"""Curvature-based detection on a toy classifier whose boundary geometry is known."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from analytic import TwoParaboloids
from analytic import paraboloid_clean_points as clean_points

from pyboundary.experiments.detection_eval import evaluate_detection
from pyboundary.geometry.detection import CurvatureDetector, auc_score, roc_curve


def pushed(model, x, cls, step=0.05):
    """Move x along +-x_1 just past the boundary with class cls (1: +x_1, 2: -x_1)."""
    z = x.reshape(x.shape[0], -1).clone()
    y2 = (z[:, 1:] ** 2).sum(1)
    sign = 1.0 if cls == 1 else -1.0
    z[:, 0] = sign * (1 + 0.5 * float(model.a.detach()) * y2 + step)
    return z.reshape(x.shape)


# ----------------------------------------------------------------------------- AUC / ROC


def test_auc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    neg = rng.integers(0, 6, 40).astype(float)
    pos = rng.integers(2, 9, 30).astype(float)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auc_score(neg, pos) == pytest.approx(brute, abs=1e-12)
    assert auc_score([0, 1], [2, 3]) == 1.0
    assert auc_score([2, 3], [0, 1]) == 0.0
    assert auc_score([1, 1], [1, 1]) == 0.5


def test_roc_curve_is_monotone_from_0_to_1_and_integrates_to_auc():
    rng = np.random.default_rng(1)
    neg, pos = rng.normal(0, 1, 200), rng.normal(1, 1, 150)
    roc = roc_curve(neg, pos)
    assert roc.fpr[0] == 0 and roc.tpr[0] == 0 and roc.fpr[-1] == 1 and roc.tpr[-1] == 1
    assert np.all(np.diff(roc.fpr) >= 0) and np.all(np.diff(roc.tpr) >= 0)
    trapezoid = float(np.sum(np.diff(roc.fpr) * (roc.tpr[1:] + roc.tpr[:-1]) / 2))
    assert trapezoid == pytest.approx(roc.auc, abs=1e-12)
    # each point is the rate of scores strictly above its threshold
    k = 17
    assert roc.fpr[k] == pytest.approx(np.mean(neg > roc.thresholds[k]))
    assert roc.tpr[k] == pytest.approx(np.mean(pos > roc.thresholds[k]))


def test_auc_errors():
    with pytest.raises(ValueError, match="negative is empty"):
        auc_score([], [1.0])
    with pytest.raises(ValueError, match="positive contains 1 non-finite"):
        auc_score([0.0], [float("nan")])


# ----------------------------------------------------------------------------- detector on the toy


def test_scores_have_the_documented_sign_and_detect_perfectly():
    model = TwoParaboloids()
    x = clean_points(30)
    p1, p2 = pushed(model, x[:15], 1), pushed(model, x[15:], 2)
    pert = torch.cat([p1, p2])
    assert bool((model(x).argmax(1) == 0).all())
    assert model(p1).argmax(1).tolist() == [1] * 15 and model(p2).argmax(1).tolist() == [2] * 15
    det = CurvatureDetector(model, n_dirs=8, h=0.2)
    sc, sp = det.score(x), det.score(pert)
    assert bool((sc < 0).all()) and bool((sp > 0).all())  # clean: kappa > 0, perturbed: kappa < 0
    roc = det.roc(x, pert)
    assert roc.auc == 1.0
    det.fit(clean_points(40, seed=1), fpr=0.05)
    flagged, recovered = det.predict(pert)
    assert bool(flagged.all())
    assert recovered.tolist() == [0] * 30  # the class whose boundary is curved the other way
    flagged_c, recovered_c = det.predict(x)
    assert float(flagged_c.float().mean()) <= 0.15
    assert recovered_c[~flagged_c].tolist() == [0] * int((~flagged_c).sum())


def test_class_scores_match_analytic_curvature():
    # at a point pushed into class 1 on the x_1 axis (y = 0): the boundary with class 0 is the
    # paraboloid seen from inside, kappa_0 = -a at the vertex level set; class 2's is flat.
    model = TwoParaboloids(a=1.5)
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 0, 0] = 1.05
    det = CurvatureDetector(model, n_dirs=64, h=0.1, estimator="hutchinson")
    d = det.score_details(x)
    assert d.predicted.tolist() == [1]
    assert float(d.class_scores[0, 0]) == pytest.approx(1.5, rel=1e-4)
    assert float(d.class_scores[0, 2]) == pytest.approx(0.0, abs=1e-4)
    assert math.isnan(float(d.class_scores[0, 1]))
    assert float(d.score[0]) == pytest.approx(0.75, rel=1e-4)


def test_fit_threshold_respects_target_fpr():
    model = TwoParaboloids()
    det = CurvatureDetector(model, n_dirs=4, h=0.2).fit(clean_points(40), fpr=0.1)
    assert det.calibration_fpr_ <= 0.1
    assert det.n_calibration_ == 40
    s = np.sort(det.clean_scores_)
    assert det.threshold_ == s[40 - 1 - 4]  # 4 of 40 above
    # a fixed threshold skips calibration
    fixed = CurvatureDetector(model, n_dirs=4, threshold=0.0)
    flagged, _ = fixed.predict(pushed(model, clean_points(5), 1))
    assert bool(flagged.all())


def test_detector_leaves_model_unchanged():
    model = TwoParaboloids()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    det = CurvatureDetector(model, n_dirs=4, h=0.2).fit(clean_points(10))
    det.predict(pushed(model, clean_points(4), 2))
    assert model.training
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_evaluation_with_deepfool_on_toy():
    model = TwoParaboloids()
    x = clean_points(24, seed=3)
    ev = evaluate_detection(model, x, n_dirs=6, h=0.2, fpr=0.1, overshoot=0.02, profile_samples=2)
    assert ev.n_perturbed == ev.n_eval == 12
    assert ev.auc == 1.0
    assert ev.tpr == 1.0 and ev.recovery == 1.0
    assert ev.accuracy >= 0.9
    # logits, J gradient rows, 2T directions, 2J normals (J = 2 other classes)
    assert ev.forward_per_input == pytest.approx(1 + 2 + 2 * 6 + 2 * 2)
    assert ev.backward_per_input == pytest.approx(2)  # J gradient rows
    assert ev.profile_clean.shape == (8,) and ev.profile_clean[-1] > 0 > ev.profile_perturbed[0]
    assert "label recovery 100.0% of flagged perturbed inputs" in ev.format_summary()
    none_flagged = dataclasses.replace(ev, recovery=float("nan"))
    assert "label recovery no perturbed input flagged (" in none_flagged.format_summary()


# ----------------------------------------------------------------------------- errors


def test_detector_errors():
    model = TwoParaboloids()
    with pytest.raises(ValueError, match="n_dirs must be >= 1, got 0"):
        CurvatureDetector(model, n_dirs=0)
    with pytest.raises(ValueError, match="h must be > 0"):
        CurvatureDetector(model, h=0.0)
    with pytest.raises(ValueError, match="h must be > 0"):
        CurvatureDetector(model, h=-0.5)
    with pytest.raises(ValueError, match="estimator must be"):
        CurvatureDetector(model, estimator="median")
    det = CurvatureDetector(model, n_dirs=2)
    with pytest.raises(ValueError, match="call fit"):
        det.predict(clean_points(2))
    with pytest.raises(ValueError, match="clean_x is empty"):
        det.fit(clean_points(2)[:0])
    with pytest.raises(ValueError, match="fpr must be < 1"):
        det.fit(clean_points(2), fpr=1.5)
    bad = clean_points(3)
    bad[1, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="x contains non-finite values"):
        det.score(bad)
    with pytest.raises(TypeError, match="model must be callable"):
        CurvatureDetector(None)


def test_top_classes_restricts_the_average():
    model = TwoParaboloids(a=1.5)
    x = torch.zeros(2, 1, 3, 3)
    x[:, 0, 0, 0] = 1.05  # class 1; runner-up class 0 (f_0 = 0 > f_2)
    full = CurvatureDetector(model, n_dirs=16, h=0.1, estimator="hutchinson").score_details(x)
    top1 = CurvatureDetector(model, n_dirs=16, h=0.1, estimator="hutchinson", top_classes=1).score_details(x)
    assert bool(torch.isnan(top1.class_scores[:, 2]).all())
    torch.testing.assert_close(top1.class_scores[:, 0], full.class_scores[:, 0])
    torch.testing.assert_close(top1.score, full.class_scores[:, 0])  # the average over one class
    with pytest.raises(ValueError, match="top_classes must be >= 1"):
        CurvatureDetector(model, top_classes=0)

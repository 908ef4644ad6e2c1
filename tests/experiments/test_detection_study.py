"""The detection study pipeline on a toy classifier whose boundary geometry is known."""

import json
import math

import numpy as np
import pytest
import torch
from analytic import TwoParaboloids
from analytic import paraboloid_clean_points as clean_points
from torch import nn

from pyboundary.experiments import detection_study as S
from pyboundary.experiments.detection_study import DetectionStudy, detection_study
from pyboundary.geometry.detection import AUTO_TOP_CLASSES, CurvatureDetector, auc_score, calibrate_threshold

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_study():
    model = TwoParaboloids().double()
    x = clean_points(40, seed=3).double()
    return model, x, detection_study(model, x, alphas=(1.0, 3.0), n_dirs=8, h_rel=0.05, clamp=None,
                                     n_bootstrap=300, progress=False, names=[f"p{i}" for i in range(40)])


def test_study_on_two_paraboloids_matches_the_known_geometry(toy_study):
    model, x, st = toy_study
    assert st.n_inputs == 40 and st.names[0] == "p0"
    assert (st.predicted == 0).all()
    r = st.summary()["alphas"][0]
    assert r["n_perturbed"] == 40
    # clean points see the paraboloids bending towards the other classes (kappa > 0): score < 0;
    # DeepFool copies in class 1 or 2 see the boundary with class 0 from the other side
    assert r["auc"] == 1.0 and r["auc_ci95"] == [1.0, 1.0]
    # target FPR 5 %, thresholds from 20 clean scores of the other half: a few % either way
    assert r["tpr"] == 1.0 and r["fpr"] <= 0.2
    assert r["recovery_all"] == 1.0 and r["recovery_flagged"] == 1.0 and r["runner_up_baseline"] == 1.0
    assert r["table2_clean_positive"] == 1.0 and r["table2_clean_inputs_positive"] == 1.0
    assert r["table2_perturbed_inputs_negative"] == 1.0
    # per class: the boundary with class 0 is curved (negative), the one with the third class is
    # flat (f_2 - f_1 = -2 x_1: kappa ~ 0 of either sign), so at least half are negative
    assert r["table2_perturbed_negative"] >= 0.5
    # the noise (same norm, labels unchanged) scores like clean inputs
    assert r["noise_label_changed"] == 0.0
    assert r["noise_auc_vs_perturbed"] == 1.0
    # (vs clean it is not 0.5 here: a noise step of the margin's size moves the point to where
    # the paraboloids' level sets curve differently; recomputed from the arrays)
    assert r["noise_auc_vs_clean"] == auc_score(st.clean_score, st.noise_score[0])
    # perturbation norms: alpha times the DeepFool margin (no box)
    ok = st.fooled(1)
    np.testing.assert_allclose(st.pert_norm[1][ok], 3.0 * st.margin[ok], rtol=1e-9)


def test_study_scores_equal_the_detector_scores(toy_study):
    model, x, st = toy_study
    det = CurvatureDetector(model, n_dirs=8, h_rel=0.05, seed=0)
    # the study scores in calls of 4 inputs and the directions are drawn per call: compare a call
    np.testing.assert_allclose(st.clean_score[:4], det.score(x[:4]).numpy(), rtol=1e-12)
    kappa = det.score_details(x[:4]).curvature.trace.numpy()
    np.testing.assert_allclose(st.clean_kappa[:4], kappa, rtol=1e-12)


def test_cross_calibration_uses_the_other_half(toy_study):
    _, _, st = toy_study
    thr = st.thresholds()
    for h in (0, 1):
        other = st.clean_score[st.half != h]
        assert np.all(thr[st.half == h] == calibrate_threshold(other, 0.05))
    assert sorted(np.bincount(st.half).tolist()) == [20, 20]


def test_calibrate_threshold_rule():
    s = np.arange(1.0, 21.0)  # 20 scores
    assert calibrate_threshold(s, 0.05) == 19.0  # one score (20) may lie above
    assert calibrate_threshold(s, 0.01) == 20.0
    assert calibrate_threshold(s, 0.5) == 10.0
    for bad in (0.0, 1.0, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match="fpr must"):
            calibrate_threshold(s, bad)


def test_bootstrap_ci_brackets_the_auc_and_is_seeded():
    rng = np.random.default_rng(0)
    clean, pert = rng.normal(0, 1, 60), rng.normal(1, 1, 60)
    lo, hi = S.bootstrap_auc_ci(clean, pert, 500, seed=1)
    assert lo < auc_score(clean, pert) < hi and hi - lo < 0.35
    assert (lo, hi) == S.bootstrap_auc_ci(clean, pert, 500, seed=1)


def test_argmax_rule_ignores_nan_and_reports_no_class():
    kappa = np.array([[0.3, -0.2, np.nan], [np.nan, np.nan, np.nan], [-1.0, -3.0, 2.0]])
    classes = np.array([[4, 7, 9], [1, 2, 3], [5, 6, 8]])
    assert S._argmax_rule(kappa, classes).tolist() == [7, -1, 6]


def test_auto_top_classes_bounds_the_cost():
    torch.manual_seed(0)
    many = nn.Linear(6, 30).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    st = detection_study(many, x, alphas=(1.0,), n_dirs=2, clamp=None, n_bootstrap=10, progress=False)
    assert st.clean_kappa.shape[1] == AUTO_TOP_CLASSES and st.params["n_classes_scored"] == 10
    few = nn.Linear(6, 5).double()
    st = detection_study(few, x, alphas=(1.0,), n_dirs=2, clamp=None, n_bootstrap=10, progress=False)
    assert st.clean_kappa.shape[1] == 4


def test_save_load_and_report_roundtrip(toy_study, tmp_path):
    _, _, st = toy_study
    paths = st.write_report(tmp_path / "rep")
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
    back = DetectionStudy.load(tmp_path / "rep" / "study.npz")
    assert back.format_summary() == st.format_summary()
    assert back.names == st.names and back.alphas == st.alphas
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["alphas"][0]["auc"] == 1.0
    assert "| 1 | 40 |" in (tmp_path / "rep" / "report.md").read_text()
    # any file name: save writes and returns exactly the path it was given
    assert st.save(tmp_path / "study.bin") == tmp_path / "study.bin"
    assert DetectionStudy.load(tmp_path / "study.bin").format_summary() == st.format_summary()
    (tmp_path / "bad.npz").write_bytes(b"not a numpy archive")
    with pytest.raises(ValueError, match=r"bad.npz' is not a readable saved DetectionStudy"):
        DetectionStudy.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        DetectionStudy.load(tmp_path / "missing.npz")


def test_study_errors():
    model = TwoParaboloids()
    x = clean_points(6)
    with pytest.raises(ValueError, match="at least 4"):
        detection_study(model, x[:3], clamp=None, progress=False)
    with pytest.raises(ValueError, match="alphas"):
        detection_study(model, x, alphas=(0.0,), clamp=None, progress=False)
    with pytest.raises(ValueError, match="fpr"):
        detection_study(model, x, fpr=1.5, clamp=None, progress=False)
    with pytest.raises(ValueError, match="names"):
        detection_study(model, x, names=["a"], clamp=None, progress=False)


def test_noise_control_only_where_asked():
    model = TwoParaboloids().double()
    x = clean_points(8, seed=1).double()
    st = detection_study(model, x, alphas=(1.0, 2.0), noise_alphas=(2.0,), n_dirs=2, h_rel=0.05, clamp=None,
                         n_bootstrap=10, progress=False)
    assert np.isnan(st.noise_score[0]).all() and np.isfinite(st.noise_score[1]).all()
    assert math.isnan(st.summary()["alphas"][0]["noise_auc_vs_perturbed"])
    assert st.cost["scorings_per_input"] == 4
    # DeepFool's cost in model rows, as its own per-sample counts give them
    from pyboundary import deepfool

    adv = deepfool(model, x, overshoot=st.params["overshoot"], refine=False)  # the study's call
    assert st.cost["deepfool_forward_rows"] == int(adv.sample_forward.sum()) >= x.shape[0]
    assert st.cost["deepfool_backward_rows"] == int(adv.sample_gradients.sum()) >= x.shape[0]
    with pytest.raises(ValueError, match="noise_alphas"):
        detection_study(model, x, alphas=(1.0,), noise_alphas=(3.0,), clamp=None, progress=False)

"""``pyboundary curvature``: statistics and plot on a quadric boundary with known curvatures."""

import json

import numpy as np
import pytest
import torch
from analytic import Quadric

from pyboundary import cli

# principal curvatures of the boundary of F = x_1 - 1/2 sum_i a_i y_i^2 (y: the other 8 coordinates)
A = torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64)


class DS:
    classes = ["0", "1"]

    def __init__(self, n):
        self.x = torch.zeros(n, 1, 3, 3, dtype=torch.float64)
        self.x[:, 0, 0, 0] = -torch.linspace(0.1, 0.5, n, dtype=torch.float64)
        self.labels = torch.zeros(n, dtype=torch.int64)


@pytest.fixture
def toy(monkeypatch):
    from pyboundary import zoo

    seen = {}

    def fake_load(name, split="test", limit=None, seed=0):
        seen.update(name=name, split=split, limit=limit)
        return DS(limit)

    monkeypatch.setattr(zoo, "load_model", lambda spec, **kw: Quadric(A, layout="zero-first"))
    monkeypatch.setattr(zoo, "load_dataset", fake_load)
    return seen


def test_curvature_cli_recovers_known_curvatures(toy, tmp_path, capsys):
    code = cli.main(["curvature", "--model", "quadric", "--data", "toy", "--limit", "6", "--k", "2", "--n-dirs", "8",
                     "--h-rel", "0.5", "--profile-samples", "2", "--out", str(tmp_path)])
    assert code == 0
    assert toy == {"name": "toy", "split": "test", "limit": 6}
    out = capsys.readouterr().out
    assert "largest principal curvature" in out and "curvature_profile.png" in out
    rep = json.loads((tmp_path / "curvature.json").read_text())
    assert rep["n"] == 6 and rep["k"] == 2
    assert rep["largest"]["median"] == pytest.approx(2.0, rel=1e-6)
    assert rep["largest"]["p5"] == pytest.approx(2.0, rel=1e-6)
    assert rep["smallest"]["median"] == pytest.approx(-1.0, rel=1e-6)
    # trace form with 8 random directions: tr(H) is estimated, so only roughly mean(A) = 0.47
    assert rep["mean_runner_up"]["mean"] == pytest.approx(float(A.mean()), abs=0.35)
    assert rep["mean_all"] == rep["mean_runner_up"]  # two classes: one other class
    assert np.allclose(rep["profile"], A.numpy(), atol=1e-6)
    assert rep["forward_per_input"] > 0 and rep["backward_per_input"] > 0
    assert (tmp_path / "curvature_profile.png").stat().st_size > 0


def test_curvature_cli_without_out_or_profile(toy, tmp_path, capsys):
    assert cli.main(["curvature", "--model", "q", "--data", "toy", "--limit", "3", "--profile-samples", "0",
                     "--k", "1", "--n-dirs", "2", "--h-rel", "0.5"]) == 0
    assert "cost:" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--h-rel", "-1"], "h_rel must be a positive"),
    (["--profile-samples", "-2"], "expected an integer >= 0"),
])
def test_curvature_cli_bad_arguments(toy, capsys, argv, message):
    assert cli.main(["curvature", "--model", "q", "--data", "toy", "--limit", "3", *argv]) == 2
    assert message in capsys.readouterr().err


def test_curvature_cli_rejects_bad_limit(toy, capsys):
    assert cli.main(["curvature", "--model", "q", "--data", "toy", "--limit", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err


def test_curvature_top_classes_of_a_many_class_model(monkeypatch, tmp_path, capsys):
    """--top-classes: the mean over the other classes is over the N most likely ('auto': 10 when the
    model has more than 11 classes, as the detector; 'all': every other class), labelled so, and
    equals mean_curvature's trace form over the same classes."""
    from torch import nn

    from pyboundary import zoo
    from pyboundary.geometry.curvature import mean_curvature

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(9, 16), nn.Tanh(), nn.Linear(16, 30)).double()
    monkeypatch.setattr(zoo, "load_model", lambda spec, **kw: net)
    monkeypatch.setattr(zoo, "load_dataset", lambda name, split="test", limit=None, seed=0: DS(limit))
    base = ["curvature", "--model", "m", "--data", "toy", "--limit", "4", "--k", "1", "--n-dirs", "4",
            "--profile-samples", "0", "--h-rel", "0.05"]
    x = DS(4).x
    for flag, classes, label in ((["--top-classes", "3"], 3, "mean over the 3 most likely others"),
                                 ([], 10, "mean over the 10 most likely others"),
                                 (["--top-classes", "all"], None, "mean over other classes")):
        out_dir = tmp_path / str(classes)
        assert cli.main([*base, *flag, "--out", str(out_dir)]) == 0
        assert label in capsys.readouterr().out
        rep = json.loads((out_dir / "curvature.json").read_text())
        assert rep["classes"] == classes
        mc = mean_curvature(net, x, classes=classes, n_dirs=4, h_rel=0.05, estimator="trace", seed=0)
        assert mc.classes.shape[1] == (29 if classes is None else classes)
        assert rep["mean_all"]["mean"] == pytest.approx(float(mc.trace.mean(1).mean()), rel=1e-9)
        assert rep["forward_per_input"] > 3 * mc.classes.shape[1]  # 3 rows per class (gradient, 2 differences)


def test_topology_cli_when_every_input_is_another_class(monkeypatch, tmp_path, capsys):
    """4 ImageNet images are 4 classes: no same-label pair, one input per region. The command
    reports skipped pairs and convex sizes instead of failing."""
    from analytic import Affine

    from pyboundary import zoo

    model = Affine.random(6, 4, 0, torch.float64)
    pool = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pred = model(pool).argmax(1)
    data = DS(4)
    data.x = pool[torch.stack([(pred == c).nonzero()[0, 0] for c in range(4)])]
    data.classes = ["a", "b", "c", "d"]
    monkeypatch.setattr(zoo, "load_model", lambda spec, **kw: model)
    monkeypatch.setattr(zoo, "load_dataset", lambda name, split="test", limit=None, seed=0: data)
    assert cli.main(["topology", "--model", "m", "--data", "toy", "--limit", "4", "--pairs", "2", "--trials", "5",
                     "--directions", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "paths (same-label): 0/0 valid" in out and "2 pairs skipped" in out
    assert "k=2,5,10 skipped (only 1 inputs" in out
    assert (tmp_path / "topology.json").exists()


def test_topology_cli_refuses_convex_k_below_two(capsys):
    assert cli.main(["topology", "--model", "m", "--data", "toy", "--convex-k", "1,5"]) == 2
    assert "--convex-k values must be >= 2" in capsys.readouterr().err


def test_demo_help_names_its_output_folder(capsys):
    try:
        assert cli.main(["demo", "--help"]) == 0
    except SystemExit as e:  # argparse's own exit, when main lets it through
        assert e.code == 0
    assert "(default pyboundary-demo)" in capsys.readouterr().out

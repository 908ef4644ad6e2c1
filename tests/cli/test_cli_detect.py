"""``pyboundary detect`` on a toy model whose boundary geometry is known (TwoParaboloids)."""

import json

import torch
from analytic import TwoParaboloids
from analytic import paraboloid_clean_points as clean_points

from pyboundary import cli


class _DS:
    classes = ["outside", "upper", "lower"]

    def __init__(self, n, seed):
        self.x = clean_points(n, seed=seed)
        self.labels = torch.zeros(n, dtype=torch.int64)


def _toy(monkeypatch, n, seed):
    from pyboundary import zoo

    monkeypatch.setattr(zoo, "load_model", lambda spec, **kw: TwoParaboloids())
    monkeypatch.setattr(zoo, "load_dataset", lambda name, split="test", limit=None, seed=0: _DS(n, seed))


def test_cli_detect_writes_the_study_report(tmp_path, monkeypatch, capsys):
    _toy(monkeypatch, 16, 5)
    assert cli.main(["detect", "--model", "toy", "--data", "toy", "--limit", "16", "--out", str(tmp_path),
                     "--n-dirs", "4", "--h-rel", "0.2", "--clamp", "none", "--alphas", "1,2",
                     "--noise-alphas", "1", "--bootstrap", "50", "--no-progress"]) == 0
    out = capsys.readouterr().out
    # toy geometry: perfect separation, every label recovered (TwoParaboloids' docstring)
    assert "| 1 | 16 |" in out and "| 1.000 [1.000, 1.000] |" in out and "100.0 % / 100.0 %" in out
    assert "cost per scored input:" in out and "CPU-s" in out
    for name in ("report.md", "summary.json", "roc.png", "scores.png", "study.npz"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["alpha"] for r in summary["alphas"]] == [1.0, 2.0]
    assert summary["alphas"][0]["auc"] == 1.0 and summary["alphas"][0]["recovery_all"] == 1.0
    assert summary["params"]["noise_alphas"] == [1.0] and summary["cost"]["scorings_per_input"] == 4


def test_detect_top_classes_and_clamp(tmp_path, monkeypatch, capsys):
    _toy(monkeypatch, 8, 6)
    assert cli.main(["detect", "--model", "toy", "--data", "toy", "--n-dirs", "2", "--h-rel", "0.2",
                     "--clamp", "none", "--top-classes", "1", "--bootstrap", "10", "--no-progress",
                     "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["params"]["n_classes_scored"] == 1 and summary["params"]["top_classes"] == 1
    assert "top classes 1" in capsys.readouterr().out


def test_detect_bad_arguments(tmp_path, monkeypatch, capsys):
    _toy(monkeypatch, 8, 6)
    # bad arguments: clear message, exit code 2
    assert cli.main(["detect", "--model", "toy", "--data", "toy", "--limit", "0"]) == 2
    assert cli.main(["detect", "--model", "toy", "--data", "toy", "--fpr", "2", "--clamp", "none"]) == 2
    assert "fpr must be < 1" in capsys.readouterr().err
    assert cli.main(["detect", "--model", "toy", "--data", "toy", "--clamp", "1,0"]) == 2
    assert "--clamp" in capsys.readouterr().err
    assert cli.main(["detect", "--model", "toy", "--data", "toy", "--alphas", "x"]) == 2
    assert "--alphas" in capsys.readouterr().err
    assert cli.main(["detect", "--model", "toy", "--data", "toy", "--top-classes", "0"]) == 2
    assert cli.main(["detect", "--model", "toy", "--data", "toy", "--alphas", "1", "--noise-alphas", "3",
                     "--clamp", "none", "--no-progress"]) == 2
    assert "noise_alphas" in capsys.readouterr().err

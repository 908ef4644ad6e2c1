"""``pyboundary detect`` on a toy model whose boundary geometry is known (TwoParaboloids)."""

import json

import torch
from analytic import TwoParaboloids

from pyboundary import cli


def clean_points(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 1, 3, 3, generator=g)
    x[:, 0, 0, 0] = 0.5 * (torch.rand(n, generator=g) - 0.5)  # |x_1| < 0.25: class 0
    return x


class _DS:
    classes = ["outside", "upper", "lower"]

    def __init__(self, n, seed):
        self.x = clean_points(n, seed=seed)
        self.labels = torch.zeros(n, dtype=torch.int64)


def _toy(monkeypatch, n, seed):
    from pyboundary import zoo

    monkeypatch.setattr(zoo, "load_model", lambda spec, **kw: TwoParaboloids())
    monkeypatch.setattr(zoo, "load_dataset", lambda name, split="test", limit=None, seed=0: _DS(n, seed))


def test_cli_detect_writes_plots(tmp_path, monkeypatch, capsys):
    _toy(monkeypatch, 16, 5)
    assert cli.main(["detect", "--model", "toy", "--data", "toy", "--limit", "16", "--out", str(tmp_path),
                     "--n-dirs", "4", "--h-rel", "0.2", "--profile-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "AUC 1.0000" in out and "label recovery 100.0%" in out
    for name in ("roc.png", "curvature_profile.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["auc"] == 1.0


def test_detect_bad_arguments(tmp_path, monkeypatch, capsys):
    _toy(monkeypatch, 8, 6)
    assert cli.main(["detect", "--model", "toy", "--data", "toy", "--limit", "8", "--n-dirs", "2", "--h-rel", "0.2",
                     "--profile-samples", "0"]) == 0
    assert "detection accuracy" in capsys.readouterr().out
    # bad arguments: clear message, exit code 2
    assert cli.main(["detect", "--model", "toy", "--data", "toy", "--limit", "0"]) == 2
    assert cli.main(["detect", "--model", "toy", "--data", "toy", "--fpr", "2"]) == 2
    assert "fpr must be < 1" in capsys.readouterr().err

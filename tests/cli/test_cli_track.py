"""``pyboundary track`` end to end on sklearn digits (one epoch, adversarial)."""

import pytest

from pyboundary import cli
from pyboundary.experiments.tracking_run import track


def test_cli_track_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    assert cli.main(["track", "--arch", "mlp", "--data", "digits", "--epochs", "1", "--n-track", "12",
                     "--limit", "128", "--out", str(out), "--max-iter", "10", "--no-progress",
                     "--adversarial", "pgd-linf:eps=0.05,steps=2,frac=0.5"]) == 0
    text = capsys.readouterr().out
    assert "epoch" in text and "wrong->right" in text
    assert (out / "track.sqlite").exists() and (out / "curves.png").exists()
    assert (out / "transitions_test.png").exists() and (out / "hist_train_linf.png").exists()
    with pytest.raises(ValueError, match="attack"):
        track("mlp", "digits", epochs=1, adversarial="fgsm:eps=1", n_track=4)
    with pytest.raises(ValueError, match="cannot be resumed, so choose another --out"):
        track("mlp", "digits", epochs=1, n_track=4, out=out)
    assert cli.main(["track", "--arch", "mlp", "--data", "digits", "--epochs", "1", "--out", str(out)]) == 2


@pytest.mark.parametrize("args", [["--arch", "mlpp"], ["--lr=-1"], ["--n-track", "0"]])
def test_refused_track_leaves_no_store(tmp_path, args):
    """A run refused for a bad setting writes nothing, so the corrected command can use the folder."""
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    base = ["track", "--data", "digits", "--epochs", "1", "--limit", "64", "--out", str(out), "--no-progress"]
    if "--arch" not in args:
        base += ["--arch", "mlp"]
    assert cli.main(base + args) == 2
    assert not (out / "track.sqlite").exists()
    assert cli.main(["track", "--arch", "mlp", "--data", "digits", "--epochs", "0", "--limit", "64",
                     "--n-track", "4", "--max-iter", "5", "--out", str(out), "--no-progress"]) == 0
    assert (out / "track.sqlite").exists()

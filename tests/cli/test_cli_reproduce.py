"""`pyboundary reproduce`: listing, dispatch and usage errors (the entries are tested in
tests/experiments/test_reproduce.py)."""

from pyboundary.cli import main

NAMES = ("holdmetight-table1", "holdmetight-frequency", "mickisch-dynamics", "fawzi-curvature",
         "fawzi-detection", "fawzi-topology")


def test_list_shows_the_six_entries(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES)
    assert "Hold me tight" in out and "s CPU" in out


def test_usage_errors(capsys, tmp_path):
    assert main(["reproduce"]) == 2
    assert "give an entry NAME" in capsys.readouterr().err
    assert main(["reproduce", "holdmetight-table1"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert main(["reproduce", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown entry 'nope'" in capsys.readouterr().err
    assert main(["reproduce", "holdmetight-table1", "--scale", "huge", "--out", str(tmp_path)]) == 2
    assert main(["reproduce", "holdmetight-table1", "--threads", "0", "--out", str(tmp_path)]) == 2


def test_runs_an_entry(tmp_path, monkeypatch, capsys):
    import pyboundary.experiments.reproduce as reproduce

    seen = {}

    def fake_run_entry(name, **kw):
        seen.update(kw, name=name)
        return reproduce.ReproduceResult(name=name, scale=kw["scale"], out=str(kw["out"]), report="r.md")

    monkeypatch.setattr(reproduce, "run_entry", fake_run_entry)
    out = tmp_path / "o"
    assert main(["reproduce", "fawzi-topology", "--scale", "full", "--out", str(out), "--seed", "3",
                 "--threads", "1", "--no-progress"]) == 0
    assert seen == {"name": "fawzi-topology", "scale": "full", "out": str(out), "seed": 3, "progress": False,
                    "threads": 1}
    assert "fawzi-topology (full scale)" in capsys.readouterr().out

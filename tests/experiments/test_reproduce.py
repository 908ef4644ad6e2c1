"""`pyboundary reproduce`: the registry, the report writer, one real entry end to end (small
parameters), refusals; the other entries end to end under the slow marker."""

import json
import math

import numpy as np
import pytest

from pyboundary.experiments.reproduce import ENTRIES, ReproduceResult, list_entries, run_entry
from pyboundary.experiments.reproduce.holdmetight import percentiles
from pyboundary.experiments.reproduce.report import fmt, pct

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NAMES = ["holdmetight-table1", "holdmetight-frequency", "mickisch-dynamics", "fawzi-curvature",
         "fawzi-detection", "fawzi-topology"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYBOUNDARY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_registry_lists_the_six_entries_with_both_scales():
    assert [e.name for e in list_entries()] == NAMES
    for e in list_entries():
        budget, full = e.params("budget"), e.params("full")
        assert set(budget) == set(full) and budget != full
        assert callable(e.function()) and e.paper and e.what and e.budget_cpu_s > 0


def test_percentiles_rank_failures_above_every_margin():
    v = np.array([1.0, 2.0, 3.0, 4.0, np.inf])
    p5, p50, p95 = percentiles(v)
    assert p5 == pytest.approx(1.2) and p50 == 3.0 and math.isinf(p95)
    assert percentiles(np.array([2.0, 4.0]))[1] == 3.0
    assert all(math.isnan(q) for q in percentiles(np.array([])))
    assert fmt(math.inf) == "inf" and fmt(float("nan")) == "-" and fmt(0.000012345) == "1.23e-05"
    assert fmt("|x| < 1") == "\\|x\\| < 1"  # a bare | would split a markdown table cell
    assert pct(0.1234) == "12.3%" and pct(float("nan")) == "-" and pct(None) == "-"


SMALL_T1 = {"n_train": 400, "n_test": 40, "epochs": 3, "max_iter": 20}


def test_holdmetight_table1_end_to_end(tmp_path, cache):
    out = tmp_path / "t1"
    res = run_entry("holdmetight-table1", out=out, params=SMALL_T1, progress=False, threads=1)
    assert isinstance(res, ReproduceResult) and res.scale == "budget" and res.wall_s > 0
    md = (out / "report.md").read_text()
    assert md.startswith("# `holdmetight-table1`")
    for needle in ("**Paper:**", "**Scale:** budget", "overridden: epochs, max_iter, n_test, n_train",
                   "## Published vs ours", "| T1 | u1 |", "| T2 | S_rand |", "table1_margins.png"):
        assert needle in md, needle
    assert (out / "table1_margins.png").stat().st_size > 1000
    blob = json.loads((out / "results.json").read_text())
    t1 = blob["results"]["T1"]
    assert t1["test_accuracy"] > 0.9  # T1 is linearly separable with margin eps
    m = t1["margins"]
    # the boundary sits near the middle of the classes along u1 (offset eps = 5): margin ~5
    assert 2.0 < m["u1"]["p50"] < 8.0
    # S_rand meets u1 only partly, so its margins are larger than along u1
    assert m["S_rand"]["p50"] > m["u1"]["p50"]
    assert blob["params"]["n_train"] == 400 and blob["overridden"] == sorted(SMALL_T1)
    # reports are never overwritten; the result round-trips
    with pytest.raises(ValueError, match="already exists"):
        run_entry("holdmetight-table1", out=out, params=SMALL_T1, progress=False)
    res.save(tmp_path / "res.json")
    assert ReproduceResult.load(tmp_path / "res.json") == res
    (tmp_path / "bad.json").write_text('{"name": 1}')
    with pytest.raises(ValueError, match="bad.json' is not a readable saved ReproduceResult"):
        ReproduceResult.load(tmp_path / "bad.json")
    assert "holdmetight-table1 (budget scale)" in res.format_summary()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown entry 'nope'"):
        run_entry("nope", out=tmp_path / "a")
    with pytest.raises(ValueError, match="scale must be one of"):
        run_entry("holdmetight-table1", scale="huge", out=tmp_path / "a")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['zzz'\]"):
        run_entry("holdmetight-table1", out=tmp_path / "a", params={"zzz": 1})
    with pytest.raises(TypeError, match="threads"):
        run_entry("holdmetight-table1", out=tmp_path / "a", threads=1.5)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        run_entry("holdmetight-table1", out=tmp_path / "file")


SMALL = {
    "holdmetight-frequency": {"n_fmnist": 6, "T": 10, "n_imagenet": 2, "T_imagenet": 104, "pgd_n_train": 300,
                              "epochs": 1, "max_iter": 10},
    "mickisch-dynamics": {"n_train": 300, "epochs": 2, "n_track": 10, "max_iter": 10},
    "fawzi-curvature": {"n_curvature": 3, "profile_samples": 1, "n_shared": 6, "m": 4, "n_heldout": 10,
                        "n_universal": 20, "fooling_rate": 0.5},
    "fawzi-detection": {"n": 8, "n_dirs": 4, "top_classes": 3, "n_bootstrap": 50},
    "fawzi-topology": {"n_pool": 200, "n_pairs": 1, "per_class": 12, "n_trials": 10, "ks": "2,3"},
}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One model cache for the slow entries (the Fashion-MNIST LeNet is trained once for all)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYBOUNDARY_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_other_entries_end_to_end(name, tmp_path_factory, shared_cache):
    out = tmp_path_factory.mktemp(name)
    res = run_entry(name, out=out / "run", params=SMALL[name], progress=False, threads=1)
    md = (out / "run" / "report.md").read_text()
    assert "## Published vs ours" in md and "ours" in md
    assert res.figures and all((out / "run" / f).stat().st_size > 1000 for f in res.figures)
    assert json.loads((out / "run" / "results.json").read_text())["results"]
    assert set(ENTRIES) == set(NAMES)

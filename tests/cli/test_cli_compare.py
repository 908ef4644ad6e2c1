"""``pyboundary compare`` and ``pyboundary show --csv/--parquet`` end to end on sklearn digits with tiny
seeded models (no training)."""

import json
import sys

import numpy as np
import pytest

from pyboundary import cli
from pyboundary.cli.scan import STORE_NAME
from pyboundary.scans.comparison import ScanComparison, compare
from pyboundary.scans.margins import RUN_STORE_NAME, MarginScan

TINY = """
import torch
from torch import nn


def build(seed=0, hidden=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def other():
    return build(seed=1, hidden=16)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four CLI scans of 40 digits: models A and B on the same samples, A on another seeded subset,
    A over another family."""
    root = tmp_path_factory.mktemp("cmp")
    (root / "tinymod_cmp.py").write_text(TINY)
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(root))
    mp.setenv("PYBOUNDARY_CACHE", str(root / "cache"))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        mp.delenv(var, raising=False)

    def scan(name, model, *extra):
        args = ["scan", "--model", model, "--data", "digits", "--subspaces", "dct:K=4,T=2", "--out", str(root / name),
                "--limit", "40", "--batch-size", "64", "--no-progress", *extra]
        assert cli.main(args) == 0
        return root / name

    out = {"a": scan("a", "tinymod_cmp:build"), "b": scan("b", "tinymod_cmp:other"),
           "a_seed1": scan("a_seed1", "tinymod_cmp:build", "--seed", "1"),
           "a_coarse": scan("a_coarse", "tinymod_cmp:build", "--subspaces", "dct:K=4,T=4")}
    yield root, out
    mp.undo()


def test_compare_writes_table_json_and_plot(runs, capsys):
    root, r = runs
    capsys.readouterr()
    assert cli.main(["compare", str(r["a"]), str(r["b"]), "--out", str(root / "cmp"), "--n-boot", "200"]) == 0
    text = capsys.readouterr().out
    assert "2 runs in dct:K=4,T=2 (paired, same samples" in text
    assert "tinymod_cmp:build" in text and "tinymod_cmp:other" in text
    for name in ("comparison.txt", "comparison.json", "comparison.png"):
        assert (root / "cmp" / name).stat().st_size > 0
    saved = ScanComparison.load(root / "cmp" / "comparison.json")
    api = compare([r["a"], r["b"] / "scan.sqlite"], n_boot=200)  # run folder or store file
    np.testing.assert_array_equal(saved.median, api.median)
    np.testing.assert_array_equal(saved.ci_low, api.ci_low)
    assert saved.sources == [str(r["a"]), str(r["b"])]
    assert (root / "cmp" / "comparison.txt").read_text().strip() == saved.format_summary().strip()
    # never overwrites
    assert cli.main(["compare", str(r["a"]), str(r["b"]), "--out", str(root / "cmp")]) == 2
    assert "already holds a comparison" in capsys.readouterr().err


def test_compare_refusals_and_sample_modes(runs, capsys):
    root, r = runs
    capsys.readouterr()
    assert cli.main(["compare", str(r["a"]), str(r["a_coarse"]), "--out", str(root / "x1")]) == 2
    assert "different subspace families: 'dct:K=4,T=2' (3 members) vs 'dct:K=4,T=4'" in capsys.readouterr().err
    assert cli.main(["compare", str(r["a"]), str(r["a_seed1"]), "--out", str(root / "x2")]) == 2
    err = capsys.readouterr().err
    assert "hold different samples" in err and "--common-samples" in err and "--independent-samples" in err
    assert not (root / "x1").exists() and not (root / "x2").exists()
    assert cli.main(["compare", str(r["a"]), "--out", str(root / "x3")]) == 2
    assert "at least two runs" in capsys.readouterr().err
    assert cli.main(["compare", str(r["a"]), str(root / "nothing"), "--out", str(root / "x4")]) == 2
    assert "no scan at" in capsys.readouterr().err
    assert cli.main(["compare", str(r["a"]), str(r["b"]), "--common-samples", "--independent-samples",
                     "--out", str(root / "x5")]) == 2
    # the two seeded subsets of 40 share some samples: compared on those, paired
    a, a1 = MarginScan.load(r["a"]), MarginScan.load(r["a_seed1"])
    common = set(a.sample_keys.tolist()) & set(a1.sample_keys.tolist())
    assert 0 < len(common) < 40
    assert cli.main(["compare", str(r["a"]), str(r["a_seed1"]), "--common-samples", "--out", str(root / "c"),
                     "--no-plot", "--n-boot", "200"]) == 0
    comp = ScanComparison.load(root / "c" / "comparison.json")
    assert comp.samples == "common" and comp.n_samples.tolist() == [len(common)] * 2
    # the same model on the same samples: the same margins (to float noise of other batch mates)
    np.testing.assert_allclose(comp.median[1], comp.median[0], rtol=1e-5)
    assert cli.main(["compare", str(r["a"]), str(r["a_seed1"]), "--independent-samples", "--out", str(root / "i"),
                     "--no-plot", "--n-boot", "200", "--names", "first", "second"]) == 0
    comp = ScanComparison.load(root / "i" / "comparison.json")
    assert comp.names == ["first", "second"] and comp.n_samples.tolist() == [40, 40]


def test_show_exports_csv_and_parquet(runs, capsys):
    pd = pytest.importorskip("pandas")
    root, r = runs
    scan = MarginScan.load(r["a"])
    assert cli.main(["show", str(r["a"]), "--no-plot", "--csv", str(root / "exp" / "a.csv")]) == 0
    assert "wrote" in capsys.readouterr().out
    frame = pd.read_csv(root / "exp" / "a.csv")
    assert len(frame) == 40 * 3 and list(frame.columns)[:4] == ["sample", "subspace", "member", "margin"]
    back = MarginScan.from_pandas(frame, subspace_spec=scan.subspace_spec, p=scan.p)
    assert back == scan and np.array_equal(back.sample_keys.numpy(), scan.sample_keys.numpy())
    assert cli.main(["show", str(r["a"]), "--no-plot", "--csv", str(root / "exp" / "a.csv")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    pytest.importorskip("pyarrow")
    assert cli.main(["show", str(r["a"]), "--no-plot", "--parquet", str(root / "exp" / "a.parquet")]) == 0
    back = MarginScan.from_pandas(pd.read_parquet(root / "exp" / "a.parquet"))  # attributes kept
    assert back == scan and back.meta == scan.meta


def test_parquet_without_pyarrow_is_a_clear_error(runs, capsys, monkeypatch):
    root, r = runs
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert cli.main(["show", str(r["a"]), "--no-plot", "--parquet", str(root / "none.parquet")]) == 2
    assert "--parquet needs pyarrow" in capsys.readouterr().err
    assert not (root / "none.parquet").exists()


def test_store_name_agrees_with_the_scans_layer():
    assert STORE_NAME == RUN_STORE_NAME


def test_comparison_json_is_plain_json(runs):
    root, r = runs
    cli.main(["compare", str(r["a"]), str(r["b"]), "--out", str(root / "j"), "--no-plot", "--n-boot", "100"])
    data = json.loads((root / "j" / "comparison.json").read_text())
    assert data["kind"] == "scan_comparison" and data["names"] == ["tinymod_cmp:build", "tinymod_cmp:other"]

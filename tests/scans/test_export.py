"""Leaving pyboundary: MarginScan.to_pandas / from_pandas (long format, CSV and Parquet), per-sample
content keys, and MarginScan.load of a run folder."""

import math

import numpy as np
import pytest
import torch

from analytic import Affine
from pyboundary.scans.margins import PANDAS_COLUMNS, RUN_STORE_NAME, MarginScan, margin_scan, sample_keys
from pyboundary.scans.store import ResultStore

pd = pytest.importorskip("pandas")

pytestmark = pytest.mark.usefixtures("one_thread")


def _scan(labels=True, n=12):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    model = Affine.random(64, n_classes=3, seed=0)
    y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 3
    return margin_scan(model, x, "dct:K=4,T=2", labels=y if labels else None, progress=False), x


def test_to_pandas_long_format_and_round_trip():
    scan, x = _scan()
    frame = scan.to_pandas()
    assert tuple(frame.columns) == PANDAS_COLUMNS and len(frame) == 12 * 3
    assert frame["sample"].tolist()[:4] == [0, 0, 0, 1] and frame["subspace"].tolist()[:4] == [0, 1, 2, 0]
    np.testing.assert_array_equal(frame["margin"].to_numpy().reshape(12, 3), scan.margins.numpy())
    np.testing.assert_array_equal(frame["raw_margin"].to_numpy().reshape(12, 3), scan.raw_margins.numpy())
    np.testing.assert_array_equal(frame["iterations"].to_numpy().reshape(12, 3), scan.iterations.numpy())
    np.testing.assert_array_equal(frame["label"].to_numpy(dtype=np.int64)[::3], scan.labels.numpy())
    np.testing.assert_array_equal(frame["prediction"].to_numpy()[::3], scan.predictions.numpy())
    assert int(frame["correct"].sum()) == 3 * int(scan.correct.sum())
    assert frame.attrs["subspace_spec"] == "dct:K=4,T=2" and frame.attrs["norm"] == "L2"
    back = MarginScan.from_pandas(frame)
    assert back == scan and back.meta == scan.meta
    assert torch.equal(back.sample_keys, scan.sample_keys)
    assert scan.to_dataframe().equals(frame)  # the former name


def test_round_trip_of_an_incomplete_scan_without_labels(tmp_path):
    scan, _ = _scan(labels=False)
    scan.margins[5, 1] = scan.raw_margins[5, 1] = math.nan  # a pair not computed
    scan.iterations[5, 1] = scan.adv_labels[5, 1] = -1
    scan.converged[5, 1] = False
    scan.margins[2, 0] = math.inf  # a failure
    scan.converged[2, 0] = False
    frame = scan.to_pandas()
    assert frame["label"].isna().all() and frame["correct"].isna().all()
    back = MarginScan.from_pandas(frame)
    assert back == scan and back.labels is None and not back.complete
    # CSV keeps the rows, not the attributes: pass them; inf and NaN survive the text
    frame.to_csv(tmp_path / "s.csv", index=False)
    read = pd.read_csv(tmp_path / "s.csv")
    with pytest.raises(ValueError, match="pass subspace_spec=... and p=..."):
        MarginScan.from_pandas(read)
    back = MarginScan.from_pandas(read, subspace_spec="dct:K=4,T=2", p=2)
    assert back == scan and back.subspace_labels == scan.subspace_labels
    # a frame of the computed pairs only: the others come back as not computed
    part = MarginScan.from_pandas(frame[frame["margin"].notna()])
    assert part == scan


def test_from_pandas_refusals():
    scan, _ = _scan()
    frame = scan.to_pandas()
    with pytest.raises(ValueError, match=r"lacks the columns \['raw_margin'\]"):
        MarginScan.from_pandas(frame.drop(columns=["raw_margin"]))
    twice = pd.concat([frame, frame.iloc[:1]])
    twice.attrs = frame.attrs
    with pytest.raises(ValueError, match="repeats"):
        MarginScan.from_pandas(twice)
    bad = frame.copy()
    bad.loc[0, "subspace"] = 7
    with pytest.raises(ValueError, match="subspace index 7 for a family of 3"):
        MarginScan.from_pandas(bad)


def test_sample_keys_identify_inputs_and_are_stored(tmp_path):
    scan, x = _scan()
    keys = sample_keys(x)
    assert keys.dtype == np.int64 and len(set(keys.tolist())) == 12
    np.testing.assert_array_equal(scan.sample_keys.numpy(), keys)
    np.testing.assert_array_equal(sample_keys(x[[3, 1]]), keys[[3, 1]])  # per input, not per batch
    assert sample_keys(x.float())[0] != keys[0]  # the exact values scanned, dtype included
    other = x.clone()
    other[4, 0, 0, 0] += 1e-12
    assert (sample_keys(other) != keys).tolist() == [k == 4 for k in range(12)]
    scan.save(tmp_path / "s.sqlite")
    assert torch.equal(MarginScan.load(tmp_path / "s.sqlite").sample_keys, scan.sample_keys)
    # a store without keys (written before they existed) loads with sample_keys None
    old = MarginScan(**{**scan.__dict__, "sample_keys": None})
    old.save(tmp_path / "old.sqlite")
    assert MarginScan.load(tmp_path / "old.sqlite").sample_keys is None
    with ResultStore(tmp_path / "old.sqlite", mode="read") as st:
        assert st.read_sample_keys(12) is None


def test_merge_copies_sample_keys(tmp_path):
    scan, _ = _scan()
    scan.save(tmp_path / "part.sqlite")
    with ResultStore(tmp_path / "final.sqlite", mode="resume", meta=scan.meta) as st:
        st.merge_from(tmp_path / "part.sqlite")
        np.testing.assert_array_equal(st.read_sample_keys(12), scan.sample_keys.numpy())


def test_load_accepts_the_run_folder(tmp_path):
    scan, _ = _scan()
    (tmp_path / "run").mkdir()
    scan.save(tmp_path / "run" / RUN_STORE_NAME)
    assert MarginScan.load(tmp_path / "run") == scan
    assert MarginScan.load(str(tmp_path / "run" / RUN_STORE_NAME)) == scan
    with pytest.raises(FileNotFoundError, match=r"no scan at .*empty.*run folder holding scan.sqlite"):
        (tmp_path / "empty").mkdir()
        MarginScan.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no scan at"):
        MarginScan.load(tmp_path / "missing.sqlite")

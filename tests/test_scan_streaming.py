"""Margin scans fed from streamed image folders, automatic batch sizes, and show on a running scan."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pyboundary import cli
from pyboundary._utils import memory as mem
from pyboundary.scans.margins import MarginScan, margin_scan
from pyboundary.scans.store import ResultStore
from pyboundary.zoo.streaming import open_image_folder

TINY = """
import torch
from torch import nn


class Pool(nn.Module):
    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(x, 4)


def build():
    torch.manual_seed(0)
    return nn.Sequential(Pool(), nn.Flatten(), nn.Linear(48, 5))
"""


def _tree(root, n_per_class, classes=("n01440764", "n01443537", "n01484850", "n01491361", "n01494475"),
          size=(64, 48)):
    """Class folders of small RGB PNGs; the red value of every image encodes its class."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for k in range(n_per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            arr[:4, :4, 0] = 40 * c + 20
            Image.fromarray(arr).save(root / name / f"{k:03d}.png")


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    (tmp_path / "tinymod_stream.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    import importlib

    return importlib.import_module("tinymod_stream").build()


def test_streamed_folder_scan_equals_the_in_memory_scan(tmp_path, tiny):
    _tree(tmp_path / "data", 6)
    ds = open_image_folder(tmp_path / "data", preprocess="imagenet")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    streamed = margin_scan(tiny, ds, "dct:K=56,T=56", batch_size=7, progress=False)
    again = margin_scan(tiny, ds, "dct:K=56,T=56", batch_size=7, progress=False, workers=2)
    memory = margin_scan(tiny, x, "dct:K=56,T=56", labels=ds.labels, batch_size=7, progress=False)
    assert streamed.margins.shape == (30, 4) and streamed.complete
    assert torch.equal(streamed.margins, memory.margins) and torch.equal(streamed.margins, again.margins)
    assert torch.equal(streamed.labels, ds.labels) and torch.equal(streamed.predictions, memory.predictions)
    assert streamed.meta["data"]["identity"] == ds.identity


@pytest.mark.skipif(not mem.cpu_peak_supported(), reason="needs Linux /proc")
def test_streamed_scan_memory_is_bounded_by_the_batch_not_the_folder(tmp_path, tiny):
    """300 images of 3x224x224 float32 are 172 MiB in memory; the streamed scan reads them one
    batch at a time (workers=0: everything in this process) and stays far below that."""
    _tree(tmp_path / "data", 60, size=(40, 30))
    (tmp_path / "data" / "n01440764" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    Image.fromarray(np.full((30, 40), 77, np.uint8), "L").save(tmp_path / "data" / "n01443537" / "grey.png")
    with pytest.warns(UserWarning, match="corrupt.png"):
        ds = open_image_folder(tmp_path / "data")
    assert len(ds) == 301 and ds.skipped[0][0].endswith("corrupt.png")
    folder_bytes = len(ds) * 3 * 224 * 224 * 4
    box = {}
    peak = mem.measure_peak(lambda: box.update(scan=margin_scan(tiny, ds, "full", batch_size=16, progress=False,
                                                                workers=0)), "cpu")
    scan = box["scan"]
    assert scan.complete and torch.equal(scan.labels, ds.labels)
    assert peak < folder_bytes / 3, (peak, folder_bytes)
    codes = {20: 0, 60: 1, 100: 2, 140: 3, 180: 4}
    for i in [0, 100, 250, len(ds) - 1]:  # labels follow the folders
        x, label = ds[i]
        if "grey" not in ds.paths[i].name:
            assert codes[round(float(x[0, 0, 0]) * 255)] == label


def test_cli_scan_of_a_folder_reports_bad_files_and_the_batch(tmp_path, tiny, capsys):
    _tree(tmp_path / "data", 3)
    (tmp_path / "data" / "n01484850" / "bad.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    rc = cli.main(["scan", "--model", "tinymod_stream:build", "--data", str(tmp_path / "data"),
                   "--subspaces", "dct:K=112,T=112", "--out", str(out), "--no-progress", "--workers", "1"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "bad.jpg" in text.out + text.err
    assert "15 images" in text.out and "batch of" in text.out and "L2 margins in dct:K=112,T=112" in text.out
    scan = MarginScan.load(out / "scan.sqlite")
    assert scan.complete and scan.meta["batch_size"] >= 1 and scan.meta["batching"]["source"] in ("auto", "all")


def test_explicit_batch_that_cannot_fit_is_refused_before_the_scan(tmp_path, tiny, capsys):
    _tree(tmp_path / "data", 2)
    rc = cli.main(["scan", "--model", "tinymod_stream:build", "--data", str(tmp_path / "data"),
                   "--subspaces", "full", "--out", str(tmp_path / "run"), "--no-progress",
                   "--batch-size", "10", "--memory-budget", "1KB"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot fit" in err and "needs an estimated" in err
    assert not (tmp_path / "run" / "scan.sqlite").exists()


def test_show_reads_a_store_while_a_writer_holds_it(tmp_path, tiny, capsys):
    x = torch.rand(6, 3, 32, 32)
    out = tmp_path / "run"
    out.mkdir()
    store = out / "scan.sqlite"
    full = margin_scan(tiny, x, "dct:K=16,T=16", batch_size=4, progress=False, store=store)
    partial = tmp_path / "partial"
    partial.mkdir()
    # a store with only some pairs, and a writer in the middle of a transaction
    with ResultStore(store, mode="read") as src:
        meta = src.meta
    writer = ResultStore(partial / "scan.sqlite", mode="create", meta=meta)
    writer.write_samples(np.arange(6), None, full.predictions.numpy())
    s, j = np.nonzero(np.ones((3, 2), dtype=bool))
    writer.write_pairs(s, j, full.margins.numpy()[s, j], full.raw_margins.numpy()[s, j],
                       full.iterations.numpy()[s, j], full.converged.numpy()[s, j], full.adv_labels.numpy()[s, j])
    writer._conn.execute("BEGIN IMMEDIATE")  # the scan is writing its next batch
    try:
        assert cli.main(["show", str(partial), "--no-plot"]) == 0
    finally:
        writer._conn.execute("ROLLBACK")
        writer.close()
    text = capsys.readouterr().out
    assert "incomplete: 6 of 12 pairs computed" in text
    assert json.loads(json.dumps(meta))["batch_size"] == 4

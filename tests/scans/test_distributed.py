"""torchrun with 2 CPU processes (gloo) gives the same scan as one process."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyboundary import cli
from pyboundary.scans.distributed import part_path, world_from_env
from pyboundary.scans.margins import MarginScan
from pyboundary.scans.store import ResultStore

REPO = Path(__file__).resolve().parents[2]

TINY = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
"""


def _args(out):
    return ["scan", "--model", "tinymod_dist:build", "--data", "digits", "--subspaces", "dct:K=4,T=2",
            "--out", str(out), "--limit", "21", "--batch-size", "8", "--no-progress"]


def _torchrun(tmp_path, out, *extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
           "OMP_NUM_THREADS": "1", "PYBOUNDARY_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pyboundary", *_args(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    (tmp_path / "tinymod_dist.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, tiny, capsys):
    one = tmp_path / "one"
    assert cli.main(_args(one)) == 0
    capsys.readouterr()
    two = tmp_path / "two"
    run = _torchrun(tmp_path, two)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("L2 margins in dct:K=4,T=2") == 1  # only rank 0 reports
    a, b = MarginScan.load(one / "scan.sqlite"), MarginScan.load(two / "scan.sqlite")
    assert b.complete and a.margins.shape == b.margins.shape == (21, 3)
    # same pairs, labels, predictions, iterations; margins equal up to float32 batch rounding
    assert torch.equal(a.predictions, b.predictions) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.iterations, b.iterations) and torch.equal(a.adv_labels, b.adv_labels)
    assert a.sample_keys is not None and torch.equal(a.sample_keys, b.sample_keys)  # merged from the parts
    torch.testing.assert_close(a.margins, b.margins, rtol=3e-5, atol=0)  # thread counts differ
    # the same defining metadata (the batch grid included); what was measured to plan it differs
    # (each of the two ranks gets half of the memory budget)
    meta_a = {k: v for k, v in a.meta.items() if k not in ("versions", "batching")}
    meta_b = {k: v for k, v in b.meta.items() if k not in ("versions", "batching")}
    assert meta_a == meta_b
    assert b.meta["batching"]["budget_bytes"] < a.meta["batching"]["budget_bytes"]
    assert not any(p.name.startswith("scan.sqlite.part") for p in two.iterdir())  # parts merged, removed


@pytest.mark.slow
def test_two_process_resume_and_refusal(tmp_path, tiny):
    """A killed 2-process run leaves part stores: resume merges them and computes only the rest."""
    two = tmp_path / "two"
    assert _torchrun(tmp_path, two).returncode == 0
    b = MarginScan.load(two / "scan.sqlite")
    final = two / "scan.sqlite"
    final.rename(two / "reference.sqlite")
    ResultStore(final, mode="create", meta=b.meta).close()
    pairs = b.to_dataframe()
    for rank in (0, 1):
        with ResultStore(part_path(final, rank, 2), mode="create", meta=b.meta) as st:
            batch = (pairs["sample"] * 3 + pairs["subspace"]) // 8  # the fixed batch grid
            mine = pairs[(batch % 2 == rank) & (batch < 3)]  # batches 0-2 = samples 0-7 were done
            smp = mine["sample"].unique()
            st.write_samples(smp, b.labels[smp].numpy(), b.predictions[smp].numpy())
            fake = mine["margin"] * 0 + 123.0  # marks pairs that must be copied, not recomputed
            st.write_pairs(mine["sample"], mine["subspace"], fake, mine["raw_margin"],
                           mine["iterations"], mine["converged"], mine["adv_label"])
    refused = _torchrun(tmp_path, two)
    assert refused.returncode != 0 and "--resume" in refused.stderr  # never overwrite
    again = _torchrun(tmp_path, two, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    got = MarginScan.load(final)
    assert got.complete and not any(p.name.startswith("scan.sqlite.part") for p in two.iterdir())
    assert bool((got.margins[:8] == 123.0).all())
    torch.testing.assert_close(got.margins[8:], b.margins[8:], rtol=0, atol=0)


def test_single_process_resume_merges_leftover_parts(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    assert cli.main(_args(out)) == 0
    final = out / "scan.sqlite"
    ref = MarginScan.load(final)
    final.rename(out / "reference.sqlite")
    pairs = ref.to_dataframe()
    for rank in (0, 1, 2):  # an interrupted 3-process run, resumed by one process
        with ResultStore(part_path(final, rank, 3), mode="create", meta=ref.meta) as st:
            batch = (pairs["sample"] * 3 + pairs["subspace"]) // 8
            mine = pairs[(batch % 3 == rank) & (batch < 3)]
            st.write_pairs(mine["sample"], mine["subspace"], mine["margin"] * 0 + 123.0, mine["raw_margin"],
                           mine["iterations"], mine["converged"], mine["adv_label"])
    capsys.readouterr()
    assert cli.main(_args(out) + ["--resume"]) == 0
    assert "merged 24 pairs" in capsys.readouterr().out
    got = MarginScan.load(final)
    assert got.complete and not any(p.name.startswith("scan.sqlite.part") for p in out.iterdir())
    assert bool((got.margins[:8] == 123.0).all())
    torch.testing.assert_close(got.margins[8:], ref.margins[8:], rtol=0, atol=0)
    # a part made with other settings is refused, not merged
    other = dict(ref.meta, subspaces="dct:K=2,T=2")
    ResultStore(part_path(final, 0, 2), mode="create", meta=other).close()
    assert cli.main(_args(out) + ["--resume"]) == 2
    assert "subspaces" in capsys.readouterr().err


def test_world_from_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world_from_env() == (3, 4, 1)
    assert part_path("/x/scan.sqlite", 1, 4) == Path("/x/scan.sqlite.part1-of-4")


@pytest.mark.parametrize("batch_size", [None, 8])
def test_rank_engine_calls_are_checked_like_rank_0_planned(tmp_path, monkeypatch, batch_size):
    """A rank runs the engine with rank 0's plan: an automatic size is checked batch by batch
    against rank 0's budget (as a single-process scan does), an explicit one is not."""
    from digits_models import digits_mlp

    from pyboundary.scans import distributed, margins
    from pyboundary.zoo import data as zdata

    model = digits_mlp()
    ds = zdata.load_dataset("digits", "test", limit=12, seed=0)
    plans, states = [], []
    planned_meta = distributed._planned_meta
    run_pairs = margins._run_pairs

    def spy_plan(*a, **k):
        meta, plan = planned_meta(*a, **k)
        plans.append(plan)
        return meta, plan

    def spy_pairs(*a):
        states.append(a[10])
        return run_pairs(*a)

    monkeypatch.setattr(distributed, "_planned_meta", spy_plan)
    monkeypatch.setattr(margins, "_run_pairs", spy_pairs)
    scan = distributed.distributed_scan(model, ds, "dct:K=4,T=2", store=tmp_path / "s.sqlite", progress=False,
                                        init_method=f"file://{tmp_path / 'pg'}", rank=0, world=1,
                                        batch_size=batch_size, memory_budget="2GB")
    assert scan.complete and len(plans) == 1 and len(states) == 1
    plan, calls = plans[0], states[0]
    assert calls.batch_size == plan.batch_size
    if batch_size is None:
        assert plan.source == "auto" and calls.budget == plan.budget and calls.fixed == float(plan.fixed or 0.0)
    else:
        assert plan.source == "explicit" and calls.budget is None


def test_show_includes_the_parts_of_a_running_multi_process_scan(tmp_path, tiny, capsys):
    """While torchrun ranks write their part stores, the final store holds no pair yet: show
    reads the parts too (read-only) and says so; a resume refuses to merge a part whose rank is
    still writing it."""
    from pyboundary.scans.store import writer_lock

    out = tmp_path / "run"
    assert cli.main(_args(out)) == 0
    final = out / "scan.sqlite"
    ref = MarginScan.load(final)
    final.rename(out / "reference.sqlite")
    ResultStore(final, mode="create", meta=ref.meta).close()  # rank 0 creates it before the ranks compute
    for rank in (0, 1):  # each rank's part: the samples and every other sample's pairs
        part = part_path(final, rank, 2)
        with ResultStore(part, mode="create", meta=ref.meta) as st:
            st.merge_from(out / "reference.sqlite")
        con = sqlite3.connect(part)
        con.execute("DELETE FROM margins WHERE sample % 2 != ?", (rank,))
        con.commit()
        con.close()
    capsys.readouterr()
    assert cli.main(["show", str(out), "--no-plot"]) == 0
    text = capsys.readouterr().out
    assert f"({ref.margins.numel()} pairs are in the part stores" in text and ref.format_summary() in text
    assert MarginScan.load(final).margins.isnan().all()  # nothing was merged or changed
    with writer_lock(part_path(final, 1, 2)):  # rank 1 still running
        assert cli.main(_args(out) + ["--resume"]) == 2
        assert "another process is writing" in capsys.readouterr().err
    assert len(list(out.glob("scan.sqlite.part*-of-2"))) == 2  # nothing merged or removed

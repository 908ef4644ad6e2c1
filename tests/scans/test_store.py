import math
import sqlite3

import numpy as np
import pytest

from pyboundary.scans.store import ResultStore, StoreError

META = {"model": {"name": "m", "weights_hash": "abc"}, "data": "digits:xyz", "subspaces": "dct:K=8,T=1",
        "params": {"p": 2.0, "overshoot": 0.02}, "seed": 0}


def _pairs(samples, subspaces, base=0.0):
    s, j = np.meshgrid(samples, subspaces, indexing="ij")
    s, j = s.ravel(), j.ravel()
    margin = base + s + 0.1 * j
    margin[0] = math.inf  # a failed pair
    return dict(sample=s, subspace=j, margin=margin, raw_margin=margin * 0.9, iterations=j + 1,
                converged=np.isfinite(margin), adv_label=(s + 1) % 3)


def test_round_trip_and_primary_key(tmp_path):
    path = tmp_path / "s.sqlite"
    with ResultStore(path, mode="create", meta=META) as st:
        st.write_samples([0, 1], [2, 1], [2, 0])
        st.write_pairs(**_pairs([0, 1], [0, 1, 2]))
        with pytest.raises(StoreError, match="already stored"):
            st.write_pairs(**_pairs([1, 2], [2]))  # (1, 2) duplicates: whole batch refused
        assert st.count_pairs() == 6  # (2, 2) of the refused batch was not written either
    with ResultStore(path, mode="read") as st:
        got = st.read_pairs()
        want = _pairs([0, 1], [0, 1, 2])
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v)
        assert got["margin"][0] == math.inf and got["converged"].dtype == bool
        smp = st.read_samples()
        np.testing.assert_array_equal(smp["label"], [2, 1])
        np.testing.assert_array_equal(smp["prediction"], [2, 0])
        assert st.meta["params"] == {"p": 2.0, "overshoot": 0.02}
        assert "torch" in st.meta["versions"] and st.meta["schema_version"] == 1
        assert st.done_pairs() == {(s, j) for s in (0, 1) for j in (0, 1, 2)}
        with pytest.raises(StoreError, match="read-only"):
            st.write_samples([5], None, [0])


def test_unknown_labels_round_trip(tmp_path):
    with ResultStore(tmp_path / "s.sqlite", mode="create", meta=META) as st:
        st.write_samples([0, 1], None, [1, 1])
        assert st.read_samples()["label"] is None


def test_create_refuses_existing_file(tmp_path):
    path = tmp_path / "s.sqlite"
    ResultStore(path, mode="create", meta=META).close()
    with pytest.raises(StoreError, match="refusing to overwrite"):
        ResultStore(path, mode="create", meta=META)
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    with pytest.raises(StoreError, match="refusing to overwrite"):
        ResultStore(other, mode="create", meta=META)
    assert other.read_text() == "keep me"


def test_resume_checks_metadata(tmp_path):
    path = tmp_path / "s.sqlite"
    with ResultStore(path, mode="create", meta=META) as st:
        st.write_pairs(**_pairs([0], [0, 1]))
    with ResultStore(path, mode="resume", meta=dict(META)) as st:  # same settings: fine
        assert st.count_pairs() == 2
    changed = {**META, "params": {"p": math.inf, "overshoot": 0.02}, "model": {"name": "m", "weights_hash": "zzz"}}
    with pytest.raises(StoreError, match=r"differing keys: model, params") as err:
        ResultStore(path, mode="resume", meta=changed)
    # within a mapping, only the entries that differ are named
    assert "params.p: stored 2.0, now inf" in str(err.value) and "overshoot" not in str(err.value)
    assert "model.weights_hash: stored" in str(err.value) and "model.name" not in str(err.value)
    with pytest.raises(StoreError, match="differing keys: extra"):
        ResultStore(path, mode="resume", meta={**META, "extra": 1})
    # library versions are recorded, not compared
    with ResultStore(path, mode="resume", meta={**META, "versions": {"torch": "0.0"}}) as st:
        assert st.meta["versions"]["torch"] != "0.0"


def test_corrupt_and_foreign_files(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    for mode in ("read", "resume"):
        with pytest.raises(StoreError, match="not a readable pyboundary result store"):
            ResultStore(junk, mode=mode, meta=META)
    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (a)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="not a pyboundary result store"):
        ResultStore(foreign, mode="resume", meta=META)
    # a store whose file was truncated mid-way
    good = tmp_path / "good.sqlite"
    with ResultStore(good, mode="create", meta=META) as st:
        st.write_pairs(**_pairs(range(50), range(20)))
    data = good.read_bytes()
    good.write_bytes(data[:100] + b"\x00" * 50 + data[150:])
    with pytest.raises(StoreError, match="corrupt|not a"):
        with ResultStore(good, mode="read") as st:
            st.read_pairs()
    with pytest.raises(FileNotFoundError):
        ResultStore(tmp_path / "missing.sqlite", mode="read")


def test_merge(tmp_path):
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    with ResultStore(a, mode="create", meta=META) as st:
        st.write_samples([0], [1], [1])
        st.write_pairs(**_pairs([0], [0, 1]))
    with ResultStore(b, mode="create", meta=META) as st:
        st.write_samples([1], [0], [0])
        st.write_pairs(**_pairs([1], [0, 1]))
    with ResultStore(a, mode="resume", meta=META) as st:
        assert st.merge_from(b) == 2
        assert st.merge_from(b) == 0  # idempotent, no duplicates
        assert st.count_pairs() == 4 and list(st.read_samples()["sample"]) == [0, 1]
    c = tmp_path / "c.sqlite"
    ResultStore(c, mode="create", meta={**META, "seed": 1}).close()
    with ResultStore(a, mode="resume", meta=META) as st:
        with pytest.raises(StoreError, match="seed"):
            st.merge_from(c)


def test_generic_tables(tmp_path):
    path = tmp_path / "t.sqlite"
    with ResultStore(path, mode="create", meta={"kind": "tracking"}) as st:
        st.create_table("epochs", {"epoch": "int", "sample": "int", "margin": "float", "note": "str"}, ["epoch", "sample"])
        st.create_table("epochs", {"epoch": "int", "sample": "int", "margin": "float", "note": "str"}, ["epoch", "sample"])
        st.write_rows("epochs", {"epoch": [1, 0], "sample": np.array([0, 0]), "margin": np.array([0.5, math.inf]),
                                 "note": ["b", "a"]})
        with pytest.raises(StoreError, match="already stored"):
            st.write_rows("epochs", {"epoch": [0], "sample": [0], "margin": [1.0], "note": ["x"]})
        with pytest.raises(ValueError, match="must have columns"):
            st.write_rows("epochs", {"epoch": [2]})
        with pytest.raises(StoreError, match="different layout"):
            st.create_table("epochs", {"epoch": "int"}, ["epoch"])
        with pytest.raises(ValueError, match="table name"):
            st.create_table("margins", {"a": "int"}, ["a"])
        with pytest.raises(ValueError, match="type must be"):
            st.create_table("x", {"a": "blob"}, ["a"])
    with ResultStore(path, mode="read") as st:
        assert st.table_names() == ["epochs"]
        t = st.read_table("epochs")
        np.testing.assert_array_equal(t["epoch"], [0, 1])
        np.testing.assert_array_equal(t["margin"], [math.inf, 0.5])
        assert list(t["note"]) == ["a", "b"]


def test_bad_mode(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        ResultStore(tmp_path / "x", mode="write", meta=META)
    with pytest.raises(ValueError, match="meta is required"):
        ResultStore(tmp_path / "x", mode="create")


def test_one_writer_at_a_time(tmp_path):
    """A second writer is refused at once (not later on a duplicate pair); readers are not; the
    lock goes with the writer (closed, or its process killed)."""
    import subprocess
    import sys

    from pyboundary.scans.store import StoreLockedError, writer_lock

    path = tmp_path / "s.sqlite"
    first = ResultStore(path, mode="create", meta=META)
    with pytest.raises(StoreLockedError, match="another process is writing"):
        ResultStore(path, mode="resume", meta=META)
    with pytest.raises(StoreLockedError):
        with writer_lock(path):
            pass
    with ResultStore(path, mode="read") as reader:
        assert reader.count_pairs() == 0
    first.close()
    ResultStore(path, mode="resume", meta=META).close()
    # a writer killed while holding the store leaves no stale lock
    code = ("import sys, os, time; from pyboundary.scans.store import ResultStore; "
            f"st = ResultStore({str(path)!r}, mode='resume', meta={META!r}); print('held', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError):
            ResultStore(path, mode="resume", meta=META)
    finally:
        proc.kill()
        proc.wait()
    ResultStore(path, mode="resume", meta=META).close()


def test_an_empty_store_left_by_a_killed_creation_is_taken_over(tmp_path):
    from pyboundary.scans.store import is_empty_store

    for content in (b"", None):
        path = tmp_path / f"e{content is None}.sqlite"
        if content is None:  # an SQLite file of pages but no tables (killed before the schema committed)
            con = sqlite3.connect(path)
            con.execute("CREATE TABLE t (a)")
            con.execute("DROP TABLE t")
            con.commit()
            con.close()
            assert path.stat().st_size > 0
        else:
            path.write_bytes(content)
        assert is_empty_store(path)
        with pytest.raises(StoreError, match="is empty"):
            ResultStore(path, mode="read")
        with ResultStore(path, mode="create", meta=META) as st:
            st.write_pairs(**_pairs([0], [0, 1]))
        assert not is_empty_store(path)
        with pytest.raises(StoreError, match="refusing to overwrite"):
            ResultStore(path, mode="create", meta=META)
    assert not is_empty_store(tmp_path / "missing.sqlite")


def test_a_store_cut_inside_a_page_is_refused(tmp_path):
    """SQLite reads the missing bytes of a short last page as zeros without an error: a copy cut
    short would give zeroed results silently."""
    path = tmp_path / "s.sqlite"
    with ResultStore(path, mode="create", meta=META) as st:
        st.write_pairs(**_pairs(range(50), range(20)))
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = path.read_bytes()
    for cut in (1, 10, 100):
        path.write_bytes(data[:-cut])
        for mode in ("read", "resume"):
            with pytest.raises(StoreError, match="truncated"):
                ResultStore(path, mode=mode, meta=META)


def test_record_meta_rewrites_recording_keys_only(tmp_path):
    path = tmp_path / "s.sqlite"
    with ResultStore(path, mode="create", meta={**META, "batching": {"batch_size": 28}}) as st:
        st.record_meta({"batching": {"batch_size": 7}})
        assert st.meta["batching"] == {"batch_size": 7}
        with pytest.raises(StoreError, match="only recording keys"):
            st.record_meta({"seed": 3})
    with ResultStore(path, mode="resume", meta=META) as st:  # a recording key never blocks a resume
        assert st.meta["seed"] == 0
    with ResultStore(path, mode="read") as st:
        with pytest.raises(StoreError, match="read-only"):
            st.record_meta({"batching": {}})

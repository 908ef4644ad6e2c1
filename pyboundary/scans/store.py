"""Crash-safe result storage on SQLite (standard library only, no pickles).

A :class:`ResultStore` is one SQLite file holding

* ``meta``: key -> JSON value; what the results were computed with (model name and weights
  hash, data identity, subspace spec, every parameter, library versions, seed) plus the store's
  own ``store_kind`` and ``schema_version``;
* ``samples``: one row per input sample (label, prediction);
* ``margins``: one row per finished (sample, subspace) pair; the row *is* the "done" mark, and
  its primary key (sample, subspace) makes a duplicate impossible;
* the generic table ``sample_keys`` (:meth:`ResultStore.write_sample_keys`): one 64-bit content
  key per sample, so that scans of different sample sets can be matched sample by sample
  (stores written before it existed simply lack it);
* any number of generic named tables (:meth:`ResultStore.create_table`,
  :meth:`ResultStore.write_rows`, :meth:`ResultStore.read_table`) for other pipelines, e.g. the
  margin-dynamics tracker's (epoch, sample, margin) rows; arrays are stored as typed columns.

Every :meth:`write_pairs` / :meth:`write_rows` call is one transaction: after a crash (even
SIGKILL) a batch is either entirely present or entirely absent. The journal is SQLite's WAL with
``synchronous=FULL``.

Opening rules (never overwrite silently):

* ``mode='create'`` refuses an existing file (an empty one, left by a run killed while it
  created the store, holds nothing and is taken over);
* ``mode='resume'`` creates the file if absent, else checks the stored metadata against the given
  one and refuses, naming the differing keys, when they differ;
* one writer at a time: a store opened for writing holds an exclusive lock on ``<file>.lock``
  (``flock``, released when the store is closed or the process dies), and a second writer is
  refused at once (:class:`StoreLockedError`) instead of failing later on a pair the first one
  wrote;
* ``mode='read'`` opens an existing store read-only (an SQLite ``mode=ro`` connection: nothing
  can be written). It never blocks a scan that is writing the same store, nor waits for it: in
  WAL mode readers and the writer do not lock each other out, and :meth:`ResultStore.snapshot`
  gives a set of reads one consistent view (``pyboundary show`` on a running scan).

A file that is not SQLite, or SQLite without this schema, or a file cut short (its size not a
whole number of its pages), gives a ValueError saying so.
"""

from __future__ import annotations

import json
import math
import os
import struct
import re
import sqlite3
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

__all__ = ["ResultStore", "StoreError", "StoreLockedError", "SCHEMA_VERSION", "STORE_KIND", "library_versions",
           "writer_lock", "is_empty_store"]

SCHEMA_VERSION = 1
STORE_KIND = "pyboundary-result-store"
#: generic table holding one content key per sample (written by margin scans)
SAMPLE_KEYS_TABLE = "sample_keys"

#: metadata keys that may differ on resume (they record, they do not define, the results)
VOLATILE_KEYS = frozenset({"versions", "created", "store_kind", "schema_version", "command", "batching"})

_MARGIN_COLUMNS = ("sample", "subspace", "margin", "raw_margin", "iterations", "converged", "adv_label")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_TYPES = {"REAL": "REAL", "INTEGER": "INTEGER", "TEXT": "TEXT", "float": "REAL", "int": "INTEGER", "str": "TEXT"}
_RESERVED = {"meta", "samples", "margins", "tables"}


class StoreError(ValueError):
    """A store that cannot be used as asked (corrupt, existing, or made with other settings)."""


class StoreLockedError(StoreError):
    """Another process holds the store open for writing."""


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


class _WriterLock:
    """Exclusive advisory lock (``flock``) on ``<store>.lock``: held by the one process writing the
    store; the kernel releases it when that process exits or is killed, so a killed scan never
    leaves a stale lock. A no-op where ``fcntl`` does not exist (Windows)."""

    def __init__(self, path: Path):
        self.path, self._fd = path, None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX
            return
        fd = os.open(str(_lock_path(path)), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another process
            os.close(fd)
            raise StoreLockedError(
                f"another process is writing {str(path)!r} (its lock {str(_lock_path(path))!r} is held; or "
                "this process holds it open for writing in another ResultStore): wait for that scan to "
                "finish (or stop it, or close that store), or choose another output") from None
        except OSError:  # a file system without flock (some network mounts): write unlocked
            os.close(fd)
            return
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


@contextmanager
def writer_lock(path):
    """Hold a store's writer lock for the block (StoreLockedError when another process holds it),
    e.g. to merge and remove a part store only when no rank is still writing it."""
    lock = _WriterLock(Path(path))
    try:
        yield
    finally:
        lock.release()


def _page_size(path: Path) -> int | None:
    """The page size in an SQLite file's header (None if the file is shorter than a header)."""
    with open(path, "rb") as fh:
        head = fh.read(100)
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        return None
    size = struct.unpack(">H", head[16:18])[0]
    return 65536 if size == 1 else size


def _check_whole_pages(path: Path) -> None:
    """A store file cut short inside a page reads back zeros for the missing bytes without any
    SQLite error: refuse it (an SQLite file is always a whole number of pages)."""
    size = path.stat().st_size
    page = _page_size(path) if size else None
    if page and size % page:
        raise StoreError(f"{str(path)!r} is truncated ({size} bytes, not a whole number of its {page}-byte "
                         "pages): a copy was cut short; restore the whole file")


def is_empty_store(path) -> bool:
    """True when ``path`` is a file that holds no store yet: zero bytes, or an SQLite database
    without tables (a run killed while it created the store leaves one)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.stat().st_size == 0:
        return True
    try:
        conn = ResultStore._connect(path, writable=False)
    except StoreError:  # not SQLite at all: something else, not an empty store
        return False
    try:
        return conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    finally:
        conn.close()


def library_versions() -> dict:
    """Versions of the libraries that produced a result: python, torch, numpy, pyboundary."""
    import platform

    import torch

    from .._version import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pyboundary": __version__,
    }


def _canonical(value):
    """JSON-compatible canonical form of a metadata value (tuples -> lists, floats kept)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _db_value(v):
    """Python scalar for SQLite: numpy scalars unwrapped, non-finite floats kept as REAL."""
    if isinstance(v, np.generic):
        return v.item()
    return v


def _difference(key: str, stored, given) -> str:
    """'key: stored A, now B'; for two mappings, only their entries that differ ('key.sub: ...')."""
    if isinstance(stored, Mapping) and isinstance(given, Mapping):
        subs = sorted(k for k in set(stored) | set(given) if stored.get(k) != given.get(k))
        text = "; ".join(f"{key}.{k}: stored {stored.get(k)!r}, now {given.get(k)!r}" for k in subs)
        if key == "data" and "identity" in subs:  # a hash: say what it covers
            text += " (other samples: another dataset, split, --limit/limit or --seed/seed)"
        return text
    return f"{key}: stored {stored!r}, now {given!r}"


class ResultStore:
    """One SQLite file of results; see the module docstring for the layout and the rules.

    Args:
        path: file path (conventionally ``*.sqlite``).
        mode: 'create' (refuse an existing file), 'resume' (create or continue; metadata must
            match), or 'read' (existing file only).
        meta: metadata dict (JSON-serialisable values); required for 'create' and 'resume'.
            Keys in ``VOLATILE_KEYS`` (library versions, ...) are recorded but not compared.
    """

    def __init__(self, path, mode: str = "read", meta: Mapping | None = None):
        if mode not in ("create", "resume", "read"):
            raise ValueError(f"mode must be 'create', 'resume' or 'read', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        exists = self.path.exists()
        if mode == "read" and not exists:
            raise FileNotFoundError(f"no result store at {str(self.path)!r}")
        if mode == "create" and exists and not is_empty_store(self.path):
            raise StoreError(
                f"a file already exists at {str(self.path)!r}; refusing to overwrite it. "
                "Resume it (resume=True / --resume) or choose another output."
            )
        if mode in ("create", "resume") and meta is None:
            raise ValueError(f"meta is required to open a store with mode={mode!r}")
        if exists and self.path.is_dir():
            raise StoreError(f"{str(self.path)!r} is a directory, not a result store file")
        if exists:
            _check_whole_pages(self.path)
        self._lock = _WriterLock(self.path) if mode != "read" else None
        try:
            self._conn = self._connect(self.path, writable=mode != "read")
        except BaseException:
            self._release_lock()
            raise
        if exists and self._has_schema():
            self._check_schema()
            if mode == "resume":
                try:
                    self.check_meta(meta)
                except StoreError:
                    self.close()
                    raise
        elif exists and not self._is_empty():
            self.close()
            raise StoreError(
                f"{str(self.path)!r} is an SQLite database but not a pyboundary result store "
                "(no 'meta' table)"
            )
        elif mode == "read":
            self.close()
            raise StoreError(f"{str(self.path)!r} is empty, not a pyboundary result store")
        else:
            self._init_schema(meta)

    # ------------------------------------------------------------------ opening
    @staticmethod
    def _connect(path: Path, writable: bool) -> sqlite3.Connection:
        try:
            if writable:
                conn = sqlite3.connect(str(path), timeout=60.0, isolation_level=None)
            else:
                uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=60.0, isolation_level=None)
            if writable:  # WAL is persistent: readers need no pragma (and may lack write access)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{str(path)!r} is not a readable pyboundary result store (corrupt or not an "
                f"SQLite file): {exc}"
            ) from None
        return conn

    def _is_empty(self) -> bool:
        return self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0

    def _has_schema(self) -> bool:
        row = self._conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchone()
        return row[0] == 1

    def _check_schema(self) -> None:
        try:
            meta = self.meta
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except (sqlite3.DatabaseError, ValueError) as exc:
            self.close()
            raise StoreError(f"{str(self.path)!r} is a corrupt pyboundary result store: {exc}") from None
        if meta.get("store_kind") != STORE_KIND or not {"samples", "margins", "tables"} <= tables:
            self.close()
            raise StoreError(f"{str(self.path)!r} is an SQLite database but not a pyboundary result store")
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            self.close()
            raise StoreError(
                f"{str(self.path)!r} has store schema version {version!r}; this pyboundary reads "
                f"version {SCHEMA_VERSION}"
            )

    def check_meta(self, meta: Mapping) -> None:
        """Raise StoreError naming the keys whose stored value differs from ``meta``
        (keys in ``VOLATILE_KEYS`` are not compared)."""
        stored = self.meta
        given = _canonical(dict(meta))
        keys = (set(stored) | set(given)) - VOLATILE_KEYS
        differing = sorted(k for k in keys if stored.get(k) != given.get(k))
        if differing:
            details = "; ".join(_difference(k, stored.get(k), given.get(k)) for k in differing)
            raise StoreError(
                f"refusing to resume {str(self.path)!r}: it was made with different settings "
                f"(differing keys: {', '.join(differing)}). {details}"
            )

    def _init_schema(self, meta: Mapping) -> None:
        full = {**_canonical(dict(meta)), "store_kind": STORE_KIND, "schema_version": SCHEMA_VERSION}
        full.setdefault("versions", library_versions())
        with self._transaction() as c:
            c.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            c.execute(
                "CREATE TABLE samples (sample INTEGER PRIMARY KEY, label INTEGER, prediction INTEGER NOT NULL)"
            )
            c.execute(
                "CREATE TABLE margins (sample INTEGER NOT NULL, subspace INTEGER NOT NULL, "
                "margin REAL, raw_margin REAL, iterations INTEGER NOT NULL, converged INTEGER NOT NULL, "
                "adv_label INTEGER, PRIMARY KEY (sample, subspace))"
            )
            c.execute("CREATE TABLE tables (name TEXT PRIMARY KEY, columns TEXT NOT NULL, primary_key TEXT NOT NULL)")
            c.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v, sort_keys=True)) for k, v in full.items()])

    # ------------------------------------------------------------------ basics
    def _transaction(self):
        store = self

        class _Tx:
            def __enter__(self_inner):
                store._require_open()
                store._conn.execute("BEGIN IMMEDIATE")
                return store._conn

            def __exit__(self_inner, exc_type, exc, tb):
                if exc_type is None:
                    store._conn.execute("COMMIT")
                else:
                    store._conn.execute("ROLLBACK")
                return False

        return _Tx()

    @contextmanager
    def snapshot(self):
        """Reads inside the block see one consistent state of the store (a read transaction),
        even while another process adds batches; nested use is a no-op."""
        self._require_open()
        if self._conn.in_transaction:
            yield self
            return
        self._conn.execute("BEGIN")
        try:
            yield self
        except BaseException:
            # keep the error being raised (e.g. a StoreError naming a corrupt file): ending the
            # read transaction of a damaged file can fail too
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        self._conn.execute("COMMIT")

    def _require_open(self) -> None:
        if self._conn is None:
            raise StoreError(f"the store {str(self.path)!r} is closed")

    def _require_writable(self) -> None:
        if self.mode == "read":
            raise StoreError(f"the store {str(self.path)!r} was opened read-only (mode='read')")

    def close(self) -> None:
        """Close the connection and release the writer lock (idempotent)."""
        if getattr(self, "_conn", None) is not None:
            self._conn.close()
            self._conn = None
        self._release_lock()

    def _release_lock(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r}, mode={self.mode!r})"

    def _fetch(self, sql: str, args=()) -> list:
        """Run a query; an SQLite error on a damaged file becomes a StoreError naming the file."""
        self._require_open()
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{str(self.path)!r} is a corrupt pyboundary result store: {exc}") from None

    @property
    def meta(self) -> dict:
        """The stored metadata (key -> decoded JSON value)."""
        return {k: json.loads(v) for k, v in self._fetch("SELECT key, value FROM meta")}

    def record_meta(self, values: Mapping) -> None:
        """Overwrite metadata entries that record rather than define the results (keys in
        ``VOLATILE_KEYS``, e.g. how the latest run was batched); other keys are refused."""
        self._require_writable()
        bad = sorted(set(values) - VOLATILE_KEYS)
        if bad:
            raise StoreError(f"only recording keys {sorted(VOLATILE_KEYS)} can be rewritten, got {bad}")
        with self._transaction() as c:
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                          [(k, json.dumps(_canonical(v), sort_keys=True)) for k, v in values.items()])

    # ------------------------------------------------------------------ margin scans
    def write_samples(self, sample, label, prediction) -> None:
        """Record samples (one transaction); rows already present are left as they are.

        Args:
            sample: (n,) int sample indices; label: (n,) int or None (unknown); prediction: (n,) int.
        """
        self._require_writable()
        sample = np.asarray(sample, dtype=np.int64).reshape(-1)
        prediction = np.asarray(prediction, dtype=np.int64).reshape(-1)
        lab = [None] * sample.size if label is None else np.asarray(label, dtype=np.int64).reshape(-1).tolist()
        if not (len(lab) == prediction.size == sample.size):
            raise ValueError(
                f"write_samples: sample, label, prediction lengths differ: {sample.size}, {len(lab)}, {prediction.size}"
            )
        rows = list(zip(sample.tolist(), lab, prediction.tolist()))
        with self._transaction() as c:
            c.executemany("INSERT OR IGNORE INTO samples VALUES (?, ?, ?)", rows)

    def write_pairs(self, sample, subspace, margin, raw_margin, iterations, converged, adv_label) -> None:
        """Record finished (sample, subspace) pairs in one transaction.

        All arrays are (n,). A pair already present raises StoreError and nothing of the batch is
        written (the primary key forbids duplicates). Margins are in input units (L2 or L-inf
        norm of the perturbation); +inf marks a failure.
        """
        self._require_writable()
        cols = [np.asarray(a).reshape(-1) for a in (sample, subspace, margin, raw_margin, iterations, converged, adv_label)]
        n = cols[0].size
        if any(c.size != n for c in cols):
            raise ValueError(f"write_pairs: columns have different lengths {[c.size for c in cols]}")
        rows = list(
            zip(
                cols[0].astype(np.int64).tolist(),
                cols[1].astype(np.int64).tolist(),
                cols[2].astype(np.float64).tolist(),
                cols[3].astype(np.float64).tolist(),
                cols[4].astype(np.int64).tolist(),
                cols[5].astype(bool).astype(np.int64).tolist(),
                cols[6].astype(np.int64).tolist(),
            )
        )
        try:
            with self._transaction() as c:
                c.executemany(f"INSERT INTO margins VALUES ({', '.join('?' * 7)})", rows)
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"write_pairs: a (sample, subspace) pair is already stored: {exc}") from None

    def done_pairs(self) -> set:
        """Set of (sample, subspace) pairs already stored."""
        return set(self._fetch("SELECT sample, subspace FROM margins"))

    def count_pairs(self) -> int:
        """Number of stored (sample, subspace) pairs."""
        return int(self._fetch("SELECT count(*) FROM margins")[0][0])

    def read_samples(self) -> dict:
        """{'sample', 'label', 'prediction'} numpy arrays ordered by sample (label -1 if unknown)."""
        rows = self._fetch("SELECT sample, label, prediction FROM samples ORDER BY sample")
        arr = np.array([(s, -1 if lab is None else lab, pr) for s, lab, pr in rows], dtype=np.int64).reshape(-1, 3)
        has_label = all(r[1] is not None for r in rows)
        return {"sample": arr[:, 0], "label": arr[:, 1] if has_label else None, "prediction": arr[:, 2]}

    def read_pairs(self) -> dict:
        """All stored pairs as numpy arrays (keys as the margin columns), ordered by (sample, subspace)."""
        rows = self._fetch(f"SELECT {', '.join(_MARGIN_COLUMNS)} FROM margins ORDER BY sample, subspace")
        out = {}
        for j, name in enumerate(_MARGIN_COLUMNS):
            kind = np.float64 if name in ("margin", "raw_margin") else np.int64
            out[name] = np.array([_nan_to_inf(r[j]) if kind is np.float64 else r[j] for r in rows], dtype=kind)
        out["converged"] = out["converged"].astype(bool)
        return out

    def merge_from(self, other_path) -> int:
        """Copy the samples, pairs and sample keys of another store (same metadata) into this one,
        in one transaction.

        Pairs already here are kept (the other store's copy of a pair is ignored). Returns the
        number of pairs added. Refuses a store made with different settings.
        """
        self._require_writable()
        with ResultStore(other_path, mode="read") as other:
            stored, mine = other.meta, self.meta
            keys = (set(stored) | set(mine)) - VOLATILE_KEYS
            differing = sorted(k for k in keys if stored.get(k) != mine.get(k))
            with_keys = SAMPLE_KEYS_TABLE in other.table_names()
        if differing:
            raise StoreError(f"cannot merge {str(other_path)!r}: different settings (keys: {', '.join(differing)})")
        if with_keys:
            self._create_sample_keys()
        before = self.count_pairs()
        self._conn.execute("ATTACH DATABASE ? AS part", (str(other_path),))
        try:
            with self._transaction() as c:
                c.execute("INSERT OR IGNORE INTO main.samples SELECT * FROM part.samples")
                c.execute("INSERT OR IGNORE INTO main.margins SELECT * FROM part.margins")
                if with_keys:
                    c.execute(f"INSERT OR IGNORE INTO main.t_{SAMPLE_KEYS_TABLE} SELECT * FROM part.t_{SAMPLE_KEYS_TABLE}")
        finally:
            self._conn.execute("DETACH DATABASE part")
        return self.count_pairs() - before

    # ------------------------------------------------------------------ per-sample keys
    def _create_sample_keys(self) -> None:
        self.create_table(SAMPLE_KEYS_TABLE, {"sample": "INTEGER", "key": "INTEGER"}, ["sample"])

    def write_sample_keys(self, sample, key) -> None:
        """Record each sample's 64-bit content key (one transaction; keys already stored are kept).

        Args:
            sample: (n,) int sample indices; key: (n,) int64 keys (see
                :func:`pyboundary.scans.margins.sample_keys`).
        """
        self._require_writable()
        sample = np.asarray(sample, dtype=np.int64).reshape(-1)
        key = np.asarray(key, dtype=np.int64).reshape(-1)
        if sample.size != key.size:
            raise ValueError(f"write_sample_keys: sample and key lengths differ: {sample.size}, {key.size}")
        self._create_sample_keys()
        with self._transaction() as c:
            c.executemany(f"INSERT OR IGNORE INTO t_{SAMPLE_KEYS_TABLE} (sample, key) VALUES (?, ?)",
                          list(zip(sample.tolist(), key.tolist())))

    def read_sample_keys(self, n: int) -> np.ndarray | None:
        """(n,) int64 keys of samples 0..n-1, or None when the store lacks a key for any of them."""
        if SAMPLE_KEYS_TABLE not in self.table_names():
            return None
        rows = self._fetch(f"SELECT sample, key FROM t_{SAMPLE_KEYS_TABLE} WHERE sample >= 0 AND sample < ? "
                           "ORDER BY sample", (int(n),))
        if len(rows) != n:
            return None
        return np.array([k for _, k in rows], dtype=np.int64)

    # ------------------------------------------------------------------ generic tables
    def create_table(self, name: str, columns: Mapping[str, str], primary_key: Iterable[str]) -> None:
        """Create a named table of typed columns (idempotent if it exists with the same layout).

        Args:
            name: identifier (letters, digits, underscore), not one of the store's own tables.
            columns: column name -> 'REAL' | 'INTEGER' | 'TEXT' (or 'float' | 'int' | 'str').
            primary_key: the columns that identify a row; a repeated key is refused on write.
        """
        self._require_writable()
        if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED:
            raise ValueError(f"table name must be an identifier other than {sorted(_RESERVED)}, got {name!r}")
        cols = {}
        for col, typ in dict(columns).items():
            if not isinstance(col, str) or not _NAME_RE.match(col):
                raise ValueError(f"column name must be an identifier, got {col!r}")
            if typ not in _TYPES:
                raise ValueError(f"column {col!r}: type must be one of {sorted(_TYPES)}, got {typ!r}")
            cols[col] = _TYPES[typ]
        pk = list(primary_key)
        if not pk or any(k not in cols for k in pk):
            raise ValueError(f"primary_key must be a non-empty list of columns of {list(cols)}, got {pk!r}")
        existing = self._table_layout(name)
        if existing is not None:
            if existing != (cols, pk):
                raise StoreError(f"table {name!r} already exists with a different layout {existing}")
            return
        col_sql = ", ".join(f"{c} {t}" for c, t in cols.items())
        with self._transaction() as c:
            c.execute(f"CREATE TABLE t_{name} ({col_sql}, PRIMARY KEY ({', '.join(pk)}))")
            c.execute("INSERT INTO tables VALUES (?, ?, ?)", (name, json.dumps(cols), json.dumps(pk)))

    def _table_layout(self, name: str):
        rows = self._fetch("SELECT columns, primary_key FROM tables WHERE name = ?", (name,))
        row = rows[0] if rows else None
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def table_names(self) -> list:
        """Names of the generic tables in this store."""
        return [r[0] for r in self._fetch("SELECT name FROM tables ORDER BY name")]

    def write_rows(self, name: str, rows: Mapping[str, Iterable]) -> None:
        """Append rows to a named table in one transaction.

        Args:
            rows: column name -> (n,) sequence/array, every column of the table present.
        A row whose primary key is already present raises StoreError and nothing is written.
        """
        self._require_writable()
        layout = self._table_layout(name)
        if layout is None:
            raise ValueError(f"no table named {name!r} in {str(self.path)!r}; create_table first")
        cols, _ = layout
        if set(rows) != set(cols):
            raise ValueError(f"rows for table {name!r} must have columns {sorted(cols)}, got {sorted(rows)}")
        data = [np.asarray(rows[c]).reshape(-1).tolist() for c in cols]
        n = len(data[0])
        if any(len(d) != n for d in data):
            raise ValueError(f"rows for table {name!r}: columns have different lengths {[len(d) for d in data]}")
        records = [tuple(_db_value(v) for v in rec) for rec in zip(*data)]
        try:
            with self._transaction() as c:
                c.executemany(f"INSERT INTO t_{name} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", records)
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"write_rows: a row of table {name!r} is already stored: {exc}") from None

    def read_table(self, name: str) -> dict:
        """A named table as column -> numpy array (REAL -> float64, INTEGER -> int64, TEXT -> object),
        ordered by its primary key."""
        layout = self._table_layout(name)
        if layout is None:
            raise ValueError(f"no table named {name!r} in {str(self.path)!r}")
        cols, pk = layout
        rows = self._fetch(f"SELECT {', '.join(cols)} FROM t_{name} ORDER BY {', '.join(pk)}")
        out = {}
        for j, (c, t) in enumerate(cols.items()):
            vals = [r[j] for r in rows]
            if t == "REAL":
                out[c] = np.array([_nan_to_inf(v) for v in vals], dtype=np.float64)
            elif t == "INTEGER":
                out[c] = np.array(vals, dtype=np.int64)
            else:
                out[c] = np.array(vals, dtype=object)
        return out


def _nan_to_inf(v):
    """SQLite stores NaN as NULL; read NULL back as NaN (+/-inf round-trip natively)."""
    return math.nan if v is None else v


def remove_store(path) -> None:
    """Delete a store file and its WAL/SHM/lock companions (merged per-rank parts, a refused run's
    store)."""
    for suffix in ("", "-wal", "-shm", "-journal", ".lock"):
        try:
            os.remove(str(path) + suffix)
        except FileNotFoundError:
            pass

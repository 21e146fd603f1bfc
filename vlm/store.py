"""The embedding store: image and text embeddings keyed by fingerprints, in one SQLite file.

    images(model, content, prep, variant) -> float32 vector + the input's metadata (view, size, warnings)
    texts(model, text)                    -> float32 vector

model    the backbone fingerprint (an adapted LoRA model has its own: base + adapter hash)
content  sha256 of the file's bytes (a renamed or copied file is the same entry; an edited one is not)
prep     the preprocessing version + everything that changes pixels before the encoder (image size,
         mean/std, DICOM window, frame rule) - see `vlm.scoring.preprocessing_key`
variant  the preprocessing variant name (original, clahe, ...), one row each, so a run with other
         variants reuses the ones it shares; the pseudo-variant `ood-stage-features:original` holds the
         OOD guard's stage features of the 'original' variant (another length), so a re-run with the
         guard on needs no image-encoder pass either

Why SQLite (WAL mode), not a folder of .npz files, LanceDB or Parquet: it ships with Python (no new
dependency), one file holds 100k+ images without 100k inodes, lookups are indexed point reads, and
WAL gives what two batches running at once need - many readers never blocked, writers serialised by a
busy timeout, every write a transaction (a killed run leaves the file valid, at most its last batch
missing). LanceDB/Parquet are built for scans and appends of immutable fragments; concurrent writers
and deleting rows (eviction) are their weak spots, and they add large dependencies for vectors we only
ever read back by key.

Bounded: the vectors are limited to `max_bytes` (default 4 GiB, `$VLM_XRAY_CACHE_MAX_MB`). Eviction
rule: when a write takes the store over the limit, the least recently used entries (by `last_used`,
set when an entry is written or read) are deleted until it is at 90% of the limit; text entries are
kept over image entries of the same age (they are tiny and cost a text-encoder pass each).
`vlm-xray cache info` shows the store; `vlm-xray cache prune` applies a smaller limit, drops one
model or everything.

Every process (and DataLoader worker) opens its own connection: SQLite connections must not cross
a fork.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable

import numpy as np

logger = logging.getLogger(__name__)

STORE_FILE = "embeddings.sqlite"
DEFAULT_MAX_MB = 4096
PRUNE_TO = 0.9  # eviction brings the store down to this share of the limit
CHECK_EVERY = 256  # rows written between size checks (a SUM over an index; cheap but not free)
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    model TEXT NOT NULL, content TEXT NOT NULL, prep TEXT NOT NULL, variant TEXT NOT NULL,
    vec BLOB NOT NULL, meta TEXT NOT NULL DEFAULT '{}', nbytes INTEGER NOT NULL, last_used REAL NOT NULL,
    PRIMARY KEY (model, content, prep, variant)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS images_lru ON images (last_used);
CREATE TABLE IF NOT EXISTS texts (
    model TEXT NOT NULL, key TEXT NOT NULL, vec BLOB NOT NULL, nbytes INTEGER NOT NULL, last_used REAL NOT NULL,
    PRIMARY KEY (model, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS texts_lru ON texts (last_used);
CREATE TABLE IF NOT EXISTS info (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_KEYS = {"images": ("model", "content", "prep", "variant"), "texts": ("model", "key")}


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLM_XRAY_CACHE", Path.home() / ".cache" / "vlm-xray"))


def default_max_bytes() -> int:
    raw = os.environ.get("VLM_XRAY_CACHE_MAX_MB", "")
    try:
        mb = float(raw) if raw else DEFAULT_MAX_MB
    except ValueError:
        raise ValueError(f"$VLM_XRAY_CACHE_MAX_MB={raw!r}: expected a number of megabytes") from None
    return int(mb * 2**20)


def store_path(location: str | Path | None = None) -> Path:
    """None: $VLM_XRAY_CACHE/embeddings.sqlite; a folder: FOLDER/embeddings.sqlite; a .sqlite file: itself."""
    if location is None:
        return default_cache_dir() / STORE_FILE
    p = Path(location)
    return p if p.suffix in (".sqlite", ".db") else p / STORE_FILE


class StoreError(RuntimeError):
    """The store file cannot be opened or written (the message names the file)."""


class EmbeddingStore:
    """One SQLite file of embeddings; safe to use from several processes at once (see the module doc)."""

    def __init__(self, location: str | Path | None = None, max_bytes: int | None = None, timeout: float = 120.0):
        self.path = store_path(location)
        self.max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        self.timeout = timeout
        self._local = threading.local()
        self._written = 0
        self._approx_bytes: int | None = None

    # ------------------------------------------------------------------ connection

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._open()
        except sqlite3.DatabaseError as e:
            if "not a database" not in str(e) and "malformed" not in str(e):
                raise StoreError(f"embedding store {self.path}: {e}") from e
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)  # derived data: rebuilt, and said so
            logger.warning("embedding store %s was unreadable (%s); moved to %s and started a new one",
                           self.path, e, aside)
            conn = self._open()
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _open(self) -> sqlite3.Connection:
        """Open with retries: switching a new file to WAL and creating the schema need a lock that SQLite
        does not wait for through the busy timeout when another process is doing the same thing."""
        deadline = time.monotonic() + self.timeout
        delay = 0.02
        while True:
            try:
                return self._open_once()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(0.5, delay * 2)

    def _open_once(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                logger.warning("embedding store %s: the file system does not support WAL; concurrent runs will "
                               "wait on each other", self.path)
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: never corrupt; a crash loses the last batch
            with _transaction(conn):
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO info VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    # ------------------------------------------------------------------ images

    def get_image(self, model: str, content: str, prep: str, variants: list[str]) -> tuple[np.ndarray, dict] | None:
        """(V, D) float32 in `variants` order and the stored metadata, or None unless every variant is stored."""
        hit = self.get_image_entry(model, content, prep, variants)
        return None if hit is None else hit[:2]

    def get_image_entry(self, model: str, content: str, prep: str, variants: list[str], optional: tuple = ()
                        ) -> tuple[np.ndarray, dict, dict[str, np.ndarray]] | None:
        """As `get_image`, plus the `optional` rows that are stored (name -> vector; e.g. the OOD guard's
        stage features, whose length differs from the embeddings'); None unless every variant is stored."""
        rows = self._conn().execute(
            "SELECT variant, vec, meta FROM images WHERE model=? AND content=? AND prep=?",
            (model, content, prep)).fetchall()
        found = {v: (vec, meta) for v, vec, meta in rows}
        if not all(v in found for v in variants):
            return None
        emb = np.stack([np.frombuffer(found[v][0], dtype=np.float32) for v in variants])
        extra = {v: np.frombuffer(found[v][0], dtype=np.float32).copy() for v in optional if v in found}
        return emb, json.loads(found[variants[0]][1]), extra

    def put_images(self, model: str, entries: Iterable[tuple[str, str, list[str], np.ndarray, dict]]) -> int:
        """Write (content, prep, variants, vectors, meta) entries in one transaction; returns rows written.
        vectors: (V, D) or a list of V vectors (rows may differ in length, e.g. stage features)."""
        now = time.time()
        rows = []
        for content, prep, variants, emb, meta in entries:
            text = json.dumps(meta, sort_keys=True)
            for v, e in zip(variants, emb):
                blob = np.asarray(e, dtype=np.float32).tobytes()
                rows.append((model, content, prep, v, blob, text, len(blob), now))
        if rows:
            self._write("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows, sum(r[6] for r in rows))
        return len(rows)

    def touch_images(self, model: str, keys: Iterable[tuple[str, str]]) -> None:
        """Mark (content, prep) entries as used now (the LRU clock of the eviction rule)."""
        now = time.time()
        rows = [(now, model, c, p) for c, p in keys]
        if rows:
            self._write("UPDATE images SET last_used=? WHERE model=? AND content=? AND prep=?", rows)

    # ------------------------------------------------------------------ texts

    def get_texts(self, model: str, keys: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        conn = self._conn()
        for i in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            part = keys[i : i + 500]
            marks = ",".join("?" * len(part))
            for key, vec in conn.execute(f"SELECT key, vec FROM texts WHERE model=? AND key IN ({marks})",
                                         (model, *part)):
                out[key] = np.frombuffer(vec, dtype=np.float32).copy()
        if out:
            now = time.time()
            self._write("UPDATE texts SET last_used=? WHERE model=? AND key=?", [(now, model, k) for k in out])
        return out

    def put_texts(self, model: str, items: dict[str, np.ndarray]) -> None:
        now = time.time()
        rows = []
        for key, e in items.items():
            blob = np.asarray(e, dtype=np.float32).tobytes()
            rows.append((model, key, blob, len(blob), now))
        if rows:
            self._write("INSERT OR REPLACE INTO texts VALUES (?, ?, ?, ?, ?)", rows, sum(r[3] for r in rows))

    # ------------------------------------------------------------------ size, info, prune

    def _write(self, sql: str, rows: list[tuple], added_bytes: int = 0) -> None:
        conn = self._conn()
        try:
            with _transaction(conn):
                conn.executemany(sql, rows)
        except sqlite3.OperationalError as e:
            raise StoreError(f"embedding store {self.path}: write failed ({e})") from e
        if added_bytes:
            self._enforce_limit(len(rows), added_bytes)

    def _enforce_limit(self, n_rows: int, added_bytes: int) -> None:
        """Evict when over the limit. The total is re-read every CHECK_EVERY rows (other processes write
        too) and otherwise kept as a running estimate, so a small limit is enforced at once."""
        self._written += n_rows
        if self._approx_bytes is None or self._written >= CHECK_EVERY:
            self._written, self._approx_bytes = 0, self.total_bytes()
        else:
            self._approx_bytes += added_bytes
        if self._approx_bytes > self.max_bytes:
            self.evict(int(self.max_bytes * PRUNE_TO))
            self._approx_bytes = self.total_bytes()

    def total_bytes(self) -> int:
        conn = self._conn()
        return sum(conn.execute(f"SELECT COALESCE(SUM(nbytes), 0) FROM {t}").fetchone()[0] for t in ("images", "texts"))

    def evict(self, target_bytes: int) -> int:
        """Delete least-recently-used entries until the vectors take at most `target_bytes`; returns rows deleted."""
        conn = self._conn()
        deleted = 0
        with _transaction(conn):
            excess = self.total_bytes() - max(0, int(target_bytes))
            for table, key_columns in _KEYS.items():  # image rows go first: texts are tiny, each an encoder pass
                if excess <= 0:
                    break
                doomed = []
                for *key, nbytes in conn.execute(f"SELECT {', '.join(key_columns)}, nbytes FROM {table} "
                                                 f"ORDER BY last_used"):
                    if excess <= 0:
                        break
                    doomed.append(tuple(key))
                    excess -= nbytes
                where = " AND ".join(f"{c}=?" for c in key_columns)
                conn.executemany(f"DELETE FROM {table} WHERE {where}", doomed)
                deleted += len(doomed)
        if deleted:
            logger.info("embedding store %s: evicted %d least recently used entries (limit %.0f MB)", self.path,
                        deleted, self.max_bytes / 2**20)
        return deleted

    def prune(self, max_bytes: int | None = None, model: str | None = None, everything: bool = False) -> int:
        """Drop everything, one model's entries, or least-recently-used entries down to `max_bytes`."""
        conn = self._conn()
        if everything or model is not None:
            where, args = ("", ()) if everything else (" WHERE model=?", (model,))
            with _transaction(conn):
                n = sum(conn.execute(f"DELETE FROM {t}{where}", args).rowcount for t in ("images", "texts"))
        else:
            n = self.evict(self.max_bytes if max_bytes is None else max_bytes)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("VACUUM")  # give the space back to the file system
        return n

    def info(self) -> dict:
        """Where the store is, its size and limit, entries per model (for `vlm-xray cache info`)."""
        conn = self._conn()
        models: dict[str, dict] = {}
        for model, images, variants, nbytes, last in conn.execute(
                "SELECT model, COUNT(DISTINCT content || prep), COUNT(*), SUM(nbytes), MAX(last_used) "
                "FROM images GROUP BY model"):
            models[model] = {"images": images, "image_vectors": variants, "texts": 0, "bytes": nbytes, "last_used": last}
        for model, texts, nbytes, last in conn.execute(
                "SELECT model, COUNT(*), SUM(nbytes), MAX(last_used) FROM texts GROUP BY model"):
            m = models.setdefault(model, {"images": 0, "image_vectors": 0, "texts": 0, "bytes": 0, "last_used": last})
            m["texts"], m["bytes"] = texts, m["bytes"] + nbytes
            m["last_used"] = max(m["last_used"] or 0, last or 0)
        files = [self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")]
        return {"path": str(self.path), "file_bytes": sum(f.stat().st_size for f in files if f.exists()),
                "vector_bytes": self.total_bytes(), "max_bytes": self.max_bytes, "models": models}


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): takes the write lock up front, so two writers wait
    for each other (busy timeout) instead of failing half-way with 'database is locked'."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, kind, value, tb):
        self.conn.execute("COMMIT" if kind is None else "ROLLBACK")
        return False


_OPEN: dict[tuple[Path, int | None], EmbeddingStore] = {}
_OPEN_LOCK = threading.Lock()


def open_store(location: str | Path | None = None, max_bytes: int | None = None) -> EmbeddingStore:
    """The store at `location` (see `store_path`), shared by the text and image caches of this process."""
    key = (store_path(location).resolve(), max_bytes)
    with _OPEN_LOCK:
        if key not in _OPEN:
            _OPEN[key] = EmbeddingStore(location, max_bytes)
        return _OPEN[key]

"""The embedded store: one SQLite file.

Tables: ``meta`` (schema version, revision), ``objects`` (kind, id, rev, doc JSON)
and ``tombstones`` (kind, id, rev) so that :meth:`changes_since` reports
deletions too; ``idx`` and ``tally``, the derived indexes of
:mod:`secfw.store.indexes`, kept by every commit. ``meta`` also records the
index version and the revision the indexes were last kept at: a store whose
indexes are missing (made before them), of another version, or behind the
revision (written by a version that did not keep them) has them rebuilt from
``objects`` at the next open or write, inside the write lock. WAL journaling
lets an agent read while a CLI writes; writers are serialised by ``BEGIN
IMMEDIATE`` (it takes the write lock before reading, so two concurrent
read-modify-write commands can never lose an update).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from secfw.errors import StoreError
from secfw.store.base import (
    SCHEMA_VERSION,
    BufferedTxn,
    Change,
    Doc,
    KeyedSnapshot,
    KindReader,
    Snapshot,
    Store,
    WriteTxn,
)
from secfw.store.indexes import (
    INDEX_VERSION,
    AddressMoves,
    Runs,
    add_tally,
    address_moves,
    allocations,
    entries,
    index_docs,
    move_runs,
    tally_delta,
)

BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, id TEXT NOT NULL, rev INTEGER NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (kind, id));
CREATE INDEX IF NOT EXISTS objects_rev ON objects (rev);
CREATE TABLE IF NOT EXISTS tombstones (
    kind TEXT NOT NULL, id TEXT NOT NULL, rev INTEGER NOT NULL, PRIMARY KEY (kind, id));
CREATE INDEX IF NOT EXISTS tombstones_rev ON tombstones (rev);
CREATE TABLE IF NOT EXISTS idx (
    name TEXT NOT NULL, bucket TEXT NOT NULL, item TEXT NOT NULL,
    kind TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (name, bucket, item, id));
CREATE INDEX IF NOT EXISTS idx_doc ON idx (kind, id);
CREATE TABLE IF NOT EXISTS tally (
    name TEXT NOT NULL, bucket TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (name, bucket));
CREATE TABLE IF NOT EXISTS alloc (bucket TEXT PRIMARY KEY, doc TEXT NOT NULL);
"""


class SqliteStore(Store):
    """A :class:`~secfw.store.base.Store` in one SQLite file."""

    def __init__(self, path: str, url: str | None = None) -> None:
        self.path = path
        self.url = url or f"sqlite:///{path}"
        self._conn = self._connect(path)

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        try:
            if path != ":memory:":
                # os.path, not pathlib: pathlib (and the urllib.parse it imports) would be
                # a few ms of every command's start-up for this one call.
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            with _translated(path):
                _init_schema(conn)
            return conn
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open store {path}: {_reason(exc)}") from exc

    def close(self) -> None:
        self._conn.close()

    # ------------------------------------------------------------------ reads

    def revision(self) -> int:
        with _translated(self.path):
            return _read_revision(self._conn)

    def load(self) -> Snapshot:
        with _translated(self.path), _read_txn(self._conn):
            return _load(self._conn)

    @contextmanager
    def scan(self) -> Iterator[KindReader]:
        """One read transaction; each kind streamed from a cursor."""
        with _translated(self.path), _read_txn(self._conn):
            yield _Scan(self._conn, _read_revision(self._conn))

    def changes_since(self, revision: int) -> tuple[int, list[Change]]:
        with _translated(self.path), _read_txn(self._conn):
            current = _read_revision(self._conn)
            rows = self._conn.execute(
                "SELECT kind, id, rev, doc FROM objects WHERE rev > ? "
                "UNION ALL SELECT kind, id, rev, NULL FROM tombstones WHERE rev > ? "
                "ORDER BY 3",
                (revision, revision),
            ).fetchall()
        changes = [Change(k, i, r, json.loads(d) if d is not None else None) for k, i, r, d in rows]
        return current, changes

    def write_digest(self, revision: int) -> str | None:
        """See :meth:`Store.write_digest`: the rows stamped ``revision``, their
        document text hashed as stored (no JSON parsing: a 20,000-document
        write costs milliseconds)."""
        import hashlib  # the agent's restart record only: not every command's start-up

        total = hashlib.sha256()
        with _translated(self.path), _read_txn(self._conn):
            if _read_revision(self._conn) != revision:
                return None
            rows = self._conn.execute(
                "SELECT kind, id, doc FROM objects WHERE rev = ? "
                "UNION ALL SELECT kind, id, '' FROM tombstones WHERE rev = ? ORDER BY 1, 2",
                (revision, revision))
            for kind, doc_id, doc in rows:
                total.update(f"{len(kind)}:{kind}{len(doc_id)}:{doc_id}{len(doc)}:".encode())
                total.update(doc.encode())
        return total.hexdigest()

    # ------------------------------------------------------------------ writes

    @contextmanager
    def write(self) -> Iterator[WriteTxn]:
        with _translated(self.path):
            self._conn.execute("BEGIN IMMEDIATE")
        try:
            with _translated(self.path):
                _check_indexes(self._conn)
                txn = BufferedTxn(_SqliteSnapshot(self._conn))
            yield txn
            with _translated(self.path):
                if txn.writes:
                    _commit_writes(self._conn, txn.snapshot.revision + 1, txn.writes)
                self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise


# ---------------------------------------------------------------------- helpers


class _Scan:
    """:meth:`SqliteStore.scan`'s reader (inside its read transaction)."""

    def __init__(self, conn: sqlite3.Connection, revision: int) -> None:
        self._conn, self.revision = conn, revision

    def iter_kind(self, kind: str) -> Iterator[Doc]:
        for (doc,) in self._conn.execute("SELECT doc FROM objects WHERE kind = ?", (kind,)):
            yield json.loads(doc)


def _init_schema(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in filter(str.strip, _SCHEMA.split(";")):
            conn.execute(statement)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            conn.execute("INSERT INTO meta VALUES ('revision', 0)")
        elif row[0] != SCHEMA_VERSION:
            raise StoreError(
                f"store schema version {row[0]} is not the supported version {SCHEMA_VERSION}"
            )
        _check_indexes(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _read_revision(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
    return int(row[0])


def _load(conn: sqlite3.Connection) -> Snapshot:
    snapshot = Snapshot(_read_revision(conn))
    for kind, doc_id, doc in conn.execute("SELECT kind, id, doc FROM objects"):
        snapshot.docs.setdefault(kind, {})[doc_id] = json.loads(doc)
    return snapshot


class _SqliteSnapshot(KeyedSnapshot):
    """The write transaction's view (its BEGIN IMMEDIATE keeps every read consistent)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__(_read_revision(conn))
        self._conn = conn

    def _read_kind(self, kind: str) -> dict[str, Doc]:
        return _load_kind(self._conn, kind)

    def _read_all(self) -> dict[str, dict[str, Doc]]:
        return _load(self._conn).docs

    def _read_docs(self, kind: str, doc_ids: list[str]) -> dict[str, Doc]:
        found: dict[str, Doc] = {}
        for start in range(0, len(doc_ids), _IN_CHUNK):
            chunk = doc_ids[start : start + _IN_CHUNK]
            rows = self._conn.execute(
                f"SELECT id, doc FROM objects WHERE kind = ? AND id IN ({_marks(chunk)})",
                (kind, *chunk))
            found.update((doc_id, json.loads(doc)) for doc_id, doc in rows)
        return found

    def _read_lookup(self, index: str, bucket: str, low: str | None,
                     high: str | None) -> dict[str, str]:
        query = "SELECT id, item FROM idx WHERE name = ? AND bucket = ?"
        params: list[str] = [index, bucket]
        if low is not None:
            query, params = query + " AND item >= ?", [*params, low]
        if high is not None:
            query, params = query + " AND item <= ?", [*params, high]
        return dict(self._conn.execute(query, params))

    def _read_runs(self, bucket: str) -> Runs:
        return _read_runs(self._conn, bucket)

    def _read_page(self, index: str, bucket: str, after: tuple[str, str] | None,
                   limit: int) -> list[tuple[str, str]]:
        # the primary key (name, bucket, item, id) orders the scan: no sort
        low = after or ("", "")
        rows = self._conn.execute(
            "SELECT item, id FROM idx WHERE name = ? AND bucket = ? AND (item, id) > (?, ?) "
            "ORDER BY item, id LIMIT ?", (index, bucket, *low, limit))
        return [(item, doc_id) for item, doc_id in rows]

    def _read_tally(self, name: str, bucket: str) -> dict[str, int]:
        row = self._conn.execute("SELECT doc FROM tally WHERE name = ? AND bucket = ?",
                                 (name, bucket)).fetchone()
        return dict(json.loads(row[0])) if row else {}


#: Ids per ``IN (…)`` (SQLite's default limit of bound parameters is 999).
_IN_CHUNK = 500


def _marks(values: list[str]) -> str:
    return ",".join("?" * len(values))


def _load_kind(conn: sqlite3.Connection, kind: str) -> dict[str, Doc]:
    rows = conn.execute("SELECT id, doc FROM objects WHERE kind = ?", (kind,))
    return {doc_id: json.loads(doc) for doc_id, doc in rows}


def _commit_writes(
    conn: sqlite3.Connection, revision: int, writes: dict[tuple[str, str], Doc | None]
) -> None:
    _keep_indexes(conn, writes)
    puts = [(k, i, revision, json.dumps(d, sort_keys=True)) for (k, i), d in writes.items() if d]
    deletes = [(k, i) for (k, i), d in writes.items() if d is None]
    conn.executemany("INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?)", puts)
    conn.executemany("DELETE FROM tombstones WHERE kind = ? AND id = ?", [p[:2] for p in puts])
    conn.executemany("DELETE FROM objects WHERE kind = ? AND id = ?", deletes)
    conn.executemany(
        "INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?)", [(k, i, revision) for k, i in deletes]
    )
    conn.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (revision,))
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('indexed_revision', ?)", (revision,))


def _keep_indexes(conn: sqlite3.Connection, writes: dict[tuple[str, str], Doc | None]) -> None:
    """Move the index entries and tallies of every written document from its
    stored version (read here, inside the write lock) to its new one."""
    deltas: dict[tuple[str, str], dict[str, int]] = {}
    moves: AddressMoves = {}
    for (kind, doc_id), doc in writes.items():
        row = conn.execute("SELECT doc FROM objects WHERE kind = ? AND id = ?",
                           (kind, doc_id)).fetchone()
        old = json.loads(row[0]) if row else None
        before, after = entries(kind, doc_id, old), entries(kind, doc_id, doc)
        address_moves(before, after, moves)
        conn.executemany("DELETE FROM idx WHERE name = ? AND bucket = ? AND item = ? AND id = ?",
                         [(*entry, doc_id) for entry in before - after])
        conn.executemany("INSERT OR REPLACE INTO idx VALUES (?, ?, ?, ?, ?)",
                         [(*entry, kind, doc_id) for entry in after - before])
        for key, fields in tally_delta(kind, old, doc).items():
            deltas[key] = add_tally(deltas.get(key, {}), fields)
    for (name, bucket), delta in deltas.items():
        row = conn.execute("SELECT doc FROM tally WHERE name = ? AND bucket = ?",
                           (name, bucket)).fetchone()
        total = add_tally(json.loads(row[0]) if row else {}, delta)
        if total:
            conn.execute("INSERT OR REPLACE INTO tally VALUES (?, ?, ?)",
                         (name, bucket, json.dumps(total, sort_keys=True)))
        else:
            conn.execute("DELETE FROM tally WHERE name = ? AND bucket = ?", (name, bucket))
    for bucket, (removed, added) in moves.items():
        _write_runs(conn, bucket, move_runs(_read_runs(conn, bucket), removed, added))


def _read_runs(conn: sqlite3.Connection, bucket: str) -> Runs:
    row = conn.execute("SELECT doc FROM alloc WHERE bucket = ?", (bucket,)).fetchone()
    return list(json.loads(row[0])) if row else []


def _write_runs(conn: sqlite3.Connection, bucket: str, runs: Runs) -> None:
    if runs:
        conn.execute("INSERT OR REPLACE INTO alloc VALUES (?, ?)", (bucket, json.dumps(runs)))
    else:
        conn.execute("DELETE FROM alloc WHERE bucket = ?", (bucket,))


def _check_indexes(conn: sqlite3.Connection) -> None:
    """Rebuild the indexes when they are not those of this version's
    :func:`~secfw.store.indexes.entries` at the current revision (the caller
    holds the write lock)."""
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    if (meta.get("index_version") == INDEX_VERSION
            and meta.get("indexed_revision") == meta.get("revision")):
        return
    rows, totals = index_docs(_load(conn).docs)
    conn.execute("DELETE FROM idx")
    conn.execute("DELETE FROM tally")
    conn.execute("DELETE FROM alloc")
    conn.executemany("INSERT INTO alloc VALUES (?, ?)",
                     [(b, json.dumps(runs)) for b, runs in allocations(rows).items()])
    conn.executemany("INSERT OR REPLACE INTO idx VALUES (?, ?, ?, ?, ?)", rows)
    conn.executemany("INSERT INTO tally VALUES (?, ?, ?)",
                     [(n, b, json.dumps(f, sort_keys=True)) for (n, b), f in totals.items()])
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('index_version', ?)", (INDEX_VERSION,))
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('indexed_revision', ?)",
                 (meta.get("revision", 0),))


@contextmanager
def _read_txn(conn: sqlite3.Connection) -> Iterator[None]:
    """A consistent read: every SELECT inside sees one snapshot (WAL read txn)."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


@contextmanager
def _translated(path: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"store {path}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__

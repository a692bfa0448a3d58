"""The store interface: a revisioned document store.

The model is kept as JSON documents addressed by ``(kind, id)``. Two stores
implement it: SQLite (one file, the embedded default) and etcd v3 (a cluster
shared by many hosts). Both pass one contract suite (tests/test_store_contract.py).

Revisions
    Every committed write transaction that changes anything makes the store's
    **revision** strictly greater, and stamps the documents it wrote (or deleted)
    with that new revision; a transaction that changes nothing leaves it as it
    was. That is all: revisions are monotonic but **not** consecutive. SQLite
    happens to count 1, 2, 3…; etcd's revision is the cluster's, which also moves
    on writes to other prefixes, so its steps are arbitrary. Callers compare
    revisions (equal, smaller, greater) and never do arithmetic on them.

Change feed
    :meth:`Store.changes_since` returns every document changed after a revision,
    deletions included, one entry per document (its latest state). A store that
    keeps a bounded history (etcd compacts) raises
    :class:`~secfw.errors.HistoryCompactedError` when the revision asked for is
    older than what it kept: the reader must :meth:`Store.load` again. A gap is
    never silent.

Write transactions
    ``with store.write() as txn`` sees the latest committed state
    (``txn.snapshot``) and commits its writes atomically, or nothing when the
    body raises. Either no other writer commits in between (SQLite: ``BEGIN
    IMMEDIATE`` holds the write lock), or the commit fails with
    :class:`~secfw.errors.WriteConflictError` and nothing is written (etcd: a
    compare-and-swap, optimistic concurrency). A conflict is never a lost update;
    :func:`retry_conflicts` re-runs a transaction until it commits (bounded in time).
    The snapshot is a :class:`KeyedSnapshot`: it reads one document, one index
    bucket, one tally or one allocation record when asked (:mod:`secfw.store.indexes`), and a whole
    kind only when :meth:`Snapshot.kind` asks for it, all as of the
    transaction's start: a write costs the keys it touches, not the cloud.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from secfw.errors import StoreError, WriteConflictError
from secfw.store.indexes import (
    ADDRESS_INDEX,
    INDEX_KINDS,
    Runs,
    Tallies,
    allocations,
    index_docs,
)

SCHEMA_VERSION = 1
DEFAULT_URL = "sqlite:////var/lib/secfw/secfw.db"

Doc = dict[str, Any]
T = TypeVar("T")

#: How long :func:`retry_conflicts` keeps re-running a transaction that keeps losing
#: races to other writers before it reports the conflict (exit status 7), seconds.
WRITE_PATIENCE_S = 120.0
#: The random pause after the n-th lost race is drawn from [0, 2**n) times the
#: lost attempt's duration, n at most this (see :func:`retry_conflicts`).
RETRY_DOUBLINGS_MAX = 5


@dataclass
class Snapshot:
    """Every document at one revision: ``docs[kind][id] -> doc``.

    Besides whole kinds, a snapshot answers keyed reads — one document
    (:meth:`get`), one bucket of a derived index (:meth:`lookup`,
    :meth:`members`, :meth:`count`) and one tally (:meth:`tally`), see
    :mod:`secfw.store.indexes`. Here they are computed from every document;
    the stores' write snapshots (:class:`KeyedSnapshot`) answer them from the
    indexes they keep, reading only those keys. :attr:`reads` logs what was
    read (``"kind K"``, ``"doc K/ID"``, ``"index I"``, ``"tally T"``,
    ``"alloc BUCKET"``, ``"all"``), so a test can tell a keyed write from a whole-kind one."""

    revision: int
    docs: dict[str, dict[str, Doc]] = field(default_factory=dict)
    reads: list[str] = field(default_factory=list, compare=False, repr=False)

    def kind(self, kind: str) -> dict[str, Doc]:
        """The documents of one kind by id (empty when there are none)."""
        return self.docs.get(kind, {})

    def all_docs(self) -> dict[str, dict[str, Doc]]:
        """Every document, by kind and id."""
        return self.docs

    def iter_kind(self, kind: str) -> Iterator[Doc]:
        """The documents of one kind (what :class:`KindReader` asks)."""
        yield from self.kind(kind).values()

    def get(self, kind: str, doc_id: str) -> Doc | None:
        """One document, None when there is none."""
        return self.kind(kind).get(doc_id)

    def lookup(self, index: str, bucket: str, low: str | None = None,
               high: str | None = None) -> dict[str, str]:
        """``{document id: item}`` of the entries in ``bucket`` of ``index``,
        with ``low <= item <= high`` when given."""
        found = self._derived()[0].get((index, bucket), {})
        return {doc_id: item for doc_id, item in found.items() if _within(item, low, high)}

    def page(self, index: str, bucket: str, after: tuple[str, str] | None,
             limit: int) -> list[tuple[str, str]]:
        """At most ``limit`` entries ``(item, id)`` of ``bucket``, in ``(item, id)``
        order, those after ``after`` only (when given): one page of a listing
        (:data:`secfw.store.indexes.ORDER_INDEXES`)."""
        found = sorted((item, doc_id) for doc_id, item in self.lookup(index, bucket).items())
        return [entry for entry in found if after is None or entry > after][:limit]

    def members(self, index: str, bucket: str) -> dict[str, Doc]:
        """The documents in ``bucket`` of ``index``, by id."""
        kind = INDEX_KINDS[index]
        found = (self.get(kind, doc_id) for doc_id in self.lookup(index, bucket))
        return {doc["id"]: doc for doc in found if doc is not None}

    def prefetch(self, kind: str, doc_ids: list[str]) -> None:
        """Read these documents together, ahead of :meth:`get` (here: a no-op)."""

    def prefetch_buckets(self, index: str, buckets: list[str]) -> None:
        """Read these buckets of ``index`` together, ahead of :meth:`lookup`
        (here: a no-op)."""

    def address_runs(self, bucket: str) -> Runs:
        """The allocation record of one ``ip`` bucket (a network's IPv4 or IPv6
        addresses, :func:`secfw.store.indexes.address_bucket`): the used
        addresses as runs; empty: none used."""
        cached = self.__dict__.get("_runs_cache")
        if cached is None:
            rows = ((ADDRESS_INDEX, b, item, "", "") for (index, b), found
                    in self._derived()[0].items() if index == ADDRESS_INDEX
                    for item in found.values())
            cached = self.__dict__["_runs_cache"] = allocations(rows)
        return [list(run) for run in cached.get(bucket, [])]

    def tally(self, name: str, bucket: str) -> dict[str, int]:
        """A tally (:func:`secfw.store.indexes.tallies`); empty: all zero."""
        return dict(self._derived()[1].get((name, bucket), {}))

    def _derived(self) -> tuple[dict[tuple[str, str], dict[str, str]], Tallies]:
        """Every bucket ``{(index, bucket): {id: item}}`` and tally, derived once."""
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            rows, totals = index_docs(self.all_docs())
            buckets: dict[tuple[str, str], dict[str, str]] = {}
            for index, bucket, item, _, doc_id in rows:
                buckets.setdefault((index, bucket), {})[doc_id] = item
            cached = self.__dict__["_index_cache"] = (buckets, totals)
        return cached


def _within(item: str, low: str | None, high: str | None) -> bool:
    return (low is None or item >= low) and (high is None or item <= high)


class KeyedSnapshot(Snapshot):
    """A write transaction's snapshot over a store that keeps the indexes: every
    read goes to the store, for the keys asked only, and is cached (a
    transaction reads a key once). The store implements the ``_read_*``
    methods, all as of the transaction's start (SQLite: inside its BEGIN
    IMMEDIATE; etcd: at one pinned revision), and records what they read so
    the commit can check exactly that (etcd)."""

    def __init__(self, revision: int) -> None:
        super().__init__(revision)
        self._got: dict[tuple[str, str], Doc | None] = {}
        self._complete = False

    # What the store provides --------------------------------------------------

    def _read_kind(self, kind: str) -> dict[str, Doc]:
        raise NotImplementedError

    def _read_all(self) -> dict[str, dict[str, Doc]]:
        raise NotImplementedError

    def _read_docs(self, kind: str, doc_ids: list[str]) -> dict[str, Doc]:
        raise NotImplementedError

    def _read_lookup(self, index: str, bucket: str, low: str | None,
                     high: str | None) -> dict[str, str]:
        raise NotImplementedError

    def _read_runs(self, bucket: str) -> Runs:
        raise NotImplementedError

    def _read_page(self, index: str, bucket: str, after: tuple[str, str] | None,
                   limit: int) -> list[tuple[str, str]]:
        raise NotImplementedError

    def _read_tally(self, name: str, bucket: str) -> dict[str, int]:
        raise NotImplementedError

    # The snapshot's reads -----------------------------------------------------

    def kind(self, kind: str) -> dict[str, Doc]:
        if kind not in self.docs and not self._complete:
            self.reads.append(f"kind {kind}")
            self.docs[kind] = self._read_kind(kind)
        return self.docs.get(kind, {})

    def all_docs(self) -> dict[str, dict[str, Doc]]:
        if not self._complete:
            self.reads.append("all")
            for kind, by_id in self._read_all().items():
                self.docs.setdefault(kind, by_id)
            self._complete = True
        return {kind: by_id for kind, by_id in self.docs.items() if by_id}

    def get(self, kind: str, doc_id: str) -> Doc | None:
        if kind in self.docs:
            return self.docs[kind].get(doc_id)
        if (kind, doc_id) not in self._got:
            self.reads.append(f"doc {kind}/{doc_id}")
            self._got[(kind, doc_id)] = self._read_docs(kind, [doc_id]).get(doc_id)
        return self._got[(kind, doc_id)]

    def lookup(self, index: str, bucket: str, low: str | None = None,
               high: str | None = None) -> dict[str, str]:
        self.reads.append(f"index {index}")
        if low is not None or high is not None:
            return self._read_lookup(index, bucket, low, high)
        buckets = self._buckets()
        if (index, bucket) not in buckets:
            buckets[(index, bucket)] = self._read_lookup(index, bucket, None, None)
        return dict(buckets[(index, bucket)])

    def prefetch_buckets(self, index: str, buckets: list[str]) -> None:
        """Read the whole buckets not read yet together (etcd: one request per
        hundred): :meth:`lookup` then has them."""
        known = self._buckets()
        missing = [b for b in dict.fromkeys(buckets) if (index, b) not in known]
        if missing:
            self.reads.append(f"index {index}")
            for bucket, found in self._read_buckets(index, missing).items():
                known[(index, bucket)] = found

    def _buckets(self) -> dict[tuple[str, str], dict[str, str]]:
        """Whole buckets read so far (a transaction reads a bucket once)."""
        found: dict[tuple[str, str], dict[str, str]] = self.__dict__.setdefault("_whole", {})
        return found

    def _read_buckets(self, index: str, buckets: list[str]) -> dict[str, dict[str, str]]:
        """Several whole buckets; a store that can read them together says how."""
        return {bucket: self._read_lookup(index, bucket, None, None) for bucket in buckets}

    def page(self, index: str, bucket: str, after: tuple[str, str] | None,
             limit: int) -> list[tuple[str, str]]:
        self.reads.append(f"page {index}")
        return self._read_page(index, bucket, after, limit)

    def members(self, index: str, bucket: str) -> dict[str, Doc]:
        kind = INDEX_KINDS[index]
        ids = sorted(self.lookup(index, bucket))
        self.prefetch(kind, ids)
        return {i: doc for i in ids if (doc := self.get(kind, i)) is not None}

    def prefetch(self, kind: str, doc_ids: list[str]) -> None:
        """Read the documents of ``doc_ids`` not read yet, together (one query,
        or one etcd request per hundred): :meth:`get` then has them."""
        if kind in self.docs:
            return
        missing = [i for i in dict.fromkeys(doc_ids) if (kind, i) not in self._got]
        if missing:
            self.reads.extend(f"doc {kind}/{i}" for i in missing)
            found = self._read_docs(kind, missing)
            for doc_id in missing:
                self._got[(kind, doc_id)] = found.get(doc_id)

    def address_runs(self, bucket: str) -> Runs:
        """Read once per transaction: the commit moves what was read."""
        cache: dict[str, Runs] = self.__dict__.setdefault("_runs", {})
        if bucket not in cache:
            self.reads.append(f"alloc {bucket}")
            cache[bucket] = self._read_runs(bucket)
        return [list(run) for run in cache[bucket]]

    def tally(self, name: str, bucket: str) -> dict[str, int]:
        self.reads.append(f"tally {name}")
        return self._read_tally(name, bucket)


class KindReader(Protocol):
    """Every document at one revision, read one kind at a time
    (:meth:`Store.scan`): a reader that keeps only some documents never holds
    the whole store."""

    revision: int

    def iter_kind(self, kind: str) -> Iterator[Doc]:
        """The documents of ``kind``, any order; may be asked several times."""
        ...


class LazySnapshot(Snapshot):
    """A snapshot that reads one kind of document at a time, on first use.

    What a write transaction hands its caller: a command that touches rules
    and groups does not read (nor parse) every port and instance of the cloud.
    The store guarantees consistency: every read happens inside its write
    transaction (SQLite) or at one pinned revision (etcd). :attr:`docs` holds
    only the kinds read so far; :meth:`all_docs` reads the rest.
    """

    def __init__(self, revision: int, fetch_kind: Callable[[str], dict[str, Doc]],
                 fetch_all: Callable[[], dict[str, dict[str, Doc]]]) -> None:
        super().__init__(revision)
        self._fetch_kind = fetch_kind
        self._fetch_all = fetch_all
        self._complete = False

    def kind(self, kind: str) -> dict[str, Doc]:
        if kind not in self.docs and not self._complete:
            self.docs[kind] = self._fetch_kind(kind)
        return self.docs.get(kind, {})

    def all_docs(self) -> dict[str, dict[str, Doc]]:
        if not self._complete:
            for kind, by_id in self._fetch_all().items():
                self.docs.setdefault(kind, by_id)
            self._complete = True
        return {kind: by_id for kind, by_id in self.docs.items() if by_id}


@dataclass(frozen=True)
class Change:
    """One document written (``doc`` set) or deleted (``doc is None``) at ``revision``."""

    kind: str
    id: str
    revision: int
    doc: Doc | None


class WriteTxn(ABC):
    """An open, serialisable write transaction.

    ``snapshot`` is the committed state when the transaction began; the caller
    records its writes with :meth:`put` and :meth:`delete`. Nothing is visible to
    others until the context manager exits without an exception.
    """

    snapshot: Snapshot

    @abstractmethod
    def put(self, kind: str, doc_id: str, doc: Doc) -> None: ...

    @abstractmethod
    def delete(self, kind: str, doc_id: str) -> None: ...


class BufferedTxn(WriteTxn):
    """A write transaction that records its writes in :attr:`writes` (``None`` for
    a deletion, the last write of a document wins), for the store to commit in one
    go when the context manager exits."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.writes: dict[tuple[str, str], Doc | None] = {}

    def put(self, kind: str, doc_id: str, doc: Doc) -> None:
        self.writes[(kind, doc_id)] = doc

    def delete(self, kind: str, doc_id: str) -> None:
        self.writes[(kind, doc_id)] = None


class Store(ABC):
    """A revisioned document store (see the module docstring)."""

    url: str
    #: The most documents one write transaction may put or delete (None: no
    #: limit). Only a writer that needs more than one command's worth, the
    #: restore of a backup, has to split its work by it.
    max_write_docs: int | None = None

    @abstractmethod
    def revision(self) -> int:
        """The current revision (0: nothing ever written); cheap enough to poll
        several times a second."""

    @abstractmethod
    def load(self) -> Snapshot:
        """Every document, consistently, at the current revision."""

    @abstractmethod
    def changes_since(self, revision: int) -> tuple[int, list[Change]]:
        """``(current revision, changes after revision)``, oldest first, one per doc.

        When the current revision is not greater than ``revision`` the list is
        empty (a smaller one means the store went back: a restore). Raises
        :class:`~secfw.errors.HistoryCompactedError` when the history after
        ``revision`` is no longer kept."""

    def scan(self) -> AbstractContextManager[KindReader]:
        """A consistent read of every document, kind by kind, for the duration
        of the context (see :class:`KindReader`). This default reads the whole
        store at once (:meth:`load`); SQLite and etcd stream it."""
        return _loaded(self)

    def write_digest(self, revision: int) -> str | None:
        """A digest of the last write while the store is at ``revision``: the
        kinds, ids and contents of the documents it put or deleted (nothing at
        revision 0); None when the store is elsewhere, or cannot say. Two
        stores at one revision agree only when their last writes are the same
        write (ids are random), so it tells a store from another one at the
        same revision (a restore into a new store starts its revisions again).
        This default reads the change feed after the revision below (the
        documents stamped ``revision``: revisions are integers); SQLite
        reads the rows' text without parsing it."""
        try:
            current, changes = self.changes_since(revision - 1) if revision else (0, [])
        except StoreError:
            return None
        if current != revision:
            return None
        rows = sorted((c.kind, c.id, json.dumps(c.doc, sort_keys=True)) for c in changes
                      if c.revision == revision)
        import hashlib  # the agent's restart record only: not every command's start-up

        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def load_at(self, revision: int) -> Snapshot:
        """Every document as it was at ``revision`` — only for a store that keeps
        its history (etcd, until it compacts). Raises StoreError otherwise."""
        raise StoreError(f"store {self.url} keeps no history: only its current revision "
                         f"({self.revision()}) can be read")

    @abstractmethod
    def write(self) -> AbstractContextManager[WriteTxn]:
        """Begin a serialisable write transaction (see :class:`WriteTxn` and the
        module docstring: it may raise WriteConflictError on exit)."""

    @abstractmethod
    def close(self) -> None: ...

    def iter_docs(self, kind: str) -> Iterator[Doc]:
        """Convenience: every document of one kind at the current revision."""
        yield from self.load().docs.get(kind, {}).values()


@contextmanager
def _loaded(store: Store) -> Iterator[KindReader]:
    yield store.load()


def retry_conflicts(
    transaction: Callable[[], T], attempts: int | None = None, what: str = "write",
    patience: float = WRITE_PATIENCE_S,
) -> T:
    """Run ``transaction`` (one whole read-modify-write, e.g. an Api method) and
    run it again after each :class:`~secfw.errors.WriteConflictError` until it
    commits; only when ``patience`` seconds have gone by (or ``attempts`` runs,
    if given) is the last conflict raised, as a StoreError saying it gave up.

    Re-running is correct because a conflicting attempt committed nothing and
    the next one reads the state that beat it.

    Why the pause is measured in attempts, not milliseconds: two writers collide
    when their read-to-commit windows overlap, and that window is the attempt's
    own duration — ~10 ms on an idle machine, ~1 s on a loaded one (measured: 4
    writers on one group at load 15-20). A fixed jitter of at most 0.25 s left
    loaded writers in lock-step, colliding ten times in a row; a pause drawn from
    [0, 2**n x the lost attempt's duration) after the n-th loss (binary
    exponential backoff, as Ethernet's) spreads them at any speed. The bound is a
    time, not a count: a busy store slows a write down instead of failing it."""
    started = time.monotonic()
    for attempt in itertools.count(1):
        began = time.monotonic()
        try:
            return transaction()
        except WriteConflictError as exc:
            now = time.monotonic()
            if now - started >= patience or (attempts is not None and attempt >= attempts):
                raise WriteConflictError(
                    f"{what}: gave up after {attempt} attempts in {now - started:.1f} s, other "
                    f"writers kept committing first ({exc})"
                ) from exc
            _pause_after_conflict(attempt, max(now - began, 0.005))
    raise AssertionError("unreachable")  # pragma: no cover


def _pause_after_conflict(lost: int, window: float) -> None:
    """Sleep a random time in [0, 2**lost x ``window``) (``lost`` capped at
    :data:`RETRY_DOUBLINGS_MAX`): see :func:`retry_conflicts`."""
    import random  # only a lost race needs it: not loaded by every command

    time.sleep(random.uniform(0, window * 2 ** min(lost, RETRY_DOUBLINGS_MAX)))


def store_url(explicit: str | None = None) -> str:
    """The store URL: the explicit one, else ``$SECFW_STORE``, else the default."""
    return explicit or os.environ.get("SECFW_STORE") or DEFAULT_URL


def open_store(url: str | None = None, create: bool = True) -> Store:
    """Open the store named by ``url`` (see :func:`store_url`); with ``create``
    False an etcd prefix that holds no store is refused (SQLite: the caller
    checks that the file exists, see :mod:`secfw.agent.storewatch`).

    ``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db`` follow the
    usual SQLAlchemy convention; a bare filesystem path is accepted as SQLite too.
    ``etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`` is an etcd v3 cluster (see
    :mod:`secfw.store.etcd`).
    """
    resolved = store_url(url)
    if resolved.startswith("sqlite://"):
        path = resolved[len("sqlite://") :]
        if not path.startswith("/") or len(path) < 2:
            raise StoreError(f"store URL {resolved!r}: expected sqlite:///PATH")
        return _sqlite(path[1:], resolved)
    if resolved.startswith("etcd://"):
        from secfw.store.etcd import EtcdStore

        return EtcdStore(resolved, create=create)
    if "://" not in resolved:
        return _sqlite(resolved, resolved)
    scheme = resolved.split("://", 1)[0]
    raise StoreError(
        f"store URL {resolved!r}: unsupported scheme {scheme!r} (supported: sqlite, etcd)"
    )


def _sqlite(path: str, url: str) -> Store:
    from secfw.store.sqlite import SqliteStore

    return SqliteStore(path, url)

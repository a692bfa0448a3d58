"""The distributed store: etcd v3, for a cloud of many hosts.

URL: ``etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`` (default prefix ``/secfw``).
Several endpoints are members of one cluster: a request that cannot reach one
(connection refused or reset, timeout, 503) goes to the next, and the store
sticks with the one that answered.

Client: etcd's gRPC-JSON gateway, ``/v3/`` (etcd >= 3.4; Debian 12 ships
3.4.23), spoken over the standard library's http.client by
:mod:`secfw.store.etcdhttp` — JSON requests posted as etcd's API documents
them, and the watch read as its stream of JSON lines. Not ``etcd3`` (gRPC;
last release 2020, pins old protobuf), and no longer etcd3gw (OpenStack's
client, over ``requests``): importing it cost 240-270 ms of every ``secfw``
process (``requests``, urllib3, ``futurist``), more than a command's whole
300 ms budget at 50k ports, for two HTTP requests this module already built
itself (and its watch helper drops etcd's ``canceled``/``compact_revision``
answer: a silent gap after a compaction). What etcd3gw would give back —
leases, locks, TLS options, API-path discovery for etcd < 3.4 — secfw does not
use; see etcdhttp for what TLS would take.

Key layout under PREFIX::

    PREFIX/schema             the schema version (written on first open)
    PREFIX/doc/KIND/ID        one JSON document
    PREFIX/revision           the revision marker: put by every write transaction
    PREFIX/idx/INDEX/BUCKET/ITEM/ID, PREFIX/tally/NAME/BUCKET, PREFIX/alloc/BUCKET
                              derived indexes (secfw.store.indexes), PREFIX/indexed
                              their stamp

Revisions are etcd's own mod_revisions. The store's revision is the marker's
mod_revision: the etcd revision of our last committed write, so it moves on
every change of ours and not when other prefixes of the cluster are written.

Writes: the contract's :class:`~secfw.store.base.WriteTxn` hands the caller
the whole snapshot, so a transaction has read *every* key under the prefix,
including the absence of every key it did not find. Comparing the mod_revision
of each key read cannot express those absences, and etcd caps the operations
of one transaction (``--max-txn-ops``, default 128). So the transaction
compares the one key every write of ours changes, the marker: equal to the
mod_revision read with the snapshot, or nothing is written and
:class:`~secfw.errors.WriteConflictError` is raised (the Api re-runs the
command; :func:`~secfw.store.base.retry_conflicts`). This is exact for a
whole-store read; its cost is that any two concurrent writers conflict, even on
disjoint records — per-key compares come with writes that read only what they
need (issue #13, later phase).

A large single batch (bench_api.py imports a cloud in one transaction) needs
etcd started with a ``--max-txn-ops`` and ``--max-request-bytes`` that fit it;
etcd's refusal is reported as a StoreError naming the option.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from secfw.errors import (
    HistoryCompactedError,
    StoreError,
    StoreRefusedError,
    StoreUnreachableError,
    WriteConflictError,
)
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
from secfw.store.etcdhttp import Member, Stream
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

T = TypeVar("T")

DEFAULT_PREFIX = "/secfw"
#: Seconds to connect to a member, and to wait for each answer (a watch chunk too):
#: past them the member counts as unreachable and the next one is asked.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0
#: A watch with no message for this long is reopened (a member that vanished
#: without closing the connection is noticed; an idle reopen costs one request).
WATCH_IDLE_S = 30.0
#: Keys per range answer when loading everything (see EtcdStore._load).
PAGE_KEYS = 5000
LOAD_ATTEMPTS = 3
#: Keys per transaction when reading several documents or rebuilding the indexes
#: (under etcd's default --max-txn-ops of 128).
KEYS_PER_TXN = 100
#: Past this many compares a write compares the marker instead (EtcdStore._commit).
MAX_COMPARES = 100
#: The gateway's path for etcd >= 3.4 (no discovery request per process).
API_PATH = "/v3/"


@dataclass(frozen=True)
class EtcdUrl:
    """A parsed ``etcd://`` URL."""

    endpoints: tuple[tuple[str, int], ...]
    prefix: str


def parse_url(url: str) -> EtcdUrl:
    """Split ``etcd://HOST:PORT[,HOST:PORT…][/PREFIX]``; StoreError when malformed
    — also for user information, a query or a fragment, which this URL has no
    place for (taken as part of the host or the prefix they would point the
    agent at another cluster or prefix than the one meant)."""
    if not url.startswith("etcd://"):
        raise StoreError(f"store URL {url!r}: expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX]")
    if any(mark in url for mark in "?#@") or any(c.isspace() for c in url):
        raise StoreError(f"store URL {url!r}: no user, query, fragment or white space in "
                         "etcd://HOST:PORT[,HOST:PORT...][/PREFIX]")
    hosts, _, path = url[len("etcd://") :].partition("/")
    endpoints = tuple(_endpoint(url, item) for item in hosts.split(","))
    prefix = "/" + path.strip("/") if path.strip("/") else DEFAULT_PREFIX
    return EtcdUrl(endpoints, prefix)


def _endpoint(url: str, item: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT``: a host name, an IPv4 address or an IPv6
    address (in brackets, or bare as before)."""
    host, sep, port = item.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if (not sep or not port.isdigit() or not 0 < int(port) < 65536
            or not (_HOST_NAME.fullmatch(host) or _is_ipv6(host))
            or (bracketed and not _is_ipv6(host))):
        raise StoreError(f"store URL {url!r}: endpoint {item!r} is not HOST:PORT")
    return host, int(port)


#: A DNS name or an IPv4 address: RFC 1123 labels, with ``_`` inside a label
#: as container runtimes name their hosts (``project_etcd_1``).
_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?)*\.?")


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


class _Members:
    """The cluster's endpoints, with fail-over (see the module docstring)."""

    def __init__(self, url: str, endpoints: tuple[tuple[str, int], ...]) -> None:
        self.url = url
        self.members = [Member(host, port, CONNECT_TIMEOUT_S, READ_TIMEOUT_S, API_PATH)
                        for host, port in endpoints]
        self.current = 0

    def call(self, what: str, request: Callable[[Member], T]) -> T:
        """``request`` on the current member, else on each next one in turn.

        Only failures to reach a member (StoreUnreachableError: refused, reset,
        timeout, 503) move on; an answer that is an error (etcd refused the
        request) is reported at once as a StoreError, and so is an answer that
        is not JSON."""
        last: StoreUnreachableError | None = None
        for step in range(len(self.members)):
            index = (self.current + step) % len(self.members)
            try:
                result = request(self.members[index])
            except StoreUnreachableError as exc:
                last = exc
                continue
            except StoreRefusedError as exc:
                detail = _detail(str(exc))
                if "required revision has been compacted" in detail:
                    raise HistoryCompactedError(f"store {self.url}: {what}: {detail}") from exc
                raise StoreError(f"store {self.url}: etcd refused {what}: {detail}") from exc
            except ValueError as exc:
                raise StoreError(f"store {self.url}: {what}: {exc}") from exc
            self.current = index
            return result
        reason = str(last) if last is not None else "no endpoint"
        raise StoreError(f"store {self.url}: no etcd member reachable ({what}): {reason}")

    def close(self) -> None:
        for member in self.members:
            member.close()


class EtcdStore(Store):
    """A :class:`~secfw.store.base.Store` in an etcd v3 cluster (module docstring)."""

    #: etcd refuses a transaction of more than ``--max-txn-ops`` operations (128
    #: by default, etcd's configuration flags); each document is one operation,
    #: the revision marker one more: 100 leaves room on a default cluster.
    #: A document written costs up to a dozen operations with its index entries
    #: (a port: six entries, each deleted and put when all move, and up to two
    #: allocation records: 15): 8 documents, the stamp and the marker stay
    #: under the default 128.
    max_write_docs = 8

    def __init__(self, url: str, create: bool = True) -> None:
        """Connect; with ``create`` False a prefix never initialised (no schema
        key) is refused instead of initialised — what a reader that must not
        take a mistyped prefix for an empty cloud wants (the agent)."""
        parsed = parse_url(url)
        self.url = url
        self.prefix = parsed.prefix.encode() + b"/"
        self._marker = self.prefix + b"revision"
        self._schema = self.prefix + b"schema"
        self._docs = self.prefix + b"doc/"
        self._idx = self.prefix + b"idx/"
        self._tally = self.prefix + b"tally/"
        self._alloc = self.prefix + b"alloc/"
        self._stamp = self.prefix + b"indexed"
        self._members = _Members(url, parsed.endpoints)
        try:
            self._check_schema(create)
        except BaseException:
            self._members.close()
            raise

    def close(self) -> None:
        self._members.close()

    # ------------------------------------------------------------------ set-up

    def _check_schema(self, create: bool) -> None:
        """Write the schema version if the prefix has none and ``create`` (a
        compare on its absence: two first opens do not race); refuse a missing
        one otherwise, and another version always."""
        version = _b64(str(SCHEMA_VERSION).encode())
        answer = self._txn("schema check", {
            "compare": [{"key": _b64(self._schema), "target": "CREATE", "result": "EQUAL",
                         "create_revision": "0"}],
            "success": [{"request_put": {"key": _b64(self._schema), "value": version}}]
            if create else [],
            "failure": [{"request_range": {"key": _b64(self._schema)}}],
        })
        if answer.get("succeeded"):
            if not create:
                raise StoreError(
                    f"store {self.url}: no secfw store under this prefix (no schema key): "
                    "refusing to read it as an empty cloud")
            return
        kvs = answer["responses"][0]["response_range"].get("kvs", [])
        found = _unb64(kvs[0].get("value", "")).decode(errors="replace") if kvs else "?"
        if found != str(SCHEMA_VERSION):
            raise StoreError(
                f"store {self.url}: schema version {found} is not the supported "
                f"version {SCHEMA_VERSION}"
            )

    # ------------------------------------------------------------------ reads

    def revision(self) -> int:
        kvs, _ = self._range("read the revision", self._marker, None, keys_only=True)
        return int(kvs[0]["mod_revision"]) if kvs else 0

    def cluster_revision(self) -> int:
        """etcd's current revision (writes under every prefix move it): where a
        watch "from now on" starts."""
        return self._range("read the cluster revision", self._marker, None, keys_only=True)[1]

    def load(self) -> Snapshot:
        return self._load()[0]

    def load_at(self, revision: int) -> Snapshot:
        """Every document at etcd ``revision`` (MVCC keeps it until a compaction:
        HistoryCompactedError after one). The snapshot's revision is the marker's
        at that point, i.e. this store's revision then."""
        if revision <= 0:
            raise StoreError(f"revision {revision} is not a revision of {self.url}")
        return self._parse(self._docs_and_marker(revision))[0]

    def _docs_and_marker(self, at: int = 0) -> list[dict[str, Any]]:
        """The kvs of every document and of the marker at etcd revision ``at``
        (0: now), not those of the derived index keys."""
        docs, at = self._pages(at, self._docs)
        marker = self._range_at("read the marker", self._marker, None, at).get("kvs", [])
        return [*docs, *marker]

    def _load(self) -> tuple[Snapshot, int]:
        """Every document and the marker at one etcd revision; also the marker's
        mod_revision, which the write transaction compares.

        Read in pages of :data:`PAGE_KEYS` keys, every page at the revision of
        the first (etcd's MVCC keeps it consistent), so no single answer has to
        hold the whole cloud. A compaction between two pages (the pinned
        revision is gone) restarts the read, a bounded number of times."""
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            try:
                return self._parse(self._docs_and_marker())
            except HistoryCompactedError:
                if attempt == LOAD_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _range_pages(self, at: int = 0, start: bytes | None = None) -> list[dict[str, Any]]:
        """Every key under ``start`` (default: the whole prefix) at etcd revision
        ``at`` (0: now), in pages."""
        return self._pages(at, start)[0]

    def _pages(self, at: int = 0, start: bytes | None = None
               ) -> tuple[list[dict[str, Any]], int]:
        """:meth:`_range_pages`, and the etcd revision read at."""
        kvs: list[dict[str, Any]] = []
        key = self.prefix if start is None else start
        end, revision = _prefix_end(key), at
        while True:
            payload: dict[str, Any] = {"key": _b64(key), "range_end": _b64(end),
                                       "limit": PAGE_KEYS}
            if revision:
                payload["revision"] = str(revision)
            answer = self._post("load", "/kv/range", payload)
            page = answer.get("kvs", [])
            kvs.extend(page)
            revision = revision or int(answer["header"]["revision"])
            if not answer.get("more") or not page:
                return kvs, revision
            key = _unb64(page[-1]["key"]) + b"\0"  # the next key after the last one read

    def _parse(self, kvs: list[dict[str, Any]]) -> tuple[Snapshot, int]:
        snapshot = Snapshot(0)
        for kv in kvs:
            key = _unb64(kv["key"])
            if key == self._marker:
                snapshot.revision = int(kv["mod_revision"])
            elif key.startswith(self._docs):
                kind, doc_id = self._split(key)
                snapshot.docs.setdefault(kind, {})[doc_id] = json.loads(_unb64(kv["value"]))
        return snapshot, snapshot.revision

    def changes_since(self, revision: int) -> tuple[int, list[Change]]:
        """The etcd history of the documents after ``revision``, up to the
        marker's revision, read with a watch that starts at ``revision + 1``
        and stops at the marker's event (each write puts the marker last, so
        that event closes the history: nothing after it is taken)."""
        current = self.revision()
        if current <= revision:
            return current, []
        changes: dict[bytes, Change] = {}
        for key, rev, value in self._history(revision + 1, current):
            if key.startswith(self._docs):
                kind, doc_id = self._split(key)
                changes.pop(key, None)  # one per document, at its latest place
                doc = json.loads(value) if value is not None else None
                changes[key] = Change(kind, doc_id, rev, doc)
        return current, sorted(changes.values(), key=lambda change: change.revision)

    def _history(self, start: int, until: int) -> list[tuple[bytes, int, bytes | None]]:
        """``(key, mod_revision, value or None for a delete)`` of every event
        under the prefix from ``start`` to ``until`` (the marker's revision)."""
        request = {"create_request": {
            "key": _b64(self.prefix), "range_end": _b64(_prefix_end(self.prefix)),
            "start_revision": str(start),
        }}

        def read(member: Member) -> list[tuple[bytes, int, bytes | None]]:
            stream = member.open_stream("watch", request, READ_TIMEOUT_S)
            try:
                return self._read_stream(stream.lines(), start, until)
            finally:
                stream.close()

        return self._members.call("read the history", read)

    def _read_stream(
        self, lines: Iterator[bytes], start: int, until: int
    ) -> list[tuple[bytes, int, bytes | None]]:
        events: list[tuple[bytes, int, bytes | None]] = []
        for line in lines:
            if not line.strip():
                continue
            message = json.loads(line)
            result = message.get("result")
            if result is None:
                raise StoreError(f"store {self.url}: watch failed: {message.get('error', line)}")
            if result.get("canceled"):
                self._raise_canceled(result, start)
            for event in result.get("events", []):
                kv = event["kv"]
                key, rev = _unb64(kv["key"]), int(kv["mod_revision"])
                if rev > until:
                    return events
                deleted = event.get("type") == "DELETE"
                events.append((key, rev, None if deleted else _unb64(kv.get("value", ""))))
                if key == self._marker and rev == until:
                    return events
        raise StoreError(f"store {self.url}: the watch ended before revision {until}")

    def _raise_canceled(self, result: dict[str, Any], start: int) -> None:
        compacted = int(result.get("compact_revision", 0))
        if compacted:
            raise HistoryCompactedError(
                f"store {self.url}: history from revision {start} is compacted "
                f"(kept from {compacted}): reload everything"
            )
        raise StoreError(f"store {self.url}: watch canceled: {result.get('cancel_reason', '?')}")

    # ------------------------------------------------------------------ watching

    def watch_marker(self, start: int) -> Stream:
        """Open a watch on the revision marker from revision ``start``: a stream
        (read it with :meth:`marker_revisions`; close it to stop). Every write
        of ours puts the marker once, so each event is one committed write.
        Blocking reads time out after :data:`WATCH_IDLE_S` without a message."""
        request = {"create_request": {"key": _b64(self._marker), "start_revision": str(start)}}
        return self._members.call("watch", lambda member: member.open_stream(
            "watch", request, WATCH_IDLE_S))

    def marker_revisions(self, response: Stream, start: int) -> Iterator[int | None]:
        """The revision of each write seen on a :meth:`watch_marker` stream, as
        it comes; None for a message without events (the watch's creation).
        Raises HistoryCompactedError when ``start`` is compacted."""
        for events in self._watch_messages(response, start):
            if not events:
                yield None
            for event in events:
                yield int(event["kv"]["mod_revision"])

    def _watch_messages(self, response: Stream,
                        start: int) -> Iterator[list[dict[str, Any]]]:
        """The events of each message of a watch stream, as they come (an empty
        list for a message without events). Raises StoreError for a message that
        is no watch result, HistoryCompactedError when ``start`` is compacted and
        StoreUnreachableError when the stream fails or stays silent for
        :data:`WATCH_IDLE_S`."""
        for line in response.lines():
            if not line.strip():
                continue
            result = json.loads(line).get("result")
            if result is None:
                raise StoreError(f"store {self.url}: watch failed: {line[:200]!r}")
            if result.get("canceled"):
                self._raise_canceled(result, start)
            yield result.get("events", [])

    @contextmanager
    def scan(self) -> Iterator[KindReader]:
        """Every kind read at the etcd revision of the marker's read (MVCC),
        in pages of :data:`PAGE_KEYS` keys: no answer holds the whole cloud."""
        kvs, pinned = self._range("read the marker", self._marker, None)
        yield _Scan(self, pinned, int(kvs[0]["mod_revision"]) if kvs else 0)

    def iter_docs_at(self, kind: str, revision: int) -> Iterator[Doc]:
        """The documents of one kind at etcd ``revision``, page by page."""
        key = self._doc_key(kind, "")
        end = _prefix_end(key)
        while True:
            answer = self._post("load", "/kv/range", {
                "key": _b64(key), "range_end": _b64(end), "limit": PAGE_KEYS,
                "revision": str(revision)})
            page = answer.get("kvs", [])
            for kv in page:
                yield json.loads(_unb64(kv["value"]))
            if not answer.get("more") or not page:
                return
            key = _unb64(page[-1]["key"]) + b"\0"

    def revisions(self) -> tuple[int, int]:
        """``(this store's revision, etcd's current revision)`` read at one
        instant: no write of ours lies between them, so a watch from the second
        + 1 sees every write after the first (:class:`secfw.agent.etcdwatch.ChangeFeed`)."""
        kvs, cluster = self._range("read the revision", self._marker, None, keys_only=True)
        return (int(kvs[0]["mod_revision"]) if kvs else 0), cluster

    def watch_documents(self, start: int) -> Stream:
        """Open a watch on every key under the prefix from etcd revision
        ``start`` (read it with :meth:`document_batches`; close it to stop)."""
        request = {"create_request": {
            "key": _b64(self.prefix), "range_end": _b64(_prefix_end(self.prefix)),
            "start_revision": str(start)}}
        return self._members.call("watch", lambda member: member.open_stream(
            "watch", request, WATCH_IDLE_S))

    def document_batches(self, response: Stream,
                         start: int) -> Iterator[tuple[int, list[Change]] | None]:
        """Each write of ours seen on a :meth:`watch_documents` stream, as it
        comes: its revision (the marker's) and the documents it wrote or
        deleted; None for a message without a write (the watch's creation).

        etcd never splits one revision's events over two messages (its API
        guarantees: "updates in the same revision over multiple keys will not
        be split over several lists of events"), so one message holds a whole
        write; revisions without a marker event (keys of others, not ours) are
        skipped. Raises HistoryCompactedError when ``start`` is compacted."""
        for events in self._watch_messages(response, start):
            writes = self._writes(events)
            if not writes:
                yield None
            yield from writes

    def _writes(self, events: list[dict[str, Any]]) -> list[tuple[int, list[Change]]]:
        """The writes of ours among one message's events, oldest first."""
        docs: dict[int, list[Change]] = {}
        marked: set[int] = set()
        for event in events:
            kv = event["kv"]
            key, rev = _unb64(kv["key"]), int(kv["mod_revision"])
            if key == self._marker:
                marked.add(rev)
            elif key.startswith(self._docs):
                kind, doc_id = self._split(key)
                value = None if event.get("type") == "DELETE" else _unb64(kv.get("value", ""))
                doc = json.loads(value) if value is not None else None
                docs.setdefault(rev, []).append(Change(kind, doc_id, rev, doc))
        return [(rev, docs.get(rev, [])) for rev in sorted(marked)]

    # ------------------------------------------------------------------ writes

    @contextmanager
    def write(self) -> Iterator[WriteTxn]:
        """A transaction whose snapshot reads keys when first asked for, all at
        the etcd revision of its first read (MVCC keeps that consistent), and
        commits only if nothing it read has changed since (see :meth:`_commit`)."""
        marker, pinned = self._read_marker()
        snapshot = _EtcdSnapshot(self, marker.revision, pinned)
        txn = BufferedTxn(snapshot)
        try:
            yield txn
        except HistoryCompactedError as exc:
            # The pinned revision was compacted while the transaction read: the
            # cloud moved on meanwhile, so this is a conflict, retried as one.
            raise WriteConflictError(f"store {self.url}: {exc}") from exc
        if txn.writes:
            try:
                self._commit(txn.writes, snapshot)
            except HistoryCompactedError as exc:
                raise WriteConflictError(f"store {self.url}: {exc}") from exc

    def _read_marker(self) -> tuple[_Marker, int]:
        """The marker and the index stamp (one request), and the etcd revision
        read at; rebuilds the indexes first when the stamp says they are not
        this version's, or not kept by the last write (see :meth:`_reindex`)."""
        for _ in range(LOAD_ATTEMPTS):
            answer = self._txn("read the marker", {"success": [
                {"request_range": {"key": _b64(self._marker)}},
                {"request_range": {"key": _b64(self._stamp)}}]})
            pinned = int(answer["header"]["revision"])
            kvs, stamp_kvs = (r["response_range"].get("kvs", []) for r in answer["responses"])
            marker = _Marker.of(kvs)
            stamp = _unb64(stamp_kvs[0]["value"]).decode() if stamp_kvs else ""
            if stamp == f"{INDEX_VERSION}:{marker.token}":
                return marker, pinned
            self._reindex(marker, pinned)
        raise WriteConflictError(f"store {self.url}: indexes kept changing under the rebuild")

    def _reindex(self, marker: _Marker, pinned: int) -> None:
        """Rebuild every index key and tally from the documents at ``pinned``:
        a store made before the indexes, by another index version, or last
        written by a version that did not keep them. The old ones are deleted
        and the new ones put in transactions of :data:`KEYS_PER_TXN` keys, each
        compared on the marker (a write meanwhile restarts it); the stamp, put
        last, says they match the marker's token."""
        docs = self._parse(self._docs_and_marker(pinned))[0].docs
        rows, totals = index_docs(docs)
        puts = [(self._entry_key(i, b, item, doc_id), kind.encode())
                for i, b, item, kind, doc_id in rows]
        puts += [(self._tally_key(n, b), json.dumps(f, sort_keys=True).encode())
                 for (n, b), f in totals.items()]
        puts += [(self._alloc_key(b), json.dumps(runs).encode())
                 for b, runs in allocations(rows).items()]
        same_marker = [{"key": _b64(self._marker), "target": "MOD", "result": "EQUAL",
                        "mod_revision": str(marker.revision)}]
        for start in (self._idx, self._tally, self._alloc):
            self._txn("drop the indexes", {"compare": same_marker, "success": [
                {"request_delete_range": {"key": _b64(start), "range_end": _b64(
                    _prefix_end(start))}}]})
        step = KEYS_PER_TXN
        for first in range(0, len(puts), step):
            self._txn("rebuild the indexes", {"compare": same_marker, "success": [
                {"request_put": {"key": _b64(k), "value": _b64(v)}}
                for k, v in puts[first:first + step]]})
        self._txn("stamp the indexes", {"compare": same_marker, "success": [
            {"request_put": {"key": _b64(self._stamp),
                             "value": _b64(f"{INDEX_VERSION}:{marker.token}".encode())}}]})

    def _commit(self, writes: dict[tuple[str, str], Doc | None], snapshot: _EtcdSnapshot) -> None:
        """One etcd transaction: the documents, their index entries and tallies,
        the index stamp and the marker (last, see :meth:`changes_since`), if
        every key the transaction read is as it read it.

        The compares: each document, tally and key read is at the mod_revision
        read (0: still absent, so a deletion or a creation is caught); each range
        read (an index bucket, a kind) has no key modified after the pinned
        revision (a creation in it is caught; a deletion in an index bucket is
        not — it only ever frees what a check counted as taken, see
        docs/agent.md). Past :data:`MAX_COMPARES` of them (etcd caps a
        transaction's operations) the transaction compares the marker instead:
        coarser, as exact.

        The marker's value is a fresh token, and a failed compare returns the
        marker: if a member did commit an attempt whose answer was lost (the
        request is then re-sent to the next member), the token says so and the
        write is not reported as a conflict."""
        token = uuid.uuid4().hex
        by_kind: dict[str, list[str]] = {}
        for kind, doc_id in writes:
            by_kind.setdefault(kind, []).append(doc_id)
        for kind, doc_ids in by_kind.items():
            snapshot.prefetch(kind, doc_ids)
        moves: AddressMoves = {}
        ops = self._document_ops(writes, snapshot, moves) + self._tally_ops(writes, snapshot)
        ops += self._alloc_ops(moves, snapshot)
        ops.append({"request_put": {"key": _b64(self._stamp),
                                    "value": _b64(f"{INDEX_VERSION}:{token}".encode())}})
        ops.append({"request_put": {"key": _b64(self._marker), "value": _b64(token.encode())}})
        answer = self._txn("write", {
            "compare": snapshot.compares(self._marker),
            "success": ops,
            "failure": [{"request_range": {"key": _b64(self._marker)}}],
        })
        if answer.get("succeeded"):
            return
        kvs = answer["responses"][0]["response_range"].get("kvs", [])
        if kvs and _unb64(kvs[0].get("value", "")) == token.encode():
            return
        raise WriteConflictError(
            f"store {self.url}: another writer committed a key this transaction read "
            f"(at revision {snapshot.revision})"
        )

    def _document_ops(self, writes: dict[tuple[str, str], Doc | None],
                      snapshot: _EtcdSnapshot, moves: AddressMoves) -> list[dict[str, Any]]:
        """The puts and deletes of the documents and of their index entries
        (moved from the stored version of each document, read through the
        snapshot so it is compared too); the addresses moved go to ``moves``."""
        ops: list[dict[str, Any]] = []
        for (kind, doc_id), doc in writes.items():
            key = _b64(self._doc_key(kind, doc_id))
            old = snapshot.get(kind, doc_id)
            before, after = entries(kind, doc_id, old), entries(kind, doc_id, doc)
            address_moves(before, after, moves)
            ops += [{"request_delete_range": {"key": _b64(self._entry_key(*e, doc_id))}}
                    for e in sorted(before - after)]
            ops += [{"request_put": {"key": _b64(self._entry_key(*e, doc_id)),
                                     "value": _b64(kind.encode())}} for e in sorted(after - before)]
            if doc is None:
                ops.append({"request_delete_range": {"key": key}})
            else:
                value = _b64(json.dumps(doc, sort_keys=True).encode())
                ops.append({"request_put": {"key": key, "value": value}})
        return ops

    def _tally_ops(self, writes: dict[tuple[str, str], Doc | None],
                   snapshot: _EtcdSnapshot) -> list[dict[str, Any]]:
        deltas: dict[tuple[str, str], dict[str, int]] = {}
        for (kind, doc_id), doc in writes.items():
            for key, fields in tally_delta(kind, snapshot.get(kind, doc_id), doc).items():
                deltas[key] = add_tally(deltas.get(key, {}), fields)
        ops: list[dict[str, Any]] = []
        for (name, bucket), delta in sorted(deltas.items()):
            total = add_tally(snapshot.tally(name, bucket), delta)
            tally_key = _b64(self._tally_key(name, bucket))
            if total:
                value = _b64(json.dumps(total, sort_keys=True).encode())
                ops.append({"request_put": {"key": tally_key, "value": value}})
            else:
                ops.append({"request_delete_range": {"key": tally_key}})
        return ops

    def _alloc_ops(self, moves: AddressMoves, snapshot: _EtcdSnapshot) -> list[dict[str, Any]]:
        """The allocation records the moved addresses change, each moved from
        what the snapshot read (so compared: a concurrent allocation on the
        network fails this commit)."""
        ops: list[dict[str, Any]] = []
        for bucket, (removed, added) in sorted(moves.items()):
            runs = move_runs(snapshot.address_runs(bucket), removed, added)
            key = _b64(self._alloc_key(bucket))
            if runs:
                ops.append({"request_put": {"key": key, "value": _b64(json.dumps(runs).encode())}})
            else:
                ops.append({"request_delete_range": {"key": key}})
        return ops

    def _alloc_key(self, bucket: str) -> bytes:
        return self._alloc + _segment(bucket)

    def _entry_key(self, index: str, bucket: str, item: str, doc_id: str) -> bytes:
        return self._bucket_key(index, bucket) + _segment(item) + b"/" + _segment(doc_id)

    def _bucket_key(self, index: str, bucket: str) -> bytes:
        """The prefix of a bucket's entries: ``PREFIX/idx/INDEX/BUCKET/`` with the
        bucket percent-encoded, so no name can reach into another bucket."""
        return self._idx + index.encode() + b"/" + _segment(bucket) + b"/"

    def _tally_key(self, name: str, bucket: str) -> bytes:
        return self._tally + name.encode() + b"/" + _segment(bucket)

    def _range_at(self, what: str, key: bytes, end: bytes | None, revision: int,
                  **options: Any) -> dict[str, Any]:
        """One range request at etcd ``revision`` (the whole answer)."""
        payload: dict[str, Any] = {"key": _b64(key), "revision": str(revision), **options}
        if end is not None:
            payload["range_end"] = _b64(end)
        return self._post(what, "/kv/range", payload)

    def _docs_at(self, keys: list[bytes], revision: int) -> list[dict[str, Any]]:
        """The kvs of several single keys at ``revision``: one transaction of
        range reads per :data:`KEYS_PER_TXN` keys (one round trip each)."""
        kvs: list[dict[str, Any]] = []
        for first in range(0, len(keys), KEYS_PER_TXN):
            answer = self._txn("read documents", {"success": [
                {"request_range": {"key": _b64(k), "revision": str(revision)}}
                for k in keys[first:first + KEYS_PER_TXN]]})
            for response in answer.get("responses", []):
                kvs.extend(response.get("response_range", {}).get("kvs", []))
        return kvs

    # ------------------------------------------------------------------ helpers

    def _doc_key(self, kind: str, doc_id: str) -> bytes:
        if not kind or "/" in kind:
            raise StoreError(f"document kind {kind!r} cannot be a key segment")
        return self._docs + kind.encode() + b"/" + doc_id.encode()

    def _split(self, key: bytes) -> tuple[str, str]:
        kind, _, doc_id = key[len(self._docs) :].partition(b"/")
        return kind.decode(), doc_id.decode()

    def _range(
        self, what: str, key: bytes, range_end: bytes | None, keys_only: bool = False
    ) -> tuple[list[dict[str, Any]], int]:
        """``(kvs, header revision)`` of a linearizable range read."""
        payload: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            payload["range_end"] = _b64(range_end)
        if keys_only:
            payload["keys_only"] = True
        answer = self._post(what, "/kv/range", payload)
        return answer.get("kvs", []), int(answer["header"]["revision"])

    def _txn(self, what: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._post(what, "/kv/txn", body)

    def _post(self, what: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One gateway request (JSON in, JSON out) on a reachable member."""
        answer: dict[str, Any] = self._members.call(what, lambda member: member.post(path, body))
        return answer


class _Scan:
    """:meth:`EtcdStore.scan`'s reader: every kind at one etcd revision."""

    def __init__(self, store: EtcdStore, pinned: int, revision: int) -> None:
        self._store, self._pinned, self.revision = store, pinned, revision

    def iter_kind(self, kind: str) -> Iterator[Doc]:
        return self._store.iter_docs_at(kind, self._pinned)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix`` (etcd's range_end)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _detail(text: str) -> str:
    """etcd's message (etcdhttp took it out of the error body), with a hint for
    the size limits."""
    if "too many operations" in text:
        text += " (raise etcd's --max-txn-ops)"
    elif "request is too large" in text:
        text += " (raise etcd's --max-request-bytes)"
    return text


@dataclass(frozen=True)
class _Marker:
    """The revision marker as a write found it: its mod_revision (0: absent)
    and its token (the value the last write put)."""

    revision: int
    token: str

    @staticmethod
    def of(kvs: list[dict[str, Any]]) -> _Marker:
        if not kvs:
            return _Marker(0, "")
        return _Marker(int(kvs[0]["mod_revision"]), _unb64(kvs[0].get("value", "")).decode())


class _EtcdSnapshot(KeyedSnapshot):
    """A write transaction's view: every read at the pinned etcd revision, and
    remembered for the commit's compares (EtcdStore._commit): the mod_revision
    of each key read (0: absent) and each range read."""

    def __init__(self, store: EtcdStore, revision: int, pinned: int) -> None:
        super().__init__(revision)
        self._store = store
        self._pinned = pinned
        self.key_revisions: dict[bytes, int] = {}
        self.ranges: set[tuple[bytes, bytes]] = set()
        self.whole = False

    def compares(self, marker: bytes) -> list[dict[str, Any]]:
        """The commit's compares (see EtcdStore._commit)."""
        if not self.whole and len(self.key_revisions) + len(self.ranges) <= MAX_COMPARES:
            found = [{"key": _b64(key), "target": "MOD", "result": "EQUAL",
                      "mod_revision": str(rev)} for key, rev in sorted(self.key_revisions.items())]
            found += [{"key": _b64(start), "range_end": _b64(end), "target": "MOD",
                       "result": "LESS", "mod_revision": str(self._pinned + 1)}
                      for start, end in sorted(self.ranges)]
            return found
        return [{"key": _b64(marker), "target": "MOD", "result": "EQUAL",
                 "mod_revision": str(self.revision)}]

    def _seen(self, kvs: list[dict[str, Any]]) -> None:
        for kv in kvs:
            self.key_revisions[_unb64(kv["key"])] = int(kv["mod_revision"])

    def _read_kind(self, kind: str) -> dict[str, Doc]:
        start = self._store._doc_key(kind, "")
        kvs = self._store._range_pages(self._pinned, start)
        self.ranges.add((start, _prefix_end(start)))
        if len(kvs) + len(self.key_revisions) <= MAX_COMPARES:
            self._seen(kvs)  # else the range compare is joined by the marker's
        else:
            self.whole = True
        return {self._store._split(_unb64(kv["key"]))[1]: json.loads(_unb64(kv["value"]))
                for kv in kvs}

    def _read_all(self) -> dict[str, dict[str, Doc]]:
        self.whole = True
        return self._store._parse(self._store._docs_and_marker(self._pinned))[0].docs

    def _read_docs(self, kind: str, doc_ids: list[str]) -> dict[str, Doc]:
        keys = [self._store._doc_key(kind, doc_id) for doc_id in doc_ids]
        kvs = self._store._docs_at(keys, self._pinned)
        for key in keys:
            self.key_revisions.setdefault(key, 0)
        self._seen(kvs)
        return {self._store._split(_unb64(kv["key"]))[1]: json.loads(_unb64(kv["value"]))
                for kv in kvs}

    def _read_buckets(self, index: str, buckets: list[str]) -> dict[str, dict[str, str]]:
        """Whole buckets, one transaction of range reads per :data:`KEYS_PER_TXN`."""
        found: dict[str, dict[str, str]] = {}
        for first in range(0, len(buckets), KEYS_PER_TXN):
            chunk = buckets[first:first + KEYS_PER_TXN]
            prefixes = [self._store._bucket_key(index, bucket) for bucket in chunk]
            self.ranges.update((prefix, _prefix_end(prefix)) for prefix in prefixes)
            answer = self._store._txn("read index buckets", {"success": [
                {"request_range": {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)),
                                   "revision": str(self._pinned), "keys_only": True}}
                for prefix in prefixes]})
            for bucket, prefix, response in zip(chunk, prefixes, answer.get("responses", []),
                                                strict=True):
                kvs = response.get("response_range", {}).get("kvs", [])
                found[bucket] = _bucket_items(kvs, prefix)
        return found

    def _read_lookup(self, index: str, bucket: str, low: str | None,
                     high: str | None) -> dict[str, str]:
        prefix = self._store._bucket_key(index, bucket)
        start = prefix + (_segment(low) if low is not None else b"")
        end = prefix + _segment(high) + b"0" if high is not None else _prefix_end(prefix)
        self.ranges.add((start, end))
        kvs = self._store._range_at("read an index", start, end, self._pinned,
                                    keys_only=True).get("kvs", [])
        return _bucket_items(kvs, prefix)

    def _read_page(self, index: str, bucket: str, after: tuple[str, str] | None,
                   limit: int) -> list[tuple[str, str]]:
        """One range of the bucket's keys, ``limit`` at most, from the key after
        ``after``'s (keys order as the items then ids do: see
        :func:`secfw.store.indexes.order_text`)."""
        prefix = self._store._bucket_key(index, bucket)
        start = prefix
        if after is not None:
            start = prefix + _segment(after[0]) + b"/" + _segment(after[1]) + b"\0"
        end = _prefix_end(prefix)
        self.ranges.add((start, end))
        kvs = self._store._range_at("read a page", start, end, self._pinned, keys_only=True,
                                    limit=limit).get("kvs", [])
        found: list[tuple[str, str]] = []
        for kv in kvs:
            item, _, doc_id = _unb64(kv["key"])[len(prefix):].partition(b"/")
            found.append((_unsegment(item), _unsegment(doc_id)))
        return found

    def _read_runs(self, bucket: str) -> Runs:
        key = self._store._alloc_key(bucket)
        kvs = self._store._range_at("read an allocation record", key, None,
                                    self._pinned).get("kvs", [])
        self.key_revisions[key] = int(kvs[0]["mod_revision"]) if kvs else 0
        return list(json.loads(_unb64(kvs[0]["value"]))) if kvs else []

    def _read_tally(self, name: str, bucket: str) -> dict[str, int]:
        key = self._store._tally_key(name, bucket)
        kvs = self._store._range_at("read a tally", key, None, self._pinned).get("kvs", [])
        self.key_revisions[key] = int(kvs[0]["mod_revision"]) if kvs else 0
        return dict(json.loads(_unb64(kvs[0]["value"]))) if kvs else {}

    def tally(self, name: str, bucket: str) -> dict[str, int]:
        """A tally, read once per transaction (the commit adds to what was read)."""
        cache: dict[tuple[str, str], dict[str, int]] = self.__dict__.setdefault("_tallies", {})
        if (name, bucket) not in cache:
            cache[(name, bucket)] = super().tally(name, bucket)
        return dict(cache[(name, bucket)])


def _bucket_items(kvs: list[dict[str, Any]], prefix: bytes) -> dict[str, str]:
    """``{document id: item}`` of the entry keys of one bucket (``prefix``)."""
    found: dict[str, str] = {}
    for kv in kvs:
        item, _, doc_id = _unb64(kv["key"])[len(prefix):].partition(b"/")
        found[_unsegment(doc_id)] = _unsegment(item)
    return found


def _segment(text: str) -> bytes:
    """A name as one key segment: percent-encoded (no "/" left), order kept
    for the hex items of addresses (unchanged by the encoding)."""
    return quote(text, safe="").encode()


def _unsegment(data: bytes) -> str:
    return unquote(data.decode())

"""The Store contract (src/secfw/store/base.py), one suite run against every store.

Each test gets a fresh store of each kind: a SQLite file in a temporary
directory, and a fresh prefix on the session's etcd (tests/conftest.py starts it
on 127.0.0.1). What only one kind can show is said where a test is skipped.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import secfw.store.sqlite
from secfw.api import Api
from secfw.errors import HistoryCompactedError, StoreError, WriteConflictError
from secfw.store import Change, Snapshot, Store, open_store
from secfw.store.base import retry_conflicts

if TYPE_CHECKING:
    from conftest import EtcdServer

KINDS = ("sqlite", "etcd")


@pytest.fixture(params=KINDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of each kind (etcd started only for the etcd runs)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/contract.db"
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return server.url()


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    opened = open_store(url)
    yield opened
    opened.close()


def put(store: Store, kind: str, doc_id: str, doc: dict[str, Any]) -> int:
    with store.write() as txn:
        txn.put(kind, doc_id, doc)
    return store.revision()


def delete(store: Store, kind: str, doc_id: str) -> int:
    with store.write() as txn:
        txn.delete(kind, doc_id)
    return store.revision()


def replay(snapshot: Snapshot, changes: list[Change]) -> dict[str, dict[str, Any]]:
    """``snapshot``'s documents with ``changes`` applied, empty kinds dropped."""
    docs = {kind: dict(by_id) for kind, by_id in snapshot.docs.items()}
    for change in changes:
        if change.doc is None:
            docs.get(change.kind, {}).pop(change.id, None)
        else:
            docs.setdefault(change.kind, {})[change.id] = change.doc
    return {kind: by_id for kind, by_id in docs.items() if by_id}


# --------------------------------------------------------------------------- revisions


def test_fresh_store_is_empty_at_revision_zero(store: Store) -> None:
    assert store.revision() == 0
    assert store.load() == Snapshot(0, {})
    assert store.changes_since(0) == (0, [])


def test_revision_increases_on_every_change_and_only_then(store: Store) -> None:
    seen = [store.revision()]
    seen.append(put(store, "group", "a", {"name": "a"}))
    seen.append(put(store, "group", "b", {"name": "b"}))
    seen.append(put(store, "group", "a", {"name": "a2"}))
    seen.append(delete(store, "group", "b"))
    assert seen == sorted(set(seen)), seen  # strictly increasing
    assert store.load().revision == seen[-1]


def test_no_op_writes_change_nothing(store: Store) -> None:
    revision = put(store, "group", "a", {"name": "a"})
    with store.write():
        pass  # an empty transaction
    assert store.revision() == revision
    with store.write() as txn:
        txn.put("group", "a", {"name": "a2"})
        txn.delete("group", "a")  # the last word wins: a real change, a delete
    revision = store.revision()
    assert store.load().docs == {}
    assert store.changes_since(revision) == (revision, [])


def test_a_failed_transaction_commits_nothing(store: Store) -> None:
    revision = put(store, "group", "a", {"name": "a"})
    with pytest.raises(RuntimeError), store.write() as txn:
        txn.put("group", "a", {"name": "changed"})
        txn.put("group", "b", {"name": "b"})
        txn.delete("group", "a")
        raise RuntimeError("the caller's validation failed")
    assert store.revision() == revision
    assert store.load().docs == {"group": {"a": {"name": "a"}}}
    assert store.changes_since(revision) == (revision, [])


def test_a_transaction_reads_the_latest_committed_state(url: str, store: Store) -> None:
    other = open_store(url)
    try:
        put(other, "group", "a", {"name": "from the other"})
        with store.write() as txn:
            assert txn.snapshot.kind("group") == {"a": {"name": "from the other"}}
            assert txn.snapshot.all_docs() == {"group": {"a": {"name": "from the other"}}}
            assert txn.snapshot.revision == other.revision()
    finally:
        other.close()


# --------------------------------------------------------------------------- change feed


def test_changes_since_is_exact(store: Store) -> None:
    """From every revision seen, the feed replayed onto the snapshot taken then
    gives the current documents, one change per document, oldest first, each
    stamped after the revision asked for and no later than the current one."""
    put(store, "group", "z", {"name": "z"})
    snapshots = [store.load()]
    steps: list[tuple[str, str, dict[str, Any] | None]] = [
        ("group", "a", {"name": "a"}), ("rule", "r1", {"group": "a"}),
        ("group", "b", {"name": "b"}), ("rule", "r1", {"group": "b"}),
        ("group", "a", None), ("group", "c", {"name": "c"}), ("group", "a", {"name": "a3"}),
        ("rule", "r1", None),
    ]
    for kind, doc_id, doc in steps:
        if doc is None:
            delete(store, kind, doc_id)
        else:
            put(store, kind, doc_id, doc)
        snapshots.append(store.load())
    now = snapshots[-1]
    for then in snapshots:
        current, changes = store.changes_since(then.revision)
        assert current == now.revision
        assert replay(then, changes) == now.docs
        assert len({(c.kind, c.id) for c in changes}) == len(changes)
        assert [c.revision for c in changes] == sorted(c.revision for c in changes)
        assert all(then.revision < c.revision <= now.revision for c in changes)


def test_changes_carry_the_revision_that_wrote_them(store: Store) -> None:
    first = put(store, "group", "a", {"name": "a"})
    second = delete(store, "group", "a")
    assert store.changes_since(first - 1) == (second, [Change("group", "a", second, None)])
    assert store.changes_since(first) == (second, [Change("group", "a", second, None)])


def test_compacted_history_forces_a_full_resync(
    url: str, store: Store, request: pytest.FixtureRequest
) -> None:
    if url.startswith("sqlite"):
        pytest.skip("SQLite keeps every change (tombstones): its history is never compacted")
    server: EtcdServer = request.getfixturevalue("etcd_server")
    old = put(store, "group", "a", {"name": "a"})
    put(store, "group", "b", {"name": "b"})
    server.compact()
    with pytest.raises(HistoryCompactedError):
        store.changes_since(old - 1)
    assert store.load().docs == {"group": {"a": {"name": "a"}, "b": {"name": "b"}}}
    now = store.revision()
    assert store.changes_since(now) == (now, [])  # from the present: fine again
    later = put(store, "group", "c", {"name": "c"})
    assert store.changes_since(now) == (later, [Change("group", "c", later, {"name": "c"})])


# --------------------------------------------------------------------------- concurrency


def _increment(url: str, attempts: int) -> None:
    """One read-modify-write of the counter on a connection of its own."""
    store = open_store(url)
    try:
        def once() -> None:
            with store.write() as txn:
                value = txn.snapshot.kind("counter").get("c", {"n": 0})["n"]
                txn.put("counter", "c", {"n": value + 1})

        retry_conflicts(once, attempts=attempts)
    finally:
        store.close()


def test_concurrent_writers_never_lose_an_update(url: str, store: Store) -> None:
    """Threads each increment one counter; every increment that returned is in
    the final value, and none was refused for good (attempts are ample)."""
    threads, each = 4, 8
    done: list[int] = []
    failures: list[BaseException] = []

    def worker() -> None:
        for _ in range(each):
            try:
                _increment(url, attempts=100)
                done.append(1)
            except BaseException as exc:  # reported below, not lost in the thread
                failures.append(exc)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert failures == []
    assert store.load().docs["counter"]["c"]["n"] == len(done) == threads * each


def test_a_writer_that_read_before_another_commit_never_overwrites_it(
    url: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two read-modify-writes interleaved by hand: B runs to its end while A is
    open. SQLite makes B wait for A's lock (here: B gives up at once); etcd lets
    B commit and then refuses A, which writes nothing. Never both on one value."""
    monkeypatch.setattr(secfw.store.sqlite, "BUSY_TIMEOUT_S", 0.05)
    put(store, "counter", "c", {"n": 0})
    outcome = []
    try:
        with store.write() as txn_a:
            n = txn_a.snapshot.kind("counter")["c"]["n"]
            try:
                _increment(url, attempts=1)  # B, on a connection of its own
                outcome.append("B committed")
            except StoreError:
                outcome.append("B locked out")
            txn_a.put("counter", "c", {"n": n + 1})
        outcome.append("A committed")
    except WriteConflictError:
        outcome.append("A refused")
    expected = {"sqlite": ["B locked out", "A committed"], "etcd": ["B committed", "A refused"]}
    assert outcome == expected[url.split(":", 1)[0]]
    assert store.load().docs["counter"]["c"]["n"] == 1


def test_a_kind_read_late_in_a_transaction_is_still_its_starting_state(
    url: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction reads each kind on first use (LazySnapshot); one first read
    after another writer's commit still sees the state the transaction began
    with, and the transaction is refused, never committed over the other's."""
    monkeypatch.setattr(secfw.store.sqlite, "BUSY_TIMEOUT_S", 0.05)
    put(store, "counter", "c", {"n": 0})
    outcome = []
    try:
        with store.write() as txn_a:
            try:
                _increment(url, attempts=1)  # B, before A reads the counter
                outcome.append("B committed")
            except StoreError:
                outcome.append("B locked out")
            n = txn_a.snapshot.kind("counter")["c"]["n"]
            outcome.append(f"A read {n}")
            txn_a.put("counter", "c", {"n": n + 1})
        outcome.append("A committed")
    except WriteConflictError:
        outcome.append("A refused")
    expected = {"sqlite": ["B locked out", "A read 0", "A committed"],
                "etcd": ["B committed", "A read 0", "A refused"]}
    assert outcome == expected[url.split(":", 1)[0]]
    assert store.load().docs["counter"]["c"]["n"] == 1


# --------------------------------------------------------------------------- reopening


def test_reopened_store_has_everything(url: str) -> None:
    first = open_store(url)
    revision = put(first, "group", "a", {"name": "a"})
    put(first, "group", "b", {"name": "b"})
    snapshot = first.load()
    first.close()
    again = open_store(url)
    try:
        assert again.load() == snapshot
        assert again.changes_since(revision)[1] == [
            Change("group", "b", snapshot.revision, {"name": "b"})]
    finally:
        again.close()


def test_concurrent_commands_all_land(url: str) -> None:
    """Commands racing through the Api (each its own store connection, as
    separate ``secfw`` processes would): every one succeeds and every rule is
    there. On etcd this needs the Api's re-run of a conflicting transaction."""
    setup = Api(open_store(url))
    setup.secgroup_create("p", "web", "racing rules")
    setup.store.close()
    errors: list[BaseException] = []

    def add_rules(worker: int) -> None:
        api = Api(open_store(url))
        try:
            for number in range(4):
                port = str(1000 + worker * 10 + number)
                api.secgroup_add_rule("p", "web", "tcp", port, port, "0.0.0.0/0")
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
        finally:
            api.store.close()

    workers = [threading.Thread(target=add_rules, args=(n,)) for n in range(4)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert errors == []
    check = Api(open_store(url))
    try:
        assert len(check.secgroup_list_rules("p", "web")) == 16
    finally:
        check.store.close()


def test_floating_ip_documents_round_trip(url: str) -> None:
    """Pools and floating IPs (issue #17) are documents like the others: a reopened
    store, or a follower replaying the change feed, has the association and its
    index (port → floating addresses); a dissociation reads back as such."""
    from secfw.cloud import CloudState

    api = Api(open_store(url))
    try:
        api.net_create("p", "n", "10.0.0.0/24")
        api.image_create("admin", "img", visibility="public")
        follower = CloudState.from_snapshot(api.store.load())
        api.floating_pool_create("admin", "pool", "192.0.2.0/24")
        vm = api.boot("p", "vm", "m1.tiny", "img", "h1")
        address = api.floating_ip_create("p").id
        api.add_floating_ip("p", "vm", address)
        follower.apply_changes(*api.store.changes_since(follower.revision))
        port = api.snapshot().ports_of(vm.id)[0]
        reopened = open_store(url)
        snapshot = reopened.load()
        reopened.close()
        for state in (follower, CloudState.from_snapshot(snapshot)):
            assert state.floating_ips[address].fixed_ip == port.ip
            assert state.floating_by_port[port.id] == {address}
        api.remove_floating_ip("p", "vm", address)
        follower.apply_changes(*api.store.changes_since(follower.revision))
        assert follower.floating_ips[address].port_id is None
        assert port.id not in follower.floating_by_port
    finally:
        api.store.close()

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

import secfw.store.base
import secfw.store.etcd
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


def test_write_digest_names_the_last_write_while_the_store_is_at_it(store: Store) -> None:
    """Store.write_digest (the agent's restart record): the same for as long as
    the store stays at the revision, None once it moved on, another value for
    another write (a put or a delete)."""
    assert store.write_digest(0) is not None  # nothing written yet
    first = put(store, "network", "n1", {"id": "n1", "cidr": "10.0.0.0/24"})
    digest = store.write_digest(first)
    assert digest is not None and store.write_digest(first) == digest
    second = put(store, "network", "n2", {"id": "n2", "cidr": "10.0.1.0/24"})
    assert store.write_digest(first) is None
    put_digest = store.write_digest(second)
    assert put_digest not in (None, digest)
    third = delete(store, "network", "n2")
    assert store.write_digest(third) not in (None, digest, put_digest)


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


# --------------------------------------------------------------------------- keyed reads (#13)


class _Rollback(Exception):
    """Ends a write transaction without committing it."""


def assert_indexes_exact(store: Store) -> None:
    """Every index bucket and tally a write transaction reads from the store
    equals what the documents themselves give (Snapshot's own derivation)."""
    truth = store.load()
    buckets, totals = truth._derived()
    assert buckets, "no indexed document: nothing checked"
    with pytest.raises(_Rollback), store.write() as txn:
        for index, bucket in buckets:
            assert txn.snapshot.lookup(index, bucket) == truth.lookup(index, bucket)
            assert txn.snapshot.members(index, bucket) == truth.members(index, bucket)
        for name, bucket in totals:
            assert txn.snapshot.tally(name, bucket) == truth.tally(name, bucket)
        for index, bucket in buckets:
            if index == "ip":
                assert txn.snapshot.address_runs(bucket) == truth.address_runs(bucket)
        raise _Rollback


def _small_cloud(url: str) -> Api:
    api = Api(open_store(url))
    api.net_create("p", "net", "10.30.0.0/24")
    api.image_create("admin", "cirros", visibility="public")
    api.secgroup_create("p", "web", "web")
    api.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0")
    api.boot("p", "vm1", "m1.tiny", "cirros", "h1", ["web"], ["net"])
    return api


def test_indexes_follow_every_write(url: str) -> None:
    api = _small_cloud(url)
    try:
        api.boot("p", "vm2", "m1.tiny", "cirros", "h1", ["web", "default"], ["net"])
        api.remove_secgroup("p", "vm1", "web")
        api.delete("p", "vm2")
        assert_indexes_exact(api.store)
    finally:
        api.store.close()


def test_a_store_without_indexes_gets_them_rebuilt(url: str) -> None:
    """A store written before the indexes existed (here: its index keys or
    tables dropped — the allocation records' table too, as a store of index
    version 1 has none — and its index stamp) has them rebuilt on the next
    write."""
    api = _small_cloud(url)
    store = api.store
    try:
        if isinstance(store, secfw.store.sqlite.SqliteStore):
            store._conn.executescript(
                "DELETE FROM idx; DELETE FROM tally; DROP TABLE alloc; "
                "DELETE FROM meta WHERE key = 'index_version'")
        else:
            for start in (store._idx, store._tally, store._alloc, store._stamp):
                store._txn("drop", {"success": [{"request_delete_range": {
                    "key": secfw.store.etcd._b64(start),
                    "range_end": secfw.store.etcd._b64(secfw.store.etcd._prefix_end(start))}}]})
        again = open_store(url)
        try:
            assert_indexes_exact(again)
            Api(again).boot("p", "vm2", "m1.tiny", "cirros", "h1", ["web"], ["net"])
        finally:
            again.close()
        ips = [doc["ip"] for doc in store.load().docs["port"].values()]
        assert len(set(ips)) == len(ips) == 2
    finally:
        store.close()


def test_a_restored_store_has_its_indexes(url: str, tmp_path: Path) -> None:
    """A dump holds documents only; a restore rebuilds the indexes as it writes."""
    from secfw.store import backup

    api = _small_cloud(url)
    try:
        docs = backup.parse(backup.dumps(api.store))
        assert "idx" not in backup.dumps(api.store)
    finally:
        api.store.close()
    target = open_store(f"sqlite:///{tmp_path}/restored.db" if url.startswith("sqlite")
                        else url.rstrip("/") + "-restored")
    try:
        backup.restore(target, docs)
        assert_indexes_exact(target)
    finally:
        target.close()


def _interleaved(url: str, inner: Any, outer: Any) -> list[str]:
    """``outer`` (a command, on a connection of its own) runs inside a batch that
    ``inner`` (another command) opened and has not committed: what each did.
    SQLite locks ``outer`` out; etcd commits it and must then refuse the batch
    if it read anything ``outer`` wrote."""
    first, second = Api(open_store(url)), Api(open_store(url))
    outcome = []
    try:
        try:
            with first.batch():
                inner(first)
                try:
                    outer(second)
                    outcome.append("B committed")
                except StoreError:
                    outcome.append("B locked out")
            outcome.append("A committed")
        except WriteConflictError:
            outcome.append("A refused")
    finally:
        first.store.close()
        second.store.close()
    return outcome


def test_two_group_creations_never_exceed_the_quota(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Room for one more group, two writers: the second to commit read the
    project's group tally before the first committed, so it is refused."""
    monkeypatch.setattr(secfw.store.sqlite, "BUSY_TIMEOUT_S", 0.05)
    setup = Api(open_store(url))
    setup.quota_update("p", security_groups=2)  # the default group and one more
    setup.store.close()
    outcome = _interleaved(url, lambda api: api.secgroup_create("p", "a", "a"),
                           lambda api: api.secgroup_create("p", "b", "b"))
    expected = {"sqlite": ["B locked out", "A committed"], "etcd": ["B committed", "A refused"]}
    assert outcome == expected[url.split(":", 1)[0]]
    check = Api(open_store(url))
    try:
        assert len(check.secgroup_list("p")) == 2
    finally:
        check.store.close()


def test_two_boots_never_get_one_address(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both boots find the same lowest free address; the second to commit read
    that address free, so it is refused (etcd) or locked out (SQLite)."""
    monkeypatch.setattr(secfw.store.sqlite, "BUSY_TIMEOUT_S", 0.05)
    setup = Api(open_store(url))
    setup.net_create("admin", "shared", "10.40.0.0/24")  # flat: every project's
    setup.image_create("admin", "cirros", visibility="public")
    setup.store.close()

    def boot(project: str, host: str) -> Any:
        # other projects and hosts: no tally in common, only the network's addresses
        return lambda api: api.boot(project, "vm", "m1.tiny", "cirros", host, None, ["shared"])

    outcome = _interleaved(url, boot("p", "h1"), boot("q", "h2"))
    expected = {"sqlite": ["B locked out", "A committed"], "etcd": ["B committed", "A refused"]}
    assert outcome == expected[url.split(":", 1)[0]]
    again = Api(open_store(url))
    try:  # the one that did not commit runs again, as the Api's retry would
        loser = {"sqlite": ("q", "h2"), "etcd": ("p", "h1")}[url.split(":", 1)[0]]
        boot(*loser)(again)
        ips = [doc["ip"] for doc in again.store.load().docs["port"].values()]
        assert len(ips) == len(set(ips)) == 2
    finally:
        again.store.close()


def test_writers_of_unrelated_keys_do_not_conflict(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rules added to two different groups at once both commit on etcd: each
    transaction compares only the keys it read (SQLite serialises them)."""
    if url.startswith("sqlite"):
        pytest.skip("SQLite serialises every writer (BEGIN IMMEDIATE): nothing to race")
    setup = Api(open_store(url))
    setup.secgroup_create("p", "x", "x")
    setup.secgroup_create("p", "y", "y")
    setup.store.close()
    outcome = _interleaved(
        url, lambda api: api.secgroup_add_rule("p", "x", "tcp", "1", "1", "0.0.0.0/0"),
        lambda api: api.secgroup_add_rule("p", "y", "tcp", "2", "2", "0.0.0.0/0"))
    assert outcome == ["B committed", "A committed"]

"""Store-level behaviour seen through the API: revisions, change feed, concurrency, errors."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from secfw.api import Api
from secfw.cloud import CloudState
from secfw.errors import ConflictError, NotFoundError, StoreError, ValidationError
from secfw.store import open_store
from secfw.store.base import SCHEMA_VERSION


def _kinds(changes: list[Any]) -> list[tuple[str, bool]]:
    """(kind, deleted?) of each change, sorted."""
    return sorted((c.kind, c.doc is None) for c in changes)


def test_revision_increments_once_per_changing_transaction(api: Api) -> None:
    assert api.store.revision() == 0
    api.secgroup_create("p", "web", "web")  # creates default too: one transaction
    assert api.store.revision() == 1
    api.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0")
    assert api.store.revision() == 2
    with api.batch():
        for name in ("a", "b", "c"):
            api.secgroup_create("p", name, "batched")
        api.secgroup_add_rule("p", "a", "udp", "53", "53", "0.0.0.0/0")
    assert api.store.revision() == 3
    assert len(api.secgroup_list("p")) == 5


def test_failed_transaction_changes_nothing(api: Api) -> None:
    api.secgroup_create("p", "web", "web")
    before = api.store.load()
    with pytest.raises(ConflictError):
        api.secgroup_create("p", "web", "again")
    with pytest.raises(ValidationError), api.batch():
        api.secgroup_create("p", "ok", "would be stored with the batch")
        api.secgroup_add_rule("p", "ok", "tcp", "0", "0", "0.0.0.0/0")
    after = api.store.load()
    assert (after.revision, after.docs) == (before.revision, before.docs)


def test_no_op_transactions_do_not_bump_the_revision(api: Api) -> None:
    api.secgroup_create("p", "web", "web")
    revision = api.store.revision()
    api.secgroup_update("p", "web", "web", "web")  # same values
    api.secgroup_list("p")  # the default group exists already
    with api.batch():  # created and deleted again: never stored
        api.secgroup_create("p", "tmp", "tmp")
        api.secgroup_delete("p", "tmp")
    assert api.store.revision() == revision
    assert api.store.changes_since(revision) == (revision, [])


def test_failed_read_does_not_create_the_default_group(api: Api) -> None:
    with pytest.raises(NotFoundError):
        api.secgroup_list_rules("fresh", "nosuch")
    assert api.store.revision() == 0
    assert api.secgroup_list_rules("fresh", "default") == []
    assert api.store.revision() == 1


def test_changes_since_reports_puts_and_deletes(api: Api) -> None:
    api.secgroup_create("p", "web", "web")
    start = api.store.revision()
    rule = api.secgroup_add_rule("p", "web", "tcp", "22", "22", "10.0.0.0/8")
    revision, changes = api.store.changes_since(start)
    assert revision == start + 1
    assert [(c.kind, c.id, c.revision) for c in changes] == [("rule", rule.id, start + 1)]
    assert changes[0].doc is not None and changes[0].doc["port_min"] == 22

    api.secgroup_delete("p", "web")
    revision, changes = api.store.changes_since(start + 1)
    assert revision == start + 2
    assert _kinds(changes) == [("rule", True), ("secgroup", True)]
    assert all(c.revision == start + 2 and c.doc is None for c in changes)

    # from the beginning: one entry per document, deletions included
    _, everything = api.store.changes_since(0)
    assert _kinds(everything) == [("rule", True), ("secgroup", False), ("secgroup", True)]
    assert api.store.changes_since(revision) == (revision, [])


def test_change_feed_rebuilds_the_same_state(api: Api) -> None:
    follower = CloudState.from_snapshot(api.store.load())
    api.net_create("p", "net", "10.0.0.0/24")
    api.image_create("p", "img")
    api.secgroup_create("p", "web", "web")
    api.boot("p", "vm", "m1.tiny", "img", "h1", ["web"])
    api.secgroup_add_group_rule("p", "default", "web")
    api.delete("p", "vm")
    follower.apply_changes(*api.store.changes_since(follower.revision))
    fresh = CloudState.from_snapshot(api.store.load())
    assert follower.revision == fresh.revision
    assert follower.records == fresh.records
    assert dict(follower.used_ips) == dict(fresh.used_ips)


def _create_groups(url: str, prefix: str, count: int, start: Any) -> None:
    """Child process: wait for the start signal, then create ``count`` groups one by one."""
    api = Api(open_store(url))
    start.wait(30)
    for i in range(count):
        api.secgroup_create("shared", f"{prefix}-{i}", "concurrent writer")
    api.store.close()


def test_concurrent_writer_processes_lose_no_update(store_url: str) -> None:
    setup = Api(open_store(store_url))
    setup.quota_update("shared", security_groups="-1")
    revision = setup.store.revision()
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    workers = [ctx.Process(target=_create_groups, args=(store_url, p, 50, start))
               for p in ("left", "right")]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    names = {g.name for g in setup.secgroup_list("shared")}
    assert names == {"default"} | {f"{p}-{i}" for p in ("left", "right") for i in range(50)}
    assert setup.store.revision() == revision + 100
    setup.store.close()


def test_schema_version_is_stored(api: Api, tmp_path: Path) -> None:
    path = tmp_path / "secfw.db"
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert row == (SCHEMA_VERSION,)


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    open_store(str(path)).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                     (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="schema version"):
        open_store(str(path))


@pytest.mark.parametrize("content", [b"not a database" * 200, b"\x00" * 4096])
def test_non_sqlite_file_is_a_store_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="cannot open store"):
        open_store(f"sqlite:///{path}")
    assert path.read_bytes() == content  # left untouched


def test_unusable_store_urls_are_store_errors(tmp_path: Path) -> None:
    for url in (str(tmp_path), "sqlite://relative.db", "etcd://localhost:2379"):
        with pytest.raises(StoreError):
            open_store(url)


def test_store_write_rolls_back_on_error(api: Api) -> None:
    api.secgroup_create("p", "web", "web")
    before = api.store.load()
    with pytest.raises(RuntimeError), api.store.write() as txn:
        txn.put("secgroup", "x", {"id": "x", "project": "p", "name": "x", "description": ""})
        raise RuntimeError("abort")
    after = api.store.load()
    assert (after.revision, after.docs) == (before.revision, before.docs)


def test_a_write_to_a_new_projects_default_group_creates_it(api: Api) -> None:
    """Every project has ``default``: a rule added to it before anything read the
    project lands in it (one transaction creates both)."""
    rule = api.secgroup_add_rule("fresh", "default", "tcp", "22", "22", "10.0.0.0/8")
    groups = api.secgroup_list("fresh")
    assert [g.name for g in groups] == ["default"]
    assert rule.group_id == groups[0].id
    assert [r.id for r in api.secgroup_list_rules("fresh", "default")] == [rule.id]


def test_a_refused_write_to_a_new_projects_default_group_creates_nothing(api: Api) -> None:
    before = api.store.revision()
    with pytest.raises(NotFoundError):
        api.secgroup_delete_rule("fresh", "default", "tcp", "22", "22", "10.0.0.0/8")
    assert api.store.revision() == before

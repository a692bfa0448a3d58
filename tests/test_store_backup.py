"""``secfw store dump`` / ``secfw store restore``: a cloud moves SQLite → etcd →
SQLite with nothing lost, and a restore never lands in a store that holds data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from secfw.api import Api
from secfw.errors import ConflictError
from secfw.lab.demo import HOST, build_guide_cloud
from secfw.store import backup, open_store

if TYPE_CHECKING:
    from conftest import Cli, EtcdServer


def _guide_cloud(url: str) -> None:
    api = Api(open_store(url))
    try:
        build_guide_cloud(api)
        api.net_create("beta", "beta-net", "10.30.0.0/24")  # a second project's own object
    finally:
        api.store.close()


def test_round_trip_sqlite_etcd_sqlite(cli: Cli, etcd_server: EtcdServer, tmp_path: Path) -> None:
    """Dump the guide's cloud from SQLite, restore it into an empty etcd prefix,
    dump that, restore into a fresh SQLite file: the three dumps hold the same
    documents, and the host's compiled ruleset is the same bytes on all three."""
    _guide_cloud(cli.store_url)
    etcd_url, sqlite2 = etcd_server.url(), f"sqlite:///{tmp_path}/again.db"
    first = tmp_path / "first.json"
    cli.ok("store", "dump", "-o", str(first))
    assert "restored" in cli.ok("--store", etcd_url, "store", "restore", str(first))
    second = cli.ok("--store", etcd_url, "store", "dump")
    (tmp_path / "second.json").write_text(second)
    cli.ok("--store", sqlite2, "store", "restore", str(tmp_path / "second.json"))
    third = cli.ok("--store", sqlite2, "store", "dump")

    docs = [json.loads(text)["docs"] for text in (first.read_text(), second, third)]
    assert docs[0] == docs[1] == docs[2]
    assert sum(len(by_id) for by_id in docs[0].values()) > 20  # the whole cloud, not a part
    compiled = {cli.ok("--store", url, "compile", "--host", HOST)
                for url in (cli.store_url, etcd_url, sqlite2)}
    assert len(compiled) == 1 and "tcp" in compiled.pop()


def test_restore_refuses_a_store_that_holds_data(
        cli: Cli, etcd_server: EtcdServer, tmp_path: Path) -> None:
    """Into SQLite or etcd that already hold a document: exit 4, one line, and the
    store unchanged (Cli.fails compares revision and documents)."""
    _guide_cloud(cli.store_url)
    backup = tmp_path / "b.json"
    cli.ok("store", "dump", "-o", str(backup))
    assert "not empty" in cli.fails("store", "restore", str(backup), code=4)
    etcd_url = etcd_server.url()
    cli.ok("--store", etcd_url, "secgroup-create", "lonely", "one group")
    etcd_cli = type(cli)(etcd_url)
    assert "not empty" in etcd_cli.fails("store", "restore", str(backup), code=4)


def test_restore_refuses_what_is_not_a_dump(cli: Cli, tmp_path: Path) -> None:
    """Not JSON, another format, another version, malformed documents: exit 2 and
    nothing written; a missing file: exit 7."""
    bad = tmp_path / "bad.json"
    for text in ("{", json.dumps({"format": "other"}),
                 json.dumps({"format": "secfw-store-dump", "version": 9, "schema": 1, "docs": {}}),
                 json.dumps({"format": "secfw-store-dump", "version": 1, "schema": 1,
                             "docs": {"secgroup": {"x": 3}}})):
        bad.write_text(text)
        cli.fails("store", "restore", str(bad), code=2)
    cli.fails("store", "restore", str(tmp_path / "missing.json"), code=7)


def test_restore_into_etcd_goes_in_batches_that_only_ever_allow_less(
        cli: Cli, etcd_server: EtcdServer) -> None:
    """etcd caps a transaction's operations (128 by default), so a restore there
    is written in batches of ``max_write_docs``: every document arrives, the
    settings in the first batch, groups and rules before any instance, and ports
    last, so no state in between allows more than the dump."""
    _guide_cloud(cli.store_url)
    source = open_store(cli.store_url)
    try:
        docs = backup.parse(backup.dumps(source))
    finally:
        source.close()
    target = open_store(etcd_server.url())
    revisions: list[int] = []  # the store's revision after each committed batch
    real_write = target.write

    @contextmanager
    def counted_write() -> Iterator[Any]:
        with real_write() as txn:
            yield txn
        revisions.append(target.revision())

    try:
        target.max_write_docs = 7
        target.write = counted_write  # type: ignore[method-assign]
        total = sum(len(by_id) for by_id in docs.values())
        assert backup.restore(target, docs) == total
        snapshot = target.load()
    finally:
        target.close()
    assert {(k, i) for k, by_id in snapshot.docs.items() for i in by_id} == {
        (k, i) for k, by_id in docs.items() for i in by_id}
    assert len(revisions) == -(-total // 7) > 1  # one transaction per batch
    order = [kind for kind, _, _ in backup._restore_order(docs)]
    assert order[:order.count("setting")] == ["setting"] * order.count("setting")
    last_describing = max(i for i, k in enumerate(order) if k in ("secgroup", "rule"))
    assert min(i for i, k in enumerate(order) if k in ("instance", "port")) > last_describing
    assert min(i for i, k in enumerate(order) if k == "port") > max(
        i for i, k in enumerate(order) if k == "instance")


def test_a_writer_between_restore_batches_is_a_conflict(
        cli: Cli, etcd_server: EtcdServer) -> None:
    """Someone writes into the store while a batched restore runs: the next batch
    refuses (ConflictError naming the partial restore) instead of mixing clouds."""
    _guide_cloud(cli.store_url)
    source = open_store(cli.store_url)
    try:
        docs = backup.parse(backup.dumps(source))
    finally:
        source.close()
    url = etcd_server.url()
    target, intruder = open_store(url), open_store(url)
    real_write = target.write
    calls = 0

    def write_then_intrude() -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            with intruder.write() as txn:
                txn.put("setting", "intruder", {"id": "intruder", "value": "x"})
        return real_write()

    try:
        target.max_write_docs = 5
        target.write = write_then_intrude  # type: ignore[method-assign]
        with pytest.raises(ConflictError, match="changed during the restore"):
            backup.restore(target, docs)
    finally:
        target.close()
        intruder.close()

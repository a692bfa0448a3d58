"""How the agent follows the store: by events, without reloading it whole.

* a full pass (the periodic resync) reads only the changes since the view's
  revision; the store is loaded whole again only after a gap (history went
  back or was compacted) — counted on a wrapper of the store;
* while a store watch is in place the revision poll is a slow safety net, and a
  file watch's wake-up reads the revision at once (fake clock, counted reads);
* SQLite: inotify wakes the agent on a commit of another process's connection;
* etcd: the watch hands each write's documents to the pass (the pass then asks
  the store nothing), and a compaction falls back to a whole load.

Waits are bounded liveness checks (WAIT_S), never timed assertions.
"""

from __future__ import annotations

import json
import queue
import threading
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from test_agent import HOST, Clock, FakeBackend

from secfw.agent import AgentLoop, LoopSettings, Reconciler
from secfw.agent.etcdwatch import ChangeFeed, EtcdWatcher
from secfw.agent.filewatch import SqliteWatcher
from secfw.api import Api
from secfw.config import Config
from secfw.store import etcd, open_store
from secfw.store.base import Change, Snapshot, Store, WriteTxn

if TYPE_CHECKING:
    from conftest import EtcdServer

WAIT_S = 20.0


class CountingStore(Store):
    """A store that counts whole loads, change-feed reads and revision reads."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.url = inner, inner.url
        self.loads = self.feeds = self.revisions = 0

    def revision(self) -> int:
        self.revisions += 1
        return self.inner.revision()

    def load(self) -> Snapshot:
        self.loads += 1
        return self.inner.load()

    def changes_since(self, revision: int) -> tuple[int, list[Change]]:
        self.feeds += 1
        return self.inner.changes_since(revision)

    def write(self) -> AbstractContextManager[WriteTxn]:
        return self.inner.write()

    def close(self) -> None:
        self.inner.close()


def _cloud(api: Api) -> None:
    api.net_create("p", "net", "10.0.0.0/24")
    api.image_create("admin", "cirros", "qcow2", "public")
    api.boot("p", "vm1", "m1.tiny", "cirros", HOST, None, ["net"])


def _ports(backend: FakeBackend) -> int:
    assert backend.kernel is not None
    return len([fact for fact in backend.kernel if fact.startswith("port:")])


def test_a_resync_reads_the_changes_not_the_whole_store(api: Api, store_url: str) -> None:
    _cloud(api)
    store, backend = CountingStore(open_store(store_url)), FakeBackend()
    reconciler = Reconciler(store, HOST, Config(), backend)
    try:
        reconciler.reconcile(full=True)
        api.boot("p", "vm2", "m1.tiny", "cirros", HOST, None, ["net"])
        reconciler.reconcile(full=True)  # the periodic resync
        reconciler.reconcile(full=True)
        assert store.loads == 1 and _ports(backend) == 2
        assert reconciler.cloud is not None
        reconciler.cloud.revision += 5  # as if the store had been restored from a backup
        reconciler.reconcile(full=True)
        assert store.loads == 2 and _ports(backend) == 2
    finally:
        store.close()


def _loop(store: Store, clock: Clock) -> AgentLoop:
    settings = LoopSettings(poll_interval=0.1, watched_poll_interval=5.0, resync_interval=600)
    return AgentLoop(Reconciler(store, HOST, Config(), FakeBackend()), settings, clock=clock)


def _idle_reads(loop: AgentLoop, store: CountingStore, clock: Clock, seconds: float) -> int:
    """Revision reads while the loop turns every 0.2 s (its kernel check) for ``seconds``."""
    before = store.revisions
    for _ in range(int(seconds / 0.2)):
        clock.now += 0.2
        loop.step()
    return store.revisions - before


def test_the_poll_is_a_safety_net_while_a_watch_is_in_place(api: Api, store_url: str) -> None:
    _cloud(api)
    store, clock = CountingStore(open_store(store_url)), Clock()
    loop = _loop(store, clock)
    try:
        loop.step()  # the first pass
        assert _idle_reads(loop, store, clock, 4.0) >= 19  # no watch: every 0.1 s
        loop.store_watched = lambda: True
        assert _idle_reads(loop, store, clock, 4.0) <= 1
        api.boot("p", "vm2", "m1.tiny", "cirros", HOST, None, ["net"])
        loop.store_changed()  # what the file watch calls
        loop.step()
        assert loop.status.revision == api.store.revision()
    finally:
        loop.wakeup.close()
        store.close()


def test_inotify_wakes_the_agent_on_another_connections_commit(
        api: Api, store_url: str, tmp_path: Path) -> None:
    _cloud(api)
    woken = threading.Event()
    watcher = SqliteWatcher(str(tmp_path / "secfw.db"), woken.set)
    watcher.start()
    try:
        woken.clear()
        writer = Api(open_store(store_url))  # another connection, as a CLI process has
        writer.boot("p", "vm2", "m1.tiny", "cirros", HOST, None, ["net"])
        writer.store.close()
        assert woken.wait(WAIT_S)
    finally:
        watcher.stop()


def test_the_etcd_watch_feeds_each_writes_documents_to_the_pass(
        etcd_server: EtcdServer) -> None:
    url = etcd_server.url()
    api = Api(open_store(url))
    store = CountingStore(open_store(url))
    backend = FakeBackend()
    reconciler = Reconciler(store, HOST, Config(), backend)
    feed, seen = ChangeFeed(), queue.Queue[int]()
    reconciler.feed = feed
    watcher = EtcdWatcher(url, seen.put, feed)
    try:
        _cloud(api)
        reconciler.reconcile(full=True)
        watcher.start()
        assert watcher.watching.wait(WAIT_S)
        api.boot("p", "vm2", "m1.tiny", "cirros", HOST, None, ["net"])
        assert seen.get(timeout=WAIT_S) == api.store.revision()
        feeds = store.feeds
        reconciler.reconcile()
        assert store.feeds == feeds and store.loads == 1  # the store was not asked
        assert _ports(backend) == 2
        assert reconciler.applied_revision == api.store.revision()
    finally:
        watcher.stop()
        store.close()
        api.store.close()


def test_a_feed_vouches_only_for_what_follows_its_origin() -> None:
    feed = ChangeFeed()
    change: Any = Change("port", "a", 7, {"id": "a"})
    assert feed.after(5) is None  # never started
    feed.start(5)
    feed.push(7, [change])
    assert feed.after(4) is None  # before the origin: the store's change feed
    assert feed.after(5) == (7, [change])
    assert feed.after(7) is None  # nothing newer: ask the store
    feed.lose()
    feed.push(9, [change])
    assert feed.after(7) is None


def _scanned(store: Store) -> dict[str, list[str]]:
    found = {}
    with store.scan() as reader:
        revision = reader.revision
        for kind in ("instance", "port", "network", "nothing"):
            found[kind] = sorted(json.dumps(d, sort_keys=True) for d in reader.iter_kind(kind))
    found["revision"] = [str(revision)]
    return found


def _loaded(store: Store) -> dict[str, list[str]]:
    snapshot = store.load()
    found = {kind: sorted(json.dumps(d, sort_keys=True) for d in snapshot.kind(kind).values())
             for kind in ("instance", "port", "network", "nothing")}
    found["revision"] = [str(snapshot.revision)]
    return found


def test_a_scan_reads_what_a_load_reads(api: Api, etcd_server: EtcdServer,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's streamed load (SQLite's cursor; etcd's pages, here of 2 keys)."""
    monkeypatch.setattr(etcd, "PAGE_KEYS", 2)
    on_etcd = Api(open_store(etcd_server.url()))
    try:
        for cloud in (api, on_etcd):
            _cloud(cloud)
            cloud.boot("p", "vm2", "m1.tiny", "cirros", HOST, None, ["net"])
            cloud.boot("p", "vm3", "m1.tiny", "cirros", "elsewhere", None, ["net"])
            assert _scanned(cloud.store) == _loaded(cloud.store)
            assert len(_scanned(cloud.store)["port"]) == 3
    finally:
        on_etcd.store.close()


def test_the_metadata_redirect_follows_the_ports_and_is_kept_while_they_are(
        api: Api, store_url: str) -> None:
    """With a metadata server, every pass's filter carries the redirect of its
    ports (as ``with_metadata`` makes it afresh); a pass that changed no port
    hands on the last redirect object rather than walking the ports again."""
    from secfw.compiler.metadata import with_metadata

    listen = ("192.0.2.254", 8775)
    _cloud(api)
    store = open_store(store_url)
    reconciler = Reconciler(store, HOST, Config(metadata_listen=listen), FakeBackend())

    def programmed() -> Any:
        result = reconciler.reconcile()
        assert result.programmed is not None
        assert result.programmed == with_metadata(result.programmed, listen)
        return result.programmed

    try:
        first = programmed()
        api.secgroup_add_rule("p", "default", "tcp", "80", "80", "0.0.0.0/0")  # a chain only
        second = programmed()
        assert second.chains != first.chains
        assert second.ports is first.ports and second.metadata is first.metadata
        api.boot("p", "vm2", "m1.tiny", "cirros", HOST, None, ["net"])
        third = programmed()
        assert third.metadata is not None and len(third.metadata.ports) == 2
    finally:
        store.close()

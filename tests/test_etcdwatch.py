"""The agent's etcd watch (secfw.agent.etcdwatch) on the session's real etcd.

Waits are bounded liveness checks (an event that never comes fails the test
after WAIT_S), never assertions on how fast something happened.
"""

from __future__ import annotations

import queue
from typing import TYPE_CHECKING

import pytest

from secfw.agent import AgentLoop, Reconciler
from secfw.agent.etcdwatch import EtcdWatcher
from secfw.agent.loop import Trigger
from secfw.config import Config
from secfw.errors import HistoryCompactedError
from secfw.store.etcd import EtcdStore

if TYPE_CHECKING:
    from conftest import EtcdServer

WAIT_S = 20.0


def _put(store: EtcdStore, name: str) -> int:
    with store.write() as txn:
        txn.put("secgroup", name, {"name": name})
    return store.revision()


def test_every_write_wakes_the_watcher(etcd_server: EtcdServer) -> None:
    url = etcd_server.url()
    store = EtcdStore(url)
    seen: queue.Queue[int] = queue.Queue()
    watcher = EtcdWatcher(url, seen.put)
    try:
        _put(store, "before")  # before the watch: not reported
        watcher.start()
        assert watcher.watching.wait(WAIT_S)
        for name in ("a", "b", "c"):
            revision = _put(store, name)
            assert seen.get(timeout=WAIT_S) == revision
        assert seen.empty()
    finally:
        watcher.stop()
        store.close()
    assert not watcher._thread.is_alive()


def test_the_watch_queues_a_store_trigger_on_the_agent_loop(etcd_server: EtcdServer) -> None:
    """What ``secfw agent`` wires up: the watch wakes the loop with a ``store``
    trigger, an incremental pass (not a full one)."""
    url = etcd_server.url()
    store = EtcdStore(url)
    loop = AgentLoop(Reconciler(store, "h1", Config(), backend=None))  # type: ignore[arg-type]
    woken: queue.Queue[int] = queue.Queue()

    def wake(revision: int) -> None:
        loop.wakeup.notify(Trigger("store"))
        woken.put(revision)

    watcher = EtcdWatcher(url, wake)
    try:
        watcher.start()
        assert watcher.watching.wait(WAIT_S)
        revision = _put(store, "a")
        assert woken.get(timeout=WAIT_S) == revision
        assert Trigger("store") in loop.wakeup.take()
    finally:
        watcher.stop()
        loop.wakeup.close()
        store.close()


def test_a_compacted_start_is_reported_not_skipped(etcd_server: EtcdServer) -> None:
    store = EtcdStore(etcd_server.url())
    try:
        old = _put(store, "a")
        _put(store, "b")
        etcd_server.compact()
        response = store.watch_marker(old)
        with pytest.raises(HistoryCompactedError):
            list(store.marker_revisions(response, old))
        response.close()
    finally:
        store.close()


def test_an_unreachable_store_keeps_retrying_until_stopped() -> None:
    watcher = EtcdWatcher("etcd://127.0.0.1:1/x", lambda _revision: None)
    watcher.start()
    watcher.stop()
    assert not watcher._thread.is_alive()

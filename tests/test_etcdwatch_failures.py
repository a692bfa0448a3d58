"""agent.etcdwatch when the watch fails: the thread lives on whatever failed
(``watching`` cleared meanwhile, so the agent polls; ``store_watch_lost`` said
once), and a write replayed by the restarted watch never passes for the newest
version of its documents in the feed."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from secfw.agent import etcdwatch
from secfw.agent.etcdwatch import ChangeFeed, EtcdWatcher
from secfw.store.base import Change

WAIT_S = 10.0


def test_a_replayed_write_does_not_bring_an_old_version_back() -> None:
    """A watch that failed after delivering writes 6 and 7 restarts from 6:
    the replay of 6 must not make the port's version of 6 the latest again
    (the agent would apply a port that write 7 deleted)."""
    feed = ChangeFeed()
    feed.start(5)
    created = Change("port", "a", 6, {"id": "a"})
    deleted = Change("port", "a", 7, None)
    feed.push(6, [created])
    feed.push(7, [deleted])
    feed.push(6, [created])  # the replay
    assert feed.after(5) == (7, [deleted])
    feed.push(7, [deleted])
    assert feed.after(7) is None


class FlakyStore:
    """An etcd store whose watches fail with ``errors`` in turn (unexpected
    ones included), then block until the watcher stops."""

    def __init__(self, errors: list[Exception], done: threading.Event) -> None:
        self.errors, self.done = errors, done

    def cluster_revision(self) -> int:
        return 1

    def watch_marker(self, _start: int) -> Any:
        if self.errors:
            raise self.errors.pop(0)
        self.done.set()
        raise ConnectionError("no member")

    def close(self) -> None:
        pass


def test_any_failure_leaves_the_watch_thread_alive(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    done = threading.Event()
    errors: list[Exception] = [KeyError("revision"), TypeError("garbled message")]
    monkeypatch.setattr(etcdwatch, "EtcdStore",
                        lambda _url, create: FlakyStore(errors, done))
    monkeypatch.setattr(etcdwatch, "BACKOFF_INITIAL_S", 0.01)
    watcher = EtcdWatcher("etcd://127.0.0.1:1/x", lambda _revision: None)
    watcher.watching.set()  # as after a watch was established
    with caplog.at_level(logging.WARNING, logger="secfw.agent"):
        watcher.start()
        try:
            assert done.wait(WAIT_S), "the thread died on an unexpected error"
            assert watcher._thread.is_alive()
            assert not watcher.watching.is_set()
        finally:
            watcher.stop()
    assert len([r for r in caplog.records if r.getMessage() == "store_watch_lost"]) == 1

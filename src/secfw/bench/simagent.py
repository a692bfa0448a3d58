"""One simulated compute host: the real agent loop on etcd with the no-op backend.

``python -m secfw.bench.simagent --store URL --host HOST --stats FILE`` runs what
``secfw agent`` runs — :class:`~secfw.agent.storewatch.ReopeningStore`, the
:class:`~secfw.agent.reconciler.Reconciler` (its per-host view, incremental
compile, render, plan), :class:`~secfw.agent.loop.AgentLoop` with its default
settings (a 5 s revision poll while the watch is in place, 60 s full resync
unless ``--resync-interval``) and the etcd watch whose documents feed it — with
:class:`~secfw.backends.noop.NoopBackend` instead of the kernel and no topology
guard (a simulated host has no taps). SIGTERM stops it.

What it counts goes to ``--stats`` (JSON, rewritten after every pass): passes
(full or not) with the loop thread's CPU time each took, the documents the store
handed over (whole loads, and the change feed's documents with their JSON size),
the writes and documents the watch delivered, what the host's view holds,
the backend's transactions, and the process's RSS (current and peak).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from secfw.agent import AgentLoop, LoopSettings
from secfw.agent.etcdwatch import ChangeFeed, EtcdWatcher
from secfw.agent.loop import LoopObserver, Trigger
from secfw.agent.reconciler import Reconciler, SyncResult
from secfw.agent.storewatch import ReopeningStore
from secfw.backends.noop import NoopBackend
from secfw.config import Config
from secfw.store.base import Change, KindReader, Snapshot


class CountingStore(ReopeningStore):
    """The agent's store, counting what it hands over."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.loads = self.loaded_docs = 0
        self.feeds = self.feed_docs = self.feed_bytes = 0

    def load(self) -> Snapshot:
        snapshot = super().load()
        self.loads += 1
        self.loaded_docs += sum(len(by_id) for by_id in snapshot.docs.values())
        return snapshot

    def scan(self) -> AbstractContextManager[KindReader]:
        """The agent's whole load (streamed, kind by kind)."""
        self.loads += 1
        return super().scan()

    def changes_since(self, revision: int) -> tuple[int, list[Change]]:
        current, changes = super().changes_since(revision)
        if changes:
            self.feeds += 1
            self.feed_docs += len(changes)
            self.feed_bytes += sum(len(json.dumps(c.doc)) for c in changes if c.doc)
        return current, changes


class CountingFeed(ChangeFeed):
    """The watch's feed, counting the writes and documents it delivered."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = self.docs = self.bytes = 0

    def push(self, revision: int, changes: list[Change]) -> None:
        self.writes += 1
        self.docs += len(changes)
        self.bytes += sum(len(json.dumps(c.doc)) for c in changes if c.doc)
        super().push(revision, changes)


class MeasuredReconciler(Reconciler):
    """Records each pass: (store revision, full, CPU seconds of the loop thread,
    wall seconds, commands)."""

    passes: list[tuple[int, bool, float, float, int]]

    def reconcile(self, full: bool = False) -> SyncResult:
        cpu = time.thread_time()
        result = super().reconcile(full)
        self.passes.append((result.revision, result.full, time.thread_time() - cpu,
                            result.seconds, result.commands))
        return result


class StatsFile(LoopObserver):
    """Rewrites the stats file after every pass (and heartbeat)."""

    def __init__(self, path: Path, store: CountingStore, reconciler: MeasuredReconciler,
                 backend: NoopBackend, feed: CountingFeed) -> None:
        self.path, self.store, self.reconciler, self.backend = path, store, reconciler, backend
        self.feed = feed

    def on_status(self, status: Any) -> None:
        self.write()

    def on_stop(self, status: Any) -> None:
        self.write()

    def write(self) -> None:
        doc = {
            "pid": os.getpid(),
            "applied": self.reconciler.applied_revision,
            "passes": self.reconciler.passes,
            "loads": self.store.loads, "loaded_docs": self.store.loaded_docs,
            "feeds": self.store.feeds, "feed_docs": self.store.feed_docs,
            "feed_bytes": self.store.feed_bytes,
            "watch_writes": self.feed.writes, "watch_docs": self.feed.docs,
            "watch_bytes": self.feed.bytes, "view": self.reconciler.view.counts(),
            "transactions": self.backend.transactions, "commands": self.backend.commands,
            "cpu": sum(os.times()[:2]),
            **memory(),
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)


def memory(pid: int | str = "self") -> dict[str, int]:
    """``rss_kb`` and ``peak_kb`` (VmRSS, VmHWM) of ``pid``."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found["rss_kb" if key == "VmRSS" else "peak_kb"] = int(value.split()[0])
    return found


def run(url: str, host: str, stats: Path, resync: float = 60.0) -> None:
    """The loop until SIGTERM (module docstring), a full resync every ``resync`` s."""
    store = CountingStore(url)
    backend = NoopBackend()
    reconciler = MeasuredReconciler(store, host, Config(), backend)
    reconciler.passes = []
    feed = CountingFeed()
    reconciler.feed = feed
    observer = StatsFile(stats, store, reconciler, backend, feed)
    loop = AgentLoop(reconciler, LoopSettings(resync_interval=resync), observers=[observer])
    watcher = EtcdWatcher(url, lambda _revision: loop.wakeup.notify(Trigger("store")), feed)
    loop.store_watched = watcher.watching.is_set
    watcher.start()
    loop.install_signal_handlers()
    try:
        loop.run()
    finally:
        watcher.stop()
        observer.write()
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--resync-interval", type=float, default=60.0)
    args = parser.parse_args()
    run(args.store, args.host, args.stats, args.resync_interval)


if __name__ == "__main__":
    main()

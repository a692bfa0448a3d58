"""Follow the etcd store as it changes: wake the agent, and hand it the change.

:class:`EtcdWatcher` keeps an etcd watch open and calls ``on_change(revision)``
from its own thread for each committed write of ours (every write puts the
store's revision marker once: :mod:`secfw.store.etcd`). The agent passes a
function that queues a ``store`` trigger on the loop's
:class:`~secfw.agent.loop.Wakeup`, so a write reaches the kernel at once.

With a :class:`ChangeFeed` (what ``secfw agent`` gives it) the watch covers
every document under the prefix, and each write's documents go into the feed
before the wake-up: the pass applies them without asking the store
(:meth:`~secfw.agent.reconciler.Reconciler._changes`). The feed knows from
which revision it is complete; whatever it cannot vouch for (before the watch
started, after a compaction) the pass reads through ``changes_since`` as
before. Without a feed only the marker is watched and the pass reads the change
through ``changes_since``: the watch then decides *when*, never *what* — a
missed or duplicated wake-up costs at most one poll interval or one empty pass.

It never stops on its own: a member that fails or goes quiet
(:data:`~secfw.store.etcd.WATCH_IDLE_S`) is left for the next one, after a
back-off when the connection failed before delivering anything; a compacted
start revision wakes the agent (whose pass then loads everything) and
restarts the watch from the present.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

from secfw.agent.daemon import log_event
from secfw.errors import HistoryCompactedError, StoreUnreachableError
from secfw.store.base import Change
from secfw.store.etcd import EtcdStore
from secfw.store.etcdhttp import Stream

log = logging.getLogger("secfw.agent")

#: Back-off after a failed connection (seconds): doubles up to the maximum.
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 5.0
#: Bound on waiting for the thread to end in :meth:`EtcdWatcher.stop`.
STOP_TIMEOUT_S = 5.0
#: Writes a :class:`ChangeFeed` keeps before it gives up on a reader that does
#: not take them (then the reader asks the store, as without a feed).
FEED_LIMIT = 10_000


class ChangeFeed:
    """The writes an etcd watch delivered, for the agent's pass to take.

    ``origin`` is a store revision from which the feed is complete: every
    write after it is (or will be) in the feed. Thread-safe: the watch thread
    pushes, the loop's thread takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._origin: int | None = None
        self._writes: list[tuple[int, list[Change]]] = []
        self._high = 0  # the highest revision pushed since start()

    def start(self, origin: int) -> None:
        """A new watch: complete from store revision ``origin`` on."""
        with self._lock:
            self._origin, self._writes, self._high = origin, [], origin

    def lose(self) -> None:
        """The watch missed writes (compaction, overflow): complete from nowhere."""
        with self._lock:
            self._origin, self._writes = None, []

    def push(self, revision: int, changes: list[Change]) -> None:
        """Add one write. A write at or below the highest revision pushed is a
        replay (a watch restarted from an earlier revision after a failure)
        and is dropped: appended again it would pass for the newest version
        of its documents."""
        with self._lock:
            if self._origin is None or revision <= self._high:
                return
            self._high = revision
            self._writes.append((revision, changes))
            if len(self._writes) > FEED_LIMIT:
                self._origin, self._writes = None, []

    def after(self, revision: int) -> tuple[int, list[Change]] | None:
        """``(latest revision, the changes after revision, one per document,
        oldest first)`` when the feed is complete from ``revision`` and holds a
        write after it; else None (ask the store). Writes up to ``revision``
        are forgotten: the reader has them."""
        with self._lock:
            if self._origin is None or revision < self._origin:
                return None
            self._writes = [w for w in self._writes if w[0] > revision]
            if not self._writes:
                return None
            latest: dict[tuple[str, str], Change] = {}
            for _revision, changes in self._writes:
                for change in changes:
                    latest.pop((change.kind, change.id), None)
                    latest[(change.kind, change.id)] = change
            return self._writes[-1][0], list(latest.values())


class EtcdWatcher:
    """A background watch on an etcd store's marker (see the module docstring)."""

    def __init__(self, url: str, on_change: Callable[[int], None],
                 feed: ChangeFeed | None = None) -> None:
        self.url = url
        self.on_change = on_change
        self.feed = feed
        self._stopped = threading.Event()
        #: Set once a watch is established: every write committed after it is reported.
        self.watching = threading.Event()
        self._response: Stream | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="etcd-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread: closing the open stream interrupts its blocking read."""
        self._stopped.set()
        with self._lock:
            if self._response is not None:
                self._response.interrupt()
        self._thread.join(STOP_TIMEOUT_S)

    def _run(self) -> None:
        store: EtcdStore | None = None
        revision: int | None = None
        backoff = BACKOFF_INITIAL_S
        while not self._stopped.is_set():
            try:
                if store is None:
                    store = EtcdStore(self.url, create=False)
                if revision is None:  # from now on: the past is changes_since's
                    revision = self._begin(store)
                delivered, revision = self._follow(store, revision)
                backoff = BACKOFF_INITIAL_S if delivered else backoff
            except HistoryCompactedError:
                revision = None
                if self.feed is not None:
                    self.feed.lose()
                self.on_change(0)  # the pass finds the history gone and loads everything
            except Exception as exc:  # any failure: the agent polls meanwhile; retried
                self._lost(exc)
                if self._stopped.is_set():
                    break
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        if store is not None:
            store.close()

    def _lost(self, exc: Exception) -> None:
        """The watch failed: not watching until it is back (the agent polls at
        its normal interval meanwhile), said once per loss. Whatever failed — a
        member gone, a message that does not parse — the thread lives on. The
        next watch starts after the last write known before the failed one
        began, so nothing is missed; the writes it delivers again are dropped
        by the feed (:meth:`ChangeFeed.push`)."""
        if self.watching.is_set() and not self._stopped.is_set():
            log_event(log, logging.WARNING, "store_watch_lost",
                      error=f"{type(exc).__name__}: {exc}",
                      action="polling until the watch is back")
        else:
            log.debug("etcd watch: %s", exc)
        self.watching.clear()

    def _begin(self, store: EtcdStore) -> int:
        """Where a new watch starts (etcd's revision now); a feed is complete
        from the store's revision at that instant."""
        if self.feed is None:
            return store.cluster_revision()
        ours, cluster = store.revisions()
        self.feed.start(ours)
        return cluster

    def _follow(self, store: EtcdStore, revision: int) -> tuple[bool, int]:
        """One watch from ``revision + 1`` until it ends; ``(anything delivered,
        the last revision seen)``. An idle timeout after the watch was created
        ends it quietly; a failure before anything came is raised (back-off)."""
        if self.feed is None:
            response = store.watch_marker(revision + 1)
        else:
            response = store.watch_documents(revision + 1)
        with self._lock:
            if self._stopped.is_set():
                response.close()
                return False, revision
            self._response = response
        delivered = False  # any message: the member answered, the back-off resets
        try:
            for seen in self._writes(store, response, revision + 1):
                delivered = True
                self.watching.set()
                if seen is not None:
                    revision = max(revision, seen)
                    self.on_change(seen)
        except StoreUnreachableError:  # the stream failed, timed out or was interrupted
            if not delivered and not self._stopped.is_set():
                raise
        finally:
            with self._lock:
                self._response = None
            response.close()
        return delivered, revision


    def _writes(self, store: EtcdStore, response: Stream,
                start: int) -> Iterator[int | None]:
        """The revision of each write on the stream (None: a message without
        one); with a feed, each write's documents are pushed before it is."""
        if self.feed is None:
            yield from store.marker_revisions(response, start)
            return
        for write in store.document_batches(response, start):
            if write is not None:
                self.feed.push(*write)
            yield None if write is None else write[0]

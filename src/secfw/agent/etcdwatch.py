"""Wake the agent when the etcd store changes, instead of waiting for its poll.

:class:`EtcdWatcher` keeps an etcd watch open on the store's revision marker
(every committed write of ours puts it once: :mod:`secfw.store.etcd`) and calls
``on_change(revision)`` from its own thread for each write. The agent passes a
function that queues a ``store`` trigger on the loop's
:class:`~secfw.agent.loop.Wakeup`, so a write reaches the kernel without waiting
for the next poll; the pass itself still reads the change through
``changes_since``, so the watch only decides *when*, never *what* — a missed
or duplicated wake-up costs at most one poll interval or one empty pass.

It never stops on its own: a member that fails or goes quiet
(:data:`~secfw.store.etcd.WATCH_IDLE_S`) is left for the next one, after a
back-off when the connection failed before delivering anything; a compacted
start revision wakes the agent (whose pass then loads everything) and
restarts the watch from the present.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

import requests

from secfw.errors import HistoryCompactedError, StoreError
from secfw.store.etcd import EtcdStore

log = logging.getLogger("secfw.agent")

#: Back-off after a failed connection (seconds): doubles up to the maximum.
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 5.0
#: Bound on waiting for the thread to end in :meth:`EtcdWatcher.stop`.
STOP_TIMEOUT_S = 5.0


class EtcdWatcher:
    """A background watch on an etcd store's marker (see the module docstring)."""

    def __init__(self, url: str, on_change: Callable[[int], None]) -> None:
        self.url = url
        self.on_change = on_change
        self._stopped = threading.Event()
        #: Set once a watch is established: every write committed after it is reported.
        self.watching = threading.Event()
        self._response: requests.Response | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="etcd-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread: closing the open stream interrupts its blocking read."""
        self._stopped.set()
        with self._lock:
            if self._response is not None:
                _interrupt(self._response)
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
                    revision = store.cluster_revision()
                delivered, revision = self._follow(store, revision)
                backoff = BACKOFF_INITIAL_S if delivered else backoff
            except HistoryCompactedError:
                revision = None
                self.on_change(0)  # the pass finds the history gone and loads everything
            except (StoreError, requests.RequestException, OSError, ValueError) as exc:
                if self._stopped.is_set():
                    break
                log.debug("etcd watch: %s", exc)
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        if store is not None:
            store.close()

    def _follow(self, store: EtcdStore, revision: int) -> tuple[bool, int]:
        """One watch from ``revision + 1`` until it ends; ``(anything delivered,
        the last revision seen)``. An idle timeout after the watch was created
        ends it quietly; a failure before anything came is raised (back-off)."""
        response = store.watch_marker(revision + 1)
        with self._lock:
            if self._stopped.is_set():
                response.close()
                return False, revision
            self._response = response
        delivered = False  # any message: the member answered, the back-off resets
        try:
            for seen in store.marker_revisions(response, revision + 1):
                delivered = True
                self.watching.set()
                if seen is not None:
                    revision = max(revision, seen)
                    self.on_change(seen)
        except requests.ConnectionError:
            if not delivered and not self._stopped.is_set():
                raise
        finally:
            with self._lock:
                self._response = None
            response.close()
        return delivered, revision


def _interrupt(response: requests.Response) -> None:
    """Wake a thread blocked reading ``response``'s stream: shut its socket down.

    Closing the response from another thread does not interrupt a blocking
    ``recv`` (it waits for the read timeout); ``shutdown(2)`` on the socket does,
    for every descriptor of it (so a duplicate made from the file number works).
    The socket is urllib3's, reached through its private attributes: when that
    fails the thread still ends, at the read timeout."""
    try:
        fileno = response.raw._fp.fileno()
        with socket.socket(fileno=os.dup(fileno)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError, ValueError) as exc:
        log.debug("etcd watch: cannot interrupt the stream: %s", exc)

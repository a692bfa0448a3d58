"""``secfw metadata serve``: the model kept current from the store, served by waitress.

Why waitress and werkzeug: werkzeug's routing and request/response objects keep
the HTTP layer out of secfw's code (and give the tests a client without
sockets); waitress is a production WSGI server in pure Python (no compiler, no
event loop to adopt) with a thread pool, and reports each request's peer address
and port in the environ (``REMOTE_ADDR``, ``REMOTE_PORT``), which is all
:mod:`.identity` needs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from secfw.cloud import CloudState
from secfw.metadata.app import MetadataApp
from secfw.metadata.content import HostIndex, InstanceData, index_host
from secfw.metadata.identity import ConntrackIdentity
from secfw.store.base import Store

log = logging.getLogger("secfw.metadata")


class HostModel:
    """The host's :data:`~.content.HostIndex`, reloaded when the store's revision
    moved (one revision read per request; a reload per write). ``open_store``
    is called once per serving thread: a SQLite connection belongs to the thread
    that opened it."""

    def __init__(self, open_store: Callable[[], Store], host: str) -> None:
        self.open_store, self.host = open_store, host
        self._lock = threading.Lock()
        self._local = threading.local()
        self._revision: int | None = None
        self._index: HostIndex = {}

    def _store(self) -> Store:
        store: Store | None = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = self.open_store()
        return store

    def index(self) -> HostIndex:
        """The index as of the store's current revision."""
        store = self._store()
        revision = store.revision()
        with self._lock:
            if revision != self._revision:
                snapshot = store.load()
                self._index = index_host(CloudState.from_snapshot(snapshot), self.host)
                self._revision = snapshot.revision
            return self._index


class Resolver:
    """The asking instance of a request: the connection's conntrack entry
    (:class:`~.identity.ConntrackIdentity`) looked up in the host's index."""

    def __init__(self, model: HostModel, listen: tuple[str, int],
                 identity: ConntrackIdentity | None = None) -> None:
        self.model, self.listen = model, listen
        self.identity = identity or ConntrackIdentity()

    def __call__(self, environ: dict[str, Any]) -> InstanceData | None:
        peer = (str(environ.get("REMOTE_ADDR", "")), int(environ.get("REMOTE_PORT") or 0))
        asker = self.identity.asker(self.listen, peer)
        if asker is None:
            return None
        return self.model.index().get((asker.mark, asker.source))


def make_app(open_store: Callable[[], Store], host: str,
             listen: tuple[str, int]) -> MetadataApp:
    """The service of ``host`` for a server listening on ``listen``."""
    return MetadataApp(Resolver(HostModel(open_store, host), listen))


def serve(open_store: Callable[[], Store], host: str, listen: tuple[str, int],
          threads: int = 4) -> None:
    """Serve until interrupted (SIGTERM/SIGINT end waitress)."""
    from waitress import serve as waitress_serve

    log.info("metadata host=%s listen=%s:%d", host, *listen)
    waitress_serve(make_app(open_store, host, listen), host=listen[0], port=listen[1],
                   threads=threads, ident="secfw-metadata", clear_untrusted_proxy_headers=True)

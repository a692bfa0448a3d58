"""The store interface: a revisioned document store.

The model is kept as JSON documents addressed by ``(kind, id)``. Every committed
write transaction that changes anything increases the store's **revision** by
exactly one and stamps the documents it wrote (or deleted) with it, so a reader
can ask what changed since the revision it last saw. That is all an agent needs,
and it is what etcd offers natively (mod_revision, watch), so a distributed store
implements the same small interface.

Write transactions are serialisable: a writer sees the latest committed state and
no other writer commits in between (SQLite: ``BEGIN IMMEDIATE``; etcd: a
compare-and-swap on the revision with retry). A transaction that raises commits
nothing.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from secfw.errors import StoreError

SCHEMA_VERSION = 1
DEFAULT_URL = "sqlite:////var/lib/secfw/secfw.db"

Doc = dict[str, Any]


@dataclass
class Snapshot:
    """Every document at one revision: ``docs[kind][id] -> doc``."""

    revision: int
    docs: dict[str, dict[str, Doc]] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    """One document written (``doc`` set) or deleted (``doc is None``) at ``revision``."""

    kind: str
    id: str
    revision: int
    doc: Doc | None


class WriteTxn(ABC):
    """An open, serialisable write transaction.

    ``snapshot`` is the committed state when the transaction began; the caller
    records its writes with :meth:`put` and :meth:`delete`. Nothing is visible to
    others until the context manager exits without an exception.
    """

    snapshot: Snapshot

    @abstractmethod
    def put(self, kind: str, doc_id: str, doc: Doc) -> None: ...

    @abstractmethod
    def delete(self, kind: str, doc_id: str) -> None: ...


class Store(ABC):
    """A revisioned document store (see the module docstring)."""

    url: str

    @abstractmethod
    def revision(self) -> int:
        """The current revision; cheap enough to poll several times a second."""

    @abstractmethod
    def load(self) -> Snapshot:
        """Every document, consistently, at the current revision."""

    @abstractmethod
    def changes_since(self, revision: int) -> tuple[int, list[Change]]:
        """``(current revision, changes after revision)``, oldest first, one per doc."""

    @abstractmethod
    def write(self) -> AbstractContextManager[WriteTxn]:
        """Begin a serialisable write transaction (see :class:`WriteTxn`)."""

    @abstractmethod
    def close(self) -> None: ...

    def iter_docs(self, kind: str) -> Iterator[Doc]:
        """Convenience: every document of one kind at the current revision."""
        yield from self.load().docs.get(kind, {}).values()


def store_url(explicit: str | None = None) -> str:
    """The store URL: the explicit one, else ``$SECFW_STORE``, else the default."""
    return explicit or os.environ.get("SECFW_STORE") or DEFAULT_URL


def open_store(url: str | None = None) -> Store:
    """Open the store named by ``url`` (see :func:`store_url`).

    ``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db`` follow the
    usual SQLAlchemy convention; a bare filesystem path is accepted as SQLite too.
    """
    resolved = store_url(url)
    if resolved.startswith("sqlite://"):
        path = resolved[len("sqlite://") :]
        if not path.startswith("/") or len(path) < 2:
            raise StoreError(f"store URL {resolved!r}: expected sqlite:///PATH")
        return _sqlite(path[1:], resolved)
    if "://" not in resolved:
        return _sqlite(resolved, resolved)
    scheme = resolved.split("://", 1)[0]
    raise StoreError(f"store URL {resolved!r}: unsupported scheme {scheme!r} (supported: sqlite)")


def _sqlite(path: str, url: str) -> Store:
    from secfw.store.sqlite import SqliteStore

    return SqliteStore(path, url)

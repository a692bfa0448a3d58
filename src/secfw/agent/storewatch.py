"""The store as a long-running agent reads it: never created, reopened on demand.

A daemon that keeps one SQLite connection open for weeks would not notice its
file being removed, replaced (a restore from backup is a rename) or made
unreadable: the open descriptor keeps reading the old inode. And opening a
missing file would *create* an empty store, from which the agent would compile
an empty filter and cut every instance off. :class:`ReopeningStore` prevents
both:

* it opens the store only when the file exists (never creates one);
* :meth:`ReopeningStore.replaced` compares the file's identity (device, inode)
  with the one opened — a cheap ``stat`` the agent does on every poll — and
  raises :class:`~secfw.errors.StoreError` when the file is gone;
* :meth:`ReopeningStore.reopen` closes the connection and opens the file anew;
  the agent does it before every full pass, so a file made unreadable or
  corrupted in place is noticed within one resync period;
* a store that comes back *empty* (revision 0) after one at a higher revision
  was seen is refused: that is a wrong path, a re-initialised file, or the
  empty file SQLite creates if the store vanishes between the existence check
  and the open (a race no check before ``open`` can close). Restarting the
  agent accepts it.

It is a read-only :class:`~secfw.store.base.Store`: :meth:`write` refuses.
Stores that are not files (etcd) are never "replaced"; reopening one just opens
a new connection, and an etcd prefix that holds no store (a mistyped prefix) is
refused like a missing file, never initialised.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from secfw.errors import StoreError
from secfw.store.base import (
    Change,
    KindReader,
    Snapshot,
    Store,
    WriteTxn,
    open_store,
    store_url,
)


@runtime_checkable
class Reopenable(Protocol):
    """A store the agent can check for replacement and reopen (see module doc)."""

    def replaced(self) -> bool: ...

    def reopen(self) -> None: ...

    @property
    def identity(self) -> object: ...


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite store URL (same rules as :func:`secfw.store.open_store`),
    or None when ``url`` names another kind of store."""
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        return path[1:] if path.startswith("/") and len(path) > 1 else None
    return None if "://" in url else url


class ReopeningStore(Store):
    """A read-only store that notices its file changing (see the module docstring)."""

    def __init__(self, url: str | None = None) -> None:
        """Remember ``url``; nothing is opened until first use (so a store that is
        down when the agent starts is an error of the first pass, not of start-up)."""
        self.url = store_url(url)
        self.path = sqlite_path(self.url)
        self._store: Store | None = None
        self._identity: tuple[int, int] | None = None
        self._highest = 0  # highest revision seen in this process

    # ---- opening

    def reopen(self) -> None:
        """Close the current connection (if any) and open the store again.

        Raises StoreError when the file is missing or cannot be opened; the store
        is then closed and the next use tries again.
        """
        self.close()
        identity = self._file_identity()
        store = open_store(self.url, create=False)
        try:
            if self._file_identity() != identity:  # replaced while opening: next time
                raise StoreError(f"store {self.path or self.url} changed while being opened")
            self._check_not_emptied(store.revision())
        except BaseException:
            store.close()
            raise
        self._store, self._identity = store, identity

    def _check_not_emptied(self, revision: int) -> None:
        """Refuse an empty store after a non-empty one (see the module docstring)."""
        if revision == 0 and self._highest > 0:
            raise StoreError(
                f"store {self.path or self.url} is empty (revision 0) but was at revision "
                f"{self._highest}: refusing it; restart the agent to accept an empty store"
            )
        self._highest = max(self._highest, revision)

    def reopened_elsewhere(self) -> bool:
        """Close and open the store again (a file made unreadable or corrupt is
        noticed now: StoreError); True when what is open now is another file
        than the one open before — the caller must then reload everything, its
        change feed no longer continues what it loaded. (SQLite keeps the file
        descriptor of a closed connection for reuse while another connection
        holds the file, so only reopening the one connection really opens the
        file again.)"""
        before = self._identity
        self.reopen()
        return before is not None and self._identity != before

    @property
    def identity(self) -> tuple[int, int] | None:
        """The file opened now (device, inode); None when closed, or not a file.
        The agent's view follows one file: another one is loaded whole."""
        return self._identity

    def replaced(self) -> bool:
        """True when the file is no longer the one opened (caller: reopen and
        reload everything); StoreError when it is gone. False before first open."""
        if self.path is None or self._store is None:
            return False
        return self._file_identity() != self._identity

    def _file_identity(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            info = os.stat(self.path)
        except FileNotFoundError as exc:
            raise StoreError(f"store {self.path} is missing") from exc
        except OSError as exc:
            raise StoreError(f"store {self.path}: {exc.strerror or exc}") from exc
        return info.st_dev, info.st_ino

    def _opened(self) -> Store:
        if self._store is None:
            self.reopen()
        assert self._store is not None
        return self._store

    # ---- the Store interface

    def revision(self) -> int:
        revision = self._opened().revision()
        self._highest = max(self._highest, revision)
        return revision

    def load(self) -> Snapshot:
        return self._opened().load()

    def changes_since(self, revision: int) -> tuple[int, list[Change]]:
        return self._opened().changes_since(revision)

    def write_digest(self, revision: int) -> str | None:
        return self._opened().write_digest(revision)

    def scan(self) -> AbstractContextManager[KindReader]:
        return self._opened().scan()

    def write(self) -> AbstractContextManager[WriteTxn]:
        raise StoreError("the agent reads the store and never writes to it")

    def close(self) -> None:
        if self._store is not None:
            store, self._store, self._identity = self._store, None, None
            store.close()

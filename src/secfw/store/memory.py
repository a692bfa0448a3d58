"""A store held in memory: a copy of another store's snapshot that writes never
leave (``secfw audit impact`` runs a write command against it).

It keeps the :class:`~secfw.store.base.Store` contract for one process: writes
commit atomically when the transaction's block exits without an exception, every
committing write moves the revision on, and :meth:`MemoryStore.changes_since`
answers from the writes made since the copy (older revisions were never seen:
:class:`~secfw.errors.HistoryCompactedError`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from secfw.errors import HistoryCompactedError
from secfw.store.base import BufferedTxn, Change, Snapshot, Store, WriteTxn


class MemoryStore(Store):
    """The documents of ``snapshot`` (deep-copied), in memory only."""

    def __init__(self, snapshot: Snapshot, url: str = "memory:") -> None:
        self.url = url
        self._snapshot = copy.deepcopy(snapshot)
        self._base = snapshot.revision
        self._log: list[Change] = []

    def revision(self) -> int:
        return self._snapshot.revision

    def load(self) -> Snapshot:
        return copy.deepcopy(self._snapshot)

    def changes_since(self, revision: int) -> tuple[int, list[Change]]:
        if revision < self._base:
            raise HistoryCompactedError(f"revision {revision} is older than the in-memory copy")
        latest: dict[tuple[str, str], Change] = {}
        for change in self._log:
            if change.revision > revision:
                latest.pop((change.kind, change.id), None)
                latest[(change.kind, change.id)] = change
        return self.revision(), sorted(latest.values(), key=lambda c: c.revision)

    @contextmanager
    def _transaction(self) -> Iterator[WriteTxn]:
        txn = BufferedTxn(self.load())
        yield txn
        if not txn.writes:
            return
        revision = self._snapshot.revision + 1
        for (kind, doc_id), doc in txn.writes.items():
            docs = self._snapshot.docs.setdefault(kind, {})
            if doc is None:
                docs.pop(doc_id, None)
            else:
                docs[doc_id] = copy.deepcopy(doc)
            self._log.append(Change(kind, doc_id, revision, copy.deepcopy(doc)))
        self._snapshot.revision = revision

    def write(self) -> AbstractContextManager[WriteTxn]:
        return self._transaction()

    def close(self) -> None:
        """Nothing to release."""

"""Backups: one consistent JSON snapshot of a store, and its restore into an empty one.

``secfw store dump`` writes :func:`dump`'s document; ``secfw store restore FILE``
feeds it to :func:`restore`. The format is the store contract's own data (every
document by kind and id), so it does not depend on the kind of store: a dump of
SQLite restores into etcd and back (tests/test_store_backup.py).

Format (version 1)::

    {"format": "secfw-store-dump", "version": 1, "schema": 1,
     "revision": R,                  # the source store's revision, for the record
     "docs": {KIND: {ID: DOC, ...}, ...}}

A dump is one :meth:`~secfw.store.base.Store.load`: one consistent revision
(SQLite: one read transaction; etcd: every page read at one revision).
A restore is one write transaction where the store allows it (SQLite): the
target is either left empty or holds the whole dump. etcd caps the operations of
a transaction (``Store.max_write_docs``), so there it is written in batches, in
an order that makes every state in between allow *less* than the dump, never
more: the store-wide settings first, then everything that only describes
(networks, groups, rules, flavors, …), instances, and ports and floating IPs
last — a port an agent sees already has its groups and rules, and source groups
only grow as their members arrive. Each batch checks that the store holds exactly
what the batches before wrote (a concurrent writer is a ConflictError); a failed
batch leaves a partial store, which the error says. It refuses a store that
already holds a document: merging two clouds is not a restore. The revision
restarts at the target's (revisions belong to a store; agents that followed the
source must be pointed at the target and load it whole, which a smaller or
unknown revision makes them do).
"""

from __future__ import annotations

import json
from typing import Any

from secfw.errors import ConflictError, ValidationError
from secfw.store.base import SCHEMA_VERSION, Doc, Store

FORMAT = "secfw-store-dump"
VERSION = 1


def dump(store: Store) -> dict[str, Any]:
    """The whole store at one revision, as the version-1 dump document."""
    snapshot = store.load()
    docs = {kind: dict(sorted(by_id.items())) for kind, by_id in sorted(snapshot.docs.items())
            if by_id}
    return {"format": FORMAT, "version": VERSION, "schema": SCHEMA_VERSION,
            "revision": snapshot.revision, "docs": docs}


def dumps(store: Store) -> str:
    """:func:`dump` as canonical JSON text (sorted keys, one trailing newline)."""
    return json.dumps(dump(store), indent=1, sort_keys=True) + "\n"


def parse(text: str) -> dict[str, dict[str, Doc]]:
    """The documents of a dump's text; ValidationError when it is not a dump this
    version reads (wrong format, version or schema, or malformed documents)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValidationError(f"not a secfw store dump: invalid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValidationError("not a secfw store dump (no \"format\": \"secfw-store-dump\")")
    if data.get("version") != VERSION or data.get("schema") != SCHEMA_VERSION:
        raise ValidationError(
            f"store dump version {data.get('version')!r} schema {data.get('schema')!r}: "
            f"this secfw reads version {VERSION} schema {SCHEMA_VERSION}")
    docs = data.get("docs")
    if not isinstance(docs, dict) or not all(
            isinstance(kind, str) and isinstance(by_id, dict)
            and all(isinstance(i, str) and isinstance(d, dict) for i, d in by_id.items())
            for kind, by_id in docs.items()):
        raise ValidationError("store dump: \"docs\" must map kind -> id -> document")
    return docs


#: Written first: the store-wide settings.
FIRST_KINDS = ("setting",)
#: Written last, in this order: what makes agents enforce (module docstring).
LAST_KINDS = ("instance", "port", "floatingip")


def restore(store: Store, docs: dict[str, dict[str, Doc]]) -> int:
    """Write ``docs`` into the empty ``store``; the number of documents.

    In one transaction when ``store.max_write_docs`` allows, else in batches
    (module docstring). ConflictError, nothing written, when the store holds any
    document; ConflictError when another writer changes it between batches."""
    items = _restore_order(docs)
    size = store.max_write_docs or max(len(items), 1)
    for start in range(0, max(len(items), 1), size):
        _restore_batch(store, items[start:start + size], written=start, total=len(items))
    return len(items)


def _restore_order(docs: dict[str, dict[str, Doc]]) -> list[tuple[str, str, Doc]]:
    """Every ``(kind, id, doc)``: :data:`FIRST_KINDS`, the others by kind name,
    then :data:`LAST_KINDS`; by id within a kind."""
    def rank(kind: str) -> tuple[int, int, str]:
        if kind in FIRST_KINDS:
            return (0, FIRST_KINDS.index(kind), kind)
        if kind in LAST_KINDS:
            return (2, LAST_KINDS.index(kind), kind)
        return (1, 0, kind)
    return [(kind, doc_id, docs[kind][doc_id])
            for kind in sorted(docs, key=rank) for doc_id in sorted(docs[kind])]


def _restore_batch(store: Store, batch: list[tuple[str, str, Doc]], written: int,
                   total: int) -> None:
    """Put ``batch`` in one transaction, if the store holds exactly the ``written``
    documents of the batches before it."""
    with store.write() as txn:
        held = sum(len(by_id) for by_id in txn.snapshot.all_docs().values())
        if held != written:
            raise ConflictError(_changed(store, held, written, total))
        for kind, doc_id, doc in batch:
            txn.put(kind, doc_id, doc)


def _changed(store: Store, held: int, written: int, total: int) -> str:
    if not written:
        return (f"store {store.url} is not empty ({held} document(s)): a restore only "
                "goes into an empty store")
    return (f"store {store.url} changed during the restore ({held} document(s) where "
            f"{written} of {total} were written): it holds a partial restore; empty it "
            "and restore again")

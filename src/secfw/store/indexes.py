"""The store's derived indexes: what a write looks up by key instead of by kind.

Both stores keep, beside every document, the **entries** and **tallies** this
module derives from it, updated in the same transaction as the document
(SQLite: tables ``idx`` and ``tally``; etcd: keys ``PREFIX/idx/…`` and
``PREFIX/tally/…``). They are derived data: never dumped, rebuilt from the
documents when a store is opened by a version that indexes differently (or was
written by one that did not index), see :data:`INDEX_VERSION`.

An entry is ``(index, bucket, item)`` for one document: "this document is in
``bucket`` of ``index``", ``item`` ordering the bucket (the document's id, or
for addresses the address as fixed-width hex so a range of addresses is a
range of items). A tally is ``(name, bucket) -> {field: amount}`` summed over
every document (a project's instances, cores and RAM), what quotas compare.

An **allocation record** is kept per bucket of the ``ip`` index (one network's
IPv4 or IPv6 addresses; SQLite table ``alloc``, etcd keys ``PREFIX/alloc/…``):
the used addresses as sorted runs ``[[first, last], …]`` of integers. It is
derived from the ``ip`` entries like the rest, and is what a boot reads to find
the lowest free address: one key, whose size is the number of runs (one for
addresses handed out in order; a hole left by a deleted port splits a run),
not the number of ports. Every write that moves an address rewrites it, so a
writer that compares it (etcd) conflicts with every other allocation on the
network: two boots can never take one address.

Pure: documents in, tuples out; no I/O.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
from collections.abc import Iterable
from typing import Any

from secfw.model import DEFAULT_GROUP, tap_name

#: Bump when :func:`entries`, :func:`tallies` or the allocation records change:
#: stores rebuild on open (2: the allocation records were added).
INDEX_VERSION = 2

#: The index whose buckets have an allocation record.
ADDRESS_INDEX = "ip"
#: Used addresses as sorted, disjoint, non-adjacent ``[first, last]`` integer runs.
Runs = list[list[int]]

Entry = tuple[str, str, str]

#: The kind of document each index holds.
INDEX_KINDS = {
    "group-name": "secgroup", "rules-by-group": "rule", "rules-by-remote": "rule",
    "instances-by-group": "instance", "instance-name": "instance",
    "ports-by-instance": "port", "ports-by-network": "port", "mac": "port", "tap": "port",
    "ip": "port", "keypair-name": "keypair", "floating-by-port": "floatingip",
    "volumes-by-instance": "volume", "snapshots-by-volume": "volume_snapshot",
    "instance-order": "instance", "group-order": "secgroup", "network-order": "network",
    "port-order": "port",
}
#: The ordered indexes (the listings' pages): bucket -> items in listing order.
ORDER_INDEXES = ("instance-order", "group-order", "network-order", "port-order")
#: The bucket of an ordered index that holds every document of its kind.
EVERY = "*"
#: The kind of document each tally sums.
TALLY_KINDS = {"groups": "secgroup", "compute": "instance", "host": "instance"}

Tallies = dict[tuple[str, str], dict[str, int]]


def pair(first: str, second: str) -> str:
    """A bucket made of two names (a project and a name): JSON, so no name can
    be confused with another pair whatever characters it holds."""
    return json.dumps([first, second])


def address_bucket(network_id: str, version: int) -> str:
    """The ``ip`` bucket of a network's IPv4 or IPv6 addresses."""
    return f"{network_id}/{version}"


def address_item(address: str) -> str:
    """An address as a fixed-width hex item: items sort as the addresses do."""
    parsed = ipaddress.ip_address(address)
    return f"{int(parsed):0{8 if parsed.version == 4 else 32}x}"


def entries(kind: str, doc_id: str, doc: dict[str, Any] | None) -> set[Entry]:
    """The index entries of one document (none for None: a deleted document)."""
    if doc is None:
        return set()
    found: set[Entry] = set()
    for index, bucket, item in _raw_entries(kind, doc_id, doc):
        if bucket:
            found.add((index, bucket, item))
    return found


def _raw_entries(kind: str, doc_id: str, doc: dict[str, Any]) -> Iterable[Entry]:
    get = doc.get
    if kind == "secgroup":
        yield "group-name", pair(get("project", ""), get("name", "")), doc_id
        yield from _group_order(get("project", ""), get("name", ""))
    elif kind == "network":
        yield "network-order", EVERY, order_text(get("name", ""))
    elif kind == "rule":
        yield "rules-by-group", get("group_id") or "", doc_id
        yield "rules-by-remote", get("remote_group_id") or "", doc_id
    elif kind == "instance":
        for group_id in get("security_groups") or ():
            yield "instances-by-group", group_id, doc_id
        yield "instance-name", pair(get("project", ""), get("name", "")), doc_id
        yield from _instance_order(doc)
    elif kind == "port":
        yield from _port_entries(doc_id, doc)
    elif kind == "keypair":
        yield "keypair-name", pair(get("project", ""), get("name", "")), doc_id
    elif kind == "floatingip":
        yield "floating-by-port", get("port_id") or "", doc_id
    elif kind == "volume":
        yield "volumes-by-instance", get("attached_to") or "", doc_id
    elif kind == "volume_snapshot":
        yield "snapshots-by-volume", get("volume_id") or "", doc_id


def _port_entries(doc_id: str, doc: dict[str, Any]) -> Iterable[Entry]:
    network = doc.get("network_id") or ""
    yield "ports-by-instance", doc.get("instance_id") or "", doc_id
    yield "ports-by-network", network, doc_id
    yield "mac", doc.get("mac") or "", doc_id
    yield "tap", tap_name(doc_id), doc_id
    yield "port-order", EVERY, tap_name(doc_id)
    for address in (doc.get("ip"), doc.get("ip6")):
        if address:
            version = ipaddress.ip_address(address).version
            yield "ip", address_bucket(network, version), address_item(address)


def order_text(text: str) -> str:
    """A text as an ordered item: its UTF-8 bytes in hex, which sort as Python
    sorts the texts (code points) and are left alone by every key encoding
    (hex digits; etcd keys percent-encode items). Items join such fields with
    ".", below every hex digit, so a shorter field sorts first as in Python;
    the store appends the id after "/" (also below every hex digit)."""
    return text.encode().hex()


def server_bucket(project: str | None = None, host: str | None = None) -> str:
    """The ``instance-order`` bucket of a project's instances, a host's, or all."""
    if host is not None:
        return pair("host", host)
    return pair("project", project) if project is not None else EVERY


def group_bucket(project: str | None) -> str:
    """The ``group-order`` bucket of a project's groups (None: every project's)."""
    return pair("project", project) if project is not None else EVERY


def _instance_order(doc: dict[str, Any]) -> Iterable[Entry]:
    """``nova list``'s order, (created, name) then id: created as 20 digits."""
    item = f"{int(doc.get('created') or 0):020d}.{order_text(doc.get('name', ''))}"
    yield "instance-order", server_bucket(project=doc.get("project", "")), item
    yield "instance-order", EVERY, item
    if doc.get("host"):
        yield "instance-order", server_bucket(host=doc["host"]), item


def _group_order(project: str, name: str) -> Iterable[Entry]:
    """``secgroup-list``'s order: (project,) default first, then by name, then id."""
    named = ("0." if name == DEFAULT_GROUP else "1.") + order_text(name)
    yield "group-order", group_bucket(project), named
    yield "group-order", EVERY, f"{order_text(project)}.{named}"


def tallies(kind: str, doc: dict[str, Any] | None) -> Tallies:
    """What one document adds to the tallies (nothing for None)."""
    if doc is None:
        return {}
    if kind == "secgroup":
        return {("groups", doc.get("project", "")): {"count": 1}}
    if kind == "instance":
        found: Tallies = {("compute", doc.get("project", "")): {
            "instances": 1, "cores": int(doc.get("vcpus") or 0),
            "ram": int(doc.get("ram_mb") or 0)}}
        if doc.get("host") and doc.get("state", "ACTIVE") == "ACTIVE":
            found[("host", doc["host"])] = {
                "instances": 1, "vcpus": int(doc.get("vcpus") or 0),
                "ram_mb": int(doc.get("ram_mb") or 0), "disk_gb": int(doc.get("disk_gb") or 0)}
        return found
    return {}


def tally_delta(kind: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> Tallies:
    """``tallies(new) - tallies(old)``, without the fields that did not move."""
    delta: Tallies = {}
    for sign, doc in ((-1, old), (1, new)):
        for key, fields in tallies(kind, doc).items():
            bucket = delta.setdefault(key, {})
            for name, amount in fields.items():
                bucket[name] = bucket.get(name, 0) + sign * amount
    return {key: moved for key, fields in delta.items()
            if (moved := {name: amount for name, amount in fields.items() if amount})}


def add_tally(into: dict[str, int], delta: dict[str, int]) -> dict[str, int]:
    """``into + delta`` field by field, zero fields dropped (an empty dict: nothing)."""
    total = dict(into)
    for name, amount in delta.items():
        total[name] = total.get(name, 0) + amount
    return {name: amount for name, amount in total.items() if amount}


def index_docs(docs: dict[str, dict[str, dict[str, Any]]]
               ) -> tuple[list[tuple[str, str, str, str, str]], Tallies]:
    """Every entry ``(index, bucket, item, kind, id)`` and every tally of a whole
    store's documents (a rebuild, and the fallback of a snapshot that has no
    store-kept index)."""
    rows: list[tuple[str, str, str, str, str]] = []
    totals: Tallies = {}
    for kind, by_id in docs.items():
        for doc_id, doc in by_id.items():
            rows.extend((i, b, item, kind, doc_id) for i, b, item in entries(kind, doc_id, doc))
            for key, fields in tallies(kind, doc).items():
                totals[key] = add_tally(totals.get(key, {}), fields)
    return rows, {key: fields for key, fields in totals.items() if fields}


# ---------------------------------------------------------------------- allocation records


def item_number(item: str) -> int:
    """An ``ip`` item (fixed-width hex) as the address's integer."""
    return int(item, 16)


def runs_of(numbers: Iterable[int]) -> Runs:
    """The runs of a set of integers."""
    runs: Runs = []
    for number in sorted(set(numbers)):
        if runs and runs[-1][1] + 1 == number:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return runs


def _start(run: list[int]) -> int:
    return run[0]


def runs_contain(runs: Runs, number: int) -> bool:
    """Whether ``number`` is in one of ``runs``."""
    at = bisect.bisect_right(runs, number, key=_start) - 1
    return at >= 0 and runs[at][0] <= number <= runs[at][1]


def past_runs(runs: Runs, number: int) -> int:
    """The lowest integer ``>= number`` in none of ``runs`` (runs never touch,
    so the end of the run holding ``number`` plus one is free)."""
    at = bisect.bisect_right(runs, number, key=_start) - 1
    if at >= 0 and runs[at][0] <= number <= runs[at][1]:
        return runs[at][1] + 1
    return number


def move_runs(runs: Runs, removed: Iterable[int], added: Iterable[int]) -> Runs:
    """``runs`` without ``removed`` and with ``added``: each number costs a
    bisection and a splice (a list copy of the runs), never an expansion."""
    moved = [list(run) for run in runs]
    for number in removed:
        at = bisect.bisect_right(moved, number, key=_start) - 1
        if at < 0 or not moved[at][0] <= number <= moved[at][1]:
            continue
        first, last = moved[at]
        parts = [[first, number - 1]] if first < number else []
        parts += [[number + 1, last]] if number < last else []
        moved[at:at + 1] = parts
    for number in added:
        if runs_contain(moved, number):
            continue
        at = bisect.bisect_right(moved, number, key=_start)
        joins_left = at > 0 and moved[at - 1][1] + 1 == number
        joins_right = at < len(moved) and moved[at][0] - 1 == number
        if joins_left and joins_right:
            moved[at - 1:at + 1] = [[moved[at - 1][0], moved[at][1]]]
        elif joins_left:
            moved[at - 1][1] = number
        elif joins_right:
            moved[at][0] = number
        else:
            moved.insert(at, [number, number])
    return moved


AddressMoves = dict[str, tuple[set[int], set[int]]]


def address_moves(before: set[Entry], after: set[Entry], into: AddressMoves) -> None:
    """Add to ``into`` (``{bucket: (removed, added)}``) the addresses one
    document's entries free and take (``before``/``after``: its entries as
    stored and as written)."""
    for sign, moved in ((0, before - after), (1, after - before)):
        for index, bucket, item in moved:
            if index == ADDRESS_INDEX:
                into.setdefault(bucket, (set(), set()))[sign].add(item_number(item))


def allocations(rows: Iterable[tuple[str, str, str, str, str]]) -> dict[str, Runs]:
    """Every allocation record, from every entry (:func:`index_docs`'s rows)."""
    numbers: dict[str, list[int]] = {}
    for index, bucket, item, _, _ in rows:
        if index == ADDRESS_INDEX:
            numbers.setdefault(bucket, []).append(item_number(item))
    return {bucket: runs_of(found) for bucket, found in numbers.items()}

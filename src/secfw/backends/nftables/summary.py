"""What a transaction changes, in a few words, for logs and the agent's status.

The agent logs every non-empty sync and every drift repair with a summary of
its transaction: which chains are (re)written, which sets and maps change and
how many elements come and go — the names an operator looks for with
``nft list chain inet secfw NAME`` — rather than the commands themselves, which
can be megabytes for a big host.
"""

from __future__ import annotations

import re
from typing import Any

from secfw.backends.nftables.plan import Transaction
from secfw.backends.nftables.state import KernelState
from secfw.backends.nftables.syntax import FAMILIES, TABLE

# "<verb> <object> inet|arp secfw <name> …" — the form of every command plan() emits.
_COMMAND = re.compile(
    rf"(?P<verb>add|delete|flush) (?P<kind>chain|rule|set|map|element) "
    rf"(?:{'|'.join(FAMILIES)}) {TABLE} (?P<name>\S+)(?P<rest>.*)", re.DOTALL)


def summarize(tx: Transaction) -> dict[str, Any]:
    """A short description of ``tx``.

    ``{"replaced": True}`` for a full replacement (the whole table is written);
    otherwise ``replaced: False`` and, when not empty or zero: ``chains``
    (added, rewritten or deleted, sorted), ``sets`` (sets and maps added,
    deleted or with element changes, sorted), ``elements_added``,
    ``elements_deleted`` and ``rules`` (rules written). The command count is the
    transaction's ``count``.
    """
    if tx.full:
        return {"replaced": True}
    chains: set[str] = set()
    sets: set[str] = set()
    counts = {"add": 0, "delete": 0, "rules": 0}
    for command in tx.commands:
        match = _COMMAND.match(command)
        if match is None:
            continue
        verb, kind, name = match["verb"], match["kind"], match["name"]
        if kind in ("chain", "rule"):
            chains.add(name)
            counts["rules"] += kind == "rule"
        else:
            sets.add(name)
            if kind == "element":
                counts[verb] += _element_count_of(match["rest"])
    found: dict[str, Any] = {
        "chains": sorted(chains), "sets": sorted(sets), "elements_added": counts["add"],
        "elements_deleted": counts["delete"], "rules": counts["rules"]}
    return {"replaced": False, **{key: value for key, value in found.items() if value}}


def _element_count_of(body: str) -> int:
    """Elements in ``{ a, b, … }``: commas separate them and never occur inside one
    (interface names are checked, addresses and verdicts have none)."""
    inner = body.strip().removeprefix("{").removesuffix("}").strip()
    return inner.count(",") + 1 if inner else 0


def element_count(state: KernelState) -> int:
    """Elements in every set and map of ``state`` (counted without building a
    patched set's elements: state.SetState.size)."""
    return sum(s.size for s in state.sets.values())

"""The minimal nft transaction that turns the kernel's tables into the desired ones.

:func:`plan` compares a :class:`~.state.KernelState` (what the kernel holds, read
back or remembered from the last commit) with a rendered
:class:`~.render.Ruleset` and returns a :class:`Transaction`: one text batch that
``nft -f`` / libnftables applies atomically (nft(8): a batch is committed whole
or not at all). Commands name the table of each object (``inet secfw`` or
``arp secfw``); in this order::

    add chain X                    new chains (empty), so verdicts and jumps can name them
    add set|map X { …; elements }  new sets and maps, with their elements
    delete element S { … }         elements that went away (and map keys whose verdict changed)
    add element S { … }            elements that are new
    flush chain X, add rule X …    chains whose rules changed (the whole chain, in order);
                                   the rules of new chains
    flush chain X                  chains that went away: their rules first
    delete set|map X               sets that went away, once no rule uses them
    delete chain X                 chains that went away, once nothing refers to them

Removing a verdict-map element and deleting the chain it pointed to in the same
transaction works on this kernel (6.18, measured; docs/nftables.md), so chains are
deleted at once rather than flushed now and deleted on the next sync.

A set whose declaration (type, flags) or a chain whose hook changed cannot be
altered in place: the plan is then a full replacement, as when nothing is known
about the kernel (``current is None``) or when one of secfw's tables is missing.
A plan whose current state equals the desired one has no commands.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from secfw.backends.nftables.layout import is_safe_name
from secfw.backends.nftables.state import KernelState, ObjectKey, SetState
from secfw.backends.nftables.syntax import (
    FAMILIES,
    FAMILY,
    TABLE,
    Chain,
    Element,
    NamedSet,
    Ruleset,
    element_text,
    elements_text,
    hook_text,
    rule_text,
    set_declaration,
    table_header,
    table_text,
)

if TYPE_CHECKING:
    from secfw.backends.nftables.render import Delta

# What read-back elements must look like to be printed into a command: an
# interface name (IFNAMSIZ), a MAC, a canonical CIDR or a range, a 128-bit
# integer (an NA target) or a range of them.
_IFNAME = re.compile(r"[A-Za-z0-9_.:+@*-]{1,15}")
_ADDRESS = re.compile(r"[0-9A-Fa-f.:/-]{2,100}")
_INTEGER = re.compile(r"0x[0-9a-f]{32}(-0x[0-9a-f]{32})?")


_PATTERNS = {"ifname": _IFNAME, "integer": _INTEGER}


def _t(family: str) -> str:
    """``FAMILY secfw``: how commands name one of secfw's tables."""
    return f"{family} {TABLE}"


@dataclass(frozen=True)
class Transaction:
    """One atomic nft batch. ``full`` replaces secfw's tables.

    ``commands`` are nft commands in native syntax, one per item (a full
    replacement is, per table, ``add table``, ``delete table`` and the table block).
    """

    commands: tuple[str, ...]
    full: bool = False

    @property
    def text(self) -> str:
        """The batch as ``nft -f`` input ("" when there is nothing to do)."""
        return "".join(c + "\n" for c in self.commands)

    @property
    def count(self) -> int:
        """How many nft commands the batch holds."""
        return len(self.commands)

    @property
    def size(self) -> int:
        """Alias of :attr:`count` (the agent's ``Plan`` protocol)."""
        return len(self.commands)

    @property
    def empty(self) -> bool:
        """True when the kernel already holds the desired state."""
        return not self.commands


def full_transaction(desired: Ruleset) -> Transaction:
    """Replace secfw's tables whatever they hold (or create them): every table of
    :data:`FAMILIES` is added and deleted first — also one ``desired`` does not
    use, left from another topology — then ``desired``'s are written whole, in
    one batch."""
    headers = [line for f in FAMILIES for line in table_header(f).split("\n")]
    blocks = [table_text(desired, f) for f in desired.families()]
    return Transaction((*headers, *blocks), full=True)


def plan(
    current: KernelState | None, desired: Ruleset, want: KernelState | None = None,
    delta: Delta | None = None,
) -> Transaction:
    """The minimal transaction from ``current`` to ``desired`` (see the module doc).

    ``current is None`` means the tables are absent or unknown: full replacement.
    So is a table of ``desired`` that ``current`` lacks, or one ``current`` has
    that ``desired`` does not use (the host changed topology). ``want`` is
    ``KernelState.from_ruleset(desired)`` when the caller already has it.
    ``delta`` (:class:`.render.Delta`) may be given only when ``current`` is the
    state of the ruleset ``desired`` was rendered after: objects it does not list
    are then known to be unchanged, and only the listed ones are compared.
    """
    if current is None:
        return full_transaction(desired)
    want = want if want is not None else KernelState.from_ruleset(desired)
    scope = _Scope.of(current, want, desired, delta)
    if want.tables != current.tables or _declarations_changed(current, want, scope):
        return full_transaction(desired)
    try:
        return Transaction(tuple(_commands(current, want, scope)))
    except _Unprintable:
        return full_transaction(desired)


def _ruleset_order(key: ObjectKey) -> tuple[bool, str]:
    """Sort key of ``(family, name)`` in a Ruleset's order (inet first, then by name)."""
    return key[0] != FAMILY, key[1]


@dataclass(frozen=True)
class _Scope:
    """The sets and chains a plan compares: every one of either side, or only those
    of a delta; each list in a Ruleset's order."""

    sets: tuple[ObjectKey, ...]
    chains: tuple[ObjectKey, ...]
    set_objects: Mapping[ObjectKey, NamedSet]
    chain_objects: Mapping[ObjectKey, Chain]
    #: a delta's element changes (:attr:`.render.Delta.elements`)
    elements: Mapping[ObjectKey, tuple[frozenset[Element], frozenset[Element]]]

    @classmethod
    def of(cls, current: KernelState, want: KernelState, desired: Ruleset,
           delta: Delta | None) -> _Scope:
        if delta is not None:
            sets = {k: v for k, v in delta.sets.items() if v is not None}
            chains = {k: v for k, v in delta.chains.items() if v is not None}
            return cls(tuple(sorted(delta.sets, key=_ruleset_order)),
                       tuple(sorted(delta.chains, key=_ruleset_order)), sets, chains,
                       delta.elements)
        set_objects = {(s.family, s.name): s for s in desired.sets}
        chain_objects = {(c.family, c.name): c for c in desired.chains}
        return cls(
            tuple(sorted(set(current.sets) | set(want.sets), key=_ruleset_order)),
            tuple(sorted(set(current.chains) | set(want.chains), key=_ruleset_order)),
            set_objects, chain_objects, {})


class _Unprintable(Exception):
    """Something read back that secfw did not write and cannot name safely in nft
    syntax (a chain, set or interface name added by other means): the full
    replacement removes it without naming it."""


def _safe(text: str, pattern: re.Pattern[str]) -> str:
    if not pattern.fullmatch(text):
        raise _Unprintable(text)
    return text


def _safe_key(key: ObjectKey) -> ObjectKey:
    family, name = key
    if family not in FAMILIES or not is_safe_name(name):
        raise _Unprintable(name)
    return key


def _declarations_changed(current: KernelState, want: KernelState, scope: _Scope) -> bool:
    # ``is`` first: states rendered from the same objects are shared (StateCache).
    sets = any(
        (have := current.sets.get(key)) is not None and (need := want.sets.get(key)) is not None
        and have is not need and have.declaration != need.declaration
        for key in scope.sets
    )
    hooks = any(
        (was := current.chains.get(key)) is not None and (now := want.chains.get(key)) is not None
        and was is not now and was.hook != now.hook
        for key in scope.chains
    )
    return sets or hooks


def _commands(current: KernelState, want: KernelState, scope: _Scope) -> Iterator[str]:
    wanted_sets = [k for k in scope.sets if k in want.sets]
    wanted_chains = [k for k in scope.chains if k in want.chains]
    new_sets = [scope.set_objects[k] for k in wanted_sets if k not in current.sets]
    new_chains = [scope.chain_objects[k] for k in wanted_chains if k not in current.chains]
    changed = [
        scope.chain_objects[k] for k in wanted_chains
        if (have := current.chains.get(k)) is not None
        and (need := want.chains[k]) is not have and have.rules != need.rules
    ]
    gone_chains = sorted(_safe_key(k) for k in scope.chains
                         if k in current.chains and k not in want.chains)
    yield from (_add_chain(c) for c in new_chains)
    yield from (_add_set(s) for s in new_sets)
    kept = sorted(k for k in wanted_sets if k in current.sets)
    known = scope.elements
    yield from _element_changes(current, want, kept, "delete", known)
    yield from _element_changes(current, want, kept, "add", known)
    for chain in changed:
        yield f"flush chain {_t(chain.family)} {chain.name}"
    for chain in (*new_chains, *changed):
        yield from (f"add rule {_t(chain.family)} {chain.name} {rule_text(r)}"
                    for r in chain.rules)
    yield from (f"flush chain {_t(family)} {name}" for family, name in gone_chains)
    # Sets before chains: a slot map that goes away may still ``jump`` to a group
    # chain that goes away, and the kernel refuses to delete a chain a map element
    # names (EBUSY); flushed, no rule uses a set that goes away any more.
    gone_sets = sorted(_safe_key(k) for k in scope.sets if k in current.sets and k not in want.sets)
    for key in gone_sets:
        yield f"delete {'map' if current.sets[key].is_map else 'set'} {_t(key[0])} {key[1]}"
    yield from (f"delete chain {_t(family)} {name}" for family, name in gone_chains)


def _add_chain(chain: Chain) -> str:
    if chain.hook is None:
        return f"add chain {_t(chain.family)} {chain.name}"
    return f"add chain {_t(chain.family)} {chain.name} {{ {hook_text(chain.hook)} }}"


def _add_set(named: NamedSet) -> str:
    kind = "map" if named.is_map else "set"
    elements = f" elements = {{ {elements_text(named, named.elements)} }};"
    return (f"add {kind} {_t(named.family)} {named.name} {{ {set_declaration(named)}"
            f"{elements if named.elements else ''} }}")


def _element_changes(
    current: KernelState, want: KernelState, keys: Iterable[ObjectKey], verb: str,
    known: Mapping[ObjectKey, tuple[frozenset[Element], frozenset[Element]]],
) -> Iterator[str]:
    """``delete element`` (elements only in current) or ``add element`` (only in want),
    one command per set with all its elements (faster than one per element).
    ``known``: the elements each set lost and gained, from the renderer's delta
    (exactly these differences, without comparing the sets whole)."""
    for key in keys:
        have, need = current.sets[key], want.sets[key]
        if have is need:
            continue
        if key in known:
            elements = known[key][0 if verb == "delete" else 1]
        else:
            elements = have.elements - need.elements if verb == "delete" else (
                need.elements - have.elements)
        if elements:
            family, name = key
            yield (f"{verb} element {_t(family)} {name} "
                   f"{{ {_elements(have, verb, elements)} }}")


def _elements(named: SetState, verb: str, elements: Iterable[Element]) -> str:
    """Sorted element text; a map element is deleted by its key alone."""
    ordered = sorted(elements, key=lambda e: e.key)
    if verb == "delete":  # read back: only what was checked to be printable
        ordered = [Element(e.key) for e in ordered]
        for element in ordered:
            for value, key_type in zip(element.key, named.key_type, strict=True):
                _safe(value, _PATTERNS.get(key_type, _ADDRESS))
    interval = "interval" in named.flags
    return ", ".join(element_text(named.key_type, e, interval) for e in ordered)

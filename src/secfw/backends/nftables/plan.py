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

**Detached sets.** A first pass after the closed filter adds tens of thousands
of elements to sets the closed filter already has, empty (``spoof4``,
``arp_hosts``, ``ingress_ports``…): those sets are referenced by base-chain
rules, so their elements could only go into the last, verdict-changing batch
(:mod:`.stages`), where libnftables holds ~1.2 KB of heap per element it parses
(+76 MB at 10,000 ports, the agent's peak). With ``detach_from``,
:func:`plan` instead returns a :class:`Transaction` whose :attr:`~Transaction.detach`
commands, committed first and alone, take every rule that looks such a set up
out of its chain and delete the set: a rule whose lookup in an empty set
decides whether it acts never acts, so removing it changes no verdict
(:func:`_inert_without`). The rest of the plan is made from that *detached*
state, so the sets are created afresh, filled, while nothing refers to them —
preparatory work — and only the chains' rules come back in the last batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from secfw.backends.nftables.layout import is_safe_name
from secfw.backends.nftables.state import ChainState, KernelState, ObjectKey, SetState, rule_state
from secfw.backends.nftables.syntax import (
    FAMILIES,
    FAMILY,
    TABLE,
    Chain,
    Element,
    Match,
    NamedSet,
    Nat,
    Rule,
    Ruleset,
    SetCt,
    SetMeta,
    SetRef,
    Statement,
    VMap,
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

#: Elements that a plan must add to sets that are empty in the kernel before the
#: backend detaches them (module doc): ~5 MB of libnftables heap in the last
#: batch. Below it the detaching batch is not worth its round trip.
DETACH_ELEMENTS = 4096
#: Elements per command that creates or fills a new set (:func:`_add_set`).
SET_CHUNK = 8192


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
    #: Commands to commit first, in a batch of their own, when not empty: they
    #: detach the sets ``commands`` creates afresh (module doc), changing no
    #: verdict; ``commands`` are the plan from the state they leave.
    detach: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The batch as ``nft -f`` input ("" when there is nothing to do); with
        :attr:`detach`, its commands first (the executor sends them apart)."""
        return "".join(c + "\n" for c in (*self.detach, *self.commands))

    @property
    def count(self) -> int:
        """How many nft commands the batch holds."""
        return len(self.detach) + len(self.commands)

    @property
    def size(self) -> int:
        """Alias of :attr:`count` (the agent's ``Plan`` protocol)."""
        return self.count

    @property
    def empty(self) -> bool:
        """True when the kernel already holds the desired state."""
        return not self.commands and not self.detach


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
    delta: Delta | None = None, detach_from: int | None = None,
) -> Transaction:
    """The minimal transaction from ``current`` to ``desired`` (see the module doc).

    ``current is None`` means the tables are absent or unknown: full replacement.
    So is a table of ``desired`` that ``current`` lacks, or one ``current`` has
    that ``desired`` does not use (the host changed topology). ``want`` is
    ``KernelState.from_ruleset(desired)`` when the caller already has it.
    ``delta`` (:class:`.render.Delta`) may be given only when ``current`` is the
    state of the ruleset ``desired`` was rendered after: objects it does not list
    are then known to be unchanged, and only the listed ones are compared.
    ``detach_from``: detach the sets that are empty in ``current`` and that the
    plan fills, when it adds at least that many elements to them (module doc;
    never with a ``delta``).
    """
    if current is None:
        return full_transaction(desired)
    want = want if want is not None else KernelState.from_ruleset(desired)
    scope = _Scope.of(current, want, desired, delta)
    if want.tables != current.tables or _declarations_changed(current, want, scope):
        return full_transaction(desired)
    try:
        detached = None if delta is not None or detach_from is None else (
            _detach(current, want, scope, detach_from))
        if detached is not None:
            state, commands = detached
            return Transaction(tuple(_commands(state, want, scope)), detach=commands)
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
    for named in new_sets:
        yield from _add_set(named)
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


def _detach(current: KernelState, want: KernelState, scope: _Scope, least: int,
            ) -> tuple[KernelState, tuple[str, ...]] | None:
    """``(detached state, detaching commands)`` (module doc), or None when fewer
    than ``least`` elements would be added to sets empty in ``current``.

    Candidates are the sets empty in ``current`` that ``desired`` fills. A set is
    detached only when every chain of ``current`` whose rules look it up is a
    chain this plan leaves as it is (its rules equal the desired ones) and every
    such rule is inert while the set is empty (:func:`_inert_without`); the
    others keep today's order (elements added in the last batch)."""
    candidates = {key for key, named in scope.set_objects.items()
                  if named.elements and (have := current.sets.get(key)) is not None
                  and have.size == 0}
    if sum(len(scope.set_objects[k].elements) for k in candidates) < least:
        return None
    users = _set_users(current, candidates)
    while True:
        kept: dict[ObjectKey, tuple[Rule, ...]] = {}
        refused: set[ObjectKey] = set()
        for chain_key in sorted({c for s in candidates for c in users.get(s, ())}):
            family = chain_key[0]
            names = {name for fam, name in candidates if fam == family}
            found = _kept_rules(current, want, scope, chain_key, names)
            if found is None:  # a chain the plan changes: its sets stay attached
                refused |= {s for s in candidates if chain_key in users.get(s, ())}
                continue
            rules, blocking = found
            refused |= {(family, name) for name in blocking}
            kept[chain_key] = rules
        if not refused:
            break
        candidates -= refused
        if sum(len(scope.set_objects[k].elements) for k in candidates) < least:
            return None
    return _detached(current, candidates, kept)


def _set_users(current: KernelState, keys: set[ObjectKey]) -> dict[ObjectKey, set[ObjectKey]]:
    """Set key → the chains of ``current`` with a rule naming it (``@name`` in a
    rule's canonical expressions; a rule names sets of its own table)."""
    users: dict[ObjectKey, set[ObjectKey]] = {}
    for chain_key, chain in current.chains.items():
        family = chain_key[0]
        for rule in chain.rules:
            for name in _canon_refs(rule.expr):
                if (family, name) in keys:
                    users.setdefault((family, name), set()).add(chain_key)
    return users


def _canon_refs(value: object) -> Iterator[str]:
    """The set names (``@name`` strings) anywhere in a canonical expression."""
    if isinstance(value, str):
        if value.startswith("@"):
            yield value[1:]
    elif isinstance(value, tuple):
        for item in value:
            yield from _canon_refs(item)


def _kept_rules(current: KernelState, want: KernelState, scope: _Scope, key: ObjectKey,
                names: set[str]) -> tuple[tuple[Rule, ...], set[str]] | None:
    """``(kept, blocking)``: the desired rules of chain ``key`` that look up none
    of ``names``, and the names a rule uses without being inert while they are
    empty (a negated lookup, a lookup after a side effect), which cannot be
    detached; None when the plan changes the chain (or deletes it)."""
    desired = scope.chain_objects.get(key)
    have, need = current.chains[key], want.chains.get(key)
    if desired is None or need is None or need.rules != have.rules:
        return None
    kept: list[Rule] = []
    blocking: set[str] = set()
    for rule in desired.rules:
        used = names.intersection(_refs(rule.statements))
        if not used:
            kept.append(rule)
        elif not _inert_without(rule, names):
            blocking |= used
    return tuple(kept), blocking


def _refs(value: object) -> Iterator[str]:
    """The names of the named sets and maps a rendered value refers to."""
    if isinstance(value, SetRef):
        yield value.name
    elif isinstance(value, tuple):
        for item in value:
            yield from _refs(item)


def _inert_without(rule: Rule, names: set[str]) -> bool:
    """Whether ``rule`` does nothing to any packet while the sets ``names`` are
    empty: its statements up to its first lookup in one of them are matches (no
    side effect), and that lookup is one whose miss ends the rule — ``KEY @set``,
    ``KEY vmap @map``, or a ``map @m`` lookup in a ``meta``/``ct``/NAT statement
    (nft's lookup expression breaks the rule when the key is absent: the
    statements after it, its verdict included, never run). A negated lookup
    (``!= @set``) would match every packet: not inert."""
    for statement in rule.statements:
        if names.intersection(_refs(statement)):
            return _ends_on_a_miss(statement, names)
        if not isinstance(statement, Match):
            return False
    return False


def _ends_on_a_miss(statement: Statement, names: set[str]) -> bool:
    """Whether ``statement`` is a lookup in one of ``names`` that ends the rule
    when the key is not found (:func:`_inert_without`)."""
    if isinstance(statement, Match):
        return (statement.op == "==" and isinstance(statement.right, SetRef)
                and statement.right.name in names and not names.intersection(
                    _refs(statement.left)))
    if isinstance(statement, VMap):
        return isinstance(statement.data, SetRef) and statement.data.name in names
    lookup = (statement.value if isinstance(statement, SetMeta | SetCt)
              else statement.lookup if isinstance(statement, Nat) else None)
    return not isinstance(lookup, int) and lookup is not None and lookup.map.name in names


def _detached(current: KernelState, detach: set[ObjectKey],
              kept: Mapping[ObjectKey, tuple[Rule, ...]]) -> tuple[KernelState, tuple[str, ...]]:
    """``current`` without the sets ``detach`` and with chains ``kept`` holding only
    the given rules, and the commands that make it so (one atomic batch)."""
    commands: list[str] = []
    chains = dict(current.chains)
    for key, rules in sorted(kept.items()):
        family, name = key
        chains[key] = ChainState(current.chains[key].hook, tuple(rule_state(r) for r in rules))
        commands.append(f"flush chain {_t(family)} {name}")
        commands += [f"add rule {_t(family)} {name} {rule_text(r)}" for r in rules]
    for key in sorted(detach):
        kind = "map" if current.sets[key].is_map else "set"
        commands.append(f"delete {kind} {_t(key[0])} {key[1]}")
    sets = {key: named for key, named in current.sets.items() if key not in detach}
    return KernelState(sets=sets, chains=chains, tables=current.tables), tuple(commands)


def _add_chain(chain: Chain) -> str:
    if chain.hook is None:
        return f"add chain {_t(chain.family)} {chain.name}"
    return f"add chain {_t(chain.family)} {chain.name} {{ {hook_text(chain.hook)} }}"


def _add_set(named: NamedSet) -> Iterator[str]:
    """``add set|map`` with its first :data:`SET_CHUNK` elements, then, for a
    bigger set without ``interval`` (whose additions nft checks against the
    elements already there), ``add element`` commands of as many: :mod:`.stages`
    can then spread a big new set over several preparatory batches instead of
    one command of 100k elements (~120 MB of libnftables heap at 50k ports)."""
    kind = "map" if named.is_map else "set"
    # An interval set goes whole (an empty one too: range() needs a step > 0).
    chunk = max(len(named.elements), 1) if "interval" in named.flags else SET_CHUNK
    first = named.elements[:chunk]
    elements = f" elements = {{ {elements_text(named, first)} }};"
    yield (f"add {kind} {_t(named.family)} {named.name} {{ {set_declaration(named)}"
           f"{elements if first else ''} }}")
    for start in range(chunk, len(named.elements), chunk):
        part = named.elements[start:start + chunk]
        yield f"add element {_t(named.family)} {named.name} {{ {elements_text(named, part)} }}"


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

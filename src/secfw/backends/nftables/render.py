"""HostFilter IR → the ruleset of secfw's tables ``inet secfw`` and ``arp secfw``.
Pure: no I/O.

:func:`render` builds a :class:`~.syntax.Ruleset`, a plain structured description of
the tables (sets and maps with their elements, chains with their rules);
:func:`~.syntax.to_nft_text` and :func:`~.syntax.to_nft_json` print it as a file for
``nft -f`` or as the libnftables JSON equivalent. Layout (``docs/nftables.md`` and
``docs/protection.md`` say why)::

    map ingress_ports   tap → goto ingress-filter | accept (port security off)
    map egress_ports    tap → goto egress-open | goto egress-filter | accept (off)
    set <G>-ports       taps whose policy uses group chain G (one per GroupChain)
    set <N>-ports       taps whose policy names same-net set N
    set <S>             one per AddressSet (source groups, same-net sets): its CIDRs
    … + the port-protection sets and maps of :mod:`.protect`
    chain <G>           one per GroupChain: one rule per IRRule, each ends in accept
    chain ingress-filter   conntrack state, ND, one same-net accept per same-net
                           set (``oifname @<N>-ports ip saddr @<N>``), group
                           dispatch, drop
    chain egress-open      jump egress-guard, accept
    chain egress-filter    jump egress-guard, group dispatch, drop
    chain egress-guard / egress-protect               (:mod:`.protect`)
    chain forward-egress / forward-ingress / input-egress    the base chains
    table arp secfw     ARP anti-spoofing (:mod:`.protect`)

Port → group membership and every address a port may use are data (set
elements), so the rules stay fixed while ports come and go. Only identifiers
secfw generated (validated here), addresses re-printed from their parsed form and
integers reach the output: nothing a user typed can become nft syntax.

Every rule carries a comment that identifies its content (a digest of its text):
nft prints rules back differently from how they were written, so read-back
compares these identities instead of text (see :mod:`.state`).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import compress, count
from operator import attrgetter, is_not
from typing import Any, TypeVar

from secfw.backends.nftables import metadata, protect
from secfw.backends.nftables.floating import floating_part
from secfw.backends.nftables.layout import (
    ADDRESS_KEYWORD,
    ADDRESS_TYPE,
    CT_STATE,
    EGRESS_FILTER,
    EGRESS_GUARD,
    EGRESS_OPEN,
    EGRESS_PORTS,
    FIXED_CHAINS,
    FIXED_SETS,
    FORWARD_EGRESS,
    FORWARD_EGRESS_HOOK,
    FORWARD_INGRESS,
    FORWARD_INGRESS_BRIDGED_HOOK,
    FORWARD_INGRESS_HOOK,
    ICMP_KEYWORD,
    INGRESS_ADDRS,
    INGRESS_FILTER,
    INGRESS_PORTS,
    INPUT_EGRESS,
    INPUT_EGRESS_HOOK,
    NEW_NOT_SYN,
    PORT_PROTOCOLS,
    PORTS_SUFFIX,
    POSTROUTING_INGRESS,
    POSTROUTING_INGRESS_HOOK,
    SHARED_MARK,
    TAP_WILDCARD,
    PortIdentity,
    canonical_cidr,
    check_name,
    check_tap,
    is_host,
    is_safe_name,
    port_identity,
    ports_set_name,
    slot_map_name,
)
from secfw.backends.nftables.syntax import (
    ACCEPT,
    ADDRESS_TYPES,
    DROP,
    FAMILY,
    TABLE,
    Chain,
    Ct,
    Datum,
    Element,
    Hook,
    MapLookup,
    Match,
    Meta,
    NamedSet,
    Payload,
    Prefix,
    Rule,
    Ruleset,
    SetMeta,
    SetRef,
    Span,
    Statement,
    Symbol,
    Verdict,
    VMap,
    make_rule,
    rule_text,
    to_nft_json,
    to_nft_text,
)
from secfw.compiler.ir import (
    AddressSet,
    Family,
    GroupChain,
    HostFilter,
    IRRule,
    MetadataRedirect,
    PortPolicy,
)
from secfw.compiler.sources import address_owners
from secfw.errors import BackendError, UnsupportedError
from secfw.gcpause import collector_paused

__all__ = [
    "ADDRESS_TYPES",
    "EGRESS_FILTER",
    "EGRESS_PORTS",
    "FAMILY",
    "FIXED_CHAINS",
    "FIXED_SETS",
    "INGRESS_FILTER",
    "INGRESS_PORTS",
    "PORTS_SUFFIX",
    "TABLE",
    "Chain",
    "Delta",
    "Element",
    "Hook",
    "NamedSet",
    "Renderer",
    "Rule",
    "Ruleset",
    "Verdict",
    "canonical_cidr",
    "check_name",
    "check_tap",
    "is_safe_name",
    "make_rule",
    "render",
    "rule_text",
    "to_nft_json",
    "to_nft_text",
]

_RULE_ID = re.compile(r"[A-Za-z0-9-]+")


# --------------------------------------------------------------------------- #
# IR → Ruleset.
# --------------------------------------------------------------------------- #


def render(hf: HostFilter, topology: str = "routed") -> Ruleset:
    """The ruleset that enforces ``hf`` on a ``routed`` or ``bridged`` host
    (:class:`~.layout.PortIdentity`). Deterministic: equal input, equal ruleset.

    Raises BackendError when the IR is inconsistent (unknown chain or set, a name,
    tap or MAC that is not safe to print, duplicate names) and UnsupportedError
    when a rule asks for something this backend cannot express.
    """
    return Renderer(topology).render(hf)


_PortPart = tuple[list[NamedSet], list[Chain]]
_NAME_FAMILY = attrgetter("name", "family")
_NAME_DIRECTION = attrgetter("name", "direction")
#: A set or chain by ``(family, name)``.
Key = tuple[str, str]


@dataclass(frozen=True)
class Delta:
    """What a :class:`Renderer`'s ruleset changed relative to its previous one:
    every set and chain that may differ, by key, as it is now (None: gone). A key
    not listed holds the very same object in both rulesets.

    ``elements``: for some keys of ``sets`` (a set whose declaration did not
    change), exactly the elements it lost and those it gained (disjoint), so a
    planner and a state cache need not compare its elements whole."""

    sets: dict[Key, NamedSet | None]
    chains: dict[Key, Chain | None]
    elements: dict[Key, tuple[frozenset[Element], frozenset[Element]]] = field(
        default_factory=dict)


class Renderer:
    """:func:`render` for successive filters of one host, at the cost of what changed.

    It keeps the pieces of the last ruleset and reuses, as the same objects, the
    rendering of every :class:`~secfw.compiler.ir.AddressSet` and
    :class:`~secfw.compiler.ir.GroupChain` it sees again (by identity: the
    incremental compiler hands unchanged pieces over as the same objects) and of
    everything derived from the ports while the ports and the chains' names are
    unchanged; when only some ports changed, the port-derived sets are patched
    port by port (:func:`_patched_ports`) and an address set seen before element
    by element (:func:`_patched_address_set`), the delta then carrying the
    elements they lost and gained. The result always equals ``render(hf, topology)``; :attr:`delta`
    says what changed since the previous result (None after the first).
    """

    def __init__(self, topology: str = "routed") -> None:
        self.topology = topology
        self.delta: Delta | None = None
        self._port_key: tuple[tuple[PortPolicy, ...], object] | None = None
        self._port_part: _PortPart = ([], [])
        self._port_index: _PortIndex | None = None
        self._port_ids: _PortIds | None = None  # the ports of _port_key by id
        self._index_of: HostFilter | None = None  # what _index() indexes when asked
        self._set_signature: tuple[tuple[str, str], ...] = ()
        self._sets: dict[str, _SetEntry] = {}
        self._chains: dict[str, tuple[GroupChain, Chain]] = {}
        self._result: Ruleset | None = None
        self._positions: _Positions = ({}, {})
        self._nat_key: tuple[object, object] = ((), ())
        self._nat_part: _PortPart = ([], [])
        self._metadata: tuple[MetadataRedirect | None, _PortPart] = (None, ([], []))

    def render(self, hf: HostFilter) -> Ruleset:
        """The ruleset of ``hf`` (see :func:`render`)."""
        with collector_paused():
            return self._render(hf)

    def _render(self, hf: HostFilter) -> Ruleset:
        first = self._port_key is None
        delta = Delta({}, {})
        signature = tuple(map(_NAME_FAMILY, hf.sets))
        recheck = signature != self._set_signature  # cached chains were checked against others
        # Names checked under this signature need no second check (O(sets) regexes).
        address_sets = _index_sets(hf.sets) if recheck else {s.name: s for s in hf.sets}
        self._set_signature = signature
        port_sets, port_chains = self._ports(hf, delta)
        nat_sets, nat_chains = self._floating(hf, delta)
        md_sets, md_chains = self._metadata_part(hf, delta)
        sets = [*port_sets, *nat_sets, *md_sets, *self._address_sets(hf.sets, delta)]
        chains = [*self._group_chains(hf.chains, address_sets, delta, recheck), *port_chains,
                  *nat_chains, *md_chains]
        self.delta = None if first else delta
        if self._result is not None and _replaces_only(delta, self._positions):
            self._result = _replaced(self._result, delta, self._positions)
            return self._result
        _check_unique([s.name for s in sets], "set")
        _check_unique([c.name for c in chains], "chain")
        self._result = Ruleset(
            sets=tuple(sorted(sets, key=lambda s: (s.family != FAMILY, s.name))),
            chains=tuple(sorted(chains, key=lambda c: (c.family != FAMILY, c.name))),
        )
        self._positions = _positions(self._result)
        return self._result

    def _ports(self, hf: HostFilter, delta: Delta) -> _PortPart:
        """What the ports, the chains' names and directions and the sets' names
        and families determine."""
        server = None if hf.metadata is None else (hf.metadata.address, hf.metadata.port)
        key = (hf.ports, (tuple(map(_NAME_DIRECTION, hf.chains)), self._set_signature, server))
        if self._port_key is None or self._port_key[0] is not key[0] or self._port_key[1] != key[1]:
            patched, ids = None, _PortIds(hf.ports)
            if self._port_key is not None and self._port_key[1] == key[1]:
                patched = _patched_ports(self._index(), self._port_ids, ids, delta)
            if patched is None:
                old_sets, old_chains = self._port_part
                self._port_part = _port_part(hf, self.topology)
                self._port_index, self._index_of = None, hf
                _changed(delta.sets, old_sets, self._port_part[0])
                _changed(delta.chains, old_chains, self._port_part[1])
            else:
                self._port_part = (patched, self._port_part[1])
            self._port_key, self._port_ids = key, ids
        return self._port_part

    def _index(self) -> _PortIndex | None:
        """The index of the port part rendered whole last, built on the first port
        change after it (a one-shot full sync never pays for it)."""
        if self._port_index is None and self._index_of is not None:
            self._port_index = _PortIndex.of(self._index_of, self.topology, self._port_part[0])
            self._index_of = None
        return self._port_index

    def _floating(self, hf: HostFilter, delta: Delta) -> _PortPart:
        """The floating-IP NAT (:mod:`.floating`), rendered again only when the
        host's mappings or instance networks changed."""
        key = (hf.floating, hf.internal)
        if self._nat_key != key:
            old_sets, old_chains = self._nat_part
            self._nat_part = floating_part(hf)
            self._nat_key = key
            _changed(delta.sets, old_sets, self._nat_part[0])
            _changed(delta.chains, old_chains, self._nat_part[1])
        return self._nat_part

    def _metadata_part(self, hf: HostFilter, delta: Delta) -> _PortPart:
        """The metadata redirect's map and chains, rendered again only when the
        redirect changed (:mod:`.metadata`)."""
        old_md, old_part = self._metadata
        if old_md == hf.metadata and (old_part[0] or hf.metadata is None):
            return old_part
        part: _PortPart = ([], [])
        if hf.metadata is not None:
            ident = port_identity(self.topology, (p.tap for p in hf.ports))
            part = (metadata.metadata_sets(hf.metadata, ident),
                    metadata.metadata_chains(hf.metadata, ident))
        _changed(delta.sets, old_part[0], part[0])
        _changed(delta.chains, old_part[1], part[1])
        self._metadata = (hf.metadata, part)
        return part

    def _address_sets(self, address_sets: Iterable[AddressSet], delta: Delta) -> list[NamedSet]:
        """As :func:`_reuse`; a set rendered before under the same name is patched
        (:func:`_patched_address_set`): its delta lists the elements it changed."""
        fresh: dict[str, _SetEntry] = {}
        for piece in address_sets:
            hit = self._sets.get(piece.name)
            if hit is None or hit[0] is not piece:
                key = (FAMILY, piece.name)
                patched = None if hit is None else _patched_address_set(hit, piece)
                if patched is None:
                    hit = (piece, *_address_set(piece))
                else:
                    hit, delta.elements[key] = (piece, patched[0], patched[2]), patched[1]
                delta.sets[key] = hit[1]
            fresh[piece.name] = hit
        for gone in self._sets.keys() - fresh.keys():
            delta.sets[(FAMILY, gone)] = None
        self._sets = fresh
        return [entry[1] for entry in fresh.values()]

    def _group_chains(self, chains: Iterable[GroupChain], sets: dict[str, AddressSet],
                      delta: Delta, recheck: bool) -> list[Chain]:
        """A chain is checked against the sets it names when rendered, so every
        chain is rendered again when the sets' names or families changed
        (``recheck``)."""
        known = {} if recheck else self._chains
        self._chains, rendered = _reuse(known, chains, lambda c: _group_chain(c, sets),
                                        delta.chains, gone_from=self._chains)
        return rendered


_Piece = TypeVar("_Piece", AddressSet, GroupChain)
_Out = TypeVar("_Out", NamedSet, Chain)


def _reuse(
    cache: dict[str, tuple[_Piece, _Out]], pieces: Iterable[_Piece],
    render_piece: Callable[[_Piece], _Out], changed: dict[Key, Any],
    gone_from: dict[str, tuple[_Piece, _Out]] | None = None,
) -> tuple[dict[str, tuple[_Piece, _Out]], list[_Out]]:
    """Render each IR piece (by name) unless ``cache`` holds that very object;
    record in ``changed`` what was rendered anew and, as None, the names of
    ``gone_from`` (default ``cache``) no longer present. Returns the new cache
    and the renderings in ``pieces`` order."""
    fresh: dict[str, tuple[_Piece, _Out]] = {}
    for piece in pieces:
        hit = cache.get(piece.name)
        if hit is None or hit[0] is not piece:
            hit = (piece, render_piece(piece))
            changed[(FAMILY, piece.name)] = hit[1]
        fresh[piece.name] = hit
    for gone in (cache if gone_from is None else gone_from).keys() - fresh.keys():
        changed[(FAMILY, gone)] = None
    return fresh, [out for _, out in fresh.values()]


#: Where each set and each chain of a ruleset is, by key.
_Positions = tuple[dict[Key, int], dict[Key, int]]


def _positions(ruleset: Ruleset) -> _Positions:
    return ({(s.family, s.name): i for i, s in enumerate(ruleset.sets)},
            {(c.family, c.name): i for i, c in enumerate(ruleset.chains)})


def _replaces_only(delta: Delta, positions: _Positions) -> bool:
    """Whether ``delta`` only swaps objects for others of the same name: the names
    (checked unique before) and so the order stay as they were."""
    return (all(v is not None and k in positions[0] for k, v in delta.sets.items())
            and all(v is not None and k in positions[1] for k, v in delta.chains.items()))


def _replaced(ruleset: Ruleset, delta: Delta, positions: _Positions) -> Ruleset:
    """``ruleset`` with the objects of ``delta`` (:func:`_replaces_only`) in place:
    a membership change costs one set, not a sort of every set and chain."""
    sets, chains = list(ruleset.sets), list(ruleset.chains)
    for key, named in delta.sets.items():
        assert named is not None
        sets[positions[0][key]] = named
    for key, chain in delta.chains.items():
        assert chain is not None
        chains[positions[1][key]] = chain
    return Ruleset(tuple(sets), tuple(chains))


def _changed(found: dict[Key, Any], old: Iterable[NamedSet | Chain],
             new: Iterable[NamedSet | Chain]) -> None:
    """Record every object of ``new`` and every key of ``old`` gone from it."""
    fresh = {(o.family, o.name): o for o in new}
    found.update(fresh)
    found.update({(o.family, o.name): None for o in old if (o.family, o.name) not in fresh})


def _port_part(hf: HostFilter, topology: str) -> _PortPart:
    """The sets and chains that depend on the ports (and the chains' names), not on
    the group chains' rules or the address sets' elements."""
    ident = port_identity(topology, (p.tap for p in hf.ports))
    sets, widths, same_net = _port_sets(hf.ports, _index_chains(hf.chains),
                                        _index_sets(hf.sets), ident)
    chains = [
        _ingress_filter(widths["ingress"], sorted(same_net), ident),
        *_egress_chains(widths["egress"], ident),
        protect.egress_guard(ident),
        protect.egress_protect(ident),
        *_base_chains(ident, metadata.to_server_rule(hf.metadata, ident)),
        *protect.layer2_chains(ident),
    ]
    return sets, chains


#: Per direction, how many slots (the most group chains of a port).
_Widths = dict[str, int]


def _port_sets(ports: Sequence[PortPolicy], groups: dict[str, GroupChain],
               address_sets: dict[str, AddressSet], ident: PortIdentity
               ) -> tuple[list[NamedSet], _Widths, list[tuple[str, Family]]]:
    """The port-derived sets of ``ports``, the slot widths and the same-net sets
    they name. Applied to one port, it gives that port's elements of each set
    (what :func:`_patched_ports` adds or removes)."""
    slots = {d: _slot_maps(_port_chains(ports, groups, d), d, ident)
             for d in ("ingress", "egress")}
    interned = {p.tap: Element((ident.ingress(p.tap),)) for p in ports}
    same_net = _same_net_members(ports, address_sets)
    sets = [
        _ingress_map(ports, ident),
        _egress_map(ports, ident),
        *slots["ingress"], *slots["egress"],
        *(_ports_set(name, taps, interned, ident.key_type)
          for (name, _), taps in same_net.items()),
        *protect.spoof_sets(ports, ident),
        *protect.nd_sets(ports, ident),
        *protect.layer2_sets(ports, ident),
        *(_ingress_address_maps(ports, ident) if ident.topology == "bridged" else ()),
    ]
    return sets, {d: len(slots[d]) for d in slots}, list(same_net)


@dataclass
class _PortIndex:
    """What :func:`_patched_ports` needs of the last port part rendered whole: the
    chains and sets it was checked against, the slot widths and same-net sets in
    use (counted over the ports: the chains depend on them), and the port-derived
    sets by key. Routed hosts only: every port-derived element then starts with
    the port's tap, and every such set is sorted by that tap (bridged hosts key on
    marks, which a new tap may reassign, and share address maps across ports)."""

    groups: dict[str, GroupChain]
    address_sets: dict[str, AddressSet]
    ident: PortIdentity
    widths: dict[str, Counter[int]]
    same_net: Counter[tuple[str, Family]]
    sets: list[NamedSet]
    positions: dict[Key, int]

    @classmethod
    def of(cls, hf: HostFilter, topology: str, sets: list[NamedSet]) -> _PortIndex | None:
        """The index of ``sets``, the port part rendered whole from ``hf``.

        O(sets), not O(ports): the counts are read off the sets' sizes. A port
        with ``w`` distinct chains of a direction has one element in each of that
        direction's slots ``0 … w-1`` (:func:`_slot_maps`), so ``len(slot k)`` is
        the number of ports wider than ``k``; every port has one ``ingress_ports``
        element; a protected port naming same-net set ``N`` is one element of
        ``<N>-ports`` (:func:`_same_net_members`)."""
        if topology != "routed":
            return None
        positions = {(n.family, n.name): i for i, n in enumerate(sets)}
        address_sets = _index_sets(hf.sets)

        def size(name: str) -> int:
            at = positions.get((FAMILY, name))
            return 0 if at is None else len(sets[at].elements)

        widths: dict[str, Counter[int]] = {}
        for direction in ("ingress", "egress"):
            wider = [size(INGRESS_PORTS)]  # wider[k]: ports with more than k-1 chains
            while wider[-1] and (FAMILY, slot_map_name(direction, len(wider) - 1)) in positions:
                wider.append(size(slot_map_name(direction, len(wider) - 1)))
            wider.append(0)
            widths[direction] = Counter({w: wider[w] - wider[w + 1]
                                         for w in range(len(wider) - 1)})
        same_net = Counter({(name, piece.family): size(ports_set_name(name))
                            for name, piece in address_sets.items()})
        return cls(_index_chains(hf.chains), address_sets, port_identity(topology, ()), widths,
                   same_net, list(sets), positions)

    def holds(self, tap: str) -> bool:
        """Whether a port of the index has ``tap`` (every port has one
        ``ingress_ports`` element, keyed by its tap and sorted)."""
        elements = self.sets[self.positions[(FAMILY, INGRESS_PORTS)]].elements
        at = bisect_left(elements, tap, key=_tap_of)
        return at < len(elements) and elements[at].key[0] == tap


def _count(index: _PortIndex, widths: _Widths, same_net: Iterable[tuple[str, Family]],
           sign: int) -> None:
    for direction, width in widths.items():
        index.widths[direction][width] += sign
    for key in same_net:
        index.same_net[key] += sign


def _aggregates(index: _PortIndex) -> tuple[tuple[int, int], frozenset[tuple[str, Family]]]:
    """What the port part's chains and set names depend on: the slot widths and
    the same-net sets in use."""
    width = tuple(max((w for w, n in index.widths[d].items() if n > 0), default=0)
                  for d in ("ingress", "egress"))
    return (width[0], width[1]), frozenset(k for k, n in index.same_net.items() if n > 0)


_Fragment = tuple[dict[Key, tuple[Element, ...]], _Widths, list[tuple[str, Family]]]


def _fragment(port: PortPolicy, index: _PortIndex) -> _Fragment:
    """One port's elements of each port-derived set (by key; none when empty), its
    slot widths and the same-net sets it names."""
    sets, widths, same_net = _port_sets((port,), index.groups, index.address_sets, index.ident)
    return {(n.family, n.name): n.elements for n in sets if n.elements}, widths, same_net


#: Above this share of the host's ports changed at once, the port part is rendered
#: whole (cheaper than ~100 µs per changed port, twice).
_PATCH_SHARE = 4


class _PortIds:
    """A tuple of ports by ``id``, built when first asked (a one-shot full sync
    never asks): the next port change diffs against it without building it again.
    The tuple is kept, so no id is reused while the map is."""

    def __init__(self, ports: tuple[PortPolicy, ...]) -> None:
        self.ports = ports
        self._by_id: dict[int, PortPolicy] | None = None

    def by_id(self) -> dict[int, PortPolicy]:
        """``id(port) → port``; C-level (dict(zip(map(…))))."""
        if self._by_id is None:
            self._by_id = dict(zip(map(id, self.ports), self.ports, strict=True))
        return self._by_id


def _patched_ports(index: _PortIndex | None, previous: _PortIds | None, current: _PortIds,
                   delta: Delta) -> list[NamedSet] | None:
    """The port-derived sets of ``current`` from those of ``previous`` (``index``),
    at the cost of the ports that changed (found by :func:`_moved_ports`): each changed
    port's old elements are cut out of every set it was in and its new ones
    spliced in, and ``delta``
    records those sets with exactly the elements lost and gained. None when this
    cannot be done (no index, a tap twice, too many changes, or a change of what
    the chains depend on: slot widths, same-net sets in use): render whole.

    Equal to :func:`_port_part`'s sets by construction: each port's elements come
    from :func:`_port_sets` on that port alone, and each set is sorted by tap
    with one run per port (tests/test_incremental.py checks the equality)."""
    if index is None or previous is None:
        return None
    new_ports = current.ports
    moved = _moved_ports(previous, current)
    if moved is None:
        return None
    gone, come = moved
    old = {p.tap: p for p in gone}
    new = {p.tap: p for p in come}
    changed = [*old, *(t for t in new if t not in old)]
    arrived = [t for t in new if t not in old]
    if (len(changed) * _PATCH_SHARE > len(new_ports) + _PATCH_SHARE
            or len(new) != len(come)
            or any(index.holds(t) for t in arrived)):  # a tap twice: render reports it
        return None
    before = {t: _fragment(old[t], index) for t in changed if t in old}
    after = {t: _fragment(new[t], index) for t in changed if t in new}  # may raise: as render
    aggregates = _aggregates(index)
    for fragments, sign in ((before, -1), (after, 1)):
        for _, widths, same_net in fragments.values():
            _count(index, widths, same_net, sign)
    if _aggregates(index) != aggregates or not _splice_all(index, changed, before, after, delta):
        for fragments, sign in ((after, -1), (before, 1)):  # undo: render whole instead
            for _, widths, same_net in fragments.values():
                _count(index, widths, same_net, sign)
        return None
    return list(index.sets)


#: The most ports :func:`_identity_run` returns on either side before the
#: id maps are used instead.
_RUN_LIMIT = 64


def _moved_ports(previous: _PortIds, current: _PortIds
                 ) -> tuple[list[PortPolicy], list[PortPolicy]] | None:
    """The policies of ``previous`` not in ``current`` and those of ``current``
    not in ``previous``, by identity: the incremental compiler hands unchanged
    policies over as the same objects (both tuples are alive, so no id is
    reused between them). None when ``current`` holds one object twice.

    Usually the changes lie in one run of the sorted tuples (:func:`_identity_run`:
    a port added, removed or changed); otherwise by id maps (C-level, but a
    dict of every port per change)."""
    run = _identity_run(previous.ports, current.ports)
    if run is None:
        old_by_id, new_by_id = previous.by_id(), current.by_id()
        if len(new_by_id) != len(current.ports):
            return None
        return ([old_by_id[i] for i in old_by_id.keys() - new_by_id.keys()],
                [new_by_id[i] for i in new_by_id.keys() - old_by_id.keys()])
    was, now = run
    now_ids = set(map(id, now))
    if len(now_ids) != len(now):  # twice in the run: hidden by ``kept`` below
        return None
    kept = now_ids.intersection(map(id, was))  # moved within the run
    # A policy of the run also outside it (``previous`` held it once, there) is
    # an arrival whose tap the index holds: the caller renders whole.
    return [p for p in was if id(p) not in kept], [p for p in now if id(p) not in kept]


_T = TypeVar("_T")


def _identity_run(old: tuple[_T, ...], new: tuple[_T, ...]
                  ) -> tuple[tuple[_T, ...], tuple[_T, ...]] | None:
    """The items of ``old`` and of ``new`` between their longest common prefix
    and suffix of identical objects (``old`` and ``new`` are equal outside these
    runs, object for object); None when either run is longer than
    :data:`_RUN_LIMIT`. The scans run in C (``map(operator.is_not, …)``): no dict
    of every port, which cost ~9 % of a port added's pass at 10k (profiled)."""
    bounds = _run_bounds(old, new)
    if bounds is None:
        return None
    head, old_end, new_end = bounds
    return old[head:old_end], new[head:new_end]


def _run_bounds(old: Sequence[object], new: Sequence[object]) -> tuple[int, int, int] | None:
    """``(head, old_end, new_end)``: ``old[:head]`` and ``new[:head]`` hold the
    same objects, and so do ``old[old_end:]`` and ``new[new_end:]``; None when
    ``old[head:old_end]`` or ``new[head:new_end]`` is longer than :data:`_RUN_LIMIT`."""
    shortest = min(len(old), len(new))
    head = next(compress(count(), map(is_not, old, new)), shortest)
    tail = next(compress(count(), map(is_not, reversed(old), reversed(new))), shortest)
    tail = min(tail, shortest - head)
    old_end, new_end = len(old) - tail, len(new) - tail
    if max(old_end, new_end) - head > _RUN_LIMIT:
        return None
    return head, old_end, new_end


def _splice_all(index: _PortIndex, changed: list[str], before: dict[str, _Fragment],
                after: dict[str, _Fragment], delta: Delta) -> bool:
    """Replace each changed port's run of elements in every set it is (or was) in;
    False (nothing changed) when a set is unknown or an element not keyed by its tap."""
    work: dict[Key, list[Element]] = {}
    lost: dict[Key, set[Element]] = {}
    gained: dict[Key, set[Element]] = {}
    for tap in changed:
        was = before[tap][0] if tap in before else {}
        now = after[tap][0] if tap in after else {}
        for key in was.keys() | now.keys():
            old_run, new_run = was.get(key, ()), now.get(key, ())
            if old_run == new_run:
                continue
            if key not in index.positions or any(e.key[0] != tap for e in new_run):
                return False
            elements = work.get(key)
            if elements is None:
                elements = work[key] = list(index.sets[index.positions[key]].elements)
            low = bisect_left(elements, tap, key=_tap_of)
            elements[low:bisect_right(elements, tap, key=_tap_of)] = new_run
            lost.setdefault(key, set()).update(set(old_run) - set(new_run))
            gained.setdefault(key, set()).update(set(new_run) - set(old_run))
    for key, elements in work.items():
        position = index.positions[key]
        named = index.sets[position] = replace(index.sets[position], elements=tuple(elements))
        delta.sets[key] = named
        delta.elements[key] = (frozenset(lost[key]), frozenset(gained[key]))
    return True


def _tap_of(element: Element) -> str:
    return element.key[0]


def _index_chains(chains: Iterable[GroupChain]) -> dict[str, GroupChain]:
    index: dict[str, GroupChain] = {}
    for chain in chains:
        if check_name(chain.name) in index or chain.name in FIXED_CHAINS:
            raise BackendError(f"nftables: chain name {chain.name!r} is reserved or used twice")
        index[chain.name] = chain
    return index


def _index_sets(sets: Iterable[AddressSet]) -> dict[str, AddressSet]:
    index: dict[str, AddressSet] = {}
    for address_set in sets:
        if check_name(address_set.name) in index:
            raise BackendError(f"nftables: set name {address_set.name!r} is used twice")
        index[address_set.name] = address_set
    return index


def _check_unique(names: list[str], what: str) -> None:
    """Sets and maps share one namespace across both tables (a ``<G>-ports`` name
    must not be an AddressSet's), and so do chains."""
    dup = sorted(name for name, n in Counter(names).items() if n > 1)
    if dup:
        raise BackendError(f"nftables: {what} name {dup[0]!r} is used twice")


def _port_chains(ports: Iterable[PortPolicy], groups: dict[str, GroupChain],
                 direction: str) -> dict[str, tuple[str, ...]]:
    """Tap → the names of its group chains of ``direction``, sorted, without
    duplicates. BackendError for a tap used twice or an unknown chain."""
    found: dict[str, tuple[str, ...]] = {}
    for port in ports:
        if check_tap(port.tap) in found:
            raise BackendError(f"nftables: tap {port.tap!r} belongs to two ports")
        names = port.ingress_chains if direction == "ingress" else port.egress_chains
        for name in names:
            chain = groups.get(name)
            if chain is None or chain.direction != direction:
                raise BackendError(f"nftables: port {port.tap} uses unknown {direction} "
                                   f"chain {name!r}")
        found[port.tap] = tuple(sorted(set(names)))
    return found


def _slot_maps(chains: dict[str, tuple[str, ...]], direction: str,
               ident: PortIdentity) -> list[NamedSet]:
    """``<direction>_slot<i>``: port → ``jump`` its i-th group chain (sorted by name),
    for i below the most chains a port of the host has.

    A new flow then costs one verdict-map lookup per slot (≈ groups per port)
    instead of one ``@<G>-ports`` lookup per group chain of the *host* (~500 in the
    bench); membership stays data (elements), chains stay O(groups).
    """
    width = max((len(names) for names in chains.values()), default=0)
    key = ident.ingress if direction == "ingress" else ident.egress
    slots: list[list[Element]] = [[] for _ in range(width)]
    # Built in key order (taps sorted by their key once, not each map sorted), each
    # key and verdict made once: 200k elements at 10k ports, half the render's time.
    keyed = sorted(((key(tap),), names) for tap, names in chains.items())
    jumps = {name: _jump(name) for _, names in keyed for name in names}
    for element_key, names in keyed:
        for index, name in enumerate(names):
            slots[index].append(_element(element_key, jumps[name]))
    return [NamedSet(slot_map_name(direction, index), (ident.key_type,), (), tuple(elements),
                     is_map=True) for index, elements in enumerate(slots)]


_new_tuple = tuple.__new__


def _element(key: tuple[str, ...], verdict: Verdict) -> Element:
    """``Element(key, verdict)`` without the NamedTuple's Python-level ``__new__``
    (the same object: ``_make`` builds it this way too)."""
    return _new_tuple(Element, (key, verdict))


@lru_cache(maxsize=1 << 12)
def _jump(chain: str) -> Verdict:
    """One Verdict per chain, shared by its ~ports × slots elements."""
    return Verdict("jump", chain)


def _ingress_map(ports: Iterable[PortPolicy], ident: PortIdentity) -> NamedSet:
    """tap → goto ingress-filter, or accept when port security is off."""
    to_filter = Verdict("goto", INGRESS_FILTER)
    elements = tuple(Element((ident.ingress(p.tap),), to_filter if p.port_security else ACCEPT)
                     for p in sorted(ports, key=lambda p: p.tap))
    return NamedSet(INGRESS_PORTS, (ident.key_type,), (), _by_key(elements), is_map=True)


def _by_key(elements: Iterable[Element]) -> tuple[Element, ...]:
    """Elements sorted by key (marks sort otherwise than the taps they stand for)."""
    return tuple(sorted(elements, key=lambda e: e.key))


def _egress_map(ports: Iterable[PortPolicy], ident: PortIdentity) -> NamedSet:
    """tap → goto egress-open (no egress rule in its groups), goto egress-filter,
    or accept when port security is off (no anti-spoofing either)."""
    to_open, to_filter = Verdict("goto", EGRESS_OPEN), Verdict("goto", EGRESS_FILTER)

    def verdict(port: PortPolicy) -> Verdict:
        if not port.port_security:
            return ACCEPT
        return to_open if port.egress_open else to_filter

    elements = tuple(Element((ident.egress(p.tap),), verdict(p)) for p in ports)
    return NamedSet(EGRESS_PORTS, (ident.key_type,), (), _by_key(elements), is_map=True)


def _same_net_members(ports: Iterable[PortPolicy], sets: dict[str, AddressSet]
                      ) -> dict[tuple[str, Family], list[str]]:
    """(same-net set, its family) → sorted taps of the protected ports that name it.

    The port → network membership is data (a ``<N>-ports`` set per same-net set)
    and the network's addresses are the set ``<N>`` itself, as for a source group:
    a port of the network joining or leaving, here or on another host, is one
    element, and the rules stay one per network and family on this host. (A
    ``tap . address`` set would hold local ports × the network's ports.)"""
    members: dict[tuple[str, Family], list[str]] = {}
    for port in ports:
        if not port.port_security:
            continue
        for name in dict.fromkeys(port.same_net_sets):
            address_set = sets.get(name)
            if address_set is None:
                raise BackendError(f"nftables: port {port.tap} uses unknown same-net set "
                                   f"{name!r}")
            members.setdefault((name, address_set.family), []).append(port.tap)
    return {key: sorted(taps) for key, taps in members.items()}


def _ingress_address_maps(ports: Iterable[PortPolicy], ident: PortIdentity) -> list[NamedSet]:
    """Bridged hosts: ``ingress_addrs4``/``6``, every address a port has or may use
    → the port's ingress mark, an address several ports claim → :data:`SHARED_MARK`
    (:func:`~secfw.compiler.sources.address_owners`). Plain maps while every element
    is one address, interval maps once one is a network (as :func:`_address_set`)."""
    ports = list(ports)
    maps = []
    for family in ("ipv4", "ipv6"):
        try:
            owners = address_owners(ports, family)
        except ValueError as exc:
            raise BackendError(f"nftables: a port address is not a CIDR: {exc}") from exc
        elements = tuple(
            Element((canonical_cidr(cidr),),
                    Datum(str(SHARED_MARK) if tap is None else ident.ingress(tap)))
            for cidr, tap in owners.items())
        flags = () if all(is_host(c) for c in owners) else ("interval",)
        maps.append(NamedSet(INGRESS_ADDRS[family], (ADDRESS_TYPE[family],), flags,
                             elements, is_map=True, data_type="mark"))
    return maps


def _ports_set(chain: str, taps: list[str], interned: dict[str, Element],
               key_type: str) -> NamedSet:
    """``interned`` holds one Element per tap, shared by every set it is in: a port
    is in ~20 sets, and creating ~200k tuples would cost more than rendering them."""
    elements = tuple(interned[tap] for tap in taps)
    if key_type != "ifname":
        elements = _by_key(elements)
    return NamedSet(check_name(ports_set_name(chain)), (key_type,), (), elements)


def _address_set(address_set: AddressSet) -> tuple[NamedSet, _Texts | None]:
    """The set as the IR gives it: canonical, sorted, already merged (ir.AddressSet).

    Not re-merged here: the compiler keeps single hosts apart on purpose so that a
    member joining or leaving is one element added or removed.

    A plain hash set while every element is one address (a source group's members
    usually are), an interval set only once it holds a network (an allowed address
    pair's CIDR): libnftables 1.0.6 reads every interval set of the table back
    before it adds an element to one (measured at 10k ports: 45 ms per membership
    change, 0.7 ms with hash sets). A set changing kind is a declaration change,
    which the planner turns into a full replacement (rare).

    Also whether the IR's texts are the elements, one to one (distinct canonical
    addresses: ir.AddressSet's contract), which lets a later version be patched
    with string set operations (:func:`_patched_exact`)."""
    family = address_set.family
    cidrs = dict.fromkeys(canonical_cidr(c, family) for c in address_set.elements)
    elements = tuple(Element((c,)) for c in cidrs)
    flags = () if all(is_host(c) for c in cidrs) else ("interval",)
    named = NamedSet(address_set.name, (ADDRESS_TYPE[family],), flags, elements)
    return named, _Texts() if tuple(cidrs) == address_set.elements else None


@dataclass
class _Texts:
    """An address set whose IR texts are its elements one to one (distinct
    canonical host addresses: ir.AddressSet's contract): ``index`` maps each
    text to its element, built on the first patch and kept up to date."""

    index: dict[str, Element] | None = None


#: A rendered address set: its IR piece, its rendering, and whether the piece's
#: texts are its elements one to one (:func:`_address_set`).
_SetEntry = tuple[AddressSet, NamedSet, _Texts | None]
#: A patched address set: its rendering, the elements lost and gained, and the
#: same one-to-one marker.
_SetPatch = tuple[NamedSet, tuple[frozenset[Element], frozenset[Element]], _Texts | None]


def _patched_address_set(entry: _SetEntry, address_set: AddressSet) -> _SetPatch | None:
    """:func:`_address_set` of ``address_set`` from ``entry`` (an earlier version
    of it and its rendering), reusing its elements, with the elements lost and
    gained; None when the set is or becomes an interval set (render it whole).

    Equal to :func:`_address_set`. The common case costs C-level passes only
    (:func:`_patched_exact`); otherwise a known element is a canonical CIDR
    (canonical_cidr is idempotent), any other is made canonical and checked, and
    duplicates go as there: a same-net set of the bench's flat network holds
    15,000 addresses and changes by one."""
    _, previous, exact = entry
    family = address_set.family
    if previous.flags or previous.key_type != (ADDRESS_TYPE[family],):
        return None
    patched = _patched_exact(entry, address_set) if exact is not None else None
    if patched is not None:
        return patched
    known = {e.key[0]: e for e in previous.elements}
    elements: list[Element] = []
    for text in address_set.elements:
        element = known.get(text)
        if element is None:
            cidr = canonical_cidr(text, family)
            if not is_host(cidr):
                return None
            element = known.get(cidr) or Element((cidr,))
        elements.append(element)
    unique = tuple(dict.fromkeys(elements))
    now, before = frozenset(unique), frozenset(previous.elements)
    one_to_one = tuple(e.key[0] for e in unique) == address_set.elements
    return (replace(previous, elements=unique), (before - now, now - before),
            _Texts() if one_to_one else None)


def _patched_exact(entry: _SetEntry, address_set: AddressSet) -> _SetPatch | None:
    """The patch when ``entry``'s texts are its elements one to one: if the new
    texts are distinct and the added ones canonical host addresses, the texts'
    differences are the elements' differences, found with set operations on
    the strings (their hashes are cached) against the text index (kept from one
    version to the next). None otherwise."""
    was, previous, texts_of = entry
    assert texts_of is not None
    texts = address_set.elements
    if texts_of.index is not None:
        patched = _patched_run(entry, texts_of.index, address_set)
        if patched is not None:
            return patched
    now = set(texts)
    if len(now) != len(texts):
        return None
    known = texts_of.index
    if known is None:
        known = dict(zip(was.elements, previous.elements, strict=True))
    added = now.difference(known)
    if any(canonical_cidr(t, address_set.family) != t or not is_host(t) for t in added):
        return None
    fresh = {t: Element((t,)) for t in added}
    gone = known.keys() - now if len(known) + len(added) != len(now) else ()
    lost = frozenset(known.pop(t) for t in gone)  # nothing can fail from here on
    known.update(fresh)
    elements = tuple(map(known.__getitem__, texts))
    return (replace(previous, elements=elements), (lost, frozenset(fresh.values())),
            _Texts(known))


def _patched_run(entry: _SetEntry, known: dict[str, Element],
                 address_set: AddressSet) -> _SetPatch | None:
    """:func:`_patched_exact` when the new texts differ from the old ones in one
    short run (:func:`_run_bounds`; the compiler's same-net sets share their
    unchanged strings from one version to the next): only the run is looked
    at, so a port added to a network of 15,000 addresses costs the port. None
    when the texts differ elsewhere too or the run's new texts are not distinct
    canonical host addresses absent from the rest of the set.

    ``previous.elements[i]`` is ``Element((was.elements[i],))`` (the one-to-one
    marker), so the elements outside the run are kept as they are."""
    was, previous, _ = entry
    texts = address_set.elements
    bounds = _run_bounds(was.elements, texts)
    if bounds is None:
        return None
    head, old_end, new_end = bounds
    old_run, new_run = was.elements[head:old_end], texts[head:new_end]
    new_texts = set(new_run)
    if len(new_texts) != len(new_run):
        return None
    gone, added = set(old_run) - new_texts, new_texts - set(old_run)
    # An added text the index holds is one of the texts kept outside the run.
    if any(t in known or canonical_cidr(t, address_set.family) != t or not is_host(t)
           for t in added):
        return None
    lost = frozenset(known.pop(t) for t in gone)  # nothing can fail from here on
    fresh = {t: Element((t,)) for t in added}
    known.update(fresh)
    elements = (previous.elements[:head] + tuple(map(known.__getitem__, new_run))
                + previous.elements[old_end:])
    return (replace(previous, elements=elements), (lost, frozenset(fresh.values())),
            _Texts(known))


# --------------------------------------------------------------------------- #
# Chains.
# --------------------------------------------------------------------------- #


def _group_chain(chain: GroupChain, sets: dict[str, AddressSet]) -> Chain:
    rules = tuple(_group_rule(r, chain.direction == "ingress", sets) for r in chain.rules)
    return Chain(chain.name, None, rules)


def _group_rule(rule: IRRule, ingress: bool, sets: dict[str, AddressSet]) -> Rule:
    """One IR rule: its remote (source on ingress, destination on egress), its
    protocol and ports or ICMP type/code, then accept."""
    if not _RULE_ID.fullmatch(rule.rule_id):
        raise BackendError(f"nftables: {rule.rule_id!r} is not a valid rule id")
    statements = (*_remote(rule, ingress, sets), *_protocol(rule), ACCEPT)
    return make_rule(statements, audit=rule.rule_id[:8])


def _remote(rule: IRRule, ingress: bool, sets: dict[str, AddressSet]) -> list[Statement]:
    field = Payload(ADDRESS_KEYWORD[rule.family], "saddr" if ingress else "daddr")
    if rule.remote_cidr is not None and rule.remote_set is not None:
        raise UnsupportedError(f"nftables: rule {rule.rule_id} has two remotes")
    if rule.remote_set is not None:
        address_set = sets.get(rule.remote_set)
        if address_set is None or address_set.family != rule.family:
            raise BackendError(f"nftables: rule {rule.rule_id} uses unknown {rule.family} "
                               f"set {rule.remote_set!r}")
        return [Match(field, SetRef(rule.remote_set))]
    if rule.remote_cidr is not None:
        cidr = canonical_cidr(rule.remote_cidr, rule.family)
        if not cidr.endswith("/0"):
            return [Match(field, Prefix(cidr))]
    return [Match(Meta("nfproto"), Symbol(rule.family))]


def _protocol(rule: IRRule) -> list[Statement]:
    proto = rule.protocol
    if proto is None:
        if rule.ports is not None or rule.icmp is not None:
            raise UnsupportedError(f"nftables: rule {rule.rule_id} has ports but no protocol")
        return []
    if not 0 <= proto <= 255:
        raise UnsupportedError(f"nftables: rule {rule.rule_id}: no IP protocol {proto}")
    statements: list[Statement] = [Match(Meta("l4proto"), proto)]
    if rule.ports is not None and rule.icmp is not None:
        raise UnsupportedError(f"nftables: rule {rule.rule_id} has ports and ICMP type")
    if rule.ports is not None:
        statements.append(_ports(rule))
    if rule.icmp is not None:
        statements += _icmp(rule)
    return statements


def _ports(rule: IRRule) -> Statement:
    assert rule.ports is not None and rule.protocol is not None
    low, high = rule.ports.low, rule.ports.high
    if rule.protocol not in PORT_PROTOCOLS:
        raise UnsupportedError(f"nftables: rule {rule.rule_id}: protocol {rule.protocol} "
                               "has no ports")
    if not 0 <= low <= high <= 65535:
        raise UnsupportedError(f"nftables: rule {rule.rule_id}: bad port range {low}-{high}")
    return Match(Payload("th", "dport"), Span(low, high))


def _icmp(rule: IRRule) -> list[Statement]:
    assert rule.icmp is not None and rule.protocol is not None
    family, keyword = ICMP_KEYWORD.get(rule.protocol, (None, ""))
    if family != rule.family:
        raise UnsupportedError(f"nftables: rule {rule.rule_id}: ICMP type with protocol "
                               f"{rule.protocol} over {rule.family}")
    icmp = rule.icmp
    values = [("type", icmp.type)] + ([] if icmp.code is None else [("code", icmp.code)])
    if any(not 0 <= v <= 255 for _, v in values):
        raise UnsupportedError(f"nftables: rule {rule.rule_id}: bad ICMP type/code")
    return [Match(Payload(keyword, name), value) for name, value in values]


def _ingress_filter(slots: int, same_net: list[tuple[str, Family]],
                    ident: PortIdentity) -> Chain:
    """What reaches a protected port: replies, neighbour discovery, traffic from
    an address of its network's ports (``oifname @<N>-ports ip saddr @<N>
    accept``, one rule per same-net set), then every ingress group chain of the
    port (one verdict-map lookup per slot, :func:`_slot_maps`), then drop."""
    rules = [make_rule((CT_STATE,)), make_rule((NEW_NOT_SYN, DROP)),
             make_rule(protect.neighbour_discovery_in())]
    rules += [
        make_rule((Match(ident.ingress_key, SetRef(ports_set_name(name))),
                   Match(Payload(ADDRESS_KEYWORD[family], "saddr"), SetRef(name)), ACCEPT))
        for name, family in same_net
    ]
    rules += _dispatch(ident.ingress_key, "ingress", slots)
    rules.append(make_rule((DROP,)))
    return Chain(INGRESS_FILTER, None, tuple(rules))


def _egress_chains(slots: int, ident: PortIdentity) -> list[Chain]:
    """``egress-open`` and ``egress-filter``: both first ``jump`` to the guard
    (anti-spoofing, protections, conntrack state: it drops or accepts what it
    decides and returns the rest); then open egress accepts, restricted egress
    tries the port's egress group chains and drops."""
    guard = make_rule((Verdict("jump", EGRESS_GUARD),))
    dispatch = _dispatch(ident.egress_key, "egress", slots)
    return [
        Chain(EGRESS_OPEN, None, (guard, make_rule((ACCEPT,)))),
        Chain(EGRESS_FILTER, None, (guard, *dispatch, make_rule((DROP,)))),
    ]


def _dispatch(port_key: Meta, direction: str, slots: int) -> list[Rule]:
    """``oifname vmap @<direction>_slot<i>`` for each slot: the port's i-th group
    chain, by ``jump`` (not ``goto``): a group that does not accept returns here
    so the port's next group is tried; the groups' rules add up
    (docs/semantics.md). A port with fewer groups misses the last maps: no verdict,
    the next rule."""
    return [make_rule((VMap(port_key, SetRef(slot_map_name(direction, index))),))
            for index in range(slots)]


def _base_chains(ident: PortIdentity, to_server: list[Rule] | None = None) -> list[Chain]:
    """The hooked chains of ``inet secfw``.

    Routed: each first lets non-tap traffic go on untouched, so secfw never decides
    about the host's own traffic, then dispatches by tap; a tap secfw does not
    know is dropped (fail closed). Bridged: they dispatch by the mark the bridge
    table set (a frame without one of secfw's marks is not a tap's and passes);
    the bridge table already dropped frames of unknown taps. A packet that
    enters or leaves by a tap *as an IP interface* on a bridged host — a tap that
    is not a bridge port (not plugged yet, or a wrong topology) — is dropped:
    bridged frames carry the bridge's name here, never a tap's. ``forward-ingress``
    marks what is forwarded to an instance's address with that port's ingress mark,
    after ``forward-egress`` used the egress mark: a packet the host routes into a
    bridge is then filtered on its IP postrouting hook (layout.py,
    FORWARD_INGRESS_BRIDGED_HOOK); a bridged frame's mark is set again by ``to-tap``.
    ``to_server`` (the metadata redirect's rule, :mod:`.metadata`) comes first in
    ``input-egress``, after the routed host's non-tap accept.

    Established packets (most of them) leave the egress chains early, right after
    the anti-spoofing lookup, with the verdict the full walk would give
    (:func:`.protect.established_fast_path`; docs/nftables.md, "Established
    packets"). On the ingress side see :func:`_bridged_base_chains`; a routed
    host's ``forward-ingress`` keeps its dispatch first, so that a tap secfw does
    not know gets nothing, established or not.
    """
    fast = protect.established_fast_path(ident)
    if ident.topology == "bridged":
        return _bridged_base_chains(ident, fast, to_server or [])
    return [
        _base_chain(FORWARD_EGRESS, FORWARD_EGRESS_HOOK, "iifname", EGRESS_PORTS, fast),
        _base_chain(FORWARD_INGRESS, FORWARD_INGRESS_HOOK, "oifname", INGRESS_PORTS),
        _base_chain(INPUT_EGRESS, INPUT_EGRESS_HOOK, "iifname", EGRESS_PORTS,
                    [*(to_server or ()), *fast]),
    ]


#: ``ct state established accept``. On the ingress side this is the verdict
#: ``ingress-filter`` gives any established packet (its first rule), and the
#: sender was judged already: a tap's packet passed ``forward-egress`` (an earlier
#: hook or priority; its drops are final) with its anti-spoofing, anything else is
#: not a tap's and secfw does not anti-spoof it anywhere.
_ESTABLISHED_ACCEPT = make_rule((Match(Ct("state"), Symbol("established")), ACCEPT))


def _bridged_base_chains(ident: PortIdentity, fast: list[Rule],
                         to_server: list[Rule]) -> list[Chain]:
    """The bridged host's hooked chains (see :func:`_base_chains`).

    ``forward-ingress`` skips its two address lookups for an established packet:
    that mark only leads ``postrouting-ingress`` to ``ingress-filter``, which
    accepts an established packet first thing; without it the packet meets
    ``postrouting-ingress`` with no ingress mark and passes too.
    ``postrouting-ingress`` accepts an established packet after its two drops
    (a tap as an IP interface, the shared mark: both fail closed whatever the
    state) and before the dispatch.

    The egress chains first accept a packet with no mark that does not come from
    a tap seen as an IP interface: only the bridge table marks packets, and it
    marks every frame of a protected tap, so such a packet is not a protected
    port's (the router's, the uplink's, the host's own, a tap without port
    security) and the dispatch would find nothing for it — two comparisons
    instead of the established rules' lookup and the verdict map's, for all the
    traffic that enters the host's bridges from outside. The mark is tested
    before the interface name: loading a name copies it (measured: each
    ``iifname`` costs about as much as a set lookup here), and a protected
    tap's packets fail the mark test."""
    mark = Meta("mark")
    iif_drop = make_rule((Match(Meta("iifname"), TAP_WILDCARD), DROP))
    oif_drop = make_rule((Match(Meta("oifname"), TAP_WILDCARD), DROP))
    unmarked = make_rule((Match(mark, 0), Match(Meta("iifname"), TAP_WILDCARD, "!="), ACCEPT))
    egress = (unmarked, *fast, make_rule((VMap(mark, SetRef(EGRESS_PORTS)),)), iif_drop)
    return [
        Chain(FORWARD_EGRESS, FORWARD_EGRESS_HOOK, egress),
        Chain(FORWARD_INGRESS, FORWARD_INGRESS_BRIDGED_HOOK, (_ESTABLISHED_ACCEPT, *(
            make_rule((SetMeta("mark", MapLookup(Payload(ADDRESS_KEYWORD[family], "daddr"),
                                                 SetRef(INGRESS_ADDRS[family]))),))
            for family in ("ipv4", "ipv6")))),
        Chain(POSTROUTING_INGRESS, POSTROUTING_INGRESS_HOOK,
              (oif_drop, make_rule((Match(mark, SHARED_MARK), DROP)), _ESTABLISHED_ACCEPT,
               make_rule((VMap(mark, SetRef(INGRESS_PORTS)),)))),
        Chain(INPUT_EGRESS, INPUT_EGRESS_HOOK, (*to_server, *egress)),
    ]


def _base_chain(name: str, hook: Hook, ifname: str, port_map: str,
                first: list[Rule] | None = None) -> Chain:
    rules = (
        make_rule((Match(Meta(ifname), TAP_WILDCARD, "!="), ACCEPT)),
        *(first or ()),
        make_rule((VMap(Meta(ifname), SetRef(port_map)),)),
        make_rule((Match(Meta(ifname), TAP_WILDCARD), DROP)),
    )
    return Chain(name, hook, rules)

"""Flow spaces: remote addresses × protocol × selector, and the sweep that makes
minimal regions of allow rules.

A flow to (or from) one address of a port is a point (remote address, protocol,
selector). The *selector* is one integer in 0..65535: the destination port for
the port protocols (tcp, udp, sctp, udplite); ``type × 256 + code`` for ICMP in
IPv4 and ICMPv6 in IPv6 (so "type 8, any code" is the interval 2048..2303);
always 0..65535 for the other protocols, which have neither.

A :class:`Box` is a protocol interval × a selector interval (what one rule
covers); an :class:`Opener` is a box with the remote addresses it admits and the
rule (or other reason) behind it; a :class:`Constraint` is the other end of the
flow: the addresses of a port whose own filter lets only its boxes through.
:func:`sweep` splits the space at every box boundary, decides each elementary
cell (the union of the openers' addresses, minus the addresses of every
constraint that does not let the cell through, or as :class:`Special` says),
and merges neighbouring cells with equal addresses: the result is exact (a point
is in a region iff it is allowed) and has no two mergeable neighbours.
"""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import netaddr

from secfw.compiler.ir import Family, IRRule
from secfw.constants import ICMP_PROTOCOL
from secfw.constants import PORT_PROTOCOL_NUMBERS as PORT_PROTOCOL_NUMBERS

SEL_MAX = 65535
PROTO_MAX = 255
#: The ICMP protocol of each family: its selector is type × 256 + code.
ICMP_OF = ICMP_PROTOCOL
Label = dict[str, Any]


@dataclass(frozen=True, order=True)
class Box:
    """Protocols ``proto_lo..proto_hi`` × selectors ``sel_lo..sel_hi`` (inclusive)."""

    proto_lo: int
    proto_hi: int
    sel_lo: int = 0
    sel_hi: int = SEL_MAX

    def covers(self, other: Box) -> bool:
        return (self.proto_lo <= other.proto_lo and other.proto_hi <= self.proto_hi
                and self.sel_lo <= other.sel_lo and other.sel_hi <= self.sel_hi)

    def meets(self, other: Box) -> bool:
        return (self.proto_lo <= other.proto_hi and other.proto_lo <= self.proto_hi
                and self.sel_lo <= other.sel_hi and other.sel_lo <= self.sel_hi)

    def intersect(self, other: Box) -> Box | None:
        box = Box(max(self.proto_lo, other.proto_lo), min(self.proto_hi, other.proto_hi),
                  max(self.sel_lo, other.sel_lo), min(self.sel_hi, other.sel_hi))
        return box if box.proto_lo <= box.proto_hi and box.sel_lo <= box.sel_hi else None


ALL = Box(0, PROTO_MAX, 0, SEL_MAX)


def rule_box(rule: IRRule) -> Box:
    """The protocols × selectors an IR rule matches."""
    proto = rule.protocol
    if proto is None:
        return ALL
    if rule.ports is not None:
        return Box(proto, proto, rule.ports.low, rule.ports.high)
    if rule.icmp is not None:
        low = rule.icmp.type * 256
        if rule.icmp.code is None:
            return Box(proto, proto, low, low + 255)
        return Box(proto, proto, low + rule.icmp.code, low + rule.icmp.code)
    return Box(proto, proto)


def point_box(protocol: int, port: int | None, icmp_type: int | None,
              icmp_code: int | None, family: Family) -> Box:
    """The one-point box of a concrete flow."""
    if protocol in PORT_PROTOCOL_NUMBERS:
        sel = port or 0
    elif protocol == ICMP_OF[family]:
        sel = (icmp_type or 0) * 256 + (icmp_code or 0)
    else:
        return Box(protocol, protocol)
    return Box(protocol, protocol, sel, sel)


@dataclass
class Opener:
    """``box`` is allowed from (or to) ``addresses``, because of ``label``."""

    addresses: netaddr.IPSet
    box: Box
    label: Label


@dataclass
class Constraint:
    """The other end's own filter: flows of ``addresses`` pass only in ``boxes``."""

    addresses: netaddr.IPSet
    boxes: list[Box]


@dataclass(frozen=True)
class CellPolicy:
    """How a cell no rule alone decides is decided: ``primary`` replaces the
    openers' addresses (None: the openers decide) with ``label``; ``constraints``
    False ignores the other end's filter; ``block`` is subtracted whatever the
    constraints say (the other end's ports that may never send or receive it)."""

    primary: netaddr.IPSet | None = None
    label: Label | None = None
    constraints: bool = True
    block: netaddr.IPSet | None = None


@dataclass
class Special:
    """Cells of protocol ``protocol`` that conntrack or the protection rules decide
    (not the rules alone): ``decide(selector)`` gives their :class:`CellPolicy`, or
    None where the rules decide as usual."""

    protocol: int
    breakpoints: Sequence[int]
    decide: Callable[[int], CellPolicy | None]


@dataclass
class Region:
    """Remote ``addresses`` × ``box``, allowed; ``labels`` say which rules (or
    reasons) open it."""

    family: Family
    addresses: netaddr.IPSet
    box: Box
    labels: list[Label] = field(default_factory=list)


class Spans:
    """A set of addresses of one IP version as integer intervals: sorted,
    disjoint, non-touching, inclusive ``(first, last)`` pairs. Immutable.

    The whole-cloud audits' stand-in for :class:`netaddr.IPSet` (the operations a
    sweep needs: union, difference, intersection, emptiness, equality, CIDRs):
    a union is one sort and one pass over the intervals, where an IPSet union
    merges CIDR objects (the sweeps' main cost). ``iter_cidrs`` gives the CIDRs
    :meth:`netaddr.IPSet.iter_cidrs` gives for the same addresses (the unique
    decomposition into maximal aligned blocks, ascending)."""

    __slots__ = ("spans", "version")

    def __init__(self, version: int, spans: Sequence[tuple[int, int]] = ()) -> None:
        self.version = version
        self.spans: tuple[tuple[int, int], ...] = tuple(spans)

    @classmethod
    def of(cls, addresses: netaddr.IPSet, version: int) -> Spans:
        """The same addresses as ``addresses`` (all of IP ``version``)."""
        return cls(version, [(r.first, r.last) for r in addresses.iter_ipranges()])

    @classmethod
    def of_cidrs(cls, version: int, cidrs: Iterable[str]) -> Spans:
        """The addresses of CIDRs (``a/n``; a bare address is one address), all
        of IP ``version``, parsed with :func:`socket.inet_pton` (the audits read
        every address set of a big cloud: :mod:`ipaddress` is many times slower)."""
        family, width = (socket.AF_INET, 32) if version == 4 else (socket.AF_INET6, 128)
        pairs = []
        for cidr in cidrs:
            address, _, length = cidr.partition("/")
            first = int.from_bytes(socket.inet_pton(family, address), "big")
            size = 1 << (width - (int(length) if length else width))
            first &= ~(size - 1)  # as strict=False: the network's first address
            pairs.append((first, first + size - 1))
        return cls.merged(version, pairs)

    @classmethod
    def merged(cls, version: int, pairs: Iterable[tuple[int, int]]) -> Spans:
        """The union of inclusive intervals given in any order."""
        found: list[tuple[int, int]] = []
        for first, last in sorted(pairs):
            if found and first <= found[-1][1] + 1:
                if last > found[-1][1]:
                    found[-1] = (found[-1][0], last)
            else:
                found.append((first, last))
        return cls(version, found)

    def __bool__(self) -> bool:
        return bool(self.spans)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Spans) and self.spans == other.spans and (
            not self.spans or self.version == other.version)

    def __hash__(self) -> int:
        return hash(self.spans)

    def __or__(self, other: Spans) -> Spans:
        return Spans.merged(self.version, [*self.spans, *other.spans])

    def __and__(self, other: Spans) -> Spans:
        found, i, j = [], 0, 0
        mine, theirs = self.spans, other.spans
        while i < len(mine) and j < len(theirs):
            first = max(mine[i][0], theirs[j][0])
            last = min(mine[i][1], theirs[j][1])
            if first <= last:
                found.append((first, last))
            if mine[i][1] < theirs[j][1]:
                i += 1
            else:
                j += 1
        return Spans(self.version, found)

    def __sub__(self, other: Spans) -> Spans:
        found: list[tuple[int, int]] = []
        theirs, j = other.spans, 0
        for first, last in self.spans:
            while j < len(theirs) and theirs[j][1] < first:
                j += 1
            k = j
            while k < len(theirs) and theirs[k][0] <= last:
                if theirs[k][0] > first:
                    found.append((first, theirs[k][0] - 1))
                first = max(first, theirs[k][1] + 1)
                k += 1
            if first <= last:
                found.append((first, last))
        return Spans(self.version, found)

    def iter_cidrs(self, longest: int | None = None) -> list[netaddr.IPNetwork]:
        """The CIDRs (module docstring), only those at most ``longest`` long if given."""
        width = 32 if self.version == 4 else 128
        found = []
        for first, last in self.spans:
            while first <= last:
                size = (first & -first) if first else 1 << width
                while size > last - first + 1:
                    size >>= 1
                prefix = width - size.bit_length() + 1
                if longest is None or prefix <= longest:
                    found.append(netaddr.IPNetwork((first, prefix), version=self.version))
                first += size
        return found


class UnionCache:
    """Unions of address sets shared by several sweeps (one audit run over many
    ports). The ports of a cloud name the same few hundred sets (a source group's
    set, a rule's CIDR, a network's same-net set), so the same unions recur from
    port to port, and an IPSet union (a CIDR merge) is a sweep's main cost.

    Keyed by the sets' identities; the cache keeps the sets alive, so an id is
    never reused while it is a key. Contract: the sets given must not be mutated
    while the cache is in use (the audits never mutate a set once built)."""

    def __init__(self) -> None:
        self._found: dict[tuple[int, ...], tuple[list[netaddr.IPSet], netaddr.IPSet]] = {}

    def union(self, sets: Sequence[netaddr.IPSet]) -> netaddr.IPSet:
        """The union of ``sets`` (as :func:`union`), computed once per distinct
        collection of set objects."""
        distinct = list({id(s): s for s in sets}.values())
        if len(distinct) == 1:
            return distinct[0]
        key = tuple(sorted(id(s) for s in distinct))
        found = self._found.get(key)
        if found is None:
            found = self._found[key] = (distinct, union(distinct))
        return found[1]


def sweep(family: Family, openers: Sequence[Opener], constraints: Sequence[Constraint] = (),
          specials: Sequence[Special] = (), cache: UnionCache | None = None) -> list[Region]:
    """The exact allowed space as minimal regions (see the module docstring).
    ``cache``: unions shared with other sweeps of the same run (same answer)."""
    constraints = _merged(constraints)
    unite = cache.union if cache is not None else union
    boxes = [o.box for o in openers] + [b for c in constraints for b in c.boxes]
    by_proto = {s.protocol: s for s in specials}
    single = {b.proto_lo for b in boxes if b.proto_lo == b.proto_hi} | set(by_proto)
    regions: list[Region] = []
    memo: dict[tuple[Any, ...], tuple[netaddr.IPSet, list[Label], CellPolicy]] = {}
    for piece in _protocol_pieces(single):
        cells = _cells(piece, boxes, by_proto.get(piece[0]) if piece[0] == piece[1] else None)
        # only the openers of this piece's protocols can cover its cells (same
        # indices, same order: the memo keys and labels do not change)
        relevant = [i for i, o in enumerate(openers)
                    if o.box.proto_lo <= piece[1] and piece[0] <= o.box.proto_hi]
        merged: list[Region] = []
        for cell, active in zip(cells, _active(openers, relevant, cells), strict=True):
            region = _decide(family, cell, openers, constraints,
                             by_proto.get(cell.proto_lo) if piece[0] == piece[1] else None,
                             memo, unite, active)
            if merged and _mergeable(merged[-1], region, by_proto):
                merged[-1] = _merge(merged[-1], region)
            else:
                merged.append(region)
        for region in (piece for whole in merged for piece in _one_type_each(whole, by_proto)):
            if regions and _full(regions[-1]) and _full(region) and \
                    regions[-1].box.proto_hi + 1 == region.box.proto_lo and \
                    (regions[-1].addresses is region.addresses
                     or regions[-1].addresses == region.addresses):
                regions[-1] = _merge(regions[-1], region)
            else:
                regions.append(region)
    return [r for r in regions if r.addresses]


def sweep_window(family: Family, openers: Sequence[Opener], protocol: int, low: int,
                 high: int, special: Special | None = None,
                 cache: UnionCache | None = None, distinct: bool = False) -> list[Region]:
    """The cells of protocol ``protocol`` × selectors ``low..high`` decided and
    merged as :func:`sweep` (no constraints) decides and merges them, empty ones
    included. ``distinct``: the caller vouches that two of the labels (the
    openers' and the special's) are equal only when they are one object, so a
    merge drops repeats by identity, not by content (the same labels, faster).

    Contract: when ``low`` and ``high + 1`` are cuts of the whole sweep (a box
    edge, or 0 / 65536) and ``special`` is the sweep's special of ``protocol``
    (or there is none), these are exactly the whole sweep's regions inside the
    window, except where a region of the whole sweep continues past an edge: the
    caller must know that the cells just outside hold other addresses (exposure:
    a broad region never meets a cell that only the all-protocol openers cover)."""
    unite = cache.union if cache is not None else union
    cuts = {low, high + 1}
    for opener in openers:
        box = opener.box
        if box.proto_lo <= protocol <= box.proto_hi:
            cuts.update(c for c in (box.sel_lo, box.sel_hi + 1) if low < c <= high)
    if special is not None:
        cuts.update(c for c in special.breakpoints if low < c <= high)
    cells = [Box(protocol, protocol, a, b - 1) for a, b in itertools.pairwise(sorted(cuts))]
    relevant = [i for i, o in enumerate(openers)
                if o.box.proto_lo <= protocol <= o.box.proto_hi]
    by_proto = {special.protocol: special} if special is not None else {}
    memo: dict[tuple[Any, ...], tuple[netaddr.IPSet, list[Label], CellPolicy]] = {}
    merged: list[Region] = []
    for cell, active in zip(cells, _active(openers, relevant, cells), strict=True):
        region = _decide(family, cell, openers, (), special, memo, unite, active)
        if merged and _mergeable(merged[-1], region, by_proto):
            merged[-1] = _merge(merged[-1], region, distinct)
        else:
            merged.append(region)
    # as sweep: a region spanning ICMP types is cut where its row could not say it
    return [piece for whole in merged for piece in _one_type_each(whole, by_proto)]


def adds_nothing(ours: Sequence[Opener], others: Sequence[Opener],
                 cache: UnionCache | None = None) -> bool:
    """Whether ``ours`` allow no point that ``others`` do not: what comparing
    ``sweep(others)`` with ``sweep([*others, *ours])`` says (no constraints, no
    specials: a sweep is exact, and its regions — maximal runs of equal
    addresses — depend only on the points allowed), without sweeping.

    Each of ``ours`` adds points only inside its box: the box is cut at every
    edge of the other boxes that meet it (each other box then covers a cell
    whole or not at all), and each cell must hold the opener's addresses in the
    union of the others' covering it. ``cache``: unions shared with other
    calls of the same run."""
    unite = cache.union if cache is not None else union
    for mine in ours:
        box = mine.box
        if not mine.addresses:
            continue
        near = [o for o in others if o.addresses and o.box.meets(box)]
        protos, sels = {box.proto_lo, box.proto_hi + 1}, {box.sel_lo, box.sel_hi + 1}
        for other in (o.box for o in near):
            if box.proto_lo < other.proto_lo:
                protos.add(other.proto_lo)
            if other.proto_hi < box.proto_hi:
                protos.add(other.proto_hi + 1)
            if box.sel_lo < other.sel_lo:
                sels.add(other.sel_lo)
            if other.sel_hi < box.sel_hi:
                sels.add(other.sel_hi + 1)
        selectors = list(itertools.pairwise(sorted(sels)))
        for p_lo, p_end in itertools.pairwise(sorted(protos)):
            for s_lo, s_end in selectors:
                cover = [o.addresses for o in near
                         if o.box.proto_lo <= p_lo and p_end <= o.box.proto_hi + 1
                         and o.box.sel_lo <= s_lo and s_end <= o.box.sel_hi + 1]
                if not cover or mine.addresses - unite(cover):
                    return False
    return True


def merge_protocols(regions: Sequence[Region]) -> list[Region]:
    """``regions`` (in protocol, then selector order) with neighbouring protocols'
    whole-selector regions of equal addresses merged, as :func:`sweep` does."""
    found: list[Region] = []
    for region in regions:
        if found and _full(found[-1]) and _full(region) and \
                found[-1].box.proto_hi + 1 == region.box.proto_lo and \
                (found[-1].addresses is region.addresses
                 or found[-1].addresses == region.addresses):
            found[-1] = _merge(found[-1], region)
        else:
            found.append(region)
    return found


def _active(openers: Sequence[Opener], relevant: list[int],
            cells: list[Box]) -> list[list[int]]:
    """For each cell (in selector order), the indices among ``relevant`` of the
    openers whose selector interval holds the cell's first selector, ascending: a
    superset of the openers covering the cell (:func:`_decide` still checks
    :meth:`Box.covers`), found with one pass instead of every opener per cell."""
    pending = sorted(relevant, key=lambda i: openers[i].box.sel_lo, reverse=True)
    active: list[int] = []
    found = []
    for cell in cells:
        while pending and openers[pending[-1]].box.sel_lo <= cell.sel_lo:
            active.append(pending.pop())
        active = [i for i in active if openers[i].box.sel_hi >= cell.sel_lo]
        found.append(sorted(active))
    return found


def _merged(constraints: Sequence[Constraint]) -> list[Constraint]:
    """One constraint per distinct list of boxes (their addresses united): the
    ports of a big cloud share few distinct filters towards one address."""
    by_boxes: dict[tuple[Box, ...], list[netaddr.IPSet]] = {}
    for constraint in constraints:
        by_boxes.setdefault(tuple(sorted(set(constraint.boxes))), []).append(
            constraint.addresses)
    return [Constraint(union(sets), list(boxes)) for boxes, sets in by_boxes.items()]


def union(sets: Sequence[netaddr.IPSet]) -> netaddr.IPSet:
    """The union of ``sets`` in one merge (not one set operation per set); of
    :class:`Spans` when they are."""
    if len(sets) == 1:
        return sets[0]
    if isinstance(sets[0], Spans):
        return Spans.merged(sets[0].version, [p for found in sets for p in found.spans])
    return netaddr.IPSet(cidr for found in sets for cidr in found.iter_cidrs())


def _protocol_pieces(single: set[int]) -> list[tuple[int, int]]:
    """0..255 cut into the singletons ``single`` and the intervals between them."""
    pieces, start = [], 0
    for proto in sorted(single):
        if start < proto:
            pieces.append((start, proto - 1))
        pieces.append((proto, proto))
        start = proto + 1
    if start <= PROTO_MAX:
        pieces.append((start, PROTO_MAX))
    return pieces


def _cells(piece: tuple[int, int], boxes: Sequence[Box], special: Special | None) -> list[Box]:
    """The elementary boxes of one protocol piece."""
    lo, hi = piece
    cuts = {0, SEL_MAX + 1}
    if lo == hi:
        for box in boxes:
            if box.proto_lo <= lo <= box.proto_hi:
                cuts.update((box.sel_lo, box.sel_hi + 1))
        if special is not None:
            cuts.update(special.breakpoints)
    ordered = sorted(c for c in cuts if 0 <= c <= SEL_MAX + 1)
    return [Box(lo, hi, a, b - 1) for a, b in itertools.pairwise(ordered)]


def _decide(family: Family, cell: Box, openers: Sequence[Opener],
            constraints: Sequence[Constraint], special: Special | None,
            memo: dict[tuple[Any, ...], tuple[netaddr.IPSet, list[Label], CellPolicy]],
            unite: Callable[[Sequence[netaddr.IPSet]], netaddr.IPSet] = union,
            relevant: Sequence[int] | None = None) -> Region:
    """The region of one cell. Memoised per sweep by what decides it (the covering
    openers, the closing constraints, the cell policy): neighbouring cells of a big
    policy mostly share them, and IPSet unions are the sweep's cost."""
    policy = special.decide(cell.sel_lo) if special is not None else None
    policy = policy or _NO_POLICY
    indices = range(len(openers)) if relevant is None else relevant
    covering = tuple(i for i in indices if openers[i].box.covers(cell))
    closed = tuple(i for i, c in enumerate(constraints)
                   if not any(b.covers(cell) for b in c.boxes)) if policy.constraints else ()
    # id(policy) is unique only while the policy lives: the memo keeps it alive
    # (decide() may build a new CellPolicy per cell; a freed one's id is reused)
    key = (covering, closed, id(policy))
    found = memo.get(key)
    if found is None:
        found = (*_cell_space(openers, constraints, policy, covering, closed, unite), policy)
        memo[key] = found
    addresses, labels, _ = found
    return Region(family, addresses, cell, list(labels))


_NO_POLICY = CellPolicy()
#: The empty set of an uncovered cell (shared: never mutated).
_EMPTY = netaddr.IPSet()


def _cell_space(openers: Sequence[Opener], constraints: Sequence[Constraint],
                policy: CellPolicy, covering: tuple[int, ...],
                closed: tuple[int, ...],
                unite: Callable[[Sequence[netaddr.IPSet]], netaddr.IPSet] = union
                ) -> tuple[netaddr.IPSet, list[Label]]:
    if policy.primary is not None:
        addresses = policy.primary
    else:
        addresses = unite([openers[i].addresses for i in covering] or [_EMPTY])
    reduced = False
    if addresses and closed:
        addresses = addresses - unite([constraints[i].addresses for i in closed])
        reduced = True
    if addresses and policy.block:
        addresses = addresses - policy.block
        reduced = True
    if policy.primary is not None:
        labels = [policy.label] if policy.label and addresses else []
    elif not addresses:
        labels = []
    elif not reduced:  # every covering opener with addresses contributed
        labels = [openers[i].label for i in covering if openers[i].addresses]
    else:
        labels = [openers[i].label for i in covering if openers[i].addresses & addresses]
    return addresses, labels


def _mergeable(left: Region, right: Region, specials: dict[int, Special]) -> bool:
    """Neighbouring cells of one protocol with the same addresses; ICMP cells only
    within one type (a region names one ICMP type)."""
    if left.box.sel_hi + 1 != right.box.sel_lo or (
            left.addresses is not right.addresses and left.addresses != right.addresses):
        return False
    icmp = left.box.proto_lo in ICMP_OF.values() and left.box.proto_lo in specials
    return not icmp or left.box.sel_lo // 256 == right.box.sel_hi // 256


def _one_type_each(region: Region, specials: dict[int, Special]) -> list[Region]:
    """``region`` cut where it spans ICMP types, so that its row can say exactly
    what it holds: a partial first type (its codes), the whole types between
    (every code), a partial last type. A cell spans types where neither a rule
    nor the :class:`Special` cuts them — e.g. the invalid types a port without
    port security takes from unfiltered senders (at most three pieces: one per
    type would make hundreds of rows)."""
    box = region.box
    first, last = box.sel_lo // 256, box.sel_hi // 256
    if first == last or box.proto_lo != box.proto_hi or box.proto_lo not in specials \
            or box.proto_lo not in ICMP_OF.values():
        return [region]
    cuts = [box.sel_lo]
    if box.sel_lo % 256:
        cuts.append((first + 1) * 256)
    if box.sel_hi % 256 != 255:
        cuts.append(last * 256)
    bounds = [*sorted(set(cuts)), box.sel_hi + 1]
    return [Region(region.family, region.addresses, Box(box.proto_lo, box.proto_hi, lo, hi - 1),
                   list(region.labels))
            for lo, hi in itertools.pairwise(bounds) if lo < hi]


def _merge(left: Region, right: Region, distinct: bool = False) -> Region:
    """The two regions as one; ``distinct``: labels are equal only when they are
    one object (see :func:`sweep_window`)."""
    box = Box(min(left.box.proto_lo, right.box.proto_lo), max(left.box.proto_hi,
              right.box.proto_hi), min(left.box.sel_lo, right.box.sel_lo),
              max(left.box.sel_hi, right.box.sel_hi))
    labels = [*left.labels, *right.labels]
    if distinct:
        labels = list({id(label): label for label in labels}.values())
    else:
        labels = unique_labels(labels)
    return Region(left.family, left.addresses, box, labels)


def _full(region: Region) -> bool:
    return region.box.sel_lo == 0 and region.box.sel_hi == SEL_MAX


def label_key(label: Label) -> str:
    """What makes two labels the same label (their content)."""
    return json.dumps(label, sort_keys=True)


def unique_labels(labels: Sequence[Label]) -> list[Label]:
    """``labels`` without repeats, in first-seen order."""
    seen: set[str] = set()
    found = []
    for label in labels:
        key = label_key(label)
        if key not in seen:
            seen.add(key)
            found.append(label)
    return found


def restrict(regions: Sequence[Region], box: Box, addresses: netaddr.IPSet | None,
             openers: Sequence[Opener]) -> list[Region]:
    """The parts of ``regions`` inside ``box`` and ``addresses`` (None: any), their
    labels recomputed from ``openers`` for the smaller regions."""
    found = []
    for region in regions:
        inner = region.box.intersect(box)
        if inner is None:
            continue
        kept = region.addresses if addresses is None else region.addresses & addresses
        if not kept:
            continue
        labels = [lab for lab in region.labels
                  if any(o.label == lab and o.box.meets(inner) and o.addresses & kept
                         for o in openers)] or region.labels
        found.append(Region(region.family, kept, inner, labels))
    return found


def contains(regions: Sequence[Region], address: str, box: Box) -> bool:
    """Whether the point (``address``, one-point ``box``) lies in a region."""
    addr = netaddr.IPAddress(address)
    return any(r.box.covers(box) and addr in r.addresses for r in regions)


def difference(family: Family, minuend: Sequence[Region], subtrahend: Sequence[Region],
               openers: Sequence[Opener] = ()) -> list[Region]:
    """The points of ``minuend`` not in ``subtrahend``, as minimal regions (what
    ``secfw audit impact`` reports), labelled by the ``openers`` (those of
    ``minuend``'s answer) that meet them, else by ``minuend``'s labels.

    A sweep: each region of ``minuend`` is an opener; each region of
    ``subtrahend`` a constraint whose addresses pass only *outside* its box (the
    box's complement: at most four boxes), so a cell inside it loses them. ICMP
    regions stay within one type, as reach's do."""
    pieces = [Opener(r.addresses, r.box, label)
              for r in minuend for label in (r.labels or [{}])]
    constraints = [Constraint(r.addresses, _complement(r.box)) for r in subtrahend]
    icmp = [Special(ICMP_OF[family], [], lambda _sel: None)]
    regions = sweep(family, pieces, constraints, icmp)
    for region in regions:
        meeting = [o.label for o in openers
                   if o.box.meets(region.box) and o.addresses & region.addresses]
        region.labels = unique_labels(meeting) or [lab for lab in region.labels if lab]
    return regions


def _complement(box: Box) -> list[Box]:
    """Boxes that together cover exactly the points of :data:`ALL` outside ``box``."""
    found = []
    if box.proto_lo > 0:
        found.append(Box(0, box.proto_lo - 1))
    if box.proto_hi < PROTO_MAX:
        found.append(Box(box.proto_hi + 1, PROTO_MAX))
    if box.sel_lo > 0:
        found.append(Box(box.proto_lo, box.proto_hi, 0, box.sel_lo - 1))
    if box.sel_hi < SEL_MAX:
        found.append(Box(box.proto_lo, box.proto_hi, box.sel_hi + 1, SEL_MAX))
    return found

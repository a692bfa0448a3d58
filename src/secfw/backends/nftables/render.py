"""HostFilter IR → the ruleset of secfw's table ``inet secfw``. Pure: no I/O.

:func:`render` builds a :class:`Ruleset`, a plain structured description of the
table (sets and maps with their elements, chains with their rules);
:func:`to_nft_text` and :func:`to_nft_json` print it as a file for ``nft -f`` or as
the libnftables JSON equivalent. Layout (``docs/nftables.md`` says why)::

    map ingress_ports   tap → goto ingress-filter
    map egress_ports    tap → accept | goto egress-filter | drop
    set same_net4/6     tap . network        (only when a port has same-net networks)
    set <G>-ports       taps whose policy uses group chain G (one per GroupChain)
    set <S>             one per AddressSet: its CIDRs
    chain <G>           one per GroupChain: one rule per IRRule, each ends in accept
    chain ingress-filter / egress-filter    same-net accept, group dispatch, drop
    chain forward-egress / forward-ingress / input-egress    the base chains

Port → group membership is data (set elements), so the rules stay fixed while
ports come and go. Only identifiers secfw generated (validated here), addresses
re-printed from their parsed form and integers reach the output: nothing a user
typed can become nft syntax.

Every rule carries a comment that identifies its content (a digest of its text):
nft prints rules back differently from how they were written, so read-back
compares these identities instead of text (see :mod:`.state`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

from secfw.compiler.ir import AddressSet, Family, GroupChain, HostFilter, IRRule, PortPolicy
from secfw.errors import BackendError, UnsupportedError
from secfw.model import TAP_PREFIX

FAMILY = "inet"
TABLE = "secfw"

INGRESS_PORTS = "ingress_ports"
EGRESS_PORTS = "egress_ports"
SAME_NET = {"ipv4": "same_net4", "ipv6": "same_net6"}
INGRESS_FILTER = "ingress-filter"
EGRESS_FILTER = "egress-filter"
FORWARD_EGRESS = "forward-egress"
FORWARD_INGRESS = "forward-ingress"
INPUT_EGRESS = "input-egress"
PORTS_SUFFIX = "-ports"

FIXED_SETS = frozenset({INGRESS_PORTS, EGRESS_PORTS, *SAME_NET.values()})
FIXED_CHAINS = frozenset(
    {INGRESS_FILTER, EGRESS_FILTER, FORWARD_EGRESS, FORWARD_INGRESS, INPUT_EGRESS}
)

#: Set key types whose elements are addresses (interval sets of CIDRs).
ADDRESS_TYPES = {"ipv4_addr": "ipv4", "ipv6_addr": "ipv6"}
ADDRESS_TYPE: dict[Family, str] = {"ipv4": "ipv4_addr", "ipv6": "ipv6_addr"}
ADDRESS_KEYWORD: dict[Family, str] = {"ipv4": "ip", "ipv6": "ip6"}
ICMP_KEYWORD: dict[int, tuple[Family, str]] = {1: ("ipv4", "icmp"), 58: ("ipv6", "icmpv6")}
#: Protocols whose header starts with 16-bit source and destination ports, so the
#: transport-header match ``th dport`` applies (nft(8), "RAW PAYLOAD EXPRESSION").
PORT_PROTOCOLS = frozenset({6, 17, 132, 136})

# nft's scanner reads an identifier as ``letter (letter|digit|/|-|_|.)*`` and does
# not accept quoted names for chains and sets (nft 1.0.6); a bare word could be a
# keyword (``tcp``, ``filter``), so secfw's names must also contain a '-' or '.'.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*[-.][A-Za-z0-9_.-]*")
_MAX_NAME = 200  # well below NFT_NAME_MAXLEN (256), leaves room for "-ports"
# A tap is an interface name: IFNAMSIZ is 16 bytes with the NUL.
_TAP = re.compile(re.escape(TAP_PREFIX) + r"[A-Za-z0-9_.-]{1,12}")
_RULE_ID = re.compile(r"[A-Za-z0-9-]+")
_IPV4_HOST = re.compile(
    r"((?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d))(?:/32)?"
)


# --------------------------------------------------------------------------- #
# The structured ruleset: expressions, statements, rules, chains, sets.
# --------------------------------------------------------------------------- #


class Meta(NamedTuple):
    """``meta KEY`` (``iifname``/``oifname`` print without the ``meta``)."""

    key: str


class Payload(NamedTuple):
    """A header field: ``ip saddr``, ``th dport``, ``icmp type``."""

    protocol: str
    field: str


class Ct(NamedTuple):
    """A conntrack key: ``ct state``."""

    key: str


class Concat(NamedTuple):
    """Concatenated keys: ``oifname . ip saddr``."""

    parts: tuple[Meta | Payload, ...]


Key = Meta | Payload | Ct | Concat


class Symbol(NamedTuple):
    """A constant nft knows by name (``ipv4``, ``established``): printed bare."""

    name: str


class Quoted(NamedTuple):
    """A string constant (an interface name or ``tap*`` wildcard): printed quoted."""

    text: str


class Prefix(NamedTuple):
    """A canonical CIDR."""

    cidr: str


class Span(NamedTuple):
    """An inclusive integer range (one value when ``low == high``)."""

    low: int
    high: int


class SetRef(NamedTuple):
    """A named set or map: ``@name``."""

    name: str


Value = int | Symbol | Quoted | Prefix | Span | SetRef


class Verdict(NamedTuple):
    """``accept``, ``drop``, ``jump TARGET`` or ``goto TARGET``."""

    kind: str
    target: str | None = None


class VerdictTable(NamedTuple):
    """An anonymous verdict map: ``{ established : accept, … }``."""

    entries: tuple[tuple[Symbol, Verdict], ...]


class Match(NamedTuple):
    """``LEFT RIGHT`` (equality) or ``LEFT != RIGHT``."""

    left: Key
    right: Value
    op: str = "=="


class VMap(NamedTuple):
    """``KEY vmap @map`` or ``KEY vmap { … }``."""

    key: Key
    data: SetRef | VerdictTable


Statement = Match | VMap | Verdict


class Rule(NamedTuple):
    """A rule: its statements in order and the comment that identifies them."""

    statements: tuple[Statement, ...]
    comment: str


class Hook(NamedTuple):
    """What makes a chain a base chain: ``type filter hook forward priority …``."""

    type: str
    hook: str
    priority: int
    policy: str


class Element(NamedTuple):
    """A set element (``key``: one string per key type) or a map element (+ verdict).

    Addresses are canonical CIDRs (``10.0.0.1/32``), interface names are plain
    strings: the same normal form :mod:`.state` produces from a kernel read-back.
    """

    key: tuple[str, ...]
    verdict: Verdict | None = None


@dataclass(frozen=True)
class NamedSet:
    """A named set, or a verdict map when ``is_map``; elements are sorted by key."""

    name: str
    key_type: tuple[str, ...]
    flags: tuple[str, ...]
    elements: tuple[Element, ...]
    is_map: bool = False


@dataclass(frozen=True)
class Chain:
    """A chain: a base chain when ``hook`` is set; its rules in order."""

    name: str
    hook: Hook | None
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Ruleset:
    """The whole content of table ``inet secfw``; sets and chains sorted by name."""

    sets: tuple[NamedSet, ...]
    chains: tuple[Chain, ...]


ACCEPT = Verdict("accept")
DROP = Verdict("drop")
TAP_WILDCARD = Quoted(TAP_PREFIX + "*")
# Replies of accepted connections pass, invalid packets never do (nft wiki,
# "Simple ruleset for a server": ct state vmap).
CT_STATE = VMap(
    Ct("state"),
    VerdictTable(
        (
            (Symbol("established"), ACCEPT),
            (Symbol("related"), ACCEPT),
            (Symbol("invalid"), DROP),
        )
    ),
)
# Egress filters run before ingress filters on forward (an arbitrary but fixed
# order: both must accept, and a drop in either is final). "filter" is 0
# (nft(8), "CHAINS", standard priority names).
FORWARD_EGRESS_HOOK = Hook("filter", "forward", -1, "accept")
FORWARD_INGRESS_HOOK = Hook("filter", "forward", 0, "accept")
INPUT_EGRESS_HOOK = Hook("filter", "input", 0, "accept")


# --------------------------------------------------------------------------- #
# Validation and canonical forms.
# --------------------------------------------------------------------------- #


def is_safe_name(name: str) -> bool:
    """True when ``name`` can be written as a bare nft identifier: one of the
    fixed names of the layout, or a name that :func:`check_name` accepts."""
    return name in FIXED_SETS or name in FIXED_CHAINS or (
        len(name) <= _MAX_NAME and _NAME.fullmatch(name) is not None)


def check_name(name: str) -> str:
    """``name`` if it is safe as a bare nft identifier; BackendError otherwise."""
    if len(name) > _MAX_NAME or not _NAME.fullmatch(name):
        raise BackendError(f"nftables: {name!r} is not a valid set or chain name")
    return name


def check_tap(tap: str) -> str:
    """``tap`` if it is a valid tap interface name; BackendError otherwise."""
    if not _TAP.fullmatch(tap):
        raise BackendError(f"nftables: {tap!r} is not a valid tap name")
    return tap


def ports_set_name(chain: str) -> str:
    """The set of taps dispatched to group chain ``chain``."""
    return chain + PORTS_SUFFIX


def canonical_cidr(text: str, family: Family | None = None) -> str:
    """``text`` (address or CIDR) as a canonical CIDR; BackendError if it is not one.

    A bare address means one host (``/32``, ``/128``); host bits must be zero. With
    ``family`` the address must be of that family. Cached: an address appears in
    many sets.
    """
    cidr = _canonical_cidr(text)
    if family is not None and (":" in cidr) != (family == "ipv6"):
        raise UnsupportedError(f"nftables: {cidr} is not an {family} network")
    return cidr


@lru_cache(maxsize=1 << 16)
def _canonical_cidr(text: str) -> str:
    host = _IPV4_HOST.fullmatch(text)
    if host:  # fast path: most elements are single hosts
        return host.group(1) + "/32"
    try:
        return ipaddress.ip_network(text).with_prefixlen
    except ValueError as exc:
        raise BackendError(f"nftables: {text!r} is not a CIDR: {exc}") from exc


def cidr_family(cidr: str) -> Family:
    """The family of a canonical CIDR."""
    return "ipv6" if ":" in cidr else "ipv4"


# --------------------------------------------------------------------------- #
# IR → Ruleset.
# --------------------------------------------------------------------------- #


def render(hf: HostFilter) -> Ruleset:
    """The ruleset that enforces ``hf``. Deterministic: equal IR, equal ruleset.

    Raises BackendError when the IR is inconsistent (unknown chain or set, a name
    or tap that is not a safe identifier, duplicate names) and UnsupportedError
    when a rule asks for something this backend cannot express.
    """
    groups = _index_chains(hf.chains)
    address_sets = _index_sets(hf.sets)
    members = _members(hf.ports, groups)
    interned = {p.tap: Element((p.tap,)) for p in hf.ports}
    ingress = sorted(c.name for c in hf.chains if c.direction == "ingress")
    egress = sorted(c.name for c in hf.chains if c.direction == "egress")
    same_net = _same_net_sets(hf.ports)
    sets = [
        _ingress_map(hf.ports),
        _egress_map(hf.ports),
        *same_net,
        *(_ports_set(name, taps, interned) for name, taps in members.items()),
        *(_address_set(s) for s in hf.sets),
    ]
    chains = [
        *(_group_chain(c, address_sets) for c in hf.chains),
        _ingress_filter(ingress, [s.name for s in same_net]),
        *([_egress_filter(egress)] if egress else []),
        *_base_chains(),
    ]
    _check_unique([s.name for s in sets], "set")
    return Ruleset(
        sets=tuple(sorted(sets, key=lambda s: s.name)),
        chains=tuple(sorted(chains, key=lambda c: c.name)),
    )


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
    """Sets and maps share one namespace: a ``<G>-ports`` name must not be an
    AddressSet's."""
    dup = sorted(name for name, n in Counter(names).items() if n > 1)
    if dup:
        raise BackendError(f"nftables: {what} name {dup[0]!r} is used twice")


def _members(ports: Iterable[PortPolicy], groups: dict[str, GroupChain]) -> dict[str, list[str]]:
    """Group chain name → sorted taps of the ports that use it (every chain present)."""
    members: dict[str, list[str]] = {name: [] for name in groups}
    seen: set[str] = set()
    for port in ports:
        if check_tap(port.tap) in seen:
            raise BackendError(f"nftables: tap {port.tap!r} belongs to two ports")
        seen.add(port.tap)
        for names, direction in ((port.ingress_chains, "ingress"), (port.egress_chains, "egress")):
            for name in dict.fromkeys(names):
                chain = groups.get(name)
                if chain is None or chain.direction != direction:
                    raise BackendError(f"nftables: port {port.tap} uses unknown {direction} "
                                       f"chain {name!r}")
                members[name].append(port.tap)
    return {name: sorted(taps) for name, taps in members.items()}


def _ingress_map(ports: Iterable[PortPolicy]) -> NamedSet:
    to_filter = Verdict("goto", INGRESS_FILTER)
    elements = tuple(Element((p.tap,), to_filter) for p in sorted(ports, key=lambda p: p.tap))
    return NamedSet(INGRESS_PORTS, ("ifname",), (), elements, is_map=True)


def _egress_map(ports: Iterable[PortPolicy]) -> NamedSet:
    """tap → accept (egress open), goto egress-filter, or drop (closed, no rules)."""
    to_filter = Verdict("goto", EGRESS_FILTER)

    def verdict(port: PortPolicy) -> Verdict:
        if port.egress_open:
            return ACCEPT
        return to_filter if port.egress_chains else DROP

    elements = tuple(Element((p.tap,), verdict(p)) for p in sorted(ports, key=lambda p: p.tap))
    return NamedSet(EGRESS_PORTS, ("ifname",), (), elements, is_map=True)


def _same_net_sets(ports: Iterable[PortPolicy]) -> list[NamedSet]:
    """``tap . network`` interval sets, one per family that has any element."""
    elements: dict[Family, list[Element]] = {"ipv4": [], "ipv6": []}
    for port in ports:
        for cidr in _merged(port.same_net_cidrs):
            elements[cidr_family(cidr)].append(Element((port.tap, cidr)))
    return [
        NamedSet(SAME_NET[family], ("ifname", ADDRESS_TYPE[family]), ("interval",),
                 tuple(sorted(elements[family], key=lambda e: e.key)))
        for family in ("ipv4", "ipv6")
        if elements[family]
    ]


@lru_cache(maxsize=1 << 12)
def _merged(cidrs: tuple[str, ...]) -> tuple[str, ...]:
    """Canonical CIDRs without overlaps (interval sets reject overlapping elements).

    Cached: the ports of one network all have the same same-net CIDRs."""
    canonical = tuple(canonical_cidr(c) for c in cidrs)
    if len(canonical) <= 1:
        return canonical
    v4 = [ipaddress.IPv4Network(c) for c in canonical if cidr_family(c) == "ipv4"]
    v6 = [ipaddress.IPv6Network(c) for c in canonical if cidr_family(c) == "ipv6"]
    return tuple(n.with_prefixlen for n in ipaddress.collapse_addresses(v4)) + tuple(
        n.with_prefixlen for n in ipaddress.collapse_addresses(v6))


def _ports_set(chain: str, taps: list[str], interned: dict[str, Element]) -> NamedSet:
    """``interned`` holds one Element per tap, shared by every set it is in: a port
    is in ~20 sets, and creating ~200k tuples would cost more than rendering them."""
    elements = tuple(interned[tap] for tap in taps)
    return NamedSet(check_name(ports_set_name(chain)), ("ifname",), (), elements)


def _address_set(address_set: AddressSet) -> NamedSet:
    """The set as the IR gives it: canonical, sorted, already merged (ir.AddressSet).

    Not re-merged here: the compiler keeps single hosts apart on purpose so that a
    member joining or leaving is one element added or removed."""
    family = address_set.family
    cidrs = dict.fromkeys(canonical_cidr(c, family) for c in address_set.elements)
    elements = tuple(Element((c,)) for c in cidrs)
    return NamedSet(address_set.name, (ADDRESS_TYPE[family],), ("interval",), elements)


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


def _ingress_filter(chains: list[str], same_net: list[str]) -> Chain:
    """Same-net accept, then every ingress group chain of the receiving port, then drop."""
    rules = [
        make_rule((Match(_same_net_key("oifname", name), SetRef(name)), ACCEPT))
        for name in same_net
    ]
    rules += [_dispatch("oifname", name) for name in chains]
    rules.append(make_rule((DROP,)))
    return Chain(INGRESS_FILTER, None, tuple(rules))


def _egress_filter(chains: list[str]) -> Chain:
    rules = [_dispatch("iifname", name) for name in chains]
    return Chain(EGRESS_FILTER, None, (*rules, make_rule((DROP,))))


def _same_net_key(ifname: str, set_name: str) -> Concat:
    family: Family = "ipv6" if set_name == SAME_NET["ipv6"] else "ipv4"
    return Concat((Meta(ifname), Payload(ADDRESS_KEYWORD[family], "saddr")))


def _dispatch(ifname: str, chain: str) -> Rule:
    """``oifname @<chain>-ports jump <chain>``: the group's rules apply to its ports.

    ``jump`` (not ``goto``): a group that does not accept returns here so the next
    group of the port is tried; the groups' rules add up (semantics.md)."""
    return make_rule((Match(Meta(ifname), SetRef(ports_set_name(chain))),
                      Verdict("jump", chain)))


def _base_chains() -> list[Chain]:
    """The three hooked chains. Each first lets non-tap traffic go on untouched, so
    secfw never decides about the host's own traffic, then lets replies through,
    then dispatches by tap; a tap secfw does not know is dropped (fail closed)."""
    return [
        _base_chain(FORWARD_EGRESS, FORWARD_EGRESS_HOOK, "iifname", EGRESS_PORTS),
        _base_chain(FORWARD_INGRESS, FORWARD_INGRESS_HOOK, "oifname", INGRESS_PORTS),
        _base_chain(INPUT_EGRESS, INPUT_EGRESS_HOOK, "iifname", EGRESS_PORTS),
    ]


def _base_chain(name: str, hook: Hook, ifname: str, port_map: str) -> Chain:
    rules = (
        make_rule((Match(Meta(ifname), TAP_WILDCARD, "!="), ACCEPT)),
        make_rule((CT_STATE,)),
        make_rule((VMap(Meta(ifname), SetRef(port_map)),)),
        make_rule((Match(Meta(ifname), TAP_WILDCARD), DROP)),
    )
    return Chain(name, hook, rules)


def make_rule(statements: tuple[Statement, ...], audit: str = "") -> Rule:
    """A rule whose comment identifies its content: ``[audit:]<digest of its text>``.

    The digest covers the statements' text, so two rules with equal comments are
    equal rules; ``audit`` (a rule id prefix) only helps a human reading nft output.
    """
    digest = hashlib.sha256(statements_text(statements).encode()).hexdigest()[:16]
    return Rule(statements, f"{audit}:{digest}" if audit else digest)


# --------------------------------------------------------------------------- #
# Native nft syntax.
# --------------------------------------------------------------------------- #


def key_text(key: Key) -> str:
    """A key as nft prints it."""
    if isinstance(key, Meta):
        return key.key if key.key in ("iifname", "oifname") else f"meta {key.key}"
    if isinstance(key, Payload):
        return f"{key.protocol} {key.field}"
    if isinstance(key, Ct):
        return f"ct {key.key}"
    return " . ".join(key_text(part) for part in key.parts)


def value_text(value: Value) -> str:
    """A value in nft syntax (only ids, addresses and numbers: never user text)."""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Quoted):
        return f'"{value.text}"'
    if isinstance(value, Span):
        return str(value.low) if value.low == value.high else f"{value.low}-{value.high}"
    if isinstance(value, SetRef):
        return "@" + value.name
    if isinstance(value, Prefix):
        return value.cidr
    return value.name


def verdict_text(verdict: Verdict) -> str:
    return verdict.kind if verdict.target is None else f"{verdict.kind} {verdict.target}"


def statement_text(statement: Statement) -> str:
    if isinstance(statement, Verdict):
        return verdict_text(statement)
    if isinstance(statement, VMap):
        if isinstance(statement.data, SetRef):
            return f"{key_text(statement.key)} vmap @{statement.data.name}"
        entries = ", ".join(f"{k.name} : {verdict_text(v)}" for k, v in statement.data.entries)
        return f"{key_text(statement.key)} vmap {{ {entries} }}"
    op = "" if statement.op == "==" else f"{statement.op} "
    return f"{key_text(statement.left)} {op}{value_text(statement.right)}"


def statements_text(statements: Iterable[Statement]) -> str:
    return " ".join(statement_text(s) for s in statements)


def rule_text(rule: Rule) -> str:
    """A rule as ``add rule``/chain-body text, with its identifying comment."""
    return f'{statements_text(rule.statements)} comment "{rule.comment}"'


def hook_text(hook: Hook) -> str:
    prio = "filter" if hook.priority == 0 else (
        f"filter {'+' if hook.priority > 0 else '-'} {abs(hook.priority)}")
    return f"type {hook.type} hook {hook.hook} priority {prio}; policy {hook.policy};"


def element_text(key_type: tuple[str, ...], element: Element) -> str:
    """One element of a set with ``key_type``: ``"tap1"``, ``10.0.0.0/24``,
    ``"tap1" . 10.0.0.0/24``, ``"tap1" : goto ingress-filter``."""
    parts = [f'"{v}"' if t == "ifname" else v for v, t in zip(element.key, key_type, strict=True)]
    key = " . ".join(parts)
    return key if element.verdict is None else f"{key} : {verdict_text(element.verdict)}"


def set_declaration(named: NamedSet) -> str:
    """``type …; flags …;`` of a set or map."""
    key_type = " . ".join(named.key_type)
    text = f"type {key_type} : verdict;" if named.is_map else f"type {key_type};"
    return text + (f" flags {', '.join(named.flags)};" if named.flags else "")


def elements_text(key_type: tuple[str, ...], elements: Iterable[Element], sep: str = ", ") -> str:
    """Elements separated by ``sep``, for ``elements = { … }`` or ``add element``."""
    if key_type == ("ifname",):  # fast path: the <G>-ports sets hold most elements
        return sep.join(f'"{e.key[0]}"' if e.verdict is None else element_text(key_type, e)
                        for e in elements)
    return sep.join(element_text(key_type, e) for e in elements)


def to_nft_text(ruleset: Ruleset) -> str:
    """A complete ``nft -f`` file that atomically replaces table ``inet secfw``.

    ``add table`` first makes ``delete table`` succeed when the table is absent;
    the whole file is one transaction, so the old table stays until the new one is
    complete (nft(8), "nft -f": a file is applied atomically).
    """
    return (
        "# generated by secfw: the whole of table inet secfw, applied atomically\n"
        f"add table {FAMILY} {TABLE}\n"
        f"delete table {FAMILY} {TABLE}\n"
        f"{table_text(ruleset)}\n"
    )


def table_text(ruleset: Ruleset) -> str:
    """The ``table inet secfw { … }`` block (no trailing newline)."""
    return "".join(_table_lines(ruleset)).rstrip("\n")


def _table_lines(ruleset: Ruleset) -> Iterator[str]:
    yield f"table {FAMILY} {TABLE} {{\n"
    for named in ruleset.sets:
        yield f"\t{'map' if named.is_map else 'set'} {named.name} {{\n"
        yield f"\t\t{set_declaration(named)}\n"
        if named.elements:
            yield "\t\telements = {\n\t\t\t"
            yield elements_text(named.key_type, named.elements, ",\n\t\t\t")
            yield "\n\t\t}\n"
        yield "\t}\n"
    for chain in ruleset.chains:
        yield f"\tchain {chain.name} {{\n"
        if chain.hook is not None:
            yield f"\t\t{hook_text(chain.hook)}\n"
        for rule in chain.rules:
            yield f"\t\t{rule_text(rule)}\n"
        yield "\t}\n"
    yield "}\n"


# --------------------------------------------------------------------------- #
# libnftables JSON (libnftables-json(5)).
# --------------------------------------------------------------------------- #

Json = Any


def key_json(key: Key) -> Json:
    if isinstance(key, Meta):
        return {"meta": {"key": key.key}}
    if isinstance(key, Payload):
        return {"payload": {"protocol": key.protocol, "field": key.field}}
    if isinstance(key, Ct):
        return {"ct": {"key": key.key}}
    return {"concat": [key_json(part) for part in key.parts]}


def value_json(value: Value) -> Json:
    if isinstance(value, int):
        return value
    if isinstance(value, Span):
        return value.low if value.low == value.high else {"range": [value.low, value.high]}
    if isinstance(value, SetRef):
        return "@" + value.name
    if isinstance(value, Prefix):
        return prefix_json(value.cidr)
    if isinstance(value, Quoted):
        return value.text
    return value.name


def prefix_json(cidr: str) -> Json:
    addr, length = cidr.split("/")
    return {"prefix": {"addr": addr, "len": int(length)}}


def verdict_json(verdict: Verdict) -> Json:
    return {verdict.kind: None if verdict.target is None else {"target": verdict.target}}


def statement_json(statement: Statement) -> Json:
    if isinstance(statement, Verdict):
        return verdict_json(statement)
    if isinstance(statement, VMap):
        data: Json = "@" + statement.data.name if isinstance(statement.data, SetRef) else {
            "set": [[k.name, verdict_json(v)] for k, v in statement.data.entries]}
        return {"vmap": {"key": key_json(statement.key), "data": data}}
    return {"match": {"op": statement.op, "left": key_json(statement.left),
                      "right": value_json(statement.right)}}


def element_json(named: NamedSet, element: Element) -> Json:
    parts = [prefix_json(v) if t in ADDRESS_TYPES else v
             for v, t in zip(element.key, named.key_type, strict=True)]
    key: Json = parts[0] if len(parts) == 1 else {"concat": parts}
    return key if element.verdict is None else [key, verdict_json(element.verdict)]


def _set_json(named: NamedSet) -> Json:
    body: dict[str, Json] = {"family": FAMILY, "table": TABLE, "name": named.name,
                             "type": named.key_type[0] if len(named.key_type) == 1
                             else list(named.key_type)}
    if named.is_map:
        body["map"] = "verdict"
    if named.flags:
        body["flags"] = list(named.flags)
    if named.elements:
        body["elem"] = [element_json(named, e) for e in named.elements]
    return {"map" if named.is_map else "set": body}


def _chain_json(chain: Chain) -> Json:
    body: dict[str, Json] = {"family": FAMILY, "table": TABLE, "name": chain.name}
    if chain.hook is not None:
        body |= {"type": chain.hook.type, "hook": chain.hook.hook,
                 "prio": chain.hook.priority, "policy": chain.hook.policy}
    return {"chain": body}


def _rule_json(chain: str, rule: Rule) -> Json:
    return {"rule": {"family": FAMILY, "table": TABLE, "chain": chain,
                     "expr": [statement_json(s) for s in rule.statements],
                     "comment": rule.comment}}


def to_nft_json(ruleset: Ruleset) -> dict[str, list[Json]]:
    """The libnftables JSON batch equivalent to :func:`to_nft_text`.

    JSON commands run in order (no block expansion as in native syntax), so chains
    are declared before the maps whose verdicts name them and sets before the rules
    that use them.
    """
    table = {"table": {"family": FAMILY, "name": TABLE}}
    commands: list[Json] = [{"add": table}, {"delete": table}, {"add": table}]
    commands += [{"add": _chain_json(c)} for c in ruleset.chains]
    commands += [{"add": _set_json(s)} for s in ruleset.sets]
    commands += [{"add": _rule_json(c.name, r)} for c in ruleset.chains for r in c.rules]
    return {"nftables": commands}

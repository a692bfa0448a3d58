"""The structured ruleset secfw writes, and how it prints as nft text and JSON.

A :class:`Ruleset` is a plain description of secfw's tables — ``inet secfw``
(the security groups and port protection) and ``arp secfw`` (ARP anti-spoofing) —
as named sets and maps with their elements, and chains with their rules made of
a few statement kinds. :mod:`.render` builds it from the IR; this module only
prints it:

* :func:`to_nft_text` — a file for ``nft -f`` that atomically replaces both tables;
* :func:`to_nft_json` — the libnftables JSON batch equivalent (libnftables-json(5)).

Only identifiers secfw generated, addresses re-printed from their parsed form and
integers reach the output (the renderer validates them): printing never quotes or
escapes anything a user typed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

TABLE = "secfw"
FAMILY = "inet"  # the main table's family
ARP_FAMILY = "arp"  # ARP anti-spoofing on routed hosts
BRIDGE_FAMILY = "bridge"  # port marks and layer-2 anti-spoofing on bridged hosts
#: Every table secfw owns, in the order they are written: ``(family, name)``.
FAMILIES = (FAMILY, ARP_FAMILY, BRIDGE_FAMILY)

#: Set key types whose elements are addresses (CIDRs in the normal form).
ADDRESS_TYPES = {"ipv4_addr": "ipv4", "ipv6_addr": "ipv6"}


# --------------------------------------------------------------------------- #
# Expressions and statements.
# --------------------------------------------------------------------------- #


class Meta(NamedTuple):
    """``meta KEY`` (``iifname``/``oifname`` print without the ``meta``)."""

    key: str


class Payload(NamedTuple):
    """A header field: ``ip saddr``, ``th dport``, ``icmp type``, ``arp saddr ip``."""

    protocol: str
    field: str


class RawPayload(NamedTuple):
    """``@BASE,OFFSET,LENGTH`` (bits): a header field nft has no name for."""

    base: str
    offset: int
    length: int


class Ct(NamedTuple):
    """A conntrack key: ``ct state``."""

    key: str


class Masked(NamedTuple):
    """``KEY & (a | b | …)``: a bit field masked with named flags (``tcp flags``),
    or ``KEY & 0x…`` with an integer mask (``meta mark``)."""

    key: Payload | Meta
    flags: tuple[str, ...] | int


class Concat(NamedTuple):
    """Concatenated keys: ``oifname . ip saddr``."""

    parts: tuple[Meta | Payload | RawPayload, ...]


Key = Meta | Payload | RawPayload | Ct | Masked | Concat


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


class HexSpan(NamedTuple):
    """An inclusive range of ``bits``-wide integers, printed in hex (one value
    when ``low == high``): what a :class:`RawPayload` is compared with."""

    low: int
    high: int
    bits: int


class SymbolSet(NamedTuple):
    """An anonymous set of named constants: ``{ nd-router-advert, nd-redirect }``."""

    names: tuple[str, ...]


class SetRef(NamedTuple):
    """A named set or map: ``@name``."""

    name: str


Value = int | Symbol | Quoted | Prefix | Span | HexSpan | SymbolSet | SetRef


class Verdict(NamedTuple):
    """``accept``, ``drop``, ``return``, ``jump TARGET`` or ``goto TARGET``."""

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


class MapLookup(NamedTuple):
    """``KEY map @name``: the data a named data map holds for ``KEY``."""

    key: Key
    map: SetRef


class SetMeta(NamedTuple):
    """``meta KEY set VALUE`` (a statement): ``meta mark set iifname map @m`` or
    ``meta mark set 0``.

    If VALUE is a map lookup that finds nothing, the rule stops there (nft's
    lookup breaks the rule), so the statements after it do not run either."""

    key: str
    value: MapLookup | int


class Nat(NamedTuple):
    """``dnat ip to KEY map @m`` / ``snat ip to KEY map @m``: the IPv4 address a
    named data map holds for ``KEY`` (a lookup that finds nothing ends the rule:
    no NAT)."""

    kind: str  # "dnat" | "snat"
    lookup: MapLookup


class SetCt(NamedTuple):
    """``ct KEY set KEY map @name`` (a statement): ``ct mark set iifname . ip
    saddr map @metadata_ports``. A lookup that finds nothing stops the rule, as
    for :class:`SetMeta`."""

    key: str
    value: MapLookup


class Dnat(NamedTuple):
    """``dnat ip to ADDRESS:PORT`` (a statement, in a chain of type nat)."""

    address: str
    port: int


Statement = Match | VMap | Verdict | SetMeta | Nat | SetCt | Dnat


# --------------------------------------------------------------------------- #
# Rules, chains, sets, the ruleset.
# --------------------------------------------------------------------------- #


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


class Datum(NamedTuple):
    """The value of a data-map element (not a verdict): a packet mark, as decimal
    digits, or an IPv4 address without prefix (how :mod:`.state` normalises the
    kernel's read-back)."""

    text: str


class Element(NamedTuple):
    """A set element (``key``: one string per key type) or a map element (+ its
    verdict, or its :class:`Datum` in a data map).

    Addresses are canonical CIDRs (``10.0.0.1/32``), interface names plain strings,
    MAC addresses lower case, marks decimal digits: the same normal form
    :mod:`.state` produces from a kernel read-back.
    """

    key: tuple[str, ...]
    verdict: Verdict | Datum | None = None


@dataclass(frozen=True)
class NamedSet:
    """A named set, or a map when ``is_map``; elements are sorted by key.

    A map maps to verdicts unless ``data_type`` names another type (``mark``).
    ``family`` is the table it lives in (``inet``, ``arp`` or ``bridge``).
    ``typeof`` (native syntax, e.g. ``iifname . @th,64,128``) declares the key by
    expression, for a key with a raw payload, whose type has no name to declare;
    ``key_type`` is then that key's type as libnftables lists it."""

    name: str
    key_type: tuple[str, ...]
    flags: tuple[str, ...]
    elements: tuple[Element, ...]
    is_map: bool = False
    family: str = FAMILY
    data_type: str = "verdict"
    typeof: str = ""


@dataclass(frozen=True)
class Chain:
    """A chain: a base chain when ``hook`` is set; its rules in order; the table
    it lives in (``family``)."""

    name: str
    hook: Hook | None
    rules: tuple[Rule, ...]
    family: str = FAMILY


@dataclass(frozen=True)
class Ruleset:
    """The content of secfw's tables: sets and chains, each sorted by (family, name).

    Names are unique across the tables (the renderer checks), so a set or chain
    can be looked up by name alone."""

    sets: tuple[NamedSet, ...]
    chains: tuple[Chain, ...]

    def families(self) -> tuple[str, ...]:
        """The tables this ruleset fills, in :data:`FAMILIES` order."""
        used = {s.family for s in self.sets} | {c.family for c in self.chains}
        return tuple(f for f in FAMILIES if f in used)


ACCEPT = Verdict("accept")
DROP = Verdict("drop")


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
    if isinstance(key, RawPayload):
        return f"@{key.base},{key.offset},{key.length}"
    if isinstance(key, Ct):
        return f"ct {key.key}"
    if isinstance(key, Masked):
        if isinstance(key.flags, int):
            return f"{key_text(key.key)} & {hex_text(key.flags, 32)}"
        return f"{key_text(key.key)} & ({' | '.join(key.flags)})"
    return " . ".join(key_text(part) for part in key.parts)


def hex_text(value: int, bits: int) -> str:
    """``value`` as nft prints a ``bits``-wide integer: ``0x`` and every hex digit."""
    return f"0x{value:0{bits // 4}x}"


def value_text(value: Value) -> str:
    """A value in nft syntax (only ids, addresses and numbers: never user text)."""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Quoted):
        return f'"{value.text}"'
    if isinstance(value, Span):
        return str(value.low) if value.low == value.high else f"{value.low}-{value.high}"
    if isinstance(value, HexSpan):
        low, high = hex_text(value.low, value.bits), hex_text(value.high, value.bits)
        return low if value.low == value.high else f"{low}-{high}"
    if isinstance(value, SymbolSet):
        return "{ " + ", ".join(value.names) + " }"
    if isinstance(value, SetRef):
        return "@" + value.name
    if isinstance(value, Prefix):
        return value.cidr
    return value.name


def verdict_text(verdict: Verdict | Datum) -> str:
    """A verdict, or the datum of a data-map element."""
    if isinstance(verdict, Datum):
        return verdict.text
    return verdict.kind if verdict.target is None else f"{verdict.kind} {verdict.target}"


def statement_text(statement: Statement) -> str:
    if isinstance(statement, Verdict):
        return verdict_text(statement)
    if isinstance(statement, Nat):
        nat = statement.lookup
        return f"{statement.kind} ip to {key_text(nat.key)} map @{nat.map.name}"
    if isinstance(statement, SetMeta):
        lookup = statement.value
        if isinstance(lookup, int):
            return f"meta {statement.key} set {lookup}"
        return f"meta {statement.key} set {key_text(lookup.key)} map @{lookup.map.name}"
    if isinstance(statement, SetCt):
        lookup = statement.value
        return f"ct {statement.key} set {key_text(lookup.key)} map @{lookup.map.name}"
    if isinstance(statement, Dnat):
        return f"dnat ip to {statement.address}:{statement.port}"
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
    """Priorities near 0 print relative to ``filter`` (0 in inet and arp); far ones
    (the bridge family's filter is -200, nft(8) "CHAINS") as plain numbers."""
    if abs(hook.priority) >= 100:
        prio = str(hook.priority)
    else:
        prio = "filter" if hook.priority == 0 else (
            f"filter {'+' if hook.priority > 0 else '-'} {abs(hook.priority)}")
    return f"type {hook.type} hook {hook.hook} priority {prio}; policy {hook.policy};"


def component_text(value: str, key_type: str, interval: bool) -> str:
    """One component of an element: interface names quoted; in a set without the
    ``interval`` flag, a single address without its ``/32``/``/128`` (nft rejects
    prefixes there); anything else as it is."""
    if key_type == "ifname":
        return f'"{value}"'
    if not interval and key_type in ADDRESS_TYPES:
        return value.split("/", 1)[0]
    return value


def element_text(key_type: tuple[str, ...], element: Element, interval: bool = True) -> str:
    """One element of a set with ``key_type``: ``"tap1"``, ``10.0.0.0/24``,
    ``"tap1" . 10.0.0.0/24``, ``"tap1" : goto ingress-filter``."""
    key = " . ".join(component_text(v, t, interval)
                     for v, t in zip(element.key, key_type, strict=True))
    return key if element.verdict is None else f"{key} : {verdict_text(element.verdict)}"


def set_declaration(named: NamedSet) -> str:
    """``type …; flags …;`` of a set or map."""
    key = f"typeof {named.typeof}" if named.typeof else f"type {' . '.join(named.key_type)}"
    text = f"{key} : {named.data_type};" if named.is_map else f"{key};"
    return text + (f" flags {', '.join(named.flags)};" if named.flags else "")


def elements_text(named: NamedSet | tuple[tuple[str, ...], tuple[str, ...]],
                  elements: Iterable[Element], sep: str = ", ") -> str:
    """Elements separated by ``sep``, for ``elements = { … }`` or ``add element``.

    ``named`` gives the key type and flags: a :class:`NamedSet` or ``(key_type, flags)``.
    The same text as :func:`element_text` for each element, built faster: the
    ~300k elements of a 10,000-port host were a third of its full transaction's
    text time. A single-component key is formatted without the generic zip, and
    each distinct verdict is printed once (the 200k slot-map elements name ~500
    chains).
    """
    key_type, flags = (named.key_type, named.flags) if isinstance(named, NamedSet) else named
    interval = "interval" in flags
    data = _DataTexts()
    if key_type == ("ifname",):  # the port maps and sets: two thirds of a big host's elements
        # An f-string of the unpacked element: ~30 % less time than a format
        # method and attribute reads per element (200k slot-map elements at 10k).
        return sep.join([f'"{name}"' if value is None else f'"{name}"{data[value]}'
                         for (name,), value in elements])
    formats = tuple(_component_format(t, interval) for t in key_type)
    if len(formats) == 1:
        one = formats[0]
        return sep.join([one(k) if value is None else one(k) + data[value]
                         for (k,), value in elements])

    def key(values: tuple[str, ...]) -> str:
        return " . ".join([fmt(v) for fmt, v in zip(formats, values, strict=True)])

    return sep.join([key(k) if value is None else key(k) + data[value]
                     for k, value in elements])


class _DataTexts(dict[Verdict | Datum, str]):
    """`` : <verdict or datum>`` of each element's data, printed once per value."""

    def __missing__(self, verdict: Verdict | Datum) -> str:
        text = self[verdict] = " : " + verdict_text(verdict)
        return text


def _component_format(key_type: str, interval: bool) -> Callable[[str], str]:
    """:func:`component_text` for one key type, as one function."""
    if key_type == "ifname":
        return '"{}"'.format
    if not interval and key_type in ADDRESS_TYPES:
        return lambda value: value.split("/", 1)[0]
    return str


def table_header(family: str) -> str:
    """``add table`` + ``delete table`` of one of secfw's tables: the ``add`` makes
    the ``delete`` succeed when the table is absent (nft 1.0.6 has no ``destroy``)."""
    return f"add table {family} {TABLE}\ndelete table {family} {TABLE}"


def to_nft_text(ruleset: Ruleset) -> str:
    """A complete ``nft -f`` file that atomically replaces secfw's tables (all of
    :data:`FAMILIES`: a table the ruleset does not use, left from the other
    topology, is removed).

    The whole file is one transaction, so the old tables stay in force until the
    new ones are complete (nft(8), "nft -f": a file is applied atomically).
    """
    headers = "\n".join(table_header(f) for f in FAMILIES)  # also a table left unused
    blocks = "\n".join(table_text(ruleset, f) for f in ruleset.families())
    return (f"# generated by secfw: the whole of secfw's tables, applied atomically\n"
            f"{headers}\n{blocks}\n")


def table_text(ruleset: Ruleset, family: str = FAMILY) -> str:
    """The ``table FAMILY secfw { … }`` block (no trailing newline)."""
    return "".join(_table_lines(ruleset, family)).rstrip("\n")


def _table_lines(ruleset: Ruleset, family: str) -> Iterator[str]:
    yield f"table {family} {TABLE} {{\n"
    for named in (s for s in ruleset.sets if s.family == family):
        yield f"\t{'map' if named.is_map else 'set'} {named.name} {{\n"
        yield f"\t\t{set_declaration(named)}\n"
        if named.elements:
            yield "\t\telements = {\n\t\t\t"
            yield elements_text(named, named.elements, ",\n\t\t\t")
            yield "\n\t\t}\n"
        yield "\t}\n"
    for chain in (c for c in ruleset.chains if c.family == family):
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
    if isinstance(key, RawPayload):
        return {"payload": {"base": key.base, "offset": key.offset, "len": key.length}}
    if isinstance(key, Ct):
        return {"ct": {"key": key.key}}
    if isinstance(key, Masked):
        mask = key.flags if isinstance(key.flags, int) else list(key.flags)
        return {"&": [key_json(key.key), mask]}
    return {"concat": [key_json(part) for part in key.parts]}


def value_json(value: Value) -> Json:
    if isinstance(value, int):
        return value
    if isinstance(value, Span):
        return value.low if value.low == value.high else {"range": [value.low, value.high]}
    if isinstance(value, HexSpan):
        low, high = hex_text(value.low, value.bits), hex_text(value.high, value.bits)
        return low if value.low == value.high else {"range": [low, high]}
    if isinstance(value, SymbolSet):
        return {"set": list(value.names)}
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


def verdict_json(verdict: Verdict | Datum) -> Json:
    """A verdict, or the datum of a data-map element (a mark: an integer; an
    address: its text)."""
    if isinstance(verdict, Datum):
        return int(verdict.text) if verdict.text.isdigit() else verdict.text
    return {verdict.kind: None if verdict.target is None else {"target": verdict.target}}


def statement_json(statement: Statement) -> Json:
    if isinstance(statement, Verdict):
        return verdict_json(statement)
    if isinstance(statement, Nat):
        nat = statement.lookup
        return {statement.kind: {"family": "ip", "addr": {
            "map": {"key": key_json(nat.key), "data": "@" + nat.map.name}}}}
    if isinstance(statement, SetMeta):
        lookup = statement.value
        value: Json = lookup if isinstance(lookup, int) else {
            "map": {"key": key_json(lookup.key), "data": "@" + lookup.map.name}}
        return {"mangle": {"key": {"meta": {"key": statement.key}}, "value": value}}
    if isinstance(statement, SetCt):
        mapped = {"map": {"key": key_json(statement.value.key),
                          "data": "@" + statement.value.map.name}}
        return {"mangle": {"key": {"ct": {"key": statement.key}}, "value": mapped}}
    if isinstance(statement, Dnat):
        return {"dnat": {"family": "ip", "addr": statement.address, "port": statement.port}}
    if isinstance(statement, VMap):
        data: Json = "@" + statement.data.name if isinstance(statement.data, SetRef) else {
            "set": [[k.name, verdict_json(v)] for k, v in statement.data.entries]}
        return {"vmap": {"key": key_json(statement.key), "data": data}}
    return {"match": {"op": _json_op(statement), "left": key_json(statement.left),
                      "right": value_json(statement.right)}}


def _json_op(match: Match) -> str:
    """Native ``ct state established`` has no operator: on a bitmask type that is
    nft's implicit "flag set" test, JSON op ``in`` (libnftables-json(5)); ``==``
    would be exact equality, which nft lists back differently."""
    if match.op == "==" and isinstance(match.left, Ct) and match.left.key in _CT_BITMASKS:
        return "in"
    return match.op


_CT_BITMASKS = frozenset({"state", "status"})


def _component_json(value: str, key_type: str, interval: bool) -> Json:
    if key_type == "mark":
        return int(value)
    if key_type == "integer" and "-" in value:  # a range: 0x…-0x…
        return {"range": value.split("-", 1)}
    if key_type not in ADDRESS_TYPES:
        return value
    return prefix_json(value) if interval else value.split("/", 1)[0]


def element_json(named: NamedSet, element: Element) -> Json:
    interval = "interval" in named.flags
    parts = [_component_json(v, t, interval)
             for v, t in zip(element.key, named.key_type, strict=True)]
    key: Json = parts[0] if len(parts) == 1 else {"concat": parts}
    return key if element.verdict is None else [key, verdict_json(element.verdict)]


def _set_json(named: NamedSet) -> Json:
    body: dict[str, Json] = {"family": named.family, "table": TABLE, "name": named.name,
                             "type": named.key_type[0] if len(named.key_type) == 1
                             else list(named.key_type)}
    if named.is_map:
        body["map"] = named.data_type
    if named.flags:
        body["flags"] = list(named.flags)
    if named.elements:
        body["elem"] = [element_json(named, e) for e in named.elements]
    return {"map" if named.is_map else "set": body}


def _chain_json(chain: Chain) -> Json:
    body: dict[str, Json] = {"family": chain.family, "table": TABLE, "name": chain.name}
    if chain.hook is not None:
        body |= {"type": chain.hook.type, "hook": chain.hook.hook,
                 "prio": chain.hook.priority, "policy": chain.hook.policy}
    return {"chain": body}


def _rule_json(chain: Chain, rule: Rule) -> Json:
    return {"rule": {"family": chain.family, "table": TABLE, "chain": chain.name,
                     "expr": [statement_json(s) for s in rule.statements],
                     "comment": rule.comment}}


def to_nft_json(ruleset: Ruleset) -> dict[str, list[Json]]:
    """The libnftables JSON batch equivalent to :func:`to_nft_text`.

    JSON commands run in order (no block expansion as in native syntax), so chains
    are declared before the maps whose verdicts name them and sets before the rules
    that use them.
    """
    commands: list[Json] = []
    for family in ruleset.families():
        table = {"table": {"family": family, "name": TABLE}}
        commands += [{"add": table}, {"delete": table}, {"add": table}]
    commands += [{"add": _chain_json(c)} for c in ruleset.chains]
    commands += [{"add": _set_json(s)} for s in ruleset.sets]
    commands += [{"add": _rule_json(c, r)} for c in ruleset.chains for r in c.rules]
    return {"nftables": commands}

"""An nftables ruleset, as the kernel listed it, evaluated on one packet.

``secfw audit verify`` reads the live tables back (libnftables' JSON: ``nft -j
list table …``) and asks this module what they do with a probe packet — by
*meaning*, not by text: every rule's expressions are evaluated against the
packet's fields the way the kernel's nft_* expressions would (payload and meta
loads, set and map lookups, bitwise ``&``, flag tests, verdict maps, ``jump`` /
``goto`` / ``return``, ``meta mark set``, ``ct mark set``, ``dnat``/``snat``),
so a rule the agent never wrote, a missing set element or a flushed chain
changes the verdict exactly when it changes what the kernel does.

Semantics followed (nft(8), "STATEMENTS", "VERDICT STATEMENT", "MAP"):

* a rule's expressions run in order; a failed match ends the rule (next rule);
  a lookup in a map without the key ends it too (``meta mark set … map`` and a
  ``vmap`` miss leave the packet as it was and go to the next rule);
* a header field of another protocol (``tcp dport`` on a UDP packet) does not
  match: nft adds that protocol dependency to the bytecode;
* ``accept`` ends the base chain (the next base chain on the path still runs),
  ``drop`` ends the packet; ``jump`` returns to the next rule, ``goto`` does
  not; the end of a base chain applies its policy;
* a right-hand string ending in ``*`` is an interface-name wildcard;
* ``dnat``/``snat`` rewrite the probe's destination (and port) or source and
  end the chain with ``accept``: the kernel's nat expression returns
  NF_ACCEPT once the mapping is set up (net/netfilter/nft_nat.c). Probes are
  first packets, the only ones nat chains see (nft wiki, "Performing Network
  Address Translation"), so every probe meets them.

An expression this module does not know raises :class:`Unsupported`: the
caller reports it rather than guessing. Pure: no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from secfw.backends.nftables.canonical import (
    ETHER_TYPES,
    ICMP_CODES,
    ICMP_TYPES,
    ICMPV6_CODES,
    ICMPV6_TYPES,
    NFPROTO,
    protocol_number,
)
from secfw.constants import protocols

#: conntrack states as ``ct state`` bits (linux/netfilter/nf_conntrack_common.h).
CT_STATES = {"invalid": 1, "established": 2, "related": 4, "new": 8, "untracked": 64}
#: TCP header flags (RFC 9293), as nft names them.
TCP_FLAGS = {"fin": 1, "syn": 2, "rst": 4, "psh": 8, "ack": 16, "urg": 32, "ecn": 64,
             "cwr": 128}
#: Protocols whose ``th`` ports nft reads (the transport header has them first).
_HEADER_PROTOCOL = protocols("tcp", "udp", "sctp", "udplite", "dccp", "icmp", "icmpv6")
#: conntrack states without a NAT binding: nat chains never see such packets.
_NO_NAT = CT_STATES["invalid"] | CT_STATES["untracked"]
_PORTED = frozenset(protocols("tcp", "udp", "dccp", "sctp", "udplite").values())
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: A stand-in for chains whose effect is already known (verify's shared check,
#: :mod:`secfw.audit.chainverify`): called with a jump's target and the packet,
#: it answers ``accept`` or ``continue`` — what that chain does — or None:
#: evaluate the chain itself.
Stub = Callable[[str, "Probe"], str | None]


class Unsupported(Exception):
    """An expression or statement this evaluator does not interpret."""


@dataclass(frozen=True)
class Probe:
    """One packet at one hook: interfaces as that hook sees them, its mark, and
    its headers (``sport``/``dport`` for protocols with ports, ``icmp_*`` for ICMP)."""

    iifname: str
    oifname: str
    src: str
    dst: str
    protocol: int
    ether_saddr: str = "00:00:00:00:00:00"
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    tcp_flags: int = TCP_FLAGS["syn"]
    ct_state: int = CT_STATES["new"]
    mark: int = 0
    ct_mark: int = 0

    @property
    def version(self) -> int:
        return parsed_address(self.src).version


@dataclass(frozen=True)
class Stage:
    """One hook on a packet's path: the base chains of ``family`` at ``hook``,
    with the interface names that hook sees."""

    family: str
    hook: str
    iifname: str
    oifname: str


class NftRuleset:
    """The chains, sets and maps of a JSON listing (``{"nftables": [...]}``)."""

    def __init__(self, listing: Mapping[str, Any]) -> None:
        self.chains: dict[tuple[str, str], dict[str, Any]] = {}
        self.rules: dict[tuple[str, str], list[list[Any]]] = {}
        self.sets: dict[tuple[str, str], list[Any]] = {}
        #: Tables listed with flags: ``dormant`` turns all their base chains off,
        #: and nft 1.0.6's JSON prints a table's flags wrongly (measured: the
        #: table's name), so any flag leaves their chains unknown.
        self.flagged: dict[tuple[str, str], Any] = {}
        for item in listing.get("nftables", []):
            if "table" in item and "flags" in item["table"]:
                table = item["table"]
                self.flagged[(table["family"], table["name"])] = table["flags"]
            if "chain" in item:
                chain = item["chain"]
                self.chains[(chain["family"], chain["name"])] = chain
                self.rules.setdefault((chain["family"], chain["name"]), [])
            elif "rule" in item:
                rule = item["rule"]
                self.rules.setdefault((rule["family"], rule["chain"]), []).append(rule["expr"])
            else:
                for kind in ("set", "map"):
                    if kind in item:
                        found = item[kind]
                        self.sets[(found["family"], found["name"])] = list(found.get("elem", []))
        # per (family, set, left expression, kind of value): the set's exact values
        # and the elements that need a full match (see _SetIndex)
        self._indexes: dict[tuple[Any, ...], _SetIndex] = {}
        self._by_hook: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
        self._maps: dict[tuple[Any, ...], _MapIndex] = {}

    def _bases(self, family: str, hook: str | None) -> list[dict[str, Any]]:
        """The base chains of ``family`` on ``hook``, by priority then name (once
        per hook: a host's table has thousands of chains, a probe crosses stages)."""
        key = (family, hook)
        found = self._by_hook.get(key)
        if found is None:
            for (fam, name), flags in self.flagged.items():
                if fam == family:
                    raise Unsupported(f"table {fam} {name} has flags {flags!r} (dormant?)")
            found = self._by_hook[key] = sorted(
                (c for (fam, _), c in self.chains.items()
                 if fam == family and c.get("hook") == hook),
                key=lambda c: (_priority(c.get("prio", 0)), c["name"]))
        return found

    def mapped(self, elements: list[Any], found: Any, left: Any) -> Any:
        """The value of the first element of a map whose key matches ``found`` (None:
        none does), with the literal keys looked up in a dict built once per map
        (its element list, kept alive by the listing), left expression and kind of
        value: the per-port dispatch maps have an element per tap."""
        key = (id(elements), id(left), _kind(found))
        index = self._maps.get(key)
        if index is None:
            index = self._maps[key] = _MapIndex(elements, found, left)
        return index.value(found, left)

    def member(self, family: str, name: str, elements: list[Any], found: Any,
               left: Any) -> bool:
        """Whether ``found`` (the value of ``left``) matches an element of the named
        set ``name``'s ``elements``: as matching each in turn, with the literal
        elements looked up in a hash set built once per set, left expression
        (kept alive by the listing) and kind of value — a host's sets hold
        hundreds of thousands of elements and verify asks millions of probes."""
        key = (family, name, id(left), _kind(found))
        index = self._indexes.get(key)
        if index is None:
            index = self._indexes[key] = _SetIndex(elements, found, left)
        return index.holds(found, left)

    def families(self) -> set[str]:
        return {family for family, _ in self.chains}

    def verdict(self, path: Sequence[Stage], probe: Probe) -> str:
        """``accept`` or ``drop``: the packet through every stage of ``path``."""
        return self.run(path, probe)[0]

    def run(self, path: Sequence[Stage], probe: Probe, stub: Stub | None = None
            ) -> tuple[str, Probe]:
        """The verdict of ``path`` and the packet as it leaves it (NAT applied):
        the caller routes a translated packet on (:func:`paths_after`).
        ``stub``: chains answered without evaluating them (:data:`Stub`)."""
        packet = probe
        for stage in path:
            bases = self._bases(stage.family, stage.hook)
            packet = replace(packet, iifname=stage.iifname, oifname=stage.oifname)
            for chain in bases:
                if chain.get("type") == "nat" and packet.ct_state & _NO_NAT:
                    continue  # no conntrack entry, no NAT (nf_nat_inet_fn: no ct, accept)
                verdict, packet = _Run(self, stage.family, packet, stub).base(chain)
                if verdict == "drop":
                    return "drop", packet
        return "accept", packet

    def chain_effect(self, family: str, name: str, probe: Probe) -> tuple[str | None, Probe]:
        """Regular chain ``name`` alone on ``probe``: its verdict (None: it ran to
        its end or returned) and the packet as it leaves it (marks set)."""
        run = _Run(self, family, probe)
        return run.chain(name, depth=1), run.packet


def _priority(value: Any) -> int:
    if isinstance(value, int):
        return value
    raise Unsupported(f"chain priority {value!r}")


class _Run:
    """One base chain's evaluation (its jump stack and the packet's mark)."""

    def __init__(self, ruleset: NftRuleset, family: str, packet: Probe,
                 stub: Stub | None = None) -> None:
        self.rs = ruleset
        self.family = family
        self.packet = packet
        self.stub = stub

    def base(self, chain: Mapping[str, Any]) -> tuple[str, Probe]:
        verdict = self.chain(chain["name"], depth=0)
        if verdict in (None, "return"):
            verdict = chain.get("policy", "accept")
        return str(verdict), self.packet

    def chain(self, name: str, depth: int) -> str | None:
        """The verdict of chain ``name`` (None: it ran to its end)."""
        if depth > 16:  # nft refuses deeper jump stacks (NFT_JUMP_STACK_SIZE)
            raise Unsupported("jump stack deeper than the kernel allows")
        if (self.family, name) not in self.rs.rules:
            raise Unsupported(f"jump to a chain that does not exist: {name}")
        for expr in self.rs.rules[(self.family, name)]:
            verdict = self.rule(expr, depth)
            if verdict is None:
                continue
            if verdict == "return":
                return None
            return verdict
        return None

    def rule(self, expr: Sequence[Any], depth: int) -> str | None:
        """The verdict of one rule, or None when it does not decide."""
        for statement in expr:
            outcome = self.statement(statement, depth)
            if outcome == "break":
                return None
            if outcome is not None:
                return outcome
        return None

    def statement(self, statement: Mapping[str, Any], depth: int) -> str | None:
        """None: go on; ``break``: the rule ends; else the chain's verdict."""
        (key, body), = statement.items()
        if key == "match":
            return None if self.match(body) else "break"
        if key in ("accept", "drop"):
            return key
        if key == "return":
            return "return"
        if key in ("jump", "goto"):
            return self.branch(key, body["target"], depth)
        if key == "vmap":
            found = self.lookup(body["data"], self.value(body["key"]), body["key"])
            if found is None:
                return "break"
            (verb, target), = found.items()
            return verb if verb in ("accept", "drop", "return") else \
                self.branch(verb, target["target"], depth)
        if key == "mangle":
            return self.mangle(body)
        if key in ("dnat", "snat"):
            return self.nat(key, body)
        if key in ("counter", "log", "comment"):
            return None
        raise Unsupported(f"statement {key!r}")

    def branch(self, verb: str, target: str, depth: int) -> str | None:
        known = self.stub(target, self.packet) if self.stub is not None else None
        if known is not None:  # the stub's chain only accepts or goes on
            verdict = "accept" if known == "accept" else None
        else:
            verdict = self.chain(target, depth + 1)
        if verb == "goto":
            return verdict or "return"  # goto: the end of the target ends the caller
        return verdict  # jump: back to the caller's next rule

    def mangle(self, body: Mapping[str, Any]) -> str | None:
        """``meta mark set`` / ``ct mark set`` (a constant or a map's value)."""
        if body["key"] not in ({"meta": {"key": "mark"}}, {"ct": {"key": "mark"}}):
            raise Unsupported(f"mangle of {body['key']!r}")
        value = self.mapped(body["value"])
        if value is None:
            return "break"
        if "ct" in body["key"]:
            self.packet = replace(self.packet, ct_mark=_int(value))
        else:
            self.packet = replace(self.packet, mark=_int(value))
        return None

    def mapped(self, value: Any) -> Any:
        """A statement's argument: a constant, or what a map holds for the
        packet (None: the map has no such key, which ends the rule)."""
        if isinstance(value, dict) and "map" in value:
            return self.lookup(value["map"]["data"], self.value(value["map"]["key"]),
                               value["map"]["key"])
        return value

    def nat(self, kind: str, body: Mapping[str, Any]) -> str | None:
        """``dnat``/``snat`` to an address (constant or mapped), and a port."""
        if set(body) - {"addr", "port", "family"}:
            raise Unsupported(f"{kind} with {sorted(body)!r}")
        address = self.mapped(body.get("addr"))
        if address is None:
            return "break"
        if not isinstance(address, str) or not _is_address(address):
            raise Unsupported(f"{kind} to {address!r}")
        port = body.get("port")
        if port is not None and not isinstance(port, int):
            raise Unsupported(f"{kind} to port {port!r}")
        if kind == "dnat":
            moved = replace(self.packet, dst=address)
            if port is not None and self.packet.protocol in _PORTED:
                moved = replace(moved, dport=port)
        else:
            moved = replace(self.packet, src=address)
            if port is not None and self.packet.protocol in _PORTED:
                moved = replace(moved, sport=port)
        self.packet = moved
        return "accept"

    # ------------------------------------------------------------------ values

    def value(self, left: Any) -> Any:
        """The packet's value of a left-hand expression (None: not this packet's)."""
        if isinstance(left, dict) and "concat" in left:
            parts = [self.value(part) for part in left["concat"]]
            return None if any(p is None for p in parts) else tuple(parts)
        if isinstance(left, dict) and "&" in left:
            inner, mask = left["&"]
            found = self.value(inner)
            return None if found is None else found & _mask(inner, mask)
        if isinstance(left, dict) and "meta" in left:
            return self.meta(left["meta"]["key"])
        if isinstance(left, dict) and "payload" in left:
            return self.payload(left["payload"])
        if isinstance(left, dict) and "ct" in left and left["ct"]["key"] == "state":
            return self.packet.ct_state
        if isinstance(left, dict) and "ct" in left and left["ct"]["key"] == "mark":
            return self.packet.ct_mark
        raise Unsupported(f"expression {left!r}")

    def meta(self, key: str) -> Any:
        p = self.packet
        table: dict[str, Any] = {
            "iifname": p.iifname, "oifname": p.oifname, "mark": p.mark,
            "l4proto": p.protocol, "nfproto": 2 if p.version == 4 else 10,
            "protocol": ETHER_TYPES["ip" if p.version == 4 else "ip6"],
        }
        if key not in table:
            raise Unsupported(f"meta {key}")
        return table[key]

    def payload(self, payload: Mapping[str, Any]) -> Any:
        p = self.packet
        protocol, field = payload.get("protocol"), payload.get("field")
        if protocol is None:
            raise Unsupported(f"raw payload {payload!r}")
        if protocol == "ether":
            return {"saddr": p.ether_saddr.lower(),
                    "type": ETHER_TYPES["ip" if p.version == 4 else "ip6"]}.get(str(field))
        if protocol in ("ip", "ip6"):
            if (protocol == "ip") != (p.version == 4) or field not in ("saddr", "daddr"):
                return None
            return parsed_address(p.src if field == "saddr" else p.dst)
        if protocol == "arp":
            return None  # an IP probe has no ARP header
        if protocol == "th":
            return self._ports(field) if p.protocol in _PORTED else None
        if _HEADER_PROTOCOL.get(str(protocol)) != p.protocol:
            return None
        if protocol in ("icmp", "icmpv6"):
            return {"type": p.icmp_type, "code": p.icmp_code}.get(str(field))
        if field == "flags" and protocol == "tcp":
            return p.tcp_flags
        return self._ports(field)

    def _ports(self, field: Any) -> int | None:
        return {"sport": self.packet.sport, "dport": self.packet.dport}.get(str(field))

    # ------------------------------------------------------------------ matching

    def match(self, body: Mapping[str, Any]) -> bool:
        left, op, right = body["left"], body["op"], body["right"]
        found = self.value(left)
        if found is None:
            return False
        if op == "in":  # a flag test: any of the right's bits
            return bool(found & _flags(left, right))
        hit = self.contains(right, found, left)
        if op == "==":
            return hit
        if op == "!=":
            return not hit
        raise Unsupported(f"match operator {op!r}")

    def contains(self, right: Any, found: Any, left: Any) -> bool:
        """Whether ``found`` is the right-hand value, or in its set (anonymous or named)."""
        if isinstance(right, str) and right.startswith("@"):
            return self.rs.member(self.family, right, self._named(right), found, left)
        if isinstance(right, dict) and "set" in right:
            return any(_element_matches(e, found, left) for e in right["set"])
        return _element_matches(right, found, left)

    def lookup(self, data: Any, found: Any, left: Any) -> Any:
        """The value a map (named ``@m`` or anonymous) holds for ``found``; None: no key."""
        if found is None:
            return None
        elements = self._named(data) if isinstance(data, str) else data["set"]
        return self.rs.mapped(elements, found, left)

    def _named(self, name: str) -> list[Any]:
        found = self.rs.sets.get((self.family, name.lstrip("@")))
        if found is None:
            raise Unsupported(f"lookup in a set that does not exist: {name}")
        return found


@functools.lru_cache(maxsize=65536)
def parsed_address(text: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``ipaddress.ip_address``, each text parsed once: verify evaluates thousands
    of probes against the same few hundred addresses, and parsing them was most
    of its time (immutable values: sharing them is safe). ValueError as it."""
    return ipaddress.ip_address(text)


@functools.lru_cache(maxsize=65536)
def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``ipaddress.ip_network(text, strict=False)``, each text parsed once."""
    return ipaddress.ip_network(text, strict=False)


def _is_address(text: str) -> bool:
    try:
        parsed_address(text)
    except ValueError:
        return False
    return True


def _key(element: Any) -> Any:
    if isinstance(element, dict) and "elem" in element:
        return element["elem"]["val"]
    return element


def _pair(element: Any) -> tuple[Any, Any]:
    if isinstance(element, list) and len(element) == 2:
        return _key(element[0]), element[1]
    raise Unsupported(f"map element {element!r}")


def _kind(found: Any) -> Any:
    """What the literal elements are read as for ``found`` (see :func:`_literal`)."""
    if isinstance(found, tuple):
        return tuple(type(f) for f in found)
    return type(found)


class _SetIndex:
    """A named set's elements for values of one kind: the literals (and
    concatenations of literals) as a hash set of the values they denote, the
    rest (prefixes, ranges, wildcards) matched one by one, as before."""

    def __init__(self, elements: list[Any], found: Any, left: Any) -> None:
        self.exact: set[Any] = set()
        self.rest: list[Any] = []
        for element in elements:
            element = _key(element)
            value = _plain_value(element, found, left)
            if value is _COMPLEX:
                self.rest.append(element)
            elif value is not None:  # None: a literal no value of this kind equals
                self.exact.add(value)

    def holds(self, found: Any, left: Any) -> bool:
        try:
            if found in self.exact:
                return True
        except TypeError:  # an unhashable value: match element by element
            pass
        return any(_element_matches(e, found, left) for e in self.rest)


_COMPLEX = object()


class _MapIndex:
    """A map's elements for values of one kind: the first position and value of
    each literal key in a dict, the other keys (with their positions) matched in
    order; the first matching element wins, as in a scan of the elements."""

    def __init__(self, elements: list[Any], found: Any, left: Any) -> None:
        self.exact: dict[Any, tuple[int, Any]] = {}
        self.rest: list[tuple[int, Any, Any]] = []
        self.size = len(elements)
        for at, element in enumerate(elements):
            key, value = _pair(element)
            plain = _plain_value(key, found, left)
            if plain is _COMPLEX:
                self.rest.append((at, key, value))
            elif plain is not None:
                self.exact.setdefault(plain, (at, value))

    def value(self, found: Any, left: Any) -> Any:
        try:
            first = self.exact.get(found)
        except TypeError:  # unhashable: no literal key equals it here
            first = None
        limit = first[0] if first is not None else self.size
        for at, key, value in self.rest:
            if at > limit:
                break
            if _element_matches(key, found, left):
                return value
        return first[1] if first is not None else None


def _plain_value(element: Any, found: Any, left: Any) -> Any:
    """The value a literal element (or a concatenation of literals) denotes for
    values like ``found``; :data:`_COMPLEX` for any other element."""
    if isinstance(element, dict) and "concat" in element:
        parts = left.get("concat") if isinstance(left, dict) else None
        if parts is None or not isinstance(found, tuple) or len(parts) != len(found):
            return _COMPLEX
        values = tuple(_plain_value(e, f, p)
                       for e, f, p in zip(element["concat"], found, parts, strict=True))
        if any(v is _COMPLEX for v in values):
            return _COMPLEX
        return None if any(v is None for v in values) else values
    if isinstance(element, dict | list) or (isinstance(element, str) and element.endswith("*")):
        return _COMPLEX
    try:
        value = _literal(element, found, left)
        hash(value)
    except (Unsupported, TypeError, ValueError):
        return _COMPLEX
    return value


def _element_matches(element: Any, found: Any, left: Any) -> bool:
    """Does one right-hand value (literal, prefix, range, concatenation) hold ``found``?"""
    element = _key(element)
    if isinstance(element, dict) and "concat" in element:
        parts = left.get("concat") if isinstance(left, dict) else None
        if parts is None or not isinstance(found, tuple) or len(parts) != len(found):
            raise Unsupported(f"concatenation {element!r}")
        return all(_element_matches(e, f, p)
                   for e, f, p in zip(element["concat"], found, parts, strict=True))
    if isinstance(element, dict) and "prefix" in element:
        prefix = element["prefix"]
        network = _network(f"{prefix['addr']}/{prefix['len']}")
        return isinstance(found, Address) and found.version == network.version \
            and found in network
    if isinstance(element, dict) and "range" in element:
        low, high = (_literal(v, found, left) for v in element["range"])
        return type(low) is type(found) and low <= found <= high
    if isinstance(element, str) and element.endswith("*") and isinstance(found, str):
        return found.startswith(element[:-1])  # interface wildcard
    return bool(_literal(element, found, left) == found)


def _literal(value: Any, found: Any, left: Any) -> Any:
    """A right-hand constant in the domain of the left-hand expression's value."""
    if isinstance(found, Address):
        try:
            return parsed_address(value)
        except (TypeError, ValueError):
            return None
    if isinstance(found, str):
        return str(value)
    table = _symbols(left)
    if isinstance(value, int):
        return value
    text = str(value)
    if text.isdigit():
        return int(text)
    if text.startswith("0x"):
        return int(text, 16)
    if table is not None and text in table:
        return table[text]
    raise Unsupported(f"constant {value!r} for {left!r}")


def _symbols(left: Any) -> Mapping[str, int] | None:
    """The symbol table of the left-hand expression's values (nft describe)."""
    if not isinstance(left, dict):
        return None
    if "meta" in left:
        key = left["meta"]["key"]
        if key == "l4proto":
            return _L4Names()
        return {"nfproto": NFPROTO}.get(key)
    if "payload" in left:
        payload = left["payload"]
        return {("icmp", "type"): ICMP_TYPES, ("icmp", "code"): ICMP_CODES,
                ("icmpv6", "type"): ICMPV6_TYPES, ("icmpv6", "code"): ICMPV6_CODES,
                ("ether", "type"): ETHER_TYPES, ("tcp", "flags"): TCP_FLAGS,
                }.get((payload.get("protocol"), payload.get("field")))
    if "ct" in left:
        return CT_STATES
    if "&" in left:
        return _symbols(left["&"][0])
    return None


class _L4Names(dict[str, int]):
    """Protocol names as ``meta l4proto`` prints them (getprotobyname(3))."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and protocol_number(key) is not None

    def __getitem__(self, key: str) -> int:
        number = protocol_number(key)
        if number is None:
            raise KeyError(key)
        return number


def _mask(inner: Any, mask: Any) -> int:
    if isinstance(mask, list):
        return _flags(inner, mask)
    return int(_literal(mask, 0, inner))


def _flags(left: Any, right: Any) -> int:
    names = right if isinstance(right, list) else [right]
    table = _symbols(left) or {}
    bits = 0
    for name in names:
        bits |= table[name] if isinstance(name, str) and name in table else int(name)
    return bits


def _int(value: Any) -> int:
    if isinstance(value, int):
        return value
    text = str(value)
    return int(text, 16) if text.startswith("0x") else int(text)


# ---------------------------------------------------------------------- paths

#: Interface names of the probe's other end (never a tap: ``tap*`` means a port).
UPLINK = "uplink-probe"
BRIDGE = "br-probe"
#: The source MAC of a frame from outside the host's instances.
OUTSIDE_MAC = "02:00:00:00:00:01"


def paths(topology: str, tap: str, direction: str) -> list[Stage]:
    """The hooks a packet to (ingress) or from (egress) ``tap`` crosses when the
    host forwards it (verify's module docstring, :mod:`secfw.audit.verify`)."""
    return paths_before(topology, tap, direction) + paths_after(topology, tap, direction)


def paths_before(topology: str, tap: str, direction: str) -> list[Stage]:
    """The prerouting hooks: where DNAT decides which way the packet goes."""
    iif = UPLINK if direction == "ingress" else tap
    if topology == "routed":
        return [Stage("inet", "prerouting", iif, "")]
    return [Stage("bridge", "prerouting", iif, ""), Stage("inet", "prerouting", BRIDGE, "")]


def paths_after(topology: str, tap: str, direction: str, local: bool = False
                ) -> list[Stage]:
    """The hooks after prerouting: ``local`` — the (translated) destination is
    one of the host's own addresses — goes to ``input``; else forward and
    postrouting. On a bridged host a frame for the host crosses the bridge's
    ``input`` hook, then the bridge device's IP input (br_netfilter)."""
    iif, oif = (UPLINK, tap) if direction == "ingress" else (tap, UPLINK)
    if topology == "routed":
        if local:
            return [Stage("inet", "input", iif, "")]
        return [Stage("inet", "forward", iif, oif), Stage("inet", "postrouting", iif, oif)]
    if local:
        return [Stage("bridge", "input", iif, ""), Stage("inet", "input", BRIDGE, "")]
    return [Stage("inet", "forward", BRIDGE, BRIDGE), Stage("bridge", "forward", iif, oif),
            Stage("bridge", "postrouting", iif, oif),
            Stage("inet", "postrouting", BRIDGE, BRIDGE)]


def topology_of(ruleset: NftRuleset) -> str:
    """``bridged`` when secfw's ``bridge`` table names taps by mark (its
    ``egress_marks`` map), else ``routed`` — a routed host's ``bridge`` table only
    holds the guard chains that drop bridged tap traffic (docs/nftables.md)."""
    return "bridged" if ("bridge", "egress_marks") in ruleset.sets else "routed"

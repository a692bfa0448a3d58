"""One canonical form for a rule's expressions, whether rendered or listed.

Drift is judged by content: a rule in the kernel is secfw's rule only when its
expressions are the ones secfw wrote — its comment (a digest of the rendered
text, :func:`.syntax.make_rule`) says only which rule it claims to be. But nft
does not list a rule as it was written: libnftables rebuilds expressions from
the kernel's bytecode and "delinearizes" them (nft(8), and measured with nft
1.0.6, ``tests/golden/*.listing.json``):

* a protocol dependency it would add itself is hidden: ``meta l4proto 6 th
  dport 80`` lists as ``tcp dport 80``; ``meta nfproto ipv6 meta l4proto 58
  icmpv6 type 128`` as ``icmpv6 type echo-request``; ``meta nfproto ipv4 meta
  l4proto 1`` as ``meta l4proto icmp``; ``ether type arp`` before an ``arp``
  header field disappears;
* numbers with a symbol table come back as names (``meta l4proto``, ICMP and
  ICMPv6 types and codes, ``ether type``), digit strings as integers;
* anonymous sets and verdict maps come back in the kernel's element order;
* ``ct state established`` is a flag test (JSON op ``in``), already written so
  by :func:`.syntax.statement_json`.

:func:`canonical_expr` undoes each of these on either side, so the JSON of a
rendered rule (:func:`.syntax.statement_json`) and the listing of the same rule
give equal values, and any rule that matches other packets or has another
verdict gives a different one. Dropping a dependency never hides a difference:
it is dropped only where a later expression of the same rule implies it, and
nft adds exactly that dependency to such an expression whether or not it was
written (so both bytecodes hold it).

Contract, proven by ``tests/netns/test_nft_executor.py`` on real kernels: every
rule shape the renderer emits (the golden clouds, every IP protocol, every ICMP
and ICMPv6 type and code, every port protocol) lists back to a canonical form
equal to its rendering's — else every full pass would rewrite it (Neutron's
endless re-apply).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any

from secfw.constants import protocols

#: A rule's expressions in canonical form: nested tuples, hashable, comparable.
Canon = tuple[Any, ...]

# Symbol tables as ``nft describe`` prints them (nft 1.0.6; checked against the
# installed nft by tests/netns/test_nft_executor.py).
ICMP_TYPES = {
    "echo-reply": 0, "destination-unreachable": 3, "source-quench": 4, "redirect": 5,
    "echo-request": 8, "router-advertisement": 9, "router-solicitation": 10,
    "time-exceeded": 11, "parameter-problem": 12, "timestamp-request": 13,
    "timestamp-reply": 14, "info-request": 15, "info-reply": 16,
    "address-mask-request": 17, "address-mask-reply": 18,
}
ICMP_CODES = {
    "net-unreachable": 0, "host-unreachable": 1, "prot-unreachable": 2,
    "port-unreachable": 3, "frag-needed": 4, "net-prohibited": 9, "host-prohibited": 10,
    "admin-prohibited": 13,
}
ICMPV6_TYPES = {
    "destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3,
    "parameter-problem": 4, "echo-request": 128, "echo-reply": 129,
    "mld-listener-query": 130, "mld-listener-report": 131, "mld-listener-done": 132,
    "mld-listener-reduction": 132, "nd-router-solicit": 133, "nd-router-advert": 134,
    "nd-neighbor-solicit": 135, "nd-neighbor-advert": 136, "nd-redirect": 137,
    "router-renumbering": 138, "ind-neighbor-solicit": 141, "ind-neighbor-advert": 142,
    "mld2-listener-report": 143,
}
ICMPV6_CODES = {
    "no-route": 0, "admin-prohibited": 1, "addr-unreachable": 3, "port-unreachable": 4,
    "policy-fail": 5, "reject-route": 6,
}
ETHER_TYPES = {"ip": 0x0800, "arp": 0x0806, "ip6": 0x86DD, "8021q": 0x8100,
               "vlan": 0x8100, "8021ad": 0x88A8}
NFPROTO = {"ipv4": 2, "ipv6": 10}

#: Header keywords that are a layer-4 protocol: the ``meta l4proto`` they imply.
_L4 = protocols("tcp", "udp", "udplite", "sctp", "dccp", "icmp", "icmpv6", "ah", "esp", "comp")
#: Protocols whose ``th`` (transport header) ports nft names by the protocol.
_TH = {number: name for name, number in _L4.items() if name in
       ("tcp", "udp", "udplite", "sctp", "dccp")}
#: Header keywords that imply a network protocol (``meta nfproto``) …
_NF = {"ip": 2, "icmp": 2, "ip6": 10, "icmpv6": 10}
#: … and an ethertype (bridge family).
_ETHER = {"ip": 0x0800, "icmp": 0x0800, "ip6": 0x86DD, "icmpv6": 0x86DD, "arp": 0x0806}
#: ``meta l4proto`` values that nft treats as implying the network protocol.
_L4_NF = {1: 2, 58: 10}

# Match keys whose values have a symbol table: (kind, key) → table.
_META_SYMBOLS = {"nfproto": NFPROTO}
_PAYLOAD_SYMBOLS = {("icmp", "type"): ICMP_TYPES, ("icmp", "code"): ICMP_CODES,
                    ("icmpv6", "type"): ICMPV6_TYPES, ("icmpv6", "code"): ICMPV6_CODES,
                    ("ether", "type"): ETHER_TYPES}

Dependency = tuple[str, int]  # ("l4proto", 6), ("nfproto", 2), ("ether", 0x806)


def canonical_expr(expr: Sequence[Any]) -> Canon:
    """The canonical form of a rule's ``expr`` (libnftables JSON statements,
    libnftables-json(5)); see the module docstring."""
    dependencies = [_dependency(s) for s in expr]
    if not any(dependencies):  # most rules: nothing nft would rewrite but constants
        return tuple(_freeze(s) for s in expr)
    statements = list(_retarget_th(expr, dependencies))
    kept: list[Any] = []
    implied: set[Dependency] = set()
    for statement, dependency in zip(reversed(statements), reversed(dependencies), strict=True):
        if dependency is not None and dependency in implied:
            continue  # nft adds (and hides) it anyway: see the module docstring
        implied |= _implications(statement, dependency)
        kept.append(statement)
    return tuple(_freeze(s) for s in reversed(kept))


def _retarget_th(expr: Iterable[Any], dependencies: Iterable[Dependency | None]
                 ) -> Iterator[Any]:
    """``th sport|dport`` after ``meta l4proto N`` (one value) → ``<N's name> …``."""
    l4: int | None = None
    for statement, dependency in zip(expr, dependencies, strict=True):
        if dependency is not None and dependency[0] == "l4proto":
            l4 = dependency[1]
        elif l4 in _TH:
            statement = _renamed_th(statement, _TH[l4])
        yield statement


def _renamed_th(node: Any, protocol: str) -> Any:
    if isinstance(node, list):
        return [_renamed_th(item, protocol) for item in node]
    if not isinstance(node, dict):
        return node
    payload = node.get("payload")
    if (isinstance(payload, dict) and payload.get("protocol") == "th"
            and payload.get("field") in ("sport", "dport")):
        return {"payload": {"protocol": protocol, "field": payload["field"]}}
    return {key: _renamed_th(value, protocol) for key, value in node.items()}


def _dependency(statement: Any) -> Dependency | None:
    """``meta l4proto N`` / ``meta nfproto F`` / ``ether type T`` with one value
    (an equality): the protocol dependency it states, as numbers."""
    match = statement.get("match") if isinstance(statement, dict) else None
    if not isinstance(match, dict) or match.get("op") not in ("==", None):
        return None
    left, right = match.get("left"), match.get("right")
    if not isinstance(left, dict) or isinstance(right, (dict, list)):
        return None
    meta = left.get("meta")
    if isinstance(meta, dict) and meta.get("key") in ("l4proto", "nfproto"):
        key = str(meta["key"])
        number = protocol_number(right) if key == "l4proto" else _symbol(right, NFPROTO)
        return None if number is None else (key, number)
    payload = left.get("payload")
    if isinstance(payload, dict) and (payload.get("protocol"), payload.get("field")) == (
            "ether", "type"):
        number = _symbol(right, ETHER_TYPES)
        return None if number is None else ("ether", number)
    return None


def _implications(statement: Any, dependency: Dependency | None) -> set[Dependency]:
    """The dependencies a statement (stating ``dependency``) implies: those of
    every header it reads."""
    found: set[Dependency] = set()
    for protocol in _protocols(statement):
        if protocol in _L4:
            found.add(("l4proto", _L4[protocol]))
        if protocol in _NF:
            found.add(("nfproto", _NF[protocol]))
        if protocol in _ETHER:
            found.add(("ether", _ETHER[protocol]))
    if dependency is not None and dependency[0] == "l4proto" and dependency[1] in _L4_NF:
        found.add(("nfproto", _L4_NF[dependency[1]]))
    return found


def _protocols(node: Any) -> Iterator[str]:
    """Every named header (``payload.protocol``) ``node`` reads."""
    if isinstance(node, list):
        for item in node:
            yield from _protocols(item)
    elif isinstance(node, dict):
        payload = node.get("payload")
        if isinstance(payload, dict) and "protocol" in payload:
            yield str(payload["protocol"])
        for value in node.values():
            yield from _protocols(value)


@lru_cache(maxsize=512)
def protocol_number(value: Any) -> int | None:
    """A ``meta l4proto`` value (number, digits, or a name from /etc/protocols as
    nft prints it, getprotobyname(3)) as a number; None when unknown."""
    if isinstance(value, int):
        return value
    text = str(value)
    if text.isdigit():
        return int(text)
    if text in _L4:
        return _L4[text]
    try:
        return socket.getprotobyname(text)
    except OSError:
        return None


def _symbol(value: Any, table: Mapping[str, int]) -> int | None:
    if isinstance(value, int):
        return value
    text = str(value)
    if text.isdigit():
        return int(text)
    if text.startswith("0x"):
        try:
            return int(text, 16)
        except ValueError:
            return None
    return table.get(text)


# --------------------------------------------------------------------------- freezing


def _freeze(node: Any, table: Mapping[str, int] | None = None, l4: bool = False) -> Any:
    """``node`` as nested tuples, constants in normal form (``table``: the symbol
    table of the value being frozen; ``l4``: it is a ``meta l4proto`` value)."""
    if isinstance(node, list):
        return ("list", *(_freeze(item, table, l4) for item in node))
    if isinstance(node, dict):
        return _freeze_object(node, table, l4)
    return _atom(node, table, l4)


def _freeze_object(node: Mapping[str, Any], table: Mapping[str, int] | None, l4: bool) -> Any:
    if len(node) != 1:  # keys sorted: the listing need not keep the rendering's order
        return tuple(sorted((str(k), _freeze(v, table, l4)) for k, v in node.items()))
    ((kind, body),) = node.items()
    if kind == "set":  # anonymous set / verdict map: unordered
        items = body if isinstance(body, list) else [body]
        return ("set", tuple(sorted((_freeze(i, table, l4) for i in items), key=repr)))
    if kind == "prefix":
        return _prefix(body)
    if kind == "match":
        return ("match", _freeze_match(body))
    if kind == "vmap":  # its keys are values of its key expression
        key = body.get("key")
        return ("vmap", _freeze(key), _freeze(body.get("data"), *_values(key)))
    return ((str(kind), _freeze(body, table, l4)),)


def _freeze_match(match: Mapping[str, Any]) -> Any:
    left = match.get("left")
    table, l4 = _values(left)
    op = match.get("op", "==")
    return (str(op), _freeze(left), _freeze(match.get("right"), table, l4))


def _values(left: Any) -> tuple[Mapping[str, int] | None, bool]:
    """The symbol table of what ``left`` is compared with, and whether it is a
    ``meta l4proto``."""
    if not isinstance(left, dict):
        return None, False
    meta = left.get("meta")
    if isinstance(meta, dict):
        key = meta.get("key")
        return _META_SYMBOLS.get(str(key)), key == "l4proto"
    payload = left.get("payload")
    if isinstance(payload, dict):
        field = (str(payload.get("protocol")), str(payload.get("field")))
        return _PAYLOAD_SYMBOLS.get(field), False
    return None, False


def _atom(value: Any, table: Mapping[str, int] | None, l4: bool) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if l4:
        number = protocol_number(value)
        return value if number is None else number
    if table is not None:
        number = _symbol(value, table)
        return value if number is None else number
    if isinstance(value, int):
        return value
    text = str(value)
    if text.isdigit():
        return int(text)
    if text.startswith("0x"):
        return text.lower()
    return _address(text)


@lru_cache(maxsize=1 << 14)
def _address(text: str) -> str:
    """An address in :mod:`ipaddress`'s text (IPv6 compressed); anything else as is."""
    if not any(c in text for c in ".:") or not text[0].isalnum():
        return text
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def _prefix(prefix: Mapping[str, Any]) -> Any:
    """A prefix as a canonical network; a whole-length one is the address itself."""
    try:
        network = ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}", strict=False)
    except (ValueError, KeyError):
        return ("prefix", _freeze(dict(prefix)))
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return ("prefix", str(network))

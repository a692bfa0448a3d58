"""Read-back: ``iptables-save`` / ``ipset list -o save`` output → :class:`IptState`.

Only secfw's objects are kept: chains named ``secfw-…`` with their rules, the
rules of the built-in chains that jump (``-j``/``-g``) to a ``secfw-…`` chain,
and ipsets named ``secfw-…``. Everything else in the output is ignored, never
parsed for meaning.

The normal form is the one :func:`.render.render` writes, so an unchanged
kernel reads back *equal* and the plan is empty. iptables-save prints some
things differently from how secfw writes them; each difference is undone here
(measured with iptables 1.8.9, legacy and nft, and ipset 7.17):

* ``-p 6`` prints as ``-p tcp`` (names from the built-in table and
  ``/etc/protocols``, ``getprotobynumber(3)``): names go back to numbers;
* MACs print in lower case (Neutron's read-back compared them in upper case
  and re-applied forever): lower-cased again, whatever a tool printed;
* addresses are re-printed through :mod:`ipaddress` (IPv6 compression of
  ``inet_ntop`` and Python differ for IPv4-mapped addresses);
* ipset prints a host without ``/32``/``/128``: the form render uses too.

Anything else that differs (a rule edited by hand, a foreign rule in a secfw
chain) reads back as different, and the plan rewrites that chain. In the
built-in chains only secfw's jumps are kept, and whether some other rule comes
before one of them (``Table.buried``): the plan then moves the jump back to the
top, leaving the other rule where it is (below).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import lru_cache

from secfw.backends.iptables.render import (
    BUILTIN_CHAINS,
    DEFAULT_MAXELEM,
    FAMILIES,
    PREFIX,
    IpSet,
    IptState,
    Table,
    element_key,
)
from secfw.compiler.ir import Family
from secfw.constants import protocols
from secfw.errors import BackendError

#: Protocol names iptables knows without /etc/protocols (libxtables'
#: ``xtables_chain_protos``), plus the name /etc/protocols gives ICMPv6.
_PROTOCOLS = protocols("tcp", "udp", "udplite", "icmp", "icmpv6", "ipv6-icmp", "esp", "ah",
                       "sctp", "mh") | {"all": 0}
_PROTO = re.compile(r"(?<=-p )([A-Za-z][\w.+-]*)")
_MAC = re.compile(r"(?<=--mac-source )(\S+)")
_ADDRESS = re.compile(r"(?<=-[sd] )([0-9A-Fa-f.:]+/\d+)")
_TARGET = re.compile(r"(?:^| )-[jg] (secfw-\S*)$")
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_.:/,+!@%=-]+")


@lru_cache(maxsize=256)
def protocol_number(name: str) -> str:
    """A protocol name as iptables-save prints it → its number (as text)."""
    known = _PROTOCOLS.get(name.lower())
    if known is not None:
        return str(known)
    try:
        return str(socket.getprotobyname(name))
    except OSError:
        return name  # not a name libc knows: left as printed (reads as different)


@lru_cache(maxsize=1 << 16)
def _address(text: str) -> str:
    try:
        return ipaddress.ip_network(text, strict=False).with_prefixlen
    except ValueError:
        return text


def normalise_rule(rule: str) -> str:
    """One rule as iptables-save prints it (after ``-A CHAIN``) in render's form."""
    if '"' in rule or "\\" in rule:
        rule = " ".join(quote(token) for token in split_quoted(rule))
    rule = _PROTO.sub(lambda m: protocol_number(m.group(1)), rule)
    rule = _MAC.sub(lambda m: m.group(1).lower(), rule)
    return _ADDRESS.sub(lambda m: _address(m.group(1)), rule)


def split_quoted(text: str) -> list[str]:
    """Words as iptables-restore reads them: blanks separate, ``"…"`` groups,
    backslash escapes the next character (iptables-restore(8) input format)."""
    tokens: list[str] = []
    current: list[str] = []
    quoted = escaped = started = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = started = True
        elif char == '"':
            quoted, started = not quoted, True
        elif char in " \t" and not quoted:
            if started:
                tokens.append("".join(current))
            current, started = [], False
        else:
            current.append(char)
            started = True
    if quoted:
        raise BackendError(f"iptables: unbalanced quote in {text!r}")
    if started:
        tokens.append("".join(current))
    return tokens


def quote(token: str) -> str:
    """``token`` as a word iptables-restore reads back unchanged."""
    if _SAFE_TOKEN.fullmatch(token):
        return token
    escaped = token.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


# --------------------------------------------------------------------------- #
# iptables-save.
# --------------------------------------------------------------------------- #


def parse_table(text: str, family: Family, table: str = "filter") -> Table:
    """secfw's chains and jumps in ``iptables-save -t TABLE`` output ``text``,
    and the built-in chains where another rule precedes one of secfw's jumps
    (iptables-save lists each chain's rules in order)."""
    chains: dict[str, list[str]] = {}
    jumps: Counter[tuple[str, str]] = Counter()
    foreign: set[str] = set()  # built-in chains where a rule not secfw's was seen
    buried: set[str] = set()
    for line in _table_section(text, table):
        if line.startswith(":" + PREFIX):
            chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("-A "):
            builtin = _parse_append(line, chains, jumps)
            if builtin is None:
                continue
            name, ours = builtin
            if not ours:
                foreign.add(name)
            elif name in foreign:
                buried.add(name)
    return Table(family, {name: tuple(rules) for name, rules in chains.items()}, dict(jumps),
                 frozenset(buried))


def _table_section(text: str, table: str) -> Iterator[str]:
    """The lines of the ``*TABLE`` table (up to its COMMIT)."""
    inside = False
    for line in text.splitlines():
        if line == f"*{table}":
            inside = True
        elif line == "COMMIT":
            inside = False
        elif inside:
            yield line


def _parse_append(line: str, chains: dict[str, list[str]],
                  jumps: Counter[tuple[str, str]]) -> tuple[str, bool] | None:
    """Record one ``-A`` line; for a built-in chain, return (chain, whether the
    rule is one of secfw's jumps)."""
    _, chain, *rest = line.split(" ", 2)
    rule = rest[0] if rest else ""
    if chain.startswith(PREFIX):
        chains.setdefault(chain, []).append(normalise_rule(rule))
        return None
    if chain not in BUILTIN_CHAINS:
        return None
    if PREFIX in rule:
        normal = normalise_rule(rule)
        if _TARGET.search(normal):
            jumps[(chain, normal)] += 1
            return chain, True
    return chain, False


# --------------------------------------------------------------------------- #
# ipset.
# --------------------------------------------------------------------------- #


def parse_ipsets(text: str) -> dict[str, IpSet]:
    """secfw's sets in ``ipset list -o save`` output (``create``/``add`` lines)."""
    headers: dict[str, tuple[str, Family, int]] = {}
    elements: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or not words[1].startswith(PREFIX):
            continue
        if words[0] == "create":
            headers[words[1]] = _header(words)
            elements.setdefault(words[1], [])
        elif words[0] == "add":
            elements.setdefault(words[1], []).append(_element(words[2:]))
    return {name: IpSet(name, family, tuple(sorted(set(elements[name]), key=element_key)),
                        maxelem, kind)
            for name, (kind, family, maxelem) in sorted(headers.items())}


def _header(words: list[str]) -> tuple[str, Family, int]:
    """(type, family, maxelem) of ``create NAME TYPE [option value]…``."""
    options = dict(zip(words[3::2], words[4::2], strict=False))
    family: Family = "ipv6" if options.get("family") == "inet6" else "ipv4"
    try:
        maxelem = int(options.get("maxelem", DEFAULT_MAXELEM))
    except ValueError as exc:
        raise BackendError(f"ipset: bad maxelem in {' '.join(words)!r}") from exc
    return words[2], family, maxelem


def _element(words: list[str]) -> str:
    """An element in render's form (``addr[/len][,iface]``, a host without its
    prefix length); options it was listed with are kept after it."""
    address, comma, iface = words[0].partition(",")
    try:
        network = ipaddress.ip_network(address, strict=False)
    except ValueError:
        return " ".join(words)
    first = (str(network.network_address) if network.prefixlen == network.max_prefixlen
             else network.with_prefixlen)
    return " ".join([first + comma + iface, *words[1:]])


# --------------------------------------------------------------------------- #
# The whole state.
# --------------------------------------------------------------------------- #


def from_save(saves: dict[Family, str], ipsets: str, nat_save: str = "") -> IptState | None:
    """The state in the tools' output (``nat_save``: ``iptables-save -t nat``);
    None when secfw has nothing at all there."""
    tables = {family: parse_table(saves.get(family, ""), family) for family in FAMILIES}
    sets = parse_ipsets(ipsets)
    nat = parse_table(nat_save, "ipv4", "nat")
    if not sets and not any(t.chains or t.jumps for t in (*tables.values(), nat)):
        return None
    return IptState(tables, sets, nat)


def empty_state() -> IptState:
    """No secfw chain, jump or set (what a plan from nothing starts from)."""
    return IptState({family: Table(family, {}, {}) for family in FAMILIES}, {})


def element_count(state: IptState | None) -> int:
    """Elements in every set of ``state`` (for metrics)."""
    return 0 if state is None else sum(len(s.elements) for s in state.sets.values())


def secfw_sets(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that belong to secfw."""
    return [name for name in names if name.startswith(PREFIX)]

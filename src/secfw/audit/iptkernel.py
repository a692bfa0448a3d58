"""iptables/ip6tables rules and ipsets, as the kernel listed them, evaluated on
one packet (``secfw audit verify --backend iptables``).

The input is what ``iptables-save -t filter`` / ``ip6tables-save -t filter`` and
``ipset list -o save`` print; every rule of the ``filter`` table is parsed into
its matches and target and evaluated by meaning, as iptables(8) and
iptables-extensions(8) define them: ``-s``/``-d`` (with ``!``), ``-i``/``-o``
(``+`` is a wildcard), ``-p``, and the matches ``tcp``/``udp``/``sctp``
(``--sport``, ``--dport``, ``--tcp-flags``, ``--syn``), ``multiport``,
``icmp``/``icmp6``, ``conntrack``/``state``, ``mac``, ``set``, ``physdev``,
``mark``, ``connmark``, ``comment``; targets ``ACCEPT``, ``DROP``, ``REJECT`` (a
drop for a first packet), ``RETURN``, ``MARK``/``CONNMARK --set-xmark``, ``DNAT
--to-destination``, ``SNAT --to-source`` (they rewrite the probe and accept:
iptables-extensions(8), only a connection's first packet — every probe — meets
the nat table), ``-j CHAIN``, ``-g CHAIN``.
An option this module does not know makes its rule :class:`Unsupported` when a
packet reaches it — reported, never guessed. The ``filter`` tables and the IPv4
``nat`` table (floating IPs, the metadata redirect) are read. Parsing is pure;
:func:`read_iptables` is the one function that runs the tools.
"""

from __future__ import annotations

import ipaddress
import itertools
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from secfw.audit.nftkernel import TCP_FLAGS, Unsupported, parsed_address
from secfw.backends.iptables.render import DEFAULT_MARK
from secfw.backends.nftables.canonical import ICMP_TYPES, ICMPV6_TYPES, protocol_number

_CT = {"INVALID": "invalid", "ESTABLISHED": "established", "RELATED": "related",
       "NEW": "new", "UNTRACKED": "untracked", "SNAT": "snat", "DNAT": "dnat"}
_PORTED = frozenset({6, 17, 33, 132, 136})
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class IptProbe:
    """One packet at the ``filter`` table's FORWARD hook (br_netfilter's for a
    bridged frame: ``physdev_*`` are the bridge ports, ``iif``/``oif`` the bridge)."""

    iif: str
    oif: str
    src: str
    dst: str
    protocol: int
    mac: str
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    tcp_flags: int = TCP_FLAGS["syn"]
    ct_state: str = "new"
    physdev_in: str | None = None
    physdev_out: str | None = None
    mark: int = 0
    ctmark: int = 0

    @property
    def version(self) -> int:
        return parsed_address(self.src).version


Match = Callable[[IptProbe, "IptTables"], bool]
#: A stand-in for chains whose effect is already known (as :data:`.nftkernel.Stub`):
#: ``accept`` — the group chain sets the allow mark (backends/iptables/render.py:
#: a group chain's rules ``-g secfw-allow``, which sets it) — ``continue``, or None.
Stub = Callable[[str, IptProbe], str | None]


@dataclass
class IptRule:
    """One parsed rule: its matches (all must hold), its target and arguments."""

    matches: list[Match] = field(default_factory=list)
    target: str | None = None
    goto: bool = False
    xmark: tuple[int, int] | None = None
    nat_to: tuple[str, int | None] | None = None
    unsupported: str | None = None


@dataclass
class IptTables:
    """The filter table of one family and the ipsets (shared by both families)."""

    chains: dict[str, list[IptRule]]
    policies: dict[str, str]
    ipsets: dict[str, list[Network]]

    def verdict(self, chain: str, probe: IptProbe) -> str:
        """``accept`` or ``drop`` for a packet entering built-in ``chain``."""
        return self.run(chain, probe)[0]

    def run(self, chain: str, probe: IptProbe, stub: Stub | None = None
            ) -> tuple[str, IptProbe]:
        """The verdict of built-in ``chain`` and the packet as it leaves it
        (marks set, addresses translated); ``stub``: chains answered without
        evaluating them (:data:`Stub`)."""
        verdict, probe = self._chain(chain, probe, 0, stub)
        if verdict in (None, "RETURN"):
            verdict = self.policies.get(chain, "ACCEPT")
        return ("accept" if verdict == "ACCEPT" else "drop"), probe

    def chain_effect(self, name: str, probe: IptProbe) -> tuple[str | None, IptProbe]:
        """User chain ``name`` alone: its verdict (None: it ran to its end or
        returned) and the packet as it leaves it (marks set)."""
        return self._chain(name, probe, 1)

    def _chain(self, name: str, probe: IptProbe, depth: int, stub: Stub | None = None
               ) -> tuple[str | None, IptProbe]:
        if depth > 64:
            raise Unsupported("chain recursion")
        if name not in self.chains:
            raise Unsupported(f"jump to a chain that does not exist: {name}")
        for rule in self.chains[name]:
            if rule.unsupported is not None:
                raise Unsupported(rule.unsupported)
            if not all(match(probe, self) for match in rule.matches):
                continue
            if rule.target in ("MARK", "CONNMARK") and rule.xmark is not None:
                probe = _set_mark(probe, rule.target, rule.xmark)
                continue
            if rule.target in (None, "MARK", "CONNMARK"):
                continue
            if rule.target in ("DNAT", "SNAT") and rule.nat_to is not None:
                return "ACCEPT", _translated(probe, rule.target, rule.nat_to)
            if rule.target in ("ACCEPT", "DROP", "REJECT"):
                return rule.target.replace("REJECT", "DROP"), probe
            if rule.target == "RETURN":
                return None, probe
            known = stub(rule.target, probe) if stub is not None else None
            if known is not None:  # a group chain: it sets the allow mark or not
                verdict = None
                if known == "accept":
                    probe = _set_mark(probe, "MARK", (DEFAULT_MARK, DEFAULT_MARK))
            else:
                verdict, probe = self._chain(rule.target, probe, depth + 1, stub)
            if verdict is not None:
                return verdict, probe
            if rule.goto:
                return None, probe  # -g: the end of the target returns past this chain
        return None, probe


def _set_mark(probe: IptProbe, target: str, xmark: tuple[int, int]) -> IptProbe:
    """``--set-xmark value/mask``: zero the mask's bits, then xor the value in."""
    value, mask = xmark
    if target == "MARK":
        return replace(probe, mark=(probe.mark & ~mask) ^ value)
    return replace(probe, ctmark=(probe.ctmark & ~mask) ^ value)


def _translated(probe: IptProbe, target: str, to: tuple[str, int | None]) -> IptProbe:
    address, port = to
    ported = probe.protocol in _PORTED and port is not None
    if target == "DNAT":
        return replace(probe, dst=address, dport=port if ported else probe.dport)
    return replace(probe, src=address, sport=port if ported else probe.sport)


def parse(save: str, ipset_save: str, table_name: str = "filter") -> IptTables:
    """The table ``table_name`` of one ``*-save`` output and the ipsets."""
    chains: dict[str, list[IptRule]] = {}
    policies: dict[str, str] = {}
    table = None
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif table != table_name or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            chains.setdefault(name, [])
            if policy != "-":
                policies[name] = policy
        elif line.startswith("-A "):
            tokens = shlex.split(line)
            chains.setdefault(tokens[1], []).append(parse_rule(tokens[2:]))
    return IptTables(chains, policies, parse_ipsets(ipset_save))


def parse_ipsets(text: str) -> dict[str, list[Network]]:
    """``ipset list -o save``: each set's networks (hosts as /32, /128)."""
    sets: dict[str, list[Network]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "create":
            sets.setdefault(words[1], [])
        elif len(words) >= 3 and words[0] == "add":
            sets.setdefault(words[1], []).append(ipaddress.ip_network(words[2], strict=False))
    return sets


def parse_rule(tokens: Sequence[str]) -> IptRule:
    """One rule's options after ``-A CHAIN``."""
    rule = IptRule()
    i, negate, module = 0, False, ""
    try:
        while i < len(tokens):
            option = tokens[i]
            if option == "!":
                negate, i = True, i + 1
                continue
            if option in ("-m", "--match"):
                module = tokens[i + 1]
            if module == "connmark" and option == "--mark":
                option = "--connmark"  # the same option name as -m mark's, another mark
            used = _option(rule, option, tokens[i + 1:], negate)
            i += 1 + used
            negate = False
    except (IndexError, ValueError) as exc:
        rule.unsupported = f"rule {' '.join(tokens)!r}: {exc}"
    except Unsupported as exc:
        rule.unsupported = str(exc)
    return rule


def _negated(match: Match, negate: bool) -> Match:
    return (lambda p, t: not match(p, t)) if negate else match


def _option(rule: IptRule, option: str, rest: Sequence[str], negate: bool) -> int:
    """Apply one option to ``rule``; how many arguments it took."""
    simple = _SIMPLE.get(option)
    if simple is not None:
        rule.matches.append(_negated(simple(rest[0]), negate))
        return 1
    if option in ("-m", "--match"):
        return 1  # a module's options are recognised by name below
    if option in ("-j", "--jump", "-g", "--goto"):
        rule.target, rule.goto = rest[0], option in ("-g", "--goto")
        return 1
    if option in ("--set-xmark", "--set-mark"):
        value, _, mask = rest[0].partition("/")
        rule.xmark = (int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF)
        return 1
    if option == "--tcp-flags":
        flags, comp = _flag_bits(rest[0]), _flag_bits(rest[1])
        rule.matches.append(_negated(
            lambda p, _t: p.protocol == 6 and (p.tcp_flags & flags) == comp, negate))
        return 2
    if option == "--syn":
        syn_mask, syn = _flag_bits("FIN,SYN,RST,ACK"), TCP_FLAGS["syn"]
        rule.matches.append(_negated(
            lambda p, _t: p.protocol == 6 and (p.tcp_flags & syn_mask) == syn, negate))
        return 0
    if option == "--match-set":
        name, direction = rest[0], rest[1].split(",")[0]
        rule.matches.append(_negated(_in_set(name, direction), negate))
        return 2
    if option in ("--physdev-is-bridged", "--physdev-is-in", "--physdev-is-out"):
        key = option
        rule.matches.append(_negated(lambda p, _t: _physdev_flag(p, key), negate))
        return 0
    if option in ("--to-destination", "--to-source"):
        address, _, port = rest[0].partition(":")
        if "-" in address or "-" in port:
            raise Unsupported(f"iptables {option} range {rest[0]!r}")
        rule.nat_to = (str(ipaddress.IPv4Address(address)), int(port) if port else None)
        return 1
    if option in ("--comment", "--reject-with"):
        return 1
    raise Unsupported(f"iptables option {option!r}")


def _flag_bits(text: str) -> int:
    if text == "ALL":
        return 0xFF
    if text == "NONE":
        return 0
    return sum(TCP_FLAGS[name.lower()] for name in text.split(","))


def _address(attribute: str) -> Callable[[str], Match]:
    def make(text: str) -> Match:
        network = ipaddress.ip_network(text, strict=False)
        return lambda p, _t: _within(getattr(p, attribute), network)
    return make


def _within(address: str, network: Network) -> bool:
    addr = parsed_address(address)  # parsed once per text: verify's hot path
    return addr.version == network.version and addr in network


def _interface(attribute: str) -> Callable[[str], Match]:
    def make(text: str) -> Match:
        def match(p: IptProbe, _t: IptTables) -> bool:
            name = getattr(p, attribute)
            if not isinstance(name, str):
                return False
            return name.startswith(text[:-1]) if text.endswith("+") else name == text
        return match
    return make


def _protocol(text: str) -> Match:
    if text in ("all", "0"):
        return lambda _p, _t: True
    number = protocol_number(text.lower())
    if number is None:
        raise Unsupported(f"protocol {text!r}")
    return lambda p, _t: p.protocol == number


def _port(attribute: str) -> Callable[[str], Match]:
    def make(text: str) -> Match:
        ranges = [_range(part) for part in text.split(",")]
        return lambda p, _t: p.protocol in _PORTED and getattr(p, attribute) is not None \
            and any(lo <= getattr(p, attribute) <= hi for lo, hi in ranges)
    return make


def _range(text: str) -> tuple[int, int]:
    """``N`` or ``LOW:HIGH`` (either end may be left out: 0, 65535)."""
    low, colon, high = text.partition(":")
    if not colon:
        return int(low), int(low)
    return int(low or 0), int(high or 65535)


def _icmp(version: int, table: dict[str, int]) -> Callable[[str], Match]:
    def make(text: str) -> Match:
        if text == "any":
            return lambda p, _t: p.protocol == (1 if version == 4 else 58)
        kind, _, code = text.partition("/")
        number = int(kind) if kind.isdigit() else table[kind]
        wanted = int(code) if code else None
        return lambda p, _t: (p.protocol == (1 if version == 4 else 58)
                              and p.icmp_type == number
                              and (wanted is None or p.icmp_code == wanted))
    return make


def _ctstate(text: str) -> Match:
    states = {_CT[name] for name in text.split(",")}
    return lambda p, _t: p.ct_state in states


def _mac(text: str) -> Match:
    wanted = text.lower()
    return lambda p, _t: p.mac.lower() == wanted


def _mark(text: str) -> Match:
    value, _, mask = text.partition("/")
    bits = int(mask, 0) if mask else 0xFFFFFFFF
    return lambda p, _t: (p.mark & bits) == int(value, 0)


def _connmark(text: str) -> Match:
    value, _, mask = text.partition("/")
    bits = int(mask, 0) if mask else 0xFFFFFFFF
    return lambda p, _t: (p.ctmark & bits) == int(value, 0)


def _in_set(name: str, direction: str) -> Match:
    def match(p: IptProbe, t: IptTables) -> bool:
        members = t.ipsets.get(name)
        if members is None:
            raise Unsupported(f"match in an ipset that does not exist: {name}")
        address = p.src if direction == "src" else p.dst
        return any(_within(address, n) for n in members)
    return match


def _physdev_flag(p: IptProbe, option: str) -> bool:
    if option == "--physdev-is-bridged":
        return p.physdev_in is not None and p.physdev_out is not None
    return (p.physdev_in if option == "--physdev-is-in" else p.physdev_out) is not None


_SIMPLE: dict[str, Callable[[str], Match]] = {
    "-s": _address("src"), "--source": _address("src"),
    "-d": _address("dst"), "--destination": _address("dst"),
    "-i": _interface("iif"), "--in-interface": _interface("iif"),
    "-o": _interface("oif"), "--out-interface": _interface("oif"),
    "-p": _protocol, "--protocol": _protocol,
    "--sport": _port("sport"), "--source-port": _port("sport"),
    "--dport": _port("dport"), "--destination-port": _port("dport"),
    "--dports": _port("dport"), "--sports": _port("sport"),
    "--icmp-type": _icmp(4, ICMP_TYPES), "--icmpv6-type": _icmp(6, ICMPV6_TYPES),
    "--ctstate": _ctstate, "--state": _ctstate,
    "--mac-source": _mac, "--mark": _mark, "--connmark": _connmark,
    "--physdev-in": _interface("physdev_in"), "--physdev-out": _interface("physdev_out"),
}


def read_iptables(netns: str | None) -> dict[str, str]:
    """``{"ipv4": iptables-save, "ipv6": ip6tables-save, "ipsets": ipset save}`` of
    the variant (nft or legacy) that holds secfw's chains, in ``netns``."""
    from secfw.backends.iptables.executor import IptablesExecutor

    executor = IptablesExecutor(netns)
    return {
        "ipv4": executor._run([executor.tool("ipv4", "-save"), "-t", "filter"]),
        "ipv6": executor._run([executor.tool("ipv6", "-save"), "-t", "filter"]),
        "ipv4_nat": executor._run([executor.tool("ipv4", "-save"), "-t", "nat"]),
        "ipsets": executor._run(["ipset", "list", "-o", "save"]),
    }


def named_values(saves: dict[str, str]) -> tuple[list[str], list[int]]:
    """Addresses and ports the rules and ipsets name (extra probes for verify)."""
    addresses: set[str] = set()
    ports: set[int] = set()
    for family in ("ipv4", "ipv6", "ipv4_nat"):
        for line in saves.get(family, "").splitlines():
            tokens = line.split()
            for option, value in itertools.pairwise(tokens):
                if option in ("-s", "-d"):
                    addresses.add(str(ipaddress.ip_network(value, strict=False)[0]))
                elif option in ("--to-destination", "--to-source"):
                    addresses.add(value.partition(":")[0])
                elif option in ("--dport", "--dports"):
                    for part in value.split(","):
                        low, high = _range(part)
                        ports.update(p for p in (low - 1, low, high, high + 1)
                                     if 0 <= p <= 65535)
    for networks in parse_ipsets(saves.get("ipsets", "")).values():
        addresses.update(str(n[0]) for n in networks)
        addresses.update(str(n[-1]) for n in networks)
    return sorted(addresses), sorted(ports)


def rule_points(saves: dict[str, str]) -> list[tuple[str, int, int]]:
    """(address, protocol, port) that one filter rule names together: its
    ``-s``/``-d`` (first address) and the ipsets it matches (each network's
    first and last address), with its ``-p`` (every port protocol without one)
    and its ``--dport``/``--dports`` edges (extra probes for verify)."""
    sets = parse_ipsets(saves.get("ipsets", ""))
    found: set[tuple[str, int, int]] = set()
    for family in ("ipv4", "ipv6"):
        for line in saves.get(family, "").splitlines():
            addresses, protocols, ports = _line_values(line.split(), sets)
            found.update((a, proto, p) for a in addresses for proto in protocols
                         for p in ports)
    return sorted(found)


def lines_values(lines: Iterable[str], sets: dict[str, list[Network]]
                 ) -> tuple[set[str], set[int], set[tuple[str, int, int]]]:
    """The addresses, ports and (address, protocol, port) that ``lines`` (rules
    as ``iptables-save`` prints them) name, as :func:`rule_points` takes them;
    ``sets``: the ipsets whose members count as named (empty: none do)."""
    addresses: set[str] = set()
    ports: set[int] = set()
    pairs: set[tuple[str, int, int]] = set()
    for line in lines:
        found, protocols, named = _line_values(line.split(), sets)
        addresses |= found
        ports |= named
        pairs.update((a, proto, p) for a in found for proto in protocols for p in named)
    return addresses, ports, pairs


#: The port protocols, by number and by the names iptables accepts.
_PORT_PROTOCOLS = {"6": 6, "tcp": 6, "17": 17, "udp": 17, "132": 132, "sctp": 132,
                   "136": 136, "udplite": 136}


def _line_values(tokens: Sequence[str], sets: dict[str, list[Network]]
                 ) -> tuple[set[str], set[int], set[int]]:
    addresses: set[str] = set()
    protocols: set[int] = set()
    ports: set[int] = set()
    for option, value in itertools.pairwise(tokens):
        if option in ("-s", "-d"):
            addresses.add(str(ipaddress.ip_network(value, strict=False)[0]))
        elif option == "--match-set":
            addresses.update(str(n[i]) for n in sets.get(value, ()) for i in (0, -1))
        elif option == "-p" and value in _PORT_PROTOCOLS:
            protocols.add(_PORT_PROTOCOLS[value])
        elif option in ("--dport", "--dports"):
            for part in value.split(","):
                low, high = _range(part)
                ports.update(p for p in (low - 1, low, high, high + 1) if 0 <= p <= 65535)
    return addresses, protocols or set(_PORT_PROTOCOLS.values()), ports


def chains_of(saves: dict[str, str]) -> dict[int, IptTables]:
    """The parsed filter tables by IP version."""
    ipsets = saves.get("ipsets", "")
    return {4: parse(saves.get("ipv4", ""), ipsets), 6: parse(saves.get("ipv6", ""), ipsets)}


def nat_of(saves: dict[str, str]) -> IptTables:
    """The parsed IPv4 ``nat`` table (empty when it was not read)."""
    return parse(saves.get("ipv4_nat", ""), saves.get("ipsets", ""), "nat")


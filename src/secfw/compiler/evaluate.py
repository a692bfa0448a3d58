"""The host IR as a decision function: would this filter let a connection open?

:class:`PolicyIndex` answers, for the first packet of a connection (a conntrack
entry's original tuple), what the compiled filter of one host decides — the same
semantics the nftables backend renders, evaluated in Python over the IR:

* a packet *from* a port of the host passes that port's **egress**: port security
  off passes everything; otherwise the source must be one the port may send from
  (:mod:`.sources`), an instance never acts as a DHCP/DHCPv6 server, DHCP clients
  always pass, then open egress passes and restricted egress needs a rule of one
  of the port's egress chains (remote = destination);
* a packet *to* a port of the host passes that port's **ingress**: port security
  off passes, then a source in one of its same-net sets, then a rule of one of
  its ingress chains (remote = source);
* a packet between two ports of the host must pass both (one forward traversal).

Used by the conntrack revocation (:mod:`secfw.conntrack`) to decide which
established connections a new filter no longer allows. Pure: no I/O.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from secfw.compiler.ir import GroupChain, HostFilter, IRRule, PortPolicy
from secfw.compiler.sources import UNSPECIFIED, port_sources
from secfw.constants import DHCP_CLIENT, DHCP_SERVER, PORT_PROTOCOL_NUMBERS

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_PORT_PROTOCOLS = PORT_PROTOCOL_NUMBERS
_DHCP_SERVER = DHCP_SERVER
_DHCP_CLIENT = DHCP_CLIENT


@dataclass(frozen=True)
class Packet:
    """The first packet of a connection, as conntrack's original tuple holds it.

    ``sport``/``dport`` for protocols with ports, ``icmp_type``/``icmp_code`` for
    ICMP and ICMPv6; None otherwise.
    """

    src: str
    dst: str
    protocol: int
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None

    @property
    def version(self) -> int:
        return parsed(self.src).version


@functools.lru_cache(maxsize=65536)
def parsed(text: str) -> IPAddress:
    """``ipaddress.ip_address``, each text parsed once: verify judges hundreds of
    thousands of probes against the same addresses, and parsing them again for
    every rule was most of its time (immutable values: sharing them is safe)."""
    return ipaddress.ip_address(text)


@functools.lru_cache(maxsize=65536)
def network(text: str) -> IPNetwork:
    """``ipaddress.ip_network`` (strict), each text parsed once (as :func:`parsed`)."""
    return ipaddress.ip_network(text)


class AddressIndex:
    """Which ports own an address: fixed addresses by exact lookup, networks (address
    pairs) by containment. Built once per filter."""

    def __init__(self, ports: Iterable[PortPolicy]) -> None:
        self._hosts: dict[IPAddress, list[PortPolicy]] = {}
        self._networks: list[tuple[IPNetwork, PortPolicy]] = []
        for port in ports:
            for network in _port_networks(port):
                if network.num_addresses == 1:
                    self._hosts.setdefault(network.network_address, []).append(port)
                else:
                    self._networks.append((network, port))

    def ports(self, address: str) -> list[PortPolicy]:
        """The ports that may use ``address`` (several when a pair is shared)."""
        addr = ipaddress.ip_address(address)
        found = list(self._hosts.get(addr, ()))
        found += [p for net, p in self._networks
                  if net.version == addr.version and addr in net and p not in found]
        return found


def _port_networks(port: PortPolicy) -> list[IPNetwork]:
    """The addresses a port owns: its fixed addresses and pairs (also with port
    security off), never the unspecified or link-local ones."""
    texts = [*port.ipv4, *port.ipv6, *(p.cidr for p in port.allowed_pairs)]
    return [ipaddress.ip_network(t) for t in texts]


class PolicyIndex:
    """The filter of one host (a :class:`HostFilter`), indexed for evaluation."""

    def __init__(self, hf: HostFilter) -> None:
        self.hf = hf
        self.chains: dict[str, GroupChain] = {c.name: c for c in hf.chains}
        self._set_elements = {s.name: s.elements for s in hf.sets}
        self._sets: dict[str, list[IPNetwork]] = {}
        self._spans: dict[str, list[tuple[int, int, int]]] = {}
        self._owners: AddressIndex | None = None

    @property
    def owners(self) -> AddressIndex:
        """Which ports own an address (built on first use: a big host has many)."""
        if self._owners is None:
            self._owners = AddressIndex(self.hf.ports)
        return self._owners

    def members(self, name: str) -> list[IPNetwork]:
        """The networks of address set ``name`` (parsed on first use)."""
        found = self._sets.get(name)
        if found is None:
            found = [ipaddress.ip_network(e) for e in self._set_elements.get(name, ())]
            self._sets[name] = found
        return found

    def holds(self, name: str, address: IPAddress) -> bool:
        """Whether address set ``name`` has ``address``: a binary search of its
        networks as integer intervals (built on first use; a big host's sets have
        thousands of members and verify asks this for every probe)."""
        spans = self._spans.get(name)
        if spans is None:
            spans = []
            for version, first, last in sorted(
                    (n.version, int(n.network_address), int(n.broadcast_address))
                    for n in self.members(name)):
                if spans and spans[-1][0] == version and first <= spans[-1][2]:
                    spans[-1] = (version, spans[-1][1], max(last, spans[-1][2]))
                else:  # (the elements are canonical; overlaps merged all the same)
                    spans.append((version, first, last))
            self._spans[name] = spans
        value = (address.version, int(address), _AFTER_ALL)
        at = bisect.bisect_right(spans, value) - 1
        return at >= 0 and spans[at][0] == address.version and spans[at][2] >= int(address)

    def allows(self, packet: Packet) -> bool:
        """Whether the filter lets ``packet`` open a connection: every port of the
        host that owns its source lets it out, every port that owns its destination
        lets it in — or, for an address shared through allowed address pairs, at
        least one of its owners does. An address that is the *fixed* address of
        several ports (two overlapping networks, docs/semantics.md) needs all of
        them: which twin a conntrack entry belongs to is not in the tuple, and a
        verdict borrowed from the other twin would keep a revoked connection."""
        sources, destinations = self.owners.ports(packet.src), self.owners.ports(packet.dst)
        out = not sources or _judge(sources, packet.src, lambda p: self.egress(p, packet))
        return out and (not destinations or _judge(
            destinations, packet.dst, lambda p: self.ingress(p, packet)))

    def egress(self, port: PortPolicy, packet: Packet) -> bool:
        """Does ``port`` let ``packet`` out (anti-spoofing, protections, rules)?"""
        if not port.port_security:
            return True
        if not _may_send_from(port, packet.src):
            return False
        ports = (packet.sport, packet.dport)
        if packet.protocol == 17 and ports == _DHCP_SERVER[packet.version]:
            return False
        if packet.protocol == 17 and ports == _DHCP_CLIENT[packet.version]:
            return True
        if _is_unspecified(packet.src):
            return False
        return port.egress_open or self._any_rule(port.egress_chains, packet, packet.dst)

    def ingress(self, port: PortPolicy, packet: Packet) -> bool:
        """Does ``port`` let ``packet`` in (same-net, rules)?"""
        if not port.port_security:
            return True
        src = parsed(packet.src)
        if any(self.holds(name, src) for name in port.same_net_sets):
            return True
        return self._any_rule(port.ingress_chains, packet, packet.src)

    def _any_rule(self, chains: Iterable[str], packet: Packet, remote: str) -> bool:
        return any(
            self.rule_matches(rule, packet, remote)
            for name in chains
            if (chain := self.chains.get(name)) is not None
            for rule in chain.rules
        )

    def rule_matches(self, rule: IRRule, packet: Packet, remote: str) -> bool:
        """Does one IR rule accept ``packet`` whose remote end is ``remote``?"""
        if rule.family != ("ipv4" if packet.version == 4 else "ipv6"):
            return False
        if rule.protocol is not None and rule.protocol != packet.protocol:
            return False
        if not (_ports_match(rule, packet) and _icmp_match(rule, packet)):
            return False
        return self._remote_matches(rule, parsed(remote))

    def _remote_matches(self, rule: IRRule, remote: IPAddress) -> bool:
        if rule.remote_set is not None:
            return self.holds(rule.remote_set, remote)
        if rule.remote_cidr is not None:
            return _contains(network(rule.remote_cidr), remote)
        return True


def _judge(owners: list[PortPolicy], address: str,
           verdict: Callable[[PortPolicy], bool]) -> bool:
    """All of ``owners`` when ``address`` is the fixed address of more than one of
    them (twins), else any (see :meth:`PolicyIndex.allows`)."""
    canonical = str(ipaddress.ip_address(address))
    twins = sum(1 for p in owners if canonical in (*p.ipv4, *p.ipv6))
    return all(map(verdict, owners)) if twins > 1 else any(map(verdict, owners))


def _ports_match(rule: IRRule, packet: Packet) -> bool:
    if rule.ports is None or packet.protocol not in _PORT_PROTOCOLS:
        return True
    return packet.dport is not None and rule.ports.low <= packet.dport <= rule.ports.high


def _icmp_match(rule: IRRule, packet: Packet) -> bool:
    if rule.icmp is None:
        return True
    if packet.icmp_type != rule.icmp.type:
        return False
    return rule.icmp.code is None or packet.icmp_code == rule.icmp.code


def _may_send_from(port: PortPolicy, address: str) -> bool:
    addr = parsed(address)
    return any(_contains(network(s.cidr), addr) for s in port_sources(port))


def _is_unspecified(address: str) -> bool:
    return network(address).with_prefixlen in UNSPECIFIED.values()


#: Sorts after every interval's last address (a search key's third field).
_AFTER_ALL = 1 << 129


def _contains(network: IPNetwork, address: IPAddress) -> bool:
    return network.version == address.version and address in network

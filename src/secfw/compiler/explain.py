"""Who can reach what, and why: the security-group semantics as a decision function.

:func:`decide` answers, for the first packet of a connection, whether the security
groups let it through and which rule does. It is written from ``docs/semantics.md``
directly against the model — not against the IR — so that it is an independent
oracle: the differential tests compare it with the kernel's verdict on real
packets, and ``make demo`` prints its reason next to each measured result.

A flow is judged on both ends (``docs/semantics.md`` and ``docs/protection.md``):

* when its source is an instance's port, by that port's **egress**: open when
  none of the instance's groups has an egress rule (nova-network), otherwise the
  union of the groups' egress rules (Neutron), the remote being the
  *destination*; DHCP client traffic always passes, an instance acting as a DHCP
  or DHCPv6 server never does;
* when its destination is an instance's port, by that port's **ingress**: same
  network (``allow_same_net_traffic``: the source is an address of a port of the
  destination's network — fixed or an allowed address pair — inside the
  network's subnet; any other address of the subnet is not trusted), then the
  groups' ingress rules, the remote being the *source*;
* a port without port security is not filtered at all (not even what conntrack
  calls invalid, when the other end is not a filtered port either);
* a remote group selects its members' addresses: fixed IPv4 and IPv6 addresses
  and the allowed address pairs of their ports (as Neutron does), except an
  address that a port of another network overlapping the member port's network
  may also send from;
* ICMP and ICMPv6 as conntrack sees them: only request types open a connection;
  neighbour discovery and MLD are untracked (never "established"): the protection
  rules accept what a host sends of them from an instance and what it receives to
  one (docs/protection.md), drop router advertisements from an instance, and leave
  every other untracked message to the rules of that end, like a new packet.

Anti-spoofing is not the oracle's business: a flow's source is taken to be what
the sender may use (the tests that spoof check the kernel directly).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from secfw.cloud import CloudState
from secfw.constants import (
    DHCP_CLIENT,
    DHCP_SERVER,
    ICMP_NEW_TYPES,
    ICMPV6_NEW_TYPES,
    ICMPV6_UNTRACKED,
    ND_DROPPED_FROM_INSTANCE,
    ND_FROM_INSTANCE,
    ND_TO_INSTANCE,
    PORT_PROTOCOL_NUMBERS,
)
from secfw.errors import ConflictError
from secfw.model import Port, Rule, protocol_number

_PORT_PROTOS = PORT_PROTOCOL_NUMBERS


@dataclass(frozen=True)
class Flow:
    """The first packet of a connection: ``src`` → ``dst``.

    ``protocol`` is an IP protocol number. ``port`` is the destination port for
    tcp/udp/sctp/udplite (``sport`` the source port, which only matters for DHCP);
    for ICMP and ICMPv6, ``icmp_type``/``icmp_code``.
    """

    src: str
    dst: str
    protocol: int
    port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    sport: int | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule_id: str | None = None


def decide(state: CloudState, flow: Flow, allow_same_net: bool = True) -> Decision:
    """Whether the security groups of the source (egress) and of the destination
    (ingress) let ``flow`` through, and why (see the module docstring)."""
    src_port, dst_port = port_by_address(state, flow.src), port_by_address(state, flow.dst)
    if dst_port is None and src_port is None:
        return Decision(False, f"{flow.dst} is not an instance port")
    # Only a filter drops what conntrack calls invalid: between ports without port
    # security (or one and the outside) nothing is filtered at all.
    filtered = any(p is not None and p.port_security for p in (src_port, dst_port))
    stateless = _conntrack_verdict(flow) if filtered else None
    if stateless is not None:
        return stateless
    egress = _egress(state, src_port, flow) if src_port is not None else None
    if egress is not None and not egress.allowed:
        return egress
    if dst_port is None:
        assert egress is not None
        return egress
    ingress = _ingress(state, dst_port, flow, allow_same_net)
    if ingress.allowed and egress is not None and egress.rule_id is not None:
        return Decision(True, f"{ingress.reason}; out: {egress.reason}", ingress.rule_id)
    return ingress


def _conntrack_verdict(flow: Flow) -> Decision | None:
    """The verdict of ICMP that no rule decides: types that can neither open a
    connection nor are left untracked (conntrack calls them invalid)."""
    if flow.protocol == 1 and flow.icmp_type not in ICMP_NEW_TYPES:
        return Decision(False, f"ICMP type {flow.icmp_type} cannot open a connection (invalid)")
    if flow.protocol == 58 and flow.icmp_type not in ICMPV6_NEW_TYPES | ICMPV6_UNTRACKED:
        return Decision(
            False, f"ICMPv6 type {flow.icmp_type} cannot open a connection (invalid)")
    return None


def _neighbour_discovery(flow: Flow, allowed: frozenset[int], dropped: frozenset[int],
                         way: str) -> Decision | None:
    """The protection rules' verdict on untracked ICMPv6 ``way`` (``from``/``to``)
    a port with port security; None when its rules decide."""
    if flow.protocol != 58:
        return None
    if flow.icmp_type in allowed:
        return Decision(True, f"ICMPv6 type {flow.icmp_type} {way} an instance: "
                              "neighbour discovery, no rule needed")
    if flow.icmp_type in dropped:
        return Decision(False, f"ICMPv6 type {flow.icmp_type} {way} an instance is "
                               "dropped (protection)")
    return None


def _egress(state: CloudState, port: Port, flow: Flow) -> Decision:
    """The egress verdict of the source port."""
    if not port.port_security:
        return Decision(True, "source port without port security")
    version = ipaddress.ip_address(flow.src).version
    ports = (flow.sport, flow.port)
    if flow.protocol == 17 and ports == DHCP_SERVER[version]:
        return Decision(False, "an instance may not act as a DHCP server (protection)")
    if flow.protocol == 17 and ports == DHCP_CLIENT[version]:
        return Decision(True, "DHCP client traffic (protection)")
    protected = _neighbour_discovery(flow, ND_FROM_INSTANCE, ND_DROPPED_FROM_INSTANCE, "from")
    if protected is not None:
        return protected
    instance = state.instances[port.instance_id]
    rules = [
        (group_id, rule)
        for group_id in instance.security_groups
        for rule in sorted(state.rules_by_group.get(group_id, {}).values(), key=lambda r: r.id)
        if rule.direction == "egress"
    ]
    if not rules:
        return Decision(True, "egress open (no egress rule in the instance's groups)")
    for group_id, rule in rules:
        if rule_matches(state, rule, flow, remote=flow.dst):
            name = state.groups[group_id].name
            return Decision(True, f"{name}: {describe_rule(state, rule)}", rule.id)
    return Decision(False, "no egress rule of the source instance's groups allows it")


def _ingress(state: CloudState, port: Port, flow: Flow, allow_same_net: bool) -> Decision:
    """The ingress verdict of the destination port."""
    if not port.port_security:
        return Decision(True, "destination port without port security")
    protected = _neighbour_discovery(flow, ND_TO_INSTANCE, frozenset(), "to")
    if protected is not None:
        return protected
    network = state.networks[port.network_id]
    if allow_same_net and _from_same_net(state, port, flow.src):
        return Decision(True, f"same network {network.name} (allow_same_net_traffic)")
    instance = state.instances[port.instance_id]
    for group_id in instance.security_groups:
        group = state.groups[group_id]
        for rule in sorted(state.rules_by_group.get(group_id, {}).values(), key=lambda r: r.id):
            if rule.direction == "ingress" and rule_matches(state, rule, flow):
                return Decision(True, f"{group.name}: {describe_rule(state, rule)}", rule.id)
    return Decision(False, "no rule of the instance's security groups allows it")


def _from_same_net(state: CloudState, port: Port, address: str) -> bool:
    """Is ``address`` inside ``port``'s network's subnet and what a port of that
    network (any host) may send from: its fixed address or an address pair?"""
    network = state.networks[port.network_id]
    if not any(_contains(c, address) for c in (network.cidr, network.cidr6) if c):
        return False
    canonical = str(ipaddress.ip_address(address))
    return any(
        canonical in member_addresses(peer)
        or any(_contains(cidr, address) for cidr, _ in peer.address_pairs())
        for peer in state.ports.values()
        if peer.network_id == port.network_id
    )


def rule_matches(state: CloudState, rule: Rule, flow: Flow, remote: str | None = None) -> bool:
    """Does ``rule`` allow ``flow`` (protocol, ports/ICMP, remote)? ``remote`` is
    the address the rule's remote is compared with: the source (default, ingress)
    or the destination (egress)."""
    address = flow.src if remote is None else remote
    if ipaddress.ip_address(address).version != (4 if rule.ethertype == "IPv4" else 6):
        return False
    proto = protocol_number(rule.protocol)
    if proto is not None and proto != flow.protocol:
        return False
    if proto in _PORT_PROTOS and rule.port_min is not None:
        high = rule.port_max if rule.port_max is not None else rule.port_min
        if flow.port is None or not rule.port_min <= flow.port <= high:
            return False
    if proto in (1, 58) and rule.port_min is not None:
        if flow.icmp_type != rule.port_min:
            return False
        if rule.port_max is not None and flow.icmp_code != rule.port_max:
            return False
    return _remote_matches(state, rule, address)


def _remote_matches(state: CloudState, rule: Rule, address: str) -> bool:
    if rule.remote_group_id is not None:
        return any(
            (address in member_addresses(p)
             or any(_contains(cidr, address) for cidr, _ in p.address_pairs()))
            and not _elsewhere_too(state, p, address)
            for member in state.group_members(rule.remote_group_id)
            for p in state.ports_of(member.id)
        )
    return rule.remote_cidr is None or _contains(rule.remote_cidr, address)


def _elsewhere_too(state: CloudState, port: Port, address: str) -> bool:
    """May a port of another network that overlaps ``port``'s send from
    ``address`` too, inside both networks' subnets? Then the address names no
    one port, and a remote group does not select it (docs/semantics.md,
    "Overlapping networks")."""
    home = state.networks[port.network_id]
    mine = [c for c in (home.cidr, home.cidr6) if c and _contains(c, address)]
    for other in state.networks.values():
        theirs = [c for c in (other.cidr, other.cidr6) if c and _contains(c, address)]
        if other.id == home.id or not mine or not theirs:
            continue
        for peer_id in state.ports_by_network.get(other.id, ()):
            peer = state.ports[peer_id]
            if address in member_addresses(peer) or any(
                    _contains(c, address) for c, _ in peer.address_pairs()):
                return True
    return False


def member_addresses(port: Port) -> set[str]:
    """The fixed addresses of a port (IPv4 and, if any, IPv6), canonical text."""
    return {str(ipaddress.ip_address(a)) for a in (port.ip, port.ip6) if a}


def describe_rule(state: CloudState, rule: Rule) -> str:
    """A short human description, e.g. ``tcp 80-80 from 0.0.0.0/0`` (``to`` for egress)."""
    proto = rule.protocol or "any"
    if rule.port_min is None and rule.port_max is None:
        span = ""
    elif rule.protocol in ("icmp", "icmpv6"):
        span = f" type {rule.port_min}" + (
            f" code {rule.port_max}" if rule.port_max is not None else ""
        )
    else:
        span = f" {rule.port_min}-{rule.port_max}"
    if rule.remote_group_id is not None:
        source = state.groups.get(rule.remote_group_id)
        remote = f"group {source.name if source else rule.remote_group_id}"
    else:
        remote = rule.remote_cidr or "anywhere"
    way = "from" if rule.direction == "ingress" else "to"
    return f"{proto}{span} {way} {remote}"


def port_by_address(state: CloudState, address: str) -> Port | None:
    """The port whose fixed address is ``address``, else the first port (by id)
    with an allowed address pair containing it; None when no port has it.
    ConflictError when it is the fixed address of several ports (overlapping
    networks): a flow between addresses does not say which."""
    canonical = str(ipaddress.ip_address(address))
    ports = sorted(state.ports.values(), key=lambda p: p.id)
    fixed = [p for p in ports if canonical in member_addresses(p)]
    if len(fixed) > 1:  # two overlapping VLAN networks: an address names no one port
        raise ConflictError(f"{canonical} is the fixed address of {len(fixed)} ports "
                            "on overlapping networks")
    if fixed:
        return fixed[0]
    return next((p for p in ports
                 if any(_contains(c, canonical) for c, _ in p.address_pairs())), None)


def _contains(cidr: str, address: str) -> bool:
    net = ipaddress.ip_network(cidr)
    addr = ipaddress.ip_address(address)
    return addr.version == net.version and addr in net

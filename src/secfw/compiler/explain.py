"""Who can reach what, and why: the security-group semantics as a decision function.

:func:`decide` answers, for one packet opening a connection towards an instance's
port, whether the security groups allow it and which rule does. It is written from
``semantics.md`` directly against the model — not against the IR — so that it is
an independent oracle: the differential tests compare it with the kernel's verdict
on real packets, and ``make demo`` prints its reason next to each measured result.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from secfw.cloud import CloudState
from secfw.model import PORT_PROTOCOLS, Port, Rule, protocol_number

_PORT_PROTOS = {protocol_number(p) for p in PORT_PROTOCOLS}
#: ICMP types conntrack accepts as the first packet of a new "connection" (echo,
#: timestamp, info and address-mask requests: nf_conntrack_proto_icmp.c, valid_new[]).
#: Any other ICMP type without a connection behind it is INVALID and dropped by the
#: stateful filter before a single rule is consulted.
ICMP_NEW_TYPES = frozenset({8, 13, 15, 17})


@dataclass(frozen=True)
class Flow:
    """The first packet of a connection: ``src`` → ``dst`` (an instance's address).

    ``protocol`` is an IP protocol number. ``port`` is the destination port for
    tcp/udp; for ICMP, ``icmp_type``/``icmp_code``.
    """

    src: str
    dst: str
    protocol: int
    port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule_id: str | None = None


def decide(state: CloudState, flow: Flow, allow_same_net: bool = True) -> Decision:
    """Whether the destination's security groups let ``flow`` in, and why."""
    port = _port_by_ip(state, flow.dst)
    if port is None:
        return Decision(False, f"{flow.dst} is not an instance port")
    if flow.protocol == 1 and flow.icmp_type not in ICMP_NEW_TYPES:
        return Decision(False, f"ICMP type {flow.icmp_type} cannot open a connection (invalid)")
    instance = state.instances[port.instance_id]
    network = state.networks[port.network_id]
    if allow_same_net and _contains(network.cidr, flow.src):
        return Decision(True, f"same network {network.name} (allow_same_net_traffic)")
    for group_id in instance.security_groups:
        group = state.groups[group_id]
        for rule in sorted(state.rules_by_group.get(group_id, {}).values(), key=lambda r: r.id):
            if rule.direction == "ingress" and rule_matches(state, rule, flow):
                return Decision(True, f"{group.name}: {describe_rule(state, rule)}", rule.id)
    return Decision(False, "no rule of the instance's security groups allows it")


def rule_matches(state: CloudState, rule: Rule, flow: Flow) -> bool:
    """Does an ingress ``rule`` allow ``flow`` (protocol, ports/ICMP, remote)?"""
    if ipaddress.ip_address(flow.src).version != (4 if rule.ethertype == "IPv4" else 6):
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
    return _remote_matches(state, rule, flow.src)


def _remote_matches(state: CloudState, rule: Rule, src: str) -> bool:
    if rule.remote_group_id is not None:
        return any(
            p.ip == src
            for member in state.group_members(rule.remote_group_id)
            for p in state.ports_of(member.id)
        )
    return rule.remote_cidr is None or _contains(rule.remote_cidr, src)


def describe_rule(state: CloudState, rule: Rule) -> str:
    """A short human description, e.g. ``tcp 80-80 from 0.0.0.0/0``."""
    proto = rule.protocol or "any"
    if rule.port_min is None and rule.port_max is None:
        span = ""
    elif rule.protocol == "icmp":
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
    return f"{proto}{span} from {remote}"


def _port_by_ip(state: CloudState, address: str) -> Port | None:
    return next((p for p in state.ports.values() if p.ip == address), None)


def _contains(cidr: str, address: str) -> bool:
    net = ipaddress.ip_network(cidr)
    addr = ipaddress.ip_address(address)
    return addr.version == net.version and addr in net

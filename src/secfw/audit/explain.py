"""``secfw audit explain``: the verdict on one flow, and why.

A flow (the first packet of a connection) is judged as the kernels judge it:

1. what no rule decides: ICMP types that cannot open a connection (conntrack:
   invalid), dropped when either end is a filtered port;
2. the **egress** of the source port, when the source is an address of a port
   (:meth:`~secfw.audit.policy.CloudPolicy.owner`), on that port's host;
3. the **ingress** of the destination port, when the destination is one, on its
   host.

On each filtered end, untracked ICMPv6 (neighbour discovery, MLD) is first
judged by the protection rules (what an instance may send, what it receives).
Otherwise steps 2 and 3 are decided by :class:`secfw.compiler.evaluate.PolicyIndex`
(shared with the conntrack revocation); the reasons — the rules that admit the
flow, same-net, port security off, egress open — are read from the same IR. For
a side that denies, the *near misses* are its rules that fail on one criterion
only (right port from the wrong source, right source on the wrong port, …).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Any

import netaddr

from secfw.audit.policy import CloudPolicy, PortView, family_of
from secfw.audit.reach import remote_matches
from secfw.audit.space import ICMP_OF, PORT_PROTOCOL_NUMBERS
from secfw.compiler.evaluate import Packet
from secfw.compiler.ir import IRRule
from secfw.constants import (
    ICMP_NEW_TYPES,
    ICMPV6_NEW_TYPES,
    ICMPV6_UNTRACKED,
    ND_DROPPED_FROM_INSTANCE,
    ND_FROM_INSTANCE,
    ND_TO_INSTANCE,
)


@dataclass(frozen=True)
class FlowQuery:
    """One flow: ``src`` → ``dst`` (addresses), protocol number, destination port
    (port protocols) or ICMP type/code."""

    src: str
    dst: str
    protocol: int
    port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None

    def packet(self) -> Packet:
        return Packet(self.src, self.dst, self.protocol, None, self.port, self.icmp_type,
                      self.icmp_code)


def explain(cp: CloudPolicy, flow: FlowQuery) -> dict[str, Any]:
    """The verdict on ``flow`` with its reasons (see the module docstring):
    ``verdict`` (allow/deny), ``rules`` (every rule that admits it, both sides),
    ``reasons`` (text), ``egress``/``ingress`` (each side's own verdict, reasons,
    rules and near misses; None for an end outside the cloud). A flow to an
    associated floating IP is judged as the host filters it, after DNAT: to the
    fixed address, from the original source (``nat`` says so)."""
    floating = cp.state.floating_ips.get(flow.dst)
    nat = None
    if floating is not None and floating.fixed_ip is not None:
        nat = {"floating": flow.dst, "fixed": floating.fixed_ip}
        flow = replace(flow, dst=floating.fixed_ip)
    result = _explain(cp, flow)
    if nat is not None:
        result["nat"] = nat
        result["reasons"] = [f"DNAT: floating IP {nat['floating']} -> {nat['fixed']}",
                             *result["reasons"]]
    return result


def _explain(cp: CloudPolicy, flow: FlowQuery) -> dict[str, Any]:
    source, destination = cp.owner(flow.src), cp.owner(flow.dst)
    result: dict[str, Any] = {
        "verdict": "deny",
        "flow": _flow_row(flow),
        "source": _end(source, flow.src),
        "destination": _end(destination, flow.dst),
        "rules": [],
        "reasons": [],
        "egress": None,
        "ingress": None,
    }
    if source is None and destination is None:
        result["reasons"] = [f"neither {flow.src} nor {flow.dst} is an address of a port"]
        return result
    stateless = _stateless(flow, source, destination)
    if stateless is not None:
        allowed, reason = stateless
        result.update(verdict="allow" if allowed else "deny", reasons=[reason])
        return result
    sides = []
    if source is not None:
        result["egress"] = _egress(cp, source, flow)
        sides.append(result["egress"])
    if destination is not None:
        result["ingress"] = _ingress(cp, destination, flow)
        sides.append(result["ingress"])
    allowed = all(side["verdict"] == "allow" for side in sides)
    result["verdict"] = "allow" if allowed else "deny"
    result["rules"] = [rule for side in sides for rule in side["rules"]]
    result["reasons"] = [f"{side['direction']} of {side['instance']}: {reason}"
                         for side in sides for reason in side["reasons"]]
    return result


def _flow_row(flow: FlowQuery) -> dict[str, Any]:
    return {"src": flow.src, "dst": flow.dst, "protocol": flow.protocol, "port": flow.port,
            "icmp_type": flow.icmp_type, "icmp_code": flow.icmp_code}


def _end(view: PortView | None, address: str) -> dict[str, Any]:
    if view is None:
        return {"address": address, "instance": None}
    return {"address": address, "instance": view.instance.name,
            "instance_id": view.instance.id, "project": view.instance.project,
            "port": view.port.tap, "host": view.instance.host, "network": view.network.name}


def _stateless(flow: FlowQuery, source: PortView | None,
               destination: PortView | None) -> tuple[bool, str] | None:
    """The verdict of ICMP conntrack calls invalid (neither a request nor an
    untracked ICMPv6 type): dropped by any filtered end; else None."""
    family = family_of(flow.src)
    if flow.protocol != ICMP_OF[family]:
        return None
    if not any(v is not None and v.policy.port_security for v in (source, destination)):
        return None  # no filter on either end: nothing drops it
    kind = flow.icmp_type
    valid = ICMP_NEW_TYPES if family == "ipv4" else ICMPV6_NEW_TYPES | ICMPV6_UNTRACKED
    if kind in valid:
        return None
    name = "ICMP" if family == "ipv4" else "ICMPv6"
    return False, f"{name} type {kind} cannot open a connection (conntrack: invalid)"


def _protection(view: PortView, flow: FlowQuery, direction: str) -> bool | None:
    """The protection rules' verdict on untracked ICMPv6 leaving (egress) or
    reaching (ingress) a filtered port; None when its rules decide."""
    if not view.policy.port_security or family_of(flow.src) != "ipv6" or \
            flow.protocol != ICMP_OF["ipv6"] or flow.icmp_type not in ICMPV6_UNTRACKED:
        return None
    if direction == "egress":
        if flow.icmp_type in ND_FROM_INSTANCE:
            return True
        return False if flow.icmp_type in ND_DROPPED_FROM_INSTANCE else None
    return True if flow.icmp_type in ND_TO_INSTANCE else None


def _side(view: PortView, direction: str) -> dict[str, Any]:
    return {"direction": direction, "instance": view.instance.name, "port": view.port.tap,
            "host": view.instance.host, "verdict": "deny", "reasons": [], "rules": [],
            "near_misses": []}


def _egress(cp: CloudPolicy, view: PortView, flow: FlowQuery) -> dict[str, Any]:
    """The egress side: verdict by the shared evaluator, reasons from the IR."""
    side = _side(view, "egress")
    packet = flow.packet()
    protected = _protection(view, flow, "egress")
    if protected is not None:
        side["verdict"] = "allow" if protected else "deny"
        side["reasons"].append(f"ICMPv6 type {flow.icmp_type} from an instance: "
                               + ("neighbour discovery / MLD, passed by protection"
                                  if protected else "dropped by protection"))
        return side
    allowed = view.index.egress(view.policy, packet)
    side["verdict"] = "allow" if allowed else "deny"
    if not view.policy.port_security:
        side["reasons"].append("port security off")
    elif view.policy.egress_open:
        side["reasons"].append("egress open (no egress rule in the instance's groups)")
    side["rules"] = _matching(cp, view, "egress", packet, flow.dst)
    if not allowed:
        side["reasons"].append("no egress rule of the instance's groups allows it")
        side["near_misses"] = _near_misses(cp, view, "egress", flow, flow.dst)
    return side


def _ingress(cp: CloudPolicy, view: PortView, flow: FlowQuery) -> dict[str, Any]:
    side = _side(view, "ingress")
    packet = flow.packet()
    if _protection(view, flow, "ingress"):
        side["verdict"] = "allow"
        side["reasons"].append(f"ICMPv6 type {flow.icmp_type} to an instance: neighbour "
                               "discovery / MLD, passed by protection")
        return side
    allowed = view.index.ingress(view.policy, packet)
    side["verdict"] = "allow" if allowed else "deny"
    family = family_of(flow.src)
    if not view.policy.port_security:
        side["reasons"].append("port security off")
    elif netaddr.IPAddress(flow.src) in cp.same_net_members(view, family):
        side["reasons"].append(f"same-net: {flow.src} is an address of a port of network "
                               f"{view.network.name} (allow_same_net_traffic)")
    side["rules"] = _matching(cp, view, "ingress", packet, flow.src)
    if not allowed:
        side["reasons"].append("no ingress rule of the instance's groups allows it")
        subnet = view.network.cidr if family == "ipv4" else view.network.cidr6
        if cp.allow_same_net and subnet and \
                ipaddress.ip_address(flow.src) in ipaddress.ip_network(subnet):
            side["reasons"].append(
                f"{flow.src} is inside {subnet} but no port of {view.network.name} has it: "
                "same-net trusts the network's port addresses, not its whole subnet")
        side["near_misses"] = _near_misses(cp, view, "ingress", flow, flow.src)
    return side


def _matching(cp: CloudPolicy, view: PortView, direction: str, packet: Packet,
              remote: str) -> list[dict[str, Any]]:
    """Every rule of ``view``'s chains in ``direction`` that admits ``packet``."""
    if not view.policy.port_security:
        return []
    return [cp.rule_ref(chain, rule) for chain in cp.chains(view, direction)
            for rule in chain.rules if view.index.rule_matches(rule, packet, remote)]


def _near_misses(cp: CloudPolicy, view: PortView, direction: str, flow: FlowQuery,
                 remote: str) -> list[dict[str, Any]]:
    """The rules that fail on exactly one criterion, with that criterion."""
    family = family_of(flow.src)
    found = []
    for chain in cp.chains(view, direction):
        for rule in chain.rules:
            if rule.family != family:
                continue
            failed = _failed_criteria(cp, view, rule, flow, remote, direction)
            if len(failed) == 1:
                found.append({**cp.rule_ref(chain, rule), "mismatch": failed[0]})
    return found


def _failed_criteria(cp: CloudPolicy, view: PortView, rule: IRRule, flow: FlowQuery, remote: str,
                     direction: str) -> list[str]:
    failed = []
    if rule.protocol is not None and rule.protocol != flow.protocol:
        failed.append("protocol")
    elif rule.ports is not None and flow.protocol in PORT_PROTOCOL_NUMBERS and (
            flow.port is None or not rule.ports.low <= flow.port <= rule.ports.high):
        failed.append("port")
    elif rule.icmp is not None and (flow.icmp_type != rule.icmp.type or (
            rule.icmp.code is not None and flow.icmp_code != rule.icmp.code)):
        failed.append("icmp type/code")
    if not remote_matches(cp, view, rule, remote):
        failed.append("source" if direction == "ingress" else "destination")
    return failed

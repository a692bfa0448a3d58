"""``secfw audit reach``: the exact flow space that reaches a port, or leaves it.

For one address ``d`` of a port P, ``reach --to`` answers: which (source address,
protocol, port or ICMP type/code) may open a connection to ``d``. It is the
sweep (:func:`secfw.audit.space.sweep`) of

* the *openers* of P's ingress: port security off (everything), its same-net
  sources (every protocol), each rule of its groups' ingress chains;
* the *constraints* of the senders: a source address owned by a port whose
  egress is restricted (port security on, an egress rule in its groups) passes
  only what that port's egress rules let out towards ``d``;
* the flows the rules alone do not decide (:func:`specials`): ICMP types that
  cannot open a connection (conntrack calls them invalid: only echo, timestamp,
  info and address-mask requests can; ICMPv6 echo request and node information
  query), dropped by any filtered end; untracked ICMPv6 neighbour discovery /
  MLD, which the protection rules of each end pass or drop (the other untracked
  types meet the rules).

``reach --from`` is the mirror: the openers of P's egress (everything when its
egress is open), the constraints of the receivers' ingress (same-net and rules,
remote = P's address).

Flows are those with an ordinary source port: DHCP's fixed ports (udp 68→67,
546→547, always out; 67→68, 547→546, never) are left out, as are packets from
the unspecified address. An empty answer is a guarantee: no such flow opens.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import netaddr

from secfw.audit.policy import CloudPolicy, PortView, everywhere
from secfw.audit.space import (
    ALL,
    ICMP_OF,
    PORT_PROTOCOL_NUMBERS,
    PROTO_MAX,
    SEL_MAX,
    Box,
    CellPolicy,
    Constraint,
    Label,
    Opener,
    Region,
    Special,
    restrict,
    rule_box,
    sweep,
    union,
)
from secfw.compiler.ir import Family, IRRule
from secfw.constants import (
    ICMP_NEW_TYPES,
    ICMPV6_NEW_TYPES,
    ICMPV6_UNTRACKED,
    ND_DROPPED_FROM_INSTANCE,
    ND_FROM_INSTANCE,
    ND_TO_INSTANCE,
)
from secfw.model import PROTOCOL_NUMBERS

_PROTOCOL_NAMES: dict[int, str] = {}
for _name, _number in PROTOCOL_NUMBERS.items():
    _PROTOCOL_NAMES.setdefault(_number, _name)
ND_LABEL: Label = {"reason": "neighbour discovery / MLD (protection rules, no group rule)"}
UNFILTERED_LABEL: Label = {"reason": "neither end is a filtered port (port security off)"}


@dataclass
class Answer:
    """The regions of one address of one port, in one direction."""

    view: PortView
    family: Family
    address: str
    direction: str  # ingress (reach --to) or egress (reach --from)
    regions: list[Region]
    openers: list[Opener]


def reach(cp: CloudPolicy, view: PortView, direction: str, family: Family) -> Answer | None:
    """The exact space of ``view``'s address of ``family`` in ``direction`` (None:
    the port has no address of that family)."""
    address = view.address(family)
    if address is None:
        return None
    if direction == "ingress":
        openers = ingress_openers(cp, view, family)
        constraints = sender_constraints(cp, family, address)
    else:
        openers = egress_openers(cp, view, family)
        constraints = receiver_constraints(cp, family, address)
    regions = sweep(family, openers, constraints, specials(cp, view, direction, family))
    return Answer(view, family, address, direction, regions, openers)


def ingress_openers(cp: CloudPolicy, view: PortView, family: Family) -> list[Opener]:
    """What ``view``'s ingress admits, opener by opener (see the module docstring)."""
    if not view.policy.port_security:
        return [Opener(everywhere(family), ALL, {"reason": "port security off"})]
    openers = []
    same = cp.same_net_members(view, family)
    if same:
        openers.append(Opener(same, ALL, {"reason": "same-net", "network": view.network.name,
                                          "network_id": view.network.id}))
    openers += _rule_openers(cp, view, "ingress", family)
    return openers


def egress_openers(cp: CloudPolicy, view: PortView, family: Family) -> list[Opener]:
    """What ``view``'s egress lets out (destinations as the remote)."""
    if not view.policy.port_security:
        return [Opener(everywhere(family), ALL, {"reason": "port security off"})]
    if view.policy.egress_open:
        return [Opener(everywhere(family), ALL,
                       {"reason": "egress open (no egress rule in the instance's groups)"})]
    return _rule_openers(cp, view, "egress", family)


def _rule_openers(cp: CloudPolicy, view: PortView, direction: str,
                  family: Family) -> list[Opener]:
    return [Opener(cp.remote_set(view, rule), rule_box(rule), cp.rule_ref(chain, rule))
            for chain in cp.chains(view, direction)
            for rule in chain.rules if rule.family == family]


def remote_matches(cp: CloudPolicy, view: PortView, rule: IRRule, address: str) -> bool:
    """Does ``rule`` (of ``view``'s host) accept ``address`` as its remote end?"""
    if rule.remote_set is None and rule.remote_cidr is None:
        return True
    return netaddr.IPAddress(address) in cp.remote_set(view, rule)


def _boxes_towards(cp: CloudPolicy, view: PortView, direction: str, family: Family,
                   address: str, memo: dict[str, list[Box]]) -> list[Box]:
    """The boxes ``view``'s chains in ``direction`` open towards ``address``
    (memoised per chain: the ports of a cloud share their groups' chains)."""
    boxes = []
    for chain in cp.chains(view, direction):
        found = memo.get(chain.name)
        if found is None:
            found = [rule_box(r) for r in chain.rules
                     if r.family == family and remote_matches(cp, view, r, address)]
            memo[chain.name] = found
        boxes += found
    return boxes


def sender_constraints(cp: CloudPolicy, family: Family, address: str) -> list[Constraint]:
    """The egress of every port that may send to ``address`` with restrictions,
    grouped by egress chains (ports of the same groups let out the same)."""
    attributed = cp.attributed(family)
    grouped: dict[tuple[str, ...], tuple[PortView, list[netaddr.IPSet]]] = {}
    for port_id, view in cp.ports.items():
        owned = attributed.get(port_id)
        if not view.policy.port_security or view.policy.egress_open or not owned:
            continue
        grouped.setdefault(view.policy.egress_chains, (view, []))[1].append(owned)
    memo: dict[str, list[Box]] = {}
    return [Constraint(union(sets), _boxes_towards(cp, view, "egress", family, address, memo))
            for view, sets in grouped.values()]


def receiver_constraints(cp: CloudPolicy, family: Family, address: str) -> list[Constraint]:
    """The ingress of every protected port ``address`` may send to, grouped by
    (same-net sets, ingress chains); ports that take ``address`` as same-net
    accept everything from it."""
    attributed = cp.attributed(family)
    grouped: dict[tuple[tuple[str, ...], ...], tuple[PortView, list[netaddr.IPSet]]] = {}
    for port_id, view in cp.ports.items():
        owned = attributed.get(port_id)
        if not view.policy.port_security or not owned:
            continue
        key = (view.policy.same_net_sets, view.policy.ingress_chains)
        grouped.setdefault(key, (view, []))[1].append(owned)
    found = []
    memo: dict[str, list[Box]] = {}
    for view, sets in grouped.values():
        if netaddr.IPAddress(address) in cp.same_net_members(view, family):
            continue
        boxes = _boxes_towards(cp, view, "ingress", family, address, memo)
        found.append(Constraint(union(sets), boxes))
    return found


def specials(cp: CloudPolicy, view: PortView, direction: str, family: Family) -> list[Special]:
    """The ICMP cells the rules alone do not decide, for ``family`` (module doc).

    * invalid (ICMP types other than the requests; ICMPv6 types neither requests
      nor untracked): dropped by whichever end is a filtered port — allowed only
      between this end without port security and an unfiltered other end;
    * untracked ICMPv6 (neighbour discovery, MLD): the protection rules decide the
      types they know on each filtered end (an instance may send
      :data:`ND_FROM_INSTANCE`, never a router advertisement, and receives
      :data:`ND_TO_INSTANCE`); any other untracked type meets that end's rules.
    """
    everything = everywhere(family)
    secured = view.policy.port_security
    # the filtered ports' addresses: needed for an unfiltered end's invalid cells
    # and for the IPv6 neighbour discovery ones (and costly on a big cloud)
    protected = cp.protected(family) if not secured or family == "ipv6" \
        else netaddr.IPSet()
    invalid = CellPolicy(netaddr.IPSet() if secured else everything - protected,
                         UNFILTERED_LABEL, constraints=False)
    new_types = ICMP_NEW_TYPES if family == "ipv4" else ICMPV6_NEW_TYPES
    untracked = frozenset() if family == "ipv4" else ICMPV6_UNTRACKED

    def decide(sel: int) -> CellPolicy | None:
        kind = sel // 256
        if kind in new_types:
            return None
        if kind not in untracked:
            return invalid
        return _untracked(kind, direction, secured, everything, protected)

    cuts = [b for t in new_types | untracked for b in (t * 256, (t + 1) * 256)]
    return [Special(ICMP_OF[family], cuts, decide)]


def _untracked(kind: int, direction: str, secured: bool, everything: netaddr.IPSet,
               protected: netaddr.IPSet) -> CellPolicy:
    """An untracked ICMPv6 type: the protection rules of this end and of the other."""
    if direction == "ingress":
        primary = everything if secured and kind in ND_TO_INSTANCE else None
        lifted = kind in ND_FROM_INSTANCE  # every sender may send it
        block = protected if kind in ND_DROPPED_FROM_INSTANCE else None
    else:
        primary = None
        if secured and kind in ND_FROM_INSTANCE:
            primary = everything
        elif secured and kind in ND_DROPPED_FROM_INSTANCE:
            primary = netaddr.IPSet()
        lifted = kind in ND_TO_INSTANCE  # every receiver accepts it
        block = None
    return CellPolicy(primary, ND_LABEL, constraints=not lifted, block=block)


# ---------------------------------------------------------------------- filters and rows


def narrow(answer: Answer, protocol: int | None, port: int | None,
           prefix: str | None) -> list[Region]:
    """The regions of ``answer`` restricted to a protocol, a destination port (port
    protocols only) and a remote prefix (each None: no restriction)."""
    if protocol is not None:
        selector = (port, port) if port is not None and protocol in PORT_PROTOCOL_NUMBERS \
            else (0, SEL_MAX)
        boxes = [Box(protocol, protocol, *selector)]
    elif port is not None:
        boxes = [Box(p, p, port, port) for p in sorted(PORT_PROTOCOL_NUMBERS)]
    else:
        boxes = [ALL]
    addresses = netaddr.IPSet([prefix]) if prefix is not None else None
    return [r for box in boxes for r in restrict(answer.regions, box, addresses, answer.openers)]


def protocol_text(box: Box) -> str:
    """``tcp``, ``47``, ``any`` or ``2-5`` for a region's protocols."""
    if box.proto_lo == box.proto_hi:
        return _PROTOCOL_NAMES.get(box.proto_lo, str(box.proto_lo))
    if box.proto_lo == 0 and box.proto_hi == PROTO_MAX:
        return "any"
    return f"{box.proto_lo}-{box.proto_hi}"


def _span(low: int, high: int, full: tuple[int, int]) -> str:
    if (low, high) == full:
        return "any"
    return str(low) if low == high else f"{low}-{high}"


def region_row(answer: Answer, region: Region) -> dict[str, Any]:
    """One region as a JSON-ready row."""
    remote = "sources" if answer.direction == "ingress" else "destinations"
    fields = region_fields(answer, region)
    # the remote addresses after the ethertype, as the rows have always had them
    keys = list(fields)
    at = keys.index("ethertype") + 1
    return {**{k: fields[k] for k in keys[:at]},
            remote: [str(c) for c in region.addresses.iter_cidrs()],
            **{k: fields[k] for k in keys[at:]}}


def region_fields(answer: Answer, region: Region) -> dict[str, Any]:
    """A region's row without its remote addresses (listing them is the costly
    part, and exposure lists only the broad ones)."""
    return {
        "instance": answer.view.instance.name,
        "instance_id": answer.view.instance.id,
        "port": answer.view.port.tap,
        "address": answer.address,
        "direction": answer.direction,
        **region_shape(answer.family, region),
        "rules": region.labels,
    }


def region_shape(family: Family, region: Region) -> dict[str, Any]:
    """What a region's row says of its box: ethertype, protocol, ports and ICMP
    type(s) and code (the same for every port)."""
    box = region.box
    single = box.proto_lo == box.proto_hi
    ports = _span(box.sel_lo, box.sel_hi, (0, SEL_MAX)) \
        if single and box.proto_lo in PORT_PROTOCOL_NUMBERS else None
    icmp = single and box.proto_lo == ICMP_OF[family]
    return {
        "ethertype": "IPv4" if family == "ipv4" else "IPv6",
        "protocol": protocol_text(box),
        "ports": ports,
        "icmp_type": box.sel_lo // 256 if icmp else None,
        # a region of whole types spans several (the sweep cuts partial ones apart)
        "icmp_type_last": box.sel_hi // 256 if icmp else None,
        "icmp_code": _span(box.sel_lo % 256, box.sel_hi % 256, (0, 255)) if icmp else None,
    }


def answers_rows(answers: Sequence[Answer], protocol: int | None, port: int | None,
                 prefix: str | None) -> list[dict[str, Any]]:
    """Every region of ``answers`` after the filters, as rows."""
    rows = []
    for answer in answers:
        if prefix is not None and ipaddress.ip_network(prefix).version != (
                4 if answer.family == "ipv4" else 6):
            continue
        rows += [region_row(answer, r) for r in narrow(answer, protocol, port, prefix)]
    return rows

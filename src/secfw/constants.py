"""Protocol numbers, DHCP ports and ICMP types: defined once, here.

The compiler (:mod:`secfw.compiler`), both renderers, the evaluator shared by the
audits and the conntrack revocation (:mod:`secfw.compiler.evaluate`), the oracle
(:mod:`secfw.compiler.explain`) and the audits read them from this module, so the
places that write the semantics down cannot disagree on a number. Values are
data, no logic.
"""

from __future__ import annotations

from typing import Literal

#: IANA numbers of the protocol names secfw understands (semantics.md section 3).
PROTOCOL_NUMBERS: dict[str, int] = {
    "icmp": 1,
    "igmp": 2,
    "tcp": 6,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "icmpv6": 58,
    "ipv6-icmp": 58,
    "ospf": 89,
    "pim": 103,
    "vrrp": 112,
    "sctp": 132,
    "udplite": 136,
}
ICMP, TCP, UDP, ICMPV6, SCTP, UDPLITE = 1, 6, 17, 58, 132, 136
#: Every protocol name secfw reads anywhere, rules or the kernel tools' output
#: (nft and iptables also print dccp, comp and mh), with its IANA number.
IANA_PROTOCOLS: dict[str, int] = PROTOCOL_NUMBERS | {"dccp": 33, "comp": 108, "mh": 135}


def protocols(*names: str) -> dict[str, int]:
    """``{name: number}`` of ``names`` (each a key of :data:`IANA_PROTOCOLS`)."""
    return {name: IANA_PROTOCOLS[name] for name in names}
#: Protocols whose header starts with 16-bit source and destination ports: the
#: ones a rule's port range applies to (tcp, udp, sctp, udplite).
PORT_PROTOCOL_NUMBERS = frozenset({TCP, UDP, SCTP, UDPLITE})
#: The ICMP protocol of each family.
ICMP_PROTOCOL: dict[Literal["ipv4", "ipv6"], int] = {"ipv4": ICMP, "ipv6": ICMPV6}

#: (source port, destination port) of a DHCP client's and a DHCP server's
#: packets, by IP version (RFC 2131: 68 -> 67; RFC 8415: 546 -> 547).
DHCP_CLIENT: dict[int, tuple[int, int]] = {4: (68, 67), 6: (546, 547)}
DHCP_SERVER: dict[int, tuple[int, int]] = {4: (67, 68), 6: (547, 546)}

#: ICMP types conntrack accepts as the first packet of a new "connection" (echo,
#: timestamp, info and address-mask requests: nf_conntrack_proto_icmp.c, valid_new[]).
#: Any other ICMP type without a connection behind it is INVALID and dropped by the
#: stateful filter before a single rule is consulted.
ICMP_NEW_TYPES = frozenset({8, 13, 15, 17})
#: The same for ICMPv6: echo request and node information query
#: (nf_conntrack_proto_icmpv6.c, valid_new[]).
ICMPV6_NEW_TYPES = frozenset({128, 139})
#: ICMPv6 that conntrack leaves untracked (noct_valid_new[]): MLD query, report and
#: done, router solicitation and advertisement, neighbour solicitation and
#: advertisement, MLDv2 report. No ``ct state`` applies to them.
ICMPV6_UNTRACKED = frozenset({130, 131, 132, 133, 134, 135, 136, 143})
#: What an instance may send of them whatever its egress rules say: what a *host*
#: sends (RFC 4861 section 3, RFC 3810 sections 5-6: MLD reports and done, router
#: and neighbour solicitations, neighbour advertisements for its own addresses).
#: Not an MLD query (130): queries come from multicast routers, so one an instance
#: sends is judged by its egress rules like any other packet (docs/protection.md).
ND_FROM_INSTANCE = frozenset({131, 132, 133, 135, 136, 143})
#: Untracked ICMPv6 an instance may never send: router advertisements.
ND_DROPPED_FROM_INSTANCE = frozenset({134})
#: ICMPv6 redirect (137): only a router sends one; the protection drops it too
#: (it is not untracked: without a connection conntrack calls it invalid anyway).
ND_REDIRECT = 137
#: What a port receives whatever its ingress rules say: MLD query, router
#: advertisement, neighbour solicitation and advertisement. Other untracked types
#: *to* a port (an MLD report, a router solicitation) meet its ingress rules.
ND_TO_INSTANCE = frozenset({130, 134, 135, 136})
#: ICMPv6 an instance may send from ``::`` (before it has an address): neighbour
#: solicitation for duplicate address detection and the MLDv2 report that goes
#: with it (RFC 4862 section 5.4.2).
ND_FROM_UNSPECIFIED = frozenset({135, 143})


#: The operations guide's compute host: the demo's host and the lab commands'
#: default (``secfw.lab.demo.HOST``).
DEMO_HOST = "compute1"

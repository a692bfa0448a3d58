"""``secfw audit verify``: the live kernel of one host against the model.

For every port of the host, each direction and each family, the model's flow
space (the regions of the port's own filter, :func:`secfw.audit.space.sweep` of
its openers — reach without the other ends, which other hosts enforce) is
sampled at *boundaries*: every region's address, protocol and selector corners,
every member of the address sets its rules and same-net name, and the points
just outside each region; plus points the kernel itself names (addresses and
ports written in its rules and sets), so what the kernel opens beyond the model
is probed too. At each point the model's verdict (the host's IR through
:class:`secfw.compiler.evaluate.PolicyIndex`, the evaluator audits and the
conntrack revocation share) is compared with the kernel's, obtained by
*evaluating* the ruleset read back from the kernel (:mod:`.nftkernel` for
nftables, :mod:`.iptkernel` for iptables) along the packet's path through the
host's hooks for its topology:

* routed: ``inet forward`` then ``postrouting``, the tap as the output (ingress)
  or input (egress) interface, the uplink as the other;
* bridged: ``bridge prerouting`` (the frame's bridge port), the ``inet`` hooks
  br_netfilter calls (the bridge as both interfaces: nft sees no bridge port
  there, docs/nftables.md), then ``bridge postrouting`` and ``inet postrouting``.

NAT (floating IPs, the metadata redirect) is evaluated too: prerouting's nat
chains may translate the destination, and the packet then goes where the
translated destination says — to the port (the filter sees the fixed address
and the original source), to the host itself (``input``: the metadata server),
or elsewhere (it never reaches the port: for that port, a drop). Every ingress
IPv4 probe is sent to each floating address of the port as well, the model
judging it as sent to the fixed address; every port of a metadata host also
sends egress probes to ``169.254.169.254:80`` (the model: accepted whatever the
egress rules say, for a port the redirect serves), to neighbouring ports of
that address (the egress rules), and straight to the server (dropped).

Probes are first packets of connections (TCP SYN, conntrack ``new``; ICMP types
that cannot open one are ``invalid``); untracked ICMPv6 (neighbour discovery,
MLD) is left to the protection tests. A port's own addresses (fixed, allowed
address pairs) are never the remote of its probes: the instance keeps what it
sends to itself. Where a kernel rule names addresses and ports, they are
probed together (a rule opening 192.0.2.0/24 udp 443 is met by neither alone).
A difference is reported once per port, direction and family, with the first
packet (in sort order) that shows it and that an auditor can send — an
ordinary unicast remote (:func:`_sendable`), looked for among further probes
when the first differing ones have none — else the first.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import json
import socket
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import netaddr

from secfw.audit import iptkernel, nftkernel
from secfw.audit.policy import CloudPolicy, PortView
from secfw.audit.reach import egress_openers, ingress_openers
from secfw.audit.skeleton import PortData, port_data
from secfw.audit.space import ICMP_OF, PORT_PROTOCOL_NUMBERS, PROTO_MAX, SEL_MAX, Region, sweep
from secfw.backends.iptables.render import DEFAULT_MARK, PREFIX, group_chain_name
from secfw.backends.iptables.render import set_name as ipset_name
from secfw.backends.nftables.canonical import (
    ICMP_CODES,
    ICMP_TYPES,
    ICMPV6_CODES,
    ICMPV6_TYPES,
    protocol_number,
)
from secfw.backends.nftables.render import render
from secfw.compiler.evaluate import Packet, PolicyIndex
from secfw.compiler.ir import Family, HostFilter, MetadataRedirect
from secfw.compiler.metadata import METADATA_ADDRESS, METADATA_PORT, with_metadata
from secfw.constants import ICMP_NEW_TYPES, ICMPV6_NEW_TYPES, ICMPV6_UNTRACKED
from secfw.errors import BackendError

#: An ordinary client source port (never DHCP's 67/68/546/547).
CLIENT_PORT = 40000
#: Addresses probed per region edge list, and kernel-named values probed, at most.
EDGE_CIDRS = 16
KERNEL_VALUES = 256
#: Port protocols by the name nft and iptables print.
PORT_PROTOCOL_NAMES = {"tcp": 6, "udp": 17, "sctp": 132, "udplite": 136}
#: (address, protocol, port) named together by a kernel rule probed, at most.
RULE_POINTS = KERNEL_VALUES
Point = tuple[int, int, int, int]  # (address as int, protocol, selector, version)
#: The kernel's verdict on a probe: "accept", "drop", or "unknown: why".
KernelVerdict = Callable[[PortView, str, Packet], str]


@dataclass(frozen=True)
class Difference:
    """A port where the kernel and the model disagree, with the packet showing it."""

    view: PortView
    direction: str
    packet: Packet
    model: str
    kernel: str

    def row(self) -> dict[str, Any]:
        p = self.packet
        return {
            "host": self.view.instance.host, "instance": self.view.instance.name,
            "instance_id": self.view.instance.id, "port": self.view.port.tap,
            "direction": self.direction,
            "packet": {"src": p.src, "dst": p.dst, "protocol": p.protocol,
                       "sport": p.sport, "dport": p.dport, "icmp_type": p.icmp_type,
                       "icmp_code": p.icmp_code},
            "model": self.model, "kernel": self.kernel,
        }


@dataclass(frozen=True)
class HostNat:
    """The model's NAT on one host: each tap's floating addresses, the redirect."""

    floating: dict[str, tuple[str, ...]]
    metadata: MetadataRedirect | None


def host_nat(views: Sequence[PortView], metadata_listen: tuple[str, int] | None) -> HostNat:
    """The NAT the host's agent renders for ``views`` (one host's ports)."""
    if not views:
        return HostNat({}, None)
    hf = views[0].index.hf
    floating: dict[str, tuple[str, ...]] = {}
    for nat in hf.floating:
        floating[nat.tap] = (*floating.get(nat.tap, ()), nat.floating)
    return HostNat(floating, with_metadata(hf, metadata_listen).metadata)


def verify(cp: CloudPolicy, host: str, kernel: KernelVerdict,
           extra_addresses: Iterable[str] = (), extra_ports: Iterable[int] = (),
           metadata_listen: tuple[str, int] | None = None,
           extra_pairs: Iterable[tuple[str, int, int]] = (),
           only_taps: Collection[str] | None = None, by_port: bool = False,
           ) -> tuple[list[Difference], int]:
    """The differences on ``host`` and the number of probes compared.
    ``extra_addresses``/``extra_ports``: values the kernel's ruleset names;
    ``extra_pairs``: (address, protocol, port) that one of its rules names together
    (:func:`nft_rule_points`, :func:`secfw.audit.iptkernel.rule_points`);
    ``metadata_listen``: the host's metadata server, when it runs one;
    ``only_taps``: verify only these ports of the host (the bench's sample), None: all.
    A :class:`SharedKernel` (what :func:`nft_kernel` and :func:`ipt_kernel`
    return) is checked chain by chain (:mod:`secfw.audit.chainverify`, which
    reads the kernel's named values itself: the ``extra_*`` serve the port by
    port sampling below); ``by_port``: sample every port's whole flow space
    instead (the former check, far slower on a big host)."""
    on_host = sorted((v for v in cp.ports.values() if v.instance.host == host),
                     key=lambda v: v.port.tap)
    nat = host_nat(on_host, metadata_listen)
    views = [v for v in on_host if only_taps is None or v.port.tap in only_taps]
    if isinstance(kernel, SharedKernel) and not by_port:
        from secfw.audit.chainverify import verify_shared  # it builds on this module

        return verify_shared(cp, on_host, views, kernel, nat)
    addresses = sorted({ipaddress.ip_address(a) for a in extra_addresses},
                       key=lambda a: (a.version, a))[:KERNEL_VALUES]
    ports = sorted(set(extra_ports))[:KERNEL_VALUES]
    named = sorted({(ipaddress.ip_address(a), proto, p) for a, proto, p in extra_pairs},
                   key=lambda x: (x[0].version, x[0], x[1], x[2]))[:RULE_POINTS]
    found: list[Difference] = []
    probes = 0
    edges = network_edges(cp)
    for view in views:
        for direction in ("ingress", "egress"):
            for family in ("ipv4", "ipv6"):
                local = view.address(family)
                if local is None:
                    continue
                version = 4 if family == "ipv4" else 6
                points = sample_points(cp, view, direction, family,
                                       [int(a) for a in addresses if a.version == version],
                                       ports,
                                       [(int(a), proto, p) for a, proto, p in named
                                        if a.version == version])
                pairs = _judged(view, direction, family, sorted(points), nat)
                sendable = _sendable(cp, view, direction, edges)
                difference, compared = _first_difference(view, direction, pairs, kernel,
                                                         sendable)
                if difference is not None and not sendable(difference.packet):
                    difference, extra = _sendable_instead(
                        cp, difference, family, points, nat, kernel, (sendable, edges[0]))
                    compared += extra
                probes += compared
                if difference is not None:
                    found.append(difference)
    return found, probes


def _judged(view: PortView, direction: str, family: Family, points: Sequence[Point],
            nat: HostNat, index: PolicyIndex | None = None
            ) -> Iterable[tuple[Packet, str | None]]:
    """Each probe as the kernel gets it, with the model's verdict on it
    (``index``: the host's evaluator to judge with, default the view's)."""
    local = view.address(family)
    assert local is not None
    floating = nat.floating.get(view.port.tap, ()) if direction == "ingress" else ()
    itself = _own_ranges(view, family)
    for point in points:
        if any(low <= point[0] <= high for low, high in itself):
            continue  # the instance keeps what it sends to itself: no host sees it
        packet = probe_packet(point, local, direction, family)
        model = nat_model_verdict(view, direction, packet, nat.metadata, index)
        yield packet, model
        for address in floating if family == "ipv4" else ():
            yield probe_packet(point, address, direction, family), model
    if nat.metadata is not None and direction == "egress" and family == "ipv4":
        yield from metadata_probes(view, local, nat.metadata, index)


def _own_ranges(view: PortView, family: Family) -> list[tuple[int, int]]:
    """The port's own addresses of ``family`` — its fixed address and allowed
    address pairs (what the instance itself holds) — as integer ranges."""
    version = 4 if family == "ipv4" else 6
    local = view.address(family)
    cidrs = [c for c, _ in view.port.address_pairs()] + ([local] if local else [])
    blocks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    return [(int(b[0]), int(b[-1])) for b in blocks if b.version == version]


def metadata_probes(view: PortView, local: str, md: MetadataRedirect,
                    index: PolicyIndex | None = None) -> Iterable[tuple[Packet, str | None]]:
    """Egress probes about the metadata redirect (module docstring)."""
    probes = [Packet(local, METADATA_ADDRESS, protocol, CLIENT_PORT, port)
              for protocol, port in ((6, METADATA_PORT), (6, METADATA_PORT - 1),
                                     (6, METADATA_PORT + 1), (17, METADATA_PORT))]
    probes.append(Packet(local, md.address, 6, CLIENT_PORT, md.port))
    for packet in probes:
        yield packet, nat_model_verdict(view, "egress", packet, md, index)


def nat_model_verdict(view: PortView, direction: str, packet: Packet,
                      md: MetadataRedirect | None, index: PolicyIndex | None = None
                      ) -> str | None:
    """:func:`model_verdict`, with the metadata redirect's exceptions: a served
    port's TCP to ``169.254.169.254:80`` is accepted whatever its egress rules
    say; what a port sends straight to the server's address and port is dropped."""
    if md is not None and direction == "egress" and packet.protocol == 6:
        if (packet.dst, packet.dport) == (METADATA_ADDRESS, METADATA_PORT) and any(
                p.tap == view.port.tap and p.address == packet.src for p in md.ports):
            return "accept"
        if (packet.dst, packet.dport) == (md.address, md.port):
            return "drop"
    return model_verdict(view, direction, packet, index)


def _first_difference(view: PortView, direction: str,
                      pairs: Iterable[tuple[Packet, str | None]], kernel: KernelVerdict,
                      sendable: Callable[[Packet], bool] = lambda _p: True
                      ) -> tuple[Difference | None, int]:
    """The first probe the kernel judges otherwise than the model — the first
    ``sendable`` one if any differs (the probes after the first difference are
    compared until one is found) — and how many probes were compared up to it
    (all, when there is none)."""
    compared = 0
    first: Difference | None = None
    for packet, model in pairs:
        if model is None:
            continue
        compared += 1
        verdict = kernel(view, direction, packet)
        if verdict != model:
            found = Difference(view, direction, packet, model, verdict)
            if sendable(packet):
                return found, compared
            first = first or found
    return first, compared


#: Remote addresses no packet carries on the wire between hosts (unspecified,
#: "this network", loopback, link-local, multicast, reserved and broadcast,
#: IPv4-mapped; RFC 6890): a region's corner is often one (0.0.0.0 of
#: 0.0.0.0/0), and a packet with one shows nothing an auditor can replay.
NOT_ON_THE_WIRE = netaddr.IPSet(["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3",
                                 "::/127", "::ffff:0:0/96", "fe80::/10", "ff00::/8"])
#: IPv6 next headers that are extension headers (RFC 8200 section 4, RFC 7045):
#: a probe "of" one is not a transport packet anything can send as such.
IPV6_EXTENSION_HEADERS = frozenset({0, 43, 44, 50, 51, 60, 135, 139, 140, 253, 254})
#: The interface identifier of an IPv6 address: all zero, it is a subnet-router
#: anycast address (RFC 4291 section 2.6.1) that a router keeps for itself.
INTERFACE_ID = (1 << 64) - 1


def network_edges(cp: CloudPolicy) -> tuple[netaddr.IPSet, netaddr.IPSet]:
    """The cloud's subnets, and their network addresses: an IPv4 subnet's first
    and last, an IPv6 subnet's router anycast (RFC 4291 section 2.6.1)."""
    subnets, edges = netaddr.IPSet(), netaddr.IPSet()
    for network in cp.state.networks.values():
        for cidr in (network.cidr, network.cidr6):
            if cidr:
                block = netaddr.IPNetwork(cidr)
                subnets.add(block)
                edges.add(block.network)
                if block.version == 4 and block.broadcast is not None:
                    edges.add(block.broadcast)
    return subnets, edges


def _sendable(cp: CloudPolicy, view: PortView, direction: str,
              subnets: tuple[netaddr.IPSet, netaddr.IPSet]) -> Callable[[Packet], bool]:
    """Whether a probe of ``view`` is a packet between real parties, one an
    auditor can send to see the difference: its remote address is ordinary
    unicast — none of :data:`NOT_ON_THE_WIRE`, not the port's own (a packet to
    itself never leaves the instance), not a subnet's network address
    (:func:`network_edges`), and in a subnet of the cloud only when a port holds
    it (nothing else is there to send or receive) — and, for IPv6, its protocol
    is not an extension header and its interface identifier is not zero."""
    own = {netaddr.IPAddress(a) for a in (view.port.ip, view.port.ip6) if a}
    inside, edges = subnets

    def sendable(packet: Packet) -> bool:
        remote = packet.src if direction == "ingress" else packet.dst
        address = netaddr.IPAddress(remote)
        if address in NOT_ON_THE_WIRE or address in edges or address in own:
            return False
        if address in inside and cp.owner(remote) is None:
            return False
        return packet.version == 4 or (packet.protocol not in IPV6_EXTENSION_HEADERS
                                       and int(address) & INTERFACE_ID != 0)

    return sendable


def model_verdict(view: PortView, direction: str, packet: Packet,
                  index: PolicyIndex | None = None) -> str | None:
    """``accept``/``drop`` by the host's IR (None: not compared, see module doc);
    ``index``: the host's evaluator (default the view's; verify's shared check
    passes one that memoises each group chain's answers)."""
    family: Family = "ipv4" if packet.version == 4 else "ipv6"
    if packet.protocol == ICMP_OF[family]:
        if family == "ipv6" and packet.icmp_type in ICMPV6_UNTRACKED:
            return None
        new = ICMP_NEW_TYPES if family == "ipv4" else ICMPV6_NEW_TYPES
        if packet.icmp_type not in new and view.policy.port_security:
            return "drop"  # conntrack: invalid, dropped by the filtered port
    evaluator = index or view.index
    judge = evaluator.ingress if direction == "ingress" else evaluator.egress
    return "accept" if judge(view.policy, packet) else "drop"


def icmp_invalid(packet: Packet) -> bool:
    """Whether conntrack calls this ICMP packet invalid (it opens no connection)."""
    family: Family = "ipv4" if packet.version == 4 else "ipv6"
    if packet.protocol != ICMP_OF[family]:
        return False
    new = ICMP_NEW_TYPES if family == "ipv4" else ICMPV6_NEW_TYPES | ICMPV6_UNTRACKED
    return packet.icmp_type not in new


def probe_packet(point: Point, local: str, direction: str, family: Family) -> Packet:
    """The first packet of a flow between ``local`` and the point's remote."""
    value, protocol, selector, version = point
    remote = str(ipaddress.ip_address(value) if version == 4 else ipaddress.IPv6Address(value))
    src, dst = (remote, local) if direction == "ingress" else (local, remote)
    if protocol in PORT_PROTOCOL_NUMBERS:
        return Packet(src, dst, protocol, CLIENT_PORT, selector)
    if protocol == ICMP_OF[family]:
        return Packet(src, dst, protocol, None, None, selector // 256, selector % 256)
    return Packet(src, dst, protocol)


def sample_points(cp: CloudPolicy, view: PortView, direction: str, family: Family,
                  kernel_addresses: Sequence[int], kernel_ports: Sequence[int],
                  kernel_pairs: Sequence[tuple[int, int, int]] = ()) -> set[Point]:
    """The boundary points of the port's space (module docstring)."""
    openers = ingress_openers(cp, view, family) if direction == "ingress" else \
        egress_openers(cp, view, family)
    regions = sweep(family, openers)
    version = 4 if family == "ipv4" else 6
    top = 2 ** (32 if version == 4 else 128) - 1
    members = sorted({int(ip) for o in openers if o.addresses.size <= 4096
                      for cidr in o.addresses.iter_cidrs() for ip in (cidr.first, cidr.last)})
    points: set[Point] = set()
    for region in regions:
        points |= _region_points(region, members, top, version)
    anchors = [1, *(c.first for r in regions[:1] for c in r.addresses.iter_cidrs())][:2]
    icmp = ICMP_OF[family]
    base = [(6, 22), (6, 80), (17, 53), (icmp, (8 if version == 4 else 128) * 256), (47, 0)]
    for address in [*anchors, *kernel_addresses]:
        points |= {(address, proto, sel, version) for proto, sel in base}
    for port in kernel_ports:
        points |= {(a, proto, port, version) for a in anchors for proto in (6, 17)}
    # a rule opens its own addresses at its own ports: neither alone, tried at
    # other ports or addresses, need meet it (a rule added for 192.0.2.0/24 udp
    # 443-65534 is missed by 192.0.2.0 at the base services and by port 443 at
    # the anchors)
    for address, proto, port in kernel_pairs:
        points.add((address, proto, port, version))
    return {_clean(p) for p in points if 0 <= p[0] <= top}


def _sendable_instead(cp: CloudPolicy, difference: Difference, family: Family,
                      probed: set[Point], nat: HostNat, kernel: KernelVerdict,
                      judge: tuple[Callable[[Packet], bool], netaddr.IPSet]
                      ) -> tuple[Difference, int]:
    """A difference of the same port, direction and family with a packet one
    can send (``judge``: :func:`_sendable` and the cloud's subnets), looked for
    among further probes (:func:`ordinary_points`, the neighbours of
    ``difference``'s remote); else ``difference``. And how many were compared."""
    sendable, subnets = judge
    view, direction = difference.view, difference.direction
    extra = ordinary_points(cp, view, direction, family, subnets)
    extra |= _neighbours(difference.packet, direction)
    more = _judged(view, direction, family, sorted(extra - probed), nat)
    other, compared = _first_difference(view, direction, more, kernel, sendable)
    if other is not None and sendable(other.packet):
        return other, compared
    return difference, compared


def _neighbours(packet: Packet, direction: str) -> set[Point]:
    """The same probe with the remote addresses near its own (a difference found
    at the first address of a prefix, where no host is; the next one is often
    the prefix's router)."""
    remote = ipaddress.ip_address(packet.src if direction == "ingress" else packet.dst)
    selector = packet.dport if packet.dport is not None else (
        (packet.icmp_type or 0) * 256 + (packet.icmp_code or 0))
    top = 2 ** remote.max_prefixlen - 1
    return {_clean((int(remote) + step, packet.protocol, selector, remote.version))
            for step in (-3, -2, 2, 3) if 0 <= int(remote) + step <= top}


def ordinary_points(cp: CloudPolicy, view: PortView, direction: str, family: Family,
                    subnets: netaddr.IPSet) -> set[Point]:
    """Each region's corners (protocols and selectors) at the first and last
    address of the region that is ordinary unicast outside the cloud's
    ``subnets``, and at the ports' addresses inside it: probes for a difference
    found only at addresses no packet can carry (0.0.0.0 of 0.0.0.0/0, a
    subnet's network address), so that verify can give one an auditor can send
    (:func:`_sendable`)."""
    openers = ingress_openers(cp, view, family) if direction == "ingress" else \
        egress_openers(cp, view, family)
    version = 4 if family == "ipv4" else 6
    held = sorted(netaddr.IPAddress(a) for v in cp.ports.values()
                  if (a := v.address(family)) is not None and v is not view)
    points: set[Point] = set()
    for region in sweep(family, openers):
        usable = region.addresses - NOT_ON_THE_WIRE - subnets
        cidrs = list(usable.iter_cidrs())
        # the neighbours of the ends too: an end is often a subnet's own address
        ends = {cidrs[0].first, cidrs[0].first + 1, cidrs[-1].last - 1,
                cidrs[-1].last} if cidrs else set()
        ends = {a for a in ends if netaddr.IPAddress(a, version) in usable}
        inside = (int(a) for a in held if a in region.addresses)
        ends.update(itertools.islice(inside, EDGE_CIDRS))
        box = region.box
        points |= {(a, p, s, version) for a in ends for p in (box.proto_lo, box.proto_hi)
                   for s in (box.sel_lo, box.sel_hi)}
    return {_clean(p) for p in points}


def _region_points(region: Region, members: Sequence[int], top: int,
                   version: int) -> set[Point]:
    box = region.box
    cidrs = list(region.addresses.iter_cidrs())
    edges = cidrs[:EDGE_CIDRS] + cidrs[-EDGE_CIDRS:]
    inside = {v for c in edges for v in (c.first, c.last)}
    inside |= _members_in(members, region.addresses)
    corners = {(p, s) for p in (box.proto_lo, box.proto_hi) for s in (box.sel_lo, box.sel_hi)}
    points = {(a, p, s, version) for a in inside for p, s in corners}
    first = cidrs[0].first
    points |= {(v, box.proto_lo, box.sel_lo, version)
               for c in edges for v in (c.first - 1, c.last + 1) if 0 <= v <= top}
    points |= {(first, p, box.sel_lo, version)
               for p in (box.proto_lo - 1, box.proto_hi + 1) if 0 <= p <= PROTO_MAX}
    points |= {(first, box.proto_lo, s, version)
               for s in (box.sel_lo - 1, box.sel_hi + 1) if 0 <= s <= SEL_MAX}
    return points


def _members_in(members: Sequence[int], addresses: netaddr.IPSet) -> set[int]:
    """The ``members`` (sorted) that ``addresses`` holds: one binary search per
    interval of ``addresses`` (asking the set about each member, a netaddr
    lookup per member and region, was most of a big host's verify)."""
    found: set[int] = set()
    for interval in addresses.iter_ipranges():
        start = bisect.bisect_left(members, interval.first)
        stop = bisect.bisect_right(members, interval.last, lo=start)
        found.update(members[start:stop])
    return found


def _clean(point: Point) -> Point:
    """Selectors mean nothing for protocols without ports or ICMP: one probe (0)."""
    address, protocol, _selector, version = point
    if protocol in PORT_PROTOCOL_NUMBERS or protocol == ICMP_OF["ipv4" if version == 4
                                                                   else "ipv6"]:
        return point
    return address, protocol, 0, version


class SharedKernel:
    """A host's kernel ruleset as verify evaluates it: called on a probe it is a
    :data:`KernelVerdict` (the whole path); the other methods let verify check
    each group chain once (:mod:`secfw.audit.chainverify`) — a chain alone,
    the path with known chains stubbed, and the values a part of it names.
    Subclassed per backend (:class:`NftKernel`, :class:`IptKernel`)."""

    def __call__(self, view: PortView, direction: str, packet: Packet) -> str:
        return self.judge(view, direction, packet)

    def judge(self, view: PortView, direction: str, packet: Packet,
              stub: Callable[[str, Packet], str | None] | None = None) -> str:
        """The verdict of the path (accept, drop, ``unknown: why``); ``stub``
        answers for group chains by their IR name (None: evaluate the chain)."""
        raise NotImplementedError

    def chain(self, name: str, view: PortView, direction: str, packet: Packet) -> str:
        """What IR group chain ``name``'s kernel chain alone does with the probe of
        ``view``: ``accept``, ``continue`` (it lets the next chain decide) or
        anything else the agent never writes (``drop``, a mark changed...)."""
        raise NotImplementedError

    def set_spans(self, name: str) -> list[tuple[int, int]] | None:
        """The kernel's set for IR address set ``name`` as merged, sorted integer
        intervals (first, last); None when the kernel has no such set."""
        raise NotImplementedError

    def chain_values(self, name: str) -> NamedValues:
        """Addresses, ports and (address, protocol, port) named by the rules of
        the kernel chain of IR chain ``name`` (the sets they look up are checked
        apart, :meth:`set_spans`)."""
        raise NotImplementedError

    def other_values(self) -> NamedValues:
        """The same, for the rules of every chain that is not a group chain (set
        elements left out: verify checks sets apart, see chainverify)."""
        raise NotImplementedError

    def name_chains(self, names: Iterable[str]) -> None:
        """The host's IR group chains, for a backend whose kernel names differ."""

    def chain_normal(self, name: str, direction: str, family: Family
                     ) -> frozenset[BoxKey] | None:
        """The kernel chain of IR chain ``name`` in normal form for ``family``:
        the boxes its rules accept (:data:`BoxKey`), when every rule is a plain
        conjunction of matches on the remote address, protocol, destination port
        and ICMP type/code that accepts; None otherwise (verify then probes it)."""
        return None

    def port_dependent(self, name: str, direction: str) -> bool:
        """Whether the kernel chain of IR chain ``name`` may treat two ports'
        probes otherwise for the same remote and service: it reads an interface,
        a MAC, a mark, conntrack, the local address, or jumps elsewhere (the
        agent's group chains do none of these): then it is checked per port."""
        raise NotImplementedError

    def port_data(self, hf: HostFilter) -> PortData | None:
        """The ruleset's skeleton and each port's own elements compared as data
        with the backend's rendering of ``hf`` (the host's IR as the agent
        renders it: :mod:`secfw.audit.skeleton`); None: this backend has no such
        comparison (every port is probed)."""
        return None


#: One box a chain accepts: (protocol or None, destination ports (low, high) or
#: None, ICMP (type, code or None) or None, the remote addresses as merged
#: integer intervals).
BoxKey = tuple[int | None, tuple[int, int] | None, tuple[int, int | None] | None,
               tuple[tuple[int, int], ...]]


@dataclass(frozen=True)
class NamedValues:
    """Values a part of a ruleset names: extra probes (module docstring)."""

    addresses: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    pairs: tuple[tuple[str, int, int], ...] = ()


#: Words of a group chain's nft JSON that make it port-dependent (see
#: :meth:`SharedKernel.port_dependent`); the local address is added per direction.
_NFT_PORT_WORDS = ('"iifname"', '"oifname"', '"iif"', '"oif"', '"ether"', '"mark"', '"ct"',
                   '"jump"', '"goto"', '"vmap"', '"dnat"', '"snat"', '"meta": {"key": "i',
                   '"meta": {"key": "o')


class NftKernel(SharedKernel):
    """An nftables JSON listing (:func:`nft_kernel`)."""

    def __init__(self, listing: dict[str, Any], topology: str | None,
                 local: Iterable[str]) -> None:
        self.listing = listing
        self.ruleset = nftkernel.NftRuleset(listing)
        self.shape = topology or nftkernel.topology_of(self.ruleset)
        self.own = frozenset(local)
        self._spans: dict[str, list[tuple[int, int]] | None] = {}

    def _probe(self, view: PortView, direction: str, packet: Packet) -> nftkernel.Probe:
        mac = view.policy.mac if direction == "egress" else nftkernel.OUTSIDE_MAC
        return nftkernel.Probe(
            "", "", packet.src, packet.dst, packet.protocol, mac, packet.sport,
            packet.dport, packet.icmp_type, packet.icmp_code,
            ct_state=nftkernel.CT_STATES["invalid" if icmp_invalid(packet) else "new"])

    def judge(self, view: PortView, direction: str, packet: Packet,
              stub: Callable[[str, Packet], str | None] | None = None) -> str:
        probe = self._probe(view, direction, packet)
        tap = view.port.tap
        nft_stub = None if stub is None else (
            lambda name, p: stub(name, _as_packet(p)) if name.startswith(GROUP_CHAIN_PREFIX)
            else None)
        try:
            verdict, after = self.ruleset.run(
                nftkernel.paths_before(self.shape, tap, direction), probe, nft_stub)
            if verdict == "drop" or not _reaches_port(view, direction, after.dst, self.own):
                return "drop"
            rest = nftkernel.paths_after(self.shape, tap, direction, after.dst in self.own)
            return self.ruleset.run(rest, after, nft_stub)[0]
        except nftkernel.Unsupported as exc:
            return f"unknown: {exc}"

    def chain(self, name: str, view: PortView, direction: str, packet: Packet) -> str:
        stage = nftkernel.paths_after(self.shape, view.port.tap, direction)[0]
        probe = replace(self._probe(view, direction, packet), iifname=stage.iifname,
                        oifname=stage.oifname)
        try:
            verdict, after = self.ruleset.chain_effect("inet", name, probe)
        except nftkernel.Unsupported as exc:
            return f"unknown: {exc}"
        if after != probe:
            return f"{verdict or 'continue'}, the packet changed"
        return "continue" if verdict is None else verdict

    def set_spans(self, name: str) -> list[tuple[int, int]] | None:
        if name not in self._spans:  # (each chain's rules ask for their sets)
            self._spans[name] = self._set_spans(name)
        return self._spans[name]

    def _set_spans(self, name: str) -> list[tuple[int, int]] | None:
        if ("inet", name) not in self.ruleset.sets:
            return None
        spans = []
        for element in self.ruleset.sets[("inet", name)]:
            key = element["elem"]["val"] if isinstance(element, dict) and "elem" in element \
                else element
            if isinstance(key, dict) and "prefix" in key:
                block = ipaddress.ip_network(f"{key['prefix']['addr']}/{key['prefix']['len']}",
                                             strict=False)
                spans.append((int(block[0]), int(block[-1])))
            elif isinstance(key, dict) and "range" in key:
                low, high = (address_int(str(v)) for v in key["range"])
                spans.append((low, high))
            elif isinstance(key, str) and _is_address(key):
                spans.append((address_int(key),) * 2)
            else:
                raise nftkernel.Unsupported(f"set element {key!r}")
        return merged_spans(spans)

    def chain_normal(self, name: str, direction: str, family: Family
                     ) -> frozenset[BoxKey] | None:
        if ("inet", name) not in self.ruleset.rules:
            return None
        keys: set[BoxKey] = set()
        for expr in self._rules(name):
            box = _nft_box(expr, direction)
            if box is None:
                return None
            rule_family, key, remote = box
            if rule_family not in (None, family):
                continue
            spans = self._remote_spans(remote, family)
            if spans is None:
                return None
            keys.add((*key, spans))
        return frozenset(keys)

    def _remote_spans(self, remote: Any, family: Family) -> tuple[tuple[int, int], ...] | None:
        """A rule's remote (None: any, an address, a prefix, ``@set``) as intervals."""
        top = 2 ** (32 if family == "ipv4" else 128) - 1
        if remote is None:
            return ((0, top),)
        if isinstance(remote, str) and remote.startswith("@"):
            spans = self.set_spans(remote[1:])
            return None if spans is None else tuple(spans)
        if isinstance(remote, dict) and "prefix" in remote:
            block = ipaddress.ip_network(
                f"{remote['prefix']['addr']}/{remote['prefix']['len']}", strict=False)
            return ((int(block[0]), int(block[-1])),)
        if isinstance(remote, str) and _is_address(remote):
            value = int(ipaddress.ip_address(remote))
            return ((value, value),)
        return None

    def _rules(self, name: str) -> list[list[Any]]:
        return self.ruleset.rules.get(("inet", name), [])

    def chain_values(self, name: str) -> NamedValues:
        return self._values(self._rules(name))

    def other_values(self) -> NamedValues:
        rules = [expr for (family, chain), exprs in self.ruleset.rules.items()
                 if not (family == "inet" and chain.startswith(GROUP_CHAIN_PREFIX))
                 for expr in exprs]
        return self._values(rules)

    def _values(self, rules: list[list[Any]]) -> NamedValues:
        """The values ``rules`` name (the elements of the sets they look up are
        left to verify's set check)."""
        addresses, ports = _named_values(rules)
        pairs: set[tuple[str, int, int]] = set()
        for expr in rules:
            found, named_ports = _named_values(expr)
            protocols = _port_protocols(json.dumps(expr))
            pairs.update((a, proto, p) for a in found for proto in protocols
                         for p in named_ports)
        return NamedValues(tuple(sorted(set(addresses))), tuple(ports), tuple(sorted(pairs)))

    def port_data(self, hf: HostFilter) -> PortData | None:
        try:
            desired = render(hf, self.shape)
        except BackendError as exc:  # the model has no nftables rendering: probe
            return PortData(f"the model does not render: {exc}", frozenset())
        return port_data(self.listing, desired, self.shape, [p.tap for p in hf.ports],
                         {c.name for c in hf.chains}, {s.name for s in hf.sets})

    def port_dependent(self, name: str, direction: str) -> bool:
        if ("inet", name) not in self.ruleset.rules:
            return False  # missing: every port's probes show it the same way
        text = json.dumps(self._rules(name))
        local = '"daddr"' if direction == "ingress" else '"saddr"'
        return any(word in text for word in (*_NFT_PORT_WORDS, local))


def address_int(text: str) -> int:
    """An address's text as an integer: ``inet_pton`` for the strict forms (the
    kernel's and the compiler's, ~20x faster than :mod:`ipaddress` — a 10k host's
    sets hold ~50k addresses), :mod:`ipaddress` for anything else (ValueError
    for what is no address)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return int.from_bytes(socket.inet_pton(family, text), "big")
        except OSError:
            continue
    return int(ipaddress.ip_address(text))


def cidr_span(text: str) -> tuple[int, int]:
    """A CIDR's (or an address's) first and last address as integers."""
    address, _, length = text.partition("/")
    first = address_int(address)
    bits = 32 if "." in address and ":" not in address else 128
    if not length:
        return first, first
    host = (1 << (bits - int(length))) - 1
    if not 0 <= int(length) <= bits or first & host:
        network = ipaddress.ip_network(text, strict=False)  # as the evaluator reads it
        return int(network[0]), int(network[-1])
    return first, first | host


def merged_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Integer intervals sorted, overlapping and adjacent ones merged (one
    family's addresses: a set's normal form)."""
    found: list[tuple[int, int]] = []
    for first, last in sorted(spans):
        if found and first <= found[-1][1] + 1:
            found[-1] = (found[-1][0], max(last, found[-1][1]))
        else:
            found.append((first, last))
    return found


def _nft_box(expr: list[Any], direction: str
             ) -> tuple[str | None, tuple[Any, Any, Any], Any] | None:
    """One nft rule as (family or None, (protocol, ports, ICMP), remote) when it
    is a conjunction of ``==`` matches this normal form knows ending in
    ``accept`` (nft lists ``tcp dport`` for ``meta l4proto 6 th dport`` and
    leaves out the ``meta nfproto`` that ``l4proto icmp`` implies); else None."""
    if not expr or expr[-1] != {"accept": None}:
        return None
    family: str | None = None
    protocol: int | None = None
    ports: tuple[int, int] | None = None
    icmp: list[int | None] = [None, None]
    remote: Any = None
    remote_field = "saddr" if direction == "ingress" else "daddr"
    for statement in expr[:-1]:
        match = statement.get("match") if isinstance(statement, dict) else None
        if not isinstance(match, dict) or match.get("op") != "==":
            return None
        left, right = match["left"], match["right"]
        meta = left.get("meta", {}).get("key") if isinstance(left, dict) else None
        payload = left.get("payload", {}) if isinstance(left, dict) else {}
        where, field = payload.get("protocol"), payload.get("field")
        if meta == "nfproto" and right in ("ipv4", "ipv6"):
            family = right
        elif meta == "l4proto" and (number := protocol_number(right)) is not None:
            protocol = number
            family = {1: "ipv4", 58: "ipv6"}.get(number, family)
        elif where in ("ip", "ip6") and field == remote_field:
            family, remote = ("ipv4" if where == "ip" else "ipv6"), right
        elif field == "dport" and where in (*PORT_PROTOCOL_NAMES, "th"):
            if where != "th":
                protocol = PORT_PROTOCOL_NAMES[where]
            if isinstance(right, int):
                ports = (right, right)
            elif isinstance(right, dict) and "range" in right:
                ports = (int(right["range"][0]), int(right["range"][1]))
            else:
                return None
        elif where in ("icmp", "icmpv6") and field in ("type", "code"):
            table = (ICMP_TYPES if where == "icmp" else ICMPV6_TYPES) if field == "type" \
                else (ICMP_CODES if where == "icmp" else ICMPV6_CODES)
            value = right if isinstance(right, int) else table.get(str(right))
            if value is None:
                return None
            icmp[0 if field == "type" else 1] = value
            protocol, family = (1, "ipv4") if where == "icmp" else (58, "ipv6")
        else:
            return None
    if icmp[1] is not None and icmp[0] is None:
        return None
    icmp_key = None if icmp[0] is None else (icmp[0], icmp[1])
    return family, (protocol, ports, icmp_key), remote


#: IR group chains' names (compiler/build.py: ``sg-<group id>-in|out``).
GROUP_CHAIN_PREFIX = "sg-"


def _as_packet(probe: nftkernel.Probe | iptkernel.IptProbe) -> Packet:
    """The evaluator's packet of a kernel probe (its headers as they are now)."""
    return Packet(probe.src, probe.dst, probe.protocol, probe.sport, probe.dport,
                  probe.icmp_type, probe.icmp_code)


def nft_kernel(listing: dict[str, Any], topology: str | None = None,
               local: Iterable[str] = ()) -> tuple[NftKernel, Deferred[str], Deferred[int]]:
    """The kernel verdict of an nftables JSON listing, and the addresses and ports
    its rules and sets name (extra probes for :func:`verify`'s port-by-port
    sampling: walked only if it asks, a few seconds on a 10k-port host's
    listing). ``local``: the host's own addresses that matter (the metadata
    server's): a packet whose translated destination is one of them goes to
    ``input``."""
    addresses = Deferred(lambda: _named_values(listing)[0])
    ports = Deferred(lambda: _named_values(listing)[1])
    return NftKernel(listing, topology, local), addresses, ports


_T = TypeVar("_T")


class Deferred(Generic[_T]):
    """Values computed on first iteration (then kept): what only :func:`verify`'s
    port-by-port sampling reads, so that the shared check never pays for it."""

    def __init__(self, make: Callable[[], Iterable[_T]]) -> None:
        self._make: Callable[[], Iterable[_T]] | None = make
        self._items: list[_T] = []

    def __iter__(self) -> Iterator[_T]:
        if self._make is not None:
            self._items, self._make = list(self._make()), None
        return iter(self._items)


def nft_rule_points(listing: dict[str, Any]) -> Deferred[tuple[str, int, int]]:
    """(address, protocol, port) that one rule of an nftables JSON listing names
    together: its addresses (literals, prefixes' first address, the elements of
    the sets it looks up) with its protocol (every port protocol when it names
    none) and its destination ports' edges (extra probes for verify's
    port-by-port sampling; computed when it iterates them)."""
    return Deferred(lambda: _rule_points(listing))


def _rule_points(listing: dict[str, Any]) -> list[tuple[str, int, int]]:
    sets: dict[str, list[str]] = {}
    for obj in listing.get("nftables", []):
        body = obj.get("set") or obj.get("map")
        if isinstance(body, dict):
            sets[f"@{body.get('name')}"] = _named_values(body.get("elem", []))[0]
    found: set[tuple[str, int, int]] = set()
    for obj in listing.get("nftables", []):
        rule = obj.get("rule")
        if not isinstance(rule, dict):
            continue
        addresses, ports = _named_values(rule.get("expr", []))
        if not ports:
            continue
        looked_up = [a for name in _set_references(rule.get("expr", []))
                     for a in sets.get(name, ())]
        protocols = _port_protocols(json.dumps(rule.get("expr", [])))
        found.update((a, proto, p) for a in (*addresses, *looked_up) for proto in protocols
                     for p in ports)
    return sorted(found)


def _port_protocols(text: str) -> frozenset[int]:
    """The port protocols a rule's expressions (as JSON text) name: a transport
    header (``tcp dport``) or ``meta l4proto``; all of them when it names none."""
    named = {number for name, number in PORT_PROTOCOL_NAMES.items()
             if f'"protocol": "{name}"' in text or f'"right": "{name}"' in text}
    named |= {n for n in PORT_PROTOCOL_NUMBERS if f'"l4proto"}}, "op": "==", "right": {n}}}'
              in text}
    return frozenset(named) or PORT_PROTOCOL_NUMBERS


def _set_references(node: Any) -> list[str]:
    """The ``@set`` names a rule's expressions look up."""
    if isinstance(node, str):
        return [node] if node.startswith("@") else []
    values = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    return [name for value in values for name in _set_references(value)]


def _reaches_port(view: PortView, direction: str, destination: str,
                  local: frozenset[str]) -> bool:
    """Whether a packet for the port, its destination translated at prerouting,
    still goes to the port: an ingress one only when it is addressed to the port's
    fixed address (a floating address DNATed elsewhere, or not at all, is routed
    away from the tap); an egress one always (it leaves by the uplink or, for
    one of ``local``, goes to the host)."""
    if direction == "egress" or destination in local:
        return True
    family: Family = "ipv4" if ipaddress.ip_address(destination).version == 4 else "ipv6"
    return destination == view.address(family)


def _named_values(node: Any) -> tuple[list[str], list[int]]:
    """Addresses (literals, prefixes' first addresses) and port numbers written
    anywhere in a listing: where the kernel may open what the model does not."""
    addresses: set[str] = set()
    ports: set[int] = set()

    def walk(item: Any, port_context: bool) -> None:
        if isinstance(item, dict):
            if "prefix" in item and isinstance(item["prefix"], dict):
                addresses.add(str(item["prefix"].get("addr")))
                return
            if "match" in item and isinstance(item["match"], dict):
                left = json.dumps(item["match"].get("left"))
                walk(item["match"].get("right"), '"dport"' in left)
                return
            for value in item.values():
                walk(value, port_context)
        elif isinstance(item, list):
            for value in item:
                walk(value, port_context)
        elif isinstance(item, int) and port_context and 0 <= item <= SEL_MAX:
            ports.update(p for p in (item - 1, item, item + 1) if 0 <= p <= SEL_MAX)
        elif isinstance(item, str) and _is_address(item):
            addresses.add(item)

    walk(node, False)
    return sorted(addresses), sorted(ports)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class IptKernel(SharedKernel):
    """iptables-save, ip6tables-save and ipset save output (:func:`ipt_kernel`)."""

    def __init__(self, saves: dict[str, str], topology: str, local: Iterable[str]) -> None:
        self.saves = saves
        self.topology = topology
        self.tables = iptkernel.chains_of(saves)
        self.nat = iptkernel.nat_of(saves)
        self.own = frozenset(local)
        self._ir: dict[str, str] = {}

    def name_chains(self, names: Iterable[str]) -> None:
        self._ir.update((group_chain_name(name), name) for name in names)

    def judge(self, view: PortView, direction: str, packet: Packet,
              stub: Callable[[str, Packet], str | None] | None = None) -> str:
        probe = _ipt_probe(view, direction, packet, self.topology)
        ipt_stub = None if stub is None else self._stub(stub)
        try:
            if packet.version == 4 and "PREROUTING" in self.nat.chains \
                    and probe.ct_state not in ("invalid", "untracked"):
                verdict, probe = self.nat.run("PREROUTING", probe)
                if verdict == "drop":
                    return "drop"
            if not _reaches_port(view, direction, probe.dst, self.own):
                return "drop"
            if probe.dst in self.own:
                probe = replace(probe, oif="", physdev_out=None)
                return self.tables[packet.version].run("INPUT", probe, ipt_stub)[0]
            return self.tables[packet.version].run("FORWARD", probe, ipt_stub)[0]
        except nftkernel.Unsupported as exc:
            return f"unknown: {exc}"

    def _stub(self, stub: Callable[[str, Packet], str | None]) -> iptkernel.Stub:
        """``stub`` for the kernel's chains: group chains by their IR name."""
        def answer(name: str, probe: iptkernel.IptProbe) -> str | None:
            if not name.startswith(IPT_GROUP_PREFIX):
                return None
            return stub(self._ir.get(name, name), _as_packet(probe))
        return answer

    def chain(self, name: str, view: PortView, direction: str, packet: Packet) -> str:
        probe = _ipt_probe(view, direction, packet, self.topology)
        try:
            verdict, after = self.tables[packet.version].chain_effect(
                group_chain_name(name), probe)
        except nftkernel.Unsupported as exc:
            return f"unknown: {exc}"
        if verdict is None and after == replace(probe, mark=probe.mark | DEFAULT_MARK):
            return "accept"  # the allow mark, as the agent's rules set it
        if after != probe:
            return f"{verdict or 'continue'}, the packet changed"
        return "continue" if verdict is None else verdict.lower()

    def set_spans(self, name: str) -> list[tuple[int, int]] | None:
        networks = self.tables[4].ipsets.get(ipset_name(name))
        if networks is None:
            return None
        return merged_spans((int(n[0]), int(n[-1])) for n in networks)

    def _lines(self, chain: str | None) -> list[str]:
        """The rules (``-A`` lines) of ``chain``, both families; None: of every
        chain that is not a group chain."""
        found = []
        for family in ("ipv4", "ipv6", "ipv4_nat"):
            for line in self.saves.get(family, "").splitlines():
                owner = line.split()[1] if line.startswith("-A ") and " " in line else None
                if owner is None:
                    continue
                if owner == chain or (chain is None
                                      and not owner.startswith(IPT_GROUP_PREFIX)):
                    found.append(line)
        return found

    def chain_values(self, name: str) -> NamedValues:
        return _as_named(*iptkernel.lines_values(self._lines(group_chain_name(name)), {}))

    def other_values(self) -> NamedValues:
        return _as_named(*iptkernel.lines_values(self._lines(None), {}))

    def port_dependent(self, name: str, direction: str) -> bool:
        local = "-d" if direction == "ingress" else "-s"
        for line in self._lines(group_chain_name(name)):
            tokens = line.split()
            jumps = [b for a, b in itertools.pairwise(tokens) if a in ("-j", "-g")]
            if any(t in _IPT_PORT_WORDS or t == local for t in tokens) or any(
                    j.startswith(PREFIX) and j not in (ALLOW_CHAIN,) for j in jumps):
                return True
            if "--mark" in tokens and tokens[-2:] != ["-j", "RETURN"]:
                return True
        return False


#: Prefix of the iptables group chains (backends/iptables/render.py).
IPT_GROUP_PREFIX = f"{PREFIX}g-"
#: Where a group chain's rules go when they admit a packet (it sets the allow mark).
ALLOW_CHAIN = f"{PREFIX}allow"
#: Options of a group chain's rule that make it port-dependent.
_IPT_PORT_WORDS = frozenset({"-i", "-o", "--physdev-in", "--physdev-out", "--mac-source",
                             "--ctstate", "--state", "--connmark", "--to-destination",
                             "--to-source"})


def _as_named(addresses: set[str], ports: set[int],
            pairs: set[tuple[str, int, int]]) -> NamedValues:
    return NamedValues(tuple(sorted(addresses)), tuple(sorted(ports)), tuple(sorted(pairs)))


def ipt_kernel(saves: dict[str, str], topology: str, local: Iterable[str] = ()
               ) -> tuple[IptKernel, list[str], list[int]]:
    """The kernel verdict of ``iptables-save``/``ip6tables-save``/``ipset save``
    output (:mod:`.iptkernel`): an IPv4 packet through the ``nat`` table's
    PREROUTING first (conntrack-less probes skip it, as the kernel's nat hooks
    do), then the filter table's FORWARD chain — or INPUT when its translated
    destination is one of ``local`` (the metadata server) — routed, with the tap
    as its interface; bridged, as br_netfilter hands it over (the bridge as both
    interfaces, the taps as physdev ports)."""
    addresses, ports = iptkernel.named_values(saves)
    return IptKernel(saves, topology, local), addresses, ports


def _ipt_probe(view: PortView, direction: str, packet: Packet, topology: str
               ) -> iptkernel.IptProbe:
    tap, other = view.port.tap, nftkernel.UPLINK
    inside, outside = (other, tap) if direction == "ingress" else (tap, other)
    if topology == "routed":
        where: dict[str, Any] = {"iif": inside, "oif": outside}
    else:
        where = {"iif": nftkernel.BRIDGE, "oif": nftkernel.BRIDGE,
                 "physdev_in": inside, "physdev_out": outside}
    mac = view.policy.mac if direction == "egress" else nftkernel.OUTSIDE_MAC
    return iptkernel.IptProbe(
        src=packet.src, dst=packet.dst, protocol=packet.protocol, mac=mac,
        sport=packet.sport, dport=packet.dport, icmp_type=packet.icmp_type,
        icmp_code=packet.icmp_code,
        ct_state="invalid" if icmp_invalid(packet) else "new", **where)

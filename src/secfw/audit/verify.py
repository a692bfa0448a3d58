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
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import netaddr

from secfw.audit import iptkernel, nftkernel
from secfw.audit.policy import CloudPolicy, PortView
from secfw.audit.reach import egress_openers, ingress_openers
from secfw.audit.space import ICMP_OF, PORT_PROTOCOL_NUMBERS, PROTO_MAX, SEL_MAX, Region, sweep
from secfw.compiler.evaluate import Packet
from secfw.compiler.ir import Family, MetadataRedirect
from secfw.compiler.metadata import METADATA_ADDRESS, METADATA_PORT, with_metadata
from secfw.constants import ICMP_NEW_TYPES, ICMPV6_NEW_TYPES, ICMPV6_UNTRACKED

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
           only_taps: Collection[str] | None = None,
           ) -> tuple[list[Difference], int]:
    """The differences on ``host`` and the number of probes compared.
    ``extra_addresses``/``extra_ports``: values the kernel's ruleset names;
    ``extra_pairs``: (address, protocol, port) that one of its rules names together
    (:func:`nft_rule_points`, :func:`secfw.audit.iptkernel.rule_points`);
    ``metadata_listen``: the host's metadata server, when it runs one;
    ``only_taps``: verify only these ports of the host (the bench's sample), None: all."""
    on_host = sorted((v for v in cp.ports.values() if v.instance.host == host),
                     key=lambda v: v.port.tap)
    nat = host_nat(on_host, metadata_listen)
    views = [v for v in on_host if only_taps is None or v.port.tap in only_taps]
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
            nat: HostNat) -> Iterable[tuple[Packet, str | None]]:
    """Each probe as the kernel gets it, with the model's verdict on it."""
    local = view.address(family)
    assert local is not None
    floating = nat.floating.get(view.port.tap, ()) if direction == "ingress" else ()
    itself = _own_ranges(view, family)
    for point in points:
        if any(low <= point[0] <= high for low, high in itself):
            continue  # the instance keeps what it sends to itself: no host sees it
        packet = probe_packet(point, local, direction, family)
        model = nat_model_verdict(view, direction, packet, nat.metadata)
        yield packet, model
        for address in floating if family == "ipv4" else ():
            yield probe_packet(point, address, direction, family), model
    if nat.metadata is not None and direction == "egress" and family == "ipv4":
        yield from metadata_probes(view, local, nat.metadata)


def _own_ranges(view: PortView, family: Family) -> list[tuple[int, int]]:
    """The port's own addresses of ``family`` — its fixed address and allowed
    address pairs (what the instance itself holds) — as integer ranges."""
    version = 4 if family == "ipv4" else 6
    local = view.address(family)
    cidrs = [c for c, _ in view.port.address_pairs()] + ([local] if local else [])
    blocks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    return [(int(b[0]), int(b[-1])) for b in blocks if b.version == version]


def metadata_probes(view: PortView, local: str, md: MetadataRedirect
                    ) -> Iterable[tuple[Packet, str | None]]:
    """Egress probes about the metadata redirect (module docstring)."""
    probes = [Packet(local, METADATA_ADDRESS, protocol, CLIENT_PORT, port)
              for protocol, port in ((6, METADATA_PORT), (6, METADATA_PORT - 1),
                                     (6, METADATA_PORT + 1), (17, METADATA_PORT))]
    probes.append(Packet(local, md.address, 6, CLIENT_PORT, md.port))
    for packet in probes:
        yield packet, nat_model_verdict(view, "egress", packet, md)


def nat_model_verdict(view: PortView, direction: str, packet: Packet,
                      md: MetadataRedirect | None) -> str | None:
    """:func:`model_verdict`, with the metadata redirect's exceptions: a served
    port's TCP to ``169.254.169.254:80`` is accepted whatever its egress rules
    say; what a port sends straight to the server's address and port is dropped."""
    if md is not None and direction == "egress" and packet.protocol == 6:
        if (packet.dst, packet.dport) == (METADATA_ADDRESS, METADATA_PORT) and any(
                p.tap == view.port.tap and p.address == packet.src for p in md.ports):
            return "accept"
        if (packet.dst, packet.dport) == (md.address, md.port):
            return "drop"
    return model_verdict(view, direction, packet)


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


def model_verdict(view: PortView, direction: str, packet: Packet) -> str | None:
    """``accept``/``drop`` by the host's IR (None: not compared, see module doc)."""
    family: Family = "ipv4" if packet.version == 4 else "ipv6"
    if packet.protocol == ICMP_OF[family]:
        if family == "ipv6" and packet.icmp_type in ICMPV6_UNTRACKED:
            return None
        new = ICMP_NEW_TYPES if family == "ipv4" else ICMPV6_NEW_TYPES
        if packet.icmp_type not in new and view.policy.port_security:
            return "drop"  # conntrack: invalid, dropped by the filtered port
    judge = view.index.ingress if direction == "ingress" else view.index.egress
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


def nft_kernel(listing: dict[str, Any], topology: str | None = None,
               local: Iterable[str] = ()) -> tuple[KernelVerdict, list[str], list[int]]:
    """The kernel verdict of an nftables JSON listing, and the addresses and ports
    its rules and sets name (extra probes for :func:`verify`). ``local``: the
    host's own addresses that matter (the metadata server's): a packet whose
    translated destination is one of them goes to ``input``."""
    ruleset = nftkernel.NftRuleset(listing)
    shape = topology or nftkernel.topology_of(ruleset)
    own = frozenset(local)

    def judge(view: PortView, direction: str, packet: Packet) -> str:
        mac = view.policy.mac if direction == "egress" else nftkernel.OUTSIDE_MAC
        probe = nftkernel.Probe(
            "", "", packet.src, packet.dst, packet.protocol, mac, packet.sport,
            packet.dport, packet.icmp_type, packet.icmp_code,
            ct_state=nftkernel.CT_STATES["invalid" if icmp_invalid(packet) else "new"])
        tap = view.port.tap
        try:
            verdict, after = ruleset.run(nftkernel.paths_before(shape, tap, direction), probe)
            if verdict == "drop" or not _reaches_port(view, direction, after.dst, own):
                return "drop"
            rest = nftkernel.paths_after(shape, tap, direction, after.dst in own)
            return ruleset.verdict(rest, after)
        except nftkernel.Unsupported as exc:
            return f"unknown: {exc}"

    addresses, ports = _named_values(listing)
    return judge, addresses, ports


def nft_rule_points(listing: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(address, protocol, port) that one rule of an nftables JSON listing names
    together: its addresses (literals, prefixes' first address, the elements of
    the sets it looks up) with its protocol (every port protocol when it names
    none) and its destination ports' edges (extra probes for verify)."""
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


def ipt_kernel(saves: dict[str, str], topology: str, local: Iterable[str] = ()
               ) -> tuple[KernelVerdict, list[str], list[int]]:
    """The kernel verdict of ``iptables-save``/``ip6tables-save``/``ipset save``
    output (:mod:`.iptkernel`): an IPv4 packet through the ``nat`` table's
    PREROUTING first (conntrack-less probes skip it, as the kernel's nat hooks
    do), then the filter table's FORWARD chain — or INPUT when its translated
    destination is one of ``local`` (the metadata server) — routed, with the tap
    as its interface; bridged, as br_netfilter hands it over (the bridge as both
    interfaces, the taps as physdev ports)."""
    tables = iptkernel.chains_of(saves)
    nat = iptkernel.nat_of(saves)
    own = frozenset(local)

    def judge(view: PortView, direction: str, packet: Packet) -> str:
        probe = _ipt_probe(view, direction, packet, topology)
        try:
            if packet.version == 4 and "PREROUTING" in nat.chains \
                    and probe.ct_state not in ("invalid", "untracked"):
                verdict, probe = nat.run("PREROUTING", probe)
                if verdict == "drop":
                    return "drop"
            if not _reaches_port(view, direction, probe.dst, own):
                return "drop"
            if probe.dst in own:
                probe = replace(probe, oif="", physdev_out=None)
                return tables[packet.version].verdict("INPUT", probe)
            return tables[packet.version].verdict("FORWARD", probe)
        except nftkernel.Unsupported as exc:
            return f"unknown: {exc}"

    addresses, ports = iptkernel.named_values(saves)
    return judge, addresses, ports


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

"""``secfw audit reach`` against the kernel: real packets at every region's edges.

A small cloud (``allow_same_net_traffic`` off, so that the groups decide): ``vm``
(group ``web``: tcp 80-81 from 203.0.113.8/29, udp 53 from 198.51.100.0/25,
ICMP echo from 203.0.113.0/24, tcp 22 from group ``ops``) and ``peer`` (group
``ops``: no ingress rule, egress only tcp 20-22 to 10.1.0.0/24). After one agent
pass, ``reach --to vm`` and ``reach --from peer`` are computed, and for every
region its corners (first and last source address × first and last port / ICMP
type-code) and the points just outside it (the neighbouring address, port, ICMP
type-code) are sent as real packets — from the owning instance's namespace when
the source is an instance's address, else spoofed from the external namespace.
A packet must arrive exactly when the point lies in a region (and the oracle
agrees with the regions, so the three readings are one).
"""

from __future__ import annotations

import os

import netaddr
import pytest

from secfw.audit.policy import CloudPolicy, PortView
from secfw.audit.reach import Answer, reach
from secfw.audit.space import SEL_MAX, Box, contains
from secfw.compiler.explain import Flow, decide

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]

PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp"}  # what crafted packets can be


def build(cloud) -> None:
    api = cloud.api
    api.net_create("p", "net-a", "10.1.0.0/24")
    api.secgroup_create("p", "web", "")
    api.secgroup_create("p", "ops", "")
    api.secgroup_add_rule("p", "web", "tcp", "80", "81", "203.0.113.8/29")
    api.secgroup_add_rule("p", "web", "udp", "53", "53", "198.51.100.0/25")
    api.secgroup_add_rule("p", "web", "icmp", "8", "-1", "203.0.113.0/24")
    api.secgroup_add_group_rule("p", "web", "ops", "tcp", "22", "22")
    api.rule_create("p", "ops", "egress", "IPv4", "tcp", dst_port="20:22",
                    remote_ip="10.1.0.0/24")
    cloud.boot("vm", ["web"], "net-a")
    cloud.boot("peer", ["ops"], "net-a")
    cloud.configure(allow_same_net=False)
    cloud.sync()


def edge_points(answer: Answer, owned: list[str]) -> set[tuple[str, int, int]]:
    """(remote address, protocol, selector) at and just beyond each region's edges,
    and with the instances' addresses ``owned`` (holes a region may have)."""
    points = set()
    for region in answer.regions:
        box = region.box
        if box.proto_lo != box.proto_hi or box.proto_lo not in PROTOCOLS:
            continue
        cidrs = list(region.addresses.iter_cidrs())
        addresses = {cidrs[0].first, cidrs[-1].last, cidrs[0].first - 1, cidrs[-1].last + 1}
        addresses |= {int(netaddr.IPAddress(a)) for a in owned}
        selectors = {box.sel_lo, box.sel_hi, box.sel_lo - 1, box.sel_hi + 1}
        for value in addresses:
            for sel in selectors:
                if 0 <= value < 1 << 32 and 0 <= sel <= SEL_MAX:
                    points.add((str(netaddr.IPAddress(value)), box.proto_lo, sel))
    return points


def send(cloud, src: str, dst: str, proto: int, sel: int, names: dict[str, str]) -> bool:
    """One crafted packet src → dst; True when it arrives in dst's namespace."""
    kind = PROTOCOLS[proto]
    port = sel if kind != "icmp" else None
    icmp_type, icmp_code = divmod(sel, 256)
    from_ns = cloud.ns(names[src]) if src in names else cloud.lab.external_ns
    return cloud.arrives(names[dst], kind, port, src_ip=src, from_ns=from_ns,
                         icmp_type=icmp_type, icmp_code=icmp_code)


def check(cloud, cp: CloudPolicy, view: PortView, direction: str) -> int:
    answer = reach(cp, view, direction, "ipv4")
    assert answer is not None and answer.regions
    names = {v.port.ip: v.instance.name for v in cp.ports.values()}
    probes = 0
    for remote, proto, sel in sorted(edge_points(answer, sorted(names))):
        src, dst = (remote, answer.address) if direction == "ingress" else \
            (answer.address, remote)
        if dst not in names or src == dst:
            continue  # nobody there to see it arrive; a packet to itself never leaves
        if proto in (6, 17) and sel == 0:
            continue  # port 0: not a destination a socket layer sends to
        expected = contains(answer.regions, remote, Box(proto, proto, sel, sel))
        flow = Flow(src, dst, proto, sel if proto != 1 else None,
                    *(divmod(sel, 256) if proto == 1 else (None, None)))
        assert decide(cp.state, flow, cp.allow_same_net).allowed == expected, flow
        assert send(cloud, src, dst, proto, sel, names) == expected, (direction, src, dst,
                                                                     proto, sel)
        probes += 1
    return probes


def test_reach_regions_are_what_the_kernel_lets_through(cloud) -> None:
    build(cloud)
    cp = CloudPolicy(cloud.api.snapshot(), allow_same_net=False)
    vm = next(v for v in cp.ports.values() if v.instance.name == "vm")
    peer = next(v for v in cp.ports.values() if v.instance.name == "peer")
    assert check(cloud, cp, vm, "ingress") >= 30
    assert check(cloud, cp, peer, "egress") >= 4

"""Differential test: the kernel's verdict on real packets ≡ the semantic oracle.

Hypothesis generates small random clouds — 2–4 security groups with 1–4 random
rules each: ingress and egress, IPv4 and IPv6, tcp/udp/icmp (ICMPv6 for IPv6) or
any protocol, port ranges with edge values, ICMP types with and without a code,
remotes from a CIDR pool (0.0.0.0/0, ::/0, the lab's external ranges and their
neighbours) or a source group — and 3–4 instances on 1–2 dual-stack networks of
one host with random group subsets, some with port security off, some with an
allowed address pair, and a random ``allow_same_net_traffic``. An instance whose
groups hold an egress rule has its egress limited to them; the others' is open.

For each cloud the lab is synced, ONE agent pass runs in the lab's host
namespace, and a sample of flows is sent for real: towards instances (their
ingress) and from instances to the external namespace and to each other (their
egress), both families, aimed at the rules' edges (port range ends ±1, ICMP
type/code neighbours, sources on both sides of CIDRs, an instance's address-pair
address as source, a spoofed in-subnet source from the uplink) plus ICMP that no
rule decides (neighbour discovery, MLD, types that cannot open a connection).
The sample takes one flow of every kind there is — family × source kind ×
destination kind × verdict — then random ones.
:func:`secfw.compiler.explain.decide` — written from the semantics, not from the
compiler — must agree with every measured result, and so must ``secfw audit
explain -f json`` (the audit's own evaluator, run through the command line).

The audits are held to the same packets: the ``reach`` answer of one port (a
direction and family drawn) is checked against the oracle at every region's
corners, a point inside and the points just outside each boundary, and a
stratified sample of those points is sent (:data:`REACH_PROBES`); ``secfw audit
impact -- <a random rule added or deleted>`` must predict exactly which of a
sample of flows (:data:`IMPACT_FLOWS`) change verdict once the agent's
incremental pass has applied the change; then ``secfw audit verify`` of the
host (every other cloud: it evaluates thousands of probes) finds no difference.

The lab (host and external namespaces) is shared by all examples of a backend ×
topology: each example's ``lab.up`` swaps the instance namespaces, and its agent
starts from the previous example's table, so every example also exercises a
full-sync transition between two unrelated rulesets.

Run time is bounded: hypothesis is derandomized with a fixed number of examples
and no shrinking, and every probe waits at most :data:`PROBE_TIMEOUT`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import netaddr
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from secfw.agent import Reconciler
from secfw.api import Api
from secfw.audit.policy import CloudPolicy, PortView
from secfw.audit.reach import Answer, reach
from secfw.audit.space import ICMP_OF, Box, Region, contains
from secfw.backends import BACKENDS, TOPOLOGIES, get_backend
from secfw.cli.main import main
from secfw.cloud import CloudState
from secfw.compiler.explain import Decision, Flow, decide
from secfw.compiler.ir import Family
from secfw.config import Config
from secfw.errors import ConflictError
from secfw.lab import netns_tools
from secfw.lab.demo import lab_ports
from secfw.lab.hostlab import Lab, netns_exists
from secfw.model import Rule
from secfw.store import open_store

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]

PROJECT = "p"
HOST = "diffhost"
NETWORKS = (("n0", "10.1.0.0/24", "2001:db8:1::/64"), ("n1", "10.2.0.0/24", "2001:db8:2::/64"))
EXT_REAL, EXT_OTHER = Lab.external_addresses  # 203.0.113.10 (routed source), 198.51.100.10
EXT6_REAL = Lab.external_address6  # 2001:db8:ffff::10
EXT6_OTHER = "2001:db8:ffff::11"  # added, deprecated: never chosen as a source by itself
CIDR_POOL = {
    4: (
        "0.0.0.0/0",
        "203.0.113.0/24",
        "203.0.113.8/29",  # contains .10
        "203.0.113.0/29",  # does not
        "203.0.113.10/32",
        "198.51.100.0/24",
        "198.51.100.0/25",  # contains .10
        "198.51.100.128/25",  # does not
        "10.0.0.0/8",
        "10.1.0.0/24",
        "10.2.0.0/24",
        "10.1.0.2/32",
        "10.9.0.0/16",  # the address pairs below
        "192.0.2.0/24",  # matches nothing at all
    ),
    6: (
        "::/0",
        "2001:db8:ffff::/64",
        "2001:db8:ffff::10/127",  # contains ::10 and ::11
        "2001:db8:ffff::10/128",
        "2001:db8:ffff::11/128",
        "2001:db8:ffff::/124",  # contains neither
        "2001:db8:1::/64",
        "2001:db8:2::/64",
        "2001:db8::/32",
        "2001:db8:9::/48",  # the address pairs below
        "2001:db8:dead::/64",  # matches nothing at all
    ),
}
#: Allowed address pairs, outside both networks (so that same-net never applies
#: to them, whatever "same network" means); a probe sends from the pair's first
#: host address. Each instance with pairs gets one of each family, none shared.
PAIRS = (("10.9.0.5", "2001:db8:9::5"), ("10.9.1.0/29", "2001:db8:9:1::/125"),
         ("10.9.2.7", "2001:db8:9:2::7"), ("10.9.3.0/30", "2001:db8:9:3::/126"))
PORT_EDGES = (1, 2, 21, 22, 23, 53, 79, 80, 81, 443, 1000, 1010, 65534, 65535)
ICMP_TYPES = {4: (None, 0, 3, 8, 13), 6: (None, 1, 128, 129, 130, 131, 135)}
ICMP_CODES = (None, 0, 1)
#: What every pair of endpoints is probed with besides the rules' edges: a service
#: each, ICMP that no rule can open (invalid: an echo reply, an unreachable), and
#: for IPv6 the untracked neighbour discovery and MLD messages (docs/protection.md).
#: A neighbour advertisement always names the sender's own address as its target:
#: ``Flow`` has no target, and ip6tables cannot match one (docs/iptables.md, a
#: documented gap), so a foreign target is test_protection's business.
BASE_SERVICES = {
    4: (("tcp", 22, None, None), ("udp", 53, None, None), ("icmp", None, 8, 0),
        ("icmp", None, 0, 0), ("icmp", None, 13, 0)),
    6: (("tcp", 22, None, None), ("udp", 53, None, None), ("icmp", None, 128, 0),
        ("icmp", None, 129, 0), ("icmp", None, 1, 4), ("icmp", None, 130, 0),
        ("icmp", None, 131, 0), ("icmp", None, 133, 0), ("icmp", None, 134, 0),
        ("icmp", None, 135, 0), ("icmp", None, 136, 0), ("icmp", None, 143, 0)),
}
PROBE_TIMEOUT = 0.3
FLOWS_PER_EXAMPLE = 24
PROTO_NUMBER = {("tcp", 4): 6, ("udp", 4): 17, ("icmp", 4): 1,
                ("tcp", 6): 6, ("udp", 6): 17, ("icmp", 6): 58}


# --------------------------------------------------------------------------- the clouds


@dataclass(frozen=True)
class RuleSpec:
    """One openstack-form rule; ``protocol`` None: any protocol; ``low``/``high``:
    a port range, or an ICMP type/code (None: any)."""

    direction: str
    family: int
    protocol: str | None
    low: int | None
    high: int | None
    cidr: str | None
    source: int | None  # index of the remote group

    def __str__(self) -> str:
        what = "any" if self.protocol is None else f"{self.protocol} {self.low} {self.high}"
        remote = self.cidr if self.source is None else f"group g{self.source}"
        way = "from" if self.direction == "ingress" else "to"
        return f"{self.direction} IPv{self.family} {what} {way} {remote}"


@dataclass(frozen=True)
class InstanceSpec:
    network: int
    groups: tuple[int, ...]
    port_security: bool = True
    pairs: int | None = None  # index into PAIRS


@dataclass(frozen=True)
class CloudSpec:
    groups: tuple[tuple[RuleSpec, ...], ...]  # rules of g0, g1, …
    instances: tuple[InstanceSpec, ...]
    allow_same_net: bool

    def __str__(self) -> str:
        lines = [f"allow_same_net_traffic={self.allow_same_net}"]
        for i, rules in enumerate(self.groups):
            lines.append(f"  group g{i}: " + "; ".join(str(r) for r in rules))
        for i, vm in enumerate(self.instances):
            names = ", ".join(f"g{g}" for g in vm.groups) or "default"
            extra = ("" if vm.port_security else ", port security off") + (
                "" if vm.pairs is None else f", pairs {PAIRS[vm.pairs]}")
            lines.append(f"  vm{i} on {NETWORKS[vm.network][0]} groups {names}{extra}")
        return "\n".join(lines)


@st.composite
def rule_specs(draw: st.DrawFn, n_groups: int) -> RuleSpec:
    direction = draw(st.sampled_from(("ingress", "ingress", "egress")))
    family = draw(st.sampled_from((4, 6)))
    source = draw(st.none() | st.none() | st.none() | st.integers(0, n_groups - 1))
    protocol = draw(st.sampled_from(("tcp", "udp", "icmp", "tcp", "udp", "icmp", None)))
    cidr = None if source is not None else draw(st.sampled_from(CIDR_POOL[family]))
    low = high = None
    if protocol in ("tcp", "udp"):
        low = draw(st.sampled_from(PORT_EDGES) | st.integers(1, 65535))
        high = draw(
            st.just(low)
            | st.sampled_from([p for p in PORT_EDGES if p >= low] or [low])
            | st.integers(low, min(low + 20, 65535))
        )
    elif protocol == "icmp":
        low = draw(st.sampled_from(ICMP_TYPES[family]))
        high = None if low is None else draw(st.sampled_from(ICMP_CODES))
    return RuleSpec(direction, family, protocol, low, high, cidr, source)


@st.composite
def instance_specs(draw: st.DrawFn, n_groups: int, n_nets: int) -> InstanceSpec:
    network = draw(st.integers(0, n_nets - 1))
    groups = tuple(draw(st.lists(st.integers(0, n_groups - 1), unique=True, max_size=3)))
    port_security = draw(st.sampled_from((True, True, True, True, True, False)))
    pairs = draw(st.none() | st.none() | st.integers(0, len(PAIRS) - 1))
    return InstanceSpec(network, groups, port_security, pairs if port_security else None)


@st.composite
def cloud_specs(draw: st.DrawFn) -> CloudSpec:
    n_groups = draw(st.integers(2, 4))
    groups = tuple(
        tuple(draw(st.lists(rule_specs(n_groups), min_size=1, max_size=4)))
        for _ in range(n_groups)
    )
    n_nets = draw(st.integers(1, 2))
    instances: list[InstanceSpec] = []
    for vm in draw(st.lists(instance_specs(n_groups, n_nets), min_size=3, max_size=4)):
        if vm.pairs in {i.pairs for i in instances if i.pairs is not None}:
            vm = InstanceSpec(vm.network, vm.groups, vm.port_security)  # no shared pairs
        instances.append(vm)
    return CloudSpec(groups, tuple(instances), draw(st.booleans()))


def build(api: Api, spec: CloudSpec) -> None:
    """Store the cloud of ``spec`` (rules that duplicate another one are skipped)."""
    with api.batch():
        api.image_create("admin", "cirros", "qcow2", "public")
        for name, cidr, cidr6 in NETWORKS:
            api.net_create(PROJECT, name, cidr, cidr6=cidr6)
        for i in range(len(spec.groups)):
            api.secgroup_create(PROJECT, f"g{i}", "random")
        for i, rules in enumerate(spec.groups):
            for rule in rules:
                add_rule(api, f"g{i}", rule)
        for i, vm in enumerate(spec.instances):
            instance = api.boot(PROJECT, f"vm{i}", "m1.tiny", "cirros", HOST,
                                [f"g{g}" for g in vm.groups] or None,
                                [NETWORKS[vm.network][0]])
            (port,) = api.snapshot().ports_of(instance.id)
            if not vm.port_security:
                api.port_update(PROJECT, port.id, port_security=False)
            elif vm.pairs is not None:
                api.port_update(PROJECT, port.id, allowed_address_pairs=list(PAIRS[vm.pairs]))


def add_rule(api: Api, group: str, rule: RuleSpec) -> None:
    """``security group rule create`` for ``rule``; a duplicate is skipped."""
    ports = icmp_type = icmp_code = None
    if rule.protocol in ("tcp", "udp"):
        ports = f"{rule.low}:{rule.high}"
    elif rule.protocol == "icmp":
        icmp_type, icmp_code = rule.low, rule.high
    with contextlib.suppress(ConflictError):  # e.g. the same range drawn twice
        api.rule_create(PROJECT, group, rule.direction, f"IPv{rule.family}", rule.protocol,
                        ports, icmp_type, icmp_code, rule.cidr,
                        None if rule.source is None else f"g{rule.source}")


# --------------------------------------------------------------------------- the flows


@dataclass(frozen=True)
class Endpoint:
    name: str
    ns: str
    ip: str
    real: bool  # True: its own sockets (tcp_connect/udp_probe/ping); False: crafted
    kind: str  # "instance", "pair" (an instance sending from its pair), "external",
    # or "spoofed" (the external namespace sending from an address of a subnet)

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.ip).version


Service = tuple[str, int | None, int | None, int | None]  # proto, port, icmp type, code


@dataclass(frozen=True)
class Sample:
    src: Endpoint
    dst: Endpoint
    proto: str
    port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None

    def flow(self) -> Flow:
        return Flow(self.src.ip, self.dst.ip, PROTO_NUMBER[self.proto, self.src.family],
                    self.port, self.icmp_type, self.icmp_code)

    @property
    def kind(self) -> tuple[int, str, str]:
        """What the sample covers: family, source kind, destination kind."""
        return self.src.family, self.src.kind, self.dst.kind

    def __str__(self) -> str:
        what = (f"{self.proto}/{self.port}" if self.port is not None
                else f"icmp type {self.icmp_type} code {self.icmp_code}")
        return f"{self.src.name} ({self.src.ip}) -> {self.dst.name} ({self.dst.ip}) {what}"


def endpoints_of(lab: Lab, state: CloudState) -> list[Endpoint]:
    """The external namespace's four sources, a spoofed source in each subnet that
    no port holds (sent from the uplink: same-net must not trust it), and every
    instance port's addresses (IPv4, IPv6, and the first host of each allowed
    address pair)."""
    found = [
        Endpoint("external", lab.external_ns, EXT_REAL, True, "external"),
        Endpoint("external-2", lab.external_ns, EXT_OTHER, False, "external"),
        Endpoint("external6", lab.external_ns, EXT6_REAL, True, "external"),
        Endpoint("external6-2", lab.external_ns, EXT6_OTHER, False, "external"),
    ]
    for cidr in (c for _, *cidrs in NETWORKS for c in cidrs):  # spoofed: in no port's hands
        found.append(Endpoint("spoofed", lab.external_ns, str(ipaddress.ip_network(cidr)[250]),
                              False, "spoofed"))
    for port in sorted(state.ports.values(), key=lambda p: p.tap):
        name = state.instances[port.instance_id].name
        ns = lab.instance_ns(port.tap)
        for ip in (port.ip, port.ip6):
            if ip is not None:
                found.append(Endpoint(name, ns, ip, True, "instance"))
        for cidr, _ in port.address_pairs():
            pair = ipaddress.ip_network(cidr)
            first = pair[1] if pair.num_addresses > 1 else pair[0]
            found.append(Endpoint(f"{name}-pair", ns, str(first), False, "pair"))
    return found


def rule_services(state: CloudState, instance_name: str, family: int,
                  direction: str) -> set[Service]:
    """Flows at the edges of the ``direction`` rules of ``instance_name``'s groups."""
    services: set[Service] = set()
    instance = next(i for i in state.instances.values() if i.name == instance_name)
    for group_id in instance.security_groups:
        for rule in state.rules_by_group.get(group_id, {}).values():
            if rule.direction == direction and rule.ethertype == f"IPv{family}":
                services |= edges(rule.protocol, rule.port_min, rule.port_max, family)
    return services


def edges(protocol: str | None, low: int | None, high: int | None,
          family: int) -> set[Service]:
    """A rule's edges: port range ends ±1, its ICMP type/code and neighbours."""
    if protocol in ("tcp", "udp") and low is not None:
        top = high if high is not None else low
        return {(protocol, p, None, None) for p in (low - 1, low, top, top + 1)
                if 1 <= p <= 65535}
    if protocol in ("icmp", "icmpv6"):
        echo = 8 if family == 4 else 128
        kind = echo if low is None else low
        code = 0 if high is None else high
        return {("icmp", None, t, c) for t, c in ((kind, code), (kind, code + 1), (echo, 1))
                if 0 <= t <= 255 and 0 <= c <= 255}
    return set()


def candidate_samples(state: CloudState, endpoints: list[Endpoint]) -> list[Sample]:
    """Every flow between two endpoints of a family that involves an instance, with
    the base services and the edges of the source's egress and the destination's
    ingress rules. (The pairs lie outside both subnets: same-net never admits them,
    whether "the same network" means the subnet or its ports' addresses in it.)"""
    samples = []
    for src in endpoints:
        for dst in endpoints:
            involved = {src.kind, dst.kind} & {"instance", "pair"}
            if (src.family != dst.family or dst.kind in ("pair", "spoofed") or src.ns == dst.ns
                    or not involved):
                continue
            services: set[Service] = set(BASE_SERVICES[src.family])
            if src.kind in ("instance", "pair"):
                services |= rule_services(state, src.name.removesuffix("-pair"),
                                          src.family, "egress")
            if dst.kind == "instance":
                services |= rule_services(state, dst.name, dst.family, "ingress")
            samples += [Sample(src, dst, *service) for service in services]
    return sorted(samples, key=str)


def choose(data: st.DataObject, verdicts: dict[Sample, Decision]) -> list[Sample]:
    """One sample of every (kind, verdict) there is, then random others, up to
    :data:`FLOWS_PER_EXAMPLE` — drawn by hypothesis."""
    strata: dict[tuple[tuple[int, str, str], bool], list[Sample]] = {}
    for sample, verdict in verdicts.items():
        strata.setdefault((sample.kind, verdict.allowed), []).append(sample)
    chosen = [data.draw(st.sampled_from(strata[key]), label=f"{key}")
              for key in sorted(strata)][:FLOWS_PER_EXAMPLE]
    rest = [s for s in verdicts if s not in chosen]
    count = min(len(rest), FLOWS_PER_EXAMPLE - len(chosen))
    if count > 0:
        chosen += data.draw(st.lists(st.sampled_from(rest), min_size=count, max_size=count,
                                     unique=True), label="more flows")
    return chosen


# --------------------------------------------------------------------------- probes


def measure(sample: Sample) -> bool:
    """Send ``sample`` for real; True when the first packet got to the destination."""
    src, dst = sample.src, sample.dst
    if src.real and sample.proto == "tcp":
        assert sample.port is not None
        with netns_tools.listen(dst.ns, "tcp", sample.port):
            return netns_tools.tcp_connect(src.ns, dst.ip, sample.port, PROBE_TIMEOUT)
    if src.real and sample.proto == "udp":
        assert sample.port is not None
        with netns_tools.listen(dst.ns, "udp", sample.port):
            return netns_tools.udp_probe(src.ns, dst.ns, dst.ip, sample.port, PROBE_TIMEOUT)
    if src.real and (sample.icmp_type, sample.icmp_code) in ((8, 0), (128, 0)):
        return netns_tools.ping(src.ns, dst.ip, 1, PROBE_TIMEOUT)
    return crafted(sample)


def crafted(sample: Sample) -> bool:
    """One scapy packet, sent from ``sample.src``'s namespace with its address
    through a raw socket (the kernel routes it, the header stays as built), is
    seen arriving on the destination's eth0."""
    from scapy.packet import Raw

    token = b"secfw-diff-" + uuid.uuid4().hex.encode()
    packet = l3(sample) / l4(sample) / Raw(token)
    family = socket.AF_INET6 if sample.src.family == 6 else socket.AF_INET
    with (capture(sample.dst.ns) as sock,
          netns_tools.socket_in_netns(sample.src.ns, family, socket.SOCK_RAW,
                                      socket.IPPROTO_RAW) as sender):
        with contextlib.suppress(OSError):  # refused on output: it did not arrive
            sender.sendto(bytes(packet), (sample.dst.ip, 0))
        return arrived(sock, token)


def l3(sample: Sample) -> Any:
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    if sample.src.family == 6:
        return IPv6(src=sample.src.ip, dst=sample.dst.ip)
    return IP(src=sample.src.ip, dst=sample.dst.ip)


def l4(sample: Sample) -> Any:
    """The transport header: a SYN, a datagram, or an ICMP(v6) message with an
    identifier for the echo-like types (conntrack keys them on it)."""
    from scapy.layers.inet import ICMP, TCP, UDP
    from scapy.layers.inet6 import (
        ICMPv6EchoReply,
        ICMPv6EchoRequest,
        ICMPv6ND_NA,
        ICMPv6Unknown,
    )

    sport = 20000 + uuid.uuid4().int % 40000
    ident = 1 + uuid.uuid4().int % 0xFFFF
    if sample.proto == "tcp":
        return TCP(sport=sport, dport=sample.port, flags="S", seq=uuid.uuid4().int % (1 << 32))
    if sample.proto == "udp":
        return UDP(sport=sport, dport=sample.port)
    if sample.src.family == 4:
        icmp = ICMP(type=sample.icmp_type, code=sample.icmp_code)
        if sample.icmp_type in (0, 8, 13, 14, 15, 16, 17, 18):
            icmp.id = ident
        return icmp
    if sample.icmp_type == 136:  # for its own address (see BASE_SERVICES)
        return ICMPv6ND_NA(code=sample.icmp_code, tgt=sample.src.ip, R=0, S=0, O=0)
    echo = {128: ICMPv6EchoRequest, 129: ICMPv6EchoReply}.get(sample.icmp_type or 0)
    if echo is not None:
        return echo(code=sample.icmp_code, id=ident)
    return ICMPv6Unknown(type=sample.icmp_type, code=sample.icmp_code, msgbody=bytes(4))


@contextlib.contextmanager
def capture(ns: str) -> Iterator[socket.socket]:
    """A packet socket on eth0 of ``ns``, emptied of what arrived before."""
    sock = netns_tools.socket_in_netns(ns, socket.AF_PACKET, socket.SOCK_RAW,
                                       socket.htons(netns_tools.ETH_P_ALL))
    try:
        sock.bind(("eth0", netns_tools.ETH_P_ALL))
        while select.select([sock], [], [], 0)[0]:
            sock.recv(65535)
        yield sock
    finally:
        sock.close()


def arrived(sock: socket.socket, token: bytes) -> bool:
    """Whether a frame carrying ``token`` comes in within :data:`PROBE_TIMEOUT`
    (frames the namespace sends itself, an ICMP error quoting it, do not count)."""
    deadline = time.monotonic() + PROBE_TIMEOUT
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], remaining)[0]:
            return False
        data, address = sock.recvfrom(65535)
        if address[2] != netns_tools.PACKET_OUTGOING and token in data:
            return True
    return False


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, f"{' '.join(command)}: {done.stderr}"


# --------------------------------------------------------------------------- the test


#: Every backend × topology, as the ``cloud`` fixture of conftest runs them.
COMBINATIONS = [(backend, topology) for topology in TOPOLOGIES for backend in BACKENDS]


@pytest.fixture(scope="module", params=COMBINATIONS, ids=["-".join(c) for c in COMBINATIONS])
def shared_lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Lab, Path, str]]:
    """One lab per backend × topology for every example (a unique host namespace),
    always brought down; and the backend's name."""
    backend, topology = request.param
    work = tmp_path_factory.mktemp("differential")
    lab = Lab(f"{HOST}-{uuid.uuid4().hex[:8]}", work / "lab", topology=topology)
    try:
        yield lab, work, backend
    finally:
        lab.down()


@dataclass
class Deployed:
    """A cloud applied to the shared lab by one agent pass; its store (``url``),
    the agent's ``reconciler`` (for a change after the first pass) and the
    ``config`` file the audit commands read (``allow_same_net_traffic``)."""

    state: CloudState
    endpoints: list[Endpoint]
    allow_same_net: bool
    lab: Lab
    backend: str
    api: Api
    reconciler: Reconciler
    url: str
    config: Path
    #: The kernel's verdict on every sample sent so far (before any change).
    measured: dict[Sample, bool] = field(default_factory=dict)

    def endpoint(self, name: str, family: int = 4) -> Endpoint:
        return next(e for e in self.endpoints if e.name == name and e.family == family)

    def mismatches(self, samples: list[Sample]) -> list[str]:
        """Each sample sent for real; a line per sample where the kernel, the
        oracle and ``secfw audit explain`` do not all agree."""
        found = []
        for sample in samples:
            expected = decide(self.state, sample.flow(), self.allow_same_net)
            audit = audit_explain(self, sample)
            got = self.measured[sample] = measure(sample)
            if got != expected.allowed or audit["verdict"] != verdict_word(got):
                found.append(f"  {sample}: kernel {'passed' if got else 'dropped'}, oracle "
                             f"{'allows' if expected.allowed else 'denies'} ({expected.reason})"
                             f", audit explain {audit['verdict']} "
                             f"({'; '.join(audit['reasons'])})")
        return found


def verdict_word(allowed: bool) -> str:
    return "allow" if allowed else "deny"


def audit_cli(cloud: Deployed, *args: str, status: int = 0) -> Any:
    """``secfw --store URL --project p ARGS… -f json`` run in this process by
    click's runner (the command line's own code path), its parsed JSON; the exit
    status must be ``status``."""
    result = CliRunner().invoke(main, ["--store", cloud.url, "--project", PROJECT, *args,
                                       "-f", "json"], env=AUDIT_ENV)
    assert result.exit_code == status, (args, result.output, result.exception)
    return json.loads(result.stdout)


#: What the audit commands must not pick up from the environment.
AUDIT_ENV: dict[str, str | None] = {"SECFW_CONFIG": None, "SECFW_PROJECT": None,
                                    "SECFW_STORE": None}


def audit_explain(cloud: Deployed, sample: Sample) -> Any:
    """``secfw audit explain -f json`` on ``sample``'s flow."""
    args = ["audit", "explain", "--config", str(cloud.config), "--from", sample.src.ip,
            "--to", sample.dst.ip, "--protocol", sample.proto,
            "--ethertype", f"IPv{sample.src.family}"]
    if sample.port is not None:
        args += ["--port", str(sample.port)]
    if sample.icmp_type is not None:
        args += ["--icmp-type", str(sample.icmp_type), "--icmp-code", str(sample.icmp_code or 0)]
    return audit_cli(cloud, *args)


@contextlib.contextmanager
def deployed(shared_lab: tuple[Lab, Path, str], spec: CloudSpec) -> Iterator[Deployed]:
    """``spec`` stored, the lab brought in line, ONE full agent pass of the backend."""
    lab, work, backend = shared_lab
    url = f"sqlite:///{work}/{uuid.uuid4().hex}.db"
    config = work / f"{uuid.uuid4().hex}.conf"
    config.write_text(f"[DEFAULT]\nallow_same_net_traffic = {str(spec.allow_same_net).lower()}\n")
    api = Api(open_store(url))
    agent_store = open_store(url)
    try:
        build(api, spec)
        state = api.snapshot()
        # The compiler keys everything on the host it is given: the lab's host name.
        lab.up(lab_ports(state, HOST))
        # A second external IPv6 source, deprecated so that the kernel never picks it
        # for the real probes (RFC 6724 rule 3); only crafted packets use it.
        run(["ip", "-n", lab.external_ns, "-6", "addr", "replace", f"{EXT6_OTHER}/64",
             "dev", "eth0", "nodad", "preferred_lft", "0"])
        # Examples reuse addresses (every store allocates from .2) while the host
        # namespace, and its conntrack table, lives on: an entry a previous example's
        # probe left would let a packet in as "established". Each example starts clean.
        run(["ip", "netns", "exec", lab.host_ns, "conntrack", "-F"])
        reconciler = Reconciler(agent_store, HOST, Config(spec.allow_same_net),
                                get_backend(backend, netns=lab.host_ns, topology=lab.topology))
        assert reconciler.reconcile().full
        assert reconciler.reconcile().commands == 0
        yield Deployed(state, endpoints_of(lab, state), spec.allow_same_net, lab, backend, api,
                       reconciler, url, config)
    finally:
        api.store.close()
        agent_store.close()


# --------------------------------------------------------------------------- audit: reach


#: Real packets per example at the edges of one port's ``reach`` regions.
REACH_PROBES = 6
#: The direction and family of an example's ``reach`` (ingress, where any source
#: address can be sent, twice as often).
REACH_KINDS: tuple[tuple[str, Family], ...] = (
    ("ingress", "ipv4"), ("ingress", "ipv6"), ("egress", "ipv4"), ("egress", "ipv6"),
    ("ingress", "ipv4"), ("ingress", "ipv6"))
#: Protocols a crafted packet can be, per family (see :func:`l4`).
CRAFTED = {"ipv4": {6: "tcp", 17: "udp", 1: "icmp"}, "ipv6": {6: "tcp", 17: "udp", 58: "icmp"}}
#: Sources no packet can have on the wire here (the kernel drops them as martians,
#: or they are not unicast): never a probe's remote address.
UNSENDABLE = netaddr.IPSet(["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3",
                            "::/127", "::ffff:0:0/96", "fe80::/10", "ff00::/8",
                            # the subnet-router anycast addresses of the lab's networks
                            "2001:db8:1::/128", "2001:db8:2::/128", "2001:db8:ffff::/128"])


def local_addresses(*namespaces: str) -> netaddr.IPSet:
    """Every address configured in ``namespaces`` (the host's and the router's own:
    a packet from one of them is a martian on arrival there)."""
    found = netaddr.IPSet()
    for ns in namespaces:
        done = subprocess.run(["ip", "-n", ns, "-j", "addr", "show"], capture_output=True,
                              text=True, timeout=30, check=True)
        for link in json.loads(done.stdout):
            for info in link.get("addr_info", []):
                found.add(info["local"])
    return found


@dataclass(frozen=True)
class ReachPoint:
    """One point of the flow space of a port (``answer``) and how it is sent."""

    sample: Sample
    inside: bool  # what the reach answer says
    where: str  # "corner", "inside" or "outside" (of the region it was taken from)


def reach_candidates(cloud: Deployed, cp: CloudPolicy, answer: Answer) -> list[ReachPoint]:
    """For each region of ``answer``: its corners (first and last address × first
    and last selector), one point inside, and the points just outside each
    boundary (the neighbouring address before and after, the selector before and
    after), with the protocols a crafted packet can be; each point is in the
    answer or not as :func:`contains` says. Ingress sources are sent from the
    namespace of the port that owns them, else from the uplink; egress
    destinations are only the addresses something listens on (instances, the
    external namespace), nearest to the region's edges."""
    banned = UNSENDABLE | local_addresses(cloud.lab.host_ns, *router_ns(cloud.lab))
    me = replace(next(e for e in cloud.endpoints if e.ip == answer.address), real=False)
    points: list[ReachPoint] = []
    for region in answer.regions:
        for proto, name in CRAFTED[answer.family].items():
            box = region.box.intersect(Box(proto, proto))
            if box is None:
                continue
            sel_in, sel_out = selectors(proto, box)
            for where, address, sel in region_points(cloud, region, answer.direction, banned,
                                                     sel_in, sel_out):
                remote = remote_endpoint(cloud, cp, address, answer.direction)
                if remote is None or remote.ns == me.ns:
                    continue
                src, dst = (remote, me) if answer.direction == "ingress" else (me, remote)
                port, icmp = (sel, (None, None)) if name != "icmp" else (None, divmod(sel, 256))
                sample = Sample(src, dst, name, port, *icmp)
                inside = contains(answer.regions, address, Box(proto, proto, sel, sel))
                points.append(ReachPoint(sample, inside, where))
    return sorted(set(points), key=lambda p: (str(p.sample), p.where))


def router_ns(lab: Lab) -> list[str]:
    return [lab.router_ns] if lab.topology == "bridged" and netns_exists(lab.router_ns) else []


def selectors(proto: int, box: Box) -> tuple[list[int], list[int]]:
    """A box's first, middle and last selector, and the ones just outside it (a
    port protocol's port 0 left out: no probe is sent to it)."""
    low = 1 if proto in (6, 17) else 0
    inside = [s for s in (box.sel_lo, (box.sel_lo + box.sel_hi) // 2, box.sel_hi) if s >= low]
    outside = [s for s in (box.sel_lo - 1, box.sel_hi + 1) if low <= s <= 65535]
    return inside, outside


def region_points(cloud: Deployed, region: Region, direction: str, banned: netaddr.IPSet,
                  sel_in: list[int], sel_out: list[int]) -> list[tuple[str, str, int]]:
    """(where, address, selector) of one region: see :func:`reach_candidates`."""
    if not sel_in:
        return []
    version = 4 if region.family == "ipv4" else 6
    inside, outside = (edge_addresses(region.addresses, banned) if direction == "ingress"
                       else receiver_addresses(cloud, region.addresses, version))
    found = []
    for i, address in enumerate(inside[:2]):
        found += [("corner", address, sel_in[0]), ("corner", address, sel_in[-1])]
        found += [("outside", address, sel) for sel in sel_out[i:i + 1]]
    if inside:
        found.append(("inside", inside[len(inside) // 2], sel_in[len(sel_in) // 2]))
    found += [("outside", address, sel_in[i % len(sel_in)]) for i, address in enumerate(outside)]
    return found


def edge_addresses(addresses: netaddr.IPSet, banned: netaddr.IPSet) -> tuple[list[str], list[str]]:
    """The sendable addresses of ``addresses`` nearest to its first and last one
    (and one in between), and those nearest outside it, below and above."""
    cidrs = list(addresses.iter_cidrs())
    first, last = cidrs[0], cidrs[-1]
    middle = cidrs[len(cidrs) // 2]
    version = first.version
    inside = [nearest(first.first, +1, addresses, banned, True, version),
              nearest(last.last, -1, addresses, banned, True, version),
              nearest((middle.first + middle.last) // 2, +1, addresses, banned, True, version)]
    outside = [nearest(first.first - 1, -1, addresses, banned, False, version),
               nearest(last.last + 1, +1, addresses, banned, False, version)]
    return ([str(netaddr.IPAddress(a, version)) for a in dict.fromkeys(inside) if a is not None],
            [str(netaddr.IPAddress(a, version)) for a in outside if a is not None])


def nearest(start: int, step: int, addresses: netaddr.IPSet, banned: netaddr.IPSet,
            member: bool, version: int, tries: int = 64) -> int | None:
    """The first sendable address of IP ``version`` from ``start`` in direction
    ``step`` that is (``member``) or is not in ``addresses`` — within ``tries``
    steps (a banned range is stepped over by its CIDR), else None."""
    value = start
    for _ in range(tries):
        if not 0 <= value < 1 << (32 if version == 4 else 128):
            return None
        address = netaddr.IPAddress(value, version)
        if (address in addresses) != member:
            return None
        if address not in banned:
            return value
        cidr = next(c for c in banned.iter_cidrs() if address in c)
        value = cidr.last + 1 if step > 0 else cidr.first - 1
    return None


def receiver_addresses(cloud: Deployed, addresses: netaddr.IPSet,
                       version: int) -> tuple[list[str], list[str]]:
    """The addresses something listens on (instances, the external namespace) in
    ``addresses`` (the first and last, and one between) and outside it (the
    nearest below and above its first and last)."""
    listening = sorted({int(netaddr.IPAddress(e.ip)) for e in cloud.endpoints
                        if e.kind in ("instance", "external") and e.family == version})
    inside = [a for a in listening if netaddr.IPAddress(a, version) in addresses]
    outside = [a for a in listening if netaddr.IPAddress(a, version) not in addresses]
    if inside:
        inside = list(dict.fromkeys([inside[0], inside[-1], inside[len(inside) // 2]]))
        below = [a for a in outside if a < inside[0]][-1:]
        above = [a for a in outside if a > inside[-1]][:1]
        outside = below + above
    else:
        outside = outside[:1] + outside[-1:]
    return ([str(netaddr.IPAddress(a, version)) for a in inside],
            [str(netaddr.IPAddress(a, version)) for a in dict.fromkeys(outside)])


def remote_endpoint(cloud: Deployed, cp: CloudPolicy, address: str,
                    direction: str) -> Endpoint | None:
    """Who sends from ``address`` (ingress: the port that owns it — anti-spoofing
    lets it — else the uplink) or listens on it (egress); crafted packets."""
    if direction == "egress":
        found = [e for e in cloud.endpoints if e.ip == address
                 and e.kind in ("instance", "external")]
        return replace(found[0], real=False) if found else None
    owner = cp.owner(address)
    if owner is None:
        return Endpoint("uplink", cloud.lab.external_ns, address, False, "external")
    own = address in (owner.port.ip, owner.port.ip6)
    return Endpoint(owner.instance.name + ("" if own else "-pair"),
                    cloud.lab.instance_ns(owner.port.tap), address, False,
                    "instance" if own else "pair")


def choose_points(data: st.DataObject, points: list[ReachPoint], count: int) -> list[ReachPoint]:
    """One point of each kind there is (where, inside, ICMP or not), then random
    others, ``count`` in all — drawn by hypothesis."""
    strata: dict[tuple[str, bool, bool], list[ReachPoint]] = {}
    for point in points:
        key = (point.where, point.inside, point.sample.proto == "icmp")
        strata.setdefault(key, []).append(point)
    chosen = [data.draw(st.sampled_from(strata[key]), label=f"reach {key}")
              for key in sorted(strata)][:count]
    rest = [p for p in points if p not in chosen]
    more = min(len(rest), count - len(chosen))
    if more > 0:
        chosen += data.draw(st.lists(st.sampled_from(rest), min_size=more, max_size=more,
                                     unique=True), label="more reach points")
    return chosen


def reach_mismatches(cloud: Deployed, data: st.DataObject) -> list[str]:
    """``reach`` of a port drawn by hypothesis (a direction, a family): every
    candidate point (:func:`reach_candidates`) is in the answer exactly when the
    oracle allows it, and a bounded sample of them is sent for real: a line per
    disagreement."""
    cp = CloudPolicy(cloud.state, cloud.allow_same_net)
    view: PortView = data.draw(st.sampled_from(sorted(cp.ports.values(),
                                                      key=lambda v: v.instance.name)),
                               label="reach port")
    direction, family = data.draw(st.sampled_from(REACH_KINDS), label="reach of")
    answer = reach(cp, view, direction, family)
    if answer is None:
        return []
    note(f"reach {direction} of {view.instance.name} {family}: "
         + "; ".join(f"{r.box} {r.addresses}" for r in answer.regions))
    points = reach_candidates(cloud, cp, answer)
    found = []
    for point in points:
        oracle = decide(cloud.state, point.sample.flow(), cloud.allow_same_net).allowed
        if oracle != point.inside:
            found.append(f"  reach {direction} of {view.instance.name}, {point.where} point "
                         f"{point.sample}: reach {'holds' if point.inside else 'lacks'} it, "
                         f"oracle {'allows' if oracle else 'denies'}")
    for point in choose_points(data, points, REACH_PROBES):
        got = measure(point.sample)
        if got != point.inside:
            found.append(f"  reach {direction} of {view.instance.name}, {point.where} point "
                         f"{point.sample}: kernel {'passed' if got else 'dropped'}, reach "
                         f"{'holds' if point.inside else 'lacks'} it")
    return found


# --------------------------------------------------------------------------- audit: impact


#: Flows sent after the change whose impact is predicted (and before it, unless
#: the first part of the example sent them already).
IMPACT_FLOWS = 6


@dataclass(frozen=True)
class Change:
    """A rule added to group ``g<group>`` (``rule``) or a rule deleted (``rule_id``)."""

    group: int
    rule: RuleSpec | None = None
    rule_id: str | None = None

    def command(self) -> list[str]:
        """The CLI command that makes the change."""
        if self.rule_id is not None:
            return ["security", "group", "rule", "delete", self.rule_id]
        rule = self.rule
        assert rule is not None
        args = ["security", "group", "rule", "create", f"g{self.group}", f"--{rule.direction}",
                "--ethertype", f"IPv{rule.family}"]
        if rule.protocol is not None:
            args += ["--protocol", rule.protocol]
        if rule.protocol in ("tcp", "udp"):
            args += ["--dst-port", f"{rule.low}:{rule.high}"]
        elif rule.protocol == "icmp" and rule.low is not None:
            args += ["--icmp-type", str(rule.low)]
            args += [] if rule.high is None else ["--icmp-code", str(rule.high)]
        if rule.source is not None:
            return [*args, "--remote-group", f"g{rule.source}"]
        return [*args, "--remote-ip", str(rule.cidr)]

    def apply(self, api: Api) -> None:
        """The same change, made in the store."""
        if self.rule_id is not None:
            api.rule_delete(PROJECT, self.rule_id)
        else:
            assert self.rule is not None
            add_rule(api, f"g{self.group}", self.rule)

    def __str__(self) -> str:
        if self.rule_id is not None:
            return f"delete rule {self.rule_id}"
        return f"add to g{self.group}: {self.rule}"


def draw_change(data: st.DataObject, spec: CloudSpec, state: CloudState) -> Change:
    """A random rule added to a random group, or one of the cloud's rules deleted."""
    rules = [r.id for r in sorted(state.rules.values(), key=lambda r: rule_key(state, r))]
    delete: bool = data.draw(st.booleans(), label="delete a rule")
    if rules and delete:
        return Change(-1, rule_id=data.draw(st.sampled_from(rules), label="rule deleted"))
    group = data.draw(st.integers(0, len(spec.groups) - 1), label="group changed")
    return Change(group, rule=data.draw(rule_specs(len(spec.groups)), label="rule added"))


def rule_key(state: CloudState, rule: Rule) -> tuple[str, ...]:
    """A rule's meaning, with group names for ids: an order that does not depend
    on the random ids (hypothesis replays a draw only on the same choices)."""
    def name(group_id: str | None) -> str:
        return "" if group_id is None else state.groups[group_id].name

    return (name(rule.group_id), rule.direction, rule.ethertype, str(rule.protocol),
            str(rule.port_min), str(rule.port_max), str(rule.remote_cidr),
            name(rule.remote_group_id))


def row_box(row: dict[str, Any], family: str) -> Box:
    """The box of an impact (or reach) row: its protocol, ports or ICMP type/code."""
    text = row["protocol"]
    if text == "any":
        low, high = 0, 255
    elif text.replace("-", "").isdigit():
        first, _, top = text.partition("-")
        low, high = int(first), int(top or first)
    else:
        low = high = {"tcp": 6, "udp": 17}.get(text, ICMP_OF[family])
    if row["icmp_type"] is not None:  # whole types icmp_type..icmp_type_last, or codes of one
        first, last = row["icmp_type"], row["icmp_type_last"]
        codes = (0, 255) if row["icmp_code"] == "any" else span(row["icmp_code"])
        return Box(low, high, first * 256 + codes[0], last * 256 + codes[1])
    return Box(low, high, *((0, 65535) if row["ports"] in (None, "any") else span(row["ports"])))


def span(text: str) -> tuple[int, int]:
    """``80`` or ``80-81`` as an interval."""
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def predicted(rows: list[dict[str, Any]], cp: CloudPolicy, sample: Sample) -> str | None:
    """``allowed`` / ``denied`` when an impact row holds ``sample``'s flow, else
    None. The flow is read in the destination port's ingress space, or the source
    port's egress space when the destination is outside the cloud: each holds the
    other end's filter too (reach's senders and receivers)."""
    family = "ipv4" if sample.src.family == 4 else "ipv6"
    flow = sample.flow()
    sel = flow.port if flow.port is not None else (flow.icmp_type or 0) * 256 + (
        flow.icmp_code or 0)
    box = Box(flow.protocol, flow.protocol, sel, sel)
    inside = cp.owner(sample.dst.ip) is not None
    direction, address, remote = ("ingress", sample.dst.ip, sample.src.ip) if inside else \
        ("egress", sample.src.ip, sample.dst.ip)
    found = {row["change"] for row in rows
             if row["direction"] == direction and row["address"] == address
             and row_box(row, family).covers(box)
             and netaddr.IPAddress(remote) in netaddr.IPSet(
                 row["sources" if direction == "ingress" else "destinations"])}
    assert len(found) <= 1, (str(sample), found)
    return found.pop() if found else None


def impact_mismatches(cloud: Deployed, spec: CloudSpec, data: st.DataObject) -> list[str]:
    """``secfw audit impact -- <a random change>``, then a bounded sample of flows
    sent before and after the change is made (the agent's incremental pass): a
    flow's verdict changes exactly when an impact row holds it, in the row's
    direction. A line per disagreement."""
    change = draw_change(data, spec, cloud.state)
    note(f"change: {change}")
    result = CliRunner().invoke(main, ["--store", cloud.url, "--project", PROJECT, "audit",
                                       "impact", "--config", str(cloud.config), "-f", "json",
                                       "--", *change.command()], env=AUDIT_ENV)
    if result.exit_code == ConflictError.exit_code:  # the group has that rule already
        return []
    assert result.exit_code == 0, (change.command(), result.output, result.exception)
    rows = json.loads(result.stdout)
    note(f"impact rows: {rows}")
    cp = CloudPolicy(cloud.state, cloud.allow_same_net)
    change.apply(cloud.api)
    after = cloud.api.snapshot()
    # not from an address pair to outside the cloud: reach and impact answer for
    # a port's fixed addresses (a pair's flows show in the ingress of a port only)
    samples = {s: predicted(rows, cp, s) for s in candidate_samples(cloud.state, cloud.endpoints)
               + candidate_samples(after, cloud.endpoints)
               if s.src.kind != "pair" or cp.owner(s.dst.ip) is not None}
    chosen = choose_changes(data, samples, cloud.measured)
    # the kernel's verdicts before the change: those of the flows already sent
    before = {s: cloud.measured[s] if s in cloud.measured else measure(s) for s in chosen}
    cloud.reconciler.reconcile()
    found = []
    for sample in chosen:
        got, expected = measure(sample), samples[sample]
        want = before[sample] if expected is None else expected == "allowed"
        if got != want or (expected is not None and before[sample] == want):
            found.append(f"  after {change}: {sample}: kernel "
                         f"{'passed' if before[sample] else 'dropped'} then "
                         f"{'passed' if got else 'dropped'}, impact says "
                         f"{expected or 'no change'}")
    return found


def choose_changes(data: st.DataObject, samples: dict[Sample, str | None],
                   measured: dict[Sample, bool]) -> list[Sample]:
    """One flow of each predicted change there is (per family), then random others
    (among the ``measured`` ones if possible), :data:`IMPACT_FLOWS` in all — drawn
    by hypothesis."""
    strata: dict[tuple[int, str], list[Sample]] = {}
    for sample, change in samples.items():
        strata.setdefault((sample.src.family, change or "none"), []).append(sample)
    chosen = [data.draw(st.sampled_from(strata[key]), label=f"impact {key}")
              for key in sorted(strata) if key[1] != "none"][:IMPACT_FLOWS]
    # the others among the flows already sent, when there are enough
    rest = sorted((s for s in samples if s not in chosen and s in measured), key=str) or \
        sorted((s for s in samples if s not in chosen), key=str)
    more = min(len(rest), IMPACT_FLOWS - len(chosen))
    if more > 0:
        chosen += data.draw(st.lists(st.sampled_from(rest), min_size=more, max_size=more,
                                     unique=True), label="more impact flows")
    return chosen


def verify_differences(cloud: Deployed) -> list[dict[str, Any]]:
    """``secfw audit verify`` of the lab's host kernel: its differences (exit 0
    when there are none, 12 otherwise)."""
    result = CliRunner().invoke(main, [
        "--store", cloud.url, "--project", PROJECT, "audit", "verify", "--host", HOST,
        "--netns", cloud.lab.host_ns, "--backend", cloud.backend,
        "--topology", cloud.lab.topology, "--config", str(cloud.config), "-f", "json"],
        env=AUDIT_ENV)
    assert result.exit_code in (0, 12), (result.output, result.exception)
    differences: list[dict[str, Any]] = json.loads(result.stdout)["differences"]
    assert (result.exit_code == 12) == bool(differences), result.output
    return differences


# --------------------------------------------------------------------------- the test


@settings(max_examples=6, deadline=None, derandomize=True, database=None,
          phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=cloud_specs(), data=st.data())
def test_kernel_agrees_with_oracle(
    shared_lab: tuple[Lab, Path, str], spec: CloudSpec, data: st.DataObject
) -> None:
    """For random clouds, every sampled flow — ingress and egress, IPv4 and IPv6 —
    is let through by the kernel exactly when ``decide`` says the security groups
    allow it and ``secfw audit explain`` says "allow", with each backend on each
    topology; the ``reach`` answer of a port drawn at random holds exactly what
    the oracle allows at its regions' edges, and a sample of those points sent
    for real passes exactly when it is in the answer; ``secfw audit verify``
    finds no difference after the agent's pass; and ``secfw audit impact`` of a
    random change predicts exactly which sampled flows change verdict once the
    agent has applied it. Fixed examples (derandomized, no shrinking: a failure
    reports its cloud and every mismatch at once)."""
    with deployed(shared_lab, spec) as cloud:
        verdicts = {s: decide(cloud.state, s.flow(), spec.allow_same_net)
                    for s in candidate_samples(cloud.state, cloud.endpoints)}
        mismatches = cloud.mismatches(choose(data, verdicts))
        mismatches += reach_mismatches(cloud, data)
        mismatches += impact_mismatches(cloud, spec, data)
        # verify evaluates thousands of probes: every other cloud (drawn), to keep
        # the test's cost (README, Tests)
        if data.draw(st.booleans(), label="audit verify"):
            mismatches += [f"  audit verify after the agent's passes: {d}"
                           for d in verify_differences(cloud)]
        report = f"cloud:\n{spec}\nmismatches:\n" + "\n".join(mismatches)
        note(report)
        assert not mismatches, report


#: A fixed cloud for the ICMP that no rule of the other end decides, and same-net:
#: vm0's egress is limited (tcp/80, and MLD queries to the external network),
#: vm1's is open (the default group), vm2 has no port security; all on n0,
#: same-net on.
FIXED_CLOUD = CloudSpec(
    groups=((RuleSpec("egress", 4, "tcp", 80, 80, "0.0.0.0/0", None),
             RuleSpec("egress", 6, "icmp", 130, None, "2001:db8:ffff::/64", None)),),
    instances=(InstanceSpec(0, (0,)), InstanceSpec(0, ()), InstanceSpec(0, (), False)),
    allow_same_net=True,
)
#: (source, destination, family, ICMP type, contract verdict, why):
#: docs/protection.md and docs/semantics.md.
FIXED_EXPECTED = (
    ("vm0", "vm1", 6, 130, False, "an MLD query is a router's: vm0's egress rules decide"),
    ("vm0", "external6", 6, 130, True, "vm0's egress rule allows MLD queries out there"),
    ("vm1", "vm0", 6, 130, True, "vm1's egress is open; queries to a port need no rule"),
    ("vm0", "vm1", 6, 131, True, "a report leaves any instance; vm1: same network"),
    ("vm0", "external6", 6, 143, True, "an MLDv2 report leaves any instance"),
    ("external6", "vm1", 6, 131, False, "a report to a port meets its rules: none"),
    ("vm0", "external6", 6, 134, False, "no router advertisement from an instance"),
    ("vm0", "vm1", 6, 136, True, "an advertisement of its own address leaves any instance"),
    ("vm2", "external", 4, 0, True, "port security off: nothing filtered, not even invalid"),
    ("external", "vm2", 4, 0, True, "port security off: nothing filtered, not even invalid"),
    ("external", "vm1", 4, 0, False, "an echo reply without a request: invalid, dropped"),
    ("vm2", "vm1", 4, 8, True, "same-net: vm2 is a port of n0"),
    ("spoofed", "vm1", 4, 8, False, "same-net: an address of n0's subnet no port holds"),
    ("spoofed", "vm1", 6, 128, False, "same-net: an address of n0's subnet no port holds"),
)


def test_a_fixed_cloud_as_the_contract_says(
    shared_lab: tuple[Lab, Path, str]
) -> None:
    """MLD queries from an instance are judged by its egress rules (a host sends
    reports, a router queries: RFC 3810 sections 5-6), MLD reports to an instance
    by its ingress, router advertisements never leave one, and a port without port
    security filters nothing, and same-net trusts the network's ports, not a
    spoofed address of its subnet from the uplink — the kernel of each backend ×
    topology, the oracle and ``secfw audit explain`` all say what the contract
    says, on real packets."""
    with deployed(shared_lab, FIXED_CLOUD) as cloud:
        wrong = []
        for src, dst, family, kind, expected, why in FIXED_EXPECTED:
            code = 0 if family == 4 or kind != 1 else 4
            sample = Sample(cloud.endpoint(src, family), cloud.endpoint(dst, family), "icmp",
                            None, kind, code)
            oracle = decide(cloud.state, sample.flow(), cloud.allow_same_net).allowed
            audit = audit_explain(cloud, sample)["verdict"] == "allow"
            kernel = measure(sample)
            if (kernel, oracle, audit) != (expected, expected, expected):
                wrong.append(f"  {sample}: kernel {kernel}, oracle {oracle}, audit explain "
                             f"{audit}, contract {expected} ({why})")
        assert not wrong, "\n".join(wrong)

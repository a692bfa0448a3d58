"""``secfw demo --hosts 3``: the guide's example cloud spread over three hosts on etcd.

The single-host demo (:mod:`secfw.lab.demo`) on the multi-host lab
(:mod:`secfw.lab.multihost`): an etcd member on the underlay holds the cloud, the
guide's five instances are spread over three host namespaces (:data:`PLACEMENT`),
one real ``secfw agent`` runs in each host namespace, and every (source,
destination, service) is probed with real packets and compared with the oracle
(:func:`secfw.compiler.explain.decide`).

Two additions to the guide's cloud, both needed to show what a multi-host cloud
must get right:

* tools1 gets the group :data:`EGRESS_GROUP` (egress tcp/80, udp/53 and ICMP
  only). The guide's groups have no egress rule, so without it every probe
  would be decided by the destination's host alone; with it, tools1 (host 2)
  → web1 (host 1) tcp/443 is dropped by host 2's egress although web1's
  ingress (global_http) accepts 443 from anywhere.
* the floating pool is :data:`FLOATING_POOL` (RFC 2544's benchmark range): the
  single-host demo's pool, TEST-NET-1, is the lab's underlay here.

Sources: every instance, and "external" — the external namespace of the
*destination's* host (each host has its own internet side; a reply from
another host's instance would leave through that host's external side, not
come back). Floating rows: every source to web1's floating address; the
routed lab routes a floating /32 to its instance's host, which NATs it. The
bridged multi-host lab has one router for every network (the underlay: the
hosts' own routers are off the segments), so it has no external side per host:
there the external and floating rows are left out (:func:`reachability` says
which were probed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from secfw.agent.status import read_report
from secfw.api import Api
from secfw.cloud import CloudState
from secfw.compiler.explain import Flow, decide
from secfw.errors import LabError, SecfwError
from secfw.lab import netns_tools
from secfw.lab.demo import (
    SERVICES,
    Probe,
    Service,
    add_floating_ips,
    build_guide_cloud,
    lab_ports,
    measure,
    secfw_executable,
)
from secfw.lab.multihost import MultiHostLab

#: Instance -> host index (0-based): every pair of hosts has instances on both
#: sides, and tools1 (egress restricted) is on another host than web1.
PLACEMENT = {"web1": 0, "web2": 1, "tools1": 1, "db1": 2, "beta1": 2}
EGRESS_GROUP = "tools_out"
FLOATING_POOL = "198.18.0.0/24"  # RFC 2544; not the underlay (192.0.2.0/24)
#: How long the agents get to program the cloud before the probes start.
CONVERGE_S = 60.0
AGENT_ARGS = ("--resync-interval", "30", "--backoff-max", "1")


@dataclass(frozen=True)
class Endpoint:
    """Where an instance lives in the lab: host, namespace, fixed address."""

    name: str
    host: str
    ns: str
    ip: str
    tap: str


def build_spread_cloud(api: Api, hosts: Sequence[str]) -> None:
    """The guide's cloud with its instances on ``hosts`` (:data:`PLACEMENT`), the
    floating IP of web1, and tools1's egress restriction (module docstring)."""
    build_guide_cloud(api, {name: hosts[i] for name, i in PLACEMENT.items()})
    add_floating_ips(api, FLOATING_POOL)
    with api.batch():
        api.secgroup_create("alpha", EGRESS_GROUP, "tools may only browse and resolve")
        api.rule_create("alpha", EGRESS_GROUP, "egress", protocol="tcp", dst_port="80")
        api.rule_create("alpha", EGRESS_GROUP, "egress", protocol="udp", dst_port="53")
        api.rule_create("alpha", EGRESS_GROUP, "egress", protocol="icmp")
        api.add_secgroup("alpha", "tools1", EGRESS_GROUP)


def endpoints(state: CloudState, lab: MultiHostLab) -> dict[str, Endpoint]:
    """Every instance's first port, by instance name."""
    found = {}
    for host in lab.hosts:
        for port in lab_ports(state, host):
            found[port.name] = Endpoint(port.name, host, lab.labs[host].instance_ns(port.tap),
                                        port.ip, port.tap)
    return found


def wait_converged(lab: MultiHostLab, api: Api, state_dir: Path,
                   limit: float = CONVERGE_S) -> None:
    """Until every host's agent reports a successful pass at the store's revision
    (LabError after ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while True:
        wanted = lab.in_fabric(api.store.revision)
        if all(_applied(state_dir, host) >= wanted for host in lab.hosts):
            return
        if time.monotonic() > deadline:
            raise LabError(f"demo: the agents did not apply revision {wanted} "
                           f"within {limit:.0f} s (logs in {state_dir})")
        time.sleep(0.1)


def _applied(state_dir: Path, host: str) -> int:
    """The revision ``host``'s agent reports as applied (-1: none yet, or unhealthy)."""
    try:
        report = read_report(state_dir, host)
    except SecfwError:
        return -1
    revision = report.doc.get("revision")
    return revision if report.state == "healthy" and isinstance(revision, int) else -1


@contextmanager
def listeners(namespaces: Sequence[str]) -> Iterator[None]:
    """Listen on every probed TCP/UDP port in every namespace given."""
    with ExitStack() as stack:
        for ns in namespaces:
            for service in SERVICES:
                if service.port is not None:
                    proto: Literal["tcp", "udp"] = "tcp" if service.protocol == 6 else "udp"
                    stack.enter_context(netns_tools.listen(ns, proto, service.port))
        yield


def reachability(state: CloudState, lab: MultiHostLab, allow_same_net: bool) -> list[Probe]:
    """Every source → every instance × service, and (routed) → web1's floating
    address; each measured with a real packet and judged by the oracle."""
    ends = endpoints(state, lab)
    external = lab.topology == "routed"
    probes = []
    with listeners([e.ns for e in ends.values()]):
        for dst in sorted(ends.values(), key=lambda e: e.name):
            sources = [(s.name, s.ns, s.ip) for s in ends.values() if s.name != dst.name]
            if external:
                sources.insert(0, ("external", lab.labs[dst.host].external_ns,
                                   lab.labs[dst.host].external_addresses[0]))
            for src_name, src_ns, src_ip in sources:
                for service in SERVICES:
                    probes.append(_probe(state, (src_name, src_ns, src_ip), dst, dst.ip,
                                         dst.name, service, allow_same_net))
        if external:
            probes += _floating_probes(state, lab, ends, allow_same_net)
    return probes


def _floating_probes(state: CloudState, lab: MultiHostLab, ends: dict[str, Endpoint],
                     allow_same_net: bool) -> list[Probe]:
    """Every instance and the floating port's host's external side → each floating
    address; the oracle judges the flow to the fixed address (the host DNATs
    before the security groups filter)."""
    probes = []
    by_tap = {e.tap: e for e in ends.values()}
    for floating in sorted(state.floating_ips.values(), key=lambda f: f.id):
        port = state.ports.get(floating.port_id or "")
        if port is None or port.tap not in by_tap:
            continue
        dst = by_tap[port.tap]
        sources = [("external", lab.labs[dst.host].external_ns,
                    lab.labs[dst.host].external_addresses[0])]
        sources += [(s.name, s.ns, s.ip) for s in sorted(ends.values(), key=lambda e: e.name)]
        for source in sources:
            for service in SERVICES:
                probes.append(_probe(state, source, dst, floating.id,
                                     f"{dst.name} via {floating.id}", service, allow_same_net))
    return probes


def _probe(state: CloudState, source: tuple[str, str, str], dst: Endpoint, address: str,
           label: str, service: Service, allow_same_net: bool) -> Probe:
    """One real packet from ``source`` (name, namespace, address) to ``address``
    (``dst``'s fixed or floating address), with the oracle's verdict on the flow
    to ``dst``'s fixed address."""
    src_name, src_ns, src_ip = source
    icmp = service.protocol == 1
    flow = Flow(src_ip, dst.ip, service.protocol, service.port, 8 if icmp else None,
                0 if icmp else None)
    expected = decide(state, flow, allow_same_net)
    got = measure(src_ns, dst.ns, address, service)
    return Probe(src_name, label, service.label, got, expected.allowed, expected.reason)


def run(lab: MultiHostLab, work: Path, allow_same_net: bool = True,
        config: str | None = None) -> tuple[list[Probe], dict[str, str]]:
    """Bring ``lab`` up with its etcd, build the spread cloud, start an agent per
    host, wait until they applied it, probe. Returns the probes and each
    instance's host. The caller brings the lab down (:func:`secfw.lab.multihost.opened`)."""
    from secfw.store import open_store

    lab.up({})
    lab.start_etcd()
    url = lab.store_url
    api: Api = lab.in_fabric(lambda: Api(open_store(url)))
    try:
        lab.in_fabric(lambda: build_spread_cloud(api, lab.hosts))
        state: CloudState = lab.in_fabric(api.snapshot)
        lab.up({h: lab_ports(state, h) for h in lab.hosts})
        agents = work / "agents"
        args = AGENT_ARGS + (("--config", config) if config else ())
        for host in lab.hosts:
            lab.start_agent(host, secfw_executable(), url, agents, args,
                            log=work / f"agent-{host}.log")
        wait_converged(lab, api, agents)
        placement = {e.name: e.host for e in endpoints(state, lab).values()}
        return reachability(state, lab, allow_same_net), placement
    finally:
        lab.in_fabric(api.store.close)

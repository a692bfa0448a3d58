"""``secfw demo``: the operations guide's example cloud, measured with real packets.

Builds two projects on one compute host — a flat network shared by everyone and
a VLAN network of project ``alpha`` — with the guide's groups ``default``,
``open``, ``global_http`` and ``cluster`` and five instances; brings the lab up;
runs the agent once inside the host's namespace (exactly as an operator would,
``ip netns exec HOST secfw agent --once``); then probes every (source,
destination, service) with real TCP, UDP and ICMP packets and prints the
reachability matrix next to the rule that allowed each flow, as decided
independently by :func:`secfw.compiler.explain.decide`. Any disagreement is
flagged and makes the demo fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from secfw.api import Api
from secfw.cloud import CloudState
from secfw.compiler.explain import Flow, decide
from secfw.constants import DEMO_HOST
from secfw.errors import LabError
from secfw.lab import netns_tools
from secfw.lab.hostlab import Lab, LabPort

HOST = DEMO_HOST
PROBE_TIMEOUT = 0.3


@dataclass(frozen=True)
class Service:
    label: str
    protocol: int  # IP protocol number
    port: int | None = None


SERVICES = (
    Service("tcp/22", 6, 22),
    Service("tcp/80", 6, 80),
    Service("tcp/443", 6, 443),
    Service("udp/53", 17, 53),
    Service("icmp echo", 1),
)


@dataclass(frozen=True)
class Probe:
    source: str
    destination: str
    service: str
    measured: bool
    expected: bool
    reason: str

    @property
    def agrees(self) -> bool:
        return self.measured == self.expected


def build_guide_cloud(api: Api, placement: Mapping[str, str] | None = None) -> None:
    """The guide's groups and rules, two projects, a flat and a VLAN network.

    Every instance is booted on :data:`HOST`, or on ``placement[name]`` when given
    (the multi-host demo spreads them, :mod:`secfw.lab.demohosts`)."""
    with api.batch():
        api.net_create("admin", "public", "10.10.0.0/24")
        api.net_create("alpha", "alpha-net", "10.20.0.0/24", vlan=101)
        api.image_create("admin", "cirros", "qcow2", "public")
        api.secgroup_create("alpha", "open", "all ports")
        for proto, low, high in (
            ("icmp", "-1", "255"),
            ("tcp", "1", "65535"),
            ("udp", "1", "65535"),
        ):
            api.secgroup_add_rule("alpha", "open", proto, low, high, "0.0.0.0/0")
        api.secgroup_create("alpha", "global_http", "allow web traffic from the internet")
        api.secgroup_add_rule("alpha", "global_http", "tcp", "80", "80", "0.0.0.0/0")
        api.secgroup_add_rule("alpha", "global_http", "tcp", "443", "443", "0.0.0.0/0")
        api.secgroup_create("alpha", "cluster", "ssh from the web servers")
        api.secgroup_add_group_rule("alpha", "cluster", "global_http", "tcp", "22", "22")
        boots: tuple[tuple[str, str, list[str], str], ...] = (
            ("alpha", "web1", ["global_http"], "public"),
            ("alpha", "web2", ["global_http"], "alpha-net"),
            ("alpha", "db1", ["cluster"], "alpha-net"),
            ("alpha", "tools1", ["open"], "public"),
            ("beta", "beta1", [], "public"),
        )
        for project, name, groups, net in boots:
            host = (placement or {}).get(name, HOST)
            api.boot(project, name, "m1.tiny", "cirros", host, groups, [net])


#: The demo's floating pool (TEST-NET-1; the lab's external side routes it to the host).
FLOATING_POOL = "192.0.2.0/24"


def add_floating_ips(api: Api, pool: str = FLOATING_POOL) -> None:
    """The guide's floating IPs: a pool (``pool``), one address allocated by alpha
    and associated with web1 (``nova floating-ip-create``, ``add-floating-ip``)."""
    with api.batch():
        api.floating_pool_create("admin", "public-pool", pool)
        address = api.floating_ip_create("alpha", "public-pool").id
        api.add_floating_ip("alpha", "web1", address)


def lab_ports(state: CloudState, host: str) -> list[LabPort]:
    """The lab's view of the ports of ``host``'s instances."""
    ports = []
    for instance in state.instances.values():
        if instance.host != host:
            continue
        for port in state.ports_of(instance.id):
            net = state.networks[port.network_id]
            v6 = port.ip6 is not None and net.cidr6 is not None
            ports.append(
                LabPort(
                    port.tap, port.mac, port.ip, net.prefixlen, net.gateway, instance.name,
                    ip6=port.ip6 if v6 else None,
                    prefixlen6=net.prefixlen6 if v6 else None,
                    gateway6=net.gateway6 if v6 else None,
                    floating=tuple(f.id for f in state.floating_of(port.id)),
                    # only a network that overlaps another needs to be told apart
                    segment=net.vlan if state.overlapping_subnets(net.id) else None,
                )
            )
    return sorted(ports, key=lambda p: p.tap)


def run_agent_once(lab: Lab, host: str, store_url: str, config: str | None = None) -> str:
    """``ip netns exec HOSTNS secfw agent --once`` — the agent filters its own namespace."""
    command = [
        "ip",
        "netns",
        "exec",
        lab.host_ns,
        secfw_executable(),
        "--store",
        store_url,
        "agent",
        "--host",
        host,
        "--once",
    ]
    if config:
        command += ["--config", config]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        raise LabError(f"agent failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stderr


def secfw_executable() -> str:
    """The ``secfw`` console script of this interpreter's environment."""
    beside = Path(sys.executable).parent / "secfw"
    return str(beside) if beside.exists() else "secfw"


@contextmanager
def listeners(lab: Lab, taps: list[str]) -> Iterator[None]:
    """Listen on every probed TCP/UDP port in every instance namespace."""
    with ExitStack() as stack:
        for tap in taps:
            for service in SERVICES:
                if service.port is not None:
                    proto: Literal["tcp", "udp"] = "tcp" if service.protocol == 6 else "udp"
                    stack.enter_context(
                        netns_tools.listen(lab.instance_ns(tap), proto, service.port)
                    )
        yield


def measure(src_ns: str, dst_ns: str, dst_ip: str, service: Service) -> bool:
    """Send one real probe; True when it got through."""
    if service.protocol == 6:
        return netns_tools.tcp_connect(src_ns, dst_ip, service.port or 0, PROBE_TIMEOUT)
    if service.protocol == 17:
        return netns_tools.udp_probe(src_ns, dst_ns, dst_ip, service.port or 0, PROBE_TIMEOUT)
    return netns_tools.ping(src_ns, dst_ip, 1, PROBE_TIMEOUT)


def reachability(api: Api, lab: Lab, allow_same_net: bool) -> list[Probe]:
    """Probe every source → destination × service; compare with the oracle."""
    state = api.snapshot()
    ports = lab_ports(state, HOST)
    by_name = {p.name: p for p in ports}
    sources = [("external", lab.external_ns, Lab.external_addresses[0])]
    sources += [(n, lab.instance_ns(by_name[n].tap), by_name[n].ip) for n in ("web1", "beta1")]
    probes = []
    with listeners(lab, [p.tap for p in ports]):
        for src_name, src_ns, src_ip in sources:
            for dst in ports:
                if dst.name == src_name:
                    continue
                for service in SERVICES:
                    flow = Flow(
                        src_ip,
                        dst.ip,
                        service.protocol,
                        service.port,
                        8 if service.protocol == 1 else None,
                        0 if service.protocol == 1 else None,
                    )
                    expected = decide(state, flow, allow_same_net)
                    got = measure(src_ns, lab.instance_ns(dst.tap), dst.ip, service)
                    probes.append(
                        Probe(
                            src_name,
                            dst.name,
                            service.label,
                            got,
                            expected.allowed,
                            expected.reason,
                        )
                    )
        probes += floating_probes(state, lab, sources, allow_same_net)
    return probes


def floating_probes(state: CloudState, lab: Lab, sources: list[tuple[str, str, str]],
                    allow_same_net: bool) -> list[Probe]:
    """Every source → each floating address of the host × service. The oracle
    judges the flow to the fixed address with the original source: the host
    DNATs before the security groups filter."""
    probes = []
    for floating in sorted(state.floating_ips.values(), key=lambda f: f.id):
        port = state.ports.get(floating.port_id or "")
        if port is None or state.instances[port.instance_id].host != HOST:
            continue
        name = f"{state.instances[port.instance_id].name} via {floating.id}"
        for src_name, src_ns, src_ip in sources:
            for service in SERVICES:
                flow = Flow(src_ip, port.ip, service.protocol, service.port,
                            8 if service.protocol == 1 else None,
                            0 if service.protocol == 1 else None)
                expected = decide(state, flow, allow_same_net)
                got = measure(src_ns, lab.instance_ns(port.tap), floating.id, service)
                probes.append(Probe(src_name, name, service.label, got, expected.allowed,
                                    expected.reason))
    return probes


def demo_paths(work_dir: Path) -> tuple[str, Path]:
    """Store URL and lab state directory of a demo run in ``work_dir``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    # an absolute path after "sqlite:///" gives the four-slash absolute form
    return f"sqlite:///{(work_dir / 'demo.db').resolve()}", work_dir / "lab"


def lab_for(host: str, state_dir: Path | None = None) -> Lab:
    """The lab of ``host`` with its state under ``$SECFW_LAB_DIR`` (default /run/secfw/lab)."""
    base = state_dir or Path(os.environ.get("SECFW_LAB_DIR", "/run/secfw/lab"))
    return Lab(host, base)

"""A bridged host that routes into its own bridges (nova-network's layout): real packets.

The lab's gateway-on-bridge layout (``Lab(..., topology="bridged",
gateway_on_bridge=True)``) puts every network's gateway on its bridge in the host
namespace, which routes between the bridges and the external namespace. Traffic the
host's IP stack routes into a bridge never crosses a bridge port on its way in, so
the bridged layout's per-port ingress filter must be reached another way
(docs/nftables.md and docs/iptables.md, "Bridged hosts"). Each test runs for both
backends; the bridged tests of test_engine.py and test_protection.py cover the
router-namespace layout.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from secfw.backends import BACKENDS
from secfw.lab import netns_tools
from secfw.lab.hostlab import Lab

NET_A, NET_B = "net-a", "net-b"
EXT = "external"
EXT_IP6 = Lab.external_address6


@pytest.fixture(params=BACKENDS)
def gw_cloud(request: pytest.FixtureRequest, tmp_path: Path,
             lab_factory: Callable[..., Lab], helpers: Any) -> Iterator[Any]:
    """A cloud whose host is a gateway-on-bridge lab, for one backend, with two
    networks (10.1.0.0/24 + 2001:db8:71::/64 and 10.2.0.0/24) and the group
    ``web`` (only tcp/80 from anywhere, IPv4 and IPv6)."""
    host = f"h-{uuid.uuid4().hex[:8]}"
    lab = lab_factory(host, "bridged", gateway_on_bridge=True)
    env = helpers.CloudLab(f"sqlite:///{tmp_path}/secfw.db", lab, host, tmp_path,
                           request.param, "bridged")
    env.api.net_create("p", NET_A, "10.1.0.0/24", cidr6="2001:db8:71::/64")
    env.api.net_create("p", NET_B, "10.2.0.0/24")
    env.api.secgroup_create("p", "web", "web only")
    env.api.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0")
    env.api.rule_create("p", "web", "ingress", "IPv6", "tcp", "80")
    try:
        yield env
    finally:
        env._reconciler = None
        env.backend = None
        if env._agent_store is not None:
            env._agent_store.close()
        env.api.store.close()


def test_traffic_the_host_routes_into_its_bridge_is_ingress_filtered(gw_cloud: Any) -> None:
    """An instance whose only group allows tcp/80: from outside (the host routes
    it into the bridge) and from another network (the host routes it from one bridge
    into the other) tcp/80 reaches it, tcp/22, udp and ping do not — IPv4 and IPv6."""
    cloud = gw_cloud
    cloud.boot("web", ("web",), net=NET_A)
    cloud.boot("other", net=NET_B)
    cloud.sync()
    for src in (EXT, "other"):
        assert cloud.tcp(src, "web", 80), src
        assert not cloud.tcp(src, "web", 22), src
        assert not cloud.udp(src, "web", 53), src
        assert not cloud.ping(src, "web"), src
    assert cloud.arrives("web", "tcp", 80)
    assert not cloud.arrives("web", "tcp", 22)  # a bare SYN, not even a handshake
    web6 = cloud.port("web").ip6
    assert web6
    assert _tcp6(cloud, "web", web6, 80)
    assert not _tcp6(cloud, "web", web6, 22)
    assert cloud.tcp("web", EXT, 22)  # egress is open: only ingress is filtered


def test_same_net_and_allowed_ingress_still_work(gw_cloud: Any) -> None:
    """Same-net traffic (bridged, never routed) and ingress a group allows pass; an
    instance on the same bridge that reaches ``web`` through the gateway (the host
    routes it back into the bridge it came from) is filtered like any other."""
    cloud = gw_cloud
    cloud.boot("web", ("web",), net=NET_A)
    cloud.boot("peer", ("web",), net=NET_A)
    cloud.sync()
    assert cloud.tcp("peer", "web", 22)  # allow_same_net_traffic: bridged, accepted
    assert cloud.tcp(EXT, "peer", 80)
    cloud.configure(allow_same_net=False)
    cloud.sync()
    assert not cloud.tcp("peer", "web", 22)
    assert cloud.tcp("peer", "web", 80)
    # Through the gateway: the peer's frame goes to the bridge's MAC, the host
    # routes it back into the same bridge.
    gateway_mac = _bridge_mac(cloud, "10.1.0.0/24")
    assert _via_gateway(cloud, "peer", "web", gateway_mac, 80)
    assert not _via_gateway(cloud, "peer", "web", gateway_mac, 22)


def test_each_packet_meets_the_ingress_filter_exactly_once(gw_cloud: Any) -> None:
    """One SYN routed in from outside and one SYN bridged from a peer each cross the
    receiving port's ingress filter once: counted by a rule added behind the agent's
    back at the top of that filter (the agent runs no pass in between)."""
    cloud = gw_cloud
    cloud.boot("web", ("web",), net=NET_A)
    cloud.boot("peer", net=NET_A)
    cloud.sync()
    ext_ip, peer_ip = cloud.ip(EXT), cloud.ip("peer")
    read = _ingress_counter(cloud, "web", {"routed": ext_ip, "bridged": peer_ip})
    assert read() == {"routed": 0, "bridged": 0}
    assert cloud.arrives("web", "tcp", 80)
    assert cloud.arrives("web", "tcp", 80, src_ip=peer_ip, from_ns=cloud.ns("peer"))
    assert read() == {"routed": 1, "bridged": 1}


def test_allowed_pairs_are_routed_to_their_port_and_a_shared_address_is_dropped(
        gw_cloud: Any) -> None:
    """What the host routes to an allowed address pair's network is filtered by the
    port's groups, like its own address; an address two ports claim (both have it as
    a pair) is dropped when routed, whichever port answers for it; the kernel read
    back afterwards plans nothing (the address maps are interval maps now)."""
    cloud = gw_cloud
    cloud.boot("web", ("web",), net=NET_A)
    cloud.boot("peer", ("web",), net=NET_A)
    cloud.api.port_update("p", cloud.port("web").tap,
                          allowed_address_pairs=["10.1.0.64/28", "10.1.0.200"])
    cloud.sync()
    for address in ("10.1.0.70/32", "10.1.0.200/32"):
        _run(cloud, "ip", "netns", "exec", cloud.ns("web"), "ip", "addr", "add", address,
             "dev", "eth0", in_host=False)
    assert _tcp_to(cloud, "web", "10.1.0.70", 80)
    assert not _tcp_to(cloud, "web", "10.1.0.70", 22)
    assert _tcp_to(cloud, "web", "10.1.0.200", 80)
    cloud.api.port_update("p", cloud.port("peer").tap, allowed_address_pairs=["10.1.0.200"])
    cloud.sync()
    assert not _tcp_to(cloud, "web", "10.1.0.200", 80)
    assert cloud.tcp(EXT, "web", 80)  # its own address still works
    assert cloud.sync(full=True).commands == 0
    cloud.configure(cloud.allow_same_net)  # a new agent: reads the kernel back
    assert cloud.sync().commands == 0


# --------------------------------------------------------------------------- helpers


def _tcp6(cloud: Any, dst: str, address: str, port: int) -> bool:
    return _tcp_to(cloud, dst, address, port)


def _tcp_to(cloud: Any, dst: str, address: str, port: int) -> bool:
    """A TCP handshake from the external namespace to ``address:port``, a listener
    running in ``dst``'s namespace."""
    with netns_tools.listen(cloud.ns(dst), "tcp", port):
        return netns_tools.tcp_connect(cloud.ns(EXT), address, port, 0.3)


def _bridge_mac(cloud: Any, network: str) -> str:
    from secfw.lab.hostlab import bridge_name

    shown = _run(cloud, "ip", "-o", "link", "show", bridge_name(network))
    found = re.search(r"link/ether ([0-9a-f:]{17})", shown)
    assert found, shown
    return found.group(1)


def _run(cloud: Any, *command: str, in_host: bool = True) -> str:
    """Run ``command`` (no shell) in the host namespace, or as it is."""
    import subprocess

    prefix = ("ip", "netns", "exec", cloud.lab.host_ns) if in_host else ()
    done = subprocess.run((*prefix, *command), capture_output=True, text=True, timeout=30,
                          check=True)
    return done.stdout


def _via_gateway(cloud: Any, src: str, dst: str, gateway_mac: str, port: int) -> bool:
    """A SYN from ``src`` to ``dst:port`` sent to the gateway's MAC (the host routes
    it), seen on ``dst``'s eth0."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    token = b"secfw-" + uuid.uuid4().hex.encode()
    src_port = cloud.port(src)
    frame = (Ether(src=src_port.mac, dst=gateway_mac)
             / IP(src=src_port.ip, dst=cloud.ip(dst), ttl=64)
             / TCP(sport=40000 + port, dport=port, flags="S") / Raw(token))
    seen = netns_tools.send_and_sniff(
        frame, src_ns=cloud.ns(src), dst_ns=cloud.ns(dst),
        bpf=f"tcp and dst port {port}", match=lambda f: token in bytes(f), timeout=0.3)
    return seen is not None


def _ingress_counter(cloud: Any, dst: str, sources: dict[str, str]) -> Callable[[], dict[str, int]]:
    """Insert one counting rule per source (tcp/80 from it) at the top of ``dst``'s
    ingress filter; return a reader of the packet counts by label."""
    if cloud.backend_name == "nftables":
        for label, source in sources.items():
            cloud.nft("insert", "rule", "inet", "secfw", "ingress-filter", "ip", "saddr",
                      source, "tcp", "dport", "80", "counter", "comment", f"probe-{label}")

        def read_nft() -> dict[str, int]:
            text = cloud.nft("list", "chain", "inet", "secfw", "ingress-filter")
            return {label: _count(text, rf'packets (\d+) bytes \d+ comment "probe-{label}"')
                    for label in sources}

        return read_nft
    chain = _iptables_ingress_chain(cloud, dst)
    for label, source in sources.items():
        cloud.tamper("iptables", "-w", "-I", chain, "1", "-s", source, "-p", "tcp",
                     "--dport", "80", "-m", "comment", "--comment", f"probe-{label}")

    def read_ipt() -> dict[str, int]:
        variant = cloud.iptables_variant()
        text = _run(cloud, f"iptables-{variant}", "-w", "-L", chain, "-v", "-x", "-n")
        return {label: _count(text, rf"^\s*(\d+)\s+\d+\s.*/\* probe-{label} \*/")
                for label in sources}

    return read_ipt


def _iptables_ingress_chain(cloud: Any, dst: str) -> str:
    """The ingress policy chain (``secfw-pi-…``) ``dst``'s tap is dispatched to."""
    tap = cloud.port(dst).tap
    for line in cloud.ruleset_text().splitlines():
        found = re.search(rf"--physdev-out {re.escape(tap)} .*-g (secfw-pi-[0-9a-f]+)", line)
        if found:
            return found.group(1)
    raise AssertionError(f"no ingress policy chain for {tap}")


def _count(text: str, pattern: str) -> int:
    found = re.search(pattern, text, re.MULTILINE)
    assert found, (pattern, text)
    return int(found.group(1))

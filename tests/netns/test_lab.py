"""The namespace lab and its probes, with real packets and NO firewall loaded.

Every test builds its own lab under a unique host name (so concurrent runs cannot
collide) and tears it down in the fixture, whatever happens.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
from pyroute2 import IPRoute, netns

from secfw import lab as lab_module
from secfw import netns_tools as nt
from secfw.errors import LabError
from secfw.lab import Lab, LabPort, netns_exists, run_in_netns

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

MALICIOUS = '"; rm -rf / #'
UNRELATED_NS = "sfw-unrelated-test"

PORTS = (
    LabPort("tapa0000001-01", "fa:16:3e:00:00:01", "10.0.0.3", 24, "10.0.0.1", "web 'one'"),
    LabPort("tapa0000002-02", "fa:16:3e:00:00:02", "10.0.0.4", 24, "10.0.0.1", MALICIOUS),
    LabPort("tapb0000003-03", "fa:16:3e:00:00:03", "10.1.0.5", 24, "10.1.0.1", "db; reboot"),
)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A lab for a unique host, always brought down afterwards."""
    the_lab = Lab(f"test-host-{uuid.uuid4().hex[:8]}", tmp_path / "state")
    try:
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def up_lab(lab: Lab) -> Lab:
    lab.up(PORTS)
    return lab


@pytest.fixture
def unrelated_ns() -> Iterator[str]:
    """A namespace the lab must never touch (it even shares the ``sfw-`` prefix)."""
    if netns_exists(UNRELATED_NS):
        netns.remove(UNRELATED_NS)  # left over by an interrupted run of this test
    netns.create(UNRELATED_NS)
    try:
        yield UNRELATED_NS
    finally:
        if netns_exists(UNRELATED_NS):
            netns.remove(UNRELATED_NS)


def lab_namespaces(lab: Lab, ports: tuple[LabPort, ...] = PORTS) -> set[str]:
    return {lab.host_ns, lab.external_ns} | {lab.instance_ns(p.tap) for p in ports}


def snapshot(lab: Lab) -> dict[str, Any]:
    """Interface indexes, routes and neighbours of the host namespace, and each eth0.

    Indexes change whenever an interface is recreated, so equal snapshots mean
    nothing was torn down and rebuilt.
    """
    with IPRoute(netns=lab.host_ns, flags=0) as host:
        links = sorted((ln.get("ifname"), ln["index"]) for ln in host.link("dump"))
        routes = sorted((r.get("RTA_DST"), r.get("RTA_OIF")) for r in host.route("dump"))
        neigh = sorted(
            (n.get("NDA_DST"), n.get("NDA_LLADDR"), n["state"])
            for n in host.neigh("dump")
            if n["state"] == 0x80
        )
    eths = {}
    for port in PORTS:
        with IPRoute(netns=lab.instance_ns(port.tap), flags=0) as inst:
            eths[port.tap] = inst.link_lookup(ifname="eth0")
    return {"links": links, "routes": routes, "neigh": neigh, "eth0": eths}


# --------------------------------------------------------------------------- topology


def test_instances_ping_each_other_and_the_external_namespace(up_lab: Lab) -> None:
    for src in PORTS:
        for dst in PORTS:
            if src is not dst:
                assert nt.ping(up_lab.instance_ns(src.tap), dst.ip), (src.tap, dst.ip)
        for external in Lab.external_addresses:
            assert nt.ping(up_lab.instance_ns(src.tap), external), (src.tap, external)
        assert nt.ping(up_lab.external_ns, src.ip), src.ip


def test_tcp_and_udp_work_both_ways(up_lab: Lab) -> None:
    a, c = (up_lab.instance_ns(p.tap) for p in (PORTS[0], PORTS[2]))
    ext, ext_ip = up_lab.external_ns, Lab.external_addresses[0]
    pairs = [(a, c, PORTS[2].ip), (c, a, PORTS[0].ip), (a, ext, ext_ip), (ext, a, PORTS[0].ip)]
    for src, dst, dst_ip in pairs:
        with nt.listen(dst, "tcp", 8080) as tcp, nt.listen(dst, "udp", 5353):
            assert nt.tcp_connect(src, dst_ip, 8080), (src, dst_ip)
            assert nt.udp_probe(src, dst, dst_ip, 5353), (src, dst_ip)
        assert tcp.accepted >= 1


def test_probes_to_closed_ports_report_false(up_lab: Lab) -> None:
    a, b = (up_lab.instance_ns(p.tap) for p in PORTS[:2])
    with nt.listen(b, "tcp", 8080), nt.listen(b, "udp", 5353):
        assert not nt.tcp_connect(a, PORTS[1].ip, 8081)
        assert not nt.udp_probe(a, b, PORTS[1].ip, 5354)
        # A datagram that arrives in another namespace does not count.
        assert not nt.udp_probe(a, b, PORTS[2].ip, 5353)
    started = time.monotonic()
    assert not nt.ping(a, "10.0.0.99", timeout=0.3)  # nobody there: bounded wait
    assert time.monotonic() - started < 1.0


def test_host_side_wiring(up_lab: Lab) -> None:
    with IPRoute(netns=up_lab.host_ns, flags=0) as host:
        for port in PORTS:
            (index,) = host.link_lookup(ifname=port.tap)
            neigh = [n for n in host.neigh("dump", ifindex=index) if n.get("NDA_DST") == port.ip]
            assert neigh and neigh[0]["state"] == 0x80  # NUD_PERMANENT
            assert neigh[0].get("NDA_LLADDR") == port.mac
            routes = host.route("get", dst=port.ip)
            assert routes[0].get("RTA_OIF") == index
        assert host.link_lookup(ifname="sfw-ext")
    sysctl = Path("/proc/sys/net/ipv4/conf", PORTS[0].tap, "proxy_arp")
    assert run_in_netns(up_lab.host_ns, sysctl.read_text).strip() == "1"
    with IPRoute(netns=up_lab.instance_ns(PORTS[0].tap), flags=0) as inst:
        (eth0,) = inst.link("get", index=inst.link_lookup(ifname="eth0")[0])
        assert eth0.get("address") == PORTS[0].mac


# --------------------------------------------------------------------------- up / sync / down


def test_up_again_changes_nothing(up_lab: Lab) -> None:
    before = snapshot(up_lab)
    up_lab.up(PORTS)
    assert snapshot(up_lab) == before
    assert nt.ping(up_lab.instance_ns(PORTS[0].tap), PORTS[2].ip)


def test_up_without_a_port_removes_only_that_namespace(up_lab: Lab) -> None:
    gone, kept = PORTS[1], (PORTS[0], PORTS[2])
    up_lab.up(kept)
    assert not netns_exists(up_lab.instance_ns(gone.tap))
    assert all(netns_exists(ns) for ns in lab_namespaces(up_lab, kept))
    with IPRoute(netns=up_lab.host_ns, flags=0) as host:
        assert not host.link_lookup(ifname=gone.tap)
    assert up_lab.taps() == sorted(p.tap for p in kept)
    assert nt.ping(up_lab.instance_ns(kept[0].tap), kept[1].ip)
    assert not nt.ping(up_lab.instance_ns(kept[0].tap), gone.ip, timeout=0.2)


def test_up_repairs_a_namespace_deleted_behind_its_back(up_lab: Lab) -> None:
    victim = up_lab.instance_ns(PORTS[2].tap)
    netns.remove(victim)  # its tap may linger until the kernel cleans the namespace up
    up_lab.up(PORTS)
    assert nt.ping(up_lab.instance_ns(PORTS[0].tap), PORTS[2].ip)


def test_changed_mac_rebuilds_the_port(up_lab: Lab) -> None:
    moved = LabPort(PORTS[2].tap, "fa:16:3e:00:00:33", "10.1.0.6", 24, "10.1.0.1")
    up_lab.up([*PORTS[:2], moved])
    assert nt.ping(up_lab.instance_ns(PORTS[0].tap), moved.ip)
    assert not nt.ping(up_lab.instance_ns(PORTS[0].tap), PORTS[2].ip, timeout=0.2)


def test_down_removes_everything_and_spares_an_unrelated_namespace(
    up_lab: Lab, unrelated_ns: str
) -> None:
    created = lab_namespaces(up_lab)
    assert all(netns_exists(ns) for ns in created)
    up_lab.down()
    assert not any(netns_exists(ns) for ns in created)
    assert netns_exists(unrelated_ns)
    assert not up_lab.exists()
    with IPRoute() as root:  # the lab never creates anything in the root namespace
        names = {ln.get("ifname") for ln in root.link("dump")}
    assert not names & ({p.tap for p in PORTS} | {"sfw-ext", "sfw-gw", "sfw-gw-p"})
    up_lab.down()  # again: a no-op


def test_down_after_a_failed_up_removes_what_was_built(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = lab_module._wire_host_side

    def fail_on_last_port(host_ns: str, host: Any, port: LabPort) -> None:
        if port.tap == PORTS[2].tap:
            raise OSError(5, "injected failure")
        real(host_ns, host, port)

    monkeypatch.setattr(lab_module, "_wire_host_side", fail_on_last_port)
    with pytest.raises(LabError, match="injected failure"):
        lab.up(PORTS)
    assert all(netns_exists(ns) for ns in lab_namespaces(lab))
    lab.down()
    assert not any(netns_exists(ns) for ns in lab_namespaces(lab))


def test_down_of_a_lab_that_does_not_exist_is_a_noop(lab: Lab, unrelated_ns: str) -> None:
    lab.down()
    assert netns_exists(unrelated_ns)


def test_an_existing_unrecorded_namespace_is_not_adopted(lab: Lab) -> None:
    netns.create(lab.host_ns)
    try:
        with pytest.raises(LabError, match="not recorded"):
            lab.up(PORTS)
        lab.down()
        assert netns_exists(lab.host_ns)  # not ours: left alone
    finally:
        netns.remove(lab.host_ns)


def test_a_malicious_instance_name_is_harmless(lab: Lab) -> None:
    port = LabPort("tapc0000004-04", "fa:16:3e:00:00:04", "10.2.0.7", 24, "10.2.0.1", MALICIOUS)
    lab.up([port])
    assert MALICIOUS not in lab.instance_ns(port.tap)
    assert nt.ping(lab.external_ns, port.ip)
    assert Path("/").exists() and Path("/etc").is_dir()  # nothing was executed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tap": "eth0"},
        {"tap": "tap" + "x" * 13},
        {"tap": "tap; ls"},
        {"mac": "01:00:5e:00:00:01"},
        {"mac": "fa:16:3e:00:00"},
        {"ip": "10.0.0.300"},
        {"gateway": "10.9.9.1"},
        {"gateway": "10.0.0.3"},
        {"prefixlen": 0},
        {"ip6": "2001:db8::5"},  # without prefixlen6 and gateway6
        {"ip6": "10.0.0.9", "prefixlen6": 64, "gateway6": "2001:db8::1"},
        {"ip6": "2001:db8::5", "prefixlen6": 64, "gateway6": "2001:db9::1"},
        {"ip6": "2001:db8::5", "prefixlen6": 64, "gateway6": "2001:db8::5"},
        {"ip6": "2001:db8::5", "prefixlen6": 128, "gateway6": "2001:db8::1"},
    ],
)
def test_invalid_ports_are_rejected(kwargs: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "tap": "tapd0000005-05",
        "mac": "fa:16:3e:00:00:05",
        "ip": "10.0.0.3",
        "prefixlen": 24,
        "gateway": "10.0.0.1",
    }
    fields |= kwargs
    with pytest.raises(LabError):
        LabPort(**fields)


def test_clashing_ports_are_rejected(lab: Lab) -> None:
    twin = LabPort("tapd0000006-06", "fa:16:3e:00:00:06", PORTS[0].ip, 24, "10.0.0.1")
    with pytest.raises(LabError, match="used by both"):
        lab.up([PORTS[0], twin])
    outside = LabPort("tapd0000007-07", "fa:16:3e:00:00:07", "203.0.113.7", 24, "203.0.113.1")
    with pytest.raises(LabError, match="external"):
        lab.up([outside])
    assert not lab.exists()


# --------------------------------------------------------------------------- IPv6

DUAL = (
    LabPort("tape0000001-01", "fa:16:3e:00:01:01", "10.6.0.3", 24, "10.6.0.1", "v6 one",
            ip6="2001:db8:6::3", prefixlen6=64, gateway6="2001:db8:6::1"),
    LabPort("tape0000002-02", "fa:16:3e:00:01:02", "10.6.0.4", 24, "10.6.0.1", "v6 two",
            ip6="2001:db8:6::4", prefixlen6=64, gateway6="2001:db8:6::1"),
)


def test_ipv6_wiring_and_traffic(lab: Lab) -> None:
    """Dual-stack ports: the instance's address is usable at once (nodad), the host
    has a /128 route, a permanent neighbour entry and a proxy entry for gateway6 on
    the tap, gateway6 sits on sfw-gw; instances reach each other (through the
    gateway, same subnet included) and the external side over IPv6."""
    lab.up(DUAL)
    one, two = DUAL
    assert one.ip6 and two.ip6
    with IPRoute(netns=lab.host_ns, flags=0) as host:
        index = host.link_lookup(ifname=one.tap)[0]
        routes = {r.get_attr("RTA_DST") for r in host.get_routes(family=10, oif=index)}
        assert one.ip6 in routes
        neighbours = {(n.get_attr("NDA_DST"), n["state"]) for n in host.get_neighbours(
            family=10, ifindex=index)}
        assert (one.ip6, 0x80) in neighbours  # NUD_PERMANENT
        gw = host.link_lookup(ifname=lab_module.GW_LINK)[0]
        assert "2001:db8:6::1" in {a.get_attr("IFA_ADDRESS") for a in host.get_addr(
            family=10, index=gw)}
    assert nt.ping_replies(lab.instance_ns(one.tap), two.ip6, 3, 1.0, 0.05) > 0
    assert nt.ping_replies(lab.instance_ns(one.tap), Lab.external_address6, 3, 1.0, 0.05) > 0
    with nt.listen(lab.instance_ns(two.tap), "tcp", 8080):
        assert nt.tcp_connect(lab.external_ns, two.ip6, 8080, 1.0)
        assert nt.tcp_connect(lab.instance_ns(one.tap), two.ip, 8080, 1.0)  # dual-stack
    lab.up(DUAL)  # idempotent with IPv6 too
    assert nt.ping_replies(lab.instance_ns(two.tap), one.ip6, 2, 1.0, 0.05) > 0


def test_an_ipv6_address_change_rebuilds_the_port(lab: Lab) -> None:
    lab.up(DUAL)
    moved = replace(DUAL[0], ip6="2001:db8:6::30")
    lab.up([moved, DUAL[1]])
    with IPRoute(netns=lab.instance_ns(moved.tap), flags=0) as inst:
        assert {a.get_attr("IFA_ADDRESS") for a in inst.get_addr(family=10)} >= {
            "2001:db8:6::30"}
    assert nt.ping_replies(lab.instance_ns(DUAL[1].tap), "2001:db8:6::30", 3, 1.0, 0.05) > 0


# --------------------------------------------------------------------------- probe tools


def test_spoofed_icmp_from_outside_arrives(up_lab: Lab) -> None:
    from scapy.layers.inet import ICMP, IP

    target = PORTS[1]
    packet = IP(src="192.0.2.77", dst=target.ip) / ICMP(type=3, code=13)
    seen = nt.send_and_sniff(
        packet,
        src_ns=up_lab.external_ns,
        dst_ns=up_lab.instance_ns(target.tap),
        bpf="icmp and src host 192.0.2.77",
    )
    assert seen is not None
    assert seen[ICMP].type == 3 and seen[ICMP].code == 13
    missed = nt.send_and_sniff(
        packet,
        src_ns=up_lab.external_ns,
        dst_ns=up_lab.instance_ns(PORTS[0].tap),
        bpf="icmp and src host 192.0.2.77",
        timeout=0.2,
    )
    assert missed is None


def test_spoofed_mac_from_an_instance_reaches_its_tap(up_lab: Lab) -> None:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether

    frame = (
        Ether(src="fa:16:3e:99:99:99", dst="ff:ff:ff:ff:ff:ff")
        / IP(src=PORTS[0].ip, dst=PORTS[2].ip)
        / ICMP()
    )
    seen = nt.send_and_sniff(
        frame,
        src_ns=up_lab.instance_ns(PORTS[0].tap),
        dst_ns=up_lab.host_ns,
        sniff_iface=PORTS[0].tap,
        match=lambda p: p.src == "fa:16:3e:99:99:99",
    )
    assert seen is not None


def test_probes_refuse_non_lab_namespaces_and_bad_input(up_lab: Lab) -> None:
    from scapy.layers.inet import IP

    with pytest.raises(LabError):
        nt.tcp_connect("default", PORTS[0].ip, 22)
    with pytest.raises(LabError):
        nt.ping("sfw-does-not-exist", PORTS[0].ip)
    with pytest.raises(LabError):
        run_in_netns(f"{up_lab.host_ns}/../../../proc/1/ns/net", lambda: None)
    with pytest.raises(LabError, match="BPF"):
        nt.send_and_sniff(
            IP(dst=PORTS[0].ip),
            src_ns=up_lab.external_ns,
            dst_ns=up_lab.host_ns,
            bpf="no such ((filter",
        )
    with pytest.raises(LabError):
        nt.send_and_sniff(
            cast(Any, object()), src_ns=up_lab.external_ns, dst_ns=up_lab.host_ns, timeout=0.1
        )


def test_listeners_stop_and_do_not_leak(up_lab: Lab) -> None:
    ns = up_lab.instance_ns(PORTS[0].tap)
    threads = threading.active_count()
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with nt.listen(ns, "tcp", 9000), nt.listen(ns, "udp", 9000):
            pass
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/fd")) <= fds
    with nt.listen(ns, "udp", 9001), pytest.raises(LabError, match="cannot listen"):
        nt.Listener(ns, "udp", 9001)


def test_allowed_probes_are_fast(up_lab: Lab) -> None:
    a, c = up_lab.instance_ns(PORTS[0].tap), up_lab.instance_ns(PORTS[2].tap)
    probes: dict[str, Callable[[], bool]] = {
        "tcp": lambda: nt.tcp_connect(a, PORTS[2].ip, 8080),
        "udp": lambda: nt.udp_probe(a, c, PORTS[2].ip, 5353),
        "ping": lambda: nt.ping(a, PORTS[2].ip),
    }
    timings: dict[str, list[float]] = {name: [] for name in probes}
    with nt.listen(c, "tcp", 8080), nt.listen(c, "udp", 5353):
        nt.tcp_connect(a, PORTS[2].ip, 8080)  # warm the neighbour caches
        for _ in range(50):
            for name, probe in probes.items():
                started = time.perf_counter()
                assert probe()
                timings[name].append(time.perf_counter() - started)
    for name, values in timings.items():
        assert statistics.median(values) < 0.05, name

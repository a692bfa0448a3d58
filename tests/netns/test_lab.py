"""The namespace lab and its probes, with real packets and NO firewall loaded.

Every test builds its own lab under a unique host name (so concurrent runs cannot
collide) and tears it down in the fixture, whatever happens.
"""

from __future__ import annotations

import hashlib
import json
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

from secfw.errors import LabError
from secfw.lab import hostlab as lab_module
from secfw.lab import netns_tools as nt
from secfw.lab.hostlab import Lab, LabPort, netns_exists, run_in_netns

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

MALICIOUS = '"; rm -rf / #'
#: unique per run: two runs at once (xdist workers, other checkouts) must not share it
UNRELATED_NS = f"sfw-unrelated-{uuid.uuid4().hex[:8]}"

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
    # Nobody there: the probe ends on its own timeout rather than hanging. The
    # bound only tells "ended" from "hung" — generous, so that a loaded machine's
    # late scheduling of this thread is not taken for a hang.
    started = time.monotonic()
    assert not nt.ping(a, "10.0.0.99", timeout=0.3)
    assert time.monotonic() - started < 10.0


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


# --------------------------------------------------------------------------- bridged topology

#: Two ports on 10.7.0.0/24 (one bridge), one on 10.8.0.0/24 (another); dual-stack.
BRIDGED = (
    LabPort("tapf0000001-01", "fa:16:3e:00:02:01", "10.7.0.3", 24, "10.7.0.1", "br 'one'",
            ip6="2001:db8:7::3", prefixlen6=64, gateway6="2001:db8:7::1"),
    LabPort("tapf0000002-02", "fa:16:3e:00:02:02", "10.7.0.4", 24, "10.7.0.1", MALICIOUS,
            ip6="2001:db8:7::4", prefixlen6=64, gateway6="2001:db8:7::1"),
    LabPort("tapf0000003-03", "fa:16:3e:00:02:03", "10.8.0.5", 24, "10.8.0.1", "br three",
            ip6="2001:db8:8::5", prefixlen6=64, gateway6="2001:db8:8::1"),
)
NET_A, NET_B = "10.7.0.0/24", "10.8.0.0/24"
NUD_PERMANENT = 0x80
IFF_UP = 0x1


@pytest.fixture
def bridged(tmp_path: Path) -> Iterator[Lab]:
    """A bridged lab of BRIDGED for a unique host, always brought down afterwards."""
    the_lab = Lab(f"test-host-{uuid.uuid4().hex[:8]}", tmp_path / "state", topology="bridged")
    try:
        the_lab.up(BRIDGED)
        yield the_lab
    finally:
        the_lab.down()


def ns_of(lab: Lab, port: LabPort) -> str:
    return lab.instance_ns(port.tap)


def links_by_name(ns: str) -> dict[str, Any]:
    with IPRoute(netns=ns, flags=0) as ipr:
        return {ln.get("ifname"): ln for ln in ipr.link("dump")}


def addresses(ns: str) -> set[tuple[str, str, int]]:
    """(ifname, address, prefixlen) of every address in ``ns``, link-local excluded."""
    with IPRoute(netns=ns, flags=0) as ipr:
        names = {ln["index"]: ln.get("ifname") for ln in ipr.link("dump")}
        return {(names[a["index"]], a.get("IFA_ADDRESS"), a["prefixlen"])
                for a in ipr.addr("dump") if not a.get("IFA_ADDRESS").startswith("fe80:")}


def bridge_settings(link: Any) -> dict[str, int]:
    data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
    return {k: data.get_attr(f"IFLA_BR_{k.upper()}")
            for k in ("stp_state", "mcast_snooping", "forward_delay")}


def fdb(lab: Lab) -> dict[str, int]:
    """MAC → index of the bridge port the host namespace's bridges learned it on."""
    with IPRoute(netns=lab.host_ns, flags=0) as host:
        return {n.get("NDA_LLADDR"): n["ifindex"] for n in host.fdb("dump")
                if n.get("NDA_MASTER") is not None}


def bridged_snapshot(lab: Lab, ports: tuple[LabPort, ...] = BRIDGED) -> dict[str, Any]:
    """Links (index, master, up), addresses and routes of the host, router (if any) and
    external namespaces, each instance's eth0 index, and the state file.

    IPv6 link-local addresses and their routes are left out: the kernel adds them
    on its own, some time after an interface's carrier comes up.
    """
    snap: dict[str, Any] = {"state": lab.state_file.read_text()}
    for ns in (lab.host_ns, lab.router_ns, lab.external_ns):
        if not netns_exists(ns):  # no router namespace with the gateway on the bridge
            continue
        with IPRoute(netns=ns, flags=0) as ipr:
            snap[ns] = {
                "links": sorted((ln.get("ifname"), ln["index"], ln.get("master") or 0,
                                 ln["flags"] & IFF_UP) for ln in ipr.link("dump")),
                "addrs": sorted((a.get("IFA_ADDRESS"), a["prefixlen"], a["index"])
                                for a in ipr.addr("dump")
                                if not a.get("IFA_ADDRESS").startswith("fe80:")),
                "routes": sorted((r["family"], str(r.get("RTA_DST")), r["dst_len"],
                                  r.get("RTA_OIF") or 0, str(r.get("RTA_GATEWAY")))
                                 for r in ipr.route("dump")
                                 if not str(r.get("RTA_DST")).startswith("fe80:")),
            }
    for port in ports:
        with IPRoute(netns=ns_of(lab, port), flags=0) as inst:
            snap[port.tap] = inst.link_lookup(ifname="eth0")
    return snap


def test_bridged_names_are_deterministic_short_and_not_taps() -> None:
    digest = hashlib.sha256(NET_A.encode()).hexdigest()[:8]
    assert lab_module.bridge_name(NET_A) == f"sfwbr{digest}"
    assert lab_module.router_leg_names(NET_A) == (f"sfwrl{digest}", f"sfwgw{digest}")
    names = [lab_module.bridge_name(n) for n in (NET_A, NET_B)]
    names += [leg for n in (NET_A, NET_B) for leg in lab_module.router_leg_names(n)]
    assert len(set(names)) == 6
    assert all(len(n) <= 15 and not n.startswith("tap") for n in names)
    lab = Lab("some host", Path("/nonexistent"), topology="bridged")
    assert lab.router_ns == f"sfw-r-{hashlib.sha256(b'some host').hexdigest()[:8]}"
    assert lab.topology == "bridged" and Lab("h", Path("/nonexistent")).topology == "routed"


def test_bridged_host_namespace_only_bridges(bridged: Lab) -> None:
    host = links_by_name(bridged.host_ns)
    for network in (NET_A, NET_B):
        bridge = host[lab_module.bridge_name(network)]
        assert bridge.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "bridge"
        assert bridge_settings(bridge) == {"stp_state": 0, "mcast_snooping": 0,
                                           "forward_delay": 0}
        assert bridge["flags"] & IFF_UP
        leg, _ = lab_module.router_leg_names(network)
        assert host[leg].get("master") == bridge["index"]
    for port in BRIDGED:  # each tap is a port of its network's bridge
        bridge = host[lab_module.bridge_name(str(port.network))]
        assert host[port.tap].get("master") == bridge["index"]
        assert host[port.tap]["flags"] & IFF_UP
    # No addresses (not even IPv6 link-local), routes or neighbour entries besides lo's.
    with IPRoute(netns=bridged.host_ns, flags=0) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        assert {a["index"] for a in ipr.addr("dump")} == {lo}
        assert all(r.get("RTA_OIF") == lo for r in ipr.route("dump", table=254))
        assert not [n for n in ipr.neigh("dump") if n["state"] == NUD_PERMANENT
                    and n["family"] in (2, 10)]
    assert bridged.networks() == [NET_A, NET_B]
    assert bridged.taps() == sorted(p.tap for p in BRIDGED)


def test_bridged_router_and_instances_wiring(bridged: Lab) -> None:
    gw_a, gw_b = (lab_module.router_leg_names(n)[1] for n in (NET_A, NET_B))
    assert {
        (gw_a, "10.7.0.1", 24), (gw_a, "2001:db8:7::1", 64),
        (gw_b, "10.8.0.1", 24), (gw_b, "2001:db8:8::1", 64),
        ("sfw-ext", "203.0.113.1", 24), ("sfw-ext", "198.51.100.1", 24),
        ("sfw-ext", "2001:db8:ffff::1", 64),
    } <= addresses(bridged.router_ns)
    sysctls = {"net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "1",
               "net/ipv4/conf/all/rp_filter": "0", f"net/ipv4/conf/{gw_a}/rp_filter": "0"}
    for key, value in sysctls.items():
        assert run_in_netns(bridged.router_ns, Path("/proc/sys", key).read_text).strip() == value
    one = BRIDGED[0]
    assert addresses(ns_of(bridged, one)) >= {("eth0", one.ip, 24), ("eth0", one.ip6, 64)}
    with IPRoute(netns=ns_of(bridged, one), flags=0) as inst:
        eth0 = inst.link_lookup(ifname="eth0")[0]
        assert inst.link("get", index=eth0)[0].get("address") == one.mac
        routes = {(r.get("RTA_DST"), r["dst_len"], r.get("RTA_GATEWAY"))
                  for r in inst.route("dump", table=254)}
        # on-link prefix routes (same-subnet peers are neighbours) and default routes
        assert {("10.7.0.0", 24, None), (None, 0, "10.7.0.1"),
                ("2001:db8:7::", 64, None), (None, 0, "2001:db8:7::1")} <= routes


def test_bridged_same_subnet_traffic_stays_at_layer_2(bridged: Lab) -> None:
    """Same-subnet instances talk through the bridge: both MACs are learned on their
    taps, TTL is not decremented, and the router's leg never sees the packet."""
    one, two, _ = BRIDGED
    a, b = ns_of(bridged, one), ns_of(bridged, two)
    assert nt.ping(a, two.ip) and nt.ping(b, one.ip)
    with nt.listen(b, "tcp", 8080), nt.listen(b, "udp", 5353):
        assert nt.tcp_connect(a, two.ip, 8080)
        assert nt.udp_probe(a, b, two.ip, 5353)
    host = links_by_name(bridged.host_ns)
    learned = fdb(bridged)
    assert learned.get(one.mac) == host[one.tap]["index"]
    assert learned.get(two.mac) == host[two.tap]["index"]

    from scapy.layers.inet import ICMP, IP

    packet = IP(src=one.ip, dst=two.ip, ttl=64) / ICMP(id=0x5F1)
    bpf = f"icmp and src host {one.ip} and dst host {two.ip}"
    seen = nt.send_and_sniff(packet, src_ns=a, dst_ns=b, bpf=bpf)
    assert seen is not None and seen[IP].ttl == 64  # not routed
    leg = lab_module.router_leg_names(NET_A)[1]
    assert nt.send_and_sniff(packet, src_ns=a, dst_ns=bridged.router_ns, sniff_iface=leg,
                             bpf=bpf, timeout=0.3) is None


def test_bridged_cross_network_traffic_goes_through_the_router(bridged: Lab) -> None:
    one, _, three = BRIDGED
    a, c = ns_of(bridged, one), ns_of(bridged, three)
    assert nt.ping(a, three.ip) and nt.ping(c, one.ip)
    for src, dst, dst_ip in ((a, c, three.ip), (c, a, one.ip)):
        with nt.listen(dst, "tcp", 8080), nt.listen(dst, "udp", 5353):
            assert nt.tcp_connect(src, dst_ip, 8080), (src, dst_ip)
            assert nt.udp_probe(src, dst, dst_ip, 5353), (src, dst_ip)

    from scapy.layers.inet import ICMP, IP

    packet = IP(src=one.ip, dst=three.ip, ttl=64) / ICMP(id=0x5F2)
    bpf = f"icmp and src host {one.ip} and dst host {three.ip}"
    seen = nt.send_and_sniff(packet, src_ns=a, dst_ns=c, bpf=bpf)
    assert seen is not None and seen[IP].ttl == 63  # routed once
    leg = lab_module.router_leg_names(NET_A)[1]
    assert nt.send_and_sniff(packet, src_ns=a, dst_ns=bridged.router_ns, sniff_iface=leg,
                             bpf=bpf) is not None


def test_bridged_instances_reach_the_external_namespace_and_back(bridged: Lab) -> None:
    ext = bridged.external_ns
    for port in BRIDGED:
        inst = ns_of(bridged, port)
        for external in (*Lab.external_addresses, Lab.external_address6):
            assert nt.ping(inst, external), (port.tap, external)
        assert port.ip6
        assert nt.ping(ext, port.ip) and nt.ping(ext, port.ip6), port.tap
    one = BRIDGED[0]
    with nt.listen(ext, "tcp", 8080), nt.listen(ext, "udp", 5353):
        assert nt.tcp_connect(ns_of(bridged, one), Lab.external_addresses[0], 8080)
        assert nt.tcp_connect(ns_of(bridged, one), Lab.external_address6, 8080)
        assert nt.udp_probe(ns_of(bridged, one), ext, Lab.external_addresses[1], 5353)
    with nt.listen(ns_of(bridged, one), "tcp", 8080):
        assert nt.tcp_connect(ext, one.ip, 8080)
        assert one.ip6 and nt.tcp_connect(ext, one.ip6, 8080)


def test_bridged_ipv6_same_subnet_and_through_the_router(bridged: Lab) -> None:
    """IPv6 neighbour discovery works through the bridges (multicast flooded); a frame
    to a same-subnet peer's MAC arrives unrouted (hop limit 64) and never reaches the
    router, a frame to the router's MAC for another network arrives routed (63)."""
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Ether

    one, two, three = BRIDGED
    assert one.ip6 and two.ip6 and three.ip6
    a, b, c = (ns_of(bridged, p) for p in BRIDGED)
    assert nt.ping_replies(a, two.ip6, 3, 1.0, 0.05) > 0
    assert nt.ping_replies(a, three.ip6, 3, 1.0, 0.05) > 0
    assert nt.ping_replies(c, two.ip6, 3, 1.0, 0.05) > 0
    with nt.listen(b, "tcp", 8080), nt.listen(c, "tcp", 8080):
        assert nt.tcp_connect(a, two.ip6, 8080)
        assert nt.tcp_connect(a, three.ip6, 8080)

    gw_leg = lab_module.router_leg_names(NET_A)[1]
    router_mac = links_by_name(bridged.router_ns)[gw_leg].get("address")
    for dst, dst_mac, dst_ns, hop_limit in ((two, two.mac, b, 64), (three, router_mac, c, 63)):
        frame = (Ether(src=one.mac, dst=dst_mac)
                 / IPv6(src=one.ip6, dst=dst.ip6, hlim=64) / ICMPv6EchoRequest(id=0x5F3))
        bpf = f"icmp6 and src host {one.ip6} and dst host {dst.ip6}"
        seen = nt.send_and_sniff(frame, src_ns=a, dst_ns=dst_ns, bpf=bpf)
        assert seen is not None and seen[IPv6].hlim == hop_limit, dst.tap
    same_subnet = (Ether(src=one.mac, dst=two.mac)
                   / IPv6(src=one.ip6, dst=two.ip6) / ICMPv6EchoRequest(id=0x5F4))
    assert nt.send_and_sniff(same_subnet, src_ns=a, dst_ns=bridged.router_ns,
                             sniff_iface=gw_leg,
                             bpf=f"icmp6 and ip6[40] == 128 and dst host {two.ip6}",
                             timeout=0.3) is None


def test_bridged_up_again_changes_nothing(bridged: Lab) -> None:
    before = bridged_snapshot(bridged)
    bridged.up(BRIDGED)
    assert bridged_snapshot(bridged) == before
    assert nt.ping(ns_of(bridged, BRIDGED[0]), BRIDGED[2].ip)


def test_bridged_removing_ports_and_networks(bridged: Lab) -> None:
    one, two, three = BRIDGED
    bridge_b, (leg_b, gw_b) = lab_module.bridge_name(NET_B), lab_module.router_leg_names(NET_B)
    bridged.up([one, two])  # 10.8.0.0/24 has no port any more: its bridge and leg go
    assert not netns_exists(ns_of(bridged, three))
    host, router = links_by_name(bridged.host_ns), links_by_name(bridged.router_ns)
    assert three.tap not in host and bridge_b not in host and leg_b not in host
    assert gw_b not in router
    assert lab_module.bridge_name(NET_A) in host
    assert bridged.networks() == [NET_A]
    assert nt.ping(ns_of(bridged, one), two.ip)
    assert not nt.ping(ns_of(bridged, one), three.ip, timeout=0.2)

    bridged.up([one])  # a port goes, its network stays
    host = links_by_name(bridged.host_ns)
    assert two.tap not in host and lab_module.bridge_name(NET_A) in host
    assert not netns_exists(ns_of(bridged, two))
    assert nt.ping(ns_of(bridged, one), Lab.external_addresses[0])

    bridged.up(BRIDGED)  # and they come back
    assert bridged.networks() == [NET_A, NET_B]
    assert nt.ping(ns_of(bridged, one), three.ip) and nt.ping(ns_of(bridged, one), two.ip)


def test_bridged_moving_a_port_to_another_network(bridged: Lab) -> None:
    one, two, three = BRIDGED
    moved = replace(three, ip="10.7.0.9", gateway="10.7.0.1", ip6="2001:db8:7::9",
                    gateway6="2001:db8:7::1")
    bridged.up([one, two, moved])
    host = links_by_name(bridged.host_ns)
    assert host[moved.tap].get("master") == host[lab_module.bridge_name(NET_A)]["index"]
    assert lab_module.bridge_name(NET_B) not in host
    assert nt.ping(ns_of(bridged, one), moved.ip)
    assert nt.ping_replies(ns_of(bridged, one), "2001:db8:7::9", 3, 1.0, 0.05) > 0


def test_bridged_up_repairs_what_was_deleted_behind_its_back(bridged: Lab) -> None:
    one, _, three = BRIDGED
    with IPRoute(netns=bridged.host_ns, flags=0) as host:  # its taps lose their master
        host.link("del", index=host.link_lookup(ifname=lab_module.bridge_name(NET_A))[0])
    netns.remove(bridged.router_ns)  # every leg and the external link go with it
    netns.remove(ns_of(bridged, three))
    bridged.up(BRIDGED)
    assert nt.ping(ns_of(bridged, one), three.ip)
    assert nt.ping(ns_of(bridged, one), BRIDGED[1].ip)
    assert nt.ping(bridged.external_ns, one.ip)


def test_bridged_down_leaves_nothing(bridged: Lab, unrelated_ns: str) -> None:
    created = {bridged.host_ns, bridged.router_ns, bridged.external_ns}
    created |= {ns_of(bridged, p) for p in BRIDGED}
    assert all(netns_exists(ns) for ns in created)
    bridged.down()
    digest = bridged.host_ns.rsplit("-", 1)[1]
    assert not [n for n in os.listdir(lab_module.NETNS_DIR)
                if n.startswith("sfw-") and digest in n]
    assert netns_exists(unrelated_ns)
    assert not bridged.exists()
    with IPRoute() as root:  # the lab never creates anything in the root namespace
        names = {ln.get("ifname") for ln in root.link("dump")}
    assert not [n for n in names if n.startswith(("sfwbr", "sfwrl", "sfwgw"))]
    assert not names & {p.tap for p in BRIDGED}
    bridged.down()  # again: a no-op


def test_bridged_down_after_a_failed_up_removes_what_was_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab(f"test-host-{uuid.uuid4().hex[:8]}", tmp_path / "state", topology="bridged")
    real = lab_module._sync_leg_addresses
    calls = []

    def fail_on_second_network(router: Any, index: int, wanted: Any) -> None:
        calls.append(index)
        if len(calls) == 2:
            raise OSError(5, "injected failure")
        real(router, index, wanted)

    monkeypatch.setattr(lab_module, "_sync_leg_addresses", fail_on_second_network)
    try:
        with pytest.raises(LabError, match="injected failure"):
            lab.up(BRIDGED)
        assert netns_exists(lab.router_ns) and lab.exists()
    finally:
        lab.down()
    assert not any(netns_exists(ns) for ns in (lab.host_ns, lab.router_ns, lab.external_ns))
    assert not lab.exists()


def test_a_lab_keeps_its_topology_until_down(lab: Lab) -> None:
    lab.up(PORTS[:1])
    before = snapshot_links(lab.host_ns)
    other = Lab(lab.host, lab.state_dir, topology="bridged")
    with pytest.raises(LabError, match=r"routed topology.*lab down") as error:
        other.up(BRIDGED)
    assert "\n" not in str(error.value)
    assert snapshot_links(lab.host_ns) == before and not netns_exists(other.router_ns)
    assert nt.ping(lab.external_ns, PORTS[0].ip)  # still the routed lab, untouched
    lab.down()
    other.up(BRIDGED[:1])  # after down, the other topology is fine
    with pytest.raises(LabError, match=r"bridged topology.*lab down"):
        lab.up(PORTS[:1])
    other.down()


def snapshot_links(ns: str) -> list[tuple[str, int]]:
    with IPRoute(netns=ns, flags=0) as ipr:
        return sorted((ln.get("ifname"), ln["index"]) for ln in ipr.link("dump"))


def test_a_state_file_without_a_topology_is_routed(up_lab: Lab) -> None:
    data = json.loads(up_lab.state_file.read_text())
    for key in ("topology", "networks"):  # as written before the bridged topology existed
        del data[key]
    up_lab.state_file.write_text(json.dumps(data))
    before = snapshot(up_lab)
    up_lab.up(PORTS)
    assert snapshot(up_lab) == before
    with pytest.raises(LabError, match="lab down"):
        Lab(up_lab.host, up_lab.state_dir, topology="bridged").up(PORTS)


@pytest.mark.parametrize("topology", ["ovs", "", "Bridged", "routed "])
def test_an_unknown_topology_is_rejected(tmp_path: Path, topology: str) -> None:
    with pytest.raises(LabError, match="unknown topology") as error:
        Lab("test-host", tmp_path, topology=topology)
    assert "\n" not in str(error.value) and "routed, bridged" in str(error.value)


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        ([BRIDGED[0], replace(BRIDGED[1], gateway="10.7.0.254")], "disagree on the gateway"),
        ([BRIDGED[0], replace(BRIDGED[1], gateway6="2001:db8:7::fe")], "IPv6 gateway"),
        ([BRIDGED[0], LabPort("tapf0000009-09", "fa:16:3e:00:02:09", "10.7.1.9", 16, "10.7.0.1")],
         "overlap"),
        ([BRIDGED[0], replace(BRIDGED[2], ip6="2001:db8:7::5", gateway6="2001:db8:7::1")],
         "is on both"),
        ([BRIDGED[0], replace(BRIDGED[2], ip6="2001:db8:7:0:1::5", prefixlen6=80,
                              gateway6="2001:db8:7:0:1::1")], "overlap"),
    ],
)
def test_bridged_rejects_inconsistent_networks(
    tmp_path: Path, ports: list[LabPort], message: str
) -> None:
    lab = Lab(f"test-host-{uuid.uuid4().hex[:8]}", tmp_path / "state", topology="bridged")
    try:
        with pytest.raises(LabError, match=message):
            lab.up(ports)
        assert not lab.exists()
    finally:
        lab.down()


def test_cli_lab_up_sync_down_with_a_topology(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = f"test-host-{uuid.uuid4().hex[:8]}"
    env: dict[str, str | None] = {"SECFW_LAB_DIR": str(tmp_path / "lab"), "SECFW_TOPOLOGY": None}
    cli.ok("net-create", "public", "10.9.0.0/24")
    cli.ok("image-create", "cirros", "--visibility", "public")
    cli.ok("boot", "vm1", "--flavor", "m1.tiny", "--image", "cirros", "--nic", "net-id=public",
           "--host", host)
    lab = Lab(host, tmp_path / "lab", topology="bridged")
    try:
        out = cli.ok("lab", "up", "--host", host, "--topology", "bridged", env=env)
        assert lab.router_ns in out and "bridged" in out and "1 instance(s)" in out
        assert netns_exists(lab.router_ns) and len(lab.taps()) == 1
        (spec,) = json.loads(lab.state_file.read_text())["ports"].values()
        assert nt.ping(lab.external_ns, spec["ip"])
        cli.ok("lab", "sync", "--host", host, "--topology", "bridged", env=env)
        assert "lab down" in cli.fails("lab", "sync", "--host", host, env=env)  # routed
        assert "--topology" in cli.run("lab", "up", "--help").stdout
    finally:
        cli.ok("lab", "down", "--host", host, env=env)
    assert not netns_exists(lab.router_ns) and not lab.exists()


# --------------------------------------------------------------------------- gateway on the bridge


@pytest.fixture
def gateway_lab(tmp_path: Path) -> Iterator[Lab]:
    """A bridged lab of BRIDGED with the gateways on the host's bridges."""
    the_lab = Lab(f"test-host-{uuid.uuid4().hex[:8]}", tmp_path / "state", topology="bridged",
                  gateway_on_bridge=True)
    try:
        the_lab.up(BRIDGED)
        yield the_lab
    finally:
        the_lab.down()


def test_gateway_on_bridge_host_routes_between_its_bridges(gateway_lab: Lab) -> None:
    """The host namespace holds the gateways on the bridges (no router namespace,
    no legs) and routes: to and from the external namespace and between the two
    networks, IPv4 and IPv6; same-subnet peers talk through the bridge."""
    lab = gateway_lab
    assert not netns_exists(lab.router_ns)
    bridge_a, bridge_b = lab_module.bridge_name(NET_A), lab_module.bridge_name(NET_B)
    assert {a for a in addresses(lab.host_ns) if a[0].startswith("sfwbr")} == {
        (bridge_a, "10.7.0.1", 24), (bridge_a, "2001:db8:7::1", 64),
        (bridge_b, "10.8.0.1", 24), (bridge_b, "2001:db8:8::1", 64)}
    host = links_by_name(lab.host_ns)
    assert not any(name.startswith(lab_module.LEG_PREFIX) for name in host)
    assert host[BRIDGED[0].tap].get("master") == host[bridge_a]["index"]
    assert nt.ping(lab.external_ns, BRIDGED[0].ip)
    assert nt.ping(lab.external_ns, str(BRIDGED[2].address6))
    assert nt.ping(ns_of(lab, BRIDGED[2]), BRIDGED[0].ip)  # routed by the host
    assert nt.ping(ns_of(lab, BRIDGED[0]), BRIDGED[1].ip)  # bridged
    before = bridged_snapshot(lab)
    lab.up(BRIDGED)  # idempotent
    assert bridged_snapshot(lab) == before


def test_gateway_on_bridge_is_a_layout_a_lab_keeps(gateway_lab: Lab) -> None:
    """A lab built with the gateway on the bridge refuses the router layout and the
    other way round, until it is brought down; down removes everything."""
    other = Lab(gateway_lab.host, gateway_lab.state_dir, topology="bridged")
    with pytest.raises(LabError, match=r"gateway on the bridge, not the bridged topology;"):
        other.up(BRIDGED)
    gateway_lab.down()
    assert not any(netns_exists(ns) for ns in lab_namespaces(gateway_lab, BRIDGED))
    other.up(BRIDGED[:1])
    with pytest.raises(LabError, match=r"bridged topology, not the bridged topology with"):
        gateway_lab.up(BRIDGED[:1])
    other.down()


def test_gateway_on_bridge_needs_the_bridged_topology(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="bridged topology"):
        Lab("test-host", tmp_path, gateway_on_bridge=True)


def test_cli_lab_up_with_the_gateway_on_the_bridge(cli: Any, tmp_path: Path) -> None:
    host = f"test-host-{uuid.uuid4().hex[:8]}"
    env: dict[str, str | None] = {"SECFW_LAB_DIR": str(tmp_path / "lab"), "SECFW_TOPOLOGY": None}
    cli.ok("net-create", "public", "10.9.0.0/24")
    cli.ok("image-create", "cirros", "--visibility", "public")
    cli.ok("boot", "vm1", "--flavor", "m1.tiny", "--image", "cirros", "--nic", "net-id=public",
           "--host", host)
    lab = Lab(host, tmp_path / "lab", topology="bridged", gateway_on_bridge=True)
    try:
        out = cli.ok("lab", "up", "--host", host, "--topology", "bridged",
                     "--gateway-on-bridge", env=env)
        assert "gateway on the bridge" in out and lab.router_ns not in out
        assert not netns_exists(lab.router_ns) and len(lab.taps()) == 1
        (spec,) = json.loads(lab.state_file.read_text())["ports"].values()
        assert nt.ping(lab.external_ns, spec["ip"])
        assert "lab down" in cli.fails("lab", "sync", "--host", host, "--topology", "bridged",
                                       env=env)  # without the flag: the router layout
        assert "bridged topology" in cli.fails("lab", "up", "--host", host,
                                               "--gateway-on-bridge", env=env)  # routed
    finally:
        cli.ok("lab", "down", "--host", host, env=env)
    assert not lab.exists()

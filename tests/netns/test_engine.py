"""The engine end to end, with real packets: store → compiler → nftables → kernel.

Each test builds a small cloud with the Python API, brings up the namespace lab of
its compute host, runs the agent (one in-process pass inside the lab's host
namespace per ``cloud.sync()``) and then sends real TCP connections, UDP datagrams
and ICMP echoes — or crafted packets with scapy where a type, a code or a spoofed
source matters — and asserts what gets through. Every "blocked" assertion has an
"allowed" counterpart in the same setup, so a firewall that drops (or passes)
everything fails the test.

Scenario numbers refer to the test plan of the engine (see the module's functions).
"""

from __future__ import annotations

import os

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]

EXT = "external"  # the lab's external namespace (203.0.113.10)
NET_A, NET_B, NET_C = "net-a", "net-b", "net-c"


def make_networks(cloud, count: int = 3, project: str = "p") -> None:
    """Flat networks net-a 10.1.0.0/24, net-b 10.2.0.0/24, net-c 10.3.0.0/24."""
    for i, name in enumerate((NET_A, NET_B, NET_C)[:count], start=1):
        cloud.api.net_create(project, name, f"10.{i}.0.0/24")


def make_global_http(cloud, project: str = "p") -> None:
    """The guide's ``global_http``: tcp 80 and tcp 443 from 0.0.0.0/0."""
    cloud.api.secgroup_create(project, "global_http", "allow web traffic from the internet")
    cloud.api.secgroup_add_rule(project, "global_http", "tcp", "80", "80", "0.0.0.0/0")
    cloud.api.secgroup_add_rule(project, "global_http", "tcp", "443", "443", "0.0.0.0/0")


# --------------------------------------------------------------------------- 1


def test_default_group_blocks_all_ingress_but_egress_and_replies_work(cloud):
    """Scenario 1: the ``default`` group denies every incoming TCP/UDP/ICMP flow, from
    outside and from an instance on another network, while the instance's own
    connections out (and their replies) work."""
    make_networks(cloud, 2)
    cloud.boot("vm", net=NET_A)
    cloud.boot("other", net=NET_B, project="q")
    cloud.sync()

    for src in (EXT, "other"):
        assert not cloud.tcp(src, "vm", 22), src
        assert not cloud.tcp(src, "vm", 80), src
        assert not cloud.udp(src, "vm", 53), src
        assert not cloud.ping(src, "vm"), src
    # Egress is open and replies come back: the same pairs work the other way round.
    assert cloud.tcp("vm", EXT, 8080)
    assert cloud.udp("vm", EXT, 53)
    assert cloud.ping("vm", EXT)
    assert cloud.tcp("other", EXT, 22)  # "other" is not mute: its traffic to vm was dropped


# --------------------------------------------------------------------------- 2


def test_global_http_opens_80_and_443_only(cloud):
    """Scenario 2: the guide's ``global_http`` lets 80 and 443 in from the internet and
    nothing else (not 22, not 8080, not udp/80, not ICMP)."""
    make_networks(cloud, 1)
    make_global_http(cloud)
    cloud.boot("web", ["global_http"], NET_A)
    cloud.sync()

    assert cloud.tcp(EXT, "web", 80)
    assert cloud.tcp(EXT, "web", 443)
    assert not cloud.tcp(EXT, "web", 22)
    assert not cloud.tcp(EXT, "web", 8080)
    assert not cloud.udp(EXT, "web", 80)
    assert not cloud.ping(EXT, "web")


# --------------------------------------------------------------------------- 3


def test_port_ranges_are_exact_at_both_ends(cloud):
    """Scenario 3: ``tcp 1000 1010`` opens exactly 1000..1010 (999 and 1011 stay shut);
    ``udp 2000 2010`` likewise for UDP — and neither opens the other protocol."""
    make_networks(cloud, 1)
    cloud.api.secgroup_create("p", "ranges", "port ranges")
    cloud.api.secgroup_add_rule("p", "ranges", "tcp", "1000", "1010", "0.0.0.0/0")
    cloud.api.secgroup_add_rule("p", "ranges", "udp", "2000", "2010", "0.0.0.0/0")
    cloud.boot("vm", ["ranges"], NET_A)
    cloud.sync()

    tcp = {port: cloud.tcp(EXT, "vm", port) for port in (999, 1000, 1005, 1010, 1011)}
    assert tcp == {999: False, 1000: True, 1005: True, 1010: True, 1011: False}
    udp = {port: cloud.udp(EXT, "vm", port) for port in (1999, 2000, 2005, 2010, 2011)}
    assert udp == {1999: False, 2000: True, 2005: True, 2010: True, 2011: False}
    assert not cloud.udp(EXT, "vm", 1000)
    assert not cloud.tcp(EXT, "vm", 2000)


# --------------------------------------------------------------------------- 4


def test_icmp_type_and_code_matching(cloud):
    """Scenario 4: ``icmp 8 0`` lets echo (code 0) in but not echo with code 1 nor a
    timestamp request; ``icmp 13 -1`` lets timestamps in but not echo; ``icmp -1 -1``
    lets any ICMP in; ``icmp 8 -1`` any echo code."""
    make_networks(cloud, 1)
    for group, icmp_type, code in (
        ("echo0", "8", "0"), ("timestamp", "13", "-1"), ("anyicmp", "-1", "-1"),
        ("echo-any", "8", "-1"),
    ):
        cloud.api.secgroup_create("p", group, "icmp")
        cloud.api.secgroup_add_rule("p", group, "icmp", icmp_type, code, "0.0.0.0/0")
        cloud.boot(f"vm-{group}", [group], NET_A)
    cloud.sync()

    # Real echo requests (ping): answered exactly where echo type 8 code 0 is allowed.
    assert cloud.ping(EXT, "vm-echo0")
    assert not cloud.ping(EXT, "vm-timestamp")
    assert cloud.ping(EXT, "vm-anyicmp")
    assert cloud.ping(EXT, "vm-echo-any")

    def arrives(dst: str, icmp_type: int, code: int) -> bool:
        return cloud.arrives(dst, "icmp", icmp_type=icmp_type, icmp_code=code)

    # Crafted packets: the code is matched, not just the type.
    assert arrives("vm-echo0", 8, 0)
    assert not arrives("vm-echo0", 8, 1)
    assert arrives("vm-echo-any", 8, 1)
    assert arrives("vm-anyicmp", 8, 1)
    # A rule for another type lets that type in, and only that type.
    assert arrives("vm-timestamp", 13, 0)
    assert not arrives("vm-timestamp", 8, 0)
    assert not arrives("vm-echo0", 13, 0)
    assert arrives("vm-anyicmp", 13, 0)


# --------------------------------------------------------------------------- 5


def test_cidr_boundaries_with_spoofed_sources(cloud):
    """Scenario 5: ``tcp 22 22 203.0.113.8/29`` admits sources .8 (first inside) and .15
    (last inside), not .7 or .16 (first outside on each side). SYNs with spoofed
    sources are sent from the external namespace and sniffed on the instance."""
    make_networks(cloud, 1)
    cloud.api.secgroup_create("p", "ssh-from-8", "a /29")
    cloud.api.secgroup_add_rule("p", "ssh-from-8", "tcp", "22", "22", "203.0.113.8/29")
    cloud.boot("vm", ["ssh-from-8"], NET_A)
    cloud.sync()

    seen = {src: cloud.arrives("vm", "tcp", 22, src_ip=src)
            for src in ("203.0.113.7", "203.0.113.8", "203.0.113.15", "203.0.113.16")}
    assert seen == {"203.0.113.7": False, "203.0.113.8": True, "203.0.113.15": True,
                    "203.0.113.16": False}
    assert not cloud.arrives("vm", "tcp", 23, src_ip="203.0.113.8")  # the port still counts
    assert not cloud.arrives("vm", "tcp", 22, src_ip="198.51.100.10")
    # The external namespace's real address 203.0.113.10 is inside: a real handshake.
    assert cloud.tcp(EXT, "vm", 22)


# --------------------------------------------------------------------------- 6


def test_source_group_membership_is_dynamic(cloud):
    """Scenario 6: ``secgroup-add-group-rule cluster global_http tcp 22 22``.

    A (global_http) may ssh into B (cluster), C (default) may not. A new member D is
    let in by one pass that adds elements and, at most, D's own per-port objects: no
    shared chain or rule is touched, and D's address shows up in the source group's
    set. Deleting D shuts its address
    out; removing global_http from A shuts A out. A, B, C sit on different
    networks, so allow_same_net_traffic (on, the default) masks nothing.
    """
    make_networks(cloud, 3)
    make_global_http(cloud)
    cloud.api.secgroup_create("p", "cluster", "ssh from the web servers")
    cloud.api.secgroup_add_group_rule("p", "cluster", "global_http", "tcp", "22", "22")
    cloud.boot("A", ["global_http"], NET_A)
    cloud.boot("B", ["cluster"], NET_B)
    cloud.boot("C", [], NET_C)
    cloud.sync()
    members = cloud.group_set("p", "global_http")

    assert cloud.tcp("A", "B", 22)
    assert not cloud.tcp("A", "B", 80)  # the group rule is for 22 only
    assert not cloud.tcp("C", "B", 22)
    assert not cloud.tcp(EXT, "B", 22)
    assert cloud.tcp("C", "A", 80)  # C itself can talk: A is open on 80

    cloud.boot("D", ["global_http"], NET_C)
    assert not cloud.sync(lab=True).full
    commands = cloud.last_commands
    d_ip = cloud.ip("D")
    d_tap = next(p.tap for p in cloud.api.port_list("p") if p.instance == "D")
    assert commands, commands
    if cloud.backend_name == "nftables":
        assert all(c.startswith("add ") for c in commands), commands  # nothing flushed
        own = [c for c in commands if not c.startswith("add element ")]
        assert all(d_tap in c for c in own), own  # only D's own objects, no shared chain
        if cloud.topology == "routed":  # (bridged: D's elements name its mark, not tap)
            assert any(members in c and d_ip in c for c in commands), commands
    else:  # iptables: D's dispatch rules and the set; no group chain is rewritten
        assert not any(" -A secfw-g-" in c or " -F secfw-g-" in c for c in commands), commands
        assert any("add secfw-a-" in c and d_ip in c for c in commands), commands
    assert d_ip in cloud.group_addresses("p", "global_http")
    assert cloud.tcp("D", "B", 22)
    # D's address from elsewhere (spoofed from the external namespace) is let in too:
    # membership is by address, which the next step revokes.
    assert cloud.arrives("B", "tcp", 22, src_ip=d_ip)

    cloud.api.delete("p", "D")
    cloud.sync()
    assert d_ip not in cloud.group_addresses("p", "global_http")
    assert not cloud.arrives("B", "tcp", 22, src_ip=d_ip)
    assert cloud.tcp("A", "B", 22)

    cloud.api.remove_secgroup("p", "A", "global_http")
    cloud.sync()
    assert cloud.ip("A") not in cloud.group_addresses("p", "global_http")
    assert not cloud.tcp("A", "B", 22)
    assert not cloud.tcp(EXT, "A", 80)


# --------------------------------------------------------------------------- 7


def build_same_net_cloud(cloud) -> None:
    """A flat network shared by two projects and a VLAN network of project alpha.

    public (flat, 10.10.0.0/24): alpha1 (alpha), beta1 (beta) — default groups
    alpha-net (VLAN 101, 10.20.0.0/24): alpha2, alpha3 — default groups;
    alpha3 also has ``ssh-web`` (tcp 22 from public's 10.10.0.0/24).
    """
    api = cloud.api
    api.net_create("admin", "public", "10.10.0.0/24")
    api.net_create("alpha", "alpha-net", "10.20.0.0/24", vlan=101)
    api.secgroup_create("alpha", "ssh-web", "ssh from the public network")
    api.secgroup_add_rule("alpha", "ssh-web", "tcp", "22", "22", "10.10.0.0/24")
    cloud.boot("alpha1", [], "public", project="alpha")
    cloud.boot("beta1", [], "public", project="beta")
    cloud.boot("alpha2", [], "alpha-net", project="alpha")
    cloud.boot("alpha3", ["default", "ssh-web"], "alpha-net", project="alpha")


@pytest.mark.parametrize("allow_same_net", [True, False], ids=["same-net-on", "same-net-off"])
def test_allow_same_net_traffic_flat_and_vlan(cloud, allow_same_net):
    """Scenario 7, as the operations guide puts it.

    With ``allow_same_net_traffic = true``: on the flat network, instances of two
    projects talk freely (any port, any protocol) despite their default groups; on
    the VLAN network the project's instances talk freely; between networks the
    security groups filter. With ``false``: same-network traffic is filtered by the
    groups like any other.
    """
    build_same_net_cloud(cloud)
    cloud.configure(allow_same_net)
    cloud.sync()
    free = allow_same_net

    pairs = (("alpha1", "beta1"), ("beta1", "alpha1"), ("alpha2", "alpha3"),
             ("alpha3", "alpha2"))
    for src, dst in pairs:
        got = (cloud.tcp(src, dst, 22), cloud.tcp(src, dst, 31337), cloud.udp(src, dst, 53),
               cloud.ping(src, dst))
        assert got == (free, free, free, free), (src, dst, got)

    # Across networks the groups decide, whatever the setting.
    assert cloud.tcp("alpha1", "alpha3", 22)  # ssh-web: from 10.10.0.0/24
    assert cloud.tcp("beta1", "alpha3", 22)  # a CIDR rule does not care about projects
    assert not cloud.tcp("alpha1", "alpha3", 23)
    assert not cloud.tcp("alpha1", "alpha2", 22)  # default group only
    assert not cloud.tcp("alpha3", "alpha1", 22)
    assert not cloud.tcp(EXT, "alpha1", 22)
    # Without same-net, alpha2 → alpha3:22 is not from 10.10.0.0/24: dropped.
    assert cloud.tcp("alpha2", "alpha3", 22) == free


def test_same_net_emulated_by_default_group_when_off(cloud):
    """Scenario 7 (cont.): with ``allow_same_net_traffic = false`` a project simulates
    it by letting its subnet into its default group, as the guide suggests — and
    the rule is then a rule like any other (TCP only here: UDP stays blocked)."""
    build_same_net_cloud(cloud)
    cloud.api.secgroup_add_rule("alpha", "default", "tcp", "1", "65535", "10.20.0.0/24")
    cloud.configure(False)
    cloud.sync()

    assert cloud.tcp("alpha2", "alpha3", 31337)
    assert cloud.tcp("alpha3", "alpha2", 22)
    assert not cloud.udp("alpha2", "alpha3", 53)
    assert not cloud.tcp("alpha1", "alpha2", 31337)  # from the flat network: not the subnet


def test_same_net_trusts_the_networks_ports_not_its_cidr(cloud):
    """Issue #12, item 6: with ``allow_same_net_traffic`` on, "the same network"
    means the addresses of the network's ports (any host, allowed address pairs
    included), not every address of its CIDR.

    ``vm`` (default group: nothing in) is reached by its same-net peer on this
    host, and by the address of a port of the network booted on another host (the
    lab has one host, so that peer's packet is sent from the external namespace
    with its address, as the uplink would deliver it) and of a peer's address
    pair. A packet from the uplink with an in-subnet source no port has is
    dropped: before, it skipped the groups. Deleting the remote peer takes its
    address out of the set on the next pass.
    """
    make_networks(cloud, 1)
    cloud.boot("vm", [], NET_A)
    cloud.boot("peer", [], NET_A)
    remote = cloud.boot("remote", [], NET_A, host="elsewhere")
    cloud.api.port_update("p", cloud.port("peer").id, allowed_address_pairs=["10.1.0.200"])
    cloud.sync()
    remote_ip, spoofed = cloud.ip("remote"), "10.1.0.250"
    assert remote.host == "elsewhere"
    assert spoofed not in {p.ip for p in cloud.api.snapshot().ports.values()}

    assert cloud.tcp("peer", "vm", 31337)  # a real same-net peer: not filtered
    assert cloud.udp("peer", "vm", 53)
    assert cloud.arrives("vm", "tcp", 31337, src_ip=remote_ip)  # a port on another host
    assert cloud.arrives("vm", "tcp", 31337, src_ip="10.1.0.200")  # a peer's pair
    assert not cloud.arrives("vm", "tcp", 31337, src_ip=spoofed)  # in the CIDR, no port's
    assert not cloud.arrives("vm", "udp", 53, src_ip=spoofed)
    assert not cloud.arrives("vm", "icmp", src_ip=spoofed)

    cloud.api.delete("p", "remote")
    cloud.sync()
    assert not cloud.arrives("vm", "tcp", 31337, src_ip=remote_ip)
    assert cloud.tcp("peer", "vm", 31337)


@pytest.mark.topologies("routed", reason="a port on another host of a bridged network talks "
                        "to the instance at layer 2 through the bridge's uplink, which the "
                        "lab's bridged host does not have (admission is tested on both)")
def test_same_net_connections_of_a_deleted_remote_peer_are_cut(cloud):
    """Revocation follows same-net membership: ``vm`` (default group) holds TCP
    connections, let in as same-net, from two ports of its network on another host
    (the lab has one host: their addresses sit on the external namespace, routed
    to it, as the uplink would carry them). One peer is deleted: its connection
    stops carrying data after one pass — though no policy of this host changed —
    while the other's goes on."""
    import socket
    import subprocess

    from secfw.lab import netns_tools as nt

    make_networks(cloud, 1)
    cloud.boot("vm", [], NET_A)
    peers = ("remote", "stays")
    for name in peers:
        cloud.boot(name, [], NET_A, host="elsewhere")
    cloud.sync()
    for name in peers:
        address = f"{cloud.ip(name)}/32"
        for command in (("ip", "-n", cloud.ns(EXT), "addr", "add", address, "dev", "eth0"),
                        ("ip", "-n", cloud.lab.host_ns, "route", "add", address, "via",
                         cloud.ip(EXT))):
            subprocess.run(command, check=True, capture_output=True, timeout=10)
    server = nt.socket_in_netns(cloud.ns("vm"), socket.AF_INET, socket.SOCK_STREAM)
    clients = {n: nt.socket_in_netns(cloud.ns(EXT), socket.AF_INET, socket.SOCK_STREAM)
               for n in peers}
    try:
        server.bind(("0.0.0.0", 80))
        server.listen(2)
        conns = {}
        for name, client in clients.items():
            client.bind((cloud.ip(name), 0))
            client.settimeout(1.0)
            client.connect((cloud.ip("vm"), 80))
            conns[name], _ = server.accept()
            conns[name].settimeout(0.5)
            client.sendall(b"before")
            assert conns[name].recv(100) == b"before", name

        cloud.api.delete("p", "remote")
        cloud.sync(lab=False)
        for client in clients.values():
            client.sendall(b"after")
        assert conns["stays"].recv(100) == b"after"
        try:
            received = conns["remote"].recv(100)
        except TimeoutError:
            received = b""
        assert received == b"", "a same-net connection outlived the peer that made it same-net"
    finally:
        for client in clients.values():
            client.close()
        server.close()


# --------------------------------------------------------------------------- 8


def test_add_and_remove_secgroup_on_a_running_instance(cloud):
    """Scenario 8: ``add-secgroup`` on a running instance opens its ports on the next
    pass, ``remove-secgroup`` closes them again (before/after probes)."""
    make_networks(cloud, 1)
    make_global_http(cloud)
    cloud.boot("vm", [], NET_A)
    cloud.sync()
    assert not cloud.tcp(EXT, "vm", 80)

    cloud.api.add_secgroup("p", "vm", "global_http")
    result = cloud.sync()
    assert result.commands > 0
    assert cloud.tcp(EXT, "vm", 80)
    assert cloud.tcp(EXT, "vm", 443)
    assert not cloud.tcp(EXT, "vm", 22)

    cloud.api.remove_secgroup("p", "vm", "global_http")
    cloud.sync()
    assert not cloud.tcp(EXT, "vm", 80)
    assert not cloud.tcp(EXT, "vm", 443)
    assert cloud.tcp("vm", EXT, 80)  # still alive, only filtered


# --------------------------------------------------------------------------- 9


def test_deleting_an_instance_removes_everything_compiled_for_it(cloud):
    """Scenario 9: after ``delete``, the instance's tap is in no set or map of table
    inet secfw, its address is in no source-group set, and the chain of a group only
    it used on this host is gone; the others' entries stay."""
    make_networks(cloud, 2)
    make_global_http(cloud)
    cloud.api.secgroup_create("p", "cluster", "ssh from the web servers")
    cloud.api.secgroup_add_group_rule("p", "cluster", "global_http", "tcp", "22", "22")
    cloud.boot("web", ["global_http"], NET_A)
    cloud.boot("db", ["cluster"], NET_B)
    cloud.sync()
    web_tap, web_ip, db_tap = cloud.port("web").tap, cloud.ip("web"), cloud.port("db").tap
    web_chain = cloud.group_chain("p", "global_http")

    assert cloud.taps_in_ruleset() == {web_tap, db_tap}
    assert web_ip in cloud.group_addresses("p", "global_http")
    assert web_chain in cloud.ruleset_text()
    assert cloud.tcp("web", "db", 22)

    cloud.api.delete("p", "web")
    cloud.sync()
    assert cloud.taps_in_ruleset() == {db_tap}
    assert web_ip not in cloud.group_addresses("p", "global_http")
    assert web_chain not in cloud.ruleset_text()
    assert not cloud.arrives("db", "tcp", 22, src_ip=web_ip)  # its address is out, too
    assert web_tap not in cloud.ruleset_text()


def test_unknown_tap_interface_is_dropped_other_interfaces_are_not(cloud, scratch_ns, helpers):
    """Scenario 9 (cont.): a ``tap*`` interface the store does not know (a stale tap,
    or one booting before its first sync) gets nothing and sends nothing, while a
    non-tap interface routed the same way is untouched by secfw."""
    make_networks(cloud, 1)
    make_global_http(cloud)
    cloud.boot("web", ["global_http"], NET_A)
    cloud.sync()
    if cloud.topology == "bridged":
        _unknown_tap_on_a_bridge(cloud, scratch_ns, helpers)
        return
    host_ns = cloud.lab.host_ns
    run = helpers.run

    def attach(ifname: str, subnet: str) -> str:
        """A namespace behind ``ifname`` in the host namespace: .2 there, .1 on the host."""
        ns = scratch_ns()
        run("ip", "-n", host_ns, "link", "add", ifname, "type", "veth", "peer", "name",
            "eth0", "netns", ns)
        run("ip", "-n", host_ns, "addr", "add", f"{subnet}.1/24", "dev", ifname)
        run("ip", "-n", host_ns, "link", "set", ifname, "up")
        run("ip", "-n", ns, "addr", "add", f"{subnet}.2/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "route", "add", "default", "via", f"{subnet}.1")
        return ns

    rogue = attach("tapdeadbeef00", "10.250.0")
    plain = attach("vsfwplain0", "10.251.0")
    ext = cloud.lab.external_ns
    from secfw.lab import netns_tools as nt

    def tcp(src_ns: str, dst_ns: str, dst_ip: str, port: int) -> bool:
        with nt.listen(dst_ns, "tcp", port):
            return nt.tcp_connect(src_ns, dst_ip, port, helpers.PROBE_TIMEOUT)

    # Through the unknown tap: nothing in (forward), nothing out (forward, input).
    assert not tcp(ext, rogue, "10.250.0.2", 80)
    assert not tcp(rogue, ext, helpers.EXTERNAL_IP, 80)
    assert not nt.ping(ext, "10.250.0.2", 1, helpers.PROBE_TIMEOUT)
    assert not nt.ping(rogue, "10.250.0.1", 1, helpers.PROBE_TIMEOUT)  # the host itself
    # The same topology behind a non-tap interface is not secfw's business.
    assert tcp(ext, plain, "10.251.0.2", 80)
    assert tcp(plain, ext, helpers.EXTERNAL_IP, 80)
    assert nt.ping(plain, "10.251.0.1", 1, helpers.PROBE_TIMEOUT)
    # The known instance is unaffected, and a further pass keeps the rogue tap out.
    assert cloud.tcp(EXT, "web", 80)
    cloud.sync(full=True)
    assert "tapdeadbeef00" not in cloud.taps_in_ruleset()
    assert not tcp(ext, rogue, "10.250.0.2", 80)


def _unknown_tap_on_a_bridge(cloud, scratch_ns, helpers) -> None:
    """The same on a bridged host: a rogue ``tap*`` port and a plain port of net-a's
    bridge, each with an address of net-a."""
    from secfw.lab import netns_tools as nt
    from secfw.lab.hostlab import bridge_name

    run, host_ns = helpers.run, cloud.lab.host_ns
    bridge = bridge_name("10.1.0.0/24")

    def attach(ifname: str, address: str) -> str:
        ns = scratch_ns()
        run("ip", "-n", host_ns, "link", "add", ifname, "type", "veth", "peer", "name",
            "eth0", "netns", ns)
        run("ip", "-n", host_ns, "link", "set", ifname, "master", bridge, "up")
        run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "route", "add", "default", "via", "10.1.0.1")
        return ns

    rogue, plain = attach("tapdeadbeef00", "10.1.0.250"), attach("vsfwplain0", "10.1.0.251")
    ext, web = cloud.lab.external_ns, cloud.ns("web")

    def tcp(src_ns: str, dst_ns: str, dst_ip: str, port: int) -> bool:
        with nt.listen(dst_ns, "tcp", port):
            return nt.tcp_connect(src_ns, dst_ip, port, helpers.PROBE_TIMEOUT)

    # Through the unknown tap: nothing in, nothing out, not even to its neighbours.
    assert not tcp(ext, rogue, "10.1.0.250", 80)
    assert not tcp(rogue, ext, helpers.EXTERNAL_IP, 80)
    assert not tcp(rogue, web, cloud.ip("web"), 80)
    assert not nt.ping(rogue, "10.1.0.1", 1, helpers.PROBE_TIMEOUT)  # the router
    # A non-tap port of the same bridge is not secfw's business.
    assert tcp(ext, plain, "10.1.0.251", 80)
    assert tcp(plain, ext, helpers.EXTERNAL_IP, 80)
    assert tcp(plain, web, cloud.ip("web"), 80)
    assert cloud.tcp(EXT, "web", 80)
    cloud.sync(full=True)
    assert "tapdeadbeef00" not in cloud.taps_in_ruleset()
    assert not tcp(ext, rogue, "10.1.0.250", 80)


# --------------------------------------------------------------------------- 10


FOREIGN_TABLES = """\
table inet other {
	chain c {
		type filter hook forward priority 10; policy accept;
		counter
	}
}
table ip foreign {
	set blocked {
		type ipv4_addr
		elements = { 192.0.2.1 }
	}
	chain x {
		ip saddr @blocked drop
		tcp dport 9 counter reject
	}
}
"""


def test_agent_never_touches_other_tables(cloud):
    """Scenario 10: tables of other owners, created before the first sync, come out of
    several passes with changes identical (handles included; counters apart: on a
    bridged host the instances' own IPv6 chatter is forwarded), and a hooked
    foreign chain keeps seeing the traffic secfw lets through."""
    make_networks(cloud, 2)
    make_global_http(cloud)
    cloud.boot("web", ["global_http"], NET_A)
    cloud.lab.up([])  # the host namespace exists before the agent ever runs
    cloud.nft("-f", "-", stdin=FOREIGN_TABLES)

    def listing() -> tuple[str, str]:
        return (cloud.nft("-a", "-s", "list", "table", "inet", "other"),
                cloud.nft("-a", "-s", "list", "table", "ip", "foreign"))

    before = listing()
    assert cloud.sync().full
    cloud.boot("db", [], NET_B)
    cloud.sync()
    cloud.api.secgroup_add_rule("p", "global_http", "tcp", "8080", "8080", "0.0.0.0/0")
    cloud.sync()
    cloud.api.delete("p", "db")
    cloud.sync()
    cloud.sync(full=True)
    assert listing() == before

    # Still secfw filtering, and the other table's forward chain still counting.
    counters = cloud.nft("list", "table", "inet", "other")
    assert cloud.tcp(EXT, "web", 8080)
    assert not cloud.tcp(EXT, "web", 22)
    # its counter moved: packets went through it
    assert cloud.nft("list", "table", "inet", "other") != counters
    assert listing() == before


# --------------------------------------------------------------------------- 11


def test_second_pass_without_change_changes_nothing(cloud):
    """Scenario 11: a pass after a pass with no store change sends no command — neither
    the incremental one (from what was committed) nor a full one (kernel read back)
    — and the kernel's table is unchanged; a real change is then non-empty."""
    make_networks(cloud, 2)
    make_global_http(cloud)
    cloud.api.secgroup_create("p", "cluster", "ssh from the web servers")
    cloud.api.secgroup_add_group_rule("p", "cluster", "global_http", "tcp", "22", "22")
    cloud.boot("web", ["global_http"], NET_A)
    cloud.boot("db", ["cluster", "default"], NET_B)
    first = cloud.sync()
    assert first.full and first.commands > 0
    listing = cloud.ruleset_text()

    assert cloud.sync().commands == 0
    assert cloud.sync(full=True).commands == 0
    cloud.configure(True)  # a brand-new agent: reads the kernel back
    again = cloud.sync()
    assert again.full and again.commands == 0
    assert cloud.ruleset_text() == listing

    cloud.api.secgroup_add_rule("p", "global_http", "tcp", "8080", "8080", "0.0.0.0/0")
    assert cloud.sync().commands > 0
    assert cloud.sync().commands == 0


# --------------------------------------------------------------------------- 12


NASTY = ('"; flush ruleset', "$(reboot)", "{ }", "it's \"quoted\"", "`id` && echo 'x' #",
         "tap* ; drop", "\\' \\\" }}")


def test_metacharacter_names_compile_and_filter(cloud):
    """Scenario 12: projects, networks, groups and instances named with nft and shell
    metacharacters compile, load and filter exactly per their rules (no name is
    ever a part of the ruleset)."""
    project, web_group, ssh_group, net1, net2 = NASTY[:5]
    cloud.api.net_create(project, net1, "10.1.0.0/24")
    cloud.api.net_create(project, net2, "10.2.0.0/24")
    cloud.api.secgroup_create(project, web_group, "}; flush ruleset; {")
    cloud.api.secgroup_add_rule(project, web_group, "tcp", "80", "80", "0.0.0.0/0")
    cloud.api.secgroup_create(project, ssh_group, "x")
    cloud.api.secgroup_add_group_rule(project, ssh_group, web_group, "tcp", "22", "22")
    cloud.boot(NASTY[5], [web_group], net1, project=project)
    cloud.boot(NASTY[6], [ssh_group], net2, project=project)
    web, db = NASTY[5], NASTY[6]
    cloud.sync()

    assert cloud.tcp("external", web, 80)
    assert not cloud.tcp("external", web, 22)
    assert cloud.tcp(web, db, 22)
    assert not cloud.tcp(web, db, 80)
    assert not cloud.tcp("external", db, 22)
    text = cloud.ruleset_text()
    for name in NASTY:
        assert name not in text
    assert cloud.sync(full=True).commands == 0


# --------------------------------------------------------------------------- revocation


def test_removing_a_rule_stops_established_connections(cloud):
    """docs/semantics.md: when a rule is removed, the connections it allowed stop,
    established ones included. A TCP connection opened while ``global_http`` let
    port 80 in carries data; after ``remove-secgroup`` and one pass it must not."""
    import socket

    from secfw.lab import netns_tools as nt

    make_networks(cloud, 1)
    make_global_http(cloud)
    cloud.boot("web", ["global_http"], NET_A)
    cloud.sync()
    server = nt.socket_in_netns(cloud.ns("web"), socket.AF_INET, socket.SOCK_STREAM)
    client = nt.socket_in_netns(cloud.ns(EXT), socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.bind(("0.0.0.0", 80))
        server.listen(1)
        client.settimeout(1.0)
        client.connect((cloud.ip("web"), 80))
        conn, _ = server.accept()
        conn.settimeout(0.5)
        client.sendall(b"before")
        assert conn.recv(100) == b"before"

        cloud.api.remove_secgroup("p", "web", "global_http")
        cloud.sync()
        assert not cloud.tcp(EXT, "web", 443)  # new connections: dropped already
        client.sendall(b"after")
        try:
            received = conn.recv(100)
        except TimeoutError:
            received = b""
        assert received == b"", "an established connection outlived the rule that allowed it"
    finally:
        client.close()
        server.close()

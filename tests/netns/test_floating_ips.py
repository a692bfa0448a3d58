"""Floating IPs with real packets (issue #17): the lab's external namespace and
instances reach a floating address, which the host DNATs to the instance's fixed
address before the security groups judge it by the original source; what the
instance starts towards outside leaves with the floating source.

Routed: the external namespace routes everything through the host, so the host
answers for the pool's addresses without proxy ARP. Bridged: the router (the
external side's gateway) routes each floating address onto its port's network
(``Lab._sync_floating``). See docs/nftables.md, "Floating IPs".
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from secfw.lab import netns_tools as nt
from secfw.lab.hostlab import Lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]

EXT = "external"
EXTERNAL_IP, OTHER_EXTERNAL_IP = Lab.external_addresses  # 203.0.113.10, 198.51.100.10
POOL = "192.0.2.0/24"
TIMEOUT = 0.3


def build(cloud, *names: str) -> None:
    """Network fl-net 10.1.0.0/24, pool ``public``, group ``web`` (the guide's
    global_http: tcp 80 from anywhere; plus tcp 22 from 198.51.100.0/24 only),
    servers ``names`` in group web; one floating IP allocated per server."""
    api = cloud.api
    api.net_create("p", "fl-net", "10.1.0.0/24")
    api.floating_pool_create("admin", "public", POOL)
    api.secgroup_create("p", "web", "web servers")
    api.secgroup_add_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0")
    api.secgroup_add_rule("p", "web", "tcp", "22", "22", "198.51.100.0/24")
    for name in names:
        cloud.boot(name, ["web"], "fl-net")
        api.floating_ip_create("p", "public")


def floating(cloud, index: int = 0) -> str:
    return cloud.api.floating_ip_list("p")[index].id


def reaches(cloud, src: str, dst_ns: str, address: str, port: int,
            src_ip: str | None = None) -> bool:
    """A TCP handshake from ``src`` (an instance name or EXT) to ``address:port``
    completes, with a listener in namespace ``dst_ns``."""
    with nt.listen(dst_ns, "tcp", port):
        return nt.tcp_connect(cloud.ns(src), address, port, TIMEOUT, src_ip)


@contextmanager
def connection(src_ns: str, server_ns: str, address: str, port: int
               ) -> Iterator[tuple[socket.socket, socket.socket, str]]:
    """An established TCP connection from ``src_ns`` to ``address:port``, served in
    ``server_ns``: (client, server side, the source address the server saw)."""
    server = nt.socket_in_netns(server_ns, socket.AF_INET, socket.SOCK_STREAM)
    client = nt.socket_in_netns(src_ns, socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", port))
        server.listen(1)
        server.settimeout(2.0)
        client.settimeout(2.0)
        client.connect((address, port))
        conn, peer = server.accept()
        conn.settimeout(0.5)
        try:
            yield client, conn, peer[0]
        finally:
            conn.close()
    finally:
        client.close()
        server.close()


def carries(client: socket.socket, conn: socket.socket, payload: bytes) -> bool:
    """Whether ``payload`` sent by ``client`` arrives at ``conn``."""
    try:
        client.sendall(payload)
        return conn.recv(100) == payload
    except OSError:  # timeout, or a reset
        return False


def test_groups_filter_the_floating_address_by_the_original_source(cloud):
    """global_http opens port 80 of the floating address and nothing else; the rule
    from 198.51.100.0/24 admits only that source to port 22."""
    build(cloud, "web")
    address = floating(cloud)
    cloud.sync()
    web = cloud.ns("web")
    assert not reaches(cloud, EXT, web, address, 80), "unassociated address reaches web"
    cloud.api.add_floating_ip("p", "web", address)
    assert cloud.sync().commands > 0
    assert cloud.sync(full=True).commands == 0, "the NAT read back differs from what was written"
    assert reaches(cloud, EXT, web, address, 80)
    assert not reaches(cloud, EXT, web, address, 443)
    assert not reaches(cloud, EXT, web, address, 22, EXTERNAL_IP)
    assert reaches(cloud, EXT, web, address, 22, OTHER_EXTERNAL_IP)
    with connection(cloud.ns(EXT), web, address, 80) as (_, _, seen):
        assert seen == EXTERNAL_IP  # DNAT leaves the source alone


def test_instance_reaches_outside_with_its_floating_source(cloud):
    """Checked at the external end: the fixed source before association, the
    floating one after."""
    build(cloud, "web")
    address = floating(cloud)
    cloud.sync()
    ext = cloud.ns(EXT)
    with connection(cloud.ns("web"), ext, EXTERNAL_IP, 8080) as (_, _, seen):
        assert seen == cloud.ip("web")
    cloud.api.add_floating_ip("p", "web", address)
    cloud.sync()
    with connection(cloud.ns("web"), ext, EXTERNAL_IP, 8080) as (client, conn, seen):
        assert seen == address
        assert carries(client, conn, b"out")


def test_dissociation_cuts_established_connections_both_ways(cloud):
    """remove-floating-ip: a connection in through the floating address and one
    out with the floating source stop carrying data after one agent pass; new
    connections to the address fail. Another instance keeps a floating IP, so the
    nat chains stay: removing the last nat hook makes the kernel drop every NAT
    binding by itself (nf_nat_unregister_fn), which would hide a missing revocation."""
    build(cloud, "web", "other")
    address = floating(cloud)
    cloud.api.add_floating_ip("p", "web", address)
    cloud.api.add_floating_ip("p", "other", floating(cloud, 1))
    cloud.sync()
    web, ext = cloud.ns("web"), cloud.ns(EXT)
    with connection(ext, web, address, 80) as (c_in, s_in, _), \
            connection(web, ext, EXTERNAL_IP, 8080) as (c_out, s_out, seen):
        assert seen == address
        assert carries(c_in, s_in, b"in-before") and carries(c_out, s_out, b"out-before")
        cloud.api.remove_floating_ip("p", "web", address)
        cloud.sync()
        assert not carries(c_in, s_in, b"in-after"), "a DNATed connection outlived its mapping"
        assert not carries(c_out, s_out, b"out-after"), "an SNATed connection outlived it"
    assert not reaches(cloud, EXT, web, address, 80)


def test_reassigned_address_reaches_only_the_new_instance(cloud):
    build(cloud, "web1", "web2")
    address = floating(cloud)
    cloud.api.add_floating_ip("p", "web1", address)
    cloud.sync()
    web1, web2, ext = cloud.ns("web1"), cloud.ns("web2"), cloud.ns(EXT)
    with connection(ext, web1, address, 80) as (client, conn, _):
        assert carries(client, conn, b"to web1")
        cloud.api.remove_floating_ip("p", "web1", address)
        cloud.api.add_floating_ip("p", "web2", address)
        cloud.sync()
        assert not carries(client, conn, b"still web1?"), "the old mapping still carries data"
    assert reaches(cloud, EXT, web2, address, 80)
    assert not reaches(cloud, EXT, web1, address, 80)


@pytest.mark.parametrize("change", ["reassign", "dissociate"])
def test_mapping_changed_while_no_agent_ran_is_revoked_at_startup(cloud, change):
    """The change happens with the agent stopped: the next agent's first pass
    has no previous filter to diff against, yet the old connection must die and
    new ones reach only the new instance (or nobody). ``keep`` holds another
    mapping, so the nat chains stay (see the dissociation test). The restarted
    agent's pass leaves the lab as it was (``lab=False``): in the bridged lab,
    updating it would withdraw the router's route to a dissociated address and
    stop the old connection upstream, hiding a missing revocation."""
    build(cloud, "web1", "web2", "keep")
    address = floating(cloud)
    cloud.api.add_floating_ip("p", "web1", address)
    cloud.api.add_floating_ip("p", "keep", floating(cloud, 2))
    cloud.sync()
    web1, web2, ext = cloud.ns("web1"), cloud.ns("web2"), cloud.ns(EXT)
    with connection(ext, web1, address, 80) as (client, conn, _), \
            connection(web1, ext, EXTERNAL_IP, 8080) as (c_out, s_out, seen):
        assert seen == address
        assert carries(client, conn, b"to web1") and carries(c_out, s_out, b"out")
        cloud.stop_agent()
        cloud.api.remove_floating_ip("p", "web1", address)
        if change == "reassign":
            cloud.api.add_floating_ip("p", "web2", address)
        assert carries(client, conn, b"no agent"), "the kernel changed with no agent"
        cloud.sync(lab=False)
        assert not carries(client, conn, b"still web1?"), "the old DNAT outlived a restart"
        assert not carries(c_out, s_out, b"out again"), "the old SNAT outlived a restart"
    cloud.sync()
    assert reaches(cloud, EXT, web2, address, 80) == (change == "reassign")
    assert not reaches(cloud, EXT, web1, address, 80)


def test_hairpin_through_a_floating_address_is_filtered(cloud):
    """An instance reaching another's floating address on the same host: DNATed,
    not SNATed (the server sees the client's fixed address), and judged by the
    server's groups: port 80 open to all, port 22 only from 198.51.100.0/24
    (``allow_same_net_traffic`` off: the two share a network)."""
    cloud.configure(allow_same_net=False)
    build(cloud, "web", "client")
    address = floating(cloud, 0)
    cloud.api.add_floating_ip("p", "web", address)
    cloud.api.add_floating_ip("p", "client", floating(cloud, 1))
    cloud.sync()
    web = cloud.ns("web")
    with connection(cloud.ns("client"), web, address, 80) as (client, conn, seen):
        assert seen == cloud.ip("client")
        assert carries(client, conn, b"hairpin")
    assert not reaches(cloud, "client", web, address, 22)


def test_removing_the_rule_cuts_connections_through_the_floating_address(cloud):
    """Revocation judges a connection to a floating address as the filter saw it
    (destination: the fixed address): removing tcp 80 from ``web`` cuts it."""
    build(cloud, "web")
    address = floating(cloud)
    cloud.api.add_floating_ip("p", "web", address)
    cloud.sync()
    with connection(cloud.ns(EXT), cloud.ns("web"), address, 80) as (client, conn, _):
        assert carries(client, conn, b"before")
        cloud.api.secgroup_delete_rule("p", "web", "tcp", "80", "80", "0.0.0.0/0")
        cloud.sync()
        assert not carries(client, conn, b"after"), "a connection outlived its rule"


def test_instance_reaches_its_own_floating_address(cloud):
    """Its own hairpin comes back from the floating address (SNATed): a packet
    from its own fixed address arriving on eth0 would be dropped as a martian."""
    build(cloud, "web")
    address = floating(cloud)
    cloud.api.add_floating_ip("p", "web", address)
    cloud.sync()
    web = cloud.ns("web")
    with connection(web, web, address, 80) as (client, conn, seen):
        assert seen == address
        assert carries(client, conn, b"myself")

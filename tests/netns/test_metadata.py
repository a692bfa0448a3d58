"""The metadata service with real packets: instances ask 169.254.169.254:80, the
agent's redirect takes them to ``secfw metadata serve`` in the host namespace,
and the server answers each with its own data, known from the kernel (every
backend × topology: the ``cloud`` fixture)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from secfw.lab import netns_tools

pytestmark = pytest.mark.netns

PROJECT = "p"
PUBLIC_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
              " a@example")


def _boot(cloud: Any, name: str, net: str, groups: tuple[str, ...] = (), **extra: Any) -> Any:
    return cloud.api.boot(PROJECT, name, "m1.tiny", "cirros", cloud.host, list(groups) or None,
                          [net], **extra)


def _two_instances(cloud: Any) -> tuple[Any, Any]:
    """``a`` (key pair, metadata, user data) and ``b`` (other user data, no key) on
    one network, the metadata server serving, the agent redirecting to it."""
    cloud.api.net_create(PROJECT, "n1", "10.1.0.0/24")
    cloud.api.keypair_add(PROJECT, "k", PUBLIC_KEY)
    a = _boot(cloud, "a", "n1", key_name="k", meta=["role=web"], user_data=b"#!/bin/sh\necho a\n")
    b = _boot(cloud, "b", "n1", user_data=b"#cloud-config\nb: 2\n")
    cloud.serve_metadata()
    cloud.sync()
    return a, b


def test_each_instance_gets_its_own_data(cloud: Any) -> None:
    a, b = _two_instances(cloud)
    assert cloud.metadata("a", "/openstack/latest/user_data") == (200, b"#!/bin/sh\necho a\n")
    assert cloud.metadata("b", "/latest/user-data") == (200, b"#cloud-config\nb: 2\n")
    status, body = cloud.metadata("a", "/openstack/latest/meta_data.json")
    document = json.loads(body)
    assert status == 200 and document["uuid"] == a.id and document["name"] == "a"
    assert document["meta"] == {"role": "web"} and document["public_keys"] == {"k": PUBLIC_KEY}
    assert cloud.metadata("b", "/latest/meta-data/instance-id") == (200, b.id.encode())
    assert cloud.metadata("b", "/latest/meta-data/local-ipv4") == (
        200, cloud.ip("b").encode())
    assert cloud.metadata("a", "/latest/meta-data/public-keys/0/openssh-key") == (
        200, (PUBLIC_KEY + "\n").encode())
    assert cloud.metadata("b", "/latest/meta-data/public-keys/0/openssh-key")[0] == 404
    _boot(cloud, "late", "n1", user_data=b"late's")  # the agent's next pass is incremental
    assert not cloud.sync().full
    assert cloud.metadata("late", "/latest/user-data") == (200, b"late's")


def test_a_spoofed_request_gets_nothing(cloud: Any) -> None:
    """``b`` sends a SYN to 169.254.169.254:80 from ``a``'s address: no answer
    reaches ``a`` (nor anyone): the redirect matches the tap *and* its own
    address, so the SYN stays addressed to 169.254.169.254 and b's
    anti-spoofing drops it."""
    from scapy.layers.inet import IP, TCP

    _two_instances(cloud)
    assert cloud.metadata("a", "/latest/meta-data/hostname") == (200, b"a")
    syn = IP(src=cloud.ip("a"), dst="169.254.169.254") / TCP(sport=40123, dport=80, flags="S")
    answer = netns_tools.send_and_sniff(syn, src_ns=cloud.ns("b"), dst_ns=cloud.ns("a"),
                                        bpf="tcp and src port 80 and dst port 40123",
                                        timeout=0.5)
    assert answer is None


def test_egress_rules_that_deny_everything_still_allow_metadata(cloud: Any) -> None:
    cloud.api.net_create(PROJECT, "n1", "10.1.0.0/24")
    cloud.api.secgroup_create(PROJECT, "locked", "egress to one unused address only")
    cloud.api.rule_create(PROJECT, "locked", "egress", protocol="tcp", dst_port="9",
                          remote_ip="192.0.2.9/32")
    _boot(cloud, "c", "n1", ("locked",), user_data=b"c's data")
    cloud.serve_metadata()
    cloud.sync()
    assert not cloud.tcp("c", "external", 80)  # the egress rules do deny
    assert cloud.metadata("c", "/latest/user-data") == (200, b"c's data")


def test_nothing_else_reaches_the_metadata_server_port(cloud: Any) -> None:
    """An instance that sends straight to the server's address and port (on-link,
    so the host itself receives it in either topology) gets no answer; the
    redirected path still works."""
    _two_instances(cloud)
    address, port = cloud.metadata_listen
    cloud.lab_exec("a", "ip", "route", "replace", f"{address}/32", "dev", "eth0")
    assert cloud.metadata("a", "/latest/user-data", address=address, port=port) is None
    assert cloud.metadata("a", "/latest/user-data")[0] == 200

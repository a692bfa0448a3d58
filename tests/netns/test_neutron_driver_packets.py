"""The Neutron firewall driver, driven as Neutron's L2 agent drives it: real packets.

A bridged lab host (Neutron's taps hang off Linux bridges) with three instances on
one network; the driver applies inside the lab's host namespace. The calls follow
neutron/agent/securitygroups_rpc.py: inside ``defer_apply()`` the groups' rules,
the remote groups' members, then ``prepare_port_filter`` per port; later
``update_security_group_members`` + ``update_port_filter`` when a port joins a
group, ``update_security_group_rules`` when a rule goes, ``remove_port_filter``
when a port goes. Every "blocked" has an "allowed" beside it, so a probe that
fails for another reason cannot pass the test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from secfw.lab import netns_tools
from secfw.lab.hostlab import Lab, LabPort
from secfw.neutron import SecfwFirewallDriver

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]

TIMEOUT = 0.3
WEB, DB, CLIENT = (str(uuid.uuid4()) for _ in range(3))
PORTS = {  # name: (tap, mac, ip)
    "web": ("tapnfweb00001", "fa:16:3e:10:00:01", "10.61.0.11"),
    "db": ("tapnfdb000001", "fa:16:3e:10:00:02", "10.61.0.12"),
    "client": ("tapnfcli00001", "fa:16:3e:10:00:03", "10.61.0.13"),
}
RULES = {
    WEB: [{"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
           "port_range_min": 80, "port_range_max": 80},
          {"direction": "egress", "ethertype": "IPv4"}],
    DB: [{"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
          "port_range_min": 5432, "port_range_max": 5432, "remote_group_id": WEB},
         {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
          "port_range_min": 22, "port_range_max": 22, "source_ip_prefix": "10.61.0.0/24"}],
    CLIENT: [{"direction": "egress", "ethertype": "IPv4"}],
}


def port_dict(name: str, groups: list[str]) -> dict[str, Any]:
    """A port as the agent receives it from security_group_info_for_devices."""
    tap, mac, ip = PORTS[name]
    return {"device": tap, "id": str(uuid.uuid4()), "mac_address": mac, "fixed_ips": [ip],
            "security_groups": groups, "allowed_address_pairs": [],
            "port_security_enabled": True}


class Host:
    """The lab and the driver, with probes by instance name (or ``external``)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.driver = SecfwFirewallDriver(netns=lab.host_ns, topology="bridged",
                                          host=lab.host)

    def ns(self, name: str) -> str:
        return self.lab.external_ns if name == "external" else self.lab.instance_ns(PORTS[name][0])

    def tcp(self, src: str, dst: str, port: int) -> bool:
        with netns_tools.listen(self.ns(dst), "tcp", port):
            return netns_tools.tcp_connect(self.ns(src), PORTS[dst][2], port, TIMEOUT)


@pytest.fixture
def host(lab_factory: Callable[..., Lab]) -> Iterator[Host]:
    lab = lab_factory(f"nf-{uuid.uuid4().hex[:8]}", topology="bridged")
    lab.up([LabPort(tap, mac, ip, 24, "10.61.0.1") for tap, mac, ip in PORTS.values()])
    env = Host(lab)
    members = {"web": [WEB], "db": [DB], "client": [CLIENT]}
    with env.driver.defer_apply():  # the agent's prepare_devices_filter
        for group, rules in RULES.items():
            env.driver.update_security_group_rules(group, rules)
        env.driver.update_security_group_members(
            WEB, {"IPv4": [(PORTS["web"][2], PORTS["web"][1])], "IPv6": []})
        for name, groups in members.items():
            env.driver.prepare_port_filter(port_dict(name, groups))
    try:
        yield env
    finally:
        env.driver.cleanup()


def test_rules_members_and_removal_through_the_driver(host: Host) -> None:
    assert host.driver.applies == 1  # the whole first sync: one transaction
    assert host.tcp("external", "web", 80)
    assert not host.tcp("external", "web", 81)
    assert host.tcp("web", "db", 5432)  # web is a member of the remote group
    assert not host.tcp("client", "db", 5432)  # client is not (yet)
    assert host.tcp("client", "db", 22)  # … though the network may reach db

    # client joins WEB: the server pushes WEB's new members and the port's new groups
    with host.driver.defer_apply():
        host.driver.security_group_updated("sg_member", [WEB])
        host.driver.update_security_group_members(WEB, {"IPv4": [
            (PORTS["web"][2], PORTS["web"][1]), (PORTS["client"][2], PORTS["client"][1])]})
        host.driver.update_port_filter(port_dict("client", [CLIENT, WEB]))
    assert host.tcp("client", "db", 5432)
    assert host.tcp("external", "client", 80)  # WEB's own rule now applies to client too

    # the 5432 rule is deleted: Neutron pushes DB's remaining rules
    host.driver.update_security_group_rules(DB, RULES[DB][1:])
    assert not host.tcp("web", "db", 5432)
    assert host.tcp("web", "db", 22)

    host.driver.remove_port_filter({"device": PORTS["web"][0]})
    assert PORTS["web"][0] not in host.driver.ports
    assert not host.tcp("external", "web", 80)  # an unfiltered tap is not an open one
    assert host.tcp("external", "client", 80)


def test_a_port_whose_rules_have_not_arrived_is_closed(host: Host) -> None:
    """prepare_port_filter before its group's rules: nothing reaches the port."""
    late = str(uuid.uuid4())
    host.driver.update_port_filter(port_dict("db", [late]))
    assert not host.tcp("web", "db", 22)
    host.driver.update_security_group_rules(late, RULES[DB][1:])
    assert host.tcp("web", "db", 22)

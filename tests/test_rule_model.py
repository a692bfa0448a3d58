"""The extended (Neutron) rule model, IPv6 networks and port settings, via the CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Cli

RULE = ("security", "group", "rule")


@pytest.fixture
def cloud(cli: Cli) -> Cli:
    cli.ok("net-create", "n1", "10.0.0.0/24", "--ipv6-cidr", "2001:db8:1::/64")
    cli.ok("image-create", "img")
    cli.ok("secgroup-create", "web", "web servers")
    cli.ok("secgroup-create", "db", "databases")
    cli.ok("boot", "vm", "--flavor", "m1.tiny", "--image", "img", "--host", "h1",
           "--security-groups", "web")
    return cli


def test_rule_create_defaults_to_ingress_ipv4(cloud: Cli) -> None:
    (row,) = [cloud.json(*RULE, "create", "web", "--protocol", "tcp", "--dst-port", "80")]
    assert (row["direction"], row["ethertype"], row["protocol"]) == ("ingress", "IPv4", "tcp")
    assert (row["port_range_min"], row["port_range_max"]) == (80, 80)


def test_egress_ipv6_icmp_means_icmpv6(cloud: Cli) -> None:
    row = cloud.json(*RULE, "create", "web", "--egress", "--ethertype", "ipv6", "--protocol",
                     "icmp", "--icmp-type", "128", "--icmp-code", "0")
    assert (row["direction"], row["ethertype"], row["protocol"]) == ("egress", "IPv6", "icmpv6")
    assert (row["port_range_min"], row["port_range_max"]) == (128, 0)


def test_remote_group_and_listing(cloud: Cli) -> None:
    cloud.ok(*RULE, "create", "db", "--protocol", "tcp", "--dst-port", "5432",
             "--remote-group", "web")
    rows = cloud.json(*RULE, "list", "db")
    assert [(r["remote_group"], r["port_range"]) for r in rows] == [("web", "5432:5432")]
    assert len(cloud.json(*RULE, "list")) == 1


def test_delete_by_id(cloud: Cli) -> None:
    rule_id = cloud.json(*RULE, "create", "web", "--protocol", "udp", "--dst-port", "53")["id"]
    cloud.ok(*RULE, "delete", rule_id)
    assert cloud.json(*RULE, "list", "web") == []
    assert "not found" in cloud.fails(*RULE, "delete", rule_id)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("--protocol", "tcp", "--dst-port", "80"), ("--protocol", "6", "--dst-port", "80:80")),
        (("--protocol", "tcp", "--dst-port", "22"),
         ("--protocol", "tcp", "--dst-port", "22", "--remote-ip", "0.0.0.0/0")),
        (("--ethertype", "IPv6", "--protocol", "58"),
         ("--ethertype", "IPv6", "--protocol", "icmp")),
        (("--protocol", "any",), ()),
    ],
)
def test_duplicates_in_meaning_are_rejected(cloud: Cli, first: tuple[str, ...],
                                            second: tuple[str, ...]) -> None:
    cloud.ok(*RULE, "create", "web", *first)
    assert "already exists" in cloud.fails(*RULE, "create", "web", *second)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--protocol", "gre", "--dst-port", "80"), "ports can only be given"),
        (("--dst-port", "80"), "ports can only be given"),
        (("--protocol", "tcp", "--dst-port", "0"), "1..65535"),
        (("--protocol", "tcp", "--dst-port", "90:80"), "greater than"),
        (("--protocol", "tcp", "--dst-port", "80:x"), "integer"),
        (("--protocol", "udp", "--icmp-type", "3"), "needs protocol icmp"),
        (("--protocol", "icmp", "--icmp-code", "1"), "code needs an ICMP type"),
        (("--protocol", "icmp", "--icmp-type", "256"), "0..255"),
        (("--protocol", "256",), "0..255"),
        (("--protocol", "bogus",), "Invalid IP protocol"),
        (("--protocol", "icmpv6",), "needs ethertype IPv6"),
        (("--ethertype", "IPv5",), "IPv4 or IPv6"),
        (("--ethertype", "IPv6", "--remote-ip", "10.0.0.0/8"), "not an IPv6 network"),
        (("--remote-ip", "2001:db8::/32",), "not an IPv4 network"),
        (("--remote-ip", "10.0.0.1/8",), "host bits"),
        (("--remote-ip", "10.0.0.0/8", "--remote-group", "db"), "not both"),
        (("--remote-group", "nosuch",), "not found"),
        (("--protocol", "tcp", "--dst-port", "80", "--icmp-type", "1"), "not both"),
    ],
)
def test_bad_rules_are_rejected(cloud: Cli, args: tuple[str, ...], message: str) -> None:
    assert message in cloud.fails(*RULE, "create", "web", *args)


def test_ports_get_ipv6_addresses(cloud: Cli) -> None:
    (port,) = cloud.json("port-list")
    assert (port["ip"], port["ip6"]) == ("10.0.0.2", "2001:db8:1::2")
    network = cloud.json("net-list")[0]
    assert (network["cidr6"], network["gateway6"]) == ("2001:db8:1::/64", "2001:db8:1::1")


def test_ipv6_subnets_must_not_overlap(cloud: Cli) -> None:
    message = cloud.fails("net-create", "n2", "10.1.0.0/24", "--ipv6-cidr", "2001:db8:1:0::/80")
    assert "overlaps" in message
    assert "/64 and /120" in cloud.fails("net-create", "n3", "10.2.0.0/24", "--ipv6-cidr",
                                         "2001:db8:9::/48")


def test_port_update_pairs_and_port_security(cloud: Cli) -> None:
    tap = cloud.json("port-list")[0]["tap"]
    port = cloud.json("port-update", tap, "--allowed-address-pair", "10.0.0.50",
                      "--allowed-address-pair", "10.0.0.64/28,FA:16:3E:00:00:01")
    assert port["allowed_address_pairs"] == ["10.0.0.50/32", "10.0.0.64/28,fa:16:3e:00:00:01"]
    assert "cannot have allowed address pairs" in cloud.fails("port-update", tap,
                                                              "--no-port-security")
    cloud.ok("port-update", tap, "--no-allowed-address-pairs")
    assert cloud.json("port-update", tap, "--no-port-security")["port_security"] is False
    assert "cannot have allowed address pairs" in cloud.fails(
        "port-update", tap, "--allowed-address-pair", "10.0.0.50")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--allowed-address-pair", "10.0.0.300"), "bad IP address"),
        (("--allowed-address-pair", "10.0.0.5,zz:16:3e:00:00:01"), "not a MAC address"),
        (("--allowed-address-pair", "10.0.0.5,01:00:5e:00:00:01"), "multicast"),
        ((), "nothing to update"),
    ],
)
def test_bad_port_updates(cloud: Cli, args: tuple[str, ...], message: str) -> None:
    tap = cloud.json("port-list")[0]["tap"]
    assert message in cloud.fails("port-update", tap, *args)


def test_unknown_port(cloud: Cli) -> None:
    assert "not found" in cloud.fails("port-update", "tapnosuch", "--no-port-security")

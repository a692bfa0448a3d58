"""The ``secfw`` command line: every command, both output formats, every error path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import test_guide_outputs as guide

from secfw.api import Api
from secfw.cli.main import main
from secfw.model import MAC_PREFIX, tap_name

if TYPE_CHECKING:
    from conftest import Cli, StoreState

# --------------------------------------------------------------------------- the guide's examples

# The guide's own tables live in test_guide_outputs (one copy of each).
GUIDE_SECGROUP_LIST = guide.GUIDE_SECGROUP_LIST
GUIDE_OPEN_RULES = guide.GUIDE_RULES_OPEN
GUIDE_GLOBAL_HTTP = guide.GUIDE_SECGROUP_CREATE

RULE_HEADER = """\
+-------------+-----------+---------+-----------+--------------+
| IP Protocol | From Port | To Port | IP Range  | Source Group |
+-------------+-----------+---------+-----------+--------------+
"""
RULE_FOOTER = "+-------------+-----------+---------+-----------+--------------+\n"
HTTP_ROW = "| tcp         | 80        | 80      | 0.0.0.0/0 |              |\n"
HTTPS_ROW = "| tcp         | 443       | 443     | 0.0.0.0/0 |              |\n"

GUIDE_FLAVORS = guide.GUIDE_FLAVOR_LIST

CLUSTER_RULE = """\
+-------------+-----------+---------+----------+--------------+
| IP Protocol | From Port | To Port | IP Range | Source Group |
+-------------+-----------+---------+----------+--------------+
| tcp         | 22        | 22      |          | global_http  |
+-------------+-----------+---------+----------+--------------+
"""


def test_guide_open_group(cli: Cli) -> None:
    cli.ok("secgroup-create", "open", "all ports")
    cli.ok("secgroup-add-rule", "open", "icmp", "-1", "255", "0.0.0.0/0")
    cli.ok("secgroup-add-rule", "open", "tcp", "1", "65535", "0.0.0.0/0")
    cli.ok("secgroup-add-rule", "open", "udp", "1", "65535", "0.0.0.0/0")
    assert cli.ok("secgroup-list") == GUIDE_SECGROUP_LIST
    assert cli.ok("secgroup-list-rules", "open") == GUIDE_OPEN_RULES


def test_guide_global_http(cli: Cli) -> None:
    created = cli.ok("secgroup-create", "global_http", "allow web traffic from the internet")
    assert created == GUIDE_GLOBAL_HTTP
    assert cli.ok("secgroup-add-rule", "global_http", "tcp", "80", "80", "0.0.0.0/0") == (
        RULE_HEADER + HTTP_ROW + RULE_FOOTER
    )
    assert cli.ok("secgroup-add-rule", "global_http", "tcp", "443", "443", "0.0.0.0/0") == (
        RULE_HEADER + HTTPS_ROW + RULE_FOOTER
    )
    assert cli.ok("secgroup-list-rules", "global_http") == (
        RULE_HEADER + HTTP_ROW + HTTPS_ROW + RULE_FOOTER
    )


def test_guide_cluster_source_group(cli: Cli) -> None:
    cli.ok("secgroup-create", "global_http", "allow web traffic from the internet")
    cli.ok("secgroup-create", "cluster", "ssh between cluster members")
    out = cli.ok("secgroup-add-group-rule", "cluster", "global_http", "tcp", "22", "22")
    assert out == CLUSTER_RULE
    assert cli.ok("secgroup-list-rules", "cluster") == CLUSTER_RULE
    [rule] = cli.json("secgroup-list-rules", "cluster")
    assert rule["source_group"] == "global_http"
    assert rule["ip_range"] is None
    assert (rule["ip_protocol"], rule["from_port"], rule["to_port"]) == ("tcp", 22, 22)


def test_flavor_list_matches_guide(cli: Cli) -> None:
    assert cli.ok("flavor-list") == GUIDE_FLAVORS
    flavors = cli.json("flavor-list")
    assert flavors[0] == {"id": "1", "name": "m1.tiny", "memory_mb": 512, "disk": 1,
                          "ephemeral": 0, "swap": 0, "vcpus": 1, "rxtx_factor": 1.0,
                          "is_public": True, "extra_specs": {}}
    assert [f["name"] for f in flavors] == [
        "m1.tiny", "m1.small", "m1.medium", "m1.large", "m1.xlarge"]


# --------------------------------------------------------------------------- security groups


def test_secgroup_list_json_and_all_projects(cli: Cli) -> None:
    cli.ok("secgroup-create", "web", "web servers")
    cli.ok("--project", "other", "secgroup-create", "db", "databases")
    groups = cli.json("secgroup-list")
    assert [(g["name"], g["description"], g["project"]) for g in groups] == [
        ("default", "default", "admin"), ("web", "web servers", "admin")]
    assert all(set(g) == {"id", "name", "description", "project"} for g in groups)
    table = cli.ok("secgroup-list", "--all-projects")
    assert table.splitlines()[1] == "| Name    | Description | Project |"
    assert "| db      | databases   | other   |" in table
    everything = cli.json("secgroup-list", "--all-projects")
    assert {(g["project"], g["name"]) for g in everything} == {
        ("admin", "default"), ("admin", "web"), ("other", "default"), ("other", "db")}


def test_secgroup_create_json_is_an_object(cli: Cli) -> None:
    group = cli.json("secgroup-create", "web", "web servers")
    assert group["name"] == "web" and group["project"] == "admin"
    assert [g["id"] for g in cli.json("secgroup-list") if g["name"] == "web"] == [group["id"]]


def test_secgroup_update_renames(cli: Cli) -> None:
    group = cli.json("secgroup-create", "web", "web servers")
    out = cli.ok("secgroup-update", "web", "www", "public web")
    assert "| www  | public web  |" in out
    renamed = cli.json("secgroup-update", group["id"], "www2", "by id")
    assert (renamed["id"], renamed["name"]) == (group["id"], "www2")
    # the default group keeps its name but may get a new description
    assert cli.json("secgroup-update", "default", "default", "mine")["description"] == "mine"


def test_secgroup_delete(cli: Cli, store_state: StoreState) -> None:
    cli.ok("secgroup-create", "web", "web servers")
    cli.ok("secgroup-add-rule", "web", "tcp", "80", "80", "0.0.0.0/0")
    cli.ok("secgroup-add-group-rule", "web", "web")  # a self-reference does not block deletion
    assert cli.ok("secgroup-delete", "web") == ""
    assert [g["name"] for g in cli.json("secgroup-list")] == ["default"]
    docs = store_state(cli.store_url)[1]
    assert docs.get("rule", {}) == {}


def test_rules_add_list_delete_both_formats(cli: Cli) -> None:
    cli.ok("secgroup-create", "web", "web servers")
    rule = cli.json("secgroup-add-rule", "web", "TCP", "22", "22", "10.0.0.0/8")
    assert (rule["ip_protocol"], rule["from_port"], rule["to_port"], rule["ip_range"]) == (
        "tcp", 22, 22, "10.0.0.0/8")
    cli.ok("secgroup-add-rule", "web", "icmp", "8", "-1", "0.0.0.0/0")
    cli.ok("secgroup-add-rule", "web", "udp", "53", "53", "192.168.1.7")
    rows = cli.json("secgroup-list-rules", "web")
    assert [(r["ip_protocol"], r["from_port"], r["to_port"], r["ip_range"]) for r in rows] == [
        ("icmp", 8, -1, "0.0.0.0/0"), ("tcp", 22, 22, "10.0.0.0/8"),
        ("udp", 53, 53, "192.168.1.7/32")]
    assert cli.ok("secgroup-delete-rule", "web", "tcp", "22", "22", "10.0.0.0/8") == ""
    assert cli.ok("secgroup-delete-rule", "web", "icmp", "8", "-1", "0.0.0.0/0") == ""
    table = cli.ok("secgroup-list-rules", "web")
    assert "| udp         | 53        | 53      | 192.168.1.7/32 |" in table
    assert len(table.splitlines()) == 5


def test_icmp_any_is_shown_as_typed(cli: Cli) -> None:
    cli.ok("secgroup-create", "ping", "icmp")
    out = cli.ok("secgroup-add-rule", "ping", "icmp", "-1", "-1", "0.0.0.0/0")
    assert "| icmp        | -1        | -1      | 0.0.0.0/0 |" in out
    # "icmp -1 255" means the same thing (any ICMP), so it is a duplicate
    line = cli.fails("secgroup-add-rule", "ping", "icmp", "-1", "255", "0.0.0.0/0", code=4)
    assert "This rule already exists in group 'ping'" in line


def test_group_rule_without_protocol(cli: Cli) -> None:
    cli.ok("secgroup-create", "web", "web")
    cli.ok("secgroup-create", "lb", "load balancers")
    out = cli.ok("secgroup-add-group-rule", "web", "lb")
    assert out.splitlines()[3] == "|             |           |         |          | lb           |"
    [rule] = cli.json("secgroup-list-rules", "web")
    assert (rule["ip_protocol"], rule["from_port"], rule["to_port"]) == (None, None, None)
    assert cli.ok("secgroup-delete-group-rule", "web", "lb") == ""
    cli.ok("secgroup-add-group-rule", "web", "lb", "udp", "53", "53")
    cli.fails("secgroup-delete-group-rule", "web", "lb", code=3)
    assert cli.ok("secgroup-delete-group-rule", "web", "lb", "udp", "53", "53") == ""
    assert cli.json("secgroup-list-rules", "web") == []


# --------------------------------------------------------------------------- networks, images


def test_networks(cli: Cli) -> None:
    out = cli.ok("net-create", "private", "10.0.0.0/24")
    assert "| private | 10.0.0.0/24 |           |      |" in out
    vlan = cli.json("net-create", "tenant", "10.1.0.0/24", "--vlan", "100")
    assert (vlan["vlan"], vlan["project"], vlan["gateway"]) == (100, "admin", "10.1.0.1")
    nets = cli.json("net-list")
    assert [(n["name"], n["cidr"], n["vlan"], n["project"]) for n in nets] == [
        ("private", "10.0.0.0/24", None, None), ("tenant", "10.1.0.0/24", 100, "admin")]
    assert {"id", "name", "cidr", "vlan", "project"} <= set(nets[0])
    # another project sees the flat network only, unless it asks for all
    assert [n["name"] for n in cli.json("net-list", "--project", "other")] == ["private"]
    table = cli.ok("--project", "other", "net-list", "--all-projects")
    assert table.splitlines()[1].endswith("| VLAN | Project |")
    assert len(table.splitlines()) == 6


def test_images(cli: Cli) -> None:
    out = cli.ok("image-create", "cirros", "--visibility", "public", "--disk-format", "raw")
    assert "| disk_format      | raw " in out and "| is_public        | True " in out
    cli.ok("--project", "other", "image-create", "secret")
    assert [i["name"] for i in cli.json("image-list", "--project", "other")] == [
        "cirros", "secret"]
    images = cli.json("image-list")
    assert [(i["name"], i["disk_format"], i["visibility"]) for i in images] == [
        ("cirros", "raw", "public")]


# --------------------------------------------------------------------------- servers and ports


@pytest.fixture
def booted(cli: Cli) -> Cli:
    """A cloud with a network, an image, groups web/db and server vm1 (web) on host h1."""
    cli.ok("net-create", "private", "10.0.0.0/24")
    cli.ok("image-create", "cirros", "--visibility", "public")
    cli.ok("secgroup-create", "web", "web servers")
    cli.ok("secgroup-create", "db", "databases")
    cli.ok("boot", "vm1", "--flavor", "m1.tiny", "--image", "cirros", "--host", "h1",
           "--security-groups", "web")
    return cli


def test_boot_prints_the_server(booted: Cli) -> None:
    out = booted.ok("boot", "vm2", "--flavor", "2", "--image", "cirros", "--host", "h2",
                    "--security-groups", "web,db", "--nic", "net-id=private")
    assert "| security_groups        | [{u'name': u'web'}, {u'name': u'db'}]" in out
    assert "| private network        | 10.0.0.3 " in out
    server = booted.json("show", "vm2")
    assert server["flavor"] == "m1.small (2)" and server["host"] == "h2"
    assert server["security_groups"] == [{"name": "web"}, {"name": "db"}]
    assert server["networks"] == {"private": ["10.0.0.3"]}
    by_id = booted.json("show", server["id"])
    assert by_id == server
    json_boot = booted.json("boot", "vm3", "--flavor", "1", "--image", "cirros", "--host", "h2")
    assert json_boot["security_groups"] == [{"name": "default"}]


def test_list_and_show(booted: Cli) -> None:
    booted.ok("--project", "other", "boot", "x", "--flavor", "1", "--image", "cirros",
              "--host", "h1")
    table = booted.ok("list")
    assert table.splitlines()[1].split("|")[2:6] == [
        " Name ", " Status ", " Host ", " Networks         "]
    assert "| vm1  | ACTIVE | h1   | private=10.0.0.2 |" in table
    assert len(table.splitlines()) == 5
    everyone = booted.json("list", "--all-projects")
    assert [(s["name"], s["project"]) for s in everyone] == [("vm1", "admin"), ("x", "other")]
    assert "| Project |" in booted.ok("list", "--all-projects").splitlines()[1]
    on_h1 = booted.json("list", "--host", "h1")
    assert {s["name"] for s in on_h1} == {"vm1", "x"}
    assert booted.json("list", "--host", "nowhere") == []
    show = booted.ok("show", "vm1")
    assert show.splitlines()[1].startswith("| Property               | Value ")
    assert "| status                 | ACTIVE " in show


def test_secgroup_membership(booted: Cli) -> None:
    assert booted.ok("add-secgroup", "vm1", "db") == ""
    assert [g["name"] for g in booted.json("list-secgroup", "vm1")] == ["web", "db"]
    assert "| db   | databases   |" in booted.ok("list-secgroup", "vm1")
    assert booted.ok("remove-secgroup", "vm1", "web") == ""
    assert [g["name"] for g in booted.json("list-secgroup", "vm1")] == ["db"]
    booted.ok("secgroup-delete", "web")  # no longer in use


def test_delete_server_frees_its_ports(booted: Cli) -> None:
    assert len(booted.json("port-list")) == 1
    assert booted.ok("delete", "vm1") == ""
    assert booted.json("list") == []
    assert booted.json("port-list") == []
    booted.ok("secgroup-delete", "web")


def test_port_list(booted: Cli) -> None:
    booted.ok("--project", "other", "boot", "x", "--flavor", "1", "--image", "cirros",
              "--host", "h1")
    booted.ok("boot", "vm2", "--flavor", "1", "--image", "cirros", "--host", "h2")
    mine = booted.json("port-list")
    assert sorted(p["instance"] for p in mine) == ["vm1", "vm2"]
    on_h1 = booted.json("port-list", "--host", "h1")
    assert sorted((p["instance"], p["project"]) for p in on_h1) == [
        ("vm1", "admin"), ("x", "other")]
    for port in on_h1:
        assert port["tap"] == tap_name(port["id"]) == "tap" + port["id"][:11]
        assert port["mac"].startswith(MAC_PREFIX + ":")
        assert port["network"] == "private"
    vm1 = next(p for p in on_h1 if p["instance"] == "vm1")
    assert vm1["security_groups"] == ["web"] and vm1["ip"] == "10.0.0.2"
    table = booted.ok("port-list", "--host", "h1")
    assert table.splitlines()[1] == (
        "| ID                                   | Instance | Host | Network | Tap            "
        "| MAC               | IP       | IPv6 | Security Groups |")
    assert f"| {vm1['tap']} | {vm1['mac']} | 10.0.0.2 |      | web             |" in table


def test_exhausted_network(cli: Cli) -> None:
    cli.ok("net-create", "tiny", "10.9.0.0/30")
    cli.ok("image-create", "cirros")
    first = cli.json("boot", "a", "--flavor", "1", "--image", "cirros", "--host", "h1")
    assert first["networks"] == {"tiny": ["10.9.0.2"]}
    line = cli.fails("boot", "b", "--flavor", "1", "--image", "cirros", "--host", "h1", code=4)
    assert "no free address" in line
    cli.ok("delete", "a")
    cli.ok("boot", "b", "--flavor", "1", "--image", "cirros", "--host", "h1")


# --------------------------------------------------------------------------- quotas


def test_quota_show_and_update(cli: Cli) -> None:
    defaults = {"security_groups": 10, "security_group_rules": 20, "instances": 10,
                "cores": 20, "ram": 51200, "volumes": 10, "gigabytes": 1000, "snapshots": 10,
                "floating_ips": 10}
    assert cli.json("quota-show") == defaults
    assert "| security_group_rules | 20    |" in cli.ok("quota-show")
    updated = cli.json("quota-update", "--security-groups", "3", "--security-group-rules", "-1")
    assert updated == {**defaults, "security_groups": 3, "security_group_rules": -1}
    assert cli.json("quota-show") == updated
    assert cli.json("quota-show", "--project", "other")["security_groups"] == 10


def test_group_quota_exceeded(cli: Cli) -> None:
    cli.ok("quota-update", "--security-groups", "2")
    cli.ok("secgroup-create", "one", "the default group counts too")
    line = cli.fails("secgroup-create", "two", "over quota", code=5)
    assert "security_groups" in line
    line = cli.fails("quota-update", "--security-groups", "1", code=5)
    assert "security_groups" in line


def test_rule_quota_exceeded(cli: Cli) -> None:
    cli.ok("quota-update", "--security-group-rules", "2")
    cli.ok("secgroup-create", "web", "web")
    cli.ok("secgroup-add-rule", "web", "tcp", "80", "80", "0.0.0.0/0")
    cli.ok("secgroup-add-group-rule", "web", "default")
    line = cli.fails("secgroup-add-rule", "web", "tcp", "443", "443", "0.0.0.0/0", code=5)
    assert "security_group_rules" in line
    cli.fails("secgroup-add-group-rule", "web", "web", code=5)
    line = cli.fails("quota-update", "--security-group-rules", "1", code=5)
    assert "security_group_rules" in line
    cli.ok("quota-update", "--security-group-rules", "3")
    cli.ok("secgroup-add-rule", "web", "tcp", "443", "443", "0.0.0.0/0")


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def cloud(cli: Cli, api: Api) -> Cli:
    """web (tcp 80 from anywhere; tcp 5432 from db) used by vm1; db; spare; net; cirros."""
    api.net_create("admin", "net", "10.0.0.0/24")
    api.image_create("admin", "cirros", visibility="public")
    api.secgroup_create("admin", "web", "web servers")
    api.secgroup_create("admin", "db", "databases")
    api.secgroup_create("admin", "spare", "unused")
    api.secgroup_add_rule("admin", "web", "tcp", "80", "80", "0.0.0.0/0")
    api.secgroup_add_group_rule("admin", "web", "db", "tcp", "5432", "5432")
    api.boot("admin", "vm1", "m1.tiny", "cirros", "h1", ["web"])
    return cli


RULE = ("secgroup-add-rule", "spare")
BOOT = ("boot", "x", "--flavor", "1", "--image", "cirros")
BAD_INPUT: list[tuple[tuple[str, ...], int, str]] = [
    # docs/semantics.md, "Validation"
    ((*RULE, "foo", "1", "2", "0.0.0.0/0"), 2, "Invalid IP protocol foo."),
    ((*RULE, "gre", "1", "2", "0.0.0.0/0"), 2, "Invalid IP protocol gre."),
    ((*RULE, "tcp", "x", "22", "0.0.0.0/0"), 2, "from-port must be an integer"),
    ((*RULE, "udp", "22", "2.5", "0.0.0.0/0"), 2, "to-port must be an integer"),
    ((*RULE, "icmp", "a", "0", "0.0.0.0/0"), 2, "Type and Code must be integers"),
    ((*RULE, "icmp", "0", "", "0.0.0.0/0"), 2, "Type and Code must be integers"),
    ((*RULE, "tcp", "90", "80", "0.0.0.0/0"), 2, "from-port 90 is greater than to-port 80"),
    ((*RULE, "tcp", "0", "0", "0.0.0.0/0"), 2, "port 0 is not in the range 1..65535"),
    ((*RULE, "tcp", "1", "65536", "0.0.0.0/0"), 2, "port 65536 is not in the range 1..65535"),
    ((*RULE, "udp", "-1", "-1", "0.0.0.0/0"), 2, "1..65535"),
    ((*RULE, "icmp", "256", "0", "0.0.0.0/0"), 2, "ICMP type 256 is not in the range -1..255"),
    ((*RULE, "icmp", "0", "256", "0.0.0.0/0"), 2, "ICMP code 256 is not in the range -1..255"),
    ((*RULE, "icmp", "-2", "0", "0.0.0.0/0"), 2, "-1..255"),
    ((*RULE, "tcp", "1", "2", "bad"), 2, "bad is not a valid IP network."),
    ((*RULE, "tcp", "1", "2", "15.0.0.0/0"), 2, "15.0.0.0/0 is not a valid IP network"),
    ((*RULE, "tcp", "1", "2", "10.0.0.0/33"), 2, "10.0.0.0/33 is not a valid IP network."),
    ((*RULE, "tcp", "1", "2", "10.1.2.3/24"), 2, "host bits are set (did you mean 10.1.2.0/24?)"),
    ((*RULE, "tcp", "1", "2", "::/0"), 2, "::/0 is not an IPv4 network"),
    (("secgroup-add-rule", "web", "tcp", "80", "80", "0.0.0.0/0"), 4,
     "This rule already exists in group 'web'"),
    (("secgroup-add-rule", "web", "TCP", "80", "80", "0.0.0.0/0"), 4, "already exists"),
    (("secgroup-add-group-rule", "web", "db", "tcp", "5432", "5432"), 4, "already exists"),
    (("secgroup-add-group-rule", "web", "db", "tcp", "22"), 2, "give all of"),
    (("secgroup-list-rules", "nosuch"), 3, "Security group 'nosuch' not found"),
    (("--project", "other", "secgroup-list-rules", "web"), 3, "not found in project 'other'"),
    (("secgroup-add-rule", "nosuch", "tcp", "1", "2", "0.0.0.0/0"), 3, "not found"),
    (("secgroup-delete", "nosuch"), 3, "not found"),
    (("secgroup-update", "nosuch", "a", "b"), 3, "not found"),
    (("secgroup-add-group-rule", "web", "nosuch"), 3, "Source group 'nosuch' not found"),
    (("secgroup-delete-rule", "web", "tcp", "81", "81", "0.0.0.0/0"), 3, "Rule not found"),
    (("secgroup-delete-group-rule", "web", "db"), 3, "Rule not found"),
    (("show", "nosuch"), 3, "No server with a name or ID of 'nosuch' exists"),
    (("delete", "nosuch"), 3, "No server"),
    (("list-secgroup", "nosuch"), 3, "No server"),
    (("add-secgroup", "nosuch", "web"), 3, "No server"),
    (("remove-secgroup", "nosuch", "web"), 3, "No server"),
    (("--project", "other", "show", "vm1"), 3, "No server"),
    (("secgroup-create", "", "d"), 2, "must not be empty"),
    (("secgroup-create", "   ", "d"), 2, "must not be empty or whitespace only"),
    (("secgroup-create", "x" * 256, "d"), 2, "longer than 255 characters"),
    (("secgroup-create", "a\nb", "d"), 2, "must not contain control characters"),
    (("secgroup-create", "a\tb", "d"), 2, "must not contain control characters"),
    (("secgroup-create", "ok", "d" * 256), 2, "description is longer than 255"),
    (("secgroup-create", "ok", "line\nbreak"), 2, "description must not contain control"),
    (("secgroup-create", "web", "again"), 4, "'web' already exists"),
    (("secgroup-update", "web", "db", "taken"), 4, "'db' already exists"),
    (("secgroup-update", "web", "", "d"), 2, "must not be empty"),
    (("secgroup-delete", "default"), 2, "the default security group cannot be deleted"),
    (("secgroup-update", "default", "other", "d"), 2, "cannot be renamed"),
    (("secgroup-delete", "web"), 6, "in use by instances: vm1"),
    (("secgroup-delete", "db"), 6, "is the source group of rules in: web"),
    # servers
    ((*BOOT, "--host", "h1", "--flavor", "m9.huge"), 3, "flavor 'm9.huge' not found"),
    (("boot", "x", "--flavor", "1", "--image", "nope", "--host", "h1"), 3, "image 'nope'"),
    ((*BOOT, "--host", "h1", "--nic", "net-id=nope"), 3, "network 'nope' not found"),
    ((*BOOT, "--host", "h1", "--nic", "nope"), 2, "expected net-id=NETWORK"),
    ((*BOOT, "--host", "h1", "--nic", "net-id=net", "--nic", "net-id=net"), 2,
     "listed more than once"),
    (("boot", "x", "--flavor", "1", "--host", "h1"), 2, "give --image, or boot from a volume"),
    ((*BOOT, "--host", ""), 2, "host must not be empty"),
    ((*BOOT, "--host", "a b"), 2, "must not contain whitespace"),
    ((*BOOT, "--host", "h1", "--security-groups", "nosuch"), 3, "'nosuch' not found"),
    ((*BOOT, "--host", "h1", "--security-groups", "web,,db"), 2, "empty security group name"),
    ((*BOOT, "--host", "h1", "--security-groups", "web,web"), 2, "more than once"),
    (("boot", "", "--flavor", "1", "--image", "cirros", "--host", "h1"), 2, "instance name"),
    (("add-secgroup", "vm1", "web"), 4, "already has security group 'web'"),
    (("remove-secgroup", "vm1", "db"), 3, "does not have security group 'db'"),
    (("add-secgroup", "vm1", "nosuch"), 3, "not found"),
    # networks and images
    (("net-create", "net2", "10.0.0.128/25"), 4, "overlaps network 'net'"),
    (("net-create", "big", "10.0.0.0/8"), 4, "overlaps"),
    (("net-create", "net", "10.5.0.0/24"), 4, "network 'net' already exists"),
    (("net-create", "v", "10.5.0.0/24", "--vlan", "0"), 2, "VLAN id 0 is not in the range"),
    (("net-create", "v", "10.5.0.0/24", "--vlan", "4095"), 2, "1..4094"),
    (("net-create", "v", "10.5.0.0/24", "--vlan", "-3"), 2, "1..4094"),
    (("net-create", "v", "10.5.0.0/24", "--vlan", "ten"), 2, "VLAN id must be an integer"),
    (("net-create", "v", "10.5.0.0/31"), 2, "too small"),
    (("net-create", "v", "10.5.0.1/24"), 2, "host bits"),
    (("net-create", "", "10.5.0.0/24"), 2, "network name"),
    (("image-create", "cirros"), 4, "image 'cirros' already exists"),
    (("image-create", "i", "--disk-format", "zip"), 2, "disk format 'zip'"),
    (("image-create", "i", "--visibility", "shared"), 2, "visibility 'shared'"),
    # quotas
    (("quota-update",), 2, "nothing to update"),
    (("quota-update", "--security-groups", "many"), 2, "security_groups must be an integer"),
    (("quota-update", "--security-group-rules", "-2"), 2, "-1 (unlimited) or a non-negative"),
    (("quota-update", "--security-groups", "3"), 5, "below the 4 groups"),
    (("quota-update", "--security-group-rules", "1"), 5, "below the 2 rules"),
    # usage errors
    (("secgroup-create",), 2, "Missing argument 'NAME'."),
    (("secgroup-create", "a"), 2, "Missing argument 'DESCRIPTION'."),
    (("secgroup-create", "a", "b", "c"), 2, "unexpected extra argument (c)"),
    (("secgroup-add-rule", "web", "tcp", "1"), 2, "Missing argument 'TO'."),
    (("--bogus", "secgroup-list"), 2, "No such option '--bogus'"),
    (("secgroup-list", "--bogus"), 2, "No such option '--bogus'"),
    (("secgroup-add-rule", "web", "tcp", "1", "2", "0.0.0.0/0", "-x"), 2, "No such option '-x'"),
    (("secgroup-list", "-f", "xml"), 2, "'xml' is not one of 'table', 'json'"),
    (("-f", "yaml", "secgroup-list"), 2, "'yaml' is not one of"),
    (("list", "--host"), 2, "Option '--host' requires an argument"),
    (("nosuch",), 2, "No such command 'nosuch'"),
    (("--project", "", "secgroup-list"), 2, "project must not be empty"),
    (("--project", "a\nb", "list"), 2, "project must not contain control characters"),
]


@pytest.mark.parametrize(("args", "code", "message"), BAD_INPUT,
                         ids=[" ".join(a)[:60] for a, _, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_changes_nothing(
    cloud: Cli, args: tuple[str, ...], code: int, message: str
) -> None:
    line = cloud.fails(*args, code=code)
    assert message in line


def test_bare_secfw_prints_help(cli: Cli) -> None:
    result = cli.runner.invoke(main, [])
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: secfw [OPTIONS] COMMAND [ARGS]...")
    assert result.stderr == ""
    line = cli.fails(code=2)  # options but no command: a usage error
    assert line == "secfw: error: Missing command. (see 'secfw --help')"


@pytest.mark.parametrize("help_flag", ["--help", "-h"])
def test_help(cli: Cli, help_flag: str) -> None:
    out = cli.ok(help_flag)
    assert "secgroup-add-rule" in out and "port-list" in out
    assert "FROM" in cli.ok("secgroup-add-rule", help_flag)


METACHAR_NAMES = [
    '"; flush ruleset',
    "$(reboot)",
    "{}",
    "'single' \"double\"",
    "`id`; rm -rf /",
    "a|b > c",
    "tab\\t and backslash \\",
    " leading and trailing ",
    "ünïcødé 名前 🔥",
    "x" * 255,
]


def test_metacharacter_names_are_plain_data(cli: Cli) -> None:
    cli.ok("quota-update", "--security-groups", "-1")
    cli.ok("net-create", METACHAR_NAMES[0], "10.0.0.0/16")
    cli.ok("image-create", METACHAR_NAMES[1])
    for name in METACHAR_NAMES:
        cli.ok("secgroup-create", name, name)
        cli.ok("secgroup-add-group-rule", name, name, "tcp", "1", "2")
        cli.ok("boot", name, "--flavor", "1", "--image", METACHAR_NAMES[1], "--host", "h1",
               "--security-groups", name)
    groups = cli.json("secgroup-list")
    assert [g["name"] for g in groups[1:]] == sorted(METACHAR_NAMES)
    assert all(g["name"] == g["description"] for g in groups[1:])
    table = cli.ok("secgroup-list")
    for name in METACHAR_NAMES:
        assert f"| {name} " in table
        [rule] = cli.json("secgroup-list-rules", name)
        assert rule["source_group"] == name
        assert cli.json("show", name)["security_groups"] == [{"name": name}]
        assert cli.json("show", name)["networks"] == {METACHAR_NAMES[0]: [
            cli.json("show", name)["networks"][METACHAR_NAMES[0]][0]]}
    assert sorted(s["name"] for s in cli.json("list")) == sorted(METACHAR_NAMES)
    assert cli.json("net-list")[0]["name"] == METACHAR_NAMES[0]
    assert cli.json("image-list")[0]["name"] == METACHAR_NAMES[1]
    for name in METACHAR_NAMES:
        cli.ok("delete", name)
        cli.ok("secgroup-delete", name)


def test_non_utf8_names_are_rejected(cli: Cli) -> None:
    bad = b"\xff\xfe".decode("utf-8", "surrogateescape")
    cli.fails("secgroup-create", bad, "d", code=2)
    cli.fails("secgroup-create", "ok", bad, code=2)


def test_default_group_created_on_first_use(cli: Cli, store_state: StoreState) -> None:
    revision = store_state(cli.store_url)[0]
    assert [g["name"] for g in cli.json("secgroup-list", "--project", "fresh")] == ["default"]
    created = store_state(cli.store_url)[0]
    assert created > revision  # one write (revisions are not consecutive on etcd)
    cli.json("secgroup-list", "--project", "fresh")
    assert store_state(cli.store_url)[0] == created  # the second read writes nothing
    assert cli.json("secgroup-list-rules", "default", "--project", "new2") == []


# --------------------------------------------------------------------------- global options


def test_global_options_before_and_after_the_command(cli: Cli) -> None:
    cli.ok("--project", "p1", "secgroup-create", "a", "made before")
    cli.ok("secgroup-create", "b", "made after", "--project", "p1")
    assert [g["name"] for g in cli.json("secgroup-list", "--project", "p1")] == [
        "default", "a", "b"]
    assert [g["name"] for g in cli.json("secgroup-list")] == ["default"]


def test_environment_variables(cli: Cli) -> None:
    env: dict[str, str | None] = {"SECFW_PROJECT": "envproj", "SECFW_STORE": cli.store_url}
    result = cli.runner.invoke(main, ["secgroup-create", "g", "from env"], env=env)
    assert result.exit_code == 0, result.stderr
    assert [g["project"] for g in cli.json("secgroup-list", "--all-projects")
            if g["name"] == "g"] == ["envproj"]
    # an explicit option beats the environment
    result = cli.runner.invoke(main, ["--project", "p2", "secgroup-list", "-f", "json"], env=env)
    assert '"project": "p2"' in result.stdout


def test_store_after_the_command(cli: Cli, tmp_path: Path) -> None:
    other = f"sqlite:///{tmp_path}/other.db"
    result = cli.runner.invoke(main, ["secgroup-create", "x", "y", "--store", other])
    assert result.exit_code == 0, result.stderr
    listing = cli.runner.invoke(main, ["--store", other, "-f", "json", "secgroup-list"])
    assert '"name": "x"' in listing.stdout
    assert "x" not in {g["name"] for g in cli.json("secgroup-list")}


def test_format_global_and_per_command(cli: Cli) -> None:
    assert cli.ok("-f", "json", "flavor-list").startswith("[")
    assert cli.ok("--format", "JSON", "flavor-list").startswith("[")
    assert cli.ok("-f", "json", "flavor-list", "-f", "table").startswith("+----+")
    assert cli.ok("flavor-list", "--format=json").startswith("[")
    assert cli.ok("-f", "json", "quota-show").startswith("{")


def test_empty_lists(cli: Cli) -> None:
    assert cli.json("list") == []
    assert cli.json("net-list") == []
    assert cli.ok("list").splitlines()[1] == "| ID | Name | Status | Host | Networks |"


# --------------------------------------------------------------------------- unexpected errors


def test_store_errors_are_one_line(cli: Cli, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, just some text" * 100)
    unreachable = "etcd://127.0.0.1:1"  # nothing listens on port 1: connection refused
    for url in (str(garbage), f"sqlite:///{garbage}", unreachable, "etcd://127.0.0.1",
                str(tmp_path)):
        result = cli.runner.invoke(main, ["--store", url, "secgroup-list"])
        assert result.exit_code == 7, (url, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("secfw: error: "), result.stderr
    assert garbage.read_bytes().startswith(b"this is not a database")


def test_unexpected_exception_is_one_line(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(Api, "secgroup_page", boom)
    line = cli.fails("secgroup-list", code=1)
    assert line == "secfw: error: internal error: RuntimeError: boom second line"
    result = cli.run("secgroup-list", env={"SECFW_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1] == line


def test_secfw_error_traceback_only_with_debug(cloud: Cli) -> None:
    result = cloud.run("secgroup-delete", "default", env={"SECFW_DEBUG": "1"})
    assert result.exit_code == 2 and "Traceback" in result.stderr
    assert "Traceback" not in cloud.run("secgroup-delete", "default").stderr


def test_console_script_errors_are_one_line(store_url: str) -> None:
    script = Path(sys.executable).with_name("secfw")
    assert script.exists(), script
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECFW_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), "--store", store_url, *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    assert run("secgroup-create", "web", "web").returncode == 0
    for args, code in [
        (("secgroup-add-rule", "web", "foo", "1", "2", "0.0.0.0/0"), 2),
        (("secgroup-add-rule", "nosuch", "tcp", "1", "2", "0.0.0.0/0"), 3),
        (("secgroup-delete", "default"), 2),
        (("secgroup-create",), 2),
        (("--nope",), 2),
    ]:
        proc = run(*args)
        assert proc.returncode == code, (args, proc.stderr)
        assert proc.stdout == ""
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("secfw: error: ")
    ok = run("secgroup-list-rules", "web", "-f", "json")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "[]\n", "")

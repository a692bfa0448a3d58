"""Random API command sequences (hypothesis, stateful) keep the cloud consistent.

Every step runs one API call, valid or not, then checks the invariants on the
raw store documents (not on the API's own indexes): referential integrity,
quotas, one ``default`` group per project, address and MAC allocation, tap
names, revision accounting, and that a failed call changed nothing.
"""

from __future__ import annotations

import ipaddress
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from secfw.api import Api
from secfw.cloud import CloudState
from secfw.errors import SecfwError
from secfw.model import (
    DEFAULT_GROUP,
    DEFAULT_QUOTA_SECURITY_GROUP_RULES,
    DEFAULT_QUOTA_SECURITY_GROUPS,
    MAC_PREFIX,
    UNLIMITED,
)
from secfw.store import open_store


def mostly(valid: list[Any], invalid: list[Any]) -> st.SearchStrategy[Any]:
    """Mostly valid values (so that sequences get somewhere), sometimes invalid ones."""
    return st.sampled_from(valid * 4 + invalid)


PROJECTS = mostly(["p1", "p2"], ["p3"])
ODD_NAME = '"; flush ruleset'
GROUPS = mostly(["default", "web", "db", ODD_NAME], ["nosuch"])
NEW_NAMES = mostly(["web", "db", ODD_NAME], ["default", "", "  ", "x" * 256, "a\nb"])
DESCRIPTIONS = mostly(["", "a description"], ["d" * 256, "line\nbreak"])
PROTOCOLS = mostly(["tcp", "udp", "icmp", "UDP"], ["foo", ""])
PORT_RANGES = mostly(
    [("22", "22"), ("80", "80"), ("1", "65535"), ("53", "53"), ("-1", "255"), ("8", "0")],
    [("0", "0"), ("80", "22"), ("1", "65536"), ("256", "0"), ("x", "1"), ("1", "")],
)
CIDRS = mostly(["0.0.0.0/0", "10.0.0.0/8", "192.168.0.0/24"], ["10.1.2.3/24", "bad", "::/0"])
SERVERS = mostly(["vm1", "vm2"], ["vm3", "nosuch"])
SERVER_GROUPS = st.one_of(st.just([]), st.just(["default"]), st.lists(GROUPS, max_size=3))
NETWORKS: st.SearchStrategy[list[str]] = st.one_of(
    st.just(["flat"]), st.just([]), st.lists(st.sampled_from(["flat", "vlan", "nope"]), max_size=2)
)
HOSTS = mostly(["h1", "h2"], ["", "h 1"])
QUOTAS = st.sampled_from([None, "-1", "0", "1", "2", "3", "5", "x"])
MATCH = st.one_of(st.none(), st.tuples(PROTOCOLS, PORT_RANGES))

#: usable addresses: 10.0.0.2-6 (flat, every project), 10.1.0.2 (VLAN 7, project p2 only)
FLAT_CIDR, VLAN_CIDR = "10.0.0.0/29", "10.1.0.0/30"


class CloudMachine(RuleBasedStateMachine):
    """A store driven by random API calls; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="secfw-invariants-")
        self.api = Api(open_store(f"sqlite:///{self.tmp}/secfw.db"))
        self.api.net_create("p1", "flat", FLAT_CIDR)
        self.api.net_create("p2", "vlan", VLAN_CIDR, vlan=7)
        self.api.image_create("p1", "img", visibility="public")
        self.follower = CloudState.from_snapshot(self.api.store.load())

    @initialize()
    def seed(self) -> None:
        """Start from a small populated cloud so that random steps hit existing objects."""
        for project in ("p1", "p2"):
            self.seed_project(project)

    def seed_project(self, project: str) -> None:
        api = self.api
        self.attempt(lambda: api.secgroup_create(project, "web", "web"))
        self.attempt(lambda: api.secgroup_create(project, "db", "db"))
        self.attempt(lambda: api.secgroup_add_rule(project, "web", "tcp", "80", "80",
                                                   "0.0.0.0/0"))
        self.attempt(lambda: api.secgroup_add_group_rule(project, "db", "web"))
        self.attempt(lambda: api.secgroup_create(project, ODD_NAME, "unused"))
        self.attempt(lambda: api.secgroup_add_group_rule(project, "db", ODD_NAME, "tcp", "22",
                                                         "22"))
        self.attempt(lambda: api.boot(project, "vm1", "m1.tiny", "img", "h1", ["web"],
                                      ["flat"]))

    def teardown(self) -> None:
        self.api.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def attempt(self, operation: Callable[[], object]) -> None:
        """Run one API call; check revision accounting and that a failure changed nothing."""
        before = self.api.store.load()
        try:
            operation()
            failed = False
        except SecfwError:
            failed = True
        after = self.api.store.load()
        if failed:
            assert after.revision == before.revision
            assert after.docs == before.docs
        else:
            changed = after.docs != before.docs
            assert after.revision == before.revision + int(changed)
        self.follow()

    def follow(self) -> None:
        """Replay the store's change feed onto the follower, as an agent does."""
        self.follower.apply_changes(*self.api.store.changes_since(self.follower.revision))

    # ------------------------------------------------------------------ groups and rules

    @rule(project=PROJECTS, name=NEW_NAMES, description=DESCRIPTIONS)
    def create_group(self, project: str, name: str, description: str) -> None:
        self.attempt(lambda: self.api.secgroup_create(project, name, description))

    @rule(project=PROJECTS, group=GROUPS, name=NEW_NAMES, description=DESCRIPTIONS)
    def update_group(self, project: str, group: str, name: str, description: str) -> None:
        self.attempt(lambda: self.api.secgroup_update(project, group, name, description))

    @rule(project=PROJECTS, group=GROUPS)
    def rewrite_group_unchanged(self, project: str, group: str) -> None:
        """Store a group as it already is: a success that must not bump the revision."""
        state = self.api.snapshot()
        found = state.groups.get(state.group_by_name.get((project, group), ""))
        description = found.description if found else ""
        self.attempt(lambda: self.api.secgroup_update(project, group, group, description))

    @rule(project=PROJECTS, group=GROUPS)
    def delete_group(self, project: str, group: str) -> None:
        self.attempt(lambda: self.api.secgroup_delete(project, group))

    @rule(project=PROJECTS)
    def list_groups(self, project: str) -> None:
        self.attempt(lambda: self.api.secgroup_list(project))

    @rule(project=PROJECTS, group=GROUPS, protocol=PROTOCOLS, ports=PORT_RANGES, cidr=CIDRS)
    def add_rule(self, project: str, group: str, protocol: str, ports: tuple[str, str],
                 cidr: str) -> None:
        self.attempt(lambda: self.api.secgroup_add_rule(project, group, protocol, *ports, cidr))

    @rule(project=PROJECTS, group=GROUPS, protocol=PROTOCOLS, ports=PORT_RANGES, cidr=CIDRS)
    def delete_rule(self, project: str, group: str, protocol: str, ports: tuple[str, str],
                    cidr: str) -> None:
        self.attempt(
            lambda: self.api.secgroup_delete_rule(project, group, protocol, *ports, cidr))

    @rule(project=PROJECTS, group=GROUPS, source=GROUPS, match=MATCH)
    def add_group_rule(self, project: str, group: str, source: str,
                       match: tuple[str, tuple[str, str]] | None) -> None:
        protocol, (low, high) = match or (None, (None, None))
        self.attempt(lambda: self.api.secgroup_add_group_rule(project, group, source,
                                                               protocol, low, high))

    @rule(project=PROJECTS, group=GROUPS, source=GROUPS, match=MATCH)
    def delete_group_rule(self, project: str, group: str, source: str,
                          match: tuple[str, tuple[str, str]] | None) -> None:
        protocol, (low, high) = match or (None, (None, None))
        self.attempt(lambda: self.api.secgroup_delete_group_rule(project, group, source,
                                                                  protocol, low, high))

    @rule(project=PROJECTS, groups=QUOTAS, rules=QUOTAS)
    def update_quota(self, project: str, groups: str | None, rules: str | None) -> None:
        self.attempt(lambda: self.api.quota_update(project, groups, rules))

    # ------------------------------------------------------------------ instances

    @rule(project=PROJECTS, name=SERVERS, groups=SERVER_GROUPS, networks=NETWORKS, host=HOSTS)
    def boot(self, project: str, name: str, groups: list[str], networks: list[str],
             host: str) -> None:
        self.attempt(lambda: self.api.boot(project, name, "m1.tiny", "img", host, groups,
                                           networks))

    @rule(project=PROJECTS, server=SERVERS)
    def delete_server(self, project: str, server: str) -> None:
        self.attempt(lambda: self.api.delete(project, server))

    @rule(project=PROJECTS, server=SERVERS, group=GROUPS)
    def add_secgroup(self, project: str, server: str, group: str) -> None:
        self.attempt(lambda: self.api.add_secgroup(project, server, group))

    @rule(project=PROJECTS, server=SERVERS, group=GROUPS)
    def remove_secgroup(self, project: str, server: str, group: str) -> None:
        self.attempt(lambda: self.api.remove_secgroup(project, server, group))

    # ------------------------------------------------------------------ invariants

    def docs(self, kind: str) -> dict[str, dict[str, Any]]:
        """Every stored document of one kind, by id (raw: not through the API's indexes)."""
        docs: dict[str, dict[str, Any]] = self.api.store.load().docs.get(kind, {})
        return docs

    @invariant()
    def rules_reference_existing_groups_of_their_project(self) -> None:
        groups = self.docs("secgroup")
        for rule_doc in self.docs("rule").values():
            assert rule_doc["group_id"] in groups, "rule of a deleted group"
            owner = groups[rule_doc["group_id"]]
            remote = rule_doc["remote_group_id"]
            if remote is not None:
                assert remote in groups, "rule whose source group was deleted"
                assert groups[remote]["project"] == owner["project"]

    @invariant()
    def every_project_has_exactly_one_default_group(self) -> None:
        groups = self.docs("secgroup").values()
        projects = {g["project"] for g in groups}
        projects |= {i["project"] for i in self.docs("instance").values()}
        projects |= set(self.docs("quota"))
        names = Counter((g["project"], g["name"]) for g in groups)
        assert all(count == 1 for count in names.values()), names
        for project in projects:
            assert names[(project, DEFAULT_GROUP)] == 1, project

    @invariant()
    def quotas_hold(self) -> None:
        groups = self.docs("secgroup")
        quotas = self.docs("quota")
        per_project = Counter(g["project"] for g in groups.values())
        per_group = Counter(r["group_id"] for r in self.docs("rule").values())
        for project, count in per_project.items():
            quota = quotas.get(project, {})
            limit = quota.get("security_groups", DEFAULT_QUOTA_SECURITY_GROUPS)
            assert limit == UNLIMITED or count <= limit
        for group_id, count in per_group.items():
            quota = quotas.get(groups[group_id]["project"], {})
            limit = quota.get("security_group_rules", DEFAULT_QUOTA_SECURITY_GROUP_RULES)
            assert limit == UNLIMITED or count <= limit

    @invariant()
    def addresses_are_unique_and_allocatable(self) -> None:
        networks = self.docs("network")
        ports = self.docs("port").values()
        pairs = [(p["network_id"], p["ip"]) for p in ports]
        assert len(pairs) == len(set(pairs))
        for network_id, ip in pairs:
            net = ipaddress.ip_network(networks[network_id]["cidr"])
            address = ipaddress.ip_address(ip)
            assert address in net
            reserved = (net.network_address, net.network_address + 1, net.broadcast_address)
            assert address not in reserved

    @invariant()
    def macs_are_unique_with_the_openstack_prefix(self) -> None:
        macs = [p["mac"] for p in self.docs("port").values()]
        assert len(macs) == len(set(macs))
        assert all(m.startswith(MAC_PREFIX + ":") and len(m) == 17 for m in macs)

    @invariant()
    def ports_and_instances_are_consistent(self) -> None:
        groups = self.docs("secgroup")
        instances = self.docs("instance")
        ports = self.docs("port")
        networks = self.docs("network")
        for port in ports.values():
            assert port["instance_id"] in instances
            network = networks[port["network_id"]]
            owner = instances[port["instance_id"]]["project"]
            assert network["project"] in (None, owner)
        with_ports = {p["instance_id"] for p in ports.values()}
        for instance_id, instance in instances.items():
            assert instance_id in with_ports
            for group_id in instance["security_groups"]:
                assert groups[group_id]["project"] == instance["project"]

    @invariant()
    def tap_names_derive_from_port_ids(self) -> None:
        ports = self.docs("port")
        hosts = {i["host"] for i in self.docs("instance").values()}
        views = [v for host in sorted(hosts) for v in self.api.port_list("p1", host)]
        assert sorted(v.id for v in views) == sorted(ports)
        for view in views:
            assert view.tap == "tap" + view.id[:11]
            assert len(view.tap) <= 15

    @invariant()
    def change_feed_follower_matches_the_store(self) -> None:
        fresh = CloudState.from_snapshot(self.api.store.load())
        assert self.follower.revision == fresh.revision
        assert self.follower.records == fresh.records


CloudMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCloudInvariants = CloudMachine.TestCase

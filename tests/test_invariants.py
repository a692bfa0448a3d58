"""Random API command sequences (hypothesis, stateful) keep the cloud consistent.

Every step runs one API call, valid or not, then checks the invariants on the
raw store documents (not on the API's own indexes): referential integrity,
quotas, one ``default`` group per project, address and MAC allocation, tap
names, revision accounting, and that a failed call changed nothing. The compute
model's commands (flavors, keypairs, images with their bytes, snapshots,
instance metadata) run among them: flavors and keypairs stay unique, image
files match their records exactly (no orphan, no missing or altered file), and
the agent's compiler sees exactly the ports of the ACTIVE instances of a host.
So do scheduling, compute hosts, compute and volume quotas, volumes, attachments
and volume snapshots: a volume is attached to at most one (ACTIVE) instance, on
a device no other volume of it uses; no registered host is ever over capacity;
no project over a quota; an instance in ERROR has no host, no port, no volume.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from secfw import keypairs
from secfw.api import MAX_KEYPAIRS, Api
from secfw.cloud import CloudState
from secfw.compiler.build import compile_host
from secfw.errors import SecfwError
from secfw.model import (
    DEFAULT_GROUP,
    DEFAULT_QUOTA_CORES,
    DEFAULT_QUOTA_FLOATING_IPS,
    DEFAULT_QUOTA_GIGABYTES,
    DEFAULT_QUOTA_INSTANCES,
    DEFAULT_QUOTA_RAM,
    DEFAULT_QUOTA_SECURITY_GROUP_RULES,
    DEFAULT_QUOTA_SECURITY_GROUPS,
    DEFAULT_QUOTA_SNAPSHOTS,
    DEFAULT_QUOTA_VOLUMES,
    MAC_PREFIX,
    MAX_METADATA_ITEMS,
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

# the compute model
ADMINS = mostly(["admin"], ["p1"])
FLAVOR_REFS = mostly(["1", "m1.tiny", "10", "big", "priv"], ["nosuch"])
#: (name, id, ram, disk, vcpus, is_public): "priv" is private, "big" needs a big image
NEW_FLAVORS = mostly(
    [("big", "10", "4096", "20", "2", "true"), ("priv", "11", "512", "1", "1", "false"),
     ("tiny2", "12", "64", "0", "1", "true")],
    [("m1.tiny", "13", "512", "1", "1", "true"), ("dup", "1", "512", "1", "1", "true"),
     ("bad", "14", "0", "1", "1", "true"), ("bad", "15", "512", "-1", "1", "true"),
     ("bad", "16", "x", "1", "1", "true"), ("", "17", "1", "1", "1", "true"),
     ("bad", "18", "1", "1", "1", "maybe")],
)
SPEC_ITEMS = mostly([["gpu=true"], ["a=1", "b=2"], ["gpu"]], [[], ["=x"], ["k=" + "v" * 256]])


def _ed25519_public() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode() + " test"


PUBLIC_KEYS = mostly([_ed25519_public(), _ed25519_public()],
                     ["ssh-rsa AAAAB3NzaC1yc2E= broken", "not a key", "", "a\nb"])
KEYPAIR_NAMES = mostly(["k1", "k1", "k2"], ["", "x" * 256])
IMAGE_NAMES = st.sampled_from(["img2", "img3", "snap"] * 4 + ["", "img"])
IMAGE_DATA = st.sampled_from([None, b"same bytes", b"same bytes", b"other bytes", b"x" * 5000])
MIN_SIZES = st.sampled_from(["0"] * 12 + ["1", "10", "8192", "-1", "x"])
PROPERTIES = mostly([[], ["os_distro=cirros"], ["a=b", "c=d"]], [["novalue"], ["=v"]])
META_SET = mostly([["role=web"], ["a=1", "b=2"], ["role=db", "a=3"]],
                 [[], ["k=" + "v" * 256], ["role"]])
META_KEYS = mostly([["role"], ["a", "b"], ["a"]], [[], ["a=1"]])
KEY_NAMES = mostly([None, None, "k1"], ["k9"])

# scheduling and volumes
SCHED_HOSTS = mostly(["h1", "h2", "h3"], ["", "h 3"])
#: (vcpus, ram_mb, disk_gb): room for a few m1.tiny (1 vCPU, 512 MB, 1 GB), or none
CAPACITIES = mostly([("2", "1024", "2"), ("4", "4096", "20"), ("1", "512", "1")],
                    [("0", "1", "1"), ("1", "x", "1")])
HOST_PROPERTIES = mostly([[], ["gpu=true"]], [["novalue"]])
COMPUTE_QUOTAS = st.sampled_from([None, None, "-1", "0", "1", "2", "3", "1024", "x"])
VOLUME_REFS = mostly(["v1", "v2", "boot"], ["nosuch"])
SNAPSHOT_REFS = mostly(["s1", "s2"], ["nosuch"])
VOLUME_SIZES = mostly(["1", "2", "5"], ["0", "x"])
DEVICES = mostly([None, "vdb", "/dev/vdc"], ["vda", "eth0"])
MAPPINGS = mostly(["vda=boot:::1", "vda=boot:::0", "vda=s1:snap::1", "vdb=v1:::0"],
                  ["vda=boot::9:0", "vda=nosuch:::0", "vda=", "vda=boot:::maybe"])

#: usable addresses: 10.0.0.2-6 (flat, every project), 10.1.0.2 (VLAN 7, project p2 only)
FLAT_CIDR, VLAN_CIDR = "10.0.0.0/29", "10.1.0.0/30"

# floating IPs: two small pools, allocated from .2 up (a /30 has one address:
# exhaustion is reachable)
POOL_NAMES = mostly(["public", "ext"], ["nosuch", ""])
POOL_CIDRS = mostly(["192.0.2.0/29", "198.51.100.0/30"],
                    [FLAT_CIDR, "192.0.2.0/28", "bad", "2001:db8::/64"])
ALLOCATE_FROM = st.one_of(st.none(), POOL_NAMES)
FLOATING_ADDRESSES = mostly(["192.0.2.2", "192.0.2.3", "192.0.2.4", "198.51.100.2"],
                            ["192.0.2.1", "198.51.100.3", "203.0.113.1", "bad"])
FIXED_ADDRESSES = mostly([None], ["10.0.0.2", "10.1.0.2", "1.2.3.4", "x"])


class CloudMachine(RuleBasedStateMachine):
    """A store driven by random API calls; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="secfw-invariants-")
        self.api = Api(open_store(f"sqlite:///{self.tmp}/secfw.db"))
        self.image_dir = f"{self.tmp}/secfw.db-images"
        self.api.net_create("p1", "flat", FLAT_CIDR)
        self.api.net_create("p2", "vlan", VLAN_CIDR, vlan=7)
        self.api.image_create("p1", "img", visibility="public")
        self.follower = CloudState.from_snapshot(self.api.store.load())

    @initialize()
    def seed(self) -> None:
        """Start from a small populated cloud so that random steps hit existing objects."""
        for project in ("p1", "p2"):
            self.seed_project(project)
        self.attempt(lambda: self.api.host_add("admin", "h3", "2", "1024", "2"))
        self.attempt(lambda: self.api.floating_pool_create("admin", "public", "192.0.2.0/29"))
        for project, address in (("p1", "192.0.2.2"), ("p2", "192.0.2.3")):
            # associated from the start: server deletes and moves then hit live mappings
            self.attempt(lambda p=project: self.api.floating_ip_create(p, "public"))
            self.attempt(lambda p=project, a=address: self.api.add_floating_ip(p, "vm1", a))

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
        self.attempt(lambda: api.volume_create(project, "2", "v1"))
        self.attempt(lambda: api.volume_create(project, "1", "boot"))
        self.attempt(lambda: api.snapshot_create(project, "v1", name="s1"))

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

    # ------------------------------------------------------------------ flavors, keypairs

    @rule(project=ADMINS, flavor=NEW_FLAVORS)
    def create_flavor(self, project: str, flavor: tuple[str, str, str, str, str, str]) -> None:
        name, flavor_id, ram, disk, vcpus, public = flavor
        self.attempt(lambda: self.api.flavor_create(project, name, flavor_id, ram, disk, vcpus,
                                                    is_public=public))

    @rule(project=ADMINS, flavor=FLAVOR_REFS)
    def delete_flavor(self, project: str, flavor: str) -> None:
        self.attempt(lambda: self.api.flavor_delete(project, flavor))

    @rule(project=ADMINS, flavor=FLAVOR_REFS, action=mostly(["set", "unset"], ["modify"]),
          items=SPEC_ITEMS)
    def flavor_key(self, project: str, flavor: str, action: str, items: list[str]) -> None:
        self.attempt(lambda: self.api.flavor_key(project, flavor, action, items))

    @rule(project=ADMINS, flavor=mostly(["priv"], ["1", "nosuch"]), tenant=PROJECTS,
          add=st.booleans())
    def flavor_access(self, project: str, flavor: str, tenant: str, add: bool) -> None:
        self.attempt(lambda: self.api.flavor_access(project, flavor, tenant, add))

    @rule(project=PROJECTS, name=KEYPAIR_NAMES, key=PUBLIC_KEYS)
    def add_keypair(self, project: str, name: str, key: str) -> None:
        self.attempt(lambda: self.api.keypair_add(project, name, key))

    @rule(project=PROJECTS, name=KEYPAIR_NAMES)
    def delete_keypair(self, project: str, name: str) -> None:
        self.attempt(lambda: self.api.keypair_delete(project, name))

    # ------------------------------------------------------------------ images

    @rule(project=PROJECTS, name=IMAGE_NAMES, data=IMAGE_DATA, min_disk=MIN_SIZES,
          min_ram=MIN_SIZES, properties=PROPERTIES, public=st.booleans())
    def create_image(self, project: str, name: str, data: bytes | None, min_disk: str,
                     min_ram: str, properties: list[str], public: bool) -> None:
        stream = io.BytesIO(data) if data is not None else None
        self.attempt(lambda: self.api.image_create(
            project, name, "raw", "public" if public else "private", min_disk=min_disk,
            min_ram=min_ram, properties=properties, data=stream))

    @rule(project=PROJECTS, image=IMAGE_NAMES, name=st.one_of(st.none(), IMAGE_NAMES),
          min_disk=st.one_of(st.none(), MIN_SIZES), properties=PROPERTIES,
          purge=st.booleans())
    def update_image(self, project: str, image: str, name: str | None, min_disk: str | None,
                     properties: list[str], purge: bool) -> None:
        self.attempt(lambda: self.api.image_update(project, image, name=name,
                                                   min_disk=min_disk, properties=properties,
                                                   purge_props=purge))

    @rule(project=st.sampled_from(["p1", "p2"]), image=IMAGE_NAMES)
    def delete_image(self, project: str, image: str) -> None:
        self.attempt(lambda: self.api.image_delete(project, image))

    @rule(project=PROJECTS, server=SERVERS, name=IMAGE_NAMES)
    def snapshot(self, project: str, server: str, name: str) -> None:
        self.attempt(lambda: self.api.image_snapshot(project, server, name))

    # ------------------------------------------------------------------ instance data

    @rule(project=PROJECTS, name=SERVERS, flavor=FLAVOR_REFS,
          image=mostly(["img", "img2", "img3", "snap"], ["nosuch"]), key_name=KEY_NAMES,
          meta=META_SET, user_data=mostly([None, b"#!/bin/sh\n", b"u" * 49149], [b"u" * 49150]))
    def boot_with_data(self, project: str, name: str, flavor: str, image: str,
                       key_name: str | None, meta: list[str], user_data: bytes | None) -> None:
        self.attempt(lambda: self.api.boot(project, name, flavor, image, "h1", None, ["flat"],
                                           key_name=key_name, meta=meta, user_data=user_data))

    @rule(project=PROJECTS, server=SERVERS, items=META_SET)
    def meta_set(self, project: str, server: str, items: list[str]) -> None:
        self.attempt(lambda: self.api.meta(project, server, "set", items))

    @rule(project=PROJECTS, server=SERVERS, action=mostly(["delete"], ["unset"]),
          items=META_KEYS)
    def meta_delete(self, project: str, server: str, action: str, items: list[str]) -> None:
        self.attempt(lambda: self.api.meta(project, server, action, items))

    # ------------------------------------------------------------------ scheduling

    @rule(project=ADMINS, name=SCHED_HOSTS, capacity=CAPACITIES, properties=HOST_PROPERTIES)
    def add_host(self, project: str, name: str, capacity: tuple[str, str, str],
                 properties: list[str]) -> None:
        self.attempt(lambda: self.api.host_add(project, name, *capacity, properties))

    @rule(project=ADMINS, name=SCHED_HOSTS)
    def delete_host(self, project: str, name: str) -> None:
        self.attempt(lambda: self.api.host_delete(project, name))

    @rule(project=PROJECTS, name=SERVERS, flavor=FLAVOR_REFS)
    def boot_scheduled(self, project: str, name: str, flavor: str) -> None:
        self.attempt(lambda: self.api.boot(project, name, flavor, "img", None, None, ["flat"]))

    @rule(project=PROJECTS, instances=COMPUTE_QUOTAS, cores=COMPUTE_QUOTAS, ram=COMPUTE_QUOTAS,
          volumes=COMPUTE_QUOTAS, gigabytes=COMPUTE_QUOTAS, snapshots=COMPUTE_QUOTAS)
    def update_compute_quota(self, project: str, instances: str | None, cores: str | None,
                             ram: str | None, volumes: str | None, gigabytes: str | None,
                             snapshots: str | None) -> None:
        self.attempt(lambda: self.api.quota_update(
            project, instances=instances, cores=cores, ram=ram, volumes=volumes,
            gigabytes=gigabytes, snapshots=snapshots))

    # ------------------------------------------------------------------ volumes

    @rule(project=PROJECTS, name=VOLUME_REFS, size=VOLUME_SIZES,
          snapshot=st.one_of(st.none(), SNAPSHOT_REFS))
    def create_volume(self, project: str, name: str, size: str, snapshot: str | None) -> None:
        self.attempt(lambda: self.api.volume_create(project, size, name, snapshot=snapshot))

    @rule(project=PROJECTS, volume=VOLUME_REFS)
    def delete_volume(self, project: str, volume: str) -> None:
        self.attempt(lambda: self.api.volume_delete(project, volume))

    @rule(project=PROJECTS, server=SERVERS, volume=VOLUME_REFS, device=DEVICES)
    def attach_volume(self, project: str, server: str, volume: str, device: str | None) -> None:
        self.attempt(lambda: self.api.volume_attach(project, server, volume, device))

    @rule(project=PROJECTS, server=SERVERS, volume=VOLUME_REFS)
    def detach_volume(self, project: str, server: str, volume: str) -> None:
        self.attempt(lambda: self.api.volume_detach(project, server, volume))

    @rule(project=PROJECTS, volume=VOLUME_REFS, force=st.booleans(), name=SNAPSHOT_REFS)
    def create_snapshot(self, project: str, volume: str, force: bool, name: str) -> None:
        self.attempt(lambda: self.api.snapshot_create(project, volume, force, name))

    @rule(project=PROJECTS, snapshot=SNAPSHOT_REFS)
    def delete_snapshot(self, project: str, snapshot: str) -> None:
        self.attempt(lambda: self.api.snapshot_delete(project, snapshot))

    @rule(project=PROJECTS, name=SERVERS, mapping=MAPPINGS,
          image=st.sampled_from([None, "img"]), host=st.sampled_from([None, "h1"]))
    def boot_from_volume(self, project: str, name: str, mapping: str, image: str | None,
                         host: str | None) -> None:
        self.attempt(lambda: self.api.boot(project, name, "m1.tiny", image, host, None,
                                           ["flat"], block_devices=[mapping]))

    # ------------------------------------------------------------------ floating IPs

    @rule(project=ADMINS, name=POOL_NAMES, cidr=POOL_CIDRS)
    def create_pool(self, project: str, name: str, cidr: str) -> None:
        self.attempt(lambda: self.api.floating_pool_create(project, name, cidr))

    @rule(project=ADMINS, name=POOL_NAMES)
    def delete_pool(self, project: str, name: str) -> None:
        self.attempt(lambda: self.api.floating_pool_delete(project, name))

    @rule(project=PROJECTS, pool=ALLOCATE_FROM)
    def allocate_floating_ip(self, project: str, pool: str | None) -> None:
        self.attempt(lambda: self.api.floating_ip_create(project, pool))

    @rule(project=PROJECTS, address=FLOATING_ADDRESSES)
    def release_floating_ip(self, project: str, address: str) -> None:
        self.attempt(lambda: self.api.floating_ip_delete(project, address))

    @rule(project=PROJECTS, server=SERVERS, address=FLOATING_ADDRESSES, fixed=FIXED_ADDRESSES)
    def associate_floating_ip(self, project: str, server: str, address: str,
                              fixed: str | None) -> None:
        self.attempt(lambda: self.api.add_floating_ip(project, server, address, fixed))

    @rule(project=PROJECTS, server=SERVERS, address=FLOATING_ADDRESSES)
    def dissociate_floating_ip(self, project: str, server: str, address: str) -> None:
        self.attempt(lambda: self.api.remove_floating_ip(project, server, address))

    @rule(project=PROJECTS, limit=QUOTAS)
    def update_floating_quota(self, project: str, limit: str | None) -> None:
        self.attempt(lambda: self.api.quota_update(project, floating_ips=limit))

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
            active = instance["state"] == "ACTIVE"
            assert (instance_id in with_ports) == active, instance
            assert (instance["fault"] is None) == active
            assert bool(instance["host"]) == active
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
    def flavors_are_unique_and_seeded_once(self) -> None:
        flavors = self.docs("flavor")
        names = Counter(f["name"] for f in flavors.values())
        assert all(count == 1 for count in names.values()), names
        assert all(doc_id == f["id"] for doc_id, f in flavors.items())
        if flavors:
            assert "flavors" in self.docs("setting")
        for flavor in flavors.values():
            assert len(set(flavor["access"])) == len(flavor["access"])
            assert not (flavor["is_public"] and flavor["access"])
            assert flavor["ram_mb"] >= 1 and flavor["vcpus"] >= 1 and flavor["disk_gb"] >= 0

    @invariant()
    def keypairs_are_unique_real_keys(self) -> None:
        pairs = self.docs("keypair").values()
        names = Counter((k["project"], k["name"]) for k in pairs)
        assert all(count == 1 for count in names.values()), names
        assert all(count <= MAX_KEYPAIRS for count in Counter(k["project"] for k in pairs).values())
        for pair in pairs:
            assert keypairs.check_public_key(pair["public_key"]) == pair["public_key"]
            assert pair["fingerprint"] == keypairs.fingerprint(pair["public_key"])

    @invariant()
    def image_files_match_their_records(self) -> None:
        """Every stored image's bytes are there, unaltered; no file is left over."""
        images = self.docs("image").values()
        named = {i["sha256"]: i for i in images if i["sha256"] is not None}
        files = set(os.listdir(self.image_dir)) - {".lock"} if os.path.isdir(
            self.image_dir) else set()
        assert files == set(named), (files, set(named))
        for digest, image in named.items():
            with open(os.path.join(self.image_dir, digest), "rb") as handle:
                content = handle.read()
            assert hashlib.sha256(content).hexdigest() == digest
            assert hashlib.md5(content).hexdigest() == image["checksum"]
            assert len(content) == image["size"]

    @invariant()
    def instance_data_is_bounded(self) -> None:
        for instance in self.docs("instance").values():
            assert len(instance["metadata"]) <= MAX_METADATA_ITEMS
            assert instance["updated"] >= instance["created"]

    @invariant()
    def the_compiler_sees_exactly_the_active_ports_of_each_host(self) -> None:
        state = CloudState.from_snapshot(self.api.store.load())
        for host in ("h1", "h2", "h3", ""):
            active = {port.tap for i in state.instances.values()
                      if i.host == host and i.state == "ACTIVE" for port in state.ports_of(i.id)}
            assert {p.tap for p in compile_host(state, host).ports} == active

    @invariant()
    def volumes_are_attached_once_to_active_instances_of_their_project(self) -> None:
        instances = self.docs("instance")
        volumes = self.docs("volume")
        devices = Counter((v["attached_to"], v["device"]) for v in volumes.values()
                          if v["attached_to"] is not None)
        assert all(count == 1 for count in devices.values()), devices
        for volume in volumes.values():
            if volume["attached_to"] is None:
                assert volume["device"] is None and not volume["delete_on_termination"]
                continue
            owner = instances[volume["attached_to"]]
            assert owner["project"] == volume["project"] and owner["state"] == "ACTIVE"
            assert volume["device"].startswith("/dev/")
        for snap in self.docs("volume_snapshot").values():
            assert volumes[snap["volume_id"]]["project"] == snap["project"]

    @invariant()
    def no_registered_host_is_over_capacity(self) -> None:
        instances = self.docs("instance").values()
        for name, host in self.docs("host").items():
            placed = [i for i in instances if i["host"] == name]
            for field, have in (("vcpus", "vcpus"), ("ram_mb", "ram_mb"),
                                ("disk_gb", "disk_gb")):
                assert sum(i[field] for i in placed) <= host[have], (name, field)

    @invariant()
    def compute_and_volume_quotas_hold(self) -> None:
        defaults = {"instances": DEFAULT_QUOTA_INSTANCES, "cores": DEFAULT_QUOTA_CORES,
                    "ram": DEFAULT_QUOTA_RAM, "volumes": DEFAULT_QUOTA_VOLUMES,
                    "gigabytes": DEFAULT_QUOTA_GIGABYTES, "snapshots": DEFAULT_QUOTA_SNAPSHOTS}
        quotas = self.docs("quota")
        used: dict[str, Counter[str]] = {}
        for i in self.docs("instance").values():
            used.setdefault(i["project"], Counter()).update(
                {"instances": 1, "cores": i["vcpus"], "ram": i["ram_mb"]})
        for v in self.docs("volume").values():
            used.setdefault(v["project"], Counter()).update(
                {"volumes": 1, "gigabytes": v["size_gb"]})
        for snap in self.docs("volume_snapshot").values():
            used.setdefault(snap["project"], Counter()).update(
                {"snapshots": 1, "gigabytes": snap["size_gb"]})
        for project, amounts in used.items():
            for name, amount in amounts.items():
                limit = quotas.get(project, {}).get(name, defaults[name])
                assert limit == UNLIMITED or amount <= limit, (project, name, amount, limit)

    @invariant()
    def floating_ips_are_allocated_once_from_a_pool_within_quota(self) -> None:
        """An address is one document (its id), inside an existing pool, and each
        project holds at most its ``floating_ips`` quota."""
        pools = self.docs("floatingpool")
        quotas = self.docs("quota")
        floating = self.docs("floatingip")
        for address, doc in floating.items():
            assert doc["id"] == address
            assert ipaddress.ip_address(address) in ipaddress.ip_network(
                pools[doc["pool_id"]]["cidr"]), doc
        for project, count in Counter(f["project"] for f in floating.values()).items():
            limit = quotas.get(project, {}).get("floating_ips", DEFAULT_QUOTA_FLOATING_IPS)
            assert limit == UNLIMITED or count <= limit, (project, count, limit)
        # (CIDR, private): only two VLAN networks may overlap; pools and flat never
        cidrs = [(ipaddress.ip_network(p["cidr"]), False) for p in pools.values()]
        cidrs += [(ipaddress.ip_network(n["cidr"]), n.get("vlan") is not None)
                  for n in self.docs("network").values()]
        assert not any(a.overlaps(b) and not (pa and pb)
                       for i, (a, pa) in enumerate(cidrs) for b, pb in cidrs[i + 1:])

    @invariant()
    def floating_ips_map_one_to_one_onto_live_ports_of_their_project(self) -> None:
        """An associated address names an existing port of an ACTIVE instance of
        its project and that port's current address (none dangles after a server
        delete); no fixed address carries two; the compiler maps exactly these."""
        instances = self.docs("instance")
        ports = self.docs("port")
        associated = [f for f in self.docs("floatingip").values() if f["port_id"] is not None]
        for doc in self.docs("floatingip").values():
            assert (doc["port_id"] is None) == (doc["fixed_ip"] is None), doc
        for doc in associated:
            assert doc["port_id"] in ports, ("dangling floating IP", doc)
            port = ports[doc["port_id"]]
            owner = instances[port["instance_id"]]
            assert owner["project"] == doc["project"] and owner["state"] == "ACTIVE"
            assert doc["fixed_ip"] == port["ip"]
        fixed = Counter(f["port_id"] for f in associated)
        assert all(count == 1 for count in fixed.values()), fixed
        state = CloudState.from_snapshot(self.api.store.load())
        for host in ("h1", "h2", "h3"):
            expected = {(f["id"], f["fixed_ip"]) for f in associated
                        if instances[ports[f["port_id"]]["instance_id"]]["host"] == host}
            compiled = {(n.floating, n.fixed) for n in compile_host(state, host).floating}
            assert compiled == expected, host

    @invariant()
    def change_feed_follower_matches_the_store(self) -> None:
        fresh = CloudState.from_snapshot(self.api.store.load())
        assert self.follower.revision == fresh.revision
        assert self.follower.records == fresh.records


CloudMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCloudInvariants = CloudMachine.TestCase

"""The benchmark cloud: one compute host with N ports, built through the Python API.

Workload (the one Neutron's iptables driver was measured with in its bug reports):

* 500 **host groups** ``g000``…``g499`` with 10 rules each. A third of all rules
  (global rule index divisible by 3) reference a **source group**; the others are
  an ICMP rule or TCP/UDP port rules from a CIDR.
* 500 **source groups** ``src000``…``src499``, each with ~50 members: 5,000
  instances on 50 *other* hosts, each in 5 source groups drawn at random. The
  ~1,670 remote-group rules reference ~480 distinct source groups, so a host
  holds ~480 address sets of ~50 addresses.
* N ports on the benchmarked host, one per instance, each with 20 host groups
  drawn from the 500. Every tenth port also has the **hot group** ``g000``, so
  it is used by N/10 ports (1,000 at N = 10,000): the "rule added to a group
  used by 1,000 ports" change edits it.
* Two **data-path instances** on the host, on two networks of their own (so
  their traffic is routed and reaches the group chains, not the same-net
  accept): ``dp-server`` (19 random host groups and, last, ``bench-dp``) and
  ``dp-client`` (``bench-dp``). ``bench-dp`` allows TCP and UDP 5201 (iperf3)
  and TCP 5301 (the new-connection tool, :mod:`secfw.bench.connrate`) from
  members of ``bench-dp``.

:class:`BenchCloud` grows the cloud in place (:meth:`BenchCloud.grow_to`), so one
store serves every size and the data-path instances keep their taps. Everything
random comes from one seeded :class:`random.Random`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from secfw.api import Api
from secfw.bench.connrate import CONN_PORT
from secfw.cloud import CloudState
from secfw.lab.hostlab import LabPort
from secfw.model import Instance

PROJECT = "bench"
FLAVOR = "m1.tiny"
IMAGE = "cirros"
HOST_GROUPS = 500
RULES_PER_GROUP = 10
SOURCE_GROUPS = 500
MEMBER_INSTANCES = 5_000
GROUPS_PER_MEMBER = 5
OTHER_HOSTS = 50
GROUPS_PER_PORT = 20
HOT_GROUP = "g000"
HOT_EVERY = 10
DP_GROUP = "bench-dp"
DP_PORT = 5201  # iperf3's default port
MAIN_NET = ("bench-net", "10.64.0.0/14")
DP_NETS = (("dp-a", "10.250.1.0/24"), ("dp-b", "10.250.2.0/24"))
DP_SERVER, DP_CLIENT = "dp-server", "dp-client"


def host_group(index: int) -> str:
    """Name of host group ``index`` (``g000``…)."""
    return f"g{index:03d}"


def source_group(index: int) -> str:
    """Name of source group ``index`` (``src000``…)."""
    return f"src{index:03d}"


@dataclass
class BenchCloud:
    """The benchmark cloud in a store, grown size by size (see the module doc)."""

    api: Api
    host: str
    seed: int = 1
    ports: int = 0
    host_instances: list[str] = field(default_factory=list)
    member_instances: list[str] = field(default_factory=list)
    extra: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    # ---- building

    def build_base(self) -> None:
        """Groups, rules, networks, source-group members and the data-path pair."""
        with self.api.batch():
            self.api.quota_update(PROJECT, security_groups=-1, security_group_rules=-1,
                                  instances=-1, cores=-1, ram=-1)
            self.api.image_create(PROJECT, IMAGE, visibility="public")
            self.api.net_create(PROJECT, *MAIN_NET)
            for name, cidr in DP_NETS:
                self.api.net_create(PROJECT, name, cidr)
            self._source_groups()
            self._host_groups()
            self._members()
            self._data_path_pair()

    def _source_groups(self) -> None:
        for index in range(SOURCE_GROUPS):
            name = source_group(index)
            self.api.secgroup_create(PROJECT, name, "benchmark source group")
            self.api.secgroup_add_rule(PROJECT, name, "icmp", "-1", "-1", "10.0.0.0/8")

    def _host_groups(self) -> None:
        for index in range(HOST_GROUPS):
            name = host_group(index)
            self.api.secgroup_create(PROJECT, name, "benchmark host group")
            for rule in range(RULES_PER_GROUP):
                self._add_rule(name, index * RULES_PER_GROUP + rule, rule)

    def _add_rule(self, group: str, global_index: int, rule: int) -> None:
        """Rule ``rule`` of ``group``: a source-group rule for every third rule overall."""
        port = str(1000 + global_index % 50_000)
        if global_index % 3 == 0:
            source = source_group(self.rng.randrange(SOURCE_GROUPS))
            self.api.secgroup_add_group_rule(PROJECT, group, source, "tcp", port, port)
        elif rule == 1:
            self.api.secgroup_add_rule(PROJECT, group, "icmp", "-1", "-1", "0.0.0.0/0")
        else:
            proto = "tcp" if rule % 2 else "udp"
            cidr = f"10.{global_index % 200}.{rule}.0/24" if rule % 4 else "0.0.0.0/0"
            self.api.secgroup_add_rule(PROJECT, group, proto, port, str(int(port) + rule), cidr)

    def _members(self) -> None:
        sources = [source_group(i) for i in range(SOURCE_GROUPS)]
        for index in range(MEMBER_INSTANCES):
            groups = self.rng.sample(sources, GROUPS_PER_MEMBER)
            host = f"other-{index % OTHER_HOSTS:02d}"
            instance = self._boot(f"member-{index:05d}", host, groups, MAIN_NET[0])
            self.member_instances.append(instance.id)

    def _data_path_pair(self) -> None:
        self.api.secgroup_create(PROJECT, DP_GROUP, "iperf3 between the data-path pair")
        for proto in ("tcp", "udp"):
            self.api.secgroup_add_group_rule(
                PROJECT, DP_GROUP, DP_GROUP, proto, str(DP_PORT), str(DP_PORT)
            )
        self.api.secgroup_add_group_rule(
            PROJECT, DP_GROUP, DP_GROUP, "tcp", str(CONN_PORT), str(CONN_PORT))
        groups = [*self._random_host_groups(GROUPS_PER_PORT - 1), DP_GROUP]
        self._boot(DP_SERVER, self.host, groups, DP_NETS[0][0])
        self._boot(DP_CLIENT, self.host, [DP_GROUP], DP_NETS[1][0])

    def grow_to(self, ports: int) -> None:
        """Add host ports (one instance each) until the host has ``ports`` of them."""
        with self.api.batch():
            while self.ports < ports:
                self.host_instances.append(self.boot_host_port().id)
                self.ports += 1

    def boot_host_port(self) -> Instance:
        """One more instance on the host with its 20 groups (the hot one every tenth)."""
        index = self.ports + self.extra
        hot = index % HOT_EVERY == 0
        groups = self._random_host_groups(GROUPS_PER_PORT - hot, exclude_hot=True)
        if hot:
            groups.insert(0, HOT_GROUP)
        return self._boot(f"vm-{index:06d}", self.host, groups, MAIN_NET[0])

    def _random_host_groups(self, count: int, exclude_hot: bool = False) -> list[str]:
        first = 1 if exclude_hot else 0
        return [host_group(i) for i in self.rng.sample(range(first, HOST_GROUPS), count)]

    def _boot(self, name: str, host: str, groups: list[str], net: str) -> Instance:
        return self.api.boot(PROJECT, name, FLAVOR, IMAGE, host, groups, [net])

    # ---- reading

    def data_path_ports(self, state: CloudState) -> tuple[LabPort, LabPort]:
        """Lab ports of (server, client), from the stored instances."""
        found: dict[str, LabPort] = {}
        for instance in state.instances.values():
            if instance.host == self.host and instance.name in (DP_SERVER, DP_CLIENT):
                port = state.ports_of(instance.id)[0]
                net = state.networks[port.network_id]
                found[instance.name] = LabPort(
                    port.tap, port.mac, port.ip, net.prefixlen, net.gateway, instance.name
                )
        return found[DP_SERVER], found[DP_CLIENT]


def describe() -> dict[str, object]:
    """The workload's parameters, for the report."""
    return {
        "host_groups": HOST_GROUPS,
        "rules_per_group": RULES_PER_GROUP,
        "remote_group_rules": "one rule in three (by global rule index)",
        "source_groups": SOURCE_GROUPS,
        "source_group_members": f"~{MEMBER_INSTANCES * GROUPS_PER_MEMBER // SOURCE_GROUPS} "
                                f"({MEMBER_INSTANCES:,} instances on {OTHER_HOSTS} other hosts, "
                                f"{GROUPS_PER_MEMBER} source groups each)",
        "groups_per_port": GROUPS_PER_PORT,
        "hot_group": f"{HOT_GROUP}, on every {HOT_EVERY}th port",
        "data_path_pair": f"{DP_SERVER} ({GROUPS_PER_PORT - 1} random groups + {DP_GROUP}) "
                          f"and {DP_CLIENT} ({DP_GROUP}), two /24 networks, routed",
        "allow_same_net_traffic": True,
    }

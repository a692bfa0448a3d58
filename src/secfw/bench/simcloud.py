"""The simulated many-host cloud of ``secfw.bench.manyhosts``: documents, then etcd.

Booting 50,000 instances through :class:`~secfw.api.Api` takes many minutes (each
boot validates against the whole batch), so only the *shape* is built through the
API — quotas, image, one /22 network per :data:`HOSTS_PER_NETWORK` hosts (a
flat network over 50,000 ports would put all their addresses in every host's
same-net set, and every boot would reach every host), :data:`GROUPS` groups with
:data:`RULES_PER_GROUP` rules each (every third rule a source-group rule, the
others a TCP port from 10.0.0.0/8) and one template instance — and the
instances and ports are then stamped from the template's documents: fresh
UUIDs, consecutive addresses, MACs derived from the index, ``GROUPS_PER_PORT``
groups drawn at random. :class:`~secfw.cloud.CloudState` parses the result (the
model's validation) before it is written.

Writing: one etcd transaction per :data:`BULK_DOCS` documents, which the
store's commit indexes (the lab's etcd allows 100,000 operations and 32 MiB per
request, :mod:`secfw.lab.etcdlocal`): ``store restore``'s batches of 100 would each
re-read the whole store.
"""

from __future__ import annotations

import ipaddress
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from secfw.api import Api
from secfw.cloud import CloudState
from secfw.store import open_store
from secfw.store.base import Doc, Snapshot
from secfw.store.etcd import EtcdStore

PROJECT = "sim"
SUPERNET = ipaddress.ip_network("10.64.0.0/14")
NETWORK_PREFIX = 22  # 1,022 addresses: HOSTS_PER_NETWORK hosts of 50 ports, or simbig
HOSTS_PER_NETWORK = 10
GROUPS = 500
RULES_PER_GROUP = 5
GROUPS_PER_PORT = 3
BULK_DOCS = 5_000
FIRST_RULE_PORT = 1000


def host_name(index: int) -> str:
    """Simulated host ``index`` (0-based): ``sim0001`` …"""
    return f"sim{index + 1:04d}"


def group_name(index: int) -> str:
    return f"g{index:03d}"


@dataclass
class SimCloud:
    """Every document of the simulated cloud, and the ids the bench needs."""

    docs: dict[str, dict[str, Doc]]
    group_ids: list[str]
    template: dict[str, Doc]  # "instance" and "port": what new instances are stamped from
    network_of: dict[str, str] = field(default_factory=dict)  # host -> network name

    @property
    def count(self) -> int:
        return sum(len(by_id) for by_id in self.docs.values())


def build(host_ports: dict[str, int], seed: int = 1) -> SimCloud:
    """The cloud with ``host_ports[host]`` instances (one port each) per host."""
    rng = random.Random(seed)
    hosts = sorted(host_ports)
    network_of = {h: network_name(i // HOSTS_PER_NETWORK) for i, h in enumerate(hosts)}
    shape = _shape(rng, len(set(network_of.values())))
    instances, ports = shape.docs.pop("instance"), shape.docs.pop("port")
    template = {"instance": next(iter(instances.values())), "port": next(iter(ports.values()))}
    shape.docs["instance"], shape.docs["port"] = {}, {}
    net_ids = {doc["name"]: (doc_id, ipaddress.ip_network(doc["cidr"]))
               for doc_id, doc in shape.docs["network"].items()}
    index, used = 0, dict.fromkeys(net_ids, 0)
    for host in hosts:
        net = network_of[host]
        for _ in range(host_ports[host]):
            instance, port = stamp(template, index, host,
                                   rng.sample(shape.group_ids, GROUPS_PER_PORT))
            port["network_id"] = net_ids[net][0]
            port["ip"] = str(net_ids[net][1].network_address + 2 + used[net])
            shape.docs["instance"][instance["id"]] = instance
            shape.docs["port"][port["id"]] = port
            index, used[net] = index + 1, used[net] + 1
    CloudState.from_snapshot(Snapshot(0, shape.docs))  # the model's checks, once
    return SimCloud(shape.docs, shape.group_ids, template, network_of)


def network_name(index: int) -> str:
    return f"net{index:03d}"


def stamp(template: dict[str, Doc], index: int, host: str,
          groups: list[str]) -> tuple[Doc, Doc]:
    """Instance ``index`` on ``host`` in ``groups``, and its port (MAC fa:16:3e +
    index; :func:`build` gives it its network and address)."""
    instance_id, port_id = str(uuid.uuid4()), str(uuid.uuid4())
    instance = {**template["instance"], "id": instance_id, "name": f"vm-{index:06d}",
                "host": host, "security_groups": list(groups)}
    mac = "fa:16:3e:" + ":".join(f"{(index >> s) & 0xFF:02x}" for s in (16, 8, 0))
    port = {**template["port"], "id": port_id, "instance_id": instance_id, "mac": mac}
    return instance, port


def _shape(rng: random.Random, networks: int) -> SimCloud:
    """Quotas, image, ``networks`` /22 networks, groups and rules, and one template
    instance, through the API on an in-memory SQLite store."""
    store = open_store("sqlite:///:memory:")
    api = Api(store)
    with api.batch():
        api.quota_update(PROJECT, security_groups=-1, security_group_rules=-1,
                         instances=-1, cores=-1, ram=-1)
        api.image_create(PROJECT, "cirros", visibility="public")
        for n, cidr in zip(range(networks), SUPERNET.subnets(new_prefix=NETWORK_PREFIX),
                           strict=False):
            api.net_create(PROJECT, network_name(n), str(cidr))
        for g in range(GROUPS):
            api.secgroup_create(PROJECT, group_name(g), "simulated")
        for g in range(GROUPS):
            for r in range(RULES_PER_GROUP):
                _add_rule(api, rng, g, r)
        api.boot(PROJECT, "template", "m1.tiny", "cirros", "template", [group_name(0)],
                 [network_name(0)])
    docs = store.load().docs
    store.close()
    ids = {doc["name"]: doc_id for doc_id, doc in docs["secgroup"].items()}
    return SimCloud(docs, [ids[group_name(g)] for g in range(GROUPS)], {})


def _add_rule(api: Api, rng: random.Random, group: int, rule: int) -> None:
    number = group * RULES_PER_GROUP + rule
    port = str(FIRST_RULE_PORT + number)
    if number % 3 == 0:
        source = group_name(rng.randrange(GROUPS))
        api.secgroup_add_group_rule(PROJECT, group_name(group), source, "tcp", port, port)
    else:
        api.secgroup_add_rule(PROJECT, group_name(group), "tcp", port, port, "10.0.0.0/8")


def write(url: str, docs: dict[str, dict[str, Doc]]) -> int:
    """Put every document into the (empty) etcd store at ``url``, in transactions of
    :data:`BULK_DOCS`; returns the store's revision afterwards."""
    store = open_store(url)
    assert isinstance(store, EtcdStore)
    try:
        items = [((kind, doc_id), doc) for kind in sorted(docs)
                 for doc_id, doc in docs[kind].items()]
        for start in range(0, len(items), BULK_DOCS):
            batch: dict[tuple[str, str], Any] = dict(items[start:start + BULK_DOCS])
            with store.write() as txn:  # the indexes are kept by the store's commit
                for (kind, doc_id), doc in batch.items():
                    txn.put(kind, doc_id, doc)
        return store.revision()
    finally:
        store.close()

"""A write transaction reads only the keys it needs (CloudState.lazy over the
store's derived indexes, secfw.store.indexes).

The lazy state must be indistinguishable from the eager one for everything it
is asked — by key, by iteration, and after its own changes — and a write must
read records by key, never a whole kind (the cost that made every command
O(cloud)): the store's snapshot logs what it read (Snapshot.reads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest

from secfw.api import Api
from secfw.cloud import _INDEX_KIND, _KEYED_VIEWS, CloudState
from secfw.lab.demo import build_guide_cloud
from secfw.model import RECORD_TYPES, Rule
from secfw.store.base import Snapshot, Store

INDEXES = sorted(set(_INDEX_KIND) - {"alloc_hint"})  # a hint, not an index


@contextmanager
def lazy_state(store: Store) -> Iterator[CloudState]:
    """A lazy state over a write transaction's snapshot (rolled back)."""

    class Rollback(Exception):
        pass

    try:
        with store.write() as txn:
            yield CloudState.lazy(txn.snapshot)
            raise Rollback
    except Rollback:
        pass


def build(api: Api) -> None:
    """The guide's cloud, plus a record of every kind an index covers."""
    build_guide_cloud(api)
    api.floating_pool_create("admin", "ext", "203.0.113.0/24")
    address = api.floating_ip_create("alpha", "ext").id
    api.add_floating_ip("alpha", "web1", address)
    api.keypair_add("alpha", "key1")
    volume = api.volume_create("alpha", 1, name="vol1")
    api.volume_attach("alpha", "db1", volume.id)
    api.snapshot_create("alpha", volume.id, force=True, name="snap1")


@pytest.fixture
def guide(api: Api) -> Snapshot:
    build(api)
    return api.store.load()


@pytest.mark.parametrize("index", INDEXES)
def test_every_index_of_a_lazy_state_equals_the_eager_one(api: Api, guide: Snapshot,
                                                          index: str) -> None:
    eager = CloudState.from_snapshot(guide)
    with lazy_state(api.store) as lazy:
        assert getattr(lazy, index) == getattr(eager, index)


@pytest.mark.parametrize("index", sorted(_KEYED_VIEWS))
def test_each_key_read_alone_equals_the_eager_index(api: Api, guide: Snapshot,
                                                    index: str) -> None:
    """Every key of every keyed index, looked up in a fresh lazy state, gives the
    eager answer, and reads that key only (no kind, no whole store)."""
    eager = CloudState.from_snapshot(guide)
    assert getattr(eager, index), "the guide cloud leaves this index empty: nothing tested"
    for key, value in getattr(eager, index).items():
        with lazy_state(api.store) as lazy:
            assert getattr(lazy, index).get(key) == value, key
            reads = lazy._snapshot.reads if lazy._snapshot else []
            assert not [r for r in reads if r.startswith(("kind", "all"))], reads


def test_every_view_of_a_lazy_state_equals_the_eager_one(api: Api, guide: Snapshot) -> None:
    eager = CloudState.from_snapshot(guide)
    with lazy_state(api.store) as lazy:
        for kind in RECORD_TYPES:
            assert lazy.records[kind] == eager.records[kind], kind


def test_a_lazy_state_sees_its_own_changes(api: Api, guide: Snapshot) -> None:
    """The same changes made to an eager and a lazy state leave every index equal:
    a bucket read after a change lays the change over the store's index."""
    eager = CloudState.from_snapshot(guide)
    group_id = eager.group_by_name[("alpha", "global_http")]
    moved = next(iter(eager.rules_by_group[group_id].values()))
    port = next(iter(eager.ports.values()))
    with lazy_state(api.store) as lazy:
        for state in (eager, lazy):
            state.put(Rule("new-rule", group_id, protocol="tcp", port_min=1, port_max=2))
            state.put(replace(moved, group_id=eager.group_by_name[("alpha", "default")]))
            state.remove(port)
        for index in INDEXES:
            assert getattr(lazy, index) == getattr(eager, index), index
        assert port.ip not in lazy.used_ips[port.network_id]
        assert lazy.usage("groups", "alpha") == eager.usage("groups", "alpha")


def test_a_rule_write_reads_a_few_keys(
    api: Api, store_reads: Callable[[Api], list[list[str]]]
) -> None:
    """secgroup-add-rule reads the group by name, its rules, the quota: keys,
    never a kind (a regression to a full-kind read fails here)."""
    build(api)
    logs = store_reads(api)
    api.secgroup_add_rule("alpha", "global_http", "tcp", "8080", "8080", "10.0.0.0/8")
    (reads,) = logs
    assert not [r for r in reads if r.startswith(("kind", "all"))], reads
    assert len(reads) <= 8, reads
    assert [r.port_min for r in api.secgroup_list_rules("alpha", "global_http")] == [
        80, 443, 8080]


def test_boot_and_delete_read_no_port_nor_instance_kind(
        api: Api, store_reads: Callable[[Api], list[list[str]]]) -> None:
    """A boot allocates its address, MAC and tap by key and checks the quotas
    with tallies; a delete finds the ports by index."""
    build(api)
    logs = store_reads(api)
    api.boot("alpha", "keyed", "m1.tiny", "cirros", "compute1", ["global_http"], ["public"])
    api.delete("alpha", "keyed")
    for reads in logs:
        assert not {"kind port", "kind instance", "kind rule", "all"} & set(reads), reads


def test_boots_take_the_lowest_free_address_as_before(api: Api) -> None:
    """Allocation from the allocation record (the lazy state) gives what the
    eager scan of free_addresses gives, holes included (instances deleted at
    random)."""
    import random

    from secfw.cloud import free_addresses

    api.net_create("admin", "n", "10.9.0.0/24")
    api.image_create("admin", "i", visibility="public")
    api.quota_update("admin", instances=-1, cores=-1, ram=-1)
    for number in range(40):
        api.boot("admin", f"v{number}", "m1.tiny", "i", "h", None, ["n"])
    for number in random.Random(3).sample(range(40), 15):
        api.delete("admin", f"v{number}")
    for number in range(20):
        eager = CloudState.from_snapshot(api.store.load())
        (net,) = eager.networks.values()
        expected = next(free_addresses(net.cidr, eager.used_ips[net.id]))[1]
        booted = api.boot("admin", f"w{number}", "m1.tiny", "i", "h", None, ["n"])
        assert api.snapshot().ports_of(booted.id)[0].ip == expected


def test_a_boot_reads_one_allocation_record_per_subnet(
        api: Api, store_reads: Callable[[Api], list[list[str]]]) -> None:
    """The address of a boot comes from the network's allocation records (one
    key for IPv4, one for IPv6), never from the range of used addresses (the
    ``ip`` index, whose size grows with the network), and a batch of boots
    still hands out distinct addresses in order."""
    api.net_create("admin", "n", "10.9.0.0/24", cidr6="2001:db8:9::/64")
    api.image_create("admin", "i", visibility="public")
    api.quota_update("admin", instances=-1, cores=-1, ram=-1)
    network_id = api.net_list("admin")[0].id
    logs = store_reads(api)
    with api.batch():
        for number in range(3):
            api.boot("admin", f"v{number}", "m1.tiny", "i", "h", None, ["n"])
    (reads,) = logs
    assert {f"alloc {network_id}/4", f"alloc {network_id}/6"} <= set(reads), reads
    assert not {"index ip", "kind port", "all"} & set(reads), reads
    ports = api.snapshot().ports.values()
    assert sorted(p.ip for p in ports) == ["10.9.0.2", "10.9.0.3", "10.9.0.4"]
    assert sorted(str(p.ip6) for p in ports) == ["2001:db8:9::2", "2001:db8:9::3",
                                                 "2001:db8:9::4"]

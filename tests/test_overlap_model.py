"""Overlapping VLAN networks (issue #17): the model allows them, and everything
that keys on an address either stays exact or refuses clearly
(docs/semantics.md, "Overlapping networks")."""

from __future__ import annotations

from pathlib import Path

import pytest

from secfw.api import Api
from secfw.audit.policy import CloudPolicy
from secfw.cloud import CloudState
from secfw.compiler.build import address_set, compile_host, set_name
from secfw.compiler.explain import Flow, decide, port_by_address
from secfw.errors import ConflictError
from secfw.store.sqlite import SqliteStore


@pytest.fixture
def api(tmp_path: Path) -> Api:
    return Api(SqliteStore(str(tmp_path / "o.db")))


def _two_overlapping(api: Api) -> None:
    """Projects ``a`` and ``b``, each with a VLAN network 10.0.0.0/24."""
    api.net_create("a", "na", "10.0.0.0/24", vlan=101, cidr6="2001:db8:1::/64")
    api.net_create("b", "nb", "10.0.0.0/24", vlan=102, cidr6="2001:db8:1::/64")
    api.image_create("a", "img", visibility="public")


def test_two_vlan_networks_may_overlap_but_nothing_else_may(api: Api) -> None:
    _two_overlapping(api)
    api.net_create("b", "nb-small", "10.0.0.128/25", vlan=103)  # nested: also private
    with pytest.raises(ConflictError, match="only two VLAN networks may overlap"):
        api.net_create("c", "flat", "10.0.0.0/16")  # flat: shared and routed by address
    api.net_create("c", "flat2", "10.9.0.0/24")
    with pytest.raises(ConflictError, match="overlaps network 'flat2'"):
        api.net_create("c", "nc", "10.9.0.0/24", vlan=104)
    with pytest.raises(ConflictError, match="overlaps network"):
        api.floating_pool_create("admin", "pub", "10.0.0.0/24")
    with pytest.raises(ConflictError, match="VLAN 101 is already used"):
        api.net_create("c", "again", "10.7.0.0/24", vlan=101)


def test_addresses_are_allocated_per_network(api: Api) -> None:
    _two_overlapping(api)
    x = api.boot("a", "x", "m1.tiny", "img", "h1", None, ["na"])
    y = api.boot("b", "y", "m1.tiny", "img", "h1", None, ["nb"])
    state = api.snapshot()
    (px,), (py,) = state.ports_of(x.id), state.ports_of(y.id)
    assert (px.ip, px.ip6) == (py.ip, py.ip6) and px.tap != py.tap


def _members_across(api: Api) -> dict[str, str]:
    """Group ``web`` of project ``a`` with a member ``m1`` on ``na`` (address .2) and
    ``m2`` on ``nb-a`` (.2 as well, plus pair 10.0.0.50, which non-member ``spare``
    on ``na`` has too): the ``db`` group admits tcp/22 from ``web``; ``lone`` (.3 on
    ``nb-a``) is no member; ``far`` is a member on a network that overlaps nothing."""
    _two_overlapping(api)
    api.net_create("a", "nb-a", "10.0.0.0/24", vlan=105)  # a's own second network
    api.net_create("a", "other", "10.5.0.0/24", vlan=106)
    api.secgroup_create("a", "web", "members")
    api.secgroup_create("a", "db", "ssh from web")
    api.secgroup_add_group_rule("a", "db", "web", "tcp", "22", "22")
    api.boot("a", "m1", "m1.tiny", "img", "h2", ["web"], ["na"])
    m2 = api.boot("a", "m2", "m1.tiny", "img", "h2", ["web"], ["nb-a"])
    api.boot("a", "far", "m1.tiny", "img", "h2", ["web"], ["other"])
    api.boot("a", "lone", "m1.tiny", "img", "h1", None, ["nb-a"])
    spare = api.boot("a", "spare", "m1.tiny", "img", "h2", None, ["na"])  # db1: .4, no twin
    api.boot("a", "db1", "m1.tiny", "img", "h1", ["db"], ["na"])
    for instance in (m2, spare):  # a twin pair: m2's on nb-a, spare's on na
        port = api.snapshot().ports_of(instance.id)[0]
        api.port_update("a", port.id, allowed_address_pairs=["10.0.0.50"])
    state = api.snapshot()
    return {i.name: state.ports_of(i.id)[0].ip for i in state.instances.values()}


def test_a_source_group_set_leaves_out_addresses_two_networks_hold(api: Api) -> None:
    """m1 (na) and m2 (nb-a) are both 10.0.0.2; in one shared set, 10.0.0.2 would
    admit whichever instance of any of the three 10.0.0.0/24 networks has it."""
    ip = _members_across(api)
    assert ip["m1"] == ip["m2"] == "10.0.0.2"
    state = api.snapshot()
    web = state.group_by_name[("a", "web")]
    (v4,) = [s for s in compile_host(state, "h1").sets if s.name == set_name(web)]
    assert v4.elements == (f"{ip['far']}/32",)
    v6 = address_set(state, set_name(web, "ipv6"))
    m1 = next(p for p in state.ports.values() if p.ip6 and p.instance_id in {
        i.id for i in state.instances.values() if i.name == "m1"})
    assert v6.elements == (f"{m1.ip6}/128",)  # na and nb share a /64, but nb has no port


def test_the_oracle_agrees_and_refuses_an_ambiguous_address(api: Api) -> None:
    ip = _members_across(api)
    state = api.snapshot()
    flow = Flow("10.0.0.50", ip["db1"], 6, 22)  # m2's pair, and non-member spare's
    assert not decide(state, flow, allow_same_net=False).allowed
    assert decide(state, Flow(ip["far"], ip["db1"], 6, 22), allow_same_net=False).allowed
    with pytest.raises(ConflictError, match="2 ports on overlapping networks"):
        port_by_address(state, "10.0.0.2")  # m1's and m2's
    with pytest.raises(ConflictError, match="overlapping networks"):
        CloudPolicy(state).owner("10.0.0.2")


def test_a_floating_ip_is_associated_by_port_not_by_a_shared_address(api: Api) -> None:
    api.net_create("a", "n1", "10.0.0.0/24", vlan=101)
    api.net_create("a", "n2", "10.0.0.0/24", vlan=102)
    api.image_create("a", "img")
    api.floating_pool_create("admin", "nova", "203.0.113.0/24")
    api.boot("a", "two", "m1.tiny", "img", "h1", None, ["n1", "n2"])
    floating = api.floating_ip_create("a")
    with pytest.raises(ConflictError, match="on 2 networks"):
        api.add_floating_ip("a", "two", floating.id, fixed_address="10.0.0.2")
    associated = api.add_floating_ip("a", "two", floating.id)  # the first port
    state = api.snapshot()
    (nat,) = compile_host(state, "h1").floating
    two = next(i for i in state.instances.values() if i.name == "two")
    assert nat.port_id == associated.port_id == state.ports_of(two.id)[0].id


def test_a_lazy_state_knows_the_overlaps_and_twins(api: Api) -> None:
    """The API's write transactions read a lazy state (built without __init__):
    its overlap and twin caches must be there and agree with an eager one."""
    _members_across(api)
    snapshot = api.store.load()
    eager, lazy = CloudState.from_snapshot(snapshot), CloudState.lazy(snapshot)
    for network_id in eager.networks:
        assert lazy.overlapping_subnets(network_id) == eager.overlapping_subnets(network_id)
        assert lazy.twin_claims(network_id) == eager.twin_claims(network_id)
    na = next(n.id for n in eager.networks.values() if n.name == "na")
    assert eager.twin_claims(na) == ("10.0.0.2/32", "10.0.0.3/32", "10.0.0.50/32")

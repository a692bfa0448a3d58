"""The compiler: model → host IR (pure), and the semantic oracle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from secfw.api import Api
from secfw.cloud import CloudState
from secfw.compiler.build import (
    chain_name,
    compile_host,
    normalise_addresses,
    same_net_set_name,
    set_name,
)
from secfw.compiler.evaluate import Packet, PolicyIndex
from secfw.compiler.explain import Flow, decide
from secfw.compiler.incremental import HostCompiler
from secfw.compiler.ir import AddressPair, IcmpMatch, PortPolicy, PortRange
from secfw.compiler.sources import address_owners, link_local, nd_targets, port_sources
from secfw.config import load_config
from secfw.conntrack import Entry, affected_ports, left_same_net, revoked_entries
from secfw.errors import ConfigError
from secfw.store.sqlite import SqliteStore


@pytest.fixture
def api(tmp_path: Path) -> Api:
    return Api(SqliteStore(str(tmp_path / "c.db")))


def guide_cloud(api: Api) -> dict[str, str]:
    """The operations guide's example groups on one host, two instances per group."""
    api.net_create("p", "flat", "10.0.0.0/24")
    api.image_create("p", "cirros")
    api.secgroup_create("p", "global_http", "allow web traffic from the internet")
    api.secgroup_add_rule("p", "global_http", "tcp", "80", "80", "0.0.0.0/0")
    api.secgroup_add_rule("p", "global_http", "tcp", "443", "443", "0.0.0.0/0")
    api.secgroup_create("p", "cluster", "ssh from web")
    api.secgroup_add_group_rule("p", "cluster", "global_http", "tcp", "22", "22")
    web = api.boot("p", "web", "m1.tiny", "cirros", "h1", ["global_http"])
    db = api.boot("p", "db", "m1.tiny", "cirros", "h1", ["cluster"])
    api.boot("p", "elsewhere", "m1.tiny", "cirros", "h2", ["global_http"])
    state = api.snapshot()
    ip = {i.name: state.ports_of(i.id)[0].ip for i in state.instances.values()}
    return {"web": web.id, "db": db.id, **{f"ip_{k}": v for k, v in ip.items()}}


def test_only_the_hosts_ports_are_compiled(api: Api) -> None:
    ids = guide_cloud(api)
    hf = compile_host(api.snapshot(), "h1")
    assert sorted(p.instance_id for p in hf.ports) == sorted([ids["web"], ids["db"]])
    assert compile_host(api.snapshot(), "nowhere").ports == ()


def test_group_chains_are_shared_and_rules_normalised(api: Api) -> None:
    guide_cloud(api)
    state = api.snapshot()
    http = state.group_by_name[("p", "global_http")]
    hf = compile_host(state, "h1")
    chain = hf.chain(chain_name(http, "ingress"))
    assert chain is not None
    assert [(r.protocol, r.ports, r.remote_cidr) for r in chain.rules] == [
        (6, PortRange(80, 80), None),
        (6, PortRange(443, 443), None),
    ]
    assert len(hf.chains) == len({c.name for c in hf.chains})


def test_source_group_set_holds_members_on_every_host(api: Api) -> None:
    ids = guide_cloud(api)
    state = api.snapshot()
    http = state.group_by_name[("p", "global_http")]
    hf = compile_host(state, "h1")
    (address_set,) = [s for s in hf.sets if s.name.startswith("sg-")]
    assert address_set.name == set_name(http)
    assert set(address_set.elements) == {f"{ids['ip_web']}/32", f"{ids['ip_elsewhere']}/32"}


def test_same_net_follows_the_switch(api: Api) -> None:
    guide_cloud(api)
    (net,) = api.snapshot().networks
    on = compile_host(api.snapshot(), "h1", allow_same_net=True)
    off = compile_host(api.snapshot(), "h1", allow_same_net=False)
    assert {p.same_net_sets for p in on.ports} == {(same_net_set_name(net),)}
    assert {p.same_net_sets for p in off.ports} == {()}
    assert not any(s.name.startswith("net-") for s in off.sets)


def same_net_cloud(api: Api) -> dict[str, str]:
    """The guide's cloud plus a VLAN network with one instance on h1, and on the
    flat network a second remote instance (h2) with address pairs: one inside the
    subnet, one outside it."""
    ids = guide_cloud(api)
    api.net_create("p", "vlan", "10.1.0.0/24", vlan=5)
    api.boot("p", "other", "m1.tiny", "cirros", "h1", ["cluster"], ["vlan"])
    peer = api.boot("p", "peer", "m1.tiny", "cirros", "h2", ["cluster"], ["flat"])
    state = api.snapshot()
    port = state.ports_of(peer.id)[0]
    api.port_update("p", port.id, allowed_address_pairs=["10.0.0.128/25", "192.168.7.0/24"])
    return {**ids, "peer": peer.id, "ip_peer": port.ip, "port_peer": port.id}


def test_same_net_set_holds_the_networks_ports_on_every_host_not_its_cidr(api: Api) -> None:
    """One set per network and family: every port of the network on any host (the
    remote ``elsewhere`` and ``peer`` included), pairs clipped to the subnet,
    nothing of another network; the ports of the network name it."""
    ids = same_net_cloud(api)
    state = api.snapshot()
    flat = next(n.id for n in state.networks.values() if n.name == "flat")
    hf = compile_host(state, "h1")
    net = next(s for s in hf.sets if s.name == same_net_set_name(flat))
    hosts = {f"{ids[k]}/32" for k in ("ip_web", "ip_db", "ip_elsewhere", "ip_peer")}
    assert all(int(h.split(".")[3].split("/")[0]) < 128 for h in hosts)  # not in the pair
    assert set(net.elements) == hosts | {"10.0.0.128/25"}
    assert net.owner_id == flat and net.family == "ipv4"
    web = next(p for p in hf.ports if p.instance_id == ids["web"])
    assert web.same_net_sets == (same_net_set_name(flat),)
    vlan_sets = [s for s in hf.sets if s.name.startswith("net-") and s.owner_id != flat]
    assert len(vlan_sets) == 1 and all(e.startswith("10.1.0.") for e in vlan_sets[0].elements)


def test_same_net_pair_covering_the_subnet_is_clipped_to_it(api: Api) -> None:
    ids = same_net_cloud(api)
    api.port_update("p", ids["port_peer"], allowed_address_pairs=["0.0.0.0/0"])
    state = api.snapshot()
    flat = next(n.id for n in state.networks.values() if n.name == "flat")
    net = next(s for s in compile_host(state, "h1").sets if s.name == same_net_set_name(flat))
    assert net.elements == ("10.0.0.0/24",)


def test_oracle_same_net_means_a_port_of_the_network_not_an_address_of_it(api: Api) -> None:
    """From a port of the network (local, remote, an in-subnet pair): same-net.
    From an in-subnet address no port has, from a pair outside the subnet, from
    another network: the groups decide (``cluster`` allows only tcp/22 from web)."""
    ids = same_net_cloud(api)
    state = api.snapshot()
    db = ids["ip_db"]
    for source in (ids["ip_web"], ids["ip_elsewhere"], ids["ip_peer"], "10.0.0.200"):
        assert decide(state, Flow(source, db, 6, 5555)).reason.startswith("same network")
    for source in ("10.0.0.99", "192.168.7.1", "10.1.0.2", "203.0.113.1"):
        assert not decide(state, Flow(source, db, 6, 5555)).allowed, source
        assert decide(state, Flow(source, db, 6, 5555), allow_same_net=False) == decide(
            state, Flow(source, db, 6, 5555))


def test_ir_evaluator_agrees_with_the_oracle_on_same_net(api: Api) -> None:
    ids = same_net_cloud(api)
    state = api.snapshot()
    index = PolicyIndex(compile_host(state, "h1"))
    for source in (ids["ip_web"], ids["ip_elsewhere"], ids["ip_peer"], "10.0.0.200",
                   "10.0.0.99", "192.168.7.1", "10.1.0.2", "203.0.113.1"):
        for dport in (22, 5555):
            flow = Flow(source, ids["ip_db"], 6, dport)
            packet = Packet(flow.src, flow.dst, 6, 40000, dport)
            assert index.allows(packet) == decide(state, flow).allowed, flow


def test_revocation_cuts_same_net_flows_of_a_peer_deleted_on_another_host(api: Api) -> None:
    """A remote peer deleted: its address leaves the same-net set, and only its
    connections into the network's ports here are judged again (and cut); the
    affected addresses are the peer's, not every port of the network."""
    ids = same_net_cloud(api)
    api.port_update("p", ids["port_peer"], allowed_address_pairs=[])
    before = compile_host(api.snapshot(), "h1")
    from_peer = _entry(ids["ip_peer"], ids["ip_db"], 5555)
    from_elsewhere = _entry(ids["ip_elsewhere"], ids["ip_db"], 5555)
    entries = [from_peer, from_elsewhere]
    assert list(revoked_entries(entries, None, before)) == []
    api.delete("p", "peer")  # on h2
    after = compile_host(api.snapshot(), "h1")
    assert affected_ports(before, after) == []  # no policy of h1 changed
    assert [str(n) for n in left_same_net(before, after)] == [f"{ids['ip_peer']}/32"]
    assert list(revoked_entries(entries, before, after)) == [from_peer]


def test_incremental_same_net_follows_ports_of_other_hosts(api: Api) -> None:
    """A port booted, readdressed (pairs) or deleted on h2 changes h1's same-net
    set of that network, one element at a time, and nothing else of h1."""
    ids = same_net_cloud(api)
    state = CloudState.from_snapshot(api.store.load())
    compiler = HostCompiler("h1")
    first = compiler.full(state)
    steps = [
        lambda: api.boot("p", "late", "m1.tiny", "cirros", "h2", ["cluster"], ["flat"]),
        lambda: api.port_update("p", ids["port_peer"], allowed_address_pairs=["10.0.0.77"]),
        lambda: api.delete("p", "late"),
    ]
    previous = first
    for step in steps:
        step()
        revision, changes = api.store.changes_since(state.revision)
        result = compiler.update(state, state.apply_changes(revision, changes))
        assert result == compile_host(state, "h1")
        assert result.ports is previous.ports and result.chains is previous.chains
        changed = [s.name for s in result.sets if s not in previous.sets]
        assert len(changed) == 1 and changed[0].startswith("net-")
        previous = result


def test_compile_is_deterministic(api: Api) -> None:
    guide_cloud(api)
    first = compile_host(api.snapshot(), "h1")
    second = compile_host(CloudState.from_snapshot(api.store.load()), "h1")
    assert first == second


def test_icmp_any_and_specific(api: Api) -> None:
    api.net_create("p", "flat", "10.0.0.0/24")
    api.image_create("p", "cirros")
    api.secgroup_create("p", "open", "all")
    api.secgroup_add_rule("p", "open", "icmp", "-1", "255", "0.0.0.0/0")
    api.secgroup_create("p", "ping", "echo")
    api.secgroup_add_rule("p", "ping", "icmp", "8", "0", "192.0.2.0/24")
    api.boot("p", "vm", "m1.tiny", "cirros", "h1", ["open", "ping"])
    rules = [r for c in compile_host(api.snapshot(), "h1").chains for r in c.rules]
    assert {(r.protocol, r.icmp, r.remote_cidr) for r in rules} == {
        (1, None, None),
        (1, IcmpMatch(8, 0), "192.0.2.0/24"),
    }


def test_normalise_addresses_merges_networks_keeps_hosts() -> None:
    assert normalise_addresses(
        ["10.0.0.5", "10.0.0.4/32", "10.1.0.0/25", "10.1.0.128/25", "10.1.0.7"]
    ) == ("10.0.0.4/32", "10.0.0.5/32", "10.1.0.0/24")


def test_oracle_follows_the_guide(api: Api) -> None:
    ids = guide_cloud(api)
    state = api.snapshot()
    web, db = ids["ip_web"], ids["ip_db"]
    assert decide(state, Flow("203.0.113.10", web, 6, 80)).allowed
    assert not decide(state, Flow("203.0.113.10", web, 6, 22)).allowed
    assert not decide(state, Flow("203.0.113.10", db, 6, 22)).allowed
    # same subnet: unfiltered while allow_same_net_traffic is on
    assert decide(state, Flow(web, db, 6, 5555), allow_same_net=True).allowed
    via_group = decide(state, Flow(web, db, 6, 22), allow_same_net=False)
    assert via_group.allowed and "group global_http" in via_group.reason
    assert not decide(state, Flow(web, db, 6, 23), allow_same_net=False).allowed


def test_oracle_knows_conntrack_rejects_icmp_errors_as_new(api: Api) -> None:
    ids = guide_cloud(api)
    api.secgroup_add_rule("p", "global_http", "icmp", "-1", "-1", "0.0.0.0/0")
    state = api.snapshot()
    assert decide(state, Flow("203.0.113.10", ids["ip_web"], 1, icmp_type=8, icmp_code=0)).allowed
    assert not decide(
        state, Flow("203.0.113.10", ids["ip_web"], 1, icmp_type=3, icmp_code=1)
    ).allowed


def test_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "nova.conf"
    conf.write_text("[DEFAULT]\nallow_same_net_traffic = False\n")
    assert load_config(str(conf)).allow_same_net_traffic is False
    assert load_config(None).allow_same_net_traffic is True
    conf.write_text("[DEFAULT]\nallow_same_net_traffic = maybe\n")
    with pytest.raises(ConfigError, match="true or false"):
        load_config(str(conf))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.conf"))


# --------------------------------------------------------------- egress, IPv6, ports


def neutron_cloud(api: Api) -> dict[str, str]:
    """A dual-stack network; ``web`` has an egress rule, ``nova`` only ingress rules;
    ``peers`` admits ICMPv6 echo and tcp/22 from members of ``web`` (both families)."""
    api.net_create("p", "dual", "10.0.0.0/24", cidr6="2001:db8:1::/64")
    api.image_create("p", "cirros")
    for name in ("web", "nova", "peers"):
        api.secgroup_create("p", name, name)
    api.rule_create("p", "web", "egress", "IPv4", "tcp", "5432", remote_ip="192.0.2.0/24")
    api.secgroup_add_rule("p", "nova", "tcp", "80", "80", "0.0.0.0/0")
    api.rule_create("p", "peers", "ingress", "IPv6", "icmp", icmp_type="128")
    api.rule_create("p", "peers", "ingress", "IPv6", "tcp", "22", remote_group="web")
    api.rule_create("p", "peers", "ingress", "IPv4", "tcp", "22", remote_group="web")
    web = api.boot("p", "web", "m1.tiny", "cirros", "h1", ["web", "nova"])
    old = api.boot("p", "old", "m1.tiny", "cirros", "h1", ["nova", "peers"])
    state = api.snapshot()
    ports = {i.name: state.ports_of(i.id)[0] for i in state.instances.values()}
    return {"web": web.id, "old": old.id, **{f"port_{k}": v.id for k, v in ports.items()}}


def test_egress_is_open_unless_a_group_has_an_egress_rule(api: Api) -> None:
    ids = neutron_cloud(api)
    state = api.snapshot()
    hf = compile_host(state, "h1")
    web_gid, nova_gid = (state.group_by_name[("p", n)] for n in ("web", "nova"))
    by_instance = {p.instance_id: p for p in hf.ports}
    web, old = by_instance[ids["web"]], by_instance[ids["old"]]
    assert web.egress_chains == (chain_name(web_gid, "egress"),) and not web.egress_open
    assert old.egress_chains == () and old.egress_open
    out = hf.chain(chain_name(web_gid, "egress"))
    assert out is not None and out.direction == "egress"
    assert [(r.protocol, r.ports, r.remote_cidr) for r in out.rules] == [
        (6, PortRange(5432, 5432), "192.0.2.0/24")]
    assert hf.chain(chain_name(nova_gid, "egress")) is None  # no egress rule: no chain


def test_ipv6_addresses_subnets_and_rules(api: Api) -> None:
    ids = neutron_cloud(api)
    state = api.snapshot()
    hf = compile_host(state, "h1")
    web_port = state.ports[ids["port_web"]]
    policy = next(p for p in hf.ports if p.instance_id == ids["web"])
    assert policy.ipv6 == (web_port.ip6,) and web_port.ip6 is not None
    dual = web_port.network_id
    assert policy.same_net_sets == (same_net_set_name(dual, "ipv4"),
                                    same_net_set_name(dual, "ipv6"))
    v6 = next(s for s in hf.sets if s.name == same_net_set_name(dual, "ipv6"))
    assert f"{web_port.ip6}/128" in v6.elements and v6.family == "ipv6"
    peers = hf.chain(chain_name(state.group_by_name[("p", "peers")], "ingress"))
    assert peers is not None
    web_gid = state.group_by_name[("p", "web")]
    assert {(r.family, r.protocol, r.icmp, r.remote_set) for r in peers.rules} == {
        ("ipv6", 58, IcmpMatch(128), None),
        ("ipv6", 6, None, set_name(web_gid, "ipv6")),
        ("ipv4", 6, None, set_name(web_gid, "ipv4")),
    }
    sets = {s.name: s for s in hf.sets}
    assert sets[set_name(web_gid, "ipv6")].elements == (f"{web_port.ip6}/128",)
    assert sets[set_name(web_gid, "ipv4")].family == "ipv4"


def test_address_pairs_join_the_remote_group_sets_and_the_port(api: Api) -> None:
    ids = neutron_cloud(api)
    port = api.port_update("p", ids["port_web"], allowed_address_pairs=[
        "10.0.0.200", "10.5.0.0/24,fa:16:3e:aa:bb:cc", "2001:db8:9::/64"])
    state = api.snapshot()
    hf = compile_host(state, "h1")
    policy = next(p for p in hf.ports if p.instance_id == ids["web"])
    assert policy.allowed_pairs == (
        AddressPair("10.0.0.200/32", port.mac), AddressPair("10.5.0.0/24", "fa:16:3e:aa:bb:cc"),
        AddressPair("2001:db8:9::/64", port.mac))
    web_gid = state.group_by_name[("p", "web")]
    sets = {s.name: s.elements for s in hf.sets}
    assert sets[set_name(web_gid, "ipv4")] == (
        f"{port.ip}/32", "10.0.0.200/32", "10.5.0.0/24")
    assert sets[set_name(web_gid, "ipv6")] == (f"{port.ip6}/128", "2001:db8:9::/64")


def test_port_security_off_reaches_the_ir(api: Api) -> None:
    ids = neutron_cloud(api)
    api.port_update("p", ids["port_old"], port_security=False)
    hf = compile_host(api.snapshot(), "h1")
    assert {p.instance_id: p.port_security for p in hf.ports} == {
        ids["web"]: True, ids["old"]: False}


def test_link_local_and_sources() -> None:
    policy = PortPolicy("tapx", "p", "i", "FA:16:3E:00:00:01", ("10.0.0.5",), (), (),
                        ipv6=("2001:db8::5",),
                        allowed_pairs=(AddressPair("10.9.0.0/28", "fa:16:3e:00:00:09"),))
    assert link_local("fa:16:3e:00:00:01") == "fe80::f816:3eff:fe00:1/128"
    assert {(s.mac, s.cidr) for s in port_sources(policy)} == {
        ("fa:16:3e:00:00:01", "10.0.0.5/32"), ("fa:16:3e:00:00:01", "2001:db8::5/128"),
        ("fa:16:3e:00:00:09", "10.9.0.0/28"),
        ("fa:16:3e:00:00:01", "fe80::f816:3eff:fe00:1/128"),
        ("fa:16:3e:00:00:09", "fe80::f816:3eff:fe00:9/128"),
        ("fa:16:3e:00:00:01", "0.0.0.0/32"), ("fa:16:3e:00:00:01", "::/128"),
    }
    assert nd_targets(policy) == ("2001:db8::5/128", "fe80::f816:3eff:fe00:1/128",
                                  "fe80::f816:3eff:fe00:9/128")
    assert port_sources(replace(policy, port_security=False)) == ()


def test_address_owners_split_shared_addresses_out_of_networks() -> None:
    """Every address a port has or may use, by tap; an address two ports claim has
    no owner (None); a network another port's address falls into is split around
    it; the result has no overlaps (interval sets refuse them) and is sorted."""
    a = PortPolicy("tapa", "p", "i", "fa:16:3e:00:00:01", ("10.0.0.6",), (), (),
                   ipv6=("2001:db8::6",),
                   allowed_pairs=(AddressPair("10.0.0.0/29", "fa:16:3e:00:00:01"),))
    b = PortPolicy("tapb", "p", "i", "fa:16:3e:00:00:02", ("10.0.0.5",), (), (),
                   allowed_pairs=(AddressPair("10.0.1.9/32", "fa:16:3e:00:00:02"),))
    c = PortPolicy("tapc", "p", "i", "fa:16:3e:00:00:03", ("10.0.1.10",), (), (),
                   allowed_pairs=(AddressPair("10.0.1.9/32", "fa:16:3e:00:00:03"),))
    assert address_owners([a, b, c], "ipv4") == {
        "10.0.0.0/30": "tapa", "10.0.0.4/32": "tapa", "10.0.0.5/32": None,
        "10.0.0.6/31": "tapa", "10.0.1.9/32": None, "10.0.1.10/32": "tapc"}
    assert address_owners([b, c], "ipv4") == {
        "10.0.0.5/32": "tapb", "10.0.1.9/32": None, "10.0.1.10/32": "tapc"}
    assert address_owners([a, b, c], "ipv6") == {"2001:db8::6/128": "tapa"}
    assert address_owners([], "ipv4") == {}
    with pytest.raises(ValueError):
        address_owners([replace(c, ipv4=("10.0.1.10/24",))], "ipv4")  # host bits set


# --------------------------------------------------------------- the oracle, extended


def test_oracle_judges_egress_of_the_source(api: Api) -> None:
    ids = neutron_cloud(api)
    state = api.snapshot()
    web, old = state.ports[ids["port_web"]], state.ports[ids["port_old"]]
    # web's egress is restricted to tcp/5432 towards 192.0.2.0/24
    assert decide(state, Flow(web.ip, "192.0.2.7", 6, 5432)).allowed
    denied = decide(state, Flow(web.ip, "192.0.2.7", 6, 5433))
    assert not denied.allowed and "egress" in denied.reason
    assert not decide(state, Flow(web.ip, "198.51.100.1", 6, 5432)).allowed
    assert decide(state, Flow(web.ip, "255.255.255.255", 17, 67, sport=68)).allowed  # DHCP
    # old's groups have no egress rule: open (nova-network)
    assert decide(state, Flow(old.ip, "198.51.100.1", 17, 53)).allowed
    assert not decide(state, Flow(old.ip, "10.0.0.99", 17, 68, sport=67)).allowed  # a server
    # instance to instance: web's egress closes what old's ingress would open
    assert not decide(state, Flow(web.ip, old.ip, 6, 80, ), allow_same_net=False).allowed
    assert decide(state, Flow(old.ip, web.ip, 6, 80), allow_same_net=False).allowed


def test_oracle_ipv6_pairs_and_port_security(api: Api) -> None:
    ids = neutron_cloud(api)
    api.port_update("p", ids["port_web"], allowed_address_pairs=["10.0.0.200"])
    api.rule_create("p", "web", "egress", "IPv4", "tcp", "22")
    state = api.snapshot()
    web, old = state.ports[ids["port_web"]], state.ports[ids["port_old"]]
    assert web.ip6 and old.ip6
    ping6 = Flow("2001:db8:ffff::10", old.ip6, 58, icmp_type=128, icmp_code=0)
    assert decide(state, ping6, allow_same_net=False).allowed
    assert not decide(state, replace(ping6, icmp_type=1), allow_same_net=False).allowed
    ns = Flow("2001:db8:ffff::10", old.ip6, 58, icmp_type=135)
    assert decide(state, ns, allow_same_net=False).allowed  # neighbour discovery
    ra = Flow(old.ip6, "2001:db8:ffff::10", 58, icmp_type=134)
    assert not decide(state, ra).allowed  # no router advertisements from an instance
    # the pair's address counts as a member of web for peers' tcp/22 rule (and web's
    # egress allows tcp/22)
    assert decide(state, Flow("10.0.0.200", old.ip, 6, 22), allow_same_net=False).allowed
    assert not decide(state, Flow("10.0.0.201", old.ip, 6, 22), allow_same_net=False).allowed
    assert not decide(state, Flow("203.0.113.10", old.ip, 6, 23)).allowed
    api.port_update("p", ids["port_old"], port_security=False)
    assert decide(api.snapshot(), Flow("203.0.113.10", old.ip, 6, 23)).allowed


# --------------------------------------------------------------- IR evaluation, revocation


def test_ir_evaluator_agrees_with_the_oracle_on_the_cloud(api: Api) -> None:
    """PolicyIndex (over the IR) and decide (over the model) on the same flows."""
    ids = neutron_cloud(api)
    api.port_update("p", ids["port_web"], allowed_address_pairs=["10.0.0.200"])
    state = api.snapshot()
    index = PolicyIndex(compile_host(state, "h1", allow_same_net=False))
    web, old = state.ports[ids["port_web"]], state.ports[ids["port_old"]]
    assert web.ip6 and old.ip6
    flows = [
        Flow(web.ip, "192.0.2.7", 6, 5432), Flow(web.ip, "192.0.2.7", 6, 5433),
        Flow("203.0.113.10", web.ip, 6, 80), Flow("203.0.113.10", web.ip, 6, 81),
        Flow(old.ip, web.ip, 6, 80), Flow(web.ip, old.ip, 6, 80),
        Flow("10.0.0.200", old.ip, 6, 22), Flow("203.0.113.10", old.ip, 6, 22),
        Flow("2001:db8:ffff::10", old.ip6, 58, icmp_type=128, icmp_code=0),
        Flow("2001:db8:ffff::10", web.ip6, 58, icmp_type=128, icmp_code=0),
        Flow(old.ip, "198.51.100.1", 17, 53), Flow(old.ip, "10.9.9.9", 17, 68, sport=67),
    ]
    for flow in flows:
        packet = Packet(flow.src, flow.dst, flow.protocol, flow.sport, flow.port,
                        flow.icmp_type, flow.icmp_code)
        assert index.allows(packet) == decide(state, flow, allow_same_net=False).allowed, flow


def _entry(src: str, dst: str, dport: int, proto: int = 6) -> Entry:
    return Entry(Packet(src, dst, proto, 40000, dport))


def test_revocation_cuts_exactly_what_the_change_revoked(api: Api) -> None:
    ids = neutron_cloud(api)
    before = compile_host(api.snapshot(), "h1")
    state = api.snapshot()
    web, old = state.ports[ids["port_web"]], state.ports[ids["port_old"]]
    to_web, to_old = _entry("203.0.113.10", web.ip, 80), _entry("203.0.113.10", old.ip, 80)
    web_out, old_out = _entry(web.ip, "192.0.2.7", 5432), _entry(old.ip, "198.51.100.1", 443)
    from_host = _entry("10.0.0.1", web.ip, 9999)  # the host's own: never touched
    elsewhere = _entry("198.51.100.7", "203.0.113.10", 80)  # no port of this host
    entries = [to_web, to_old, web_out, old_out, from_host, elsewhere]
    local = ["10.0.0.1"]
    assert list(revoked_entries(entries, before, before, local)) == []
    api.remove_secgroup("p", "web", "nova")  # web loses tcp/80
    after = compile_host(api.snapshot(), "h1")
    assert list(revoked_entries(entries, before, after, local)) == [to_web]
    entries.remove(to_web)
    rule = next(r for r in api.rule_list("p", "web") if r.direction == "egress")
    api.rule_delete("p", rule.id)  # web's only egress rule: egress open again
    opened = compile_host(api.snapshot(), "h1")
    assert list(revoked_entries(entries, after, opened, local)) == []
    api.delete("p", "old")  # a port goes: its connections go
    gone = compile_host(api.snapshot(), "h1")
    assert list(revoked_entries(entries, opened, gone, local)) == [to_old, old_out]


def test_revocation_follows_source_group_members_and_pairs(api: Api) -> None:
    ids = neutron_cloud(api)
    api.port_update("p", ids["port_web"], allowed_address_pairs=["10.0.0.200"])
    api.rule_create("p", "web", "egress", "IPv4", "tcp", "22")
    before = compile_host(api.snapshot(), "h1", allow_same_net=False)
    old = api.snapshot().ports[ids["port_old"]]
    via_pair = _entry("10.0.0.200", old.ip, 22)
    assert list(revoked_entries([via_pair], None, before)) == []  # first pass: all checked
    api.port_update("p", ids["port_web"], allowed_address_pairs=[])
    after = compile_host(api.snapshot(), "h1", allow_same_net=False)
    assert list(revoked_entries([via_pair], before, after)) == [via_pair]


def test_affected_ports_are_only_those_whose_verdicts_can_change(api: Api) -> None:
    """Only a port whose chains may now refuse something is affected: a rule
    added only opens (nothing to revoke); the same rule deleted may refuse."""
    ids = neutron_cloud(api)
    before = compile_host(api.snapshot(), "h1")
    rule = api.rule_create("p", "peers", "ingress", "IPv4", "udp", "53")  # only old uses peers
    after = compile_host(api.snapshot(), "h1")
    assert affected_ports(before, after) == []
    api.rule_delete("p", rule.id)
    gone = compile_host(api.snapshot(), "h1")
    assert {p.instance_id for p in affected_ports(after, gone)} == {ids["old"]}
    assert affected_ports(after, after) == []
    assert len(affected_ports(None, after)) == 2


def test_a_source_group_set_that_only_grew_affects_no_port(api: Api) -> None:
    """A member booted into a source group adds an element: nothing to revoke;
    the member deleted removes it: the ports using the group are affected."""
    ids = neutron_cloud(api)
    before = compile_host(api.snapshot(), "h1")
    api.boot("p", "late", "m1.tiny", "cirros", "h2", ["web"])
    after = compile_host(api.snapshot(), "h1")
    assert [s for s in after.sets if s not in before.sets]  # web's sets grew
    assert affected_ports(before, after) == []
    api.delete("p", "late")
    gone = compile_host(api.snapshot(), "h1")
    assert {p.instance_id for p in affected_ports(after, gone)} == {ids["old"]}

"""The compiler: model → host IR (pure), and the semantic oracle."""

from __future__ import annotations

from pathlib import Path

import pytest

from secfw.api import Api
from secfw.cloud import CloudState
from secfw.compiler.build import chain_name, compile_host, normalise_addresses, set_name
from secfw.compiler.explain import Flow, decide
from secfw.compiler.ir import IcmpMatch, PortRange
from secfw.config import load_config
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
    (address_set,) = hf.sets
    assert address_set.name == set_name(http)
    assert set(address_set.elements) == {f"{ids['ip_web']}/32", f"{ids['ip_elsewhere']}/32"}


def test_same_net_follows_the_switch(api: Api) -> None:
    guide_cloud(api)
    on = compile_host(api.snapshot(), "h1", allow_same_net=True)
    off = compile_host(api.snapshot(), "h1", allow_same_net=False)
    assert {p.same_net_cidrs for p in on.ports} == {("10.0.0.0/24",)}
    assert {p.same_net_cidrs for p in off.ports} == {()}


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

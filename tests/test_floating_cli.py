"""Floating IPs in the model and on the command line (nova's commands).

The guide's flow (allocate, associate, dissociate), the quota, and every bad
input: one line on stderr, the documented exit status, the store unchanged
(``Cli.fails``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import pytest

from secfw.api import Api

if TYPE_CHECKING:
    from conftest import Cli


@pytest.fixture
def fip(cli: Cli, api: Api) -> Cli:
    """Pool ``public`` 192.0.2.0/28; servers vm1 (two ports), vm2 of project alpha,
    vm3 of beta, bare (no port) of alpha; 192.0.2.2 allocated to alpha and
    associated with vm2, 192.0.2.3 allocated to alpha, 192.0.2.4 to beta."""
    api.floating_pool_create("admin", "public", "192.0.2.0/28")
    api.net_create("admin", "private", "10.0.0.0/24")
    api.net_create("admin", "other", "10.1.0.0/24")
    api.image_create("admin", "cirros", visibility="public")
    api.boot("alpha", "vm1", "m1.tiny", "cirros", "h1", None, ["private", "other"])
    api.boot("alpha", "vm2", "m1.tiny", "cirros", "h1", None, ["private"])
    api.boot("beta", "vm3", "m1.tiny", "cirros", "h1", None, ["private"])
    vm2 = api.show("alpha", "vm2")["id"]
    with api.batch() as state:  # boot always gives a port: a record without one
        state.put(replace(state.instances[vm2], id="bare-id", name="bare"))
    for project in ("alpha", "alpha", "beta"):
        api.floating_ip_create(project)
    api.add_floating_ip("alpha", "vm2", "192.0.2.2")
    return cli


def test_guide_flow_allocate_associate_dissociate(fip: Cli, api: Api) -> None:
    """``nova floating-ip-create``, ``add-floating-ip``, ``remove-floating-ip``."""
    created = fip.json("--project", "alpha", "floating-ip-create", "public")
    assert created["ip"] == "192.0.2.5" and created["server_id"] is None
    vm1 = api.show("alpha", "vm1")
    fixed = vm1["networks"]["other"][0]
    fip.ok("--project", "alpha", "add-floating-ip", "vm1", "192.0.2.5", "--fixed-address", fixed)
    rows = {r["ip"]: r for r in fip.json("--project", "alpha", "floating-ip-list")}
    assert rows["192.0.2.5"] == {"id": "192.0.2.5", "ip": "192.0.2.5", "server_id": vm1["id"],
                                 "fixed_ip": fixed, "pool": "public"}
    assert sorted(rows) == ["192.0.2.2", "192.0.2.3", "192.0.2.5"]
    fip.ok("--project", "alpha", "remove-floating-ip", "vm1", "192.0.2.5")
    assert api.snapshot().floating_ips["192.0.2.5"].port_id is None
    fip.ok("--project", "alpha", "floating-ip-delete", "192.0.2.5")
    assert "192.0.2.5" not in api.snapshot().floating_ips
    table = fip.ok("--project", "alpha", "floating-ip-list")
    assert table.splitlines()[1].split("|")[1:-1] == [
        " Id        ", " IP        ", " Server Id                            ",
        " Fixed IP ", " Pool   "]


def test_default_port_and_deleting_the_server_dissociates(fip: Cli, api: Api) -> None:
    """Without --fixed-address the first port is used; a deleted server's floating
    IPs stay allocated to the project, dissociated (as nova does)."""
    fip.ok("--project", "alpha", "add-floating-ip", "vm1", "192.0.2.3")
    state = api.snapshot()
    first = state.ports_of(next(i.id for i in state.instances.values() if i.name == "vm1"))[0]
    assert state.floating_ips["192.0.2.3"].fixed_ip == first.ip
    fip.ok("--project", "alpha", "delete", "vm1")
    assert api.snapshot().floating_ips["192.0.2.3"].port_id is None
    assert api.snapshot().floating_by_port.get(first.id) is None


def test_quota_floating_ips(fip: Cli) -> None:
    """Default 10 per project, shown by quota-show, changed by quota-update, never
    below what the project holds."""
    assert fip.json("--project", "alpha", "quota-show")["floating_ips"] == 10
    fip.ok("--project", "alpha", "quota-update", "--floating-ips", "3")
    fip.ok("--project", "alpha", "floating-ip-create")
    line = fip.fails("--project", "alpha", "floating-ip-create", code=5)
    assert "Quota exceeded for floating_ips: 3 of 3" in line
    line = fip.fails("--project", "alpha", "quota-update", "--floating-ips", "2", code=5)
    assert "below the 3 floating IPs" in line


def test_pool_exhausted_and_pool_rules(cli: Cli, api: Api) -> None:
    """A /30 pool has one address (network, gateway .1 and broadcast are kept)."""
    api.floating_pool_create("admin", "tiny", "198.51.100.0/30")
    assert cli.json("floating-ip-create")["ip"] == "198.51.100.2"
    assert "No more floating IPs" in cli.fails("floating-ip-create", "tiny", code=4)
    assert "has 1 allocated" in cli.fails("floating-ip-pool-delete", "tiny", code=6)
    cli.ok("floating-ip-delete", "198.51.100.2")
    cli.ok("floating-ip-pool-delete", "tiny")
    assert cli.json("floating-ip-pool-list") == []


BAD_INPUT = [
    (("--project", "alpha", "floating-ip-pool-create", "p2", "198.51.100.0/24"), 11,
     "only the 'admin' project may create floating IP pools"),
    (("floating-ip-pool-create", "p2", "192.0.2.8/29"), 4, "overlaps floating IP pool 'public'"),
    (("floating-ip-pool-create", "p2", "10.0.0.0/16"), 4, "overlaps network 'private'"),
    (("floating-ip-pool-create", "public", "198.51.100.0/24"), 4, "'public' already exists"),
    (("floating-ip-pool-create", "p2", "not-a-cidr"), 2, "not-a-cidr"),
    (("net-create", "n2", "192.0.2.0/24"), 4, "overlaps floating IP pool 'public'"),
    (("--project", "alpha", "floating-ip-create", "nosuch"), 3, "pool 'nosuch' not found"),
    (("--project", "alpha", "add-floating-ip", "vm1", "192.0.2.4"), 3,
     "192.0.2.4 not found (not allocated to project 'alpha')"),
    (("--project", "alpha", "add-floating-ip", "vm1", "192.0.2.9"), 3, "not allocated"),
    (("--project", "alpha", "add-floating-ip", "vm1", "192.0.2.2"), 4,
     "already associated with server 'vm2'"),
    (("--project", "alpha", "add-floating-ip", "bare", "192.0.2.3"), 4, "has no port"),
    (("--project", "alpha", "add-floating-ip", "vm3", "192.0.2.3"), 3, "No server"),
    (("--project", "alpha", "add-floating-ip", "vm1", "banana"), 2,
     "invalid floating IP address 'banana'"),
    (("--project", "alpha", "add-floating-ip", "vm1", "2001:db8::1"), 2, "not an IPv4 address"),
    (("--project", "alpha", "add-floating-ip", "vm1", "192.0.2.3", "--fixed-address", "x"), 2,
     "invalid fixed address"),
    (("--project", "alpha", "add-floating-ip", "vm1", "192.0.2.3", "--fixed-address",
      "10.9.9.9"), 3, "has no fixed address 10.9.9.9"),
    (("--project", "alpha", "remove-floating-ip", "vm1", "192.0.2.2"), 4,
     "192.0.2.2 is not associated with 'vm1'"),
    (("--project", "alpha", "remove-floating-ip", "vm1", "192.0.2.3"), 4, "not associated"),
    (("--project", "beta", "remove-floating-ip", "vm3", "192.0.2.2"), 3, "not allocated"),
    (("--project", "beta", "floating-ip-delete", "192.0.2.2"), 3, "not allocated"),
    (("--project", "alpha", "floating-ip-delete", "300.1.1.1"), 2, "invalid floating IP"),
    (("--project", "alpha", "quota-update", "--floating-ips", "many"), 2, "floating_ips"),
]


@pytest.mark.parametrize(("args", "code", "message"), BAD_INPUT,
                         ids=[" ".join(a)[:70] for a, _, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_changes_nothing(
    fip: Cli, args: tuple[str, ...], code: int, message: str
) -> None:
    assert message in fip.fails(*args, code=code)


def test_fixed_address_with_a_floating_ip_takes_no_second(fip: Cli) -> None:
    """1:1 NAT: a fixed address has at most one floating IP (SNAT needs one source)."""
    line = fip.fails("--project", "alpha", "add-floating-ip", "vm2", "192.0.2.3", code=4)
    assert "already has floating IP 192.0.2.2" in line


def test_no_pool_and_several_pools(cli: Cli, api: Api) -> None:
    assert "no floating IP pool exists" in cli.fails("floating-ip-create", code=3)
    api.floating_pool_create("admin", "a", "192.0.2.0/24")
    api.floating_pool_create("admin", "b", "198.51.100.0/24")
    assert "several floating IP pools exist" in cli.fails("floating-ip-create", code=2)
    api.floating_pool_create("admin", "nova", "203.0.113.0/24")
    assert cli.json("floating-ip-create")["pool"] == "nova"


def test_compile_shows_the_nat(fip: Cli, api: Api) -> None:
    """``secfw compile`` prints the host's NAT with either backend."""
    fixed = api.snapshot().floating_ips["192.0.2.2"].fixed_ip
    nft = fip.ok("compile", "--host", "h1")
    assert f"192.0.2.2 : {fixed}" in nft and "dnat ip to ip daddr map @floating_dnat" in nft
    ipt = fip.ok("compile", "--host", "h1", "--backend", "iptables")
    assert f"-A secfw-float-dnat -d 192.0.2.2/32 -j DNAT --to-destination {fixed}" in ipt
    assert "floating" not in fip.ok("compile", "--host", "h2")


def test_floating_ip_create_prints_its_row_read_by_key(
        fip: Cli, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The allocated address's row names its pool read by key: loading the whole
    store to print one row cost seconds at 50k ports."""

    def no_load(_self: object) -> None:
        raise AssertionError("floating-ip-create loaded the whole store")

    monkeypatch.setattr(type(api.store), "load", no_load)
    created = fip.json("--project", "alpha", "floating-ip-create", "public")
    assert created == {"id": "192.0.2.5", "ip": "192.0.2.5", "server_id": None,
                       "fixed_ip": None, "pool": "public"}

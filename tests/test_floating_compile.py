"""Floating IPs in the compiler and both renderers (pure: no kernel).

The IR holds one FloatingNat per associated floating IP of a port on the host;
the incremental compiler agrees with a full compile after every kind of change;
nftables renders two maps and two nat chains (nothing at all without floating
IPs), iptables two chains of the nat table.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from secfw.api import Api
from secfw.backends.iptables.render import nat_table
from secfw.backends.nftables.plan import plan
from secfw.backends.nftables.render import render
from secfw.backends.nftables.state import KernelState
from secfw.backends.nftables.syntax import to_nft_text
from secfw.cloud import CloudState
from secfw.compiler.build import compile_host, floating_pools
from secfw.compiler.evaluate import Packet
from secfw.compiler.incremental import HostCompiler
from secfw.compiler.ir import FloatingNat, HostFilter
from secfw.conntrack import Entry, NatEntry, stale_nat
from secfw.store import open_store


@pytest.fixture
def cloud(tmp_path: object) -> Iterator[Api]:
    """Networks a 10.1.0.0/24 and b 10.2.0.0/24; vm1, vm2 on h1, vm3 on h2; a pool."""
    api = Api(open_store(f"sqlite:///{tmp_path}/c.db"))
    api.net_create("p", "a", "10.1.0.0/24")
    api.net_create("p", "b", "10.2.0.0/24")
    api.image_create("admin", "img", visibility="public")
    api.floating_pool_create("admin", "pool", "192.0.2.0/24")
    for name, host, net in (("vm1", "h1", "a"), ("vm2", "h1", "b"), ("vm3", "h2", "a")):
        api.boot("p", name, "m1.tiny", "img", host, None, [net])
    for _ in range(3):
        api.floating_ip_create("p", "pool")
    yield api
    api.store.close()


def ip_of(api: Api, name: str) -> str:
    return str(api.show("p", name)["networks"].popitem()[1][0])


def test_ir_has_the_hosts_mappings_only(cloud: Api) -> None:
    cloud.add_floating_ip("p", "vm1", "192.0.2.2")
    cloud.add_floating_ip("p", "vm3", "192.0.2.3")
    state = cloud.snapshot()
    h1 = compile_host(state, "h1")
    [nat] = h1.floating
    assert (nat.floating, nat.fixed) == ("192.0.2.2", ip_of(cloud, "vm1"))
    assert nat.tap == h1.ports[[p.instance_id for p in h1.ports].index(
        cloud.show("p", "vm1")["id"])].tap
    assert h1.internal == ("10.1.0.0/24", "10.2.0.0/24")
    assert [n.floating for n in compile_host(state, "h2").floating] == ["192.0.2.3"]
    assert compile_host(state, "h3").floating == () and compile_host(state, "h3").internal == ()


def test_incremental_compiler_follows_every_change(cloud: Api) -> None:
    """Association, reassignment, dissociation, release, a server deleted: the
    incremental result equals a full compile, and is the same object when the
    change did not touch the host."""
    follower = CloudState.from_snapshot(cloud.store.load())
    compilers = {h: HostCompiler(h) for h in ("h1", "h2")}
    for compiler in compilers.values():
        compiler.full(follower)
    steps = [
        lambda: cloud.add_floating_ip("p", "vm1", "192.0.2.2"),
        lambda: cloud.add_floating_ip("p", "vm2", "192.0.2.3"),
        lambda: cloud.remove_floating_ip("p", "vm1", "192.0.2.2"),
        lambda: cloud.add_floating_ip("p", "vm3", "192.0.2.2"),
        lambda: cloud.floating_ip_delete("p", "192.0.2.2"),
        lambda: cloud.delete("p", "vm2"),
    ]
    for step in steps:
        step()
        revision, changes = cloud.store.changes_since(follower.revision)
        replaced = follower.apply_changes(revision, changes)
        for host, compiler in compilers.items():
            assert compiler.update(follower, replaced) == compile_host(follower, host)
    assert compilers["h1"].result is not None and compilers["h1"].result.floating == ()


def test_nftables_renders_maps_and_nat_chains(cloud: Api) -> None:
    before = render(compile_host(cloud.snapshot(), "h1"))
    assert not any("floating" in s.name for s in before.sets)
    cloud.add_floating_ip("p", "vm1", "192.0.2.2")
    after = render(compile_host(cloud.snapshot(), "h1"))
    fixed = ip_of(cloud, "vm1")
    text = to_nft_text(after)
    assert f"192.0.2.2 : {fixed}" in text and f"{fixed} : 192.0.2.2" in text
    assert "type nat hook prerouting priority -100;" in text
    assert "dnat ip to ip daddr map @floating_dnat" in text
    assert "ip saddr . ip daddr @floating_self snat ip to ip saddr map @floating_snat" in text
    assert "ip daddr != @floating_internal snat ip to ip saddr map @floating_snat" in text
    commands = plan(KernelState.from_ruleset(before), after).commands
    assert any(c.startswith("add chain inet secfw floating-dnat { type nat") for c in commands)
    cloud.remove_floating_ip("p", "vm1", "192.0.2.2")
    cloud.add_floating_ip("p", "vm2", "192.0.2.2")
    moved = render(compile_host(cloud.snapshot(), "h1"))
    delta = plan(KernelState.from_ruleset(after), moved).commands
    assert all("element" in c for c in delta), delta  # a reassignment is data only


def test_iptables_renders_the_nat_table(cloud: Api) -> None:
    cloud.add_floating_ip("p", "vm1", "192.0.2.2")
    hf = compile_host(cloud.snapshot(), "h1")
    fixed = ip_of(cloud, "vm1")
    table = nat_table(hf)
    assert table.chains == {
        "secfw-float-dnat": (f"-d 192.0.2.2/32 -j DNAT --to-destination {fixed}",),
        "secfw-float-snat": (f"-s {fixed}/32 -d {fixed}/32 -j SNAT --to-source 192.0.2.2",
                             "-d 10.1.0.0/24 -j RETURN", "-d 10.2.0.0/24 -j RETURN",
                             f"-s {fixed}/32 -j SNAT --to-source 192.0.2.2")}
    assert set(table.jumps) == {("PREROUTING", "-j secfw-float-dnat"),
                                ("POSTROUTING", "-j secfw-float-snat")}
    assert nat_table(compile_host(cloud.snapshot(), "h2")).chains == {}


def test_a_floating_address_mapped_twice_is_refused_by_the_renderer(cloud: Api) -> None:
    """1:1 or nothing: an inconsistent IR never reaches the kernel."""
    from dataclasses import replace

    from secfw.errors import BackendError

    cloud.add_floating_ip("p", "vm1", "192.0.2.2")
    hf = compile_host(cloud.snapshot(), "h1")
    twice = replace(hf, floating=(*hf.floating, FloatingNat("192.0.2.2", "10.1.0.9", "tapx",
                                                            "x")))
    with pytest.raises(BackendError, match="mapped twice"):
        render(twice)


@pytest.mark.parametrize("bad", ["10.1.0.9 -j ACCEPT", "10.1.0.9/32", "2001:db8::1", "010.1.0.9"])
def test_iptables_prints_only_canonical_ipv4_addresses(cloud: Api, bad: str) -> None:
    """Nothing but an address reaches a NAT rule (names are data)."""
    from dataclasses import replace

    from secfw.errors import BackendError

    cloud.add_floating_ip("p", "vm1", "192.0.2.2")
    hf = compile_host(cloud.snapshot(), "h1")
    with pytest.raises(BackendError, match="not IPv4"):
        nat_table(replace(hf, floating=(replace(hf.floating[0], fixed=bad),)))
    with pytest.raises(BackendError):
        render(replace(hf, floating=(replace(hf.floating[0], floating=bad),)))


def _nat(src: str, dst: str, reply_src: str, reply_dst: str, zone: int = 0) -> NatEntry:
    """A TCP entry ``src -> dst:80`` whose reply tuple is ``reply_src -> reply_dst``."""
    return NatEntry(Entry(Packet(src, dst, 6, 40000, 80), zone=zone), reply_src, reply_dst)


def test_stale_nat_keeps_only_current_bindings_through_floating_addresses(cloud: Api) -> None:
    """A full pass's check (conntrack.stale_nat): DNAT from a pool address to
    anything but its current fixed address, and SNAT to a pool address that is no
    longer the source's, are stale; current bindings, hairpins, untranslated
    traffic, the metadata redirect and other zones are left alone."""
    state = CloudState.from_snapshot(cloud.store.load())
    pools = floating_pools(state)
    assert pools == ("192.0.2.0/24",)
    fip, other = "192.0.2.1", "192.0.2.2"
    nat = HostFilter("h1", (), (), (), floating=(FloatingNat(fip, "10.1.0.5", "tapb", "b"),))
    ext = "203.0.113.10"
    current_in = _nat(ext, fip, "10.1.0.5", ext)
    current_out = _nat("10.1.0.5", ext, ext, fip)
    own_hairpin = _nat("10.1.0.5", fip, "10.1.0.5", fip)
    peer_hairpin = _nat("10.2.0.7", fip, "10.1.0.5", "10.2.0.7")
    moved_in = _nat(ext, fip, "10.1.0.9", ext)           # fip went from .9 to .5
    moved_out = _nat("10.1.0.9", ext, ext, fip)
    gone_in = _nat(ext, other, "10.2.0.7", ext)           # other no longer mapped
    gone_out = _nat("10.2.0.7", ext, ext, other)
    plain = _nat("10.1.0.5", ext, ext, "10.1.0.5")        # before association: no NAT
    metadata = _nat("10.1.0.5", "169.254.169.254", "10.0.0.1", "10.1.0.5")
    zoned = _nat(ext, other, "10.2.0.7", ext, zone=3)
    entries = [current_in, current_out, own_hairpin, peer_hairpin, moved_in, moved_out,
               gone_in, gone_out, plain, metadata, zoned]
    stale = [moved_in.entry, moved_out.entry, gone_in.entry, gone_out.entry]
    assert list(stale_nat(entries, nat, pools)) == stale
    # Without the pools only the host's own mappings are known: an address no
    # longer mapped here goes unnoticed — why the reconciler passes the pools.
    assert list(stale_nat(entries, nat, ())) == [moved_in.entry, moved_out.entry]
    assert list(stale_nat(entries, HostFilter("h1", (), (), ()), ())) == []

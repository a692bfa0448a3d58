"""compiler/sources.py ``shared_fixed_addresses``: no shared fixed address (the
fast path) gives nothing; one address on two ports — however written — names
both ports, and only them."""

from __future__ import annotations

from dataclasses import replace

from test_nft_render import small

from secfw.compiler.sources import FixedAddresses, shared_fixed_addresses


def test_distinct_addresses_share_nothing() -> None:
    ports = small().ports
    assert len({a for p in ports for a in (*p.ipv4, *p.ipv6)}) == sum(
        len(p.ipv4) + len(p.ipv6) for p in ports)
    assert shared_fixed_addresses(ports) == {}


def test_a_shared_address_names_both_ports_only() -> None:
    first, second, *rest = small().ports
    twin = replace(second, ipv4=first.ipv4)
    found = shared_fixed_addresses([first, twin, *rest])
    assert set(found) == {first.port_id, twin.port_id}
    assert all("cannot both be routed" in why for why in found.values())


def test_an_ipv6_address_written_differently_is_still_shared() -> None:
    first, second, *rest = small().ports
    one = replace(first, ipv6=("2001:db8::5",))
    two = replace(second, ipv6=("2001:0db8:0::5",))
    assert set(shared_fixed_addresses([one, two, *rest])) == {one.port_id, two.port_id}


def test_the_index_follows_ports_added_and_removed() -> None:
    """FixedAddresses, patched port by port (as the incremental compiler does),
    answers what the ports it holds give afresh: a third owner joins the
    reason, and removing owners down to one clears the address."""
    first, second, third, *rest = small().ports
    twin, triplet = replace(second, ipv4=first.ipv4), replace(third, ipv4=first.ipv4)
    index = FixedAddresses([first, *rest])
    assert index.shared() == {}
    held = [first, *rest]
    for port in (twin, triplet):
        index.add(port)
        held.append(port)
        assert index.shared() == shared_fixed_addresses(held) != {}
    assert triplet.tap in index.shared()[first.port_id]
    for port in (first, twin):
        index.remove(port)
        held.remove(port)
        assert index.shared() == shared_fixed_addresses(held)
    assert index.shared() == {}

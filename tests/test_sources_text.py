"""compiler.sources (and build.host_key) print link-local and IPv4 host addresses
without ipaddress or netaddr (a big host's first render and compile parsed 10^4 of
them): the text must be exactly what those libraries print, for every MAC shape (a
zero first group of the interface id included) and every IPv4 address."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from secfw.compiler.sources import _host, link_local

_OCTET = st.one_of(st.sampled_from([0, 2, 0xFF]), st.integers(0, 255))


def _expected(octets: list[int]) -> str:
    flipped = [octets[0] ^ 0x02, *octets[1:]]
    iid = bytes([*flipped[:3], 0xFF, 0xFE, *flipped[3:]])
    return f"{ipaddress.IPv6Address(bytes([0xFE, 0x80]) + bytes(6) + iid)}/128"


@given(st.lists(_OCTET, min_size=6, max_size=6))
def test_link_local_is_printed_as_ipaddress_prints_it(octets: list[int]) -> None:
    mac = ":".join(f"{o:02x}" for o in octets)
    assert link_local.__wrapped__(mac) == _expected(octets)


def test_link_local_of_a_mac_whose_interface_id_starts_with_zero() -> None:
    assert link_local.__wrapped__("02:00:00:00:00:00") == "fe80::ff:fe00:0/128"


@given(st.ip_addresses(v=4))
def test_an_ipv4_host_is_printed_as_ipaddress_prints_it(address: ipaddress.IPv4Address) -> None:
    for text in (str(address), f"{address}/32"):
        assert _host.__wrapped__(text) == ipaddress.ip_network(text).with_prefixlen


@given(st.ip_addresses(v=4))
def test_an_ipv4_host_key_is_what_netaddr_gives(address: ipaddress.IPv4Address) -> None:
    import netaddr

    from secfw.compiler.build import host_key

    for text in (str(address), f"{address}/32"):
        net = netaddr.IPNetwork(text)
        assert host_key.__wrapped__(text) == (4, net.first, str(net.cidr))

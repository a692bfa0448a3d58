"""The same-net set's clip (compiler/build.py ``_clip``) by integer arithmetic
gives exactly what the :mod:`ipaddress` version gives — build.py keeps it as
``_clip_slow`` for the texts the integer version does not take; it is the
reference — on random IPv4/IPv6 CIDRs, bare addresses and texts it must refuse."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfw.compiler.build import _clip
from secfw.compiler.build import _clip_slow as reference_clip


def _network(version: int, address: int, prefix: int, bare: bool) -> str:
    bits = 32 if version == 4 else 128
    net = ipaddress.ip_network((address, prefix), strict=False)
    if bare or prefix == bits:
        return str(net.network_address) if bare else net.with_prefixlen
    return net.with_prefixlen


# Addresses drawn near a few bases, so nested and overlapping pairs are common.
_BASES = {4: (0x0A000000, 0xC0A80000), 6: (0x20010DB8 << 96, 0xFE80 << 112)}


@st.composite
def cidrs(draw: st.DrawFn) -> str:
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    base = draw(st.sampled_from(_BASES[version]))
    address = base + draw(st.integers(0, (1 << 20) - 1)) * draw(st.sampled_from([1, 256, 4096]))
    prefix = draw(st.integers(max(0, bits - 28), bits) | st.integers(0, bits))
    return _network(version, address % (1 << bits), prefix, draw(st.booleans()) and prefix == bits)


def _outcome(fn: object, cidr: str, subnet: str) -> object:
    try:
        return fn(cidr, subnet)  # type: ignore[operator]
    except ValueError as error:
        return type(error)


@settings(max_examples=3000, deadline=None)
@given(cidrs(), cidrs())
def test_clip_equals_reference(cidr: str, subnet: str) -> None:
    assert _outcome(_clip, cidr, subnet) == _outcome(reference_clip, cidr, subnet)


@pytest.mark.parametrize("cidr, subnet", [
    ("10.0.0.5", "10.0.0.0/24"),
    ("10.0.0.0/16", "10.0.0.0/24"),  # a pair covering the subnet: the subnet
    ("10.0.1.0/24", "10.0.0.0/24"),  # disjoint
    ("2001:db8::5", "10.0.0.0/24"),  # other family
    ("2001:db8::/32", "2001:0db8:0:0::/64"),  # the subnet in canonical text
    ("2001:db8::5/128", "2001:db8::/64"),
    ("10.0.0.5/24", "10.0.0.0/24"),  # host bits set: both refuse
    ("010.0.0.5", "10.0.0.0/24"),  # leading zero: both refuse
    ("10.0.0.0/255.255.255.0", "10.0.0.0/8"),  # netmask form: the slow path
    ("fe80::1%eth0", "fe80::/64"),  # zone: the slow path
    ("10.0.0.0/033", "10.0.0.0/8"),
    ("::ffff:10.0.0.1", "::ffff:0:0/96"),
])
def test_clip_edge_cases(cidr: str, subnet: str) -> None:
    assert _outcome(_clip, cidr, subnet) == _outcome(reference_clip, cidr, subnet)

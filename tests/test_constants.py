"""The numbers defined once in :mod:`secfw.constants` are the ones the renderers
write. The nftables protection spells ICMPv6 types by name: the rendered text's
names are mapped back through nft's symbol table and compared with the constants."""

from __future__ import annotations

import importlib
import re

from secfw.backends.nftables import render, to_nft_text
from secfw.backends.nftables.canonical import ICMPV6_TYPES
from secfw.compiler.ir import HostFilter
from secfw.constants import (
    DHCP_CLIENT,
    DHCP_SERVER,
    ND_DROPPED_FROM_INSTANCE,
    ND_FROM_INSTANCE,
    ND_FROM_UNSPECIFIED,
    ND_REDIRECT,
    ND_TO_INSTANCE,
    PORT_PROTOCOL_NUMBERS,
)

#: The iptables renderer module (the package exports a function of the same name).
ipt = importlib.import_module("secfw.backends.iptables.render")


def _chain(text: str, name: str) -> str:
    return text.split(f"chain {name} {{", 1)[1].split("\n\t}", 1)[0]


def _icmpv6_sets(chain: str) -> list[frozenset[int]]:
    """Every ``icmpv6 type { … }`` set (or single type) of a chain, as numbers."""
    found = []
    for group in re.findall(r"icmpv6 type (\{[^}]*\}|[a-z0-9-]+)", chain):
        names = [n.strip() for n in group.strip("{}").split(",")]
        found.append(frozenset(ICMPV6_TYPES[n] for n in names))
    return found


def test_nftables_protection_uses_the_constants() -> None:
    text = to_nft_text(render(HostFilter("h", (), (), ())))
    egress = _chain(text, "egress-protect")
    sets = _icmpv6_sets(egress)
    assert ND_FROM_UNSPECIFIED in sets
    assert frozenset({*ND_DROPPED_FROM_INSTANCE, ND_REDIRECT}) in sets
    assert ND_FROM_INSTANCE - {136} in sets  # 136: the nd_targets check comes first
    assert ND_TO_INSTANCE in _icmpv6_sets(_chain(text, "ingress-filter"))
    for sport, dport in (*DHCP_CLIENT.values(), *DHCP_SERVER.values()):
        assert f"udp sport {sport} udp dport {dport}" in egress


def test_iptables_protection_uses_the_constants() -> None:
    assert set(ipt.ND_TYPES) == ND_FROM_INSTANCE
    assert set(ipt.ND_INGRESS) == ND_TO_INSTANCE
    assert set(ipt.ND_UNSPECIFIED) == ND_FROM_UNSPECIFIED
    assert set(ipt.PORT_MATCH) == PORT_PROTOCOL_NUMBERS

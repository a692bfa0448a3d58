"""Floating IPs in ``inet secfw``: 1:1 NAT as data (docs/nftables.md, "Floating IPs").

::

    map floating_dnat { type ipv4_addr : ipv4_addr; }      floating -> fixed
    map floating_snat { type ipv4_addr : ipv4_addr; }      fixed -> floating
    set floating_internal { type ipv4_addr; flags interval; }   instance networks
    set floating_self { type ipv4_addr . ipv4_addr; }           fixed . fixed
    chain floating-dnat { type nat hook prerouting priority -100;
        dnat ip to ip daddr map @floating_dnat }
    chain floating-snat { type nat hook postrouting priority 100;
        ip saddr . ip daddr @floating_self snat ip to ip saddr map @floating_snat
        ip daddr != @floating_internal snat ip to ip saddr map @floating_snat }

An instance that reaches its own floating address gets its packet back DNATed
to its own fixed address: it would drop a packet from one of its own addresses
arriving from outside (the kernel's martian-source check), so that hairpin is
SNATed to the floating address (``floating_self``: nft cannot compare two
header fields, so the pair is a set element). Other instances see the hairpin
with the sender's fixed address, as any traffic between instances.

An association is two map elements, never a rule. Nothing is rendered while no
floating IP is associated on the host, so a host without any keeps exactly the
tables it had. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress

from secfw.backends.nftables.layout import (
    FLOATING_DNAT,
    FLOATING_DNAT_CHAIN,
    FLOATING_DNAT_HOOK,
    FLOATING_INTERNAL,
    FLOATING_SELF,
    FLOATING_SNAT,
    FLOATING_SNAT_CHAIN,
    FLOATING_SNAT_HOOK,
    canonical_cidr,
)
from secfw.backends.nftables.syntax import (
    Chain,
    Concat,
    Datum,
    Element,
    MapLookup,
    Match,
    NamedSet,
    Nat,
    Payload,
    SetRef,
    make_rule,
)
from secfw.compiler.ir import HostFilter
from secfw.errors import BackendError


def floating_part(hf: HostFilter) -> tuple[list[NamedSet], list[Chain]]:
    """The NAT sets and chains of ``hf`` (none without floating IPs).

    Raises BackendError when an address is not IPv4 or a floating or fixed
    address appears twice (the NAT would not be one to one)."""
    if not hf.floating:
        return [], []
    dnat = {_host(n.floating): Datum(_address(n.fixed)) for n in hf.floating}
    snat = {_host(n.fixed): Datum(_address(n.floating)) for n in hf.floating}
    if len(dnat) != len(hf.floating) or len(snat) != len(hf.floating):
        raise BackendError("floating IPs: a floating or fixed address is mapped twice")
    sets = [
        _address_map(FLOATING_DNAT, dnat),
        _address_map(FLOATING_SNAT, snat),
        NamedSet(FLOATING_INTERNAL, ("ipv4_addr",), ("interval",),
                 tuple(Element((canonical_cidr(c, "ipv4"),)) for c in hf.internal)),
        NamedSet(FLOATING_SELF, ("ipv4_addr", "ipv4_addr"), (),
                 tuple(Element((fixed, fixed)) for fixed in sorted(snat))),
    ]
    daddr, saddr = Payload("ip", "daddr"), Payload("ip", "saddr")
    to_floating = Nat("snat", MapLookup(saddr, SetRef(FLOATING_SNAT)))
    chains = [
        Chain(FLOATING_DNAT_CHAIN, FLOATING_DNAT_HOOK, (
            make_rule((Nat("dnat", MapLookup(daddr, SetRef(FLOATING_DNAT))),)),)),
        Chain(FLOATING_SNAT_CHAIN, FLOATING_SNAT_HOOK, (
            make_rule((Match(Concat((saddr, daddr)), SetRef(FLOATING_SELF)), to_floating)),
            make_rule((Match(daddr, SetRef(FLOATING_INTERNAL), "!="), to_floating)))),
    ]
    return sets, chains


def _address_map(name: str, entries: dict[str, Datum]) -> NamedSet:
    elements = tuple(Element((key,), datum) for key, datum in sorted(entries.items()))
    return NamedSet(name, ("ipv4_addr",), (), elements, is_map=True, data_type="ipv4_addr")


def _host(address: str) -> str:
    """``a.b.c.d/32``: the normal form of an address as a set key. The address
    must be one IPv4 address in :mod:`ipaddress`'s own text."""
    try:
        canonical = str(ipaddress.IPv4Address(address))
    except ValueError:
        canonical = None
    if canonical != address:
        raise BackendError(f"floating IPs: {address!r} is not one IPv4 address")
    return canonical_cidr(address, "ipv4")


def _address(address: str) -> str:
    """The address alone (a map's datum)."""
    return _host(address)[: -len("/32")]

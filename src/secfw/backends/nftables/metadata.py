"""The metadata redirect in table ``inet secfw`` (``docs/nftables.md``,
"Metadata service"). Pure: no I/O.

::

    map metadata_ports { type ifname . ipv4_addr : mark; }   # tap . own address -> ct mark
                                                              # (mark . ipv4_addr on bridged hosts)
    chain metadata-redirect { type nat hook prerouting priority -100; policy accept;
        ip daddr 169.254.169.254 tcp dport 80
            ct mark set iifname . ip saddr map @metadata_ports dnat ip to ADDR:PORT }
    chain metadata-in {                    # input-egress sends tap -> ADDR:PORT here
        ct mark != 0x5e000000-0x5effffff drop # not redirected: never reaches the server
        jump egress-guard                           # anti-spoofing, protections, ct state
        accept }                                    # whatever the egress rules say

The map lookup stops the rule when ``tap . source`` is not one of a protected
port's own addresses (nft: a lookup that finds nothing breaks the rule), so a
spoofed request is neither marked nor redirected: it stays addressed to
169.254.169.254 and meets the port's anti-spoofing on forward, which drops it.
"""

from __future__ import annotations

from secfw.backends.nftables.layout import (
    ADDRESS_KEYWORD,
    EGRESS_GUARD,
    METADATA_IN,
    METADATA_PORTS,
    METADATA_REDIRECT,
    METADATA_ROUTE,
    METADATA_ROUTES,
    PortIdentity,
    canonical_cidr,
    check_tap,
)
from secfw.backends.nftables.syntax import (
    ACCEPT,
    DROP,
    Chain,
    Concat,
    Ct,
    Datum,
    Dnat,
    Element,
    Hook,
    MapLookup,
    Match,
    Meta,
    NamedSet,
    Payload,
    Prefix,
    Quoted,
    Rule,
    SetCt,
    SetMeta,
    SetRef,
    Span,
    Verdict,
    make_rule,
)
from secfw.compiler.ir import MetadataRedirect
from secfw.compiler.metadata import MARK_MASK, MARK_TAG, METADATA_ADDRESS, METADATA_PORT
from secfw.errors import BackendError

# DNAT belongs in a nat chain on prerouting; "dstnat" is priority -100 (nft(8),
# "CHAINS", standard priority names). Only the first packet of a connection
# traverses nat chains: later ones follow the conntrack entry (nft wiki,
# "Performing Network Address Translation").
METADATA_REDIRECT_HOOK = Hook("nat", "prerouting", -100, "accept")
# A "route" chain on output: when it changes the packet mark, the kernel looks the
# route up again (nft(8), "CHAINS": type route; nf_tables_ipv4.c → ip_route_me_harder).
# Priority mangle (-150): after conntrack (-200) attached the entry and its mark.
METADATA_ROUTE_HOOK = Hook("route", "output", -150, "accept")

_TCP = Match(Meta("l4proto"), 6)


def metadata_sets(md: MetadataRedirect, ident: PortIdentity) -> list[NamedSet]:
    """``metadata_ports``: (port key, own IPv4 address) → the port's conntrack mark."""
    elements = sorted(
        Element((ident.egress(check_tap(p.tap)), canonical_cidr(p.address, "ipv4")),
                Datum(str(p.mark)))
        for p in md.ports)
    found = [NamedSet(METADATA_PORTS, (ident.key_type, "ipv4_addr"), (), tuple(elements),
                      is_map=True, data_type="mark")]
    routes = reply_routes(md)
    if routes:
        found.append(NamedSet(METADATA_ROUTES, ("mark",), (), tuple(
            Element((str(mark),), Datum(str(route))) for mark, route in routes),
            is_map=True, data_type="mark"))
    return found


def reply_routes(md: MetadataRedirect) -> tuple[tuple[int, int], ...]:
    """(conntrack mark, reply packet mark) of the ports whose network overlaps
    another, sorted. Two taps whose marks collide but whose networks differ are
    left out: which network a reply is for would be a guess (the server then
    serves neither anyway, docs/nftables.md)."""
    routes: dict[int, set[int]] = {}
    for port in md.ports:
        routes.setdefault(port.mark, set()).add(port.route)
    return tuple(sorted((mark, next(iter(found))) for mark, found in routes.items()
                        if len(found) == 1 and 0 not in found))


def metadata_chains(md: MetadataRedirect, ident: PortIdentity) -> list[Chain]:
    """``metadata-redirect`` (the DNAT) and ``metadata-in`` (see the module docstring)."""
    address = canonical_cidr(md.address, "ipv4").removesuffix("/32")
    if not 0 < md.port < 65536:
        raise BackendError(f"nftables: metadata port {md.port} out of range")
    key = Concat((ident.egress_key, Payload("ip", "saddr")))
    redirect = make_rule((
        Match(Payload("ip", "daddr"), Prefix(METADATA_ADDRESS + "/32")), _TCP,
        Match(Payload("th", "dport"), Span(METADATA_PORT, METADATA_PORT)),
        SetCt("mark", MapLookup(key, SetRef(METADATA_PORTS))), Dnat(address, md.port)))
    # A range, not "& mask": nft lists a masked compare back as a prefix.
    tagged = Match(Ct("mark"), Span(MARK_TAG, MARK_TAG | (~MARK_MASK & 0xFFFFFFFF)), "!=")
    inbound = (make_rule((tagged, DROP)), make_rule((Verdict("jump", EGRESS_GUARD),)),
               make_rule((ACCEPT,)))
    chains = [Chain(METADATA_REDIRECT, METADATA_REDIRECT_HOOK, (redirect,)),
              Chain(METADATA_IN, None, inbound)]
    if reply_routes(md):
        # The server's replies (SYN-ACK included: it is sent on output and belongs
        # to the redirected entry) get the packet mark their network is routed by.
        marked = make_rule((SetMeta("mark", MapLookup(Ct("mark"), SetRef(METADATA_ROUTES))),))
        chains.append(Chain(METADATA_ROUTE, METADATA_ROUTE_HOOK, (marked,)))
    return chains


def to_server_rule(md: MetadataRedirect | None, ident: PortIdentity) -> list[Rule]:
    """The rule of ``input-egress`` that sends what a tap sends to the server's
    ``ADDR:PORT`` to ``metadata-in`` (none without a redirect). On a bridged
    host the inet hooks see the bridge, not the tap, so every packet to the
    server but the host's own (``lo``) goes there: the server's address and
    port are the redirect's alone."""
    if md is None:
        return []
    address = canonical_cidr(md.address, "ipv4")
    match: tuple[Match, ...] = (
        Match(Payload(ADDRESS_KEYWORD["ipv4"], "daddr"), Prefix(address)), _TCP,
        Match(Payload("th", "dport"), Span(md.port, md.port)))
    if ident.topology == "bridged":
        match = (Match(Meta("iifname"), Quoted("lo"), "!="), *match)
    return [make_rule((*match, Verdict("goto", METADATA_IN)))]

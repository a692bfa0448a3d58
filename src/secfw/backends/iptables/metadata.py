"""The metadata redirect for the iptables backend (``docs/iptables.md``,
"Metadata redirect"). Pure: no I/O. IPv4 only, like the redirect itself.

::

    nat   PREROUTING -d 169.254.169.254/32 -p 6 -m tcp --dport 80 -j secfw-metadata
          secfw-metadata   -s <own address>/32 <from tap> -j CONNMARK --set-xmark <mark>/0xffffffff
                           (one rule per address of each protected port)
                           -p 6 -m connmark --mark 0x5e000000/0xff000000
                               -j DNAT --to-destination A:P
    filter secfw-in        -d A/32 <from tap+> -p 6 -m tcp --dport P -g secfw-metadata-in  (first)
          secfw-metadata-in  -m connmark ! --mark 0x5e000000/0xff000000 -j DROP
                           -s <own address>/32 <from tap> -j RETURN   (allowed: back to INPUT)
                           -j DROP

Rules are written in the order iptables-save prints their parts, so a read-back
equals the rendering (checked: a second plan is empty, both variants' save
format being the same).

Only a connection's first packet traverses the nat table, and the connmark the
first rules set is there for the DNAT rule of the same traversal: a source that
is not the tap's own address gets no mark, so no DNAT, and stays addressed to
169.254.169.254, where the egress anti-spoofing of ``secfw-fwd`` drops it.
``secfw-metadata-in`` checks tap and source again for every packet of the
connection, and RETURNs before ``secfw-egress``: the egress rules are not
consulted (as nova-network and Neutron do).
"""

from __future__ import annotations

from secfw.compiler.ir import MetadataRedirect
from secfw.compiler.metadata import MARK_MASK, MARK_TAG, METADATA_ADDRESS, METADATA_PORT
from secfw.errors import BackendError

#: Why a port of an overlapping network gets no metadata from this backend.
OVERLAP_REFUSED = ("iptables: the port's network overlaps another, and this backend cannot "
                   "route the metadata server's replies by network (the nftables backend can)")
NAT_CHAIN = "secfw-metadata"
IN_CHAIN = "secfw-metadata-in"
#: The jump from the nat table's PREROUTING (inserted at position 1).
NAT_JUMP = ("PREROUTING",
            f"-d {METADATA_ADDRESS}/32 -p 6 -m tcp --dport {METADATA_PORT} -j {NAT_CHAIN}")
_TAGGED = f"-m connmark --mark {MARK_TAG:#010x}/{MARK_MASK:#010x}"
_UNTAGGED = f"-m connmark ! --mark {MARK_TAG:#010x}/{MARK_MASK:#010x}"


def _server(md: MetadataRedirect) -> tuple[str, int]:
    """The server's address and port, checked (they are printed into rules)."""
    import ipaddress

    try:
        address = str(ipaddress.IPv4Address(md.address))
    except ValueError as exc:
        raise BackendError(f"iptables: metadata address {md.address!r}: {exc}") from exc
    if not 0 < md.port < 65536:
        raise BackendError(f"iptables: metadata port {md.port} out of range")
    return address, md.port


def nat_chain(md: MetadataRedirect, from_port: dict[str, str]) -> tuple[str, ...]:
    """The rules of ``secfw-metadata``; ``from_port`` maps each tap to its
    ingress-interface match (``-i tap…`` or the physdev one)."""
    address, port = _server(md)
    overlapping = sorted({p.tap for p in md.ports if p.route})
    if overlapping:
        # The replies of the server would need a packet mark to be routed into the
        # right one of two networks with the same addresses (the nftables backend's
        # "metadata-route" chain); this backend programs no mangle table, so the
        # port is refused and the agent keeps its tap closed.
        raise BackendError(f"{OVERLAP_REFUSED}: {', '.join(overlapping)}")
    marks = tuple(f"-s {p.address}/32 {from_port[p.tap]} -j CONNMARK --set-xmark "
                  f"{p.mark:#010x}/0xffffffff" for p in md.ports)
    # DNAT to a port needs the protocol in the rule (iptables-extensions(8), DNAT)
    return (*marks, f"-p 6 {_TAGGED} -j DNAT --to-destination {address}:{port}")


def in_chain(md: MetadataRedirect, from_port: dict[str, str]) -> tuple[str, ...]:
    """The rules of ``secfw-metadata-in``."""
    allowed = tuple(f"-s {p.address}/32 {from_port[p.tap]} -j RETURN" for p in md.ports)
    return (f"{_UNTAGGED} -j DROP", *allowed, "-j DROP")


def to_server_rule(md: MetadataRedirect, from_taps: str) -> str:
    """The first rule of ``secfw-in``: what taps send to the server. Written in
    the order iptables-save prints (``-d``, ``-i``, ``-p``, then the match
    modules in the order given), so that it reads back equal."""
    address, port = _server(md)
    if from_taps.startswith("-i "):
        return f"-d {address}/32 {from_taps} -p 6 -m tcp --dport {port} -g {IN_CHAIN}"
    return f"-d {address}/32 -p 6 {from_taps} -m tcp --dport {port} -g {IN_CHAIN}"

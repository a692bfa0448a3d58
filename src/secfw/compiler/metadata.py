"""The metadata redirect of a host: which ports may reach the metadata service,
and the conntrack mark that tells the server which port asks. Pure: no I/O.

Instances read their metadata from ``169.254.169.254:80`` (nova-network and
Neutron alike); the host DNATs that to its local metadata server. The server must
learn *which instance* asks from the kernel, never from what the instance sends:

* the redirect matches the packet's real ingress tap together with one of that
  port's own IPv4 addresses (``tap . source address``), so a spoofed source is
  not redirected at all (it meets anti-spoofing like any other packet) and two
  ports with the same fixed address on different networks are told apart by tap;
* the redirect sets the connection's conntrack mark to :func:`port_mark` of the
  tap; the server reads the mark of its accepted connection back from conntrack
  (:mod:`secfw.metadata.identity`) and serves the port whose tap has that mark
  *and* whose address is the connection's original source.

The mark is a function of the tap name alone, so the server needs no table
shared with the agent: it recomputes it from the model.
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Iterable
from dataclasses import replace
from functools import lru_cache

from secfw.compiler.ir import HostFilter, MetadataPort, MetadataRedirect, PortPolicy

#: The address instances ask (EC2's and OpenStack's link-local metadata address).
METADATA_ADDRESS = "169.254.169.254"
METADATA_PORT = 80
#: The conntrack marks of metadata connections: this tag in the top byte, the low
#: 24 bits of the tap name's CRC-32 below it. Only connections the redirect made
#: carry it.
MARK_TAG = 0x5E000000
MARK_MASK = 0xFF000000
#: The packet marks of the server's replies to ports of overlapping networks: this
#: tag in the top byte, the network's VLAN id below. The host routes each by a
#: policy rule ``fwmark route_mark(VLAN) lookup route_mark(VLAN)`` to a table that
#: leads into that network (ip-rule(8); the lab's ``wire_metadata`` sets them).
ROUTE_TAG = 0x5F000000


def route_mark(vlan: int) -> int:
    """The packet mark (and routing table) of metadata replies into VLAN ``vlan``."""
    if not 0 < vlan < 4096:
        raise ValueError(f"VLAN {vlan} out of range")
    return ROUTE_TAG | vlan


def port_mark(tap: str) -> int:
    """The conntrack mark of metadata connections from ``tap``."""
    return MARK_TAG | (zlib.crc32(tap.encode()) & ~MARK_MASK & 0xFFFFFFFF)


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (an IPv4 address and a TCP port) as ``(address, port)``;
    ValueError otherwise. The metadata address itself is refused: the server
    must listen on an address of the host's own, which the redirect targets."""
    address, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{text!r} is not ADDR:PORT")
    parsed = ipaddress.IPv4Address(address)
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port {port} out of range")
    if str(parsed) == METADATA_ADDRESS or parsed.is_unspecified:
        raise ValueError(f"{text!r}: listen on an address of the host's own")
    return str(parsed), port


def metadata_redirect(ports: Iterable[PortPolicy], address: str, port: int) -> MetadataRedirect:
    """The redirect to ``address:port`` for ``ports``: one entry per IPv4 address
    of every port with port security (a port without it has no anti-spoofing,
    so neither its source address nor — on a bridged host — its frames can be
    trusted to name it: it gets no metadata). In the order of ``ports`` (the
    compiler's are sorted by tap), each port's addresses sorted: deterministic."""
    entries = [e for p in ports if p.port_security
               for e in _entries(p.tap, p.ipv4, p.metadata_route)]
    return MetadataRedirect(address, port, tuple(entries))


@lru_cache(maxsize=1 << 16)
def _entries(tap: str, ipv4: tuple[str, ...], route: int) -> tuple[MetadataPort, ...]:
    """A port's entries, cached: every pass rebuilds the redirect of the whole
    host, and most ports are the same as in the last one."""
    mark = port_mark(tap)
    return tuple(MetadataPort(tap, address, mark, route) for address in sorted(ipv4))


def with_metadata(hf: HostFilter, listen: tuple[str, int] | None) -> HostFilter:
    """``hf`` with the metadata redirect of its ports to ``listen`` (None: none)."""
    if listen is None:
        return hf if hf.metadata is None else replace(hf, metadata=None)
    return replace(hf, metadata=metadata_redirect(hf.ports, *listen))

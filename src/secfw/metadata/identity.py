"""Which port a metadata connection came from, read from the kernel.

The agent's redirect (:mod:`secfw.compiler.metadata`) DNATs an instance's
``169.254.169.254:80`` to the server and marks the connection in conntrack with
its tap's mark. The server's accepted socket knows the peer (the instance's
address and port: the redirect changes only the destination) and its own
address; the conntrack entry whose *reply* tuple is ``server → peer`` is that
connection (ctnetlink ``IPCTNL_MSG_CT_GET`` accepts ``CTA_TUPLE_REPLY``,
``nf_conntrack_netlink.c``). Its mark and original tuple are the kernel's word:
nothing the instance sent is consulted. A connection not made by the redirect
(its original destination is not ``169.254.169.254:80``, or it carries no
metadata mark) is nobody's.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
from dataclasses import dataclass
from typing import Any

from pyroute2 import NFCTSocket
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from secfw.compiler.metadata import MARK_MASK, MARK_TAG, METADATA_ADDRESS, METADATA_PORT
from secfw.constants import TCP
from secfw.errors import BackendError


@dataclass(frozen=True)
class Asker:
    """A redirected connection: its conntrack mark and original source address."""

    mark: int
    source: str


class ConntrackIdentity:
    """Looks connections up in the conntrack table of the server's namespace, one
    ctnetlink socket per thread (waitress serves requests on several threads)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def asker(self, local: tuple[str, int], peer: tuple[str, int]) -> Asker | None:
        """The redirected connection ``peer → local`` (TCP), or None when conntrack
        has no such entry or the redirect did not make it."""
        reply = NFCTAttrTuple(family=socket.AF_INET, saddr=local[0], daddr=peer[0], proto=TCP,
                              sport=local[1], dport=peer[1])
        try:
            messages = self._socket().entry("get", tuple_reply=reply)
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:
                return None
            raise BackendError(f"conntrack lookup failed: {exc}") from exc
        for message in messages:
            found = redirected(message)
            if found is not None:
                return found
        return None

    def _socket(self) -> Any:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._local.sock = NFCTSocket(nfgen_family=socket.AF_INET)
        return sock


def redirected(message: Any) -> Asker | None:
    """The :class:`Asker` of a ctnetlink entry the metadata redirect made: original
    destination ``169.254.169.254:80`` and a metadata mark; None otherwise."""
    mark = message.get_attr("CTA_MARK")
    orig = message.get_attr("CTA_TUPLE_ORIG")
    if mark is None or orig is None or mark & MARK_MASK != MARK_TAG:
        return None
    ip, proto = orig.get_attr("CTA_TUPLE_IP"), orig.get_attr("CTA_TUPLE_PROTO")
    if ip is None or proto is None:
        return None
    destination = ip.get_attr("CTA_IP_V4_DST")
    if (destination is None or str(ipaddress.ip_address(destination)) != METADATA_ADDRESS
            or proto.get_attr("CTA_PROTO_DST_PORT") != METADATA_PORT):
        return None
    return Asker(int(mark), str(ipaddress.ip_address(ip.get_attr("CTA_IP_V4_SRC"))))

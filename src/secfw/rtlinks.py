"""The links of the calling thread's network namespace, from one rtnetlink dump.

What :func:`secfw.netns.tap_links` needs — each link's index, name, master and
kind — asked directly: ``RTM_GETLINK`` with ``NLM_F_DUMP`` on a ``NETLINK_ROUTE``
socket, answered by ``RTM_NEWLINK`` messages (``struct ifinfomsg`` then
attributes ``IFLA_IFNAME``, ``IFLA_MASTER``, ``IFLA_LINKINFO`` → ``IFLA_INFO_KIND``;
rtnetlink(7), ``include/uapi/linux/if_link.h``) up to ``NLMSG_DONE``.

Why not pyroute2's ``IPRoute``: importing any part of pyroute2 runs its package
``__init__`` (asyncio, the NDB, conntrack, ethtool…): ~0.2 s of every one-shot
agent process, which reads the links once. A socket belongs to the namespace it
was created in, so the caller enters the namespace first.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import NamedTuple

RTM_NEWLINK = 16
RTM_GETLINK = 18
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLM_F_DUMP_INTR = 0x10
IFLA_IFNAME = 3
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
#: Bits of an attribute's type that are flags (NLA_F_NESTED, NLA_F_NET_BYTEORDER).
_TYPE_MASK = 0x3FFF
#: A dump interrupted by a concurrent change is asked again, this many times at most.
_ATTEMPTS = 5

_HEADER = struct.Struct("=LHHLL")  # struct nlmsghdr
_IFINFO = struct.Struct("=BxHiII")  # struct ifinfomsg
_ATTR = struct.Struct("=HH")  # struct rtattr
_U32 = struct.Struct("=I")


class Link(NamedTuple):
    """One link: its index (``ifindex``), name, master's index (0: none) and kind (``bridge``,
    ``veth``, …; None when the kernel reports none, e.g. a plain tap)."""

    ifindex: int
    name: str
    master: int
    kind: str | None


def links() -> list[Link]:
    """Every link of the calling thread's namespace. Raises OSError."""
    for _ in range(_ATTEMPTS):
        found, interrupted = _dump()
        if not interrupted:
            return found
    raise OSError("rtnetlink link dump interrupted by changes, repeatedly")


def _dump() -> tuple[list[Link], bool]:
    """One dump: the links, and whether the kernel flagged it inconsistent."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        request = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.send(_HEADER.pack(_HEADER.size + len(request), RTM_GETLINK,
                               NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request)
        found: list[Link] = []
        interrupted = False
        while True:
            data = sock.recv(1 << 16)
            if not data:
                raise OSError("rtnetlink closed the dump")
            for kind, flags, body in _messages(data):
                interrupted |= bool(flags & NLM_F_DUMP_INTR)
                if kind == NLMSG_DONE:
                    return found, interrupted
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    raise OSError(code, os.strerror(code))
                if kind == RTM_NEWLINK:
                    found.append(_link(body))


def _messages(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, flags, payload) of each netlink message in one datagram."""
    out: list[tuple[int, int, bytes]] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, flags = _HEADER.unpack_from(data, offset)[:3]
        if length < _HEADER.size:
            raise OSError("malformed netlink message")
        out.append((kind, flags, data[offset + _HEADER.size:offset + length]))
        offset += (length + 3) & ~3
    return out


def _link(body: bytes) -> Link:
    """A ``RTM_NEWLINK`` payload: ``ifinfomsg`` and the attributes secfw reads."""
    index = _IFINFO.unpack_from(body)[2]
    attrs = _attributes(body, _IFINFO.size)
    name = attrs.get(IFLA_IFNAME, b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    master = _U32.unpack(attrs[IFLA_MASTER][:4])[0] if IFLA_MASTER in attrs else 0
    info = _attributes(attrs[IFLA_LINKINFO], 0) if IFLA_LINKINFO in attrs else {}
    kind = info[IFLA_INFO_KIND].split(b"\0", 1)[0].decode() if IFLA_INFO_KIND in info else None
    return Link(index, name, master, kind)


def _attributes(data: bytes, offset: int) -> dict[int, bytes]:
    """Attribute type (flags masked off) → payload, from ``offset`` to the end."""
    attrs: dict[int, bytes] = {}
    while offset + _ATTR.size <= len(data):
        size, kind = _ATTR.unpack_from(data, offset)
        if size < _ATTR.size:
            break
        attrs[kind & _TYPE_MASK] = data[offset + _ATTR.size:offset + size]
        offset += (size + 3) & ~3
    return attrs

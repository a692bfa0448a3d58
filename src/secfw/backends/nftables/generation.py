"""The nftables generation id of a network namespace (netlink NFT_MSG_GETGEN).

The kernel keeps one 32-bit counter per network namespace, ``base_seq``
(net/netfilter/nf_tables_api.c), and bumps it in ``nf_tables_commit`` for every
transaction that changes anything — ours, ``nft``'s, iptables-nft's, any
table's — before the transaction's changes become visible ("Bump generation
counter, invalidate any dump in progress. Cannot fail after this point", then
step 3 flips the generation cursor). A transaction with nothing to commit
returns before the bump; ``while (++base_seq == 0)`` skips 0 when it wraps. A
new namespace starts again at 1 (``nf_tables_init_net``).

So: the same generation read twice means no transaction committed in that
namespace in between, and nothing of its nftables configuration changed. The
agent uses this to skip a read-back of its tables (docs/agent.md, "Resync").

:class:`GenerationReader` asks with one small netlink request (``NFT_MSG_GETGEN``
of subsystem ``NFNL_SUBSYS_NFTABLES``; the answer is ``NFT_MSG_NEWGEN`` with
attribute ``NFTA_GEN_ID``): a few microseconds, no libnftables context, no
listing. A netlink socket belongs to the namespace it was created in, so the
reader answers for that namespace from any thread.

Why a raw socket and not pyroute2 (secfw's netlink library, used for links and
conntrack): the reader runs around every commit of the agent's loop, whose
member-change budget is 10 ms. Measured on the 2-core VM (2026-12-07),
pyroute2 0.9.7's ``NFTSocket.request_get(nft_gen_msg(), NFT_MSG_GETGEN)`` takes
0.3–0.8 ms a read (each call drives its own asyncio event loop, tied to the
thread that made the socket), this reader 0.03–0.07 ms from any thread. The
request and answer are one fixed 20-byte header and one 32-bit attribute.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

from secfw.errors import BackendError
from secfw.netns import inside_netns

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
#: getsockopt(2) option of Linux >= 5.14: the namespace's 64-bit cookie, never
#: reused while the machine runs (unlike the namespace's inode number).
SO_NETNS_COOKIE = 71

_HEADER = struct.Struct("=LHHLL")  # struct nlmsghdr
_NFGEN = struct.Struct("=BBH")  # struct nfgenmsg (family, version, res_id)
_ATTR = struct.Struct("=HH")  # struct nlattr
_MASK = 0xFFFFFFFF
#: The kernel answers GETGEN at once; a reader is called around every commit
#: of the agent's loop, so no answer within this bound is an error, not a wait.
TIMEOUT_S = 1.0
#: Messages read for one request before giving up (answers to older requests
#: that timed out may still be queued on the socket).
MAX_MESSAGES = 16


def next_generation(generation: int) -> int:
    """The generation one commit after ``generation``: 32 bits, 0 skipped
    (``while (++nft_net->base_seq == 0)``)."""
    following = (generation + 1) & _MASK
    return following or 1


class GenerationReader:
    """Reads the nftables generation of the namespace it was opened in (the
    current one, or ``netns``). Thread-safe: one request at a time."""

    def __init__(self, netns: str | None = None) -> None:
        """Raises BackendError when the socket cannot be opened."""
        try:
            with inside_netns(netns):
                self._sock = socket.socket(
                    socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        except OSError as exc:
            raise BackendError(f"nftables generation: {exc}") from exc
        try:
            self._sock.settimeout(TIMEOUT_S)
            self._sock.bind((0, 0))
        except OSError as exc:
            self._sock.close()
            raise BackendError(f"nftables generation: {exc}") from exc
        self._lock = threading.Lock()
        self._seq = 0

    def read(self) -> int:
        """The namespace's current generation. Raises BackendError — also for
        no answer within :data:`TIMEOUT_S` and for a malformed one: a caller
        that cannot read the generation reads the tables back instead."""
        with self._lock:
            self._seq = (self._seq + 1) & _MASK
            request = _HEADER.pack(_HEADER.size + _NFGEN.size,
                                   NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN,
                                   NLM_F_REQUEST, self._seq, 0) + _NFGEN.pack(0, 0, 0)
            try:
                self._sock.send(request)
                for _ in range(MAX_MESSAGES):
                    answer = self._sock.recv(4096)
                    if _HEADER.unpack_from(answer)[3] == self._seq:
                        return _parse(answer)
            except (OSError, struct.error) as exc:
                raise BackendError(f"nftables generation: {exc}") from exc
        raise BackendError(f"nftables generation: no answer in {MAX_MESSAGES} messages")

    def namespace(self) -> str:
        """What identifies the reader's namespace for as long as the machine runs:
        its cookie (SO_NETNS_COOKIE) with the boot id; ``""`` when the kernel
        has no cookie (the caller must then not rely on the identity)."""
        try:
            cookie = self._sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
                boot = file.read().strip()
        except OSError:
            return ""
        return f"{boot}:{int.from_bytes(cookie, 'little')}"

    def close(self) -> None:
        self._sock.close()


def _parse(answer: bytes) -> int:
    """NFTA_GEN_ID of an NFT_MSG_NEWGEN answer; BackendError for anything else
    (a netlink error carries -errno in its first 4 bytes), struct.error for an
    answer cut short."""
    length, kind = _HEADER.unpack_from(answer)[:2]
    if kind == NLMSG_ERROR:
        errno = -struct.unpack_from("=i", answer, _HEADER.size)[0]
        raise BackendError(f"nftables generation: {os.strerror(errno)}")
    if kind != NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN:
        raise BackendError(f"nftables generation: unexpected answer type {kind:#x}")
    offset = _HEADER.size + _NFGEN.size
    while offset + _ATTR.size <= min(length, len(answer)):
        size, attr = _ATTR.unpack_from(answer, offset)
        if size < _ATTR.size:
            break
        if attr & 0x3FFF == NFTA_GEN_ID:
            return int(struct.unpack_from(">L", answer, offset + _ATTR.size)[0])
        offset += (size + 3) & ~3
    raise BackendError("nftables generation: answer without NFTA_GEN_ID")

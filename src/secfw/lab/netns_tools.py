"""Probes with real packets between lab namespaces (tests and the demo's reachability matrix).

Every probe is bounded in time and only ever opens sockets inside namespaces whose
name starts with ``sfw-`` and that exist (the lab's); anything else is a LabError.

How code runs "inside" a namespace: a socket belongs to the network namespace of the
thread that created it, for its whole life. :func:`secfw.lab.hostlab.run_in_netns` creates the
socket in a throw-away thread that joined the namespace with ``setns(2)``; the socket
is then used from the caller's thread. No fork, no ``ip netns exec``, no subprocess:
an allowed probe costs about a millisecond, a blocked one costs its timeout.

Timeouts: every ``timeout`` parameter defaults to ``None``, meaning the module-level
:data:`DEFAULT_TIMEOUT` read at call time (so a test suite can lower it in one place).

Probes speak IPv4 or IPv6, chosen by the destination address; listeners are
dual-stack. Probes and what "True" means:

* :func:`tcp_connect` -- the three-way handshake completed (a listener must exist).
* :func:`udp_probe` -- a datagram with a unique token reached a :func:`listen` UDP
  listener of *this process* in the destination namespace. No such listener: False.
* :func:`ping` / :func:`ping_replies` -- ICMP echo replies from the destination.
* :func:`send_and_sniff` -- a crafted scapy packet sent from one namespace was seen
  arriving in another (AF_PACKET capture with an optional kernel BPF filter).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import http.client
import os
import random
import select
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from secfw.errors import LabError
from secfw.lab.hostlab import NS_PREFIX, netns_exists, run_in_netns

if TYPE_CHECKING:
    from scapy.packet import Packet

__all__ = [
    "DEFAULT_TIMEOUT",
    "Listener",
    "family_of",
    "listen",
    "ping",
    "ping_replies",
    "send_and_sniff",
    "socket_in_netns",
    "tcp_connect",
    "udp_probe",
]

DEFAULT_TIMEOUT = 0.5  # seconds a blocked probe waits; allowed probes return at once

Proto = Literal["tcp", "udp"]

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # sll_pkttype of frames this host sent (linux/if_packet.h)
SO_ATTACH_FILTER = 26
DLT_EN10MB = 1  # every lab interface is a veth or lo: Ethernet framing
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY = 128, 129
_SNAPLEN = 65535


def _timeout(timeout: float | None) -> float:
    return DEFAULT_TIMEOUT if timeout is None else timeout


def _require_lab_ns(ns: str) -> None:
    """Refuse to send or listen anywhere but in an existing lab namespace."""
    if not ns.startswith(NS_PREFIX) or not netns_exists(ns):
        raise LabError(f"lab: {ns!r} is not an existing lab network namespace")


def socket_in_netns(ns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A new socket living in lab namespace ``ns`` (usable from any thread)."""
    _require_lab_ns(ns)
    try:
        return run_in_netns(ns, lambda: socket.socket(family, kind, proto))
    except OSError as exc:
        raise LabError(f"lab: cannot open a socket in {ns}: {exc}") from exc


# --------------------------------------------------------------------------- listeners


class Listener:
    """A TCP or UDP server bound to ``0.0.0.0:port`` in a namespace, served by a thread.

    TCP: accepts and immediately closes connections, counting them in ``accepted``.
    UDP: remembers the last 4096 datagram payloads so :func:`udp_probe` can check
    that its token arrived. Use :func:`listen`, which guarantees :meth:`close`.
    """

    def __init__(self, ns: str, proto: Proto, port: int) -> None:
        if proto not in ("tcp", "udp"):
            raise LabError(f"lab: unknown protocol {proto!r} (tcp or udp)")
        self.ns, self.proto, self.port = ns, proto, port
        self.accepted = 0
        self._payloads: deque[bytes] = deque(maxlen=4096)
        self._arrived = threading.Condition()
        self._sock = self._bind()
        self._wake_r, self._wake_w = os.pipe()  # written to on close() to stop the thread
        self._thread = threading.Thread(
            target=self._serve, name=f"listen:{ns}:{proto}/{port}", daemon=True
        )
        self._thread.start()

    def _bind(self) -> socket.socket:
        """A dual-stack socket: ``[::]:port`` with ``IPV6_V6ONLY`` off also receives
        IPv4 (as v4-mapped addresses, ipv6(7))."""
        kind = socket.SOCK_STREAM if self.proto == "tcp" else socket.SOCK_DGRAM
        sock = socket_in_netns(self.ns, socket.AF_INET6, kind)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if self.proto == "tcp":  # for UDP it would let a second listener steal the port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", self.port))
            if self.proto == "tcp":
                sock.listen(128)
        except OSError as exc:
            sock.close()
            raise LabError(
                f"lab: cannot listen on {self.proto}/{self.port} in {self.ns}: {exc}"
            ) from exc
        return sock

    def _serve(self) -> None:
        """Accept or receive until close() writes to the wake-up pipe — after what
        is already queued: a handshake the kernel completed just before close()
        still counts as accepted."""
        while True:
            ready, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [])
            if self._sock.fileno() in ready:
                with contextlib.suppress(OSError):  # e.g. an aborted connection
                    self._handle_one()
            elif self._wake_r in ready:
                return

    def _handle_one(self) -> None:
        if self.proto == "tcp":
            conn, _ = self._sock.accept()
            conn.close()
            self.accepted += 1
            return
        payload = self._sock.recv(_SNAPLEN)
        with self._arrived:
            self._payloads.append(payload)
            self._arrived.notify_all()

    def wait_for(self, payload: bytes, timeout: float) -> bool:
        """Whether a datagram carrying exactly ``payload`` arrives within ``timeout``."""
        with self._arrived:
            return self._arrived.wait_for(lambda: payload in self._payloads, timeout)

    def close(self) -> None:
        """Stop the thread and close the socket (idempotent)."""
        if self._wake_w < 0:
            return
        os.write(self._wake_w, b"x")
        self._thread.join()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_w = -1
        self._sock.close()


_udp_listeners: dict[tuple[str, int], Listener] = {}
_registry_lock = threading.Lock()


@contextlib.contextmanager
def listen(ns: str, proto: Proto, port: int) -> Iterator[Listener]:
    """Serve ``proto``/``port`` on every address of lab namespace ``ns`` while in the block."""
    listener = Listener(ns, proto, port)
    key = (ns, port)
    try:
        if proto == "udp":
            with _registry_lock:
                _udp_listeners[key] = listener
        yield listener
    finally:
        with _registry_lock:
            if _udp_listeners.get(key) is listener:
                del _udp_listeners[key]
        listener.close()


# --------------------------------------------------------------------------- TCP / UDP


def family_of(address: str) -> socket.AddressFamily:
    """AF_INET or AF_INET6, from an address's text."""
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def tcp_connect(
    src_ns: str, dst_ip: str, port: int, timeout: float | None = None, src_ip: str | None = None
) -> bool:
    """Whether a TCP handshake from ``src_ns`` (from ``src_ip`` if given) to
    ``dst_ip:port`` completes in time (IPv4 or IPv6, by ``dst_ip``).

    False on timeout (dropped), refusal (RST: closed port or reject) or any ICMP error.
    """
    with socket_in_netns(src_ns, family_of(dst_ip), socket.SOCK_STREAM) as sock:
        sock.settimeout(_timeout(timeout))
        try:
            if src_ip is not None:
                sock.bind((src_ip, 0))
            sock.connect((dst_ip, port))
        except OSError:  # TimeoutError and ConnectionRefusedError are OSErrors
            return False
        return True


def http_get(
    src_ns: str, address: str, port: int, path: str, timeout: float | None = None
) -> tuple[int, bytes] | None:
    """``GET path`` over a TCP connection from ``src_ns`` to ``address:port`` (IPv4):
    the status and body, or None when no answer came in time (dropped, refused,
    reset or closed without a response)."""
    sock = socket_in_netns(src_ns, socket.AF_INET, socket.SOCK_STREAM)
    connection = http.client.HTTPConnection(address, port, timeout=_timeout(timeout))
    try:
        sock.settimeout(_timeout(timeout))
        sock.connect((address, port))
        connection.sock = sock
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
        sock.close()


def udp_probe(
    src_ns: str, dst_ns: str, dst_ip: str, port: int, timeout: float | None = None
) -> bool:
    """Whether a datagram sent from ``src_ns`` to ``dst_ip:port`` reaches ``dst_ns``.

    "Reaches" means: a :func:`listen` UDP listener of this process on ``port`` in
    ``dst_ns`` received this probe's unique token. Without such a listener the
    datagram is still sent, and the result is False (a closed port).
    """
    _require_lab_ns(dst_ns)
    token = b"secfw-probe-" + uuid.uuid4().hex.encode()
    with socket_in_netns(src_ns, family_of(dst_ip), socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(token, (dst_ip, port))
        except OSError:  # no route, or rejected on output
            return False
    with _registry_lock:
        listener = _udp_listeners.get((dst_ns, port))
    return listener is not None and listener.wait_for(token, _timeout(timeout))


# --------------------------------------------------------------------------- ICMP echo


def ping(src_ns: str, dst_ip: str, count: int = 1, timeout: float | None = None) -> bool:
    """Whether at least one of ``count`` echo requests was answered (like ping(8))."""
    return ping_replies(src_ns, dst_ip, count, timeout) > 0


def ping_replies(
    src_ns: str, dst_ip: str, count: int = 1, timeout: float | None = None, interval: float = 0.0
) -> int:
    """How many of ``count`` echo requests from ``src_ns`` to ``dst_ip`` were answered.

    Requests go ``interval`` seconds apart; after the last one the probe waits at most
    ``timeout`` for the missing replies. Uses a raw ICMP or ICMPv6 socket (root, by
    ``dst_ip``'s family): replies are matched on source address, identifier and
    sequence number. A link-local ``dst_ip`` takes its interface as a numeric zone
    (``fe80::1%5``).
    """
    ident = random.randrange(1, 0x10000)
    answered: set[int] = set()
    family = family_of(dst_ip)
    proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    with socket_in_netns(src_ns, family, socket.SOCK_RAW, proto) as sock:
        for seq in range(count):
            try:
                sock.sendto(_echo_request(ident, seq, family), _sockaddr(dst_ip))
            except OSError:
                continue  # no route or rejected on output: counts as unanswered
            _collect_replies(sock, dst_ip, ident, answered, interval, count)
        _collect_replies(sock, dst_ip, ident, answered, _timeout(timeout), count)
    return len(answered)


def _echo_request(ident: int, seq: int, family: int = socket.AF_INET) -> bytes:
    """An echo request; for ICMPv6 the kernel fills in the checksum (raw(7):
    IPPROTO_ICMPV6 sockets always compute it)."""
    payload = b"secfw-ping" + bytes(22)
    if family == socket.AF_INET6:
        return struct.pack("!BBHHH", ICMPV6_ECHO_REQUEST, 0, 0, ident, seq) + payload
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    checksum = _inet_checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, checksum, ident, seq) + payload


def _inet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement checksum."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _collect_replies(
    sock: socket.socket, dst_ip: str, ident: int, answered: set[int], wait: float, count: int
) -> None:
    """Add the sequence numbers of matching echo replies until ``wait`` s or all in."""
    deadline = time.monotonic() + wait
    while len(answered) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
            return
        packet, address = sock.recvfrom(_SNAPLEN)
        if sock.family == socket.AF_INET6:  # raw ICMPv6 sockets deliver no IPv6 header
            header_len, reply = 0, ICMPV6_ECHO_REPLY
        else:  # raw ICMP sockets deliver the IP header
            header_len, reply = (packet[0] & 0x0F) * 4, ICMP_ECHO_REPLY
        kind, _, _, reply_ident, seq = struct.unpack_from("!BBHHH", packet, header_len)
        same = _same_address(sock.family, address[0], dst_ip)
        if same and kind == reply and reply_ident == ident:
            answered.add(seq)


def _sockaddr(address: str) -> tuple[str, int] | tuple[str, int, int, int]:
    """``(address, 0)``; for ``fe80::1%5`` (a *numeric* zone: interface names are
    per namespace) the IPv6 4-tuple with that scope id — CPython ignores a zone
    written in the address text of a 2-tuple."""
    host, _, zone = address.partition("%")
    return (host, 0, 0, int(zone)) if zone else (host, 0)


def _same_address(family: int, one: str, other: str) -> bool:
    """Equal addresses, whatever their spelling (a ``%zone`` suffix is ignored)."""
    def packed(text: str) -> bytes:
        return socket.inet_pton(family, text.split("%", 1)[0])

    return packed(one) == packed(other)


# --------------------------------------------------------------------------- crafted packets


def send_and_sniff(
    packet: Packet,
    *,
    src_ns: str,
    dst_ns: str,
    bpf: str | None = None,
    match: Callable[[Packet], bool] | None = None,
    timeout: float | None = None,
    send_iface: str = "eth0",
    sniff_iface: str | None = None,
) -> Packet | None:
    """Send a scapy ``packet`` from ``src_ns``; return the first matching frame seen in ``dst_ns``.

    Sending: a packet starting with ``Ether`` goes out as-is on ``send_iface`` (MAC
    spoofing); otherwise it must start with ``IP`` and is sent through a raw
    ``IPPROTO_RAW`` socket, so the kernel routes it but keeps its header, spoofed
    source included. Capture starts *before* sending, on ``sniff_iface`` or every
    interface of ``dst_ns``; frames ``dst_ns`` itself sent are ignored. A frame
    matches if it passes the kernel ``bpf`` filter (tcpdump syntax) and ``match``.
    Returns the frame as ``Ether``, or None after ``timeout`` seconds.
    """
    with _capture_socket(dst_ns, bpf, sniff_iface) as capture:
        _send(packet, src_ns, send_iface)
        return _first_match(capture, match, _timeout(timeout))


@contextlib.contextmanager
def _capture_socket(ns: str, bpf: str | None, iface: str | None) -> Iterator[socket.socket]:
    """An AF_PACKET socket in ``ns`` that sees only frames passing ``bpf``.

    Frames queued before the filter was attached (or before binding to ``iface``)
    are drained, so only what arrives afterwards is reported.
    """
    sock = socket_in_netns(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        if bpf:
            _attach_bpf(sock, bpf)
        if iface:
            sock.bind((iface, ETH_P_ALL))
        _drain(sock)
    except OSError as exc:
        sock.close()
        raise LabError(
            f"lab: cannot capture on {iface or 'all interfaces'} in {ns}: {exc}"
        ) from exc
    try:
        yield sock
    finally:
        _close_later(sock)


_closer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secfw-packet-close")


def _close_later(sock: socket.socket) -> None:
    """Close an AF_PACKET socket in the background.

    Releasing a packet socket waits for an RCU grace period (``synchronize_net()`` in
    ``packet_release``), about 20 ms here; a probe need not wait for it.
    """
    _closer.submit(sock.close)


def _drain(sock: socket.socket) -> None:
    """Discard everything already queued on ``sock``."""
    while select.select([sock], [], [], 0)[0]:
        sock.recv(_SNAPLEN)


def _attach_bpf(sock: socket.socket, bpf: str) -> None:
    """Attach the compiled classic-BPF program for ``bpf`` (SO_ATTACH_FILTER)."""
    count, code = _compile_bpf(bpf)
    buffer = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HL", count, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


@lru_cache(maxsize=256)
def _compile_bpf(bpf: str) -> tuple[int, bytes]:
    """Compile a tcpdump-syntax filter for Ethernet with libpcap (no interface needed)."""
    from scapy.arch.common import compile_filter, free_filter

    try:
        program = compile_filter(bpf, linktype=DLT_EN10MB)
    except Exception as exc:  # scapy raises its own exception types for bad filters
        raise LabError(f"lab: invalid BPF filter {bpf!r}: {exc}") from exc
    try:
        length = int(program.bf_len)
        return length, ctypes.string_at(program.bf_insns, length * 8)
    finally:
        free_filter(program)


def _send(packet: Packet, ns: str, iface: str) -> None:
    """Send ``packet`` from ``ns``: at layer 2 if it starts with Ether, else as raw IP.

    A send the kernel refuses (no route, an output rule) is not an error: the packet
    simply does not arrive. A missing ``iface`` is a LabError.
    """
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether

    if not isinstance(packet, Ether | IP):
        raise LabError(f"lab: send_and_sniff needs an Ether or IP packet, not {packet!r}")
    layer2 = isinstance(packet, Ether)
    family, proto = (socket.AF_PACKET, 0) if layer2 else (socket.AF_INET, socket.IPPROTO_RAW)
    sock = socket_in_netns(ns, family, socket.SOCK_RAW, proto)
    try:
        if layer2:
            sock.bind((iface, 0))
            sock.send(bytes(packet))
        else:
            sock.sendto(bytes(packet), (packet.dst, 0))
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise LabError(f"lab: no interface {iface!r} in {ns}") from exc
    finally:
        if layer2:
            _close_later(sock)
        else:
            sock.close()


def _first_match(
    sock: socket.socket, match: Callable[[Packet], bool] | None, timeout: float
) -> Packet | None:
    """The first incoming frame on ``sock`` that satisfies ``match``, within ``timeout``."""
    from scapy.layers.l2 import Ether

    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], remaining)[0]:
            return None
        data, address = sock.recvfrom(_SNAPLEN)
        if address[2] == PACKET_OUTGOING:
            continue
        frame = Ether(data)
        if match is None or match(frame):
            return frame
    return None

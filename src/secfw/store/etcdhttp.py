"""HTTP/1.1 to one etcd member's JSON gateway, on sockets of the standard library.

etcd (>= 3.4) serves its v3 API as JSON over HTTP (the gRPC gateway, ``/v3/``):
every request is a ``POST`` of a JSON object, answered by one JSON object, and
a watch is one long response whose body is a stream of JSON objects, one per
line. That is all :mod:`secfw.store.etcd` needs, so this module speaks it
itself: it writes the request, reads the status line and the headers, and the
body by its ``Content-Length``, chunk by chunk (``Transfer-Encoding:
chunked``, RFC 9112 section 7.1), or to the end of the connection.

Why not etcd3gw (OpenStack's client, used before): its import pulls in
``requests`` (urllib3, charset_normalizer, idna) and ``futurist``
(concurrent.futures, asyncio, debtcollector, wrapt) — 240-270 ms of a
``secfw`` process's start-up on the 2-core VM, more than the whole 300 ms
budget of a command at 50k ports — and secfw used none of what it adds over
these two requests: its ranges and transactions were posted as raw JSON
already, and its watch helper could not be used (it drops the answer that
says the history is compacted). Why not :mod:`http.client` (the first version
of this module): importing it costs ~35 ms of CPU of every process, for its
``email`` header parser and ``ssl``, which it imports whether TLS is used or
not; the part of HTTP/1.1 an etcd gateway answers with (one status line,
headers, a length or chunks) is the ~60 lines of :class:`_Connection`.

The contract with :mod:`secfw.store.etcd`:

* :meth:`Member.post` returns the decoded answer of a ``200``; raises
  :class:`~secfw.errors.StoreUnreachableError` when the member cannot be
  reached or answers that it cannot serve (refused, reset, timed out, a
  malformed answer, HTTP 503, 408, 504: asking another member may help), and
  :class:`~secfw.errors.StoreRefusedError` with etcd's own message for any
  other answer (asking again elsewhere would not help). A body that is not
  JSON raises ValueError.
* :meth:`Member.open_stream` returns a :class:`Stream` of a watch on a
  connection of its own (a watch never ends: its connection cannot be reused).

Connections are kept alive between requests and pooled per member (several
threads may share a store). A pooled connection the server closed while it
was idle is noticed before use (its socket reads as ready: end of file) and
replaced; one that fails anyway on being reused, before any answer, is
re-sent once on a new connection — etcd's writes here are safe to re-send
(see ``EtcdStore._commit``: a fresh token marks each write).

TLS is not offered (``etcd://`` is plain HTTP). Adding it would take an
``https`` form of the URL and the socket wrapped by an ``ssl`` context (CA,
client certificate), with ``ssl`` imported only then.
"""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Iterator
from contextlib import suppress
from typing import Any, BinaryIO

from secfw.errors import StoreRefusedError, StoreUnreachableError

#: Answers of a member that cannot serve now (etcd's gateway maps gRPC's
#: Unavailable and DeadlineExceeded to 503 and 504, e.g. without a quorum): the
#: next member is asked, as for a connection that fails.
UNAVAILABLE = frozenset({408, 503, 504})
#: Bounds on what is read before a body: a line, and the number of header lines.
MAX_LINE = 65536
MAX_HEADERS = 100
#: Failures of a connection (a member gone, a timeout, a malformed or cut
#: answer: :class:`_Connection` raises ConnectionError for the last two).
_FAILURES = (OSError,)
#: Failures that mean a kept-alive connection was closed by the server before
#: this request reached it (re-sent once on a new connection).
_STALE = (BrokenPipeError, ConnectionResetError)


class Member:
    """One member's gateway: ``host:port``, its timeouts and its idle connections."""

    def __init__(self, host: str, port: int, connect_timeout: float,
                 read_timeout: float, api_path: str = "/v3/") -> None:
        self.host, self.port = host, port
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.api_path = api_path
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """One request, JSON in and out (see the module docstring)."""
        data = json.dumps(body).encode()
        conn, reused = self._take()
        try:
            status, payload, keep = self._exchange(conn, path, data)
        except _STALE as exc:
            conn.close()
            if not reused:
                raise self._unreachable(exc) from exc
            try:
                conn = self._connect()
                status, payload, keep = self._exchange(conn, path, data)
            except _FAILURES as again:
                conn.close()
                raise self._unreachable(again) from again
        except _FAILURES as exc:
            conn.close()
            raise self._unreachable(exc) from exc
        if keep:
            with self._lock:
                self._idle.append(conn)
        else:
            conn.close()
        _check(self.name, status, payload)
        return json.loads(payload)

    def open_stream(self, path: str, body: dict[str, Any], idle_timeout: float) -> Stream:
        """A streaming request on a new connection whose reads time out after
        ``idle_timeout`` without a byte; a non-200 answer is raised as by
        :meth:`post`."""
        try:
            conn = self._connect(idle_timeout)
        except _FAILURES as exc:
            raise self._unreachable(exc) from exc
        try:
            conn.send(self._target(path), json.dumps(body).encode())
            status, headers = conn.read_head()
            if status != 200:
                payload = conn.read_body(headers)
                conn.close()
                _check(self.name, status, payload)
        except _FAILURES as exc:
            conn.close()
            raise self._unreachable(exc) from exc
        return Stream(self.name, conn, headers)

    def close(self) -> None:
        """Close the idle connections (one in use is closed when given back)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take(self) -> tuple[_Connection, bool]:
        """An idle connection still open (``True``: reused), else a new one."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                try:
                    return self._connect(), False
                except _FAILURES as exc:
                    raise self._unreachable(exc) from exc
            if conn.still_open():
                return conn, True
            conn.close()

    def _connect(self, read_timeout: float | None = None) -> _Connection:
        return _Connection(self.host, self.port, self.connect_timeout,
                           self.read_timeout if read_timeout is None else read_timeout)

    def _target(self, path: str) -> str:
        return self.api_path + path.lstrip("/")

    def _exchange(self, conn: _Connection, path: str, data: bytes) -> tuple[int, bytes, bool]:
        """``(status, body, connection reusable)`` of one request."""
        conn.send(self._target(path), data)
        status, headers = conn.read_head()
        payload = conn.read_body(headers)
        return status, payload, conn.reusable(headers)

    def _unreachable(self, exc: BaseException) -> StoreUnreachableError:
        reason = str(exc) or type(exc).__name__
        return StoreUnreachableError(f"{self.name}: {reason.splitlines()[0][:200]}")


class _Connection:
    """One TCP connection to a member, speaking the HTTP/1.1 its gateway does.

    Every failure is an OSError: the socket's own (refused, reset, timed out)
    or a ConnectionError for an answer that is cut short or malformed;
    ConnectionResetError when the server closed the connection before it
    answered anything (a kept-alive connection it had dropped)."""

    def __init__(self, host: str, port: int, connect_timeout: float,
                 read_timeout: float) -> None:
        self.host = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.sock = socket.create_connection((host, port), connect_timeout)
        try:
            # A request is one write; without this, Nagle's algorithm may hold
            # the next request until the previous answer's delayed ACK (tcp(7)).
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(read_timeout)
            self.file: BinaryIO = self.sock.makefile("rb")
        except BaseException:
            self.sock.close()
            raise
        self.http11 = True

    def send(self, target: str, data: bytes) -> None:
        head = (f"POST {target} HTTP/1.1\r\nHost: {self.host}\r\n"
                "Content-Type: application/json\r\nAccept: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n")
        self.sock.sendall(head.encode("ascii") + data)

    def read_head(self) -> tuple[int, dict[str, str]]:
        """The final status and the headers (names in lower case); informational
        (1xx) answers are skipped."""
        while True:
            line = self.file.readline(MAX_LINE)
            if not line:
                raise ConnectionResetError("the member closed the connection without answering")
            version, _, rest = line.partition(b" ")
            code = rest[:3]
            if not version.startswith(b"HTTP/1.") or not code.isdigit() or not line.endswith(b"\n"):
                raise ConnectionError(f"malformed status line {line[:80]!r}")
            self.http11 = version != b"HTTP/1.0"
            headers = self._headers()
            if not 100 <= int(code) < 200:
                return int(code), headers

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS):
            line = self.file.readline(MAX_LINE)
            if line in (b"\r\n", b"\n"):
                return headers
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not line.endswith(b"\n") or name != name.strip():
                raise ConnectionError(f"malformed header line {line[:80]!r}")
            key = name.lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        raise ConnectionError(f"more than {MAX_HEADERS} header lines")

    def read_body(self, headers: dict[str, str]) -> bytes:
        if _chunked(headers):
            return b"".join(self.chunks())
        length = headers.get("content-length")
        if length is None:
            return self.file.read()  # to the end of the connection (not reusable)
        if not length.isdigit():
            raise ConnectionError(f"malformed Content-Length {length[:40]!r}")
        body = self.file.read(int(length))
        if len(body) < int(length):
            raise ConnectionError(f"answer cut short ({len(body)} of {length} bytes)")
        return body

    def chunks(self) -> Iterator[bytes]:
        """The chunks of a chunked body, as they arrive (trailers skipped)."""
        while True:
            line = self.file.readline(MAX_LINE)
            size_text = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not size_text or size_text.strip(
                    b"0123456789abcdefABCDEF"):
                raise ConnectionError(f"answer cut short or malformed chunk size {line[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                self._headers()  # the trailer section, up to its blank line
                return
            data = self.file.read(size)
            if len(data) < size or self.file.read(2) not in (b"\r\n",):
                raise ConnectionError("answer cut short inside a chunk")
            yield data

    def reusable(self, headers: dict[str, str]) -> bool:
        """Whether the connection may carry the next request: HTTP/1.1, no
        ``Connection: close``, and a body whose end was known."""
        framed = _chunked(headers) or "content-length" in headers
        closing = "close" in headers.get("connection", "").lower()
        return self.http11 and framed and not closing

    def still_open(self) -> bool:
        """Whether an idle kept-alive connection can carry a request: nothing is
        readable on it (readable while idle means the server closed it, or sent
        what no request asked for)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Stream:
    """One streaming answer (a watch): its lines as they come.

    :meth:`lines` raises StoreUnreachableError when the connection fails or
    stays silent past its idle timeout; it ends when the server ends the
    answer. :meth:`interrupt` may be called from another thread to wake a read
    that blocks: closing a socket does not interrupt a ``recv`` blocked on it,
    ``shutdown(2)`` does (the read then sees the end of the stream)."""

    def __init__(self, name: str, conn: _Connection, headers: dict[str, str]) -> None:
        self.name, self._conn, self._headers = name, conn, headers

    def lines(self) -> Iterator[bytes]:
        try:
            yield from self._lines()
        except OSError as exc:
            raise StoreUnreachableError(f"{self.name}: stream lost: "
                                        f"{str(exc) or type(exc).__name__}") from exc

    def _lines(self) -> Iterator[bytes]:
        if not _chunked(self._headers):  # to the end of the connection
            yield from iter(self._conn.file.readline, b"")
            return
        pending = b""
        for chunk in self._conn.chunks():  # a line may span chunks, a chunk hold lines
            *complete, pending = (pending + chunk).split(b"\n")
            yield from (line + b"\n" for line in complete)
        if pending:
            yield pending

    def interrupt(self) -> None:
        with suppress(OSError):
            self._conn.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._conn.close()


def _chunked(headers: dict[str, str]) -> bool:
    return "chunked" in headers.get("transfer-encoding", "").lower()

def _check(name: str, status: int, payload: bytes) -> None:
    """Raise for an answer that is not a 200 (module docstring)."""
    if status == 200:
        return
    detail = _message(payload) or f"HTTP {status}"
    if status in UNAVAILABLE:
        raise StoreUnreachableError(f"{name}: HTTP {status}: {detail}")
    raise StoreRefusedError(detail)


def _message(payload: bytes) -> str:
    """etcd's own message out of an error body (``{"error": …, "message": …}``),
    else the body's first line."""
    text = payload.decode(errors="replace")
    with suppress(ValueError, AttributeError):  # not JSON, or not an object
        return str(json.loads(text).get("message") or text).splitlines()[0][:500]
    return text.splitlines()[0][:500] if text.strip() else ""

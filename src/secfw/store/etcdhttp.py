"""HTTP/1.1 to one etcd member's JSON gateway, on the standard library only.

etcd (>= 3.4) serves its v3 API as JSON over HTTP (the gRPC gateway, ``/v3/``):
every request is a ``POST`` of a JSON object, answered by one JSON object, and
a watch is one long response whose body is a stream of JSON objects, one per
line. That is all :mod:`secfw.store.etcd` needs, so this module speaks it with
:mod:`http.client` instead of a client library.

Why not etcd3gw (OpenStack's client, used before): its import pulls in
``requests`` (urllib3, charset_normalizer, idna) and ``futurist``
(concurrent.futures, asyncio, debtcollector, wrapt) — 240-270 ms of a
``secfw`` process's start-up on the 2-core VM, more than the whole 300 ms
budget of a command at 50k ports — and secfw used none of what it adds over
these two requests: its ranges and transactions were posted as raw JSON
already, and its watch helper could not be used (it drops the answer that
says the history is compacted). http.client costs ~35 ms to import (mostly
its ``email`` header parser). A reader of HTTP written here would save most of
that again, but would have to own chunked decoding and header parsing; the
standard library's is maintained and tested.

The contract with :mod:`secfw.store.etcd`:

* :meth:`Member.post` returns the decoded answer of a ``200``; raises
  :class:`~secfw.errors.StoreUnreachableError` when the member cannot be
  reached or answers that it cannot serve (refused, reset, timed out, HTTP
  503, 408, 504: asking another member may help), and
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
``https`` form of the URL, an :class:`http.client.HTTPSConnection` with an
``ssl`` context (CA, client certificate), and ``ssl`` imported only then.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

from secfw.errors import StoreRefusedError, StoreUnreachableError

#: Answers of a member that cannot serve now (etcd's gateway maps gRPC's
#: Unavailable and DeadlineExceeded to 503 and 504, e.g. without a quorum): the
#: next member is asked, as for a connection that fails.
UNAVAILABLE = frozenset({408, 503, 504})
#: Failures of a connection (a member gone, a timeout, a malformed or cut answer).
_FAILURES = (OSError, http.client.HTTPException)
#: Failures that mean a kept-alive connection was closed by the server before
#: this request reached it (re-sent once on a new connection).
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


class Member:
    """One member's gateway: ``host:port``, its timeouts and its idle connections."""

    def __init__(self, host: str, port: int, connect_timeout: float,
                 read_timeout: float, api_path: str = "/v3/") -> None:
        self.host, self.port = host, port
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.api_path = api_path
        self._idle: list[http.client.HTTPConnection] = []
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
            conn = self._connect()
            try:
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
            conn.request("POST", self.api_path + path.lstrip("/"), json.dumps(body).encode(),
                         _HEADERS)
            response = conn.getresponse()
            if response.status != 200:
                payload = response.read()
                conn.close()
                _check(self.name, response.status, payload)
        except _FAILURES as exc:
            conn.close()
            raise self._unreachable(exc) from exc
        return Stream(self.name, conn, response)

    def close(self) -> None:
        """Close the idle connections (one in use is closed when given back)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection still open (``True``: reused), else a new one."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                try:
                    return self._connect(), False
                except _FAILURES as exc:
                    raise self._unreachable(exc) from exc
            if _still_open(conn):
                return conn, True
            conn.close()

    def _connect(self, read_timeout: float | None = None) -> http.client.HTTPConnection:
        """A connected connection: ``connect_timeout`` bounds the connect, then
        every read waits ``read_timeout`` at most (http.client has one timeout
        for both; the socket's is changed once connected)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self.read_timeout if read_timeout is None else read_timeout)
        # Small requests sent at once (http.client sends headers and body in one
        # write for a body given as bytes; this keeps Nagle out of the way anyway).
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _exchange(self, conn: http.client.HTTPConnection, path: str,
                  data: bytes) -> tuple[int, bytes, bool]:
        """``(status, body, connection reusable)`` of one request."""
        conn.request("POST", self.api_path + path.lstrip("/"), data, _HEADERS)
        response = conn.getresponse()
        payload = response.read()
        return response.status, payload, not response.will_close

    def _unreachable(self, exc: BaseException) -> StoreUnreachableError:
        reason = str(exc) or type(exc).__name__
        return StoreUnreachableError(f"{self.name}: {reason.splitlines()[0][:200]}")


class Stream:
    """One streaming answer (a watch): its lines as they come.

    :meth:`lines` raises StoreUnreachableError when the connection fails or
    stays silent past its idle timeout; it ends when the server ends the
    answer. :meth:`interrupt` may be called from another thread to wake a read
    that blocks: closing a socket does not interrupt a ``recv`` blocked on it,
    ``shutdown(2)`` does (the read then sees the end of the stream)."""

    def __init__(self, name: str, conn: http.client.HTTPConnection,
                 response: http.client.HTTPResponse) -> None:
        self.name, self._conn, self._response = name, conn, response
        self._sock = conn.sock

    def lines(self) -> Iterator[bytes]:
        while True:
            try:
                line = self._response.readline()
            except (*_FAILURES, ValueError) as exc:
                raise StoreUnreachableError(f"{self.name}: stream lost: "
                                            f"{str(exc) or type(exc).__name__}") from exc
            if not line:
                return
            yield line

    def interrupt(self) -> None:
        if self._sock is not None:
            with suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._conn.close()


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection can carry a request: nothing is
    readable on it (readable while idle means the server closed it, or sent
    what no request asked for)."""
    if conn.sock is None:
        return False
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return not poller.poll(0)


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

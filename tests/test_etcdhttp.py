"""secfw.store.etcdhttp, the etcd store's HTTP client, against small local
servers that misbehave on purpose: a member that answers 503, one that closes
its kept-alive connections, one that never answers, an error body, and a watch
stream blocked in a read that another thread must wake. (The real gateway's
answers are tests/test_store_contract.py's and tests/test_store_etcd.py's.)"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest

from secfw.errors import StoreError, StoreRefusedError, StoreUnreachableError
from secfw.store import open_store
from secfw.store.etcdhttp import Member

if TYPE_CHECKING:
    from conftest import EtcdServer

#: Bound on waiting for a thread that should end (a liveness bound, not a timing).
JOIN_S = 20.0

Reply = Callable[[BaseHTTPRequestHandler, dict[str, Any]], None]


@contextmanager
def serving(reply: Reply) -> Iterator[tuple[ThreadingHTTPServer, list[int]]]:
    """An HTTP/1.1 server on a free port of 127.0.0.1 calling ``reply`` for each
    POST; yields it and the list of its connections' client ports, one per
    connection accepted."""
    connections: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            connections.append(self.client_address[1])

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            reply(self, json.loads(self.rfile.read(length) or b"{}"))

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, connections
    finally:
        server.shutdown()
        server.server_close()
        thread.join(JOIN_S)


def answer(handler: BaseHTTPRequestHandler, status: int, body: object,
           close: bool = False) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
    handler.wfile.flush()
    if close:  # without saying so (no "Connection: close"): as an idle timeout would
        handler.close_connection = True


def member_of(server: ThreadingHTTPServer, read_timeout: float = 10.0) -> Member:
    return Member("127.0.0.1", server.server_address[1], 3.0, read_timeout)


UNAVAILABLE_BODY = {"error": "etcdserver: request timed out", "code": 14,
                    "message": "etcdserver: request timed out"}


def test_a_member_that_cannot_serve_is_skipped_for_the_next(etcd_server: EtcdServer) -> None:
    """503 (etcd's gateway without a quorum) moves on to the next member, as a
    refused connection does; the store then works on the one that answers."""
    with serving(lambda h, _body: answer(h, 503, UNAVAILABLE_BODY)) as (server, _):
        prefix = etcd_server.url().rsplit("/", 1)[1]
        store = open_store(f"etcd://127.0.0.1:{server.server_address[1]},"
                           f"{etcd_server.endpoint}/{prefix}")
        try:
            with store.write() as txn:
                txn.put("secgroup", "a", {"name": "a"})
            assert store.load().docs == {"secgroup": {"a": {"name": "a"}}}
        finally:
            store.close()


def test_no_member_that_can_serve_is_one_store_error() -> None:
    with serving(lambda h, _body: answer(h, 503, UNAVAILABLE_BODY)) as (server, _):
        url = f"etcd://127.0.0.1:{server.server_address[1]}/x"
        with pytest.raises(StoreError, match=r"no etcd member reachable .*timed out") as err:
            open_store(url)
        assert err.value.exit_code == 7 and "\n" not in str(err.value)


def test_an_error_answer_is_refused_with_etcds_message() -> None:
    body = {"error": "etcdserver: too many operations in txn request", "code": 3,
            "message": "etcdserver: too many operations in txn request"}
    with serving(lambda h, _body: answer(h, 400, body)) as (server, _):
        member = member_of(server)
        with pytest.raises(StoreRefusedError) as refused:
            member.post("kv/txn", {})
        assert str(refused.value) == body["message"]
        with pytest.raises(StoreError, match=r"etcd refused .*raise etcd's --max-txn-ops"):
            open_store(f"etcd://127.0.0.1:{server.server_address[1]}/x")


def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    """The server answers, then closes the connection it had kept alive: the
    next request goes on a new connection and is answered, not failed."""
    with serving(lambda h, body: answer(h, 200, {"echo": body}, close=True)) as (server, seen):
        member = member_of(server)
        try:
            for number in range(3):
                assert member.post("kv/range", {"n": number}) == {"echo": {"n": number}}
        finally:
            member.close()
        assert len(seen) == 3


def test_a_kept_alive_connection_is_reused() -> None:
    with serving(lambda h, body: answer(h, 200, {"echo": body})) as (server, seen):
        member = member_of(server)
        try:
            for number in range(3):
                assert member.post("kv/range", {"n": number}) == {"echo": {"n": number}}
        finally:
            member.close()
        assert len(seen) == 1


def test_a_member_that_never_answers_is_unreachable() -> None:
    release = threading.Event()

    def silent(_handler: BaseHTTPRequestHandler, _body: dict[str, Any]) -> None:
        release.wait(JOIN_S)

    with serving(silent) as (server, _):
        try:
            with pytest.raises(StoreUnreachableError, match="timed out"):
                member_of(server, read_timeout=0.3).post("kv/range", {})
        finally:
            release.set()


def test_interrupt_wakes_a_read_blocked_on_a_stream() -> None:
    """A watch that is silent (nothing written) blocks its reader for up to the
    idle timeout (an hour here): interrupt() from another thread ends the read
    at once — what EtcdWatcher.stop relies on."""
    release = threading.Event()

    def one_line_then_silence(handler: BaseHTTPRequestHandler, _body: dict[str, Any]) -> None:
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        line = b'{"result":{"created":true}}\n'
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        handler.wfile.flush()
        release.wait(JOIN_S)
        handler.close_connection = True

    with serving(one_line_then_silence) as (server, _):
        stream = member_of(server).open_stream("watch", {}, idle_timeout=3600.0)
        lines: list[bytes] = []
        ended: list[BaseException | None] = []
        first = threading.Event()

        def read() -> None:
            try:
                for line in stream.lines():
                    lines.append(line)
                    first.set()
                ended.append(None)
            except StoreUnreachableError as exc:
                ended.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert first.wait(JOIN_S)
            stream.interrupt()
            reader.join(JOIN_S)
            assert not reader.is_alive(), "interrupt() did not wake the blocked read"
        finally:
            release.set()
            stream.close()
        assert lines == [b'{"result":{"created":true}}\n']


def test_a_refused_connection_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connect is refused
        member = Member("127.0.0.1", sock.getsockname()[1], 3.0, 3.0)
        with pytest.raises(StoreUnreachableError, match="refused"):
            member.post("kv/range", {})
        with pytest.raises(StoreUnreachableError, match="refused"):
            member.open_stream("watch", {}, 3.0)

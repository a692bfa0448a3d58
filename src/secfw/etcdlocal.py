"""A throw-away etcd member on 127.0.0.1, for the tests and the benchmarks.

It runs Debian's ``etcd`` binary (package ``etcd-server``) on free loopback
ports with a data directory of the caller's, waits (bounded) until ``/health``
answers, and stops it. Nothing listens beyond 127.0.0.1. Not for production:
one member, no TLS.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secfw.errors import StoreError

#: Bound on the wait for a fresh member to answer /health (a slow, shared machine).
START_TIMEOUT_S = 60.0
#: Raised from etcd's defaults (128 operations, 1.5 MiB per request) so that a
#: whole cloud imported in one batch (bench/bench_api.py) fits one transaction.
MAX_TXN_OPS = 100_000
MAX_REQUEST_BYTES = 32 << 20


@dataclass
class LocalEtcd:
    """A running member (see :func:`start`)."""

    process: subprocess.Popen[bytes]
    client_port: int
    log: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def url(self, prefix: str | None = None) -> str:
        """An ``etcd://`` store URL; a fresh random prefix unless one is given."""
        return f"etcd://{self.endpoint}/{prefix or 'test-' + uuid.uuid4().hex[:12]}"

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """One request to the v3 JSON gateway (what etcdctl would send)."""
        request = urllib.request.Request(
            f"http://{self.endpoint}/v3/{path}", data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def compact(self) -> int:
        """Compact the history up to the current revision (returned)."""
        revision = int(self.post("kv/range", {"key": "AA=="})["header"]["revision"])
        self.post("kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def stop(self) -> None:
        """Terminate the member and wait for it (bounded), killing it if need be."""
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out on 127.0.0.1 (closed again: a small race
    with other processes, which :func:`start`'s retry covers)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start(base: Path, attempts: int = 3) -> LocalEtcd:
    """Start a member with its data under ``base`` (created); StoreError when
    etcd is missing or never becomes healthy."""
    if shutil.which("etcd") is None:
        raise StoreError("etcd is not installed (apt-get install etcd-server; `make deps`)")
    base.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):  # a port taken between free_ports and bind
        try:
            return _start_once(base / f"member{attempt}")
        except StoreError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _start_once(data_dir: Path) -> LocalEtcd:
    client, peer = free_ports(2)
    log = data_dir.with_suffix(".log")
    command = [
        "etcd", "--name", "secfw-local", "--data-dir", str(data_dir),
        "--listen-client-urls", f"http://127.0.0.1:{client}",
        "--advertise-client-urls", f"http://127.0.0.1:{client}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"secfw-local=http://127.0.0.1:{peer}",
        "--initial-cluster-state", "new",
        "--max-txn-ops", str(MAX_TXN_OPS), "--max-request-bytes", str(MAX_REQUEST_BYTES),
        "--logger", "zap", "--log-level", "warn",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    member = LocalEtcd(process, client, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if _healthy(member):
            return member
        time.sleep(0.1)
    member.stop()
    raise StoreError(f"etcd did not become healthy: {log.read_text(errors='replace')[-500:]}")


def _healthy(member: LocalEtcd) -> bool:
    try:
        with urllib.request.urlopen(f"http://{member.endpoint}/health", timeout=2) as answer:
            return bool(json.loads(answer.read()).get("health") == "true")
    except (urllib.error.URLError, OSError, ValueError):
        return False

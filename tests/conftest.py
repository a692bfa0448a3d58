"""Shared fixtures: a temporary store, an :class:`Api` on it, a CLI driver, and an
etcd server of our own (started on 127.0.0.1 for the session, only when a test
asks for it)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from secfw.api import Api
from secfw.cli import main
from secfw.store import open_store

#: Environment variables the CLI reads; unset so the host's settings never leak in.
CLEAN_ENV: dict[str, str | None] = {
    "SECFW_PROJECT": None,
    "SECFW_STORE": None,
    "SECFW_DEBUG": None,
}


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """A SQLite store URL in a fresh temporary directory (the file is created on open)."""
    return f"sqlite:///{tmp_path}/secfw.db"


@pytest.fixture
def api(store_url: str) -> Iterator[Api]:
    """An :class:`Api` on the temporary store."""
    instance = Api(open_store(store_url))
    yield instance
    instance.store.close()


StoreState = Callable[[str], tuple[int, dict[str, dict[str, Any]]]]


def read_store_state(url: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """(revision, every document) of the store at ``url``: what "nothing changed" compares."""
    store = open_store(url)
    try:
        snapshot = store.load()
        return snapshot.revision, snapshot.docs
    finally:
        store.close()


class Cli:
    """Runs ``secfw --store URL ARGS…`` through click's CliRunner (stderr kept apart)."""

    def __init__(self, url: str) -> None:
        self.store_url = url
        self.runner = CliRunner(env=CLEAN_ENV)

    def run(self, *args: str, env: dict[str, str | None] | None = None) -> Result:
        """The raw result of one command line (global ``--store`` first)."""
        return self.runner.invoke(main, ["--store", self.store_url, *args], env=env)

    def ok(self, *args: str, env: dict[str, str | None] | None = None) -> str:
        """stdout of a command that must succeed silently on stderr."""
        result = self.run(*args, env=env)
        assert result.exit_code == 0, (args, result.stdout, result.stderr, result.exception)
        assert result.stderr == "", result.stderr
        return result.stdout

    def json(self, *args: str) -> Any:
        """The parsed ``-f json`` output of a successful command."""
        return json.loads(self.ok(*args, "-f", "json"))

    def fails(self, *args: str, code: int | None = None, env: dict[str, str | None] | None = None
              ) -> str:
        """The one stderr line of a failing command, after checking the error contract.

        Contract: non-zero exit (``code`` if given), nothing on stdout, exactly one
        line ``secfw: error: …`` on stderr, no traceback, and the store unchanged
        (same revision, same documents).
        """
        before = read_store_state(self.store_url)
        result = self.run(*args, env=env)
        after = read_store_state(self.store_url)
        assert result.exit_code != 0, (args, result.stdout)
        if code is not None:
            assert result.exit_code == code, (args, result.exit_code, result.stderr)
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("secfw: error: "), lines[0]
        assert "Traceback" not in result.stderr
        assert after == before, f"failed command {args} changed the store"
        return lines[0]


@pytest.fixture
def cli(store_url: str) -> Cli:
    """A :class:`Cli` on the temporary store."""
    return Cli(store_url)


@pytest.fixture(name="store_state")
def store_state_fixture() -> StoreState:
    """:func:`read_store_state`, for tests (conftest is not importable from them)."""
    return read_store_state


# --------------------------------------------------------------------------- etcd

#: Bound on the wait for a fresh etcd to answer /health (a slow, shared machine).
ETCD_START_TIMEOUT_S = 60.0


@dataclass
class EtcdServer:
    """One etcd member on 127.0.0.1, started by the tests (see :func:`etcd_server`)."""

    process: subprocess.Popen[bytes]
    client_port: int
    log: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def url(self, prefix: str | None = None) -> str:
        """An ``etcd://`` store URL under a fresh prefix (tests share the server)."""
        return f"etcd://{self.endpoint}/{prefix or 'test-' + uuid.uuid4().hex[:12]}"

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """One request to the v3 JSON gateway (what etcdctl would do)."""
        request = urllib.request.Request(
            f"http://{self.endpoint}/v3/{path}", data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def compact(self) -> int:
        """Compact the whole history up to the current revision; returns it."""
        revision = int(self.post("kv/range", {"key": "AA=="})["header"]["revision"])
        self.post("kv/compaction", {"revision": str(revision), "physical": True})
        return revision


def _free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out on 127.0.0.1 (closed again: a small race
    with other processes, which the start-up retry covers)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _start_etcd(data_dir: Path) -> EtcdServer:
    client, peer = _free_ports(2)
    log = data_dir.parent / f"etcd-{client}.log"
    # Limits raised so that a whole cloud imported in one batch fits one
    # transaction (etcd's defaults: 128 operations, 1.5 MiB per request).
    command = [
        "etcd", "--name", "secfw-test", "--data-dir", str(data_dir),
        "--listen-client-urls", f"http://127.0.0.1:{client}",
        "--advertise-client-urls", f"http://127.0.0.1:{client}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"secfw-test=http://127.0.0.1:{peer}",
        "--initial-cluster-state", "new",
        "--max-txn-ops", "100000", "--max-request-bytes", str(32 << 20),
        "--logger", "zap", "--log-level", "warn",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = EtcdServer(process, client, log)
    deadline = time.monotonic() + ETCD_START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{server.endpoint}/health", timeout=2) as answer:
                if json.loads(answer.read()).get("health") == "true":
                    return server
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.1)
    _stop_etcd(server)
    raise RuntimeError(f"etcd did not become healthy: {log.read_text()[-2000:]}")


def _stop_etcd(server: EtcdServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=15)


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """An etcd (Debian's etcd-server) on 127.0.0.1, free ports, a temporary data
    dir; stopped and removed at the end of the session. Missing etcd is a failure,
    not a skip: ``make test`` installs it."""
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed (apt-get install etcd-server; `make deps` does it)")
    base = tmp_path_factory.mktemp("etcd")
    for attempt in range(3):  # a port taken between _free_ports and etcd's bind
        data_dir = base / f"data{attempt}"
        try:
            server = _start_etcd(data_dir)
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        yield server
    finally:
        _stop_etcd(server)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def etcd_url(etcd_server: EtcdServer) -> str:
    """A store URL on the session's etcd, under a prefix of this test's own."""
    return etcd_server.url()

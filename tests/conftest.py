"""Shared fixtures: a temporary store, an :class:`Api` on it, a CLI driver, and an
etcd server of our own (started on 127.0.0.1 for the session, only when a test
asks for it)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from secfw.api import Api
from secfw.cli.main import main
from secfw.lab import etcdlocal
from secfw.lab.etcdlocal import LocalEtcd
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


@pytest.fixture
def cli_on() -> type[Cli]:
    """:class:`Cli` itself, for tests that pick their own store URL (conftest is
    not importable from them: tests/netns/conftest.py shadows it under xdist)."""
    return Cli


@pytest.fixture(name="store_state")
def store_state_fixture() -> StoreState:
    """:func:`read_store_state`, for tests (conftest is not importable from them)."""
    return read_store_state


# --------------------------------------------------------------------------- etcd

#: The session's etcd member (secfw.lab.etcdlocal): ``url()``, ``compact()``, ``post()``.
EtcdServer = LocalEtcd


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """An etcd (Debian's etcd-server) on 127.0.0.1, free ports, a temporary data
    dir; stopped and removed at the end of the session. Missing etcd is a failure,
    not a skip: ``make test`` installs it."""
    base = tmp_path_factory.mktemp("etcd")
    member = etcdlocal.start(base)
    try:
        yield member
    finally:
        member.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def etcd_url(etcd_server: EtcdServer) -> str:
    """A store URL on the session's etcd, under a prefix of this test's own."""
    return etcd_server.url()


@pytest.fixture
def store_reads(monkeypatch: pytest.MonkeyPatch) -> Callable[[Api], list[list[str]]]:
    """Spies on an Api's store: the returned function starts recording what each
    write transaction of ``api`` reads (its snapshot's ``reads``) and returns that
    list of logs, one per transaction."""

    def spy_on(api: Api) -> list[list[str]]:
        logs: list[list[str]] = []
        write = api.store.write

        @contextmanager
        def spy() -> Iterator[Any]:
            with write() as txn:
                logs.append(txn.snapshot.reads)
                yield txn

        monkeypatch.setattr(api.store, "write", spy)
        return logs

    return spy_on

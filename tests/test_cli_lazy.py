"""The CLI imports only the module of the command it runs (secfw.cli.main.COMMAND_MODULES).

A write such as ``secfw secgroup-add-rule`` must not pay at start-up for the
agent, pyroute2, etcd's watch client, the audit or the HTTP servers. The table
that makes that possible is checked here against what the modules really
register, so a new command cannot be forgotten in it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from secfw.api import Api
from secfw.cli.main import COMMAND_MODULES, import_all_commands, main
from secfw.store import open_store

if TYPE_CHECKING:
    from conftest import EtcdServer

#: Top-level packages a security-group command has no use for.
HEAVY = ("pyroute2", "etcd3gw", "requests", "nftables", "flask", "werkzeug", "waitress",
         "scapy", "prometheus_client", "netaddr", "cryptography", "rich.console",
         # the standard library's, each loaded by one kind of command only (image bytes,
         # SECFW_DEBUG tracebacks, user data, MACs, retry pauses): ~20 ms of CPU of every
         # command's start-up on the 2-core VM when they were imported eagerly
         "tempfile", "shutil", "hashlib", "pathlib", "traceback", "random", "base64",
         "secfw.imagefiles", "secfw.store.etcd")


def _registering_module(command: object) -> str:
    callback = getattr(command, "callback", None)
    return getattr(callback, "__module__", "")


def test_the_table_names_every_command_of_another_module() -> None:
    import_all_commands()
    registered = {name: _registering_module(cmd) for name, cmd in main.commands.items()}
    elsewhere = {name: module for name, module in registered.items() if module != "secfw.cli.main"}
    assert elsewhere == COMMAND_MODULES


_PROBE = (
    "import json, sys\n"
    "from secfw.cli.main import main\n"
    "main(sys.argv[1:], standalone_mode=False)\n"
    "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} | set(sys.modules))))\n"
)

#: Commands of the plain CLI and what each must print (proof that it really ran);
#: a boot draws its MAC with random (SystemRandom), so random is its own.
PLAIN_COMMANDS: tuple[tuple[tuple[str, ...], str, frozenset[str]], ...] = (
    (("secgroup-add-rule", "default", "tcp", "22", "22", "10.0.0.0/8"), "10.0.0.0/8",
     frozenset()),
    (("secgroup-create", "web", "web servers"), "web servers", frozenset()),
    (("secgroup-list",), "default", frozenset()),
    (("boot", "vm1", "--flavor", "m1.tiny", "--image", "cirros", "--nic", "net-id=n1",
      "--host", "h1"), "vm1", frozenset({"random"})),
    (("list", "--limit", "50"), "vm0", frozenset()),
)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store with a network, an image and one instance (vm0)."""
    return _small_cloud(f"sqlite:///{tmp_path_factory.mktemp('lazy') / 'secfw.db'}")


def _small_cloud(url: str) -> str:
    """``url`` with a network, an image and one instance (vm0) created in it."""
    api = Api(open_store(url))
    try:
        api.net_create("admin", "n1", "10.9.0.0/24")
        api.image_create("admin", "cirros", visibility="public")
        api.boot("admin", "vm0", "m1.tiny", "cirros", "h1", None, ["n1"])
    finally:
        api.store.close()
    return url


@pytest.mark.parametrize(("args", "printed", "own"), PLAIN_COMMANDS,
                         ids=[c[0][0] for c in PLAIN_COMMANDS])
def test_a_plain_command_imports_nothing_heavy(
        small_store: str, args: tuple[str, ...], printed: str, own: frozenset[str]) -> None:
    """The regression guard of the CLI's start-up: an eager import of any module of
    HEAVY (or of the agent, audit, backends, Neutron) anywhere on a plain command's
    path fails here, whatever the machine's speed."""
    run = subprocess.run([sys.executable, "-c", _PROBE, "--store", small_store, *args],
                         capture_output=True, text=True, timeout=120, check=True)
    loaded = set(json.loads(run.stdout.splitlines()[-1]))
    assert printed in run.stdout  # the command really ran
    assert not loaded & (set(HEAVY) - own), sorted(loaded & (set(HEAVY) - own))
    assert not {m for m in loaded if m.startswith(("secfw.agent", "secfw.audit",
                                                   "secfw.backends", "secfw.neutron"))}


#: What an etcd command's client must not bring: the Python HTTP stacks a client
#: library would (etcd3gw over requests: 240-270 ms of start-up on the 2-core VM,
#: more than a command's whole budget; secfw.store.etcdhttp is the standard
#: library's http.client), nor anything of HEAVY but the etcd store itself, the
#: base64 its keys are encoded with and the random that http.client's email
#: header parser imports (email.utils).
ETCD_HEAVY = (*sorted(set(HEAVY) - {"secfw.store.etcd", "base64", "random"}),
              "urllib3", "charset_normalizer", "idna", "futurist", "debtcollector", "wrapt",
              "asyncio", "concurrent.futures")


@pytest.fixture(scope="module")
def small_etcd_store(etcd_server: EtcdServer) -> str:
    """The same small cloud as small_store, in the session's etcd."""
    return _small_cloud(etcd_server.url())


@pytest.mark.parametrize(("args", "printed", "own"), PLAIN_COMMANDS,
                         ids=[c[0][0] for c in PLAIN_COMMANDS])
def test_a_plain_etcd_command_imports_no_http_library(
        small_etcd_store: str, args: tuple[str, ...], printed: str, own: frozenset[str]) -> None:
    """On etcd the store's client is the standard library's http.client: an
    import of requests, urllib3 or etcd3gw (or of HEAVY) on a plain command's
    path fails here."""
    run = subprocess.run([sys.executable, "-c", _PROBE, "--store", small_etcd_store, *args],
                         capture_output=True, text=True, timeout=120, check=True)
    loaded = set(json.loads(run.stdout.splitlines()[-1]))
    assert printed in run.stdout  # the command really ran
    assert "secfw.store.etcd" in loaded  # on etcd
    assert not loaded & (set(ETCD_HEAVY) - own), sorted(loaded & (set(ETCD_HEAVY) - own))


def test_help_still_lists_every_command() -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("secgroup-add-rule", "boot", "agent", "audit", "api", "store", "volume-list"):
        assert f"  {name}" in result.output


def test_the_bench_compiles_bytecode_before_timing_processes() -> None:
    """A whole-process figure is an installed secfw's: with bytecode (see
    secfw.bench.common.ensure_bytecode). Every module has a current .pyc after it."""

    import secfw
    from secfw.bench.common import ensure_bytecode

    ensure_bytecode()
    stale = [str(source) for source in sorted(Path(secfw.__file__).parent.rglob("*.py"))
             if not _bytecode_is_current(source)]
    assert not stale, stale[:5]


def _bytecode_is_current(source: Path) -> bool:
    """Whether the import system would use ``source``'s cached bytecode: a
    timestamp-based .pyc (PEP 552) recording the source's mtime and size."""
    import importlib.util

    cached = Path(importlib.util.cache_from_source(str(source)))
    if not cached.exists():
        return False
    header = cached.read_bytes()[:16]
    stat = source.stat()
    return (header[:4] == importlib.util.MAGIC_NUMBER
            and int.from_bytes(header[4:8], "little") == 0
            and int.from_bytes(header[8:12], "little") == int(stat.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(header[12:16], "little") == stat.st_size & 0xFFFFFFFF)

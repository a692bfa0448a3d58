"""The CLI imports only the module of the command it runs (secfw.cli.COMMAND_MODULES).

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

from secfw.cli import COMMAND_MODULES, import_all_commands, main

#: Top-level packages a security-group command has no use for.
HEAVY = ("pyroute2", "etcd3gw", "requests", "nftables", "flask", "werkzeug", "waitress",
         "scapy", "prometheus_client", "netaddr")


def _registering_module(command: object) -> str:
    callback = getattr(command, "callback", None)
    return getattr(callback, "__module__", "")


def test_the_table_names_every_command_of_another_module() -> None:
    import_all_commands()
    registered = {name: _registering_module(cmd) for name, cmd in main.commands.items()}
    elsewhere = {name: module for name, module in registered.items() if module != "secfw.cli"}
    assert elsewhere == COMMAND_MODULES


def test_a_security_group_command_imports_nothing_heavy(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'secfw.db'}"
    probe = (
        "import json, sys\n"
        "from secfw.cli import main\n"
        f"try:\n    main(['--store', {store!r}, 'secgroup-add-rule', 'default', 'tcp', '22',"
        " '22', '10.0.0.0/8'], standalone_mode=False)\n"
        "except SystemExit:\n    pass\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules}"
        " | {m for m in sys.modules if m.startswith('secfw.')})))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True)
    loaded = set(json.loads(run.stdout.splitlines()[-1]))
    assert "10.0.0.0/8" in run.stdout  # the command really ran
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert not {m for m in loaded if m.startswith(("secfw.agent", "secfw.audit",
                                                   "secfw.backends", "secfw.neutron"))}


def test_help_still_lists_every_command() -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("secgroup-add-rule", "boot", "agent", "audit", "api", "store", "volume-list"):
        assert f"  {name}" in result.output


def test_the_bench_compiles_bytecode_before_timing_processes() -> None:
    """A whole-process figure is an installed secfw's: with bytecode (see
    secfw.bench.common.ensure_bytecode). Every module has a current .pyc after it."""
    import importlib.util

    import secfw
    from secfw.bench.common import ensure_bytecode

    ensure_bytecode()
    stale = []
    for source in sorted(Path(secfw.__file__).parent.rglob("*.py")):
        cached = Path(importlib.util.cache_from_source(str(source)))
        if not cached.exists() or cached.stat().st_mtime < source.stat().st_mtime:
            stale.append(str(source))
    assert not stale, stale[:5]

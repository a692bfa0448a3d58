"""``secfw agent --once`` on a SQLite store does not import what it has no use for:
cryptography (keypairs), etcd3gw/requests (an etcd store's client and watch) or
prometheus_client (the daemon's metrics) — ~0.5 s of its start-up before."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from secfw.api import Api
from secfw.store import open_store

UNUSED = ("cryptography", "etcd3gw", "requests", "prometheus_client")

_PROBE = (
    "import json, sys\n"
    "from secfw.cli import main\n"
    "try:\n    main(sys.argv[1:], standalone_mode=False)\n"
    "except SystemExit:\n    pass\n"
    "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
)


def test_agent_once_on_sqlite_imports_nothing_unused(
    tmp_path: Path, scratch_ns: Callable[[], str]
) -> None:
    url = f"sqlite:///{tmp_path / 'secfw.db'}"
    api = Api(open_store(url))
    api.net_create("admin", "net1", "10.9.0.0/24")
    ns = scratch_ns()
    run = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _PROBE, "--store", url,
         "agent", "--host", "lazyhost", "--once"],
        capture_output=True, text=True, timeout=120, check=True)
    assert "sync" in run.stderr  # the pass really ran
    loaded = set(json.loads(run.stdout.splitlines()[-1]))
    assert not loaded & set(UNUSED), sorted(loaded & set(UNUSED))

"""``secfw agent --once`` on a SQLite store does not import what it has no use for:
cryptography (keypairs), etcd3gw/requests (an etcd store's client and watch) or
prometheus_client (the daemon's metrics) — ~0.5 s of its start-up before; nor
the lab and demo modules. (pyroute2 stays: it reads the taps, and the project
keeps one netlink library rather than a hand-written parser.)"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from secfw.api import Api
from secfw.store import open_store

UNUSED = ("cryptography", "etcd3gw", "requests", "prometheus_client",
          "secfw.lab.demo", "secfw.lab.hostlab", "secfw.lab.netns_tools", "secfw.agent.linkwatch")

_PROBE = (
    "import json, sys\n"
    "from secfw.cli.main import main\n"
    "try:\n    main(sys.argv[1:], standalone_mode=False)\n"
    "except SystemExit:\n    pass\n"
    "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} | set(sys.modules))))\n"
)


def test_agent_once_on_sqlite_imports_nothing_unused(
    tmp_path: Path, scratch_ns: Callable[[], str]
) -> None:
    url = f"sqlite:///{tmp_path / 'secfw.db'}"
    api = Api(open_store(url))
    api.net_create("admin", "net1", "10.9.0.0/24")
    api.image_create("admin", "cirros", visibility="public")
    # A port: the first pass then also checks conntrack for connections to revoke
    # (an empty table here: nothing to ask ctnetlink).
    api.boot("admin", "vm1", "m1.tiny", "cirros", "lazyhost", ["default"], ["net1"])
    ns = scratch_ns()
    run = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _PROBE, "--store", url,
         "agent", "--host", "lazyhost", "--once"],
        capture_output=True, text=True, timeout=120, check=True)
    assert "sync" in run.stderr  # the pass really ran
    loaded = set(json.loads(run.stdout.splitlines()[-1]))
    assert not loaded & set(UNUSED), sorted(loaded & set(UNUSED))

"""``secfw agent --once --register`` in a host namespace: the host is registered for
the scheduler after the sync, once; a boot without --host then lands on it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from secfw.agent.register import local_capacity
from secfw.api import Api
from secfw.store import open_store

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]


def agent_once(secfw: str, ns: str, store_url: str, host: str, state_dir: Path) -> str:
    """stderr of ``ip netns exec NS secfw --store URL agent --host H --once --register``."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, secfw, "--store", store_url, "agent", "--host", host,
         "--once", "--register"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "SECFW_STATE_DIR": str(state_dir)})
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_agent_registers_its_host_once(scratch_ns: Callable[[], str], helpers: Any,
                                       tmp_path: Path) -> None:
    ns = scratch_ns()
    url = f"sqlite:///{tmp_path}/secfw.db"
    host = f"reg-{ns[-6:]}"
    secfw = helpers.secfw_command()
    assert "msg=registered" in agent_once(secfw, ns, url, host, tmp_path)
    api = Api(open_store(url))
    try:
        registered = api.host_show(host)[0]
        assert (registered.vcpus, registered.ram_mb) == local_capacity()[:2]
        revision = api.store.revision()
        assert "msg=already_registered" in agent_once(secfw, ns, url, host, tmp_path)
        assert api.store.revision() == revision
        api.net_create("p", "net", "10.0.0.0/24")
        api.image_create("p", "img")
        assert api.boot("p", "vm", "m1.tiny", "img").host == host
    finally:
        api.store.close()

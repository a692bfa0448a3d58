"""The flowtable option on this kernel: the probe agrees with the kernel, and an
agent told ``--flowtable on`` where there is none fails closed — real packets.

The development kernel has no ``nf_flow_table`` (``flowtable … hook ingress``
fails with ENOENT), so the fast path itself is not exercised here; on a kernel
that has one, the refusal test is skipped (it needs a kernel without).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from agentproc import EXT, cached_tcp, filtered_as_expected, web_cloud

from secfw.backends.nftables.flowtable import _PROBE_TEXT, parse_probe, probe

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]


def test_probe_agrees_with_the_kernel(scratch_ns: Callable[[], str]) -> None:
    """The cached probe says what loading a flowtable in a fresh namespace says."""
    ns = scratch_ns()
    done = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=_PROBE_TEXT,
                          capture_output=True, text=True, timeout=30, check=False)
    found = probe()
    assert found == parse_probe(done.returncode, done.stderr)
    assert probe() is found  # cached: one probe per process
    if done.returncode != 0:
        assert not found.available and found.reason.startswith("flowtable … hook ingress: ")
        print(f"flowtable: not available on this kernel ({found.reason})")


def _agent_once(env: Any, mode: str) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = env.agent_cli("--once", "--flowtable", mode,
                                                             check=False)
    return result


def _flow_table_exists(env: Any) -> bool:
    listed = subprocess.run(["ip", "netns", "exec", env.lab.host_ns, "nft", "list", "tables"],
                            capture_output=True, text=True, timeout=30, check=True)
    return "secfw_flow" in listed.stdout


@pytest.mark.backends("nftables", reason="the flowtable is an nftables option")
@pytest.mark.topologies("routed", reason="one topology is enough for the refusal")
def test_required_flowtable_without_one_fails_closed_and_auto_filters(env: Any) -> None:
    """``--flowtable on`` on a kernel without flowtables: exit status non-zero, the
    probe's error in the log, every tap closed (not even what the groups allow
    passes) and no flowtable table. ``--flowtable auto`` then filters per the
    groups, the fast path left out with a warning."""
    if probe().available:
        pytest.skip("this kernel has flowtables: the refusal needs one without")
    web_cloud(env)
    assert cached_tcp(env, EXT, "web", 80) and cached_tcp(env, EXT, "web", 22)  # unfiltered
    done = _agent_once(env, "on")
    assert done.returncode != 0
    assert "flowtable: not available on this kernel" in done.stderr, done.stderr
    assert probe().reason in done.stderr
    assert env.secfw_present() and not _flow_table_exists(env)
    assert not cached_tcp(env, EXT, "web", 80)  # allowed by global_http, yet closed
    assert not cached_tcp(env, "web", "db", 22)
    done = _agent_once(env, "auto")
    assert done.returncode == 0, done.stderr
    assert "left out (--flowtable auto)" in done.stderr
    assert not _flow_table_exists(env)
    assert filtered_as_expected(env)

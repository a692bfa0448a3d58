"""What the one-shot agent asks the kernel at start.

* ``tap_links`` tells bridge ports from other taps, and sees the bridge.
* ``conntrack._table_empty`` (revocation skipped, pyroute2 not imported) is per
  namespace: True only where the table is empty, False once a packet made an entry.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from secfw.conntrack import _table_empty
from secfw.netns import tap_links


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


def test_tap_links_tells_bridge_ports_from_other_taps(scratch_ns: Callable[[], str]) -> None:
    ns = scratch_ns()
    _ip(ns, "link", "add", "sfwbr0", "type", "bridge")
    _ip(ns, "tuntap", "add", "dev", "tapin0", "mode", "tap")
    _ip(ns, "tuntap", "add", "dev", "tapout0", "mode", "tap")
    _ip(ns, "link", "add", "vethx0", "type", "veth", "peer", "name", "vethx1")
    _ip(ns, "link", "set", "tapin0", "master", "sfwbr0")
    _ip(ns, "link", "set", "vethx1", "master", "sfwbr0")
    assert tap_links(ns) == ({"tapin0": True, "tapout0": False}, True)


def test_an_empty_conntrack_table_is_seen_per_namespace(
    scratch_ns: Callable[[], str]
) -> None:
    quiet, busy = scratch_ns(), scratch_ns()
    for ns in (quiet, busy):  # conntrack hooks registered in both
        _ip(ns, "link", "set", "lo", "up")
        subprocess.run(["ip", "netns", "exec", ns, "nft",
                        "add table inet t; add chain inet t c { type filter hook output "
                        "priority 0; }; add rule inet t c ct state new accept"], check=True)
    subprocess.run(["ip", "netns", "exec", busy, "python3", "-c",
                    "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                    ".sendto(b'x', ('127.0.0.1', 9))"], check=True)
    assert _table_empty(quiet)
    assert not _table_empty(busy)

"""Scratch network namespaces for the benchmark, always removed afterwards.

Named ``sfw-b-<tag><10 hex digits>`` (the lab's ``sfw-`` prefix, so the lab's
probes accept them; ``<tag>`` is ``$SECFW_BENCH_NS_TAG``, empty by default, so a
test can tell its run's namespaces from those of runs beside it); created and
removed with ``ip netns`` exactly as an operator would.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from secfw.lab.hostlab import NS_PREFIX, netns_exists


def _ip_netns(*args: str) -> None:
    done = subprocess.run(["ip", "netns", *args], capture_output=True, text=True, timeout=30,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip netns {' '.join(args)}: {done.stderr.strip()}")


@contextmanager
def scratch_netns() -> Iterator[str]:
    """A fresh, empty network namespace; deleted (with its nft tables) on exit."""
    tag = os.environ.get("SECFW_BENCH_NS_TAG", "")
    name = f"{NS_PREFIX}b-{tag}{uuid.uuid4().hex[:10]}"
    _ip_netns("add", name)
    try:
        yield name
    finally:
        if netns_exists(name):
            _ip_netns("del", name)

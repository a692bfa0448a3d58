"""Entering named network namespaces, and the per-namespace kernel switches the
bridged topology needs. Shared by both backends, conntrack revocation and the lab.

Named namespaces are the ``ip netns`` ones, bound under :data:`NETNS_DIR`
(ip-netns(8)). ``setns(2)`` with ``CLONE_NEWNET`` moves the calling *thread* only,
so every helper here comes back to where it started.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from secfw.errors import BackendError

__all__ = [
    "BRIDGE_NF_SYSCTLS",
    "NETNS_DIR",
    "bridge_netfilter_enabled",
    "check_netns_name",
    "enable_bridge_netfilter",
    "has_nf_conntrack_bridge",
    "inside_netns",
    "tap_links",
]

#: Where ``ip netns add`` keeps named namespaces (ip-netns(8)).
NETNS_DIR = "/run/netns"
_NETNS = re.compile(r"[A-Za-z0-9_.-]+")

#: br_netfilter's switches: bridged IPv4/IPv6 frames pass the IP hooks (and so
#: conntrack and the inet/iptables filters) only when these are 1 in the
#: namespace of the bridge (Documentation/networking/nf_conntrack-sysctl and
#: br_netfilter_hooks.c: the sysctls are per network namespace since 5.3).
BRIDGE_NF_SYSCTLS = (
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
)


def check_netns_name(netns: str) -> str:
    """``netns`` if it is a plain namespace name (never a path); else OSError."""
    if netns in (".", "..") or not _NETNS.fullmatch(netns):
        raise OSError(f"{netns!r} is not a network namespace name")
    return netns


@contextmanager
def inside_netns(netns: str | None) -> Iterator[None]:
    """Run the body in network namespace ``netns`` (this thread only), then come
    back; ``None`` stays where it is. A missing namespace is an OSError.

    Not ``pyroute2.netns.pushns``: it creates a namespace that does not exist
    (``setns`` defaults to ``O_CREAT``), where a missing one must be an error.
    setns(2) itself is libc's (Python 3.11 has no ``os.setns``), not pyroute2's:
    importing pyroute2 costs a one-shot agent ~0.2 s.
    """
    if netns is None:
        yield
        return
    check_netns_name(netns)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


#: setns(2)'s nstype for a network namespace (<sched.h>).
CLONE_NEWNET = 0x40000000


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace open as ``fd``."""
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def enable_bridge_netfilter(netns: str | None) -> None:
    """Make bridged IP traffic in ``netns`` pass the IP netfilter hooks.

    Writes 1 to :data:`BRIDGE_NF_SYSCTLS` (``/proc/sys`` follows the calling
    thread's namespace). The files exist only once ``br_netfilter`` is loaded
    (built in or as a module); when they are missing this raises BackendError
    naming the module, because without it a bridged host would be unfiltered.
    """
    try:
        with inside_netns(netns):
            for key in BRIDGE_NF_SYSCTLS:
                path = Path("/proc/sys", key)
                if not path.exists():
                    raise BackendError(
                        "bridged topology needs br_netfilter: load it (modprobe br_netfilter)"
                        f"; {path} does not exist")
                if path.read_text().strip() != "1":
                    path.write_text("1")
    except OSError as exc:
        raise BackendError(f"cannot enable bridge netfilter: {exc}") from exc


def bridge_netfilter_enabled(netns: str | None) -> bool:
    """Whether br_netfilter hands bridged IPv4 and IPv6 to the IP hooks in ``netns``
    (False also when it is not loaded or the namespace cannot be entered)."""
    try:
        with inside_netns(netns):
            return all(Path("/proc/sys", key).read_text().strip() == "1"
                       for key in BRIDGE_NF_SYSCTLS)
    except OSError:
        return False


def has_nf_conntrack_bridge() -> bool:
    """Whether this kernel offers ``nf_conntrack_bridge`` (native conntrack for the
    bridge family): loaded, or present as a module of the running kernel."""
    if Path("/sys/module/nf_conntrack_bridge").exists():
        return True
    release = os.uname().release
    modules = Path("/lib/modules", release)
    for name in ("modules.builtin", "modules.dep"):
        try:
            text = (modules / name).read_text()
        except OSError:
            continue
        if "nf_conntrack_bridge.ko" in text:
            return True
    return False


def tap_links(netns: str | None, prefix: str = "tap") -> tuple[dict[str, bool], bool]:
    """The interfaces of ``netns`` whose name starts with ``prefix``, each mapped to
    whether it is a port of a Linux bridge (its ``IFLA_MASTER`` is a link of kind
    ``bridge``, rtnetlink(7)); and whether the namespace holds any bridge at all.

    What the agent checks its topology against: on a routed host taps have no
    master, on a bridged host they are bridge ports. Raises OSError when the
    namespace or rtnetlink cannot be used.
    """
    # pyroute2, the project's netlink library, imported here: only this reads links.
    from pyroute2 import IPRoute

    with inside_netns(netns), IPRoute() as ipr:
        links = list(ipr.get_links())
    kinds: dict[int, str | None] = {}
    for link in links:
        info = link.get_attr("IFLA_LINKINFO")
        kinds[link["index"]] = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    taps: dict[str, bool] = {}
    for link in links:
        name = link.get_attr("IFLA_IFNAME") or ""
        if name.startswith(prefix):
            taps[name] = kinds.get(link.get_attr("IFLA_MASTER") or 0) == "bridge"
    return taps, "bridge" in kinds.values()

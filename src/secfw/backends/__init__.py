"""Packet-filter backends: each renders the host IR for one technology and applies it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, overload

from secfw.errors import BackendError

if TYPE_CHECKING:
    from secfw.backends.iptables import IptablesBackend
    from secfw.backends.nftables import NftablesBackend

BACKENDS = ("nftables", "iptables")
#: Host topologies (README, "Backends and topologies"): ``routed`` — each tap is a
#: routed point-to-point link (Calico style); ``bridged`` — taps are ports of Linux
#: bridges (nova-network, Neutron's hybrid driver) and br_netfilter hands bridged IP
#: traffic to the IP hooks. Every backend takes ``topology=`` and refuses others.
TOPOLOGIES = ("routed", "bridged")

#: Names a plan description lists at most (a big change would flood the log: the
#: first sync of the bench's 10k-port host names 508 chains and 516 sets, ~40 kB).
DESCRIBE_NAMES = 20


def capped_names(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` (a backend's plan description) with its ``chains`` and ``sets``
    lists cut to :data:`DESCRIBE_NAMES` names and ``"…"``, and their full counts
    as ``chains_count`` / ``sets_count`` when they were longer."""
    found = dict(summary)
    for key in ("chains", "sets"):
        names = found.get(key, [])
        if len(names) > DESCRIBE_NAMES:
            found[key] = [*names[:DESCRIBE_NAMES], "…"]
            found[f"{key}_count"] = len(names)
    return found


@overload
def get_backend(name: Literal["nftables"], **options: Any) -> NftablesBackend: ...


@overload
def get_backend(name: Literal["iptables"], **options: Any) -> IptablesBackend: ...


@overload
def get_backend(name: str, **options: Any) -> NftablesBackend | IptablesBackend: ...


def get_backend(name: str, **options: Any) -> NftablesBackend | IptablesBackend:
    """A new backend object by name (``options`` go to its constructor); also
    ``noop`` (not in :data:`BACKENDS`): nftables without the kernel, for the bench.

    Imported lazily, so a host without a backend's libraries can still use others.
    Raises BackendError for an unknown name.
    """
    if name == "nftables":
        from secfw.backends.nftables import NftablesBackend

        return NftablesBackend(**options)
    if name == "iptables":
        from secfw.backends.iptables import IptablesBackend

        return IptablesBackend(**options)
    if name == "noop":  # the scale bench's simulated hosts (backends/noop.py)
        from secfw.backends.noop import NoopBackend

        return NoopBackend(**options)
    raise BackendError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")

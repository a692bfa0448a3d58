"""Scheduling and compute/volume quotas: pure functions over a :class:`CloudState`.

The scheduler is nova's filter scheduler reduced to what the model holds: a host
passes when the instance fits its remaining capacity (vCPUs, RAM, disk; what the
non-deleted instances placed on it consume) and the flavor's extra_specs match the
host's properties (nova's ComputeCapabilitiesFilter, exact string equality);
among the hosts that pass, the one with the most free RAM wins (nova's default
RAMWeigher spreads instances), ties broken by name so that the choice is
deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

from secfw.cloud import CloudState
from secfw.errors import QuotaError
from secfw.model import UNLIMITED, Flavor, Host, Quota

#: extra_specs scopes the capabilities filter reads: unscoped keys and
#: ``capabilities:KEY``. Other scopes (``hw:``, ``quota:``…) belong to other
#: parts of nova (the virt driver, the quota system) and do not constrain hosts.
CAPABILITIES_SCOPE = "capabilities"


@dataclass(frozen=True)
class Demand:
    """What one instance consumes on its host and in its project's quota."""

    vcpus: int
    ram_mb: int
    disk_gb: int


@dataclass(frozen=True)
class HostUsage:
    """What the instances placed on a host consume, and how many there are."""

    vcpus: int = 0
    ram_mb: int = 0
    disk_gb: int = 0
    instances: int = 0


def host_usage(state: CloudState, host: str) -> HostUsage:
    """The capacity the non-deleted instances on ``host`` consume (ERROR
    instances have no host and consume nothing)."""
    used = state.usage("host", host)  # the tally of secfw.store.indexes
    return HostUsage(used.get("vcpus", 0), used.get("ram_mb", 0), used.get("disk_gb", 0),
                     used.get("instances", 0))


def required_properties(flavor: Flavor) -> dict[str, str]:
    """The host properties a flavor's extra_specs require (see CAPABILITIES_SCOPE)."""
    required = {}
    for key, value in flavor.extra_specs.items():
        scope, sep, name = key.partition(":")
        if not sep:
            required[key] = value
        elif scope == CAPABILITIES_SCOPE and name:
            required[name] = value
    return required


def host_fits(state: CloudState, host: Host, demand: Demand, required: dict[str, str]) -> bool:
    """True when ``demand`` fits what ``host`` has left and its properties match."""
    if any(host.properties.get(k) != v for k, v in required.items()):
        return False
    used = host_usage(state, host.id)
    return (used.vcpus + demand.vcpus <= host.vcpus
            and used.ram_mb + demand.ram_mb <= host.ram_mb
            and used.disk_gb + demand.disk_gb <= host.disk_gb)


def choose_host(state: CloudState, demand: Demand, required: dict[str, str]) -> str | None:
    """The registered host an instance goes to, or None (nova's NoValidHost)."""
    fitting = [h for h in state.hosts.values() if host_fits(state, h, demand, required)]
    if not fitting:
        return None
    best = min(fitting, key=lambda h: (-(h.ram_mb - host_usage(state, h.id).ram_mb), h.id))
    return best.id


# --------------------------------------------------------------------------- quotas


def compute_usage(state: CloudState, project: str) -> dict[str, int]:
    """instances, cores and ram used by ``project``: every instance it has, ERROR
    included (nova counts an instance against the quota until it is deleted)."""
    used = state.usage("compute", project)  # the tally of secfw.store.indexes
    return {name: used.get(name, 0) for name in ("instances", "cores", "ram")}


def volume_usage(state: CloudState, project: str) -> dict[str, int]:
    """volumes, snapshots and gigabytes (volumes and snapshots: cinder's rule)."""
    volumes = [v for v in state.volumes.values() if v.project == project]
    snaps = [s for s in state.volume_snapshots.values() if s.project == project]
    return {"volumes": len(volumes), "snapshots": len(snaps),
            "gigabytes": sum(v.size_gb for v in volumes) + sum(s.size_gb for s in snaps)}


def check_quota(quota: Quota, used: dict[str, int], requested: dict[str, int]) -> None:
    """QuotaError (nova's message) when ``used + requested`` exceeds a limit."""
    for name, amount in requested.items():
        limit = getattr(quota, name)
        if amount and limit != UNLIMITED and used[name] + amount > limit:
            raise QuotaError(
                f"Quota exceeded for {name}: Requested {amount}, but already used "
                f"{used[name]} of {limit} {name} (project {quota.id!r})"
            )

"""``secfw audit impact``: what a change of the model does to the flows, before
(or after) it is made.

Two clouds are compared — the store now and the store after a write command
applied to an in-memory copy (:class:`secfw.store.memory.MemoryStore`), or the
store at two revisions of its history — port by port: for each port of either
cloud, each direction (``ingress``: what reaches it, ``egress``: what it may
reach) and each family, the exact spaces of :func:`secfw.audit.reach.reach`
before and after, and their two differences (:func:`secfw.audit.space.difference`):
flows **newly allowed** (labelled by the rules that open them after) and
**newly denied** (labelled by the rules that opened them before). A port that
exists on one side only (or whose address changed) has its whole space on that
side. Both lists empty: the change is provably neutral for the ports in scope.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from secfw.audit.policy import CloudPolicy
from secfw.audit.reach import Answer, reach, region_row
from secfw.audit.space import Region, difference
from secfw.compiler.ir import Family

DIRECTIONS = ("ingress", "egress")
FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")


def scope_ports(before: CloudPolicy, after: CloudPolicy, project: str,
                all_projects: bool) -> list[str]:
    """The ids of the ports of either cloud whose instance is in ``project`` (any
    project with ``all_projects``)."""
    found = {pid for cp in (before, after) for pid, view in cp.ports.items()
             if all_projects or view.instance.project == project}
    return sorted(found)


def impact(before: CloudPolicy, after: CloudPolicy,
           port_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Rows of flows newly allowed and newly denied (module docstring), each a
    :func:`~secfw.audit.reach.region_row` with a ``change`` field, ordered by
    instance, port, direction, change."""
    rows: list[dict[str, Any]] = []
    for port_id in port_ids:
        for direction in DIRECTIONS:
            for family in FAMILIES:
                rows += _port_changes(before, after, port_id, direction, family)
    return sorted(rows, key=lambda r: (r["instance"], r["port"], r["direction"],
                                       r["change"] != "allowed", r["ethertype"]))


def _answer(cp: CloudPolicy, port_id: str, direction: str, family: Family) -> Answer | None:
    view = cp.ports.get(port_id)
    return None if view is None else reach(cp, view, direction, family)


def _port_changes(before: CloudPolicy, after: CloudPolicy, port_id: str, direction: str,
                  family: Family) -> list[dict[str, Any]]:
    old = _answer(before, port_id, direction, family)
    new = _answer(after, port_id, direction, family)
    old_regions = old.regions if old is not None else []
    new_regions = new.regions if new is not None else []
    if old is not None and new is not None and old.address != new.address:
        old_regions, new_regions = old.regions, new.regions  # readdressed: other flows
        return [*({**region_row(new, r), "change": "allowed"} for r in new_regions),
                *({**region_row(old, r), "change": "denied"} for r in old_regions)]
    if _same(old_regions, new_regions):
        return []
    rows = []
    if new is not None:
        rows += [{**region_row(new, r), "change": "allowed"}
                 for r in difference(family, new_regions, old_regions, new.openers)]
    if old is not None:
        rows += [{**region_row(old, r), "change": "denied"}
                 for r in difference(family, old_regions, new_regions, old.openers)]
    return rows


def _same(left: list[Region], right: list[Region]) -> bool:
    """Equal spaces, cheaply: regions are minimal, so equal spaces give equal lists
    (a false "different" only costs the exact difference)."""
    return len(left) == len(right) and all(
        a.box == b.box and a.addresses == b.addresses for a, b in zip(left, right, strict=True))

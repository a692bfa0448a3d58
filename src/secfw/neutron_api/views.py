"""secfw's records as Neutron's API shows them (pure: a cloud state in, dicts out).

Field sets are Neutron's (api-ref of networking v2.0). What secfw does not
model is shown with the value Neutron gives a resource that never used it:
``tags`` empty, ``shared`` false, ``stateful`` true (secfw is always stateful).
Times are ``YYYY-MM-DDTHH:MM:SSZ``; a record stored before secfw kept times
shows the epoch.
"""

from __future__ import annotations

import uuid
from typing import Any

from secfw.api import iso_time
from secfw.cloud import CloudState
from secfw.model import Network, Port, Rule, SecurityGroup, protocol_number

#: Namespace of the subnet ids secfw derives from a network's id (it has no
#: subnet records: a network holds one IPv4 and at most one IPv6 subnet).
SUBNET_NAMESPACE = uuid.UUID("7d1b6c2e-2f59-4c1e-9a43-5e0c1f3f6a10")


def subnet_id(network: Network, version: int) -> str:
    """The stable id of a network's IPv4 (4) or IPv6 (6) subnet."""
    return str(uuid.uuid5(SUBNET_NAMESPACE, f"{network.id}/{version}"))


def neutron_protocol(rule: Rule) -> str | None:
    """The protocol as Neutron spells it: ICMPv6 is ``ipv6-icmp``; numbers secfw
    stores for Neutron-only names stay numbers."""
    if rule.protocol == "icmpv6":
        return "ipv6-icmp"
    return rule.protocol


def rule_view(state: CloudState, rule: Rule) -> dict[str, Any]:
    """A rule with Neutron's fields; ``project_id`` is its group's project."""
    project = state.groups[rule.group_id].project
    low, high = rule.port_min, rule.port_max
    if rule.protocol in ("icmp", "icmpv6") and low is None:
        high = None  # nova's "icmp -1 255": the code is display only, the rule is any ICMP
    stamp = iso_time(rule.created)
    return {
        "id": rule.id,
        "security_group_id": rule.group_id,
        "direction": rule.direction,
        "ethertype": rule.ethertype,
        "protocol": rule.protocol_text if rule.protocol_text is not None
        else neutron_protocol(rule),
        "port_range_min": low,
        "port_range_max": high,
        "remote_ip_prefix": rule.remote_cidr,
        "remote_group_id": rule.remote_group_id,
        "normalized_cidr": rule.remote_cidr,
        "remote_address_group_id": None,
        "description": rule.description,
        "project_id": project,
        "tenant_id": project,
        "revision_number": 0,
        "created_at": stamp,
        "updated_at": stamp,
    }


def group_view(state: CloudState, group: SecurityGroup) -> dict[str, Any]:
    """A group with Neutron's fields, its rules embedded (in secfw's stable order)."""
    rules = sorted(state.rules_by_group.get(group.id, {}).values(), key=_rule_order)
    return {
        "id": group.id,
        "name": group.name,
        "description": group.description,
        "stateful": True,
        "shared": False,
        "project_id": group.project,
        "tenant_id": group.project,
        "revision_number": group.revision,
        "tags": [],
        "created_at": iso_time(group.created),
        "updated_at": iso_time(group.updated or group.created),
        "security_group_rules": [rule_view(state, r) for r in rules],
    }


def _rule_order(rule: Rule) -> tuple[Any, ...]:
    return (rule.created, rule.direction, rule.ethertype,
            protocol_number(rule.protocol) or -1, rule.id)


def port_view(state: CloudState, port: Port, admin: bool) -> dict[str, Any]:
    """A port with the fields security groups need; ``binding:host_id`` for admins
    only (Neutron's default policy)."""
    instance = state.instances[port.instance_id]
    network = state.networks[port.network_id]
    fixed_ips = [{"subnet_id": subnet_id(network, 4), "ip_address": port.ip}]
    if port.ip6:
        fixed_ips.append({"subnet_id": subnet_id(network, 6), "ip_address": port.ip6})
    pairs = [
        {"ip_address": cidr.removesuffix("/32").removesuffix("/128"), "mac_address": mac}
        for cidr, mac in port.address_pairs()
    ]
    stamp = iso_time(instance.created)
    view: dict[str, Any] = {
        "id": port.id,
        "name": "",
        "description": "",
        "network_id": port.network_id,
        "project_id": instance.project,
        "tenant_id": instance.project,
        "mac_address": port.mac,
        "admin_state_up": True,
        "status": "ACTIVE",
        "device_id": instance.id,
        "device_owner": "compute:nova",
        "fixed_ips": fixed_ips,
        "security_groups": list(instance.security_groups),
        "allowed_address_pairs": pairs,
        "port_security_enabled": port.port_security,
        "revision_number": 0,
        "tags": [],
        "created_at": stamp,
        "updated_at": iso_time(instance.updated or instance.created),
    }
    if admin:
        view["binding:host_id"] = instance.host
    return view


def network_view(network: Network, admin: bool) -> dict[str, Any]:
    """A network: flat ones are shared (every project's), VLAN ones their project's.

    The provider attributes are shown to admins only (Neutron's default policy)."""
    subnets = [subnet_id(network, 4)] + ([subnet_id(network, 6)] if network.cidr6 else [])
    view: dict[str, Any] = {
        "id": network.id,
        "name": network.name,
        "description": "",
        "project_id": network.project or "",
        "tenant_id": network.project or "",
        "status": "ACTIVE",
        "admin_state_up": True,
        "shared": network.project is None,
        "subnets": subnets,
        "port_security_enabled": True,
        "router:external": False,
        "mtu": 1500,
        "revision_number": 0,
        "tags": [],
        "created_at": iso_time(0),
        "updated_at": iso_time(0),
    }
    if admin:
        view["provider:network_type"] = "flat" if network.vlan is None else "vlan"
        view["provider:physical_network"] = None
        view["provider:segmentation_id"] = network.vlan
    return view

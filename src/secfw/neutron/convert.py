"""Neutron's agent-side data → secfw's IR. Pure: no I/O, no clock, no randomness.

Neutron's L2 agent hands a firewall driver three kinds of data (enhanced RPC, the
only mode current Neutron has):

* **port dicts** (``prepare_port_filter``/``update_port_filter``): ``device``,
  ``mac_address``, ``fixed_ips`` (address strings, or ``{"ip_address": …}``),
  ``security_groups``, ``allowed_address_pairs`` (``{"ip_address", "mac_address"}``),
  ``port_security_enabled``;
* **rule lists** per group (``update_security_group_rules``): ``direction``,
  ``ethertype``, ``protocol``, ``port_range_min/max``, the remote as
  ``source_ip_prefix`` (ingress) or ``dest_ip_prefix`` (egress) — the server renames
  ``remote_ip_prefix`` so — or ``remote_group_id`` / ``remote_address_group_id``;
* **member addresses** per remote group (``update_security_group_members``):
  ``{"IPv4": [(ip, mac), …], "IPv6": […]}`` (older servers sent bare strings).

Everything here is validated and canonicalised before it reaches the IR: group
ids must be UUIDs (they become chain and set names), taps and MACs are checked by
the backend again, and rule ids are digests of the rule's content, never text
Neutron sent — so nothing a user typed reaches a ruleset as syntax.

Neutron's semantics, not nova-network's: no same-net sets, and a port whose groups
have no egress rule sends nothing (``egress_open`` is always False).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from secfw.compiler.build import chain_name, normalise_addresses, set_name
from secfw.compiler.ir import (
    AddressPair,
    AddressSet,
    Family,
    GroupChain,
    IcmpMatch,
    IRDirection,
    IRRule,
    PortPolicy,
    PortRange,
)
from secfw.constants import IANA_PROTOCOLS, ICMP, ICMPV6, PORT_PROTOCOL_NUMBERS
from secfw.errors import ValidationError

#: Names Neutron accepts for ``protocol`` beyond secfw's table (IANA numbers).
_PROTOCOLS = IANA_PROTOCOLS | {
    "ipip": 4, "egp": 8, "ipv6-encap": 41, "ipv6-route": 43, "ipv6-frag": 44,
    "rsvp": 46, "ipv6-nonxt": 59, "ipv6-opts": 60, "encap": 98,
}
#: Neutron takes port ranges for DCCP too; the backend refuses what it cannot
#: express (UnsupportedError), where ignoring the ports would widen the rule.
_PORT_PROTOCOLS = PORT_PROTOCOL_NUMBERS | {IANA_PROTOCOLS["dccp"]}
_ICMP = ICMP
_ICMPV6 = ICMPV6
_FAMILIES: dict[str, Family] = {"IPv4": "ipv4", "IPv6": "ipv6"}
#: Linux interface names hold 15 characters; Neutron's tap names are 14
#: (``tap`` + the first 11 characters of the port id: iptables_firewall's LINUX_DEV_LEN).
_TAP_LEN = 14


def group_key(group_id: object) -> str:
    """A security (or address) group id as secfw names it: the canonical UUID text.
    ValidationError for anything else — the id becomes part of chain and set names."""
    try:
        return str(uuid.UUID(str(group_id)))
    except ValueError:
        raise ValidationError(f"neutron: security group id {group_id!r} is not a UUID") from None


def tap_name(device: object) -> str:
    """The host interface of a port: ``device`` itself when it is already a tap name
    (the Linux bridge agent's form), else ``tap`` + the port id, cut to 14
    characters (the OVS hybrid plug's ``tap<port id[:11]>``)."""
    text = str(device)
    name = text if text.startswith("tap") else "tap" + text
    return name[:_TAP_LEN]


def protocol_number(protocol: object, family: Family) -> int | None:
    """IP protocol number of a Neutron ``protocol`` (name, number or None/``any``).
    ``icmp`` in an IPv6 rule means ICMPv6, as Neutron's drivers read it."""
    if protocol is None or str(protocol).lower() in ("", "any"):
        return None
    text = str(protocol).strip().lower()
    if text.isdigit():
        number = int(text)
        if not 0 <= number <= 255:
            raise ValidationError(f"neutron: protocol {protocol!r} is not in 0..255")
    elif text in _PROTOCOLS:
        number = _PROTOCOLS[text]
    else:
        raise ValidationError(f"neutron: unknown protocol {protocol!r}")
    return _ICMPV6 if family == "ipv6" and number == _ICMP else number


def _int_or_none(value: object, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(str(value))
    except ValueError:
        raise ValidationError(f"neutron: {what} {value!r} is not an integer") from None


def _remote_cidr(rule: Mapping[str, Any], direction: str, family: Family) -> str | None:
    """The rule's remote prefix, canonical; None for none or "everything"."""
    key = "source_ip_prefix" if direction == "ingress" else "dest_ip_prefix"
    text = rule.get(key) or rule.get("remote_ip_prefix")
    if not text:
        return None
    try:
        network = ipaddress.ip_network(str(text), strict=False)
    except ValueError:
        raise ValidationError(f"neutron: remote prefix {text!r} is not a network") from None
    if network.version != (4 if family == "ipv4" else 6):
        raise ValidationError(f"neutron: remote prefix {text} does not match the ethertype")
    return None if network.prefixlen == 0 else str(network)


def _remote_set(rule: Mapping[str, Any], family: Family) -> str | None:
    remote = rule.get("remote_group_id") or rule.get("remote_address_group_id")
    return set_name(group_key(remote), family) if remote else None


def _rule_id(rule: Mapping[str, Any]) -> str:
    """A stable id from the rule's content (Neutron's agent-side rules carry none)."""
    text = json.dumps({k: rule[k] for k in sorted(rule)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ir_rule(rule: Mapping[str, Any]) -> tuple[IRDirection, IRRule]:
    """One Neutron rule as (direction, IR rule). ValidationError for malformed rules.
    ``port_range_min/max`` are ports for port protocols, ICMP type/code for ICMP."""
    direction = rule.get("direction")
    if direction not in ("ingress", "egress"):
        raise ValidationError(f"neutron: rule direction {direction!r}")
    family = _FAMILIES.get(str(rule.get("ethertype", "IPv4")))
    if family is None:
        raise ValidationError(f"neutron: rule ethertype {rule.get('ethertype')!r}")
    proto = protocol_number(rule.get("protocol"), family)
    low = _int_or_none(rule.get("port_range_min"), "port_range_min")
    high = _int_or_none(rule.get("port_range_max"), "port_range_max")
    ports = icmp = None
    if proto in _PORT_PROTOCOLS and low is not None:
        ports = PortRange(low, high if high is not None else low)
    elif proto in (_ICMP, _ICMPV6) and low is not None:
        icmp = IcmpMatch(low, high)
    elif low is not None or high is not None:  # a narrower rule must not become "all"
        raise ValidationError(f"neutron: port range with protocol {rule.get('protocol')!r}")
    return direction, IRRule(
        rule_id=_rule_id(rule),
        family=family,
        protocol=proto,
        ports=ports,
        icmp=icmp,
        remote_cidr=_remote_cidr(rule, direction, family),
        remote_set=_remote_set(rule, family),
    )


def group_chains(group_id: str, rules: Iterable[Mapping[str, Any]]) -> tuple[GroupChain, ...]:
    """The ingress and egress chains of one group (either may be empty): rules
    deduplicated by content, in a stable order."""
    by_direction: dict[IRDirection, set[IRRule]] = {"ingress": set(), "egress": set()}
    for rule in rules:
        direction, compiled = ir_rule(rule)
        by_direction[direction].add(compiled)
    return tuple(
        GroupChain(chain_name(group_id, d), group_id, d,
                   tuple(sorted(by_direction[d], key=lambda r: r.rule_id)))
        for d in ("ingress", "egress")
    )


def _member_address(entry: object) -> tuple[int, str]:
    """One member entry — ``(ip, mac)`` or a bare address — as (IP version,
    canonical CIDR)."""
    text = entry[0] if isinstance(entry, list | tuple) and entry else entry
    return _canonical_network(str(text))


@lru_cache(maxsize=1 << 17)
def _canonical_network(text: str) -> tuple[int, str]:
    """Cached: the agent pushes the same member addresses again and again."""
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValidationError(f"neutron: member address {text!r} is not an address") from None
    return network.version, str(network)


def member_sets(group_id: str, members: Mapping[str, Sequence[object]]
                ) -> tuple[AddressSet, ...]:
    """The IPv4 and IPv6 address sets of a remote group from Neutron's member dict
    (an address of the other family under an ethertype is ignored)."""
    sets = []
    for ethertype, family in _FAMILIES.items():
        version = 4 if family == "ipv4" else 6
        parsed = [_member_address(e) for e in members.get(ethertype, ())]
        kept = [cidr for v, cidr in parsed if v == version]
        sets.append(AddressSet(set_name(group_id, family), group_id, family,
                               normalise_addresses(kept)))
    return tuple(sets)


def _fixed_ips(port: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The port's fixed addresses, (IPv4, IPv6), canonical."""
    v4: list[str] = []
    v6: list[str] = []
    for entry in port.get("fixed_ips") or ():
        text = entry.get("ip_address") if isinstance(entry, Mapping) else entry
        try:
            address = ipaddress.ip_address(str(text))
        except ValueError:
            raise ValidationError(f"neutron: fixed IP {text!r} is not an address") from None
        (v4 if address.version == 4 else v6).append(str(address))
    return sorted(set(v4)), sorted(set(v6))


def _pairs(port: Mapping[str, Any], mac: str) -> tuple[AddressPair, ...]:
    pairs = set()
    for pair in port.get("allowed_address_pairs") or ():
        try:
            cidr = str(ipaddress.ip_network(str(pair["ip_address"]), strict=False))
        except (KeyError, TypeError, ValueError):
            raise ValidationError(f"neutron: allowed address pair {pair!r}") from None
        pairs.add(AddressPair(cidr, str(pair.get("mac_address") or mac).lower()))
    return tuple(sorted(pairs))


def port_security(port: Mapping[str, Any]) -> bool:
    """Neutron's rule: filtered unless ``port_security_enabled`` is explicitly False."""
    return port.get("port_security_enabled", True) is not False


def port_groups(port: Mapping[str, Any]) -> tuple[str, ...]:
    """The port's security groups, canonical, in Neutron's order, without repeats."""
    keys = [group_key(g) for g in port.get("security_groups") or ()]
    return tuple(dict.fromkeys(keys))


def port_policy(port: Mapping[str, Any]) -> PortPolicy:
    """The IR policy of one Neutron port (see the module docstring)."""
    device = port.get("device")
    if not device:
        raise ValidationError("neutron: port without a device")
    mac = str(port.get("mac_address", "")).lower()
    v4, v6 = _fixed_ips(port)
    groups = port_groups(port)
    tap = tap_name(device)
    return PortPolicy(
        tap=tap,
        port_id=str(port.get("id") or device),
        instance_id=str(port.get("device_id") or device),
        mac=mac,
        ipv4=tuple(v4),
        same_net_sets=(),
        ingress_chains=tuple(chain_name(g, "ingress") for g in groups),
        egress_chains=tuple(chain_name(g, "egress") for g in groups),
        egress_open=False,
        ipv6=tuple(v6),
        allowed_pairs=_pairs(port, mac),
        port_security=port_security(port),
    )

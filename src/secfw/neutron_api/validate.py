"""Request bodies of the Neutron API checked as Neutron checks them.

Pure functions: a JSON body in, the arguments of a :class:`secfw.api.Api` call
out, or a :class:`~secfw.errors.NeutronApiError` with Neutron's status, type
and message. Neutron validates in two stages — the attribute map (unknown or
read-only attributes, required attributes, conversions: protocol, ports,
ethertype, CIDR) and then the plugin (port range against protocol, prefix
against ethertype, remote IP and group together) — and the first failure is
what a client sees, so the order here is Neutron's (neutron/api/v2/base.py,
neutron/db/securitygroups_db.py ``_validate_security_group_rule``).

Everything that passes here is validated again by the Python API (one model,
one set of rules); this layer only makes the *first* error the one Neutron
would give.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from secfw.errors import NeutronApiError
from secfw.model import PORT_PROTOCOLS, PROTOCOL_NUMBERS

DIRECTIONS = ("ingress", "egress")
ETHERTYPES = ("IPv4", "IPv6")
#: Neutron's protocol names that secfw's model knows by number only.
EXTRA_PROTOCOL_NUMBERS: dict[str, int] = {
    "hopopt": 0,
    "ipip": 4,
    "egp": 8,
    "dccp": 33,
    "ipv6-encap": 41,
    "ipv6-route": 43,
    "ipv6-frag": 44,
    "rsvp": 46,
    "ipv6-nonxt": 59,
    "ipv6-opts": 60,
    "pgm": 113,
}
#: Every protocol name the API accepts (Neutron's list), ``any`` meaning none.
PROTOCOL_NAMES = tuple(sorted({*PROTOCOL_NUMBERS, *EXTRA_PROTOCOL_NUMBERS, "any"}))
#: protocols that are IPv6-only: an IPv4 rule naming one is a conflict.
_IPV6_ONLY = frozenset({"ipv6-encap", "ipv6-frag", "ipv6-icmp", "icmpv6", "ipv6-nonxt",
                        "ipv6-opts", "ipv6-route", "41", "43", "44", "58", "59", "60"})
_ICMP = frozenset({"icmp", "icmpv6", "ipv6-icmp", "1", "58"})
_UUID = re.compile(r"[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}")

GROUP_POST = frozenset({"name", "description", "project_id", "tenant_id", "stateful"})
GROUP_PUT = frozenset({"name", "description", "stateful"})
RULE_POST = frozenset({
    "security_group_id", "direction", "ethertype", "protocol", "port_range_min",
    "port_range_max", "remote_ip_prefix", "remote_group_id", "description", "project_id",
    "tenant_id", "remote_address_group_id",
})
RULE_PUT = frozenset({"description"})
PORT_PUT = frozenset({"security_groups", "allowed_address_pairs", "port_security_enabled"})


def bad_request(message: str) -> NeutronApiError:
    """Neutron's 400 for a malformed request (type ``HTTPBadRequest``)."""
    return NeutronApiError(400, "HTTPBadRequest", message)


def resource_body(body: Any, resource: str, allowed: frozenset[str]) -> dict[str, Any]:
    """``body[resource]`` when it is an object naming only ``allowed`` attributes."""
    if not isinstance(body, dict) or not isinstance(body.get(resource), dict):
        raise bad_request(f"Unable to find '{resource}' in request body")
    attrs: dict[str, Any] = body[resource]
    unknown = sorted(set(attrs) - allowed)
    if unknown:
        raise bad_request(f"Unrecognized attribute(s) '{', '.join(unknown)}'")
    return attrs


def text_attr(attrs: Mapping[str, Any], key: str, default: str = "", limit: int = 255) -> str:
    """A string attribute of at most ``limit`` characters (Neutron's ``type:string``)."""
    value = attrs.get(key, default)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise bad_request(f"Invalid input for {key}. Reason: '{value}' is not a valid string.")
    if len(value) > limit:
        raise bad_request(
            f"Invalid input for {key}. Reason: '{value}' exceeds maximum length of {limit}."
        )
    return value


def is_uuid(value: Any) -> bool:
    """Neutron's ``is_uuid_like``: 32 hex digits, dashes optional."""
    return isinstance(value, str) and _UUID.fullmatch(value) is not None


@dataclass(frozen=True)
class RuleRequest:
    """A rule body that passed Neutron's checks, in the Python API's terms."""

    security_group_id: str
    project: str | None
    direction: str
    ethertype: str
    protocol: str | None
    dst_port: str | None
    icmp_type: int | None
    icmp_code: int | None
    remote_ip: str | None
    remote_group_id: str | None
    description: str
    #: the protocol as Neutron stores and shows it (name or number, as given)
    protocol_text: str | None


def parse_rule(attrs: Mapping[str, Any]) -> RuleRequest:
    """The ``security_group_rule`` object of a POST, checked in Neutron's order."""
    for key in ("security_group_id", "direction"):
        if key not in attrs:
            raise bad_request(f"Failed to parse request. Required attribute '{key}' not specified")
    protocol = _protocol(attrs.get("protocol"))
    low = _port_value(attrs.get("port_range_min"))
    high = _port_value(attrs.get("port_range_max"))
    direction = attrs["direction"]
    if direction not in DIRECTIONS:
        raise bad_request(
            f"Invalid input for direction. Reason: '{direction}' is not in "
            f"{list(DIRECTIONS)}."
        )
    ethertype = _ethertype(attrs.get("ethertype", "IPv4"))
    remote_ip = _prefix(attrs.get("remote_ip_prefix"))
    description = text_attr(attrs, "description")
    if attrs.get("remote_address_group_id") is not None:
        raise bad_request("remote_address_group_id is not supported by secfw")
    if ethertype == "IPv6" and protocol in ("icmp", "icmpv6"):
        protocol = "ipv6-icmp"  # Neutron's canonical IPv6 ICMP (legacy names converted)
    elif ethertype == "IPv6" and protocol == "1":
        protocol = "58"  # ... and number 1 becomes 58
    _check_port_range(protocol, low, high)
    if remote_ip is not None:
        version = ipaddress.ip_network(remote_ip, strict=False).version
        if f"IPv{version}" != ethertype:
            raise NeutronApiError(
                400, "SecurityGroupRuleParameterConflict",
                f"Conflicting value ethertype {ethertype} for CIDR {remote_ip}",
            )
    if protocol in _IPV6_ONLY and ethertype == "IPv4":
        raise NeutronApiError(
            400, "SecurityGroupEthertypeConflictWithProtocol",
            f"Invalid ethertype {ethertype} for protocol {protocol}.",
        )
    remote_group = attrs.get("remote_group_id")
    if remote_ip is not None and remote_group is not None:
        raise NeutronApiError(
            400, "SecurityGroupRemoteGroupAndRemoteIpPrefix",
            "Only remote_ip_prefix or remote_group_id may be provided.",
        )
    return _request(attrs, direction, ethertype, protocol, low, high, remote_ip, description)


def _request(
    attrs: Mapping[str, Any],
    direction: str,
    ethertype: str,
    protocol: str | None,
    low: int | None,
    high: int | None,
    remote_ip: str | None,
    description: str,
) -> RuleRequest:
    """The checked values in the Python API's vocabulary (ports as ``N:M``)."""
    icmp = protocol in _ICMP or protocol == "ipv6-icmp"
    dst_port = None
    if not icmp and low is not None:
        dst_port = f"{low}:{high}"
    secfw_protocol = protocol
    if protocol in EXTRA_PROTOCOL_NUMBERS:
        secfw_protocol = str(EXTRA_PROTOCOL_NUMBERS[protocol])
    project = attrs.get("project_id", attrs.get("tenant_id"))
    return RuleRequest(
        security_group_id=str(attrs["security_group_id"]),
        project=str(project) if project is not None else None,
        direction=direction,
        ethertype=ethertype,
        protocol=secfw_protocol,
        dst_port=dst_port,
        icmp_type=low if icmp else None,
        icmp_code=high if icmp else None,
        remote_ip=remote_ip,
        remote_group_id=None if attrs.get("remote_group_id") is None
        else str(attrs["remote_group_id"]),
        description=description,
        protocol_text=protocol,
    )


def _protocol(value: Any) -> str | None:
    """Neutron's ``convert_protocol``: a known name, a number 0-255 (as a string), or None."""
    if value is None:
        return None
    text = str(value).strip().lower() if isinstance(value, str | int) else None
    if text is not None and not isinstance(value, bool):
        if text.isdigit() and int(text) <= 255:
            return str(int(text))
        if text in PROTOCOL_NAMES:
            return None if text == "any" else text
    raise NeutronApiError(
        400, "SecurityGroupRuleInvalidProtocol",
        f"Security group rule protocol {value} not supported. Only protocol values "
        f"{[None, *PROTOCOL_NAMES]} and integer representations [0 to 255] are supported.",
    )


def _port_value(value: Any) -> int | None:
    """Neutron's ``convert_validate_port_value``: None or an integer 0-65535."""
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if isinstance(value, bool) or not 0 <= number <= 65535:
        raise NeutronApiError(
            400, "SecurityGroupInvalidPortValue", f"Invalid value for port {value}"
        )
    return number


def _ethertype(value: Any) -> str:
    if isinstance(value, str):
        for known in ETHERTYPES:
            if known.lower() == value.lower():
                return known
    raise NeutronApiError(
        400, "SecurityGroupRuleInvalidEtherType",
        f"Security group rule for ethertype '{value}' not supported. "
        f"Allowed values are {list(ETHERTYPES)}.",
    )


def _prefix(value: Any) -> str | None:
    """A remote IP prefix as given (a bare address gains its full mask), or None."""
    if value is None or value == "":
        return None
    try:
        network = ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise NeutronApiError(
            400, "InvalidCIDR", f"Invalid CIDR {value} given as IP prefix."
        ) from None
    if "/" not in str(value):
        return f"{value}/{network.max_prefixlen}"
    return str(value)


def _check_port_range(protocol: str | None, low: int | None, high: int | None) -> None:
    """Neutron's ``_validate_port_range``: ports against the protocol."""
    if low is None and high is None:
        return
    if protocol is None:
        raise NeutronApiError(
            400, "SecurityGroupProtocolRequiredWithPorts",
            "Must also specify protocol if port range is given.",
        )
    if protocol in PORT_PROTOCOLS or protocol in ("dccp", "6", "17", "33", "132", "136"):
        if low == 0 or high == 0:
            raise NeutronApiError(400, "SecurityGroupInvalidPortValue", "Invalid value for port 0")
        if low is None or high is None or low > high:
            raise NeutronApiError(
                400, "SecurityGroupInvalidPortRange",
                "For TCP/UDP protocols, port_range_min must be <= port_range_max",
            )
        return
    if protocol in _ICMP or protocol == "ipv6-icmp":
        for value, field, attr in ((low, "type", "port_range_min"),
                                   (high, "code", "port_range_max")):
            if value is not None and not 0 <= value <= 255:
                raise NeutronApiError(
                    400, "SecurityGroupInvalidIcmpValue",
                    f"Invalid value for ICMP {field} ({attr}) {value}. It must be 0 to 255.",
                )
        if low is None:
            raise NeutronApiError(
                400, "SecurityGroupMissingIcmpType",
                f"ICMP code (port-range-max) {high} is provided but ICMP type "
                "(port-range-min) is missing.",
            )
        return
    raise NeutronApiError(
        400, "SecurityGroupInvalidProtocolForPort",
        f"Invalid protocol {protocol} for port range, only supported for "
        "TCP, UDP, UDPLITE, SCTP and DCCP protocols.",
    )


def parse_bool_attr(value: Any, key: str) -> bool:
    """Neutron's ``convert_to_boolean``: true/false (any case), 1/0, or JSON booleans."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise bad_request(f"Invalid input for {key}. Reason: '{value}' cannot be converted to boolean.")


def parse_address_pairs(value: Any) -> list[str]:
    """``allowed_address_pairs`` (a list of ``{"ip_address", "mac_address"?}``) as the
    Python API's ``IP[,MAC]`` strings; the API validates the addresses."""
    if not isinstance(value, list):
        raise bad_request(
            "Invalid input for allowed_address_pairs. Reason: Allowed address pairs "
            "must be a list."
        )
    pairs = []
    for item in value:
        if not isinstance(item, dict) or "ip_address" not in item:
            raise bad_request(
                "Invalid input for allowed_address_pairs. Reason: AllowedAddressPair "
                "must contain ip_address."
            )
        extra = sorted(set(item) - {"ip_address", "mac_address"})
        if extra:
            raise bad_request(
                f"Invalid input for allowed_address_pairs. Reason: Unrecognized "
                f"attribute(s) '{', '.join(extra)}'."
            )
        ip, mac = item["ip_address"], item.get("mac_address")
        pairs.append(f"{ip},{mac}" if mac else str(ip))
    return pairs


def parse_group_ids(value: Any) -> list[str]:
    """A port's ``security_groups``: a list of group ids (Neutron's
    ``convert_to_uuid_list_or_none``); names are not accepted."""
    if not isinstance(value, list):
        raise bad_request("Invalid input for security_groups. Reason: must be a list.")
    for item in value:
        if not is_uuid(item):
            raise NeutronApiError(
                400, "InvalidInput",
                f"Invalid input for operation: '{item}' is not an integer or uuid.",
            )
    return [str(v) for v in value]

"""What the metadata service serves an instance, from the model. Pure: no I/O.

:func:`index_host` maps each port of a host that may reach the service to its
instance's data, keyed as the kernel names the asker: the conntrack mark of the
port's tap (:func:`secfw.compiler.metadata.port_mark`) and the port's own
address. Two ports with the same address on different networks have different
taps, so different keys.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

from secfw.cloud import CloudState
from secfw.compiler.metadata import port_mark
from secfw.model import Instance, Port

_NOT_HOSTNAME = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class InstanceData:
    """Everything the service may tell one instance (asked through ``port``).
    ``public_key`` is None when the instance has no keypair or it was deleted;
    ``user_data`` the decoded bytes, None when the instance has none."""

    uuid: str
    name: str
    hostname: str
    project: str
    local_ipv4: str
    meta: dict[str, str] = field(default_factory=dict)
    key_name: str | None = None
    public_key: str | None = None
    user_data: bytes | None = None


def hostname(name: str) -> str:
    """nova's sanitised host name of a display name: lower case, runs of anything
    but letters, digits and '-' replaced by one '-', trimmed, at most 63
    characters (one DNS label); ``server`` when nothing is left."""
    label = _NOT_HOSTNAME.sub("-", name.lower()).strip("-")[:63].strip("-")
    return label or "server"


def instance_data(cloud: CloudState, instance: Instance, port: Port) -> InstanceData:
    """The data of ``instance`` as asked through ``port``."""
    public_key = None
    if instance.key_name is not None:
        pair_id = cloud.keypair_by_name.get((instance.project, instance.key_name))
        if pair_id is not None:
            public_key = cloud.keypairs[pair_id].public_key
    user_data = None if instance.user_data is None else base64.b64decode(instance.user_data)
    return InstanceData(
        uuid=instance.id, name=instance.name, hostname=hostname(instance.name),
        project=instance.project, local_ipv4=port.ip, meta=dict(instance.metadata),
        key_name=instance.key_name, public_key=public_key, user_data=user_data)


#: (conntrack mark, source address) → the asking instance's data.
HostIndex = dict[tuple[int, str], InstanceData]


def index_host(cloud: CloudState, host: str) -> HostIndex:
    """Every (mark, address) a port of ``host`` with port security asks from, the
    same ports the agent redirects (:func:`secfw.compiler.metadata.metadata_redirect`).
    A key two ports share (a CRC collision of two taps with one address: never
    seen, but possible) is left out: such a request gets nothing."""
    index: HostIndex = {}
    shared: set[tuple[int, str]] = set()
    for instance in cloud.instances.values():
        if instance.host != host:
            continue
        for port in cloud.ports_of(instance.id):
            if not port.port_security:
                continue
            key = (port_mark(port.tap), port.ip)
            if key in index:
                shared.add(key)
            index[key] = instance_data(cloud, instance, port)
    for key in shared:
        del index[key]
    return index

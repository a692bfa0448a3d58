"""The cloud model: plain, frozen, validated data types.

Every object here is immutable; a change is a new object stored under the same id.
Constructors do not validate (they are also used to load trusted data from the
store); the ``parse_*`` and ``check_*`` functions validate untrusted input and raise
:class:`~secfw.errors.ValidationError` with the one line a user should see.

Semantics follow ``docs/semantics.md`` (the nova operations guide, extended by Neutron):

* A :class:`Rule` is an *allow* rule. ``port_min``/``port_max`` are the local
  (destination) port range for tcp/udp, or ICMP type/code for icmp; ``None`` means
  "any" (the nova CLI's ``-1``).
* ``remote_cidr`` and ``remote_group_id`` are mutually exclusive; a rule with
  neither matches any source of its family.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from secfw.constants import PROTOCOL_NUMBERS as PROTOCOL_NUMBERS
from secfw.constants import protocols
from secfw.errors import ValidationError

Direction = Literal["ingress", "egress"]
Ethertype = Literal["IPv4", "IPv6"]

MAX_NAME_LEN = 255
MAC_PREFIX = "fa:16:3e"
TAP_PREFIX = "tap"
TAP_ID_CHARS = 11  # Neutron/nova: "tap" + port_id[:11] fits IFNAMSIZ (16 incl. NUL)

#: nova-network's protocols for the nova-style commands, with their IP numbers.
NOVA_PROTOCOLS: dict[str, int] = protocols("tcp", "udp", "icmp")
#: protocols that carry ports (Neutron's rule model: docs/semantics.md).
PORT_PROTOCOLS = frozenset({"tcp", "udp", "sctp", "udplite"})
#: IANA numbers of the protocol names secfw understands (:mod:`secfw.constants`).

_PROTOCOL_NAMES: dict[int, str] = {}
for _name, _number in PROTOCOL_NUMBERS.items():
    _PROTOCOL_NAMES.setdefault(_number, _name)

DEFAULT_GROUP = "default"
#: The project whose users are the cloud's administrators (flavor management).
ADMIN_PROJECT = "admin"
DEFAULT_QUOTA_SECURITY_GROUPS = 10
DEFAULT_QUOTA_SECURITY_GROUP_RULES = 20
#: nova's default ``floating_ips`` quota: addresses a project may hold at once.
DEFAULT_QUOTA_FLOATING_IPS = 10
#: nova's default ``floating_ips`` quota: addresses a project may hold at once.
DEFAULT_QUOTA_FLOATING_IPS = 10
#: nova's default compute quotas per project.
DEFAULT_QUOTA_INSTANCES = 10
DEFAULT_QUOTA_CORES = 20
DEFAULT_QUOTA_RAM = 51200
#: cinder's default volume quotas per project (gigabytes counts volumes and snapshots).
DEFAULT_QUOTA_VOLUMES = 10
DEFAULT_QUOTA_GIGABYTES = 1000
DEFAULT_QUOTA_SNAPSHOTS = 10
UNLIMITED = -1

DISK_FORMATS = ("ami", "ari", "aki", "vhd", "vmdk", "raw", "qcow2", "vdi", "iso")
#: glance v1's container formats.
CONTAINER_FORMATS = ("ami", "ari", "aki", "bare", "ovf", "ova")
VISIBILITIES = ("public", "private")

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
#: lone surrogates: what Python makes of bytes that are not UTF-8 (surrogateescape)
_SURROGATES = re.compile("[\ud800-\udfff]")


# --------------------------------------------------------------------------- objects


class Record:
    """Mixin: conversion to and from the plain dicts the store keeps."""

    # No attributes of its own: a subclass declared with ``slots=True`` then
    # has no per-record ``__dict__`` (the kinds an agent holds by the ten
    # thousand: Instance, Port); the others keep theirs.
    __slots__ = ()
    KIND: ClassVar[str]
    #: Fields whose values recur across records of the kind (interned by
    #: :meth:`from_doc`); unique values (ids, addresses, names) are not.
    SHARED_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def to_doc(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (tuples become lists)."""
        doc = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in doc.items()}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Any:
        """The inverse of :meth:`to_doc`; unknown keys are ignored (forward compatible).

        Equal to ``cls(**fields)``, built without the generated ``__init__``: a
        frozen dataclass's sets each field through ``object.__setattr__``, the
        bulk of loading a store (18.5k records at 1k ports). Only for the plain
        dataclasses of this module (no ``__post_init__``, every field in
        ``__init__``); a document missing a required field still goes through
        ``__init__`` and fails as before. Nothing is validated here, as before:
        the compiler derives every ruleset name from ids, never from these texts.

        Memory (an agent holds ~30k records at 10,000 ports): the record's
        attribute names are the class's own field-name strings, not the
        document's keys (JSON decodes a fresh copy of every key for every
        document: 156k strings, 9 MB at 10k ports); and the values of the
        fields in ``SHARED_FIELDS`` — ids and words that recur across records,
        such as a port's network — are interned (:func:`sys.intern`), one copy
        each.
        """
        spec = _doc_spec(cls)
        kwargs = {}
        for key, value in doc.items():
            name = spec.names.get(key)
            if name is None:
                continue
            if type(value) is list:
                value = _frozen_list(value)
            elif name in spec.shared and type(value) is str:
                value = sys.intern(value)
            kwargs[name] = value
        if spec.plain and spec.required <= kwargs.keys():
            record = object.__new__(cls)
            if spec.slotted:  # frozen: only object.__setattr__ sets a slot
                fields = spec.defaults | kwargs
                for name, factory in spec.factories.items():
                    if name not in fields:
                        fields[name] = factory()
                for name, value in fields.items():
                    _set(record, name, value)
                return record
            values = record.__dict__
            values.update(spec.defaults)
            for name, factory in spec.factories.items():
                if name not in kwargs:
                    values[name] = factory()
            values.update(kwargs)
            return record
        return cls(**kwargs)


_set = object.__setattr__


def _frozen_list(values: list[Any]) -> tuple[Any, ...]:
    """A document's list as a tuple, its strings interned: the same ids recur in
    thousands of records (an instance's ~20 security groups: 200k copies of
    ~500 ids at 10,000 ports, 17 MB as JSON decodes them), one copy each is kept."""
    return tuple(sys.intern(v) if type(v) is str else v for v in values)


@dataclass(frozen=True)
class _DocSpec:
    """What :meth:`Record.from_doc` needs to know of a record class."""

    #: each field's name, mapped to itself: a document's key → the field's own
    #: string (the one object every record of the class then shares)
    names: dict[str, str]
    required: frozenset[str]
    defaults: dict[str, Any]
    factories: dict[str, Any]
    plain: bool
    #: attributes in slots (``slots=True``), not in a ``__dict__``
    slotted: bool
    shared: frozenset[str]


_DOC_SPECS: dict[type, _DocSpec] = {}


def _doc_spec(cls: type) -> _DocSpec:
    """The :class:`_DocSpec` of ``cls`` (computed once per class)."""
    spec = _DOC_SPECS.get(cls)
    if spec is None:
        fields = dataclasses.fields(cls)
        spec = _DocSpec(
            names={f.name: f.name for f in fields},
            required=frozenset(f.name for f in fields if f.default is dataclasses.MISSING
                               and f.default_factory is dataclasses.MISSING),
            defaults={f.name: f.default for f in fields if f.default is not dataclasses.MISSING},
            factories={f.name: f.default_factory for f in fields
                       if f.default_factory is not dataclasses.MISSING},
            plain=(all(f.init for f in fields) and not hasattr(cls, "__post_init__")
                   and hasattr(cls, "__dataclass_fields__")),
            slotted="__slots__" in cls.__dict__,
            shared=getattr(cls, "SHARED_FIELDS", frozenset()),
        )
        _DOC_SPECS[cls] = spec
    return spec


@dataclass(frozen=True)
class Flavor(Record):
    """A virtual hardware template; ``id`` is the flavor's own (user-given) ID.

    A private flavor (``is_public`` False) is usable by the admin project and the
    projects in ``access`` only. ``extra_specs`` are the key/value pairs a compute
    host must match (the scheduler's business). Flavors are never modified, only
    created and deleted (as the guide says); only ``extra_specs`` and ``access``
    change.
    """

    KIND: ClassVar[str] = "flavor"
    id: str
    name: str
    ram_mb: int
    disk_gb: int
    ephemeral_gb: int
    vcpus: int
    swap_mb: int = 0
    rxtx_factor: float = 1.0
    is_public: bool = True
    extra_specs: dict[str, str] = field(default_factory=dict)
    access: tuple[str, ...] = ()

    def usable_by(self, project: str) -> bool:
        """Public flavors are everyone's; a private one is the admin's and its access list's."""
        return self.is_public or project == ADMIN_PROJECT or project in self.access


#: The default install's five flavors (the guide's ``nova flavor-list``).
FLAVORS: tuple[Flavor, ...] = (
    Flavor("1", "m1.tiny", 512, 1, 0, 1),
    Flavor("2", "m1.small", 2048, 10, 20, 1),
    Flavor("3", "m1.medium", 4096, 10, 40, 2),
    Flavor("4", "m1.large", 8192, 10, 80, 4),
    Flavor("5", "m1.xlarge", 16384, 10, 160, 8),
)


@dataclass(frozen=True)
class Setting(Record):
    """A cloud-wide fact kept in the store (``flavors``: the defaults were seeded)."""

    KIND: ClassVar[str] = "setting"
    id: str
    value: str = ""


@dataclass(frozen=True)
class Keypair(Record):
    """An SSH public key a project registered (or had generated) under a name."""

    KIND: ClassVar[str] = "keypair"
    id: str
    project: str
    name: str
    public_key: str
    fingerprint: str
    type: str = "ssh"
    created: int = 0


@dataclass(frozen=True)
class Network(Record):
    """An IPv4 subnet, optionally with an IPv6 subnet beside it (``cidr6``).

    ``vlan is None`` means flat (shared by every project).
    """

    KIND: ClassVar[str] = "network"
    id: str
    name: str
    cidr: str
    vlan: int | None = None
    project: str | None = None
    cidr6: str | None = None

    @property
    def gateway(self) -> str:
        """The gateway address: the first host of the subnet (``.1``)."""
        return str(ipaddress.ip_network(self.cidr)[1])

    @property
    def gateway6(self) -> str | None:
        """The IPv6 gateway: the first host of ``cidr6`` (``::1``), if any."""
        return str(ipaddress.ip_network(self.cidr6)[1]) if self.cidr6 else None

    @property
    def prefixlen6(self) -> int | None:
        return ipaddress.ip_network(self.cidr6).prefixlen if self.cidr6 else None

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.cidr).prefixlen

    def usable_by(self, project: str) -> bool:
        """Flat networks are shared; a VLAN network belongs to one project."""
        return self.project is None or self.project == project


@dataclass(frozen=True)
class SecurityGroup(Record):
    """A named set of allow rules of one project.

    ``created``/``updated`` are nanoseconds since the epoch (0: stored before
    they were kept); ``revision`` counts the updates of the group itself (the
    Neutron API's ``revision_number``)."""

    KIND: ClassVar[str] = "secgroup"
    SHARED_FIELDS: ClassVar[frozenset[str]] = frozenset({"id", "project"})
    id: str
    project: str
    name: str
    description: str = ""
    created: int = 0
    updated: int = 0
    revision: int = 0


@dataclass(frozen=True)
class Rule(Record):
    """One allow rule of a security group (see module docstring for the fields)."""

    KIND: ClassVar[str] = "rule"
    SHARED_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "group_id", "remote_group_id", "direction", "ethertype", "protocol", "remote_cidr",
        "description", "protocol_text"})
    id: str
    group_id: str
    direction: Direction = "ingress"
    ethertype: Ethertype = "IPv4"
    protocol: str | None = None
    port_min: int | None = None
    port_max: int | None = None
    remote_cidr: str | None = None
    remote_group_id: str | None = None
    #: ICMP code given with an "any" type (nova's ``icmp -1 255``): kept for display,
    #: it matches nothing more than "any ICMP".
    display_max: int | None = None
    #: free text (the Neutron API's ``description``); not part of the rule's meaning.
    description: str = ""
    #: nanoseconds since the epoch (0: stored before it was kept).
    created: int = 0
    #: the protocol as the Neutron API was given it (Neutron shows ``6`` as ``6``,
    #: not ``tcp``); display only, ``protocol`` is what it means. None: not given so.
    protocol_text: str | None = None

    def match_key(self) -> tuple[Any, ...]:
        """The rule's meaning: two rules with equal keys are duplicates."""
        return (
            self.group_id,
            self.direction,
            self.ethertype,
            protocol_number(self.protocol),
            self.port_min,
            self.port_max,
            canonical_remote(self.remote_cidr, self.ethertype),
            self.remote_group_id,
        )


@dataclass(frozen=True)
class Image(Record):
    """A glance image. ``checksum`` (MD5, as glance shows it) and ``sha256`` describe
    the bytes stored for it, if any (the file is named by ``sha256``);
    ``location`` is a reference recorded as given (nothing is downloaded).
    ``properties`` are glance's extra properties (a snapshot's ``image_type``,
    ``instance_uuid``, ``base_image_ref``, ``image_location``)."""

    KIND: ClassVar[str] = "image"
    id: str
    name: str
    project: str
    disk_format: str = "qcow2"
    visibility: str = "private"
    container_format: str = "bare"
    min_disk: int = 0
    min_ram: int = 0
    status: str = "active"
    size: int | None = None
    checksum: str | None = None
    sha256: str | None = None
    location: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    created: int = 0
    updated: int = 0


@dataclass(frozen=True, slots=True)
class Instance(Record):
    """A server. ``metadata`` is nova's key/value metadata; ``user_data`` the
    (base64-encoded) user data given at boot; ``key_name`` the keypair's name
    when booted with one (kept as nova keeps it, even after the keypair goes)."""

    KIND: ClassVar[str] = "instance"
    SHARED_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "id", "project", "flavor", "flavor_id", "image_id", "host", "state", "key_name"})
    id: str
    project: str
    name: str
    flavor: str
    image_id: str
    host: str
    security_groups: tuple[str, ...] = ()
    state: str = "ACTIVE"
    created: int = 0
    flavor_id: str | None = None
    key_name: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    user_data: str | None = None
    updated: int = 0
    #: what the instance consumes (copied from its flavor at boot: the flavor may go);
    #: ``disk_gb`` is 0 when it boots from a volume (the flavor's disk is not used).
    vcpus: int = 0
    ram_mb: int = 0
    disk_gb: int = 0
    #: nova's fault of an instance in ERROR (``{"message": "NoValidHost", "code": 500,
    #: "created": …}``); an instance in ERROR has no host and no port.
    fault: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Port(Record):
    """An instance's interface on a network.

    ``allowed_address_pairs`` holds canonical ``"CIDR"`` or ``"CIDR,MAC"`` strings:
    extra source addresses the port may use (with its own MAC when none is given).
    ``port_security=False`` turns off all filtering and anti-spoofing for the port.
    """

    KIND: ClassVar[str] = "port"
    SHARED_FIELDS: ClassVar[frozenset[str]] = frozenset({"instance_id", "network_id"})
    id: str
    instance_id: str
    network_id: str
    mac: str
    ip: str
    ip6: str | None = None
    port_security: bool = True
    allowed_address_pairs: tuple[str, ...] = ()

    @property
    def tap(self) -> str:
        return tap_name(self.id)

    def address_pairs(self) -> list[tuple[str, str]]:
        """``(cidr, mac)`` of each allowed address pair (the port's MAC when unset)."""
        pairs = []
        for pair in self.allowed_address_pairs:
            cidr, _, mac = pair.partition(",")
            pairs.append((cidr, mac or self.mac))
        return pairs


@dataclass(frozen=True)
class Quota(Record):
    """Per-project limits; ``-1`` means unlimited."""

    KIND: ClassVar[str] = "quota"
    id: str  # the project name
    security_groups: int = DEFAULT_QUOTA_SECURITY_GROUPS
    security_group_rules: int = DEFAULT_QUOTA_SECURITY_GROUP_RULES
    instances: int = DEFAULT_QUOTA_INSTANCES
    cores: int = DEFAULT_QUOTA_CORES
    ram: int = DEFAULT_QUOTA_RAM
    volumes: int = DEFAULT_QUOTA_VOLUMES
    gigabytes: int = DEFAULT_QUOTA_GIGABYTES
    snapshots: int = DEFAULT_QUOTA_SNAPSHOTS
    floating_ips: int = DEFAULT_QUOTA_FLOATING_IPS


#: The quotas of :class:`Quota`, in ``quota-show`` order.
QUOTA_NAMES: tuple[str, ...] = (
    "security_groups", "security_group_rules", "instances", "cores", "ram",
    "volumes", "gigabytes", "snapshots", "floating_ips",
)


@dataclass(frozen=True)
class FloatingPool(Record):
    """A range of public IPv4 addresses (nova's floating pool) projects allocate
    floating IPs from. Created by the admin project; ``cidr`` never overlaps a
    network or another pool."""

    KIND: ClassVar[str] = "floatingpool"
    id: str
    name: str
    cidr: str


@dataclass(frozen=True)
class FloatingIp(Record):
    """A public address a project allocated from a pool; its ``id`` is the address
    itself (an address is allocated at most once).

    While associated, ``port_id`` and ``fixed_ip`` name the instance port and the
    IPv4 address of that port it maps to, one to one: traffic for ``id`` is
    DNATed to ``fixed_ip`` and what the port starts towards outside leaves with
    ``id`` as its source, on the port's host.
    """

    KIND: ClassVar[str] = "floatingip"
    id: str
    project: str
    pool_id: str
    port_id: str | None = None
    fixed_ip: str | None = None

    @property
    def address(self) -> str:
        return self.id


@dataclass(frozen=True)
class Host(Record):
    """A compute host the scheduler may place instances on (``id`` is its name).

    Capacity is what the operator registered; ``properties`` are what a flavor's
    extra_specs are matched against. Instances booted with ``--host`` onto a name
    that is not registered are not scheduled and not counted anywhere.
    """

    KIND: ClassVar[str] = "host"
    id: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    properties: dict[str, str] = field(default_factory=dict)
    created: int = 0


@dataclass(frozen=True)
class Volume(Record):
    """A cinder volume. ``attached_to`` is the one instance it is attached to (None:
    available), on ``device``; a volume booted from (``/dev/vda``) with
    ``delete_on_termination`` goes with its instance."""

    KIND: ClassVar[str] = "volume"
    id: str
    project: str
    name: str | None
    size_gb: int
    description: str | None = None
    snapshot_id: str | None = None
    image_id: str | None = None
    attached_to: str | None = None
    device: str | None = None
    delete_on_termination: bool = False
    created: int = 0

    @property
    def status(self) -> str:
        """The guide's ``cinder list`` prints ``active`` for an unattached volume."""
        return "in-use" if self.attached_to else "active"


@dataclass(frozen=True)
class VolumeSnapshot(Record):
    """A block-level snapshot of a volume (cinder's ``snapshot-create``)."""

    KIND: ClassVar[str] = "volume_snapshot"
    id: str
    project: str
    volume_id: str
    size_gb: int
    name: str | None = None
    description: str | None = None
    created: int = 0


RECORD_TYPES: dict[str, type[Record]] = {
    cls.KIND: cls
    for cls in (
        Network, SecurityGroup, Rule, Image, Instance, Port, Quota, Flavor, Keypair, Setting,
        FloatingPool, FloatingIp,
        Host, Volume, VolumeSnapshot,
    )
}


@dataclass
class Usage:
    """How much of a quota a project uses (for quota-show)."""

    security_groups: int = 0
    rules_by_group: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- parsing


def tap_name(port_id: str) -> str:
    """The tap interface name of a port: ``tap`` + the first 11 characters of its id."""
    return TAP_PREFIX + port_id[:TAP_ID_CHARS]


def check_name(value: str, what: str = "name") -> str:
    """A user-given name: 1-255 characters, not blank, no control characters.

    Names are data: quotes, semicolons and braces are fine; they never reach a
    ruleset (rulesets use generated ids only).
    """
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{what} must not be empty or whitespace only")
    if len(value) > MAX_NAME_LEN:
        raise ValidationError(f"{what} is longer than {MAX_NAME_LEN} characters")
    if _CONTROL_CHARS.search(value):
        raise ValidationError(f"{what} must not contain control characters")
    check_text(value, what)
    return value


def check_text(value: str, what: str) -> str:
    """Text that can be printed and stored as UTF-8 (no bytes that were not UTF-8)."""
    if _SURROGATES.search(value):
        raise ValidationError(f"{what} is not valid UTF-8 text")
    return value


def check_host(value: str) -> str:
    """A compute host name: a non-empty word with no whitespace."""
    check_name(value, "host")
    if any(c.isspace() for c in value):
        raise ValidationError(f"host {value!r} must not contain whitespace")
    return value


def parse_int(text: str | int, what: str) -> int:
    """An integer from user input (``"22"``, ``"-1"``); anything else is an error."""
    if isinstance(text, bool):
        raise ValidationError(f"{what} must be an integer, not {text!r}")
    if isinstance(text, int):
        return text
    stripped = text.strip()
    if not re.fullmatch(r"[+-]?\d+", stripped):
        raise ValidationError(f"{what} must be an integer, not {text!r}")
    return int(stripped)


def protocol_number(protocol: str | None) -> int | None:
    """IP protocol number of a stored protocol (name or decimal string); None = any."""
    if protocol is None:
        return None
    if protocol.isdigit():
        return int(protocol)
    return PROTOCOL_NUMBERS[protocol]


def parse_nova_protocol(text: str) -> str:
    """tcp, udp or icmp, case-insensitive (nova-network's choice)."""
    proto = text.strip().lower()
    if proto not in NOVA_PROTOCOLS:
        raise ValidationError(f"Invalid IP protocol {text}.")
    return proto


def parse_nova_ports(protocol: str, from_text: str, to_text: str) -> tuple[int | None, int | None]:
    """The nova CLI's FROM/TO pair, checked for the protocol, as (min, max).

    tcp/udp: 1 <= from <= to <= 65535. icmp: type and code each -1..255, -1 = any
    (returned as None).
    """
    if protocol == "icmp":
        try:
            icmp_type = parse_int(from_text, "ICMP type")
            icmp_code = parse_int(to_text, "ICMP code")
        except ValidationError:
            raise ValidationError("Type and Code must be integers for ICMP protocol type") from None
        for value, what in ((icmp_type, "type"), (icmp_code, "code")):
            if not -1 <= value <= 255:
                raise ValidationError(f"ICMP {what} {value} is not in the range -1..255")
        return (None if icmp_type == -1 else icmp_type, None if icmp_code == -1 else icmp_code)
    low = parse_int(from_text, "from-port")
    high = parse_int(to_text, "to-port")
    for value in (low, high):
        if not 1 <= value <= 65535:
            raise ValidationError(f"port {value} is not in the range 1..65535")
    if low > high:
        raise ValidationError(f"from-port {low} is greater than to-port {high}")
    return low, high


def parse_cidr(text: str, ethertype: Ethertype = "IPv4") -> str:
    """A CIDR in canonical form. A bare address means a single host (/32 or /128).

    Host bits set (``10.1.2.3/24``) are rejected rather than silently normalised:
    a firewall rule that means something other than what was typed is worse than
    an error, and the message names the network the user probably meant.
    """
    raw = text.strip()
    try:
        network = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise ValidationError(f"{text} is not a valid IP network.") from None
    if network.network_address != ipaddress.ip_interface(raw).ip:
        raise ValidationError(
            f"{text} is not a valid IP network: host bits are set (did you mean {network}?)"
        )
    want = 4 if ethertype == "IPv4" else 6
    if network.version != want:
        raise ValidationError(f"{text} is not an {ethertype} network")
    return str(network)


def canonical_remote(cidr: str | None, ethertype: Ethertype) -> str | None:
    """``0.0.0.0/0`` and ``::/0`` mean the same as no remote at all."""
    if cidr in ("0.0.0.0/0", "::/0"):
        return None
    return cidr


def parse_ipv4_address(text: str, what: str = "address") -> str:
    """One IPv4 address in canonical form (``ValidationError`` otherwise)."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValidationError(f"invalid {what} {text!r}: not an IPv4 address") from None
    if address.version != 4:
        raise ValidationError(f"invalid {what} {text!r}: not an IPv4 address")
    return str(address)


def parse_network_cidr(text: str) -> str:
    """An IPv4 subnet for a network: canonical, with room for at least one instance."""
    cidr = parse_cidr(text, "IPv4")
    if ipaddress.ip_network(cidr).prefixlen > 30:
        raise ValidationError(f"network {cidr} is too small: the prefix must be /30 or shorter")
    return cidr


def parse_vlan(value: str | int) -> int:
    vlan = parse_int(value, "VLAN id")
    if not 1 <= vlan <= 4094:
        raise ValidationError(f"VLAN id {vlan} is not in the range 1..4094")
    return vlan


def parse_quota(value: str | int, what: str) -> int:
    limit = parse_int(value, what)
    if limit < UNLIMITED:
        raise ValidationError(f"{what} must be -1 (unlimited) or a non-negative integer")
    return limit


def parse_disk_format(text: str) -> str:
    fmt = text.strip().lower()
    if fmt not in DISK_FORMATS:
        raise ValidationError(f"disk format {text!r} is not one of {', '.join(DISK_FORMATS)}")
    return fmt


def parse_visibility(text: str) -> str:
    vis = text.strip().lower()
    if vis not in VISIBILITIES:
        raise ValidationError(f"visibility {text!r} is not one of {', '.join(VISIBILITIES)}")
    return vis


def parse_nic(text: str) -> str:
    """``net-id=NET`` (nova's --nic syntax) → NET."""
    key, sep, value = text.partition("=")
    if not sep or key.strip() != "net-id" or not value.strip():
        raise ValidationError(f"--nic {text!r}: expected net-id=NETWORK")
    return value.strip()


def parse_ethertype(text: str) -> Ethertype:
    """IPv4 or IPv6 (case-insensitive)."""
    value = text.strip().lower()
    if value == "ipv4":
        return "IPv4"
    if value == "ipv6":
        return "IPv6"
    raise ValidationError(f"ethertype {text!r} must be IPv4 or IPv6")


def parse_protocol(text: str | None, ethertype: Ethertype) -> str | None:
    """A Neutron-style protocol: a name, a number 0-255, or any (None).

    Known numbers are stored by name so that ``tcp`` and ``6`` are one protocol;
    with IPv6, ``icmp`` means ICMPv6 (as in Neutron). ICMPv6 with IPv4 and ICMP
    (number 1) with IPv6 are rejected as a family mismatch.
    """
    if text is None or text.strip().lower() in ("", "any"):
        return None
    value = text.strip().lower()
    if re.fullmatch(r"\d+", value):
        number = int(value)
        if number > 255:
            raise ValidationError(f"protocol number {number} is not in the range 0..255")
        value = _PROTOCOL_NAMES.get(number, str(number))
    elif value not in PROTOCOL_NUMBERS:
        raise ValidationError(f"Invalid IP protocol {text}.")
    value = "icmpv6" if value == "ipv6-icmp" else value
    if ethertype == "IPv6" and value == "icmp":
        value = "icmpv6"
    if ethertype == "IPv4" and value == "icmpv6":
        raise ValidationError("protocol icmpv6 needs ethertype IPv6")
    return value


def parse_port_range(text: str) -> tuple[int, int]:
    """``N`` or ``N:M`` with 1 <= N <= M <= 65535."""
    low_text, sep, high_text = text.partition(":")
    low = parse_int(low_text, "port")
    high = parse_int(high_text, "port") if sep else low
    for value in (low, high):
        if not 1 <= value <= 65535:
            raise ValidationError(f"port {value} is not in the range 1..65535")
    if low > high:
        raise ValidationError(f"port range {text}: {low} is greater than {high}")
    return low, high


def parse_icmp_field(value: str | int, what: str) -> int:
    number = parse_int(value, what)
    if not 0 <= number <= 255:
        raise ValidationError(f"{what} {number} is not in the range 0..255")
    return number


def parse_network_cidr6(text: str) -> str:
    """An IPv6 subnet for a network: canonical, /64 to /120."""
    cidr = parse_cidr(text, "IPv6")
    if not 64 <= ipaddress.ip_network(cidr).prefixlen <= 120:
        raise ValidationError(f"IPv6 network {cidr}: the prefix must be between /64 and /120")
    return cidr


def parse_mac(text: str) -> str:
    """A unicast MAC address, lower-case, colon-separated."""
    value = text.strip().lower().replace("-", ":")
    if not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", value):
        raise ValidationError(f"{text!r} is not a MAC address")
    if int(value[:2], 16) & 1:
        raise ValidationError(f"{text!r} is a multicast MAC address")
    return value


def parse_address_pair(text: str) -> str:
    """``IP[,MAC]`` or ``CIDR[,MAC]`` → the canonical ``"CIDR[,MAC]"`` form."""
    address, _, mac = text.partition(",")
    try:
        version = ipaddress.ip_network(address.strip(), strict=False).version
    except ValueError:
        raise ValidationError(f"allowed address pair {text!r}: bad IP address") from None
    cidr = parse_cidr(address, "IPv4" if version == 4 else "IPv6")
    return f"{cidr},{parse_mac(mac)}" if mac.strip() else cidr


# ------------------------------------------------- flavors, images, metadata

#: nova's limits: metadata keys and values are at most 255 characters, 128 items.
MAX_METADATA_ITEMS = 128
#: nova's limit on user data: 65535 bytes once base64-encoded.
MAX_USER_DATA_B64 = 65535
#: Flavor IDs: what nova accepts (letters, digits, ``-``, ``_``, ``.``, space), 1-255.
_FLAVOR_ID = re.compile(r"[A-Za-z0-9_.\- ]{1,255}")
_TRUE = ("true", "1", "yes", "on", "t", "y")
_FALSE = ("false", "0", "no", "off", "f", "n")


def parse_flavor_id(text: str) -> str:
    """A flavor ID as the user gave it (not stripped): nova's characters, not blank."""
    if not text.strip() or not _FLAVOR_ID.fullmatch(text):
        raise ValidationError(
            f"flavor ID {text!r} must be 1-255 letters, digits, '-', '_', '.' or spaces"
        )
    return text


def parse_size(value: str | int, what: str, minimum: int = 0) -> int:
    """A whole number of MB/GB/CPUs, at least ``minimum``, at most 2**31 - 1 (nova's)."""
    number = parse_int(value, what)
    if not minimum <= number <= 2**31 - 1:
        raise ValidationError(f"{what} must be an integer from {minimum} to {2**31 - 1}")
    return number


def parse_rxtx_factor(value: str | float) -> float:
    """A positive bandwidth factor (nova: greater than 0)."""
    try:
        factor = float(value)
    except (TypeError, ValueError):
        raise ValidationError(f"rxtx factor must be a number, not {value!r}") from None
    if not 0 < factor <= 3.4e38:  # nova's column is a float; NaN fails both sides
        raise ValidationError(f"rxtx factor must be a positive number, not {value!r}")
    return factor


def parse_bool(value: str | bool, what: str) -> bool:
    """``true``/``false`` (and 1/0, yes/no, on/off), case-insensitive."""
    if isinstance(value, bool):
        return value
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValidationError(f"{what} must be true or false, not {value!r}")


def parse_key_value(text: str, what: str, value_required: bool = True) -> tuple[str, str]:
    """``KEY=VALUE`` (the value may hold ``=``); keys 1-255 characters, values 0-255.

    With ``value_required`` False a bare ``KEY`` is accepted (value ""): the form
    of ``meta … delete KEY`` and ``flavor-key … unset KEY``.
    """
    key, sep, value = text.partition("=")
    if not sep and value_required:
        raise ValidationError(f"{what} {text!r}: expected KEY=VALUE")
    check_name(key, f"{what} key")
    if len(value) > MAX_NAME_LEN:
        raise ValidationError(f"{what} value of {key!r} is longer than {MAX_NAME_LEN} characters")
    if _CONTROL_CHARS.search(value):
        raise ValidationError(f"{what} value of {key!r} must not contain control characters")
    check_text(value, f"{what} value")
    return key, value


def parse_container_format(text: str) -> str:
    fmt = text.strip().lower()
    if fmt not in CONTAINER_FORMATS:
        raise ValidationError(
            f"container format {text!r} is not one of {', '.join(CONTAINER_FORMATS)}"
        )
    return fmt


def parse_location(text: str) -> str:
    """An image location: an absolute URL (``scheme://…``), recorded, never fetched."""
    match = re.fullmatch(r"([a-z][a-z0-9+.\-]*)://\S+", text.strip(), re.IGNORECASE)
    if match is None or len(text) > 2048:
        raise ValidationError(f"location {text!r} is not a URL (scheme://…)")
    check_text(text, "location")
    return text.strip()


# ------------------------------------------------------------------ volumes

#: Guest device names nova accepts for block devices: ``vdb``, ``sdc``, ``xvdb``, ``hda``.
_DEVICE = re.compile(r"(?:/dev/)?((?:x?v|s|h)d[a-z]{1,2})")


def parse_device(text: str) -> str:
    """A guest block device, ``vdb`` or ``/dev/vdb`` → ``/dev/vdb``."""
    match = _DEVICE.fullmatch(text.strip())
    if match is None:
        raise ValidationError(f"device {text!r} is not a block device name like /dev/vdb")
    return "/dev/" + match.group(1)


@dataclass(frozen=True)
class BlockDeviceMapping:
    """One ``--block-device-mapping DEV=ID:[snap]:SIZE:DELETE_ON_TERMINATE``.

    ``snapshot`` True: ``source`` is a volume snapshot, from which a new volume of
    ``size_gb`` (default: the snapshot's size) is made; else ``source`` is a volume.
    """

    device: str
    source: str
    snapshot: bool
    size_gb: int | None
    delete_on_termination: bool


def parse_block_device(text: str) -> BlockDeviceMapping:
    """nova's ``DEV=ID:TYPE:SIZE:DELETE`` (the guide: TYPE is ``snap`` or anything
    else, a blank SIZE is inferred, DELETE is True/1/False/0, blank False)."""
    device, sep, mapping = text.partition("=")
    fields = mapping.split(":")
    if not sep or not fields[0].strip() or len(fields) > 4:
        raise ValidationError(
            f"--block-device-mapping {text!r}: expected DEV=ID:[snap]:SIZE:DELETE_ON_TERMINATE")
    fields += [""] * (4 - len(fields))
    source, kind, size, delete = (f.strip() for f in fields)
    check_name(source, "block device ID")
    size_gb = parse_size(size, "block device size", 1) if size else None
    return BlockDeviceMapping(parse_device(device), source, kind == "snap", size_gb,
                              parse_bool(delete, "delete-on-terminate") if delete else False)

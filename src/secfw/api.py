"""The Python API: every operation of the nova-style CLI, over a store.

The CLI is a thin layer over :class:`Api`; tests and benchmarks call it directly.
Each public method is one serialisable transaction: it validates everything
first, raises a :class:`~secfw.errors.SecfwError` subclass on bad input, and then
either stores all of its changes or none. ``with api.batch():`` groups many
operations into one transaction (a 10,000-instance cloud is built that way).

Projects are implicit: a project exists once something was created in it, and
its ``default`` security group is created on first use.
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import wraps
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from secfw.cloud import CloudState, first_free, free_addresses
from secfw.errors import (
    ConflictError,
    ForbiddenError,
    InUseError,
    NotFoundError,
    QuotaError,
    ValidationError,
)
from secfw.model import (
    ADMIN_PROJECT,
    DEFAULT_GROUP,
    FLAVORS,
    MAC_PREFIX,
    MAX_METADATA_ITEMS,
    MAX_USER_DATA_B64,
    PORT_PROTOCOLS,
    QUOTA_NAMES,
    UNLIMITED,
    BlockDeviceMapping,
    Direction,
    Ethertype,
    Flavor,
    FloatingIp,
    FloatingPool,
    Host,
    Image,
    Instance,
    Keypair,
    Network,
    Port,
    Quota,
    Rule,
    SecurityGroup,
    Setting,
    Volume,
    VolumeSnapshot,
    check_host,
    check_name,
    check_text,
    parse_address_pair,
    parse_block_device,
    parse_bool,
    parse_cidr,
    parse_container_format,
    parse_device,
    parse_disk_format,
    parse_ethertype,
    parse_flavor_id,
    parse_icmp_field,
    parse_ipv4_address,
    parse_key_value,
    parse_location,
    parse_network_cidr,
    parse_network_cidr6,
    parse_nova_ports,
    parse_nova_protocol,
    parse_port_range,
    parse_protocol,
    parse_quota,
    parse_rxtx_factor,
    parse_size,
    parse_visibility,
    parse_vlan,
    tap_name,
)
from secfw.paging import Page, read_page, slice_page
from secfw.scheduler import (
    Demand,
    HostUsage,
    check_quota,
    choose_host,
    compute_usage,
    host_fits,
    host_usage,
    required_properties,
    volume_usage,
)
from secfw.store.base import Store, WriteTxn, retry_conflicts
from secfw.store.indexes import EVERY, group_bucket, server_bucket

if TYPE_CHECKING:
    # Image bytes (tempfile, hashlib, shutil, fcntl) are for the image commands only:
    # imported where used, so a security-group command does not load them.
    from secfw.imagefiles import ByteSource, ImageFiles

#: nova's ``image`` of a server booted from a volume.
BOOT_FROM_VOLUME = "Attempt to boot from volume - no image supplied"


def new_id() -> str:
    return str(uuid.uuid4())


def new_port_id() -> str:
    """A new port id (its first 11 characters name the port's tap)."""
    return new_id()


@dataclass(frozen=True)
class PortView:
    """A port with what an operator needs to see next to it (``port-list``)."""

    id: str
    instance: str
    instance_id: str
    project: str
    host: str
    network: str
    tap: str
    mac: str
    ip: str
    security_groups: tuple[str, ...]
    ip6: str | None = None
    port_security: bool = True
    allowed_address_pairs: tuple[str, ...] = ()


P = ParamSpec("P")
R = TypeVar("R")


def _retried(method: Callable[Concatenate[Api, P], R]) -> Callable[Concatenate[Api, P], R]:
    """Run an Api operation again when its transaction lost an optimistic-
    concurrency race (etcd; see :func:`secfw.store.base.retry_conflicts`).

    Only the outermost operation retries: inside a :meth:`Api.batch` the
    conflict belongs to the caller's whole batch, which alone can re-run it."""

    @wraps(method)
    def run(api: Api, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if api._state is not None:
            return method(api, *args, **kwargs)
        return retry_conflicts(lambda: method(api, *args, **kwargs), what=method.__name__)

    return run


class Api:
    """Operations on the cloud model stored in ``store``.

    Every public operation is one transaction; on a store with optimistic
    concurrency (etcd) it is re-run a bounded number of times when another
    writer committed first, then fails with a StoreError (exit 7)."""

    def __init__(self, store: Store, image_files: ImageFiles | None = None) -> None:
        self.store = store
        self._state: CloudState | None = None
        self._image_files = image_files

    @property
    def image_files(self) -> ImageFiles:
        """Where image bytes go (by default beside the store: :mod:`secfw.imagefiles`)."""
        if self._image_files is None:
            from secfw.imagefiles import ImageFiles, directory_for

            self._image_files = ImageFiles(directory_for(self.store))
        return self._image_files

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def batch(self) -> Iterator[CloudState]:
        """One write transaction; nested calls join the outer one."""
        if self._state is not None:
            yield self._state
            return
        with self.store.write() as txn:
            state = CloudState.lazy(txn.snapshot)
            self._state = state
            try:
                yield state
            finally:
                self._state = None
            _persist(txn, state)

    def snapshot(self) -> CloudState:
        """The current cloud, read-only (inside a batch: the batch's state)."""
        if self._state is not None:
            return self._state
        return CloudState.from_snapshot(self.store.load())

    @contextmanager
    def keyed_read(self) -> Iterator[CloudState]:
        """A read-only state that reads by key, like a write's (a command that
        shows one record need not load the cloud): a write transaction that
        writes nothing, so nothing is committed (inside a batch: the batch's)."""
        if self._state is not None:
            yield self._state
            return
        with self.store.write() as txn:
            yield CloudState.lazy(txn.snapshot)

    def _read(self, project: str | None = None) -> CloudState:
        """A snapshot in which ``project``'s default group exists (created on first use)."""
        state = self.snapshot()
        if project is not None and (project, DEFAULT_GROUP) not in state.group_by_name:
            with self.batch() as state:
                self._ensure_project(state, project)
        return state

    # ------------------------------------------------------------------ security groups

    @_retried
    def secgroup_list(self, project: str, all_projects: bool = False) -> list[SecurityGroup]:
        state = self._read(check_name(project, "project"))
        groups: Iterable[SecurityGroup] = state.groups.values()
        if not all_projects:
            groups = [g for g in groups if g.project == project]
        return sorted(groups, key=lambda g: (g.project, g.name != DEFAULT_GROUP, g.name, g.id))

    @_retried
    def secgroup_create(self, project: str, name: str, description: str) -> SecurityGroup:
        check_name(project, "project")
        check_name(name, "security group name")
        _check_description(description)
        with self.batch() as state:
            self._ensure_project(state, project)
            if (project, name) in state.group_by_name:
                raise ConflictError(
                    f"Security group {name!r} already exists in project {project!r}"
                )
            self._check_group_quota(state, project)
            now = time.time_ns()
            group = SecurityGroup(new_id(), project, name, description, now, now)
            state.put(group)
            return group

    @_retried
    def secgroup_update(
        self, project: str, group: str, name: str, description: str
    ) -> SecurityGroup:
        check_name(name, "security group name")
        _check_description(description)
        with self.batch() as state:
            current = self._group(state, project, group)
            if current.name == DEFAULT_GROUP and name != DEFAULT_GROUP:
                raise ValidationError("the default security group cannot be renamed")
            if name != current.name and (project, name) in state.group_by_name:
                raise ConflictError(
                    f"Security group {name!r} already exists in project {project!r}"
                )
            updated = replace(
                current,
                name=name,
                description=description,
                updated=time.time_ns(),
                revision=current.revision + 1,
            )
            if updated == replace(current, updated=updated.updated, revision=updated.revision):
                return current  # nothing changed: no write, no new revision
            state.put(updated)
            return updated

    @_retried
    def secgroup_delete(self, project: str, group: str, *, allow_default: bool = False) -> None:
        """Delete a group that no instance and no other group's rule uses.

        The default group is refused unless ``allow_default`` (Neutron lets an
        admin delete it; the project's next request creates a new one).
        """
        with self.batch() as state:
            target = self._group(state, project, group)
            if target.name == DEFAULT_GROUP and not allow_default:
                raise ValidationError("the default security group cannot be deleted")
            users = state.group_members(target.id)
            if users:
                names = ", ".join(sorted(i.name for i in users)[:3])
                raise InUseError(f"Security group {target.name!r} is in use by instances: {names}")
            referrers = sorted(
                state.groups[state.rules[r].group_id].name
                for r in state.rules_by_remote.get(target.id, ())
                if state.rules[r].group_id != target.id
            )
            if referrers:
                raise InUseError(
                    f"Security group {target.name!r} is the source group of rules in: "
                    + ", ".join(sorted(set(referrers)))
                )
            for rule in list(state.rules_by_group.get(target.id, {}).values()):
                state.remove(rule)
            state.remove(target)

    @_retried
    def secgroup_list_rules(self, project: str, group: str) -> list[Rule]:
        state = self.snapshot()
        if group == DEFAULT_GROUP and (project, DEFAULT_GROUP) not in state.group_by_name:
            # Create the default group only when the lookup will succeed: a failed
            # command must not change the store.
            state = self._read(check_name(project, "project"))
        target = self._group(state, project, group)
        return _sorted_rules(state.rules_by_group.get(target.id, {}).values())

    def group_names(self, group_ids: Iterable[str]) -> dict[str, str]:
        """The names of those of ``group_ids`` that exist, read by key (for display)."""
        wanted = sorted(set(group_ids))
        if not wanted:
            return {}
        with self.keyed_read() as state:
            state.prefetch(SecurityGroup.KIND, wanted)
            return {g: state.groups[g].name for g in wanted if g in state.groups}

    def group_name(self, group_id: str | None) -> str:
        """The name of a group by id ("" for None), for display."""
        if group_id is None:
            return ""
        return self.group_names([group_id]).get(group_id, group_id)

    # ------------------------------------------------------------------ rules (nova style)

    @_retried
    def secgroup_add_rule(
        self, project: str, group: str, protocol: str, from_port: str, to_port: str, cidr: str
    ) -> Rule:
        proto, low, high, display = _nova_match(protocol, from_port, to_port)
        remote = parse_cidr(cidr, "IPv4")
        with self.batch() as state:
            target = self._group(state, project, group)
            rule = Rule(
                new_id(), target.id, "ingress", "IPv4", proto, low, high, remote, None, display,
                created=time.time_ns(),
            )
            self._add_rule(state, target, rule)
            return rule

    @_retried
    def secgroup_delete_rule(
        self, project: str, group: str, protocol: str, from_port: str, to_port: str, cidr: str
    ) -> Rule:
        proto, low, high, _ = _nova_match(protocol, from_port, to_port)
        remote = parse_cidr(cidr, "IPv4")
        with self.batch() as state:
            target = self._group(state, project, group)
            probe = Rule("", target.id, "ingress", "IPv4", proto, low, high, remote, None)
            return self._remove_matching(state, target, probe)

    @_retried
    def secgroup_add_group_rule(
        self,
        project: str,
        group: str,
        source_group: str,
        protocol: str | None = None,
        from_port: str | None = None,
        to_port: str | None = None,
    ) -> Rule:
        proto, low, high, display = _optional_nova_match(protocol, from_port, to_port)
        with self.batch() as state:
            target = self._group(state, project, group)
            source = self._group(state, project, source_group, "Source group")
            rule = Rule(
                new_id(), target.id, "ingress", "IPv4", proto, low, high, None, source.id, display,
                created=time.time_ns(),
            )
            self._add_rule(state, target, rule)
            return rule

    @_retried
    def secgroup_delete_group_rule(
        self,
        project: str,
        group: str,
        source_group: str,
        protocol: str | None = None,
        from_port: str | None = None,
        to_port: str | None = None,
    ) -> Rule:
        proto, low, high, _ = _optional_nova_match(protocol, from_port, to_port)
        with self.batch() as state:
            target = self._group(state, project, group)
            source = self._group(state, project, source_group, "Source group")
            probe = Rule("", target.id, "ingress", "IPv4", proto, low, high, None, source.id)
            return self._remove_matching(state, target, probe)

    # ------------------------------------------------------------------ rules (Neutron style)

    @_retried
    def rule_create(
        self,
        project: str,
        group: str,
        direction: str = "ingress",
        ethertype: str = "IPv4",
        protocol: str | None = None,
        dst_port: str | None = None,
        icmp_type: str | int | None = None,
        icmp_code: str | int | None = None,
        remote_ip: str | None = None,
        remote_group: str | None = None,
        description: str = "",
        protocol_text: str | None = None,
    ) -> Rule:
        """The openstack-client form of a rule (see ``docs/semantics.md``).

        Rejected: ports with a portless protocol, ICMP fields with a non-ICMP
        protocol, a code without a type, a remote of the other family, both a
        remote IP and a remote group, and duplicates (``tcp`` equals ``6``,
        ``0.0.0.0/0`` equals no remote). ``protocol_text`` is kept for display
        only (the Neutron API shows a protocol as it was given).
        """
        match = _neutron_match(direction, ethertype, protocol, dst_port, icmp_type, icmp_code)
        if remote_ip is not None and remote_group is not None:
            raise ValidationError("give --remote-ip or --remote-group, not both")
        remote = parse_cidr(remote_ip, match.ethertype) if remote_ip is not None else None
        _check_description(description)
        with self.batch() as state:
            target = self._group(state, project, group)
            source = (
                self._group(state, project, remote_group, "Remote group")
                if remote_group is not None
                else None
            )
            rule = Rule(
                new_id(),
                target.id,
                match.direction,
                match.ethertype,
                match.protocol,
                match.port_min,
                match.port_max,
                remote,
                source.id if source else None,
                description=description,
                created=time.time_ns(),
                protocol_text=protocol_text,
            )
            self._add_rule(state, target, rule)
            return rule

    def rule_find(
        self,
        project: str,
        group: str,
        direction: str = "ingress",
        ethertype: str = "IPv4",
        protocol: str | None = None,
        dst_port: str | None = None,
        icmp_type: str | int | None = None,
        icmp_code: str | int | None = None,
        remote_ip: str | None = None,
        remote_group: str | None = None,
    ) -> Rule | None:
        """The rule of ``group`` that means what :meth:`rule_create` with these
        arguments would mean (its duplicate), or None. Validates as rule_create."""
        match = _neutron_match(direction, ethertype, protocol, dst_port, icmp_type, icmp_code)
        remote = parse_cidr(remote_ip, match.ethertype) if remote_ip is not None else None
        state = self.snapshot()
        target = self._group(state, project, group)
        source = (
            self._group(state, project, remote_group, "Remote group").id
            if remote_group is not None
            else None
        )
        probe = Rule("", target.id, match.direction, match.ethertype, match.protocol,
                     match.port_min, match.port_max, remote, source)
        key = probe.match_key()
        found = [r for r in state.rules_by_group.get(target.id, {}).values()
                 if r.match_key() == key]
        return found[0] if found else None

    @_retried
    def rule_update(self, project: str, rule_id: str, description: str) -> Rule:
        """Change a rule's description (the only thing of a rule that changes)."""
        _check_description(description)
        with self.batch() as state:
            rule = state.rules.get(rule_id)
            if rule is None or state.groups[rule.group_id].project != project:
                raise NotFoundError(f"security group rule {rule_id!r} not found")
            updated = replace(rule, description=description)
            state.put(updated)
            return updated

    def rule_list(self, project: str, group: str | None = None) -> list[Rule]:
        """Every rule of the project's groups, or of one group."""
        state = self.snapshot()
        if group is not None:
            groups = [self._group(state, project, group).id]
        else:
            groups = [g.id for g in state.groups.values() if g.project == project]
        return _sorted_rules(r for g in groups for r in state.rules_by_group.get(g, {}).values())

    @_retried
    def rule_delete(self, project: str, rule_id: str) -> Rule:
        with self.batch() as state:
            rule = state.rules.get(rule_id)
            if rule is None or state.groups[rule.group_id].project != project:
                raise NotFoundError(f"security group rule {rule_id!r} not found")
            state.remove(rule)
            return rule

    # ------------------------------------------------------------------ ports

    @_retried
    def port_update(
        self,
        project: str,
        port: str,
        allowed_address_pairs: Sequence[str] | None = None,
        port_security: bool | None = None,
    ) -> Port:
        """Replace a port's allowed address pairs and/or switch its port security.

        A port without port security has no filtering at all, so it cannot also
        carry address pairs (as in Neutron): that combination is rejected.
        """
        pairs = None
        if allowed_address_pairs is not None:
            pairs = tuple(dict.fromkeys(parse_address_pair(p) for p in allowed_address_pairs))
        if pairs is None and port_security is None:
            raise ValidationError(
                "nothing to update: give --allowed-address-pair, "
                "--no-allowed-address-pairs or --[no-]port-security"
            )
        with self.batch() as state:
            current = self._port(state, project, port)
            updated = replace(
                current,
                allowed_address_pairs=current.allowed_address_pairs if pairs is None else pairs,
                port_security=current.port_security if port_security is None else port_security,
            )
            if not updated.port_security and updated.allowed_address_pairs:
                raise ConflictError(
                    "a port without port security cannot have allowed address "
                    "pairs; remove them first"
                )
            state.put(updated)
            return updated

    @_retried
    def port_set_groups(self, project: str, port: str, groups: Sequence[str]) -> Instance:
        """Make ``groups`` (names or ids of the project's groups; may be empty) the
        security groups of ``port``.

        secfw keeps security groups per instance (nova's model), so this sets
        them for every port of the port's instance: the Neutron API's
        ``PUT /v2.0/ports/ID {"port": {"security_groups": [...]}}``.
        """
        with self.batch() as state:
            current = self._port(state, project, port)
            instance = state.instances[current.instance_id]
            ids = tuple(dict.fromkeys(self._group(state, project, g).id for g in groups))
            if ids == instance.security_groups:
                return instance
            updated = _with_groups(instance, ids)
            state.put(updated)
            return updated

    @staticmethod
    def _port(state: CloudState, project: str, ref: str) -> Port:
        """A port of the project by id, or by tap name."""
        for port in state.ports.values():
            if ref in (port.id, port.tap) and state.instances[port.instance_id].project == project:
                return port
        raise NotFoundError(f"port {ref!r} not found")

    def _add_rule(self, state: CloudState, group: SecurityGroup, rule: Rule) -> None:
        existing = state.rules_by_group.get(group.id, {})
        key = rule.match_key()
        if any(r.match_key() == key for r in existing.values()):
            raise ConflictError(f"This rule already exists in group {group.name!r}")
        limit = state.quota(group.project).security_group_rules
        if limit != UNLIMITED and len(existing) >= limit:
            raise QuotaError(
                f"Quota exceeded for security_group_rules: {len(existing)} of {limit} "
                f"used in group {group.name!r}"
            )
        state.put(rule)

    @staticmethod
    def _remove_matching(state: CloudState, group: SecurityGroup, probe: Rule) -> Rule:
        key = probe.match_key()
        for rule in state.rules_by_group.get(group.id, {}).values():
            if rule.match_key() == key:
                state.remove(rule)
                return rule
        raise NotFoundError(f"Rule not found in security group {group.name!r}")

    # ------------------------------------------------------------------ networks

    @_retried
    def net_create(
        self,
        project: str,
        name: str,
        cidr: str,
        vlan: str | int | None = None,
        cidr6: str | None = None,
    ) -> Network:
        """A network with an IPv4 subnet and optionally an IPv6 one beside it."""
        check_name(project, "project")
        check_name(name, "network name")
        canonical = parse_network_cidr(cidr)
        canonical6 = parse_network_cidr6(cidr6) if cidr6 is not None else None
        vlan_id = parse_vlan(vlan) if vlan is not None else None
        with self.batch() as state:
            self._check_network_unique(state, name, canonical, vlan_id)
            _check_outside_pools(state, canonical)
            if canonical6:
                self._check_network_unique(state, name, canonical6, vlan_id, check_vlan=False)
            network = Network(
                new_id(), name, canonical, vlan_id, project if vlan_id else None, canonical6
            )
            state.put(network)
            return network

    @staticmethod
    def _check_network_unique(state: CloudState, name: str, cidr: str, vlan: int | None,
                              check_vlan: bool = True) -> None:
        """Refuse a second network called ``name``, a VLAN already in use and an
        address overlap — except between two VLAN (project-private) networks,
        which may overlap as Neutron's tenant networks may: each is its own
        layer-2 segment and address space. A flat network is shared by every
        project and routed by the host with no notion of segment, and a floating
        pool (``vlan`` None here too) is public: an address in either must name
        one place, so nothing may overlap them (docs/semantics.md, "Overlapping
        networks")."""
        new = ipaddress.ip_network(cidr)
        for other in state.networks.values():
            if other.name == name:
                raise ConflictError(f"network {name!r} already exists")
            private = vlan is not None and other.vlan is not None
            for theirs in filter(None, (other.cidr, other.cidr6)):
                if not private and new.version == ipaddress.ip_network(theirs).version \
                        and new.overlaps(ipaddress.ip_network(theirs)):
                    raise ConflictError(
                        f"network {cidr} overlaps network {other.name!r} ({theirs})"
                        + ("" if other.vlan is None else "; only two VLAN networks may overlap")
                    )
            if check_vlan and vlan is not None and other.vlan == vlan:
                raise ConflictError(f"VLAN {vlan} is already used by network {other.name!r}")

    def net_list(self, project: str, all_projects: bool = False) -> list[Network]:
        state = self.snapshot()
        nets = [n for n in state.networks.values() if all_projects or n.usable_by(project)]
        return sorted(nets, key=lambda n: (n.name, n.id))

    # ------------------------------------------------------------------ flavors

    def flavor_list(self, project: str = ADMIN_PROJECT) -> list[Flavor]:
        """The flavors ``project`` may boot, by ID (numeric IDs in numeric order)."""
        with self.keyed_read() as state:
            flavors = visible_flavors(state).values()
            return sorted((f for f in flavors if f.usable_by(project)), key=_flavor_order)

    def flavor_show(self, project: str, flavor: str) -> Flavor:
        with self.keyed_read() as state:
            return _flavor(state, project, flavor)

    @_retried
    def flavor_create(
        self,
        project: str,
        name: str,
        flavor_id: str,
        ram_mb: str | int,
        disk_gb: str | int,
        vcpus: str | int,
        ephemeral_gb: str | int = 0,
        swap_mb: str | int = 0,
        rxtx_factor: str | float = 1.0,
        is_public: str | bool = True,
    ) -> Flavor:
        """A new flavor (admin only). ``flavor_id`` ``auto`` means a generated UUID."""
        _require_admin(project, "create flavors")
        check_name(name, "flavor name")
        new_flavor_id = new_id() if flavor_id == "auto" else parse_flavor_id(flavor_id)
        flavor = Flavor(
            new_flavor_id,
            name,
            parse_size(ram_mb, "memory (MB)", 1),
            parse_size(disk_gb, "disk (GB)"),
            parse_size(ephemeral_gb, "ephemeral disk (GB)"),
            parse_size(vcpus, "VCPUs", 1),
            parse_size(swap_mb, "swap (MB)"),
            parse_rxtx_factor(rxtx_factor),
            parse_bool(is_public, "is-public"),
        )
        with self.batch() as state:
            _seed_flavors(state)
            for other in state.flavors.values():
                if other.name == name:
                    raise ConflictError(f"Flavor with name {name} already exists.")
                if other.id == flavor.id:
                    raise ConflictError(f"Flavor with ID {flavor.id} already exists.")
            state.put(flavor)
            return flavor

    @_retried
    def flavor_delete(self, project: str, flavor: str) -> Flavor:
        """Delete a flavor (admin only). Instances booted with it keep its name and ID."""
        _require_admin(project, "delete flavors")
        with self.batch() as state:
            _seed_flavors(state)
            target = _flavor(state, project, flavor)
            state.remove(target)
            return target

    @_retried
    def flavor_key(self, project: str, flavor: str, action: str, pairs: Sequence[str]) -> Flavor:
        """``set`` K=V… or ``unset`` K… of a flavor's extra_specs (admin only)."""
        _require_admin(project, "change flavor extra_specs")
        if action not in ("set", "unset"):
            raise ValidationError(f"action {action!r} must be set or unset")
        if not pairs:
            raise ValidationError("give at least one KEY=VALUE (set) or KEY (unset)")
        items = [parse_key_value(p, "extra_spec", action == "set") for p in pairs]
        if action == "unset" and any("=" in p for p in pairs):
            raise ValidationError("unset takes keys only (KEY, not KEY=VALUE)")
        with self.batch() as state:
            _seed_flavors(state)
            target = _flavor(state, project, flavor)
            specs = dict(target.extra_specs)
            for key, value in items:
                if action == "set":
                    specs[key] = value
                elif key not in specs:
                    raise NotFoundError(f"Flavor {target.id} has no extra specs with key {key}.")
                else:
                    del specs[key]
            updated = replace(target, extra_specs=specs)
            state.put(updated)
            return updated

    @_retried
    def flavor_access(self, project: str, flavor: str, tenant: str, add: bool) -> Flavor:
        """Give (``add``) or take away a project's access to a private flavor (admin only)."""
        _require_admin(project, "change flavor access")
        check_name(tenant, "project")
        with self.batch() as state:
            _seed_flavors(state)
            target = _flavor(state, project, flavor)
            if target.is_public:
                raise ConflictError("Can not add access to a public flavor." if add else
                                    "Can not remove access from a public flavor.")
            if add and tenant in target.access:
                raise ConflictError(
                    f"Flavor access already exists for flavor {target.id} and project {tenant}."
                )
            if not add and tenant not in target.access:
                raise NotFoundError(f"Flavor access not found for {target.id} / {tenant}.")
            access = (*target.access, tenant) if add else tuple(
                t for t in target.access if t != tenant)
            updated = replace(target, access=access)
            state.put(updated)
            return updated

    def flavor_access_list(self, project: str, flavor: str) -> list[tuple[str, str]]:
        """``(flavor ID, project)`` of each project given access to a private flavor."""
        _require_admin(project, "list flavor access")
        with self.keyed_read() as state:
            target = _flavor(state, project, flavor)
            if target.is_public:
                raise ConflictError("Access list not available for public flavors.")
            return [(target.id, tenant) for tenant in target.access]

    # ------------------------------------------------------------------ keypairs

    @_retried
    def keypair_add(
        self, project: str, name: str, public_key: bytes | str | None = None
    ) -> tuple[Keypair, str | None]:
        """Register ``public_key``, or generate a pair: ``(keypair, private key PEM)``.

        The private key is returned once (generated pairs only) and never stored.
        """
        # Imported here: it loads cryptography (~0.3 s), which no other operation
        # needs (the agent registers its host through this module).
        from secfw import keypairs

        check_name(project, "project")
        check_name(name, "keypair name")
        private = None
        if public_key is None:
            public, private = keypairs.generate()
        else:
            public = keypairs.check_public_key(public_key)
        with self.batch() as state:
            if (project, name) in state.keypair_by_name:
                raise ConflictError(f"Key pair '{name}' already exists.")
            used = sum(1 for k in state.keypairs.values() if k.project == project)
            if used >= MAX_KEYPAIRS:
                raise QuotaError(
                    f"Quota exceeded for key_pairs: {used} of {MAX_KEYPAIRS} used in "
                    f"project {project!r}"
                )
            pair = Keypair(new_id(), project, name, public, keypairs.fingerprint(public),
                           "ssh", time.time_ns())
            state.put(pair)
            return pair, private

    def keypair_list(self, project: str) -> list[Keypair]:
        with self.keyed_read() as state:
            return sorted((k for k in state.keypairs.values() if k.project == project),
                          key=lambda k: k.name)

    def keypair_show(self, project: str, name: str) -> Keypair:
        with self.keyed_read() as state:
            return _keypair(state, project, name)

    @_retried
    def keypair_delete(self, project: str, name: str) -> Keypair:
        """Delete a keypair; instances booted with it keep its name (as nova does)."""
        with self.batch() as state:
            pair = _keypair(state, project, name)
            state.remove(pair)
            return pair

    # ------------------------------------------------------------------ images

    def image_create(
        self,
        project: str,
        name: str,
        disk_format: str = "qcow2",
        visibility: str = "private",
        *,
        container_format: str = "bare",
        min_disk: str | int = 0,
        min_ram: str | int = 0,
        properties: Sequence[str] = (),
        location: str | None = None,
        data: ByteSource | None = None,
    ) -> Image:
        """Register an image; with ``data``, its bytes are stored (see :mod:`secfw.imagefiles`).

        ``location`` is recorded as given, never fetched; it excludes ``data``.
        Only the record's transaction is re-run on a lost race (etcd): the bytes
        are read once.
        """
        check_name(project, "project")
        check_name(name, "image name")
        now = time.time_ns()
        image = Image(
            new_id(), name, project, parse_disk_format(disk_format), parse_visibility(visibility),
            parse_container_format(container_format), parse_size(min_disk, "min-disk (GB)"),
            parse_size(min_ram, "min-ram (MB)"), "active",
            location=parse_location(location) if location is not None else None,
            properties=_properties({}, properties), created=now, updated=now,
        )
        if data is not None and location is not None:
            raise ValidationError("give image data or --location, not both")
        if data is None:
            return self._put_image(project, image)
        with self.image_files.locked():
            stored = self.image_files.add(data, MAX_IMAGE_BYTES)
            image = replace(image, size=stored.size, checksum=stored.checksum,
                            sha256=stored.sha256)
            try:
                return self._put_image(project, image)
            except BaseException:
                if not self._image_file_used(stored.sha256):
                    self.image_files.remove(stored.sha256)
                raise

    @_retried
    def _put_image(self, project: str, image: Image) -> Image:
        with self.batch() as state:
            self._check_image_name(state, project, image.name, image.id)
            state.put(image)
            return image

    def _image_file_used(self, sha256: str) -> bool:
        with self.keyed_read() as state:  # the images, not the whole store
            return any(i.sha256 == sha256 for i in state.images.values())

    @staticmethod
    def _check_image_name(state: CloudState, project: str, name: str, image_id: str) -> None:
        if any(i.name == name and i.id != image_id for i in _visible_images(state, project)):
            raise ConflictError(f"image {name!r} already exists")

    @_retried
    def image_snapshot(self, project: str, server: str, name: str) -> Image:
        """nova's ``image-create SERVER NAME``: an image of the instance, marked as a
        snapshot in its properties (as the guide lists them)."""
        check_name(name, "image name")
        with self.batch() as state:
            instance = self._instance(state, project, server)
            _check_active(instance, "snapshot")
            base = state.images.get(instance.image_id)
            flavor = visible_flavors(state).get(instance.flavor_id or "")
            now = time.time_ns()
            image = Image(
                new_id(), name, project,
                base.disk_format if base else "qcow2", "private",
                base.container_format if base else "bare",
                max(base.min_disk if base else 0, flavor.disk_gb if flavor else 0),
                base.min_ram if base else 0, "active",
                properties={
                    "image_type": "snapshot",
                    "instance_uuid": instance.id,
                    "base_image_ref": instance.image_id,
                    "image_location": "snapshot",
                    "owner_id": project,
                },
                created=now, updated=now,
            )
            self._check_image_name(state, project, name, image.id)
            state.put(image)
            return image

    def image_list(self, project: str) -> list[Image]:
        with self.keyed_read() as state:
            return sorted(_visible_images(state, project), key=lambda i: (i.name, i.id))

    def image_show(self, project: str, image: str) -> Image:
        with self.keyed_read() as state:
            return _image(state, project, image)

    @_retried
    def image_update(
        self,
        project: str,
        image: str,
        *,
        name: str | None = None,
        disk_format: str | None = None,
        container_format: str | None = None,
        min_disk: str | int | None = None,
        min_ram: str | int | None = None,
        visibility: str | None = None,
        properties: Sequence[str] = (),
        purge_props: bool = False,
    ) -> Image:
        """Change an image's attributes (its owner, or the admin project, only).

        ``properties`` are set (KEY=VALUE); ``purge_props`` first drops every
        property not given. The bytes of an image never change.
        """
        changes: dict[str, Any] = {}
        if name is not None:
            changes["name"] = check_name(name, "image name")
        if disk_format is not None:
            changes["disk_format"] = parse_disk_format(disk_format)
        if container_format is not None:
            changes["container_format"] = parse_container_format(container_format)
        if min_disk is not None:
            changes["min_disk"] = parse_size(min_disk, "min-disk (GB)")
        if min_ram is not None:
            changes["min_ram"] = parse_size(min_ram, "min-ram (MB)")
        if visibility is not None:
            changes["visibility"] = parse_visibility(visibility)
        if not changes and not properties and not purge_props:
            raise ValidationError("nothing to update: give at least one attribute to change")
        with self.batch() as state:
            current = _owned_image(state, project, image)
            props = _properties({} if purge_props else current.properties, properties)
            updated = replace(current, **changes, properties=props)
            if updated == current:
                return current
            updated = replace(updated, updated=time.time_ns())
            self._check_image_name(state, project, updated.name, updated.id)
            state.put(updated)
            return updated

    def image_delete(self, project: str, image: str) -> Image:
        """Delete an image (its owner, or the admin project). Instances and snapshots
        based on it keep working and keep showing its ID; its bytes are removed
        when no other image has the same ones."""
        with self.keyed_read() as state:
            peek = _owned_image(state, project, image)
        if peek.sha256 is None:
            return self._remove_image(project, image)
        with self.image_files.locked():
            removed = self._remove_image(project, image)
            if removed.sha256 and not self._image_file_used(removed.sha256):
                self.image_files.remove(removed.sha256)
            return removed

    @_retried
    def _remove_image(self, project: str, image: str) -> Image:
        with self.batch() as state:
            target = _owned_image(state, project, image)
            state.remove(target)
            return target

    # ------------------------------------------------------------------ instances

    @_retried
    def boot(
        self,
        project: str,
        name: str,
        flavor: str,
        image: str | None,
        host: str | None = None,
        security_groups: Sequence[str] | None = None,
        nics: Sequence[str] | None = None,
        *,
        key_name: str | None = None,
        meta: Sequence[str] = (),
        user_data: bytes | None = None,
        block_devices: Sequence[str] = (),
    ) -> Instance:
        """Create an instance (see ``docs/semantics.md``) and schedule it.

        The image's ``min_disk``/``min_ram`` (and its size) must fit the flavor (a
        flavor disk of 0 means "the image's own size", as in nova); ``key_name``
        must name one of the project's keypairs; ``meta`` is KEY=VALUE items;
        ``user_data`` at most MAX_USER_DATA_B64 bytes once base64-encoded;
        ``block_devices`` nova's ``DEV=ID:[snap]:SIZE:DELETE_ON_TERMINATE`` (a
        mapping for ``vda`` boots from the volume: no image needed, the flavor's
        disk not used). The project's instances/cores/ram quotas must hold
        (QuotaError, nothing stored). ``host`` None: the scheduler picks a
        registered host (:mod:`secfw.scheduler`); a registered ``host`` must fit
        too; a name that is not registered is taken as given. When no host fits the
        instance is stored in ERROR with nova's NoValidHost fault, and gets no port
        and no volume.
        """
        check_name(project, "project")
        check_name(name, "instance name")
        if host is not None:
            check_host(host)
        metadata = _metadata({}, meta)
        encoded = _user_data(user_data)
        mappings = _parse_mappings(block_devices)
        boot_volume = "/dev/vda" in {m.device for m in mappings}
        if image is None and not boot_volume:
            raise ValidationError("give --image, or boot from a volume with "
                                  "--block-device-mapping vda=ID:[snap]:SIZE:DELETE")
        now = time.time_ns()
        with self.batch() as state:
            flavor_obj = _flavor(state, project, flavor)
            self._ensure_project(state, project)
            image_obj = _image(state, project, image) if image is not None else None
            if image_obj is not None:
                _check_fits(flavor_obj, image_obj, check_disk=not boot_volume)
            if key_name is not None:
                _keypair(state, project, key_name)
            group_ids = self._boot_groups(state, project, security_groups)
            networks = self._boot_networks(state, project, nics)
            sources = [_mapping_source(state, project, m) for m in mappings]
            demand = Demand(flavor_obj.vcpus, flavor_obj.ram_mb,
                            0 if boot_volume else flavor_obj.disk_gb)
            _check_boot_quotas(state, project, demand, sources)
            placed = _place(state, host, demand, required_properties(flavor_obj))
            instance = Instance(
                new_id(), project, name, flavor_obj.name,
                image_id=image_obj.id if image_obj is not None else "", host=placed or "",
                security_groups=group_ids, state="ACTIVE" if placed else "ERROR",
                created=now, flavor_id=flavor_obj.id, key_name=key_name, metadata=metadata,
                user_data=encoded, updated=now, vcpus=demand.vcpus, ram_mb=demand.ram_mb,
                disk_gb=demand.disk_gb, fault=None if placed else _no_valid_host(now),
            )
            state.put(instance)
            if placed:
                self._realise(state, instance, networks, list(zip(mappings, sources,
                                                                  strict=True)))
            return instance

    def _realise(
        self, state: CloudState, instance: Instance, networks: Sequence[Network],
        volumes: Sequence[tuple[BlockDeviceMapping, Volume | VolumeSnapshot]],
    ) -> None:
        """A placed instance's ports (one per network) and its mapped volumes."""
        for net in networks:
            state.put(self._new_port(state, instance.id, net, state.used_taps))
        for mapping, source in volumes:
            state.put(_attach_mapping(instance.project, instance.id, mapping, source,
                                      instance.created))

    @_retried
    def meta(self, project: str, server: str, action: str, items: Sequence[str]) -> Instance:
        """nova's ``meta SERVER set K=V…`` / ``meta SERVER delete K…``."""
        if action not in ("set", "delete"):
            raise ValidationError(f"action {action!r} must be set or delete")
        if not items:
            raise ValidationError("give at least one KEY=VALUE (set) or KEY (delete)")
        if action == "delete" and any("=" in item for item in items):
            raise ValidationError("delete takes keys only (KEY, not KEY=VALUE)")
        pairs = [parse_key_value(item, "metadata", action == "set") for item in items]
        with self.batch() as state:
            instance = self._instance(state, project, server)
            if action == "set":
                metadata = _metadata(instance.metadata, items)
            else:
                metadata = dict(instance.metadata)
                for key, _ in pairs:
                    if key not in metadata:
                        raise NotFoundError(
                            f"server {instance.name!r} has no metadata item {key!r}"
                        )
                    del metadata[key]
            if metadata == instance.metadata:
                return instance
            updated = replace(instance, metadata=metadata, updated=time.time_ns())
            state.put(updated)
            return updated

    def _boot_groups(
        self, state: CloudState, project: str, names: Sequence[str] | None
    ) -> tuple[str, ...]:
        if not names:
            return (state.group_by_name[(project, DEFAULT_GROUP)],)
        ids = [self._group(state, project, n).id for n in names]
        if len(set(ids)) != len(ids):
            raise ValidationError("a security group is listed more than once")
        return tuple(ids)

    def _boot_networks(
        self, state: CloudState, project: str, nics: Sequence[str] | None
    ) -> list[Network]:
        if nics:
            networks = [self._network(state, project, ref) for ref in nics]
            if len({n.id for n in networks}) != len(networks):
                raise ValidationError("a network is listed more than once in --nic")
            return networks
        usable = sorted(
            (n for n in state.networks.values() if n.usable_by(project)), key=lambda n: n.name
        )
        if not usable:
            raise NotFoundError(f"no network is available to project {project!r}; create one first")
        if len(usable) > 1:
            raise ValidationError(
                "several networks are available; choose one with --nic net-id=NETWORK"
            )
        return usable

    @staticmethod
    def _new_port(
        state: CloudState, instance_id: str, network: Network, taps: Any
    ) -> Port:
        """A port on ``network`` with a fresh address, MAC and a tap name no other
        port has (``taps``, updated): two ports on one tap would filter as one."""
        address = _allocate(state, network, network.cidr, network.id)
        address6 = _allocate(state, network, network.cidr6, network.id + "/6")
        mac = _new_mac(state.used_macs)
        port_id = _new_port_id(taps)
        return Port(port_id, instance_id, network.id, mac, address, address6)

    @_retried
    def delete(self, project: str, server: str) -> Instance:
        """Delete an instance with its ports; its volumes are detached, and those
        mapped with delete-on-terminate deleted (unless snapshots depend on them:
        cinder refuses to delete those, so they stay, detached)."""
        with self.batch() as state:
            instance = self._instance(state, project, server)
            self._dissociate_ports(state, state.ports_of(instance.id))
            for port in state.ports_of(instance.id):
                state.remove(port)
            for volume in _volumes_of(state, instance.id):
                if volume.delete_on_termination and not _snapshots_of(state, volume.id):
                    state.remove(volume)
                else:
                    state.put(replace(volume, attached_to=None, device=None,
                                      delete_on_termination=False))
            state.remove(instance)
            return instance

    def list_instances(
        self, project: str, host: str | None = None, all_projects: bool = False
    ) -> list[Instance]:
        state = self.snapshot()
        found = [
            i
            for i in state.instances.values()
            if (all_projects or host is not None or i.project == project)
            and (host is None or i.host == host)
        ]
        return sorted(found, key=lambda i: (i.created, i.name, i.id))

    def show(self, project: str, server: str) -> dict[str, Any]:
        """An instance as ``nova show`` lists it: nova's properties, sorted as nova
        sorts them, JSON-ready. ``networks`` maps each network's name to the
        instance's addresses on it (fixed IPv4, IPv6, then floating: nova's
        ``<name> network`` rows). The admin project sees the compute host as
        ``hostId`` and also as ``host``; other projects see nova's opaque ``hostId``
        (a hash of project and host). Blank in both when scheduling failed."""
        with self.keyed_read() as state:
            return self._show(state, project, server)

    def _show(self, state: CloudState, project: str, server: str) -> dict[str, Any]:
        instance = self._instance(state, project, server)
        admin = project == ADMIN_PROJECT
        shown: dict[str, Any] = {
            # secfw has no disk partitioning, power or task states of its own: the
            # constants are nova's for a server booted and left alone (the guide's)
            "OS-DCF:diskConfig": "MANUAL",
            "OS-EXT-STS:power_state": NOVA_RUNNING if instance.state == "ACTIVE" else NOVA_NOSTATE,
            "OS-EXT-STS:task_state": None,
            "OS-EXT-STS:vm_state": instance.state.lower(),
            "accessIPv4": "",
            "accessIPv6": "",
            "config_drive": "",
            "created": iso_time(instance.created),
            "fault": _nova_fault(instance.fault),
            "flavor": f"{instance.flavor} ({instance.flavor_id})" if instance.flavor_id
            else instance.flavor,
            "host": instance.host if admin else None,
            "hostId": _host_id(instance, admin),
            "id": instance.id,
            "image": _image_shown(state, instance),
            "key_name": instance.key_name,
            "metadata": dict(instance.metadata),
            "name": instance.name,
            "networks": _addresses_by_network(state, instance),
            "os-extended-volumes:volumes_attached": [
                {"id": v.id} for v in sorted(_volumes_of(state, instance.id),
                                              key=lambda v: v.device or "")],
            "progress": 0,
            "security_groups": [{"name": state.groups[g].name}
                                for g in instance.security_groups],
            "status": instance.state,
            "tenant_id": instance.project,
            "updated": iso_time(instance.updated or instance.created),
            # secfw has projects, not users: whoever acts with --project P is P's user
            "user_id": instance.project,
        }
        if not admin:
            del shown["host"]
        if instance.fault is None:  # nova shows a fault only when there is one
            del shown["fault"]
        if not shown["os-extended-volumes:volumes_attached"]:  # as the guide's show
            del shown["os-extended-volumes:volumes_attached"]
        if instance.state != "ACTIVE":  # nova reports progress only while (re)building or up
            del shown["progress"]
        return shown

    def user_data(self, project: str, server: str) -> bytes | None:
        """The user data an instance was booted with (None: none)."""
        import base64

        with self.keyed_read() as state:
            instance = self._instance(state, project, server)
        return base64.b64decode(instance.user_data) if instance.user_data is not None else None

    def list_secgroup(self, project: str, server: str) -> list[SecurityGroup]:
        """The groups of ``server``, in its order, read by key."""
        with self.keyed_read() as state:
            instance = self._instance(state, project, server)
            state.prefetch(SecurityGroup.KIND, sorted(set(instance.security_groups)))
            return [state.groups[g] for g in instance.security_groups]

    @_retried
    def add_secgroup(self, project: str, server: str, group: str) -> Instance:
        with self.batch() as state:
            instance = self._instance(state, project, server)
            target = self._group(state, project, group)
            if target.id in instance.security_groups:
                raise ConflictError(
                    f"instance {instance.name!r} already has security group {target.name!r}"
                )
            updated = _with_groups(instance, (*instance.security_groups, target.id))
            state.put(updated)
            return updated

    @_retried
    def remove_secgroup(self, project: str, server: str, group: str) -> Instance:
        with self.batch() as state:
            instance = self._instance(state, project, server)
            target = self._group(state, project, group)
            if target.id not in instance.security_groups:
                raise NotFoundError(
                    f"instance {instance.name!r} does not have security group {target.name!r}"
                )
            remaining = tuple(g for g in instance.security_groups if g != target.id)
            updated = _with_groups(instance, remaining)
            state.put(updated)
            return updated

    # ------------------------------------------------------------------ ports

    def port_view(self, port_id: str) -> PortView:
        """One port as :meth:`port_list` lists it, read by key (its instance,
        network and groups)."""
        with self.keyed_read() as state:
            port = state.ports[port_id]
            return _port_view(state, port, state.instances[port.instance_id])

    def port_list(self, project: str, host: str | None = None) -> list[PortView]:
        """Ports of the project's instances; with ``host``, every port on that host."""
        state = self.snapshot()
        views = []
        for port in state.ports.values():
            instance = state.instances[port.instance_id]
            if host is not None and instance.host != host:
                continue
            if host is None and instance.project != project:
                continue
            views.append(_port_view(state, port, instance))
        return sorted(views, key=lambda v: (v.host, v.tap))

    # ------------------------------------------------------------------ floating IPs

    @_retried
    def floating_pool_create(self, project: str, name: str, cidr: str) -> FloatingPool:
        """A floating pool (admin only): an IPv4 range no network or pool overlaps."""
        _require_admin(project, "create floating IP pools")
        check_name(name, "pool name")
        canonical = parse_network_cidr(cidr)
        with self.batch() as state:
            self._check_network_unique(state, name, canonical, None)
            for pool in state.floating_pools.values():
                if pool.name == name:
                    raise ConflictError(f"floating IP pool {name!r} already exists")
                if ipaddress.ip_network(pool.cidr).overlaps(ipaddress.ip_network(canonical)):
                    raise ConflictError(
                        f"pool {canonical} overlaps floating IP pool {pool.name!r} ({pool.cidr})")
            pool = FloatingPool(new_id(), name, canonical)
            state.put(pool)
            return pool

    def floating_pool_list(self) -> list[FloatingPool]:
        with self.keyed_read() as state:
            return sorted(state.floating_pools.values(), key=lambda p: p.name)

    @_retried
    def floating_pool_delete(self, project: str, name: str) -> FloatingPool:
        """Delete a pool (admin only) none of whose addresses is allocated."""
        _require_admin(project, "delete floating IP pools")
        with self.batch() as state:
            pool = _floating_pool(state, name)
            used = sum(1 for f in state.floating_ips.values() if f.pool_id == pool.id)
            if used:
                raise InUseError(f"floating IP pool {pool.name!r} has {used} allocated address(es)")
            state.remove(pool)
            return pool

    @_retried
    def floating_ip_create(self, project: str, pool: str | None = None) -> FloatingIp:
        """Allocate the lowest free address of ``pool`` (default: the pool named
        ``nova``, else the only pool) to ``project``, within its ``floating_ips`` quota."""
        check_name(project, "project")
        with self.batch() as state:
            source = _floating_pool(state, pool)
            used = sum(1 for f in state.floating_ips.values() if f.project == project)
            limit = state.quota(project).floating_ips
            if limit != UNLIMITED and used >= limit:
                raise QuotaError(
                    f"Quota exceeded for floating_ips: {used} of {limit} used in "
                    f"project {project!r}")
            taken = {f.id for f in state.floating_ips.values() if f.pool_id == source.id}
            address = next((a for _, a in free_addresses(source.cidr, taken)), None)
            if address is None:
                raise ConflictError(f"No more floating IPs in pool {source.name!r}")
            floating = FloatingIp(address, project, source.id)
            state.put(floating)
            return floating

    def floating_ip_list(self, project: str) -> list[FloatingIp]:
        with self.keyed_read() as state:
            found = [f for f in state.floating_ips.values() if f.project == project]
            return sorted(found, key=lambda f: ipaddress.ip_address(f.id))

    @_retried
    def floating_ip_delete(self, project: str, address: str) -> FloatingIp:
        """Release a floating IP of the project (dissociated first, as nova does)."""
        with self.batch() as state:
            floating = _floating_ip(state, project, address)
            state.remove(floating)
            return floating

    @_retried
    def add_floating_ip(
        self, project: str, server: str, address: str, fixed_address: str | None = None
    ) -> FloatingIp:
        """Associate a floating IP of the project with a port of ``server``: the
        port whose IPv4 address is ``fixed_address``, by default its first port.
        One floating IP per fixed address (1:1 NAT)."""
        fixed = parse_ipv4_address(fixed_address, "fixed address") if fixed_address else None
        with self.batch() as state:
            floating = _floating_ip(state, project, address)
            instance = self._instance(state, project, server)
            if floating.port_id is not None:
                raise ConflictError(f"floating IP {floating.id} is already associated with "
                                    f"{_owner_name(state, floating)}")
            port = _floating_port(state, instance, fixed)
            if state.floating_by_port.get(port.id):
                mapped = sorted(state.floating_by_port[port.id])[0]
                raise ConflictError(f"fixed address {port.ip} of {instance.name!r} already "
                                    f"has floating IP {mapped}")
            associated = replace(floating, port_id=port.id, fixed_ip=port.ip)
            state.put(associated)
            return associated

    @_retried
    def remove_floating_ip(self, project: str, server: str, address: str) -> FloatingIp:
        """Dissociate a floating IP from the server it is associated with."""
        with self.batch() as state:
            floating = _floating_ip(state, project, address)
            instance = self._instance(state, project, server)
            port = state.ports.get(floating.port_id or "")
            if port is None or port.instance_id != instance.id:
                raise ConflictError(
                    f"floating IP {floating.id} is not associated with {instance.name!r}")
            released = replace(floating, port_id=None, fixed_ip=None)
            state.put(released)
            return released

    def _dissociate_ports(self, state: CloudState, ports: Iterable[Port]) -> None:
        """Dissociate the floating IPs of ports that go away (they stay allocated)."""
        for port in ports:
            for floating in state.floating_of(port.id):
                state.put(replace(floating, port_id=None, fixed_ip=None))

    # ------------------------------------------------------------------ quotas

    @_retried
    def quota_show(self, project: str) -> dict[str, int]:
        """Every quota of the project (``-1`` unlimited), in QUOTA_NAMES order."""
        state = self._read(check_name(project, "project"))
        quota = state.quota(project)
        return {name: getattr(quota, name) for name in QUOTA_NAMES}

    @_retried
    def quota_update(
        self,
        project: str,
        security_groups: str | int | None = None,
        security_group_rules: str | int | None = None,
        *,
        instances: str | int | None = None,
        cores: str | int | None = None,
        ram: str | int | None = None,
        volumes: str | int | None = None,
        gigabytes: str | int | None = None,
        snapshots: str | int | None = None,
        floating_ips: str | int | None = None,
    ) -> dict[str, int]:
        """Change some of the project's quotas (None: unchanged); none may be set
        below what the project already uses."""
        check_name(project, "project")
        given = {"security_groups": security_groups,
                 "security_group_rules": security_group_rules, "instances": instances,
                 "cores": cores, "ram": ram, "volumes": volumes, "gigabytes": gigabytes,
                 "snapshots": snapshots, "floating_ips": floating_ips}
        parsed = {k: parse_quota(v, k) for k, v in given.items() if v is not None}
        if not parsed:
            raise ValidationError(
                "nothing to update: give at least one quota (--security-groups, "
                "--security-group-rules, --instances, --cores, --ram, --volumes, "
                "--gigabytes, --snapshots, --floating-ips)"
            )
        with self.batch() as state:
            self._ensure_project(state, project)
            updated: Quota = Quota.from_doc({**state.quota(project).to_doc(), **parsed})
            _check_quota_covers_usage(state, updated)
            state.put(updated)
        return self.quota_show(project)

    # ------------------------------------------------------------------ compute hosts

    @_retried
    def host_add(
        self, project: str, name: str, vcpus: str | int, ram_mb: str | int,
        disk_gb: str | int, properties: Sequence[str] = (),
    ) -> Host:
        """Register a compute host the scheduler may use (admin only)."""
        _require_admin(project, "register compute hosts")
        check_host(name)
        host = Host(name, parse_size(vcpus, "vcpus", 1), parse_size(ram_mb, "ram-mb", 1),
                    parse_size(disk_gb, "disk-gb", 0), _properties({}, properties),
                    time.time_ns())
        with self.batch() as state:
            if name in state.hosts:
                raise ConflictError(f"compute host {name!r} is already registered")
            _check_capacity_covers_usage(state, host)
            state.put(host)
            return host

    def host_list(self) -> list[tuple[Host, HostUsage]]:
        """Registered hosts by name, each with what its instances consume."""
        with self.keyed_read() as state:
            return [(h, host_usage(state, h.id)) for h in sorted(state.hosts.values(),
                                                                 key=lambda h: h.id)]

    def host_show(self, name: str) -> tuple[Host, HostUsage]:
        with self.keyed_read() as state:
            return _host(state, name), host_usage(state, name)

    @_retried
    def host_delete(self, project: str, name: str) -> Host:
        """Unregister a host (admin only); refused while instances run on it."""
        _require_admin(project, "unregister compute hosts")
        with self.batch() as state:
            host = _host(state, name)
            running = host_usage(state, name).instances
            if running:
                raise InUseError(f"compute host {name!r} still runs {running} instance(s)")
            state.remove(host)
            return host

    # ------------------------------------------------------------------ volumes (cinder)

    @_retried
    def volume_create(
        self, project: str, size: str | int, name: str | None = None,
        description: str | None = None, snapshot: str | None = None,
        image: str | None = None,
    ) -> Volume:
        """A new volume of ``size`` GB, empty or from a snapshot or an image (at least
        as large as either); volumes and gigabytes quotas."""
        check_name(project, "project")
        size_gb = parse_size(size, "size", 1)
        _check_volume_text(name, description)
        if snapshot is not None and image is not None:
            raise ValidationError("give --snapshot-id or --image-id, not both")
        with self.batch() as state:
            self._ensure_project(state, project)
            snap = _volume_snapshot(state, project, snapshot) if snapshot is not None else None
            if snap is not None and size_gb < snap.size_gb:
                raise ValidationError(f"size {size_gb} GB is smaller than the snapshot's "
                                      f"{snap.size_gb} GB")
            image_obj = _image(state, project, image) if image is not None else None
            if image_obj is not None:
                _check_image_fits_volume(image_obj, size_gb)
            check_quota(state.quota(project), volume_usage(state, project),
                        {"volumes": 1, "gigabytes": size_gb})
            volume = Volume(new_id(), project, name, size_gb, description,
                            snap.id if snap else None, image_obj.id if image_obj else None,
                            created=time.time_ns())
            state.put(volume)
            return volume

    def volume_list(self, project: str) -> list[Volume]:
        with self.keyed_read() as state:
            mine = (v for v in state.volumes.values() if v.project == project)
            return sorted(mine, key=lambda v: (v.created, v.id))

    def volume_show(self, project: str, volume: str) -> Volume:
        with self.keyed_read() as state:
            return _volume(state, project, volume)

    @_retried
    def volume_delete(self, project: str, volume: str) -> Volume:
        """Delete a volume: refused while attached or while snapshots depend on it."""
        with self.batch() as state:
            target = _volume(state, project, volume)
            if target.attached_to is not None:
                raise InUseError(f"volume {_label(target)} is attached to a server; "
                                 "detach it first")
            depending = _snapshots_of(state, target.id)
            if depending:
                raise InUseError(f"volume {_label(target)} still has {len(depending)} "
                                 "dependent snapshot(s)")
            state.remove(target)
            return target

    @_retried
    def volume_attach(
        self, project: str, server: str, volume: str, device: str | None = None
    ) -> Volume:
        """Attach a volume to one ACTIVE server (one at a time) on ``device`` (default:
        the first free ``/dev/vdX`` after vda)."""
        wanted = parse_device(device) if device not in (None, "auto") else None
        with self.batch() as state:
            instance = self._instance(state, project, server)
            target = _volume(state, project, volume)
            if target.attached_to is not None:
                raise InUseError(f"volume {_label(target)} is already attached to a server "
                                 "(a volume is attached to one instance at a time)")
            _check_active(instance, "attach a volume to")
            used = {v.device for v in _volumes_of(state, instance.id)} | {ROOT_DEVICE}
            if wanted in used:
                raise ConflictError(f"device {wanted} is already in use on server "
                                    f"{instance.name!r}")
            chosen = wanted or _free_device(used)
            attached = replace(target, attached_to=instance.id, device=chosen)
            state.put(attached)
            return attached

    @_retried
    def volume_detach(self, project: str, server: str, volume: str) -> Volume:
        """Detach a volume from the server it is attached to (not its root volume)."""
        with self.batch() as state:
            instance = self._instance(state, project, server)
            target = _volume(state, project, volume)
            if target.attached_to != instance.id:
                raise NotFoundError(f"volume {_label(target)} is not attached to server "
                                    f"{instance.name!r}")
            if target.device == ROOT_DEVICE:
                raise ConflictError(f"volume {_label(target)} is the root device of server "
                                    f"{instance.name!r}; it cannot be detached")
            detached = replace(target, attached_to=None, device=None,
                               delete_on_termination=False)
            state.put(detached)
            return detached

    @_retried
    def snapshot_create(
        self, project: str, volume: str, force: bool = False, name: str | None = None,
        description: str | None = None,
    ) -> VolumeSnapshot:
        """A snapshot of a volume; of an attached one only with ``force`` (the guide:
        the volume service does not snapshot an attached volume unless forced)."""
        _check_volume_text(name, description)
        with self.batch() as state:
            target = _volume(state, project, volume)
            if target.attached_to is not None and not force:
                raise InUseError(f"volume {_label(target)} is attached to a server; "
                                 "snapshot it with --force True")
            check_quota(state.quota(project), volume_usage(state, project),
                        {"snapshots": 1, "gigabytes": target.size_gb})
            snap = VolumeSnapshot(new_id(), project, target.id, target.size_gb, name,
                                  description, time.time_ns())
            state.put(snap)
            return snap

    def snapshot_list(self, project: str) -> list[VolumeSnapshot]:
        with self.keyed_read() as state:
            mine = (s for s in state.volume_snapshots.values() if s.project == project)
            return sorted(mine, key=lambda s: (s.created, s.id))

    def snapshot_show(self, project: str, snapshot: str) -> VolumeSnapshot:
        with self.keyed_read() as state:
            return _volume_snapshot(state, project, snapshot)

    @_retried
    def snapshot_delete(self, project: str, snapshot: str) -> VolumeSnapshot:
        """Delete a volume snapshot (volumes made from it keep its ID)."""
        with self.batch() as state:
            target = _volume_snapshot(state, project, snapshot)
            state.remove(target)
            return target

    # ------------------------------------------------------------------ lookups

    # ------------------------------------------------------------------ paged listings
    # The listings above, a page at a time (secfw.paging): same rows, same
    # order, each read by key from the store's ordered indexes.

    def server_page(self, project: str, host: str | None, all_projects: bool, limit: int,
                    marker: str | None) -> Page[tuple[Instance, dict[str, list[str]]]]:
        """A page of :meth:`list_instances`, each instance with its fixed IPv4
        addresses by network name (``nova list``'s Networks)."""
        bucket = server_bucket(host=host) if host is not None else server_bucket(
            project=None if all_projects else project)
        with self.keyed_read() as state:
            page = read_page(state, "instance-order", bucket, limit, marker)
            _prefetch_ports(state, page.rows)
            rows = [(instance, _fixed_addresses(state, instance)) for instance in page.rows]
        return Page(rows, page.next_marker)

    def secgroup_page(self, project: str, all_projects: bool, limit: int,
                      marker: str | None) -> Page[SecurityGroup]:
        """A page of :meth:`secgroup_list` (the project's default group made first)."""
        check_name(project, "project")
        self._ensure_default(project)
        with self.keyed_read() as state:
            return read_page(state, "group-order", group_bucket(None if all_projects else project),
                             limit, marker)

    def rule_page(self, project: str, group: str | None, limit: int,
                  marker: str | None) -> tuple[Page[Rule], dict[str, str]]:
        """A page of :meth:`secgroup_list_rules` (``group`` given) or of
        :meth:`rule_list` (None: every group of the project), and the names
        of the groups its rules reference. A group's rules are bounded by its
        quota: they are read by key and sliced."""
        check_name(project, "project")
        if group == DEFAULT_GROUP:
            self._ensure_default(project)
        with self.keyed_read() as state:
            if group is not None:
                groups = [self._group(state, project, group)]
            else:
                groups = [g for chunk in state.ordered("group-order", group_bucket(project),
                                                       None, 100) for g in chunk]
            rules = _sorted_rules(r for g in groups for r in state.rules_by_group[g.id].values())
            page = slice_page(rules, limit, marker, key=lambda rule: rule.id)
            wanted = {g for r in page.rows for g in (r.group_id, r.remote_group_id) if g}
            state.prefetch(SecurityGroup.KIND, sorted(wanted))
            names = {g: state.groups[g].name for g in wanted if g in state.groups}
        return page, names

    def network_page(self, project: str, all_projects: bool, limit: int,
                     marker: str | None) -> Page[Network]:
        """A page of :meth:`net_list`."""
        with self.keyed_read() as state:
            return read_page(state, "network-order", EVERY, limit, marker,
                             keep=lambda n: all_projects or n.usable_by(project))

    def port_page(self, project: str, host: str | None, limit: int,
                  marker: str | None) -> Page[PortView]:
        """A page of :meth:`port_list` with ``host`` (its order is the ports'
        taps: the index of every port in tap order is read, the host's kept).
        Without a host the listing's order is (host, tap), which no index of a
        port holds (a port's host is its instance's): refused."""
        if host is None:
            raise ValidationError("port-list pages one host at a time: add --host HOST")

        def prepare(ports: list[Port]) -> None:
            state.prefetch(Instance.KIND, sorted({p.instance_id for p in ports}))

        with self.keyed_read() as state:
            page = read_page(state, "port-order", EVERY, limit, marker, prepare=prepare,
                             keep=lambda p: state.instances[p.instance_id].host == host)
            instances = [state.instances[p.instance_id] for p in page.rows]
            state.prefetch(SecurityGroup.KIND, sorted({g for i in instances
                                                       for g in i.security_groups}))
            state.prefetch(Network.KIND, sorted({p.network_id for p in page.rows}))
            views = [_port_view(state, p, i) for p, i in zip(page.rows, instances, strict=True)]
        return Page(views, page.next_marker)

    def _ensure_default(self, project: str) -> None:
        """The project's default group, created on first use (as :meth:`_read`),
        read by key."""
        with self.batch() as state:
            self._ensure_project(state, project)

    def _ensure_project(self, state: CloudState, project: str) -> None:
        _ensure_default_group(state, project)

    def _check_group_quota(self, state: CloudState, project: str) -> None:
        limit = state.quota(project).security_groups
        used = state.usage("groups", project).get("count", 0)
        if limit != UNLIMITED and used >= limit:
            raise QuotaError(
                f"Quota exceeded for security_groups: {used} of {limit} used in project {project!r}"
            )

    @staticmethod
    def _group(
        state: CloudState, project: str, ref: str, what: str = "Security group"
    ) -> SecurityGroup:
        group_id = state.group_by_name.get((project, ref))
        if group_id is None and ref == DEFAULT_GROUP:
            # Every project has its default group (nova creates it on first use): a
            # write naming it before anything read the project creates it, in the
            # same transaction.
            group_id = _ensure_default_group(state, project).id
        if group_id is None and ref in state.groups and state.groups[ref].project == project:
            group_id = ref
        if group_id is None:
            raise NotFoundError(f"{what} {ref!r} not found in project {project!r}")
        return state.groups[group_id]

    @staticmethod
    def _instance(state: CloudState, project: str, ref: str) -> Instance:
        by_id = state.instances.get(ref)
        if by_id is not None and by_id.project == project:
            return by_id
        named = [state.instances[i]
                 for i in sorted(state.instances_by_name.get((project, ref), ()))]
        if not named:
            raise NotFoundError(f"No server with a name or ID of {ref!r} exists")
        if len(named) > 1:
            raise ConflictError(f"Multiple servers named {ref!r} exist; use the ID")
        return named[0]

    @staticmethod
    def _network(state: CloudState, project: str, ref: str) -> Network:
        for net in state.networks.values():
            if (net.id == ref or net.name == ref) and net.usable_by(project):
                return net
        raise NotFoundError(f"network {ref!r} not found")


# ---------------------------------------------------------------------- helpers


def _ensure_default_group(state: CloudState, project: str) -> SecurityGroup:
    """``project``'s default group, created in ``state`` if it has none yet."""
    group_id = state.group_by_name.get((project, DEFAULT_GROUP))
    if group_id is not None:
        return state.groups[group_id]
    now = time.time_ns()
    group = SecurityGroup(new_id(), project, DEFAULT_GROUP, "default", now, now)
    state.put(group)
    return group


def _persist(txn: WriteTxn, state: CloudState) -> None:
    """Record in ``txn`` the records ``state`` changed, skipping no-ops.

    A put of a document equal to the stored one, or a delete of a document that
    was never stored (created and removed in one batch), is not a change: it
    must not bump the revision nor leave a tombstone.
    """
    by_kind: dict[str, list[str]] = {}
    for kind, doc_id in state.dirty:
        by_kind.setdefault(kind, []).append(doc_id)
    for kind, doc_ids in by_kind.items():  # one query per kind, not one per record
        txn.snapshot.prefetch(kind, doc_ids)
    for (kind, doc_id), record in state.dirty.items():
        before = txn.snapshot.get(kind, doc_id)
        if record is None:
            if before is not None:
                txn.delete(kind, doc_id)
            continue
        doc = record.to_doc()
        if doc != before:
            txn.put(kind, doc_id, doc)


def _nova_match(
    protocol: str, from_port: str, to_port: str
) -> tuple[str, int | None, int | None, int | None]:
    """Validate a nova (protocol, from, to) triple → (protocol, min, max, display_max).

    An ICMP rule with "any" type matches any code; the code typed with it
    (``icmp -1 255``) is kept only for display, so it cannot create a second rule
    with the same meaning.
    """
    proto = parse_nova_protocol(protocol)
    low, high = parse_nova_ports(proto, from_port, to_port)
    if proto == "icmp" and low is None:
        return proto, None, None, high
    return proto, low, high, None


@dataclass(frozen=True)
class _Match:
    direction: Direction
    ethertype: Ethertype
    protocol: str | None
    port_min: int | None
    port_max: int | None


def _neutron_match(
    direction: str,
    ethertype: str,
    protocol: str | None,
    dst_port: str | None,
    icmp_type: str | int | None,
    icmp_code: str | int | None,
) -> _Match:
    """Validate the Neutron rule fields (see :meth:`Api.rule_create`)."""
    if direction not in ("ingress", "egress"):
        raise ValidationError(f"direction {direction!r} must be ingress or egress")
    way: Direction = "ingress" if direction == "ingress" else "egress"
    family = parse_ethertype(ethertype)
    proto = parse_protocol(protocol, family)
    if dst_port is not None and icmp_type is not None:
        raise ValidationError("give --dst-port or --icmp-type, not both")
    if dst_port is not None:
        if proto not in PORT_PROTOCOLS:
            raise ValidationError(
                f"ports can only be given for {', '.join(sorted(PORT_PROTOCOLS))}"
                f", not protocol {proto or 'any'}"
            )
        low, high = parse_port_range(dst_port)
        return _Match(way, family, proto, low, high)
    if icmp_code is not None and icmp_type is None:
        raise ValidationError("an ICMP code needs an ICMP type")
    if icmp_type is not None:
        if proto not in ("icmp", "icmpv6"):
            raise ValidationError(f"--icmp-type needs protocol icmp, not {proto or 'any'}")
        code = parse_icmp_field(icmp_code, "ICMP code") if icmp_code is not None else None
        return _Match(way, family, proto, parse_icmp_field(icmp_type, "ICMP type"), code)
    return _Match(way, family, proto, None, None)


def _optional_nova_match(
    protocol: str | None, from_port: str | None, to_port: str | None
) -> tuple[str | None, int | None, int | None, int | None]:
    given = [v is not None for v in (protocol, from_port, to_port)]
    if not any(given):
        return None, None, None, None
    if not all(given):
        raise ValidationError("give all of PROTOCOL FROM-PORT TO-PORT, or none of them")
    return _nova_match(protocol, from_port, to_port)  # type: ignore[arg-type]


def _check_description(description: str) -> None:
    if len(description) > 255:
        raise ValidationError("description is longer than 255 characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in description):
        raise ValidationError("description must not contain control characters")
    check_text(description, "description")


def _sorted_rules(rules: Any) -> list[Rule]:
    def key(rule: Rule) -> tuple[Any, ...]:
        return (
            rule.direction,
            rule.ethertype,
            rule.protocol or "",
            -1 if rule.port_min is None else rule.port_min,
            -1 if rule.port_max is None else rule.port_max,
            rule.remote_cidr or "",
            rule.remote_group_id or "",
            rule.id,
        )

    return sorted(rules, key=key)


#: nova's default key_pairs quota, as a fixed limit per project.
MAX_KEYPAIRS = 100
#: The largest image a secfw store accepts on stdin or --file (glance has no limit;
#: this one keeps a mistyped device path from filling the disk).
MAX_IMAGE_BYTES = 64 * 2**30
#: The setting that says the five default flavors were stored (and may have been
#: deleted since): before it, the defaults are shown without being stored.
FLAVORS_SEEDED = "flavors"


def visible_flavors(state: CloudState) -> dict[str, Flavor]:
    """Every flavor by ID: the stored ones, or the five defaults of a store in which
    no flavor was ever created, deleted or changed (reads never write)."""
    if FLAVORS_SEEDED in state.settings:
        return state.flavors
    return {f.id: f for f in FLAVORS}


def _seed_flavors(state: CloudState) -> None:
    """Store the five defaults before the first change to flavors."""
    if FLAVORS_SEEDED not in state.settings:
        for flavor in FLAVORS:
            state.put(flavor)
        state.put(Setting(FLAVORS_SEEDED, "seeded"))


def _flavor_order(flavor: Flavor) -> tuple[Any, ...]:
    numeric = flavor.id.isdigit()
    return (not numeric, int(flavor.id) if numeric else 0, flavor.id)


def _flavor(state: CloudState, project: str, ref: str) -> Flavor:
    """A flavor ``project`` may use, by ID, else by name."""
    flavors = visible_flavors(state)
    found = flavors.get(ref)
    if found is None:
        found = next((f for f in flavors.values() if f.name == ref), None)
    if found is None or not found.usable_by(project):
        raise NotFoundError(f"flavor {ref!r} not found")
    return found


def _require_admin(project: str, what: str) -> None:
    if project != ADMIN_PROJECT:
        raise ForbiddenError(
            f"only the {ADMIN_PROJECT!r} project may {what} (project {project!r} may not)"
        )


def _keypair(state: CloudState, project: str, name: str) -> Keypair:
    pair_id = state.keypair_by_name.get((project, name))
    if pair_id is None:
        raise NotFoundError(f"The resource could not be found: keypair {name!r}")
    return state.keypairs[pair_id]


def _visible_images(state: CloudState, project: str) -> list[Image]:
    return [i for i in state.images.values() if i.visibility == "public" or i.project == project]


def _image(state: CloudState, project: str, ref: str) -> Image:
    """An image ``project`` may use, by ID, else by name (its own first)."""
    visible = _visible_images(state, project)
    for image in visible:
        if image.id == ref:
            return image
    named = sorted((i for i in visible if i.name == ref), key=lambda i: i.project != project)
    if not named:
        raise NotFoundError(f"image {ref!r} not found")
    if len(named) > 1 and named[1].project == named[0].project:
        raise ConflictError(f"Multiple images named {ref!r} exist; use the ID")
    return named[0]


def _owned_image(state: CloudState, project: str, ref: str) -> Image:
    image = _image(state, project, ref)
    if image.project != project and project != ADMIN_PROJECT:
        raise ForbiddenError(
            f"image {image.name!r} belongs to project {image.project!r}; "
            "only its owner may change or delete it"
        )
    return image


def _properties(current: dict[str, str], items: Sequence[str]) -> dict[str, str]:
    """``current`` with each ``KEY=VALUE`` of ``items`` set."""
    props = dict(current)
    for item in items:
        key, value = parse_key_value(item, "property")
        props[key] = value
    return props


def _metadata(current: dict[str, str], items: Sequence[str]) -> dict[str, str]:
    """``current`` with each ``KEY=VALUE`` set; at most MAX_METADATA_ITEMS items."""
    metadata = dict(current)
    for item in items:
        key, value = parse_key_value(item, "metadata")
        metadata[key] = value
    if len(metadata) > MAX_METADATA_ITEMS:
        raise QuotaError(
            f"Quota exceeded for metadata_items: {len(metadata)} items, "
            f"at most {MAX_METADATA_ITEMS}"
        )
    return metadata


def _user_data(data: bytes | None) -> str | None:
    if data is None:
        return None
    import base64

    encoded = base64.b64encode(data).decode("ascii")
    if len(encoded) > MAX_USER_DATA_B64:
        raise ValidationError(
            f"User data too large. User data must be no larger than {MAX_USER_DATA_B64} "
            f"bytes once base64 encoded. Your data is {len(encoded)} bytes"
        )
    return encoded


def _check_fits(flavor: Flavor, image: Image, check_disk: bool = True) -> None:
    """nova's checks of an image against the flavor it boots with (the disk not when
    the instance boots from a volume: the flavor's disk is then not used)."""
    if image.min_ram > flavor.ram_mb:
        raise ConflictError(
            f"Flavor's memory is too small for requested image: flavor {flavor.name!r} has "
            f"{flavor.ram_mb} MB, image {image.name!r} needs {image.min_ram} MB"
        )
    # a flavor disk of "0" is the image's own size (the guide's Disk column)
    if flavor.disk_gb == 0 or not check_disk:
        return
    if image.min_disk > flavor.disk_gb:
        raise ConflictError(
            f"Flavor's disk is too small for requested image: flavor {flavor.name!r} has "
            f"{flavor.disk_gb} GB, image {image.name!r} needs {image.min_disk} GB"
        )
    if image.size is not None and image.size > flavor.disk_gb * 2**30:
        raise ConflictError(
            f"Flavor's disk is too small for requested image: flavor {flavor.name!r} has "
            f"{flavor.disk_gb} GB, image {image.name!r} is {image.size} bytes"
        )


def iso_time(ns: int) -> str:
    """A time in nanoseconds as nova prints it (``2012-05-16T20:48:23Z``)."""
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _allocate(state: CloudState, network: Network, cidr: str | None, hint_key: str) -> Any:
    """The lowest free address of ``cidr`` on ``network`` (None when cidr is None).

    The address is reserved at once, so a second port in the same batch cannot
    take it; the per-subnet hint keeps bulk allocation linear.
    """
    if cidr is None:
        return None
    used = state.used_ips[network.id]
    found = first_free(used, cidr, state.alloc_hint.get(hint_key, 0))
    if found is None:
        raise ConflictError(f"network {network.name!r} has no free address in {cidr}")
    offset, address = found
    state.alloc_hint[hint_key] = offset + 1
    used.add(address)
    return address


#: Fresh ids tried before a boot gives up on finding an unused tap name.
PORT_ID_ATTEMPTS = 8


def _new_port_id(taps: Any) -> str:
    """A new port id whose tap name (``tap`` + its first 11 characters) is not in
    ``taps`` (then added to it). ConflictError when every attempt collides —
    with random UUIDs that means the id source is broken, not bad luck."""
    for _ in range(PORT_ID_ATTEMPTS):
        port_id = new_port_id()
        tap = tap_name(port_id)
        if tap not in taps:
            taps.add(tap)
            return port_id
    raise ConflictError(f"could not allocate a port whose tap name is unused "
                        f"({PORT_ID_ATTEMPTS} attempts)")


def _new_mac(used: Any) -> str:
    """A random, unused MAC with OpenStack's ``fa:16:3e`` prefix."""
    import random

    rng = random.SystemRandom()
    while True:
        mac = MAC_PREFIX + "".join(f":{rng.randrange(256):02x}" for _ in range(3))
        if mac not in used:
            used.add(mac)
            return mac


def _with_groups(instance: Instance, groups: tuple[str, ...]) -> Instance:
    return replace(instance, security_groups=groups, updated=time.time_ns())


def _prefetch_ports(state: CloudState, instances: list[Instance]) -> None:
    """Read the ports of ``instances`` and their networks together (a page's
    rows: a few requests, not a few per row)."""
    state.prefetch_buckets("ports-by-instance", [i.id for i in instances])
    port_ids = sorted({p for i in instances for p in state.ports_by_instance.get(i.id, ())})
    state.prefetch(Port.KIND, port_ids)
    state.prefetch(Network.KIND, sorted({state.ports[p].network_id for p in port_ids}))


def _fixed_addresses(state: CloudState, instance: Instance) -> dict[str, list[str]]:
    """An instance's fixed IPv4 addresses by network name, ports in id order."""
    networks: dict[str, list[str]] = {}
    ports = state.ports_of(instance.id)
    for port in ports:
        networks.setdefault(state.networks[port.network_id].name, []).append(port.ip)
    return networks


def _port_view(state: CloudState, port: Port, instance: Instance) -> PortView:
    return PortView(
        id=port.id,
        instance=instance.name,
        instance_id=instance.id,
        project=instance.project,
        host=instance.host,
        network=state.networks[port.network_id].name,
        tap=port.tap,
        mac=port.mac,
        ip=port.ip,
        security_groups=tuple(state.groups[g].name for g in instance.security_groups),
        ip6=port.ip6,
        port_security=port.port_security,
        allowed_address_pairs=port.allowed_address_pairs,
    )


def _check_outside_pools(state: CloudState, cidr: str) -> None:
    """A network must not overlap a floating pool (its addresses are public)."""
    new = ipaddress.ip_network(cidr)
    for pool in state.floating_pools.values():
        if ipaddress.ip_network(pool.cidr).overlaps(new):
            raise ConflictError(f"network {cidr} overlaps floating IP pool {pool.name!r} "
                                f"({pool.cidr})")


def _floating_pool(state: CloudState, name: str | None) -> FloatingPool:
    """The pool called ``name`` (or with that id); by default ``nova``, else the only one."""
    pools = sorted(state.floating_pools.values(), key=lambda p: p.name)
    if name is None:
        default = [p for p in pools if p.name == "nova"] or pools
        if len(default) == 1:
            return default[0]
        raise (NotFoundError("no floating IP pool exists") if not pools else
               ValidationError("several floating IP pools exist: name one"))
    found = next((p for p in pools if name in (p.name, p.id)), None)
    if found is None:
        raise NotFoundError(f"floating IP pool {name!r} not found")
    return found


def _floating_ip(state: CloudState, project: str, address: str) -> FloatingIp:
    """The project's floating IP ``address``; another project's is not found."""
    floating = state.floating_ips.get(parse_ipv4_address(address, "floating IP address"))
    if floating is None or floating.project != project:
        raise NotFoundError(
            f"floating IP {address.strip()} not found (not allocated to project {project!r})")
    return floating


def _owner_name(state: CloudState, floating: FloatingIp) -> str:
    port = state.ports.get(floating.port_id or "")
    instance = state.instances.get(port.instance_id) if port else None
    return f"server {instance.name!r}" if instance else "a server"


def _floating_port(state: CloudState, instance: Instance, fixed: str | None) -> Port:
    """The port of ``instance`` a floating IP maps to: the one with IPv4 ``fixed``,
    by default the first."""
    ports = state.ports_of(instance.id)
    if not ports:
        raise ConflictError(f"instance {instance.name!r} has no port to associate with")
    if fixed is None:
        return ports[0]
    found = [p for p in ports if p.ip == fixed]
    if not found:
        raise NotFoundError(f"instance {instance.name!r} has no fixed address {fixed}")
    if len(found) > 1:  # two overlapping VLAN networks: the address names no one port
        raise ConflictError(f"instance {instance.name!r} has fixed address {fixed} on "
                            f"{len(found)} networks: detach one, or associate by default")
    return found[0]


def _check_quota_covers_usage(state: CloudState, quota: Quota) -> None:
    _check_quota_limits(state, quota)
    groups = [g for g in state.groups.values() if g.project == quota.id]
    if quota.security_groups != UNLIMITED and len(groups) > quota.security_groups:
        raise QuotaError(
            f"security_groups quota {quota.security_groups} is below the {len(groups)} "
            f"groups project {quota.id!r} already has"
        )
    most = max((len(state.rules_by_group.get(g.id, {})) for g in groups), default=0)
    if quota.security_group_rules != UNLIMITED and most > quota.security_group_rules:
        raise QuotaError(
            f"security_group_rules quota {quota.security_group_rules} is below the {most} "
            f"rules a group of project {quota.id!r} already has"
        )
    held = sum(1 for f in state.floating_ips.values() if f.project == quota.id)
    if quota.floating_ips != UNLIMITED and held > quota.floating_ips:
        raise QuotaError(f"floating_ips quota {quota.floating_ips} is below the {held} "
                         f"floating IPs project {quota.id!r} holds")


def _check_quota_limits(state: CloudState, quota: Quota) -> None:
    """The compute and volume quotas of ``quota`` are not below what is used."""
    used = {**compute_usage(state, quota.id), **volume_usage(state, quota.id)}
    for name, amount in used.items():
        limit = getattr(quota, name)
        if limit != UNLIMITED and amount > limit:
            raise QuotaError(f"{name} quota {limit} is below the {amount} project "
                             f"{quota.id!r} already uses")


# ---------------------------------------------------------------------- scheduling

#: The order nova prints a fault's keys in (the guide: message, code, created);
#: the stores keep JSON objects with sorted keys.
FAULT_KEYS = ("message", "code", "created")


def _nova_fault(fault: dict[str, Any] | None) -> dict[str, Any] | None:
    if fault is None:
        return None
    return {key: fault[key] for key in (*FAULT_KEYS, *sorted(set(fault) - set(FAULT_KEYS)))
            if key in fault}



#: nova's power states of a server that runs (1) and of one that never started (0).
NOVA_RUNNING = 1
NOVA_NOSTATE = 0


def _host_id(instance: Instance, admin: bool) -> str:
    """nova's ``hostId``: the host itself for the admin project (the guide: admins
    see the compute node there), else SHA-224 of project and host; blank when
    scheduling failed."""
    if admin or not instance.host:
        return instance.host
    import hashlib

    return hashlib.sha224((instance.project + instance.host).encode()).hexdigest()


def _image_shown(state: CloudState, instance: Instance) -> str:
    """``name (ID)``; the bare ID once the image is deleted; nova's sentence when
    the server boots from a volume."""
    image = state.images.get(instance.image_id)
    if image is not None:
        return f"{image.name} ({image.id})"
    return instance.image_id or BOOT_FROM_VOLUME


def _addresses_by_network(state: CloudState, instance: Instance) -> dict[str, list[str]]:
    """Each network's name → the instance's addresses on it, in port order: the
    fixed IPv4 address, the IPv6 address, then the floating IPs mapped to the port."""
    ports = state.ports_of(instance.id)
    floating: dict[str, list[str]] = {port.id: [] for port in ports}
    for address in sorted(state.floating_ips.values(), key=lambda f: ipaddress.ip_address(f.id)):
        if address.port_id in floating:
            floating[address.port_id].append(address.id)
    networks: dict[str, list[str]] = {}
    for port in ports:
        found = networks.setdefault(state.networks[port.network_id].name, [])
        found += [port.ip, *([port.ip6] if port.ip6 else []), *floating[port.id]]
    return networks


def _no_valid_host(now: int) -> dict[str, Any]:
    """nova's fault of an instance the scheduler could not place."""
    return {"message": "NoValidHost", "code": 500, "created": iso_time(now)}


def _check_boot_quotas(state: CloudState, project: str, demand: Demand,
                       sources: Sequence[Volume | VolumeSnapshot]) -> None:
    """instances, cores and ram for one more instance; volumes and gigabytes for
    the volumes its mappings make from snapshots."""
    check_quota(state.quota(project), compute_usage(state, project),
                {"instances": 1, "cores": demand.vcpus, "ram": demand.ram_mb})
    _check_snapshot_volumes_quota(state, project, sources)


def _place(state: CloudState, host: str | None, demand: Demand,
           required: dict[str, str]) -> str | None:
    """Where an instance goes: the scheduler's choice (``host`` None), a registered
    ``host`` if it fits, an unregistered one as given; None: no valid host."""
    if host is None:
        return choose_host(state, demand, required)
    registered = state.hosts.get(host)
    if registered is None:
        return host
    return host if host_fits(state, registered, demand, required) else None


def _host(state: CloudState, name: str) -> Host:
    found = state.hosts.get(name)
    if found is None:
        raise NotFoundError(f"compute host {name!r} is not registered")
    return found


def _check_capacity_covers_usage(state: CloudState, host: Host) -> None:
    """A host registered under a name instances already run on must hold them."""
    used = host_usage(state, host.id)
    for what, have, need in (("vcpus", host.vcpus, used.vcpus),
                             ("ram-mb", host.ram_mb, used.ram_mb),
                             ("disk-gb", host.disk_gb, used.disk_gb)):
        if have < need:
            raise ConflictError(f"compute host {host.id!r}: {what} {have} is below the {need} "
                                "its instances already use")


# ---------------------------------------------------------------------- volumes

#: The root disk's device: a volume mapped there is booted from.
ROOT_DEVICE = "/dev/vda"


def _label(volume: Volume) -> str:
    return repr(volume.name) if volume.name else volume.id


def _check_volume_text(name: str | None, description: str | None) -> None:
    if name is not None:
        check_name(name, "display name")
    if description is not None:
        _check_description(description)


BlockRecord = TypeVar("BlockRecord", Volume, VolumeSnapshot)


def _volume(state: CloudState, project: str, ref: str) -> Volume:
    """A volume of ``project`` by ID, else by display name (unique)."""
    return _by_id_or_name(state.volumes, project, ref, "volume")


def _volume_snapshot(state: CloudState, project: str, ref: str) -> VolumeSnapshot:
    """A volume snapshot of ``project`` by ID, else by display name (unique)."""
    return _by_id_or_name(state.volume_snapshots, project, ref, "snapshot")


def _by_id_or_name(records: dict[str, BlockRecord], project: str, ref: str,
                   what: str) -> BlockRecord:
    """The record of ``project`` whose ID is ``ref``, else the one display name
    ``ref`` (cinder's lookup): NotFoundError for none, ConflictError for several."""
    found = records.get(ref)
    if found is not None and found.project == project:
        return found
    named = [r for r in records.values() if r.project == project and r.name == ref]
    if not named:
        raise NotFoundError(f"No {what} with a name or ID of {ref!r} exists.")
    if len(named) > 1:
        raise ConflictError(f"Multiple {what}s named {ref!r} exist; use the ID")
    return named[0]


def _volumes_of(state: CloudState, instance_id: str) -> list[Volume]:
    return [state.volumes[v] for v in sorted(state.volumes_by_instance.get(instance_id, ()))]


def _snapshots_of(state: CloudState, volume_id: str) -> list[VolumeSnapshot]:
    return [state.volume_snapshots[s]
            for s in sorted(state.snapshots_by_volume.get(volume_id, ()))]


def _free_device(used: set[str | None]) -> str:
    """The first ``/dev/vdX`` not in ``used`` (nova's automatic device names)."""
    for letter in "bcdefghijklmnopqrstuvwxyz":
        device = f"/dev/vd{letter}"
        if device not in used:
            return device
    raise ConflictError("no free device name left on the server (vdb-vdz are in use)")


def _check_active(instance: Instance, what: str) -> None:
    if instance.state != "ACTIVE":
        raise ConflictError(f"Cannot {what} server {instance.name!r} while it is in "
                            f"vm_state {instance.state.lower()}")


def _check_image_fits_volume(image: Image, size_gb: int) -> None:
    if image.min_disk > size_gb or (image.size or 0) > size_gb * 2**30:
        raise ValidationError(f"size {size_gb} GB is smaller than image {image.name!r} "
                              "needs")


def _parse_mappings(texts: Sequence[str]) -> list[BlockDeviceMapping]:
    """The boot's ``--block-device-mapping`` items: one per device and per source."""
    mappings = [parse_block_device(t) for t in texts]
    if len({m.device for m in mappings}) != len(mappings):
        raise ValidationError("a device is mapped more than once in --block-device-mapping")
    if len({(m.snapshot, m.source) for m in mappings}) != len(mappings):
        raise ValidationError("a volume or snapshot is mapped more than once")
    return mappings


def _mapping_source(state: CloudState, project: str,
                    mapping: BlockDeviceMapping) -> Volume | VolumeSnapshot:
    """The volume (available) or snapshot a mapping names, its size checked."""
    if mapping.snapshot:
        snap = _volume_snapshot(state, project, mapping.source)
        if mapping.size_gb is not None and mapping.size_gb < snap.size_gb:
            raise ValidationError(f"block device size {mapping.size_gb} GB is smaller than "
                                  f"the snapshot's {snap.size_gb} GB")
        return snap
    volume = _volume(state, project, mapping.source)
    if volume.attached_to is not None:
        raise InUseError(f"volume {_label(volume)} is already attached to a server")
    if mapping.size_gb is not None and mapping.size_gb != volume.size_gb:
        raise ValidationError(f"block device size {mapping.size_gb} GB does not match "
                              f"volume {_label(volume)} ({volume.size_gb} GB)")
    return volume


def _check_snapshot_volumes_quota(state: CloudState, project: str,
                                  sources: Sequence[Volume | VolumeSnapshot]) -> None:
    """Volumes a boot makes from snapshots count against volumes and gigabytes."""
    snaps = [s for s in sources if isinstance(s, VolumeSnapshot)]
    if snaps:
        check_quota(state.quota(project), volume_usage(state, project),
                    {"volumes": len(snaps), "gigabytes": sum(s.size_gb for s in snaps)})


def _attach_mapping(project: str, instance_id: str, mapping: BlockDeviceMapping,
                    source: Volume | VolumeSnapshot, now: int) -> Volume:
    """The volume a mapping attaches: the one named, or a new one from a snapshot."""
    if isinstance(source, Volume):
        return replace(source, attached_to=instance_id, device=mapping.device,
                       delete_on_termination=mapping.delete_on_termination)
    return Volume(new_id(), project, None, mapping.size_gb or source.size_gb,
                  snapshot_id=source.id, attached_to=instance_id, device=mapping.device,
                  delete_on_termination=mapping.delete_on_termination, created=now)

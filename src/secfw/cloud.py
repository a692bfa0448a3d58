"""The whole cloud in memory, indexed: what the API mutates and the compiler reads.

:class:`CloudState` holds every record by id plus the indexes the API and the
compiler need to stay O(1) per operation (groups by project and name, rules by
group, ports by instance and by network, instances by group, used addresses
per network). Every mutation goes through :meth:`put` / :meth:`remove`, which keep the
indexes exact and record the change in :attr:`dirty` so a write transaction can
persist exactly what changed. :meth:`apply_changes` replays a store change feed,
which is how a long-running agent follows the cloud without reloading it.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from secfw.model import (
    RECORD_TYPES,
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
    Record,
    Rule,
    SecurityGroup,
    Setting,
    Volume,
    VolumeSnapshot,
)
from secfw.store.base import Change, Snapshot

R = TypeVar("R", bound=Record)
#: A record as it was and as it is now (None: did not exist / no longer exists).
Replaced = tuple[Record | None, Record | None]


class CloudState:
    """Every record of the cloud, with exact secondary indexes."""

    # Each index is derived from the records of one kind (see _INDEXES below).
    group_by_name: dict[tuple[str, str], str]
    projects: set[str]
    rules_by_group: dict[str, dict[str, Rule]]
    rules_by_remote: dict[str, set[str]]
    instances_by_group: dict[str, set[str]]
    ports_by_instance: dict[str, set[str]]
    ports_by_network: dict[str, set[str]]
    used_ips: dict[str, set[str]]
    used_macs: set[str]
    #: lowest offset that may be free, per network (reset when an address is freed)
    alloc_hint: dict[str, int]
    keypair_by_name: dict[tuple[str, str], str]
    #: associated floating addresses by port id
    floating_by_port: dict[str, set[str]]

    def __init__(self, revision: int = 0) -> None:
        self.revision = revision
        self.records: dict[str, dict[str, Any]] = {kind: {} for kind in RECORD_TYPES}
        self.dirty: dict[tuple[str, str], Record | None] = {}
        self._fetch: Callable[[str], dict[str, Any]] | None = None
        for kind in _INDEXES:
            self._new_indexes(kind)

    def _new_indexes(self, kind: str) -> None:
        for name, empty in _INDEXES[kind].items():
            setattr(self, name, empty())

    # ------------------------------------------------------------------ loading

    @classmethod
    def lazy(cls, snapshot: Snapshot) -> CloudState:
        """A state that reads a kind of record from ``snapshot`` (see
        :meth:`Snapshot.kind`) the first time anything touches that kind: its
        records or one of its indexes. What a write command costs then follows
        what it touches — a rule added to a group never parses the ports.

        Same behaviour as :meth:`from_snapshot` otherwise: every view and index
        is exact once read."""
        state = cls.__new__(cls)
        state.revision = snapshot.revision
        state.records = _LazyRecords(state._load_kind)
        state.dirty = {}
        state._fetch = snapshot.kind
        return state

    def _load_kind(self, kind: str) -> None:
        """Read and index every record of ``kind`` (a lazy state, first use)."""
        record_type = RECORD_TYPES.get(kind)
        dict.__setitem__(self.records, kind, {})
        if kind in _INDEXES:
            self._new_indexes(kind)
        if record_type is None or self._fetch is None:
            return
        for doc in self._fetch(kind).values():
            self._index(record_type.from_doc(doc))

    if not TYPE_CHECKING:  # keep mypy strict about CloudState's attributes

        def __getattr__(self, name: str) -> Any:
            """An index of a lazy state not built yet: read its kind first. (Only
            called for attributes that do not exist: an eager state never gets here.)"""
            kind = _INDEX_KIND.get(name)
            if kind is None or name.startswith("__") or "_fetch" not in self.__dict__:
                raise AttributeError(name)
            self.records[kind]  # reading the kind builds its indexes
            return self.__dict__[name]

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> CloudState:
        state = cls(snapshot.revision)
        # Instances before ports and groups before rules keeps nothing special to
        # order: indexes only ever point by id, so any order is correct.
        for kind, docs in snapshot.all_docs().items():
            record_type = RECORD_TYPES.get(kind)
            if record_type is None:
                continue
            for doc in docs.values():
                state._index(record_type.from_doc(doc))
        return state

    def apply_changes(self, revision: int, changes: Iterable[Change]) -> list[Replaced]:
        """Replay a change feed (see :meth:`Store.changes_since`) onto this state.

        Returns every record replaced, in feed order, as ``(old, new)``: ``old`` None
        for a record created, ``new`` None for one deleted (what an incremental
        compiler needs to know what to recompute)."""
        replaced: list[Replaced] = []
        for change in changes:
            record_type = RECORD_TYPES.get(change.kind)
            if record_type is None:
                continue
            old = self.records[change.kind].get(change.id)
            if old is not None:
                self._unindex(old)
            new = record_type.from_doc(change.doc) if change.doc is not None else None
            if new is not None:
                self._index(new)
            replaced.append((old, new))
        self.revision = revision
        return replaced

    # ------------------------------------------------------------------ mutation

    def put(self, record: Record) -> None:
        """Insert or replace a record (by kind and id), keeping indexes exact."""
        old = self.records[record.KIND].get(record.id)  # type: ignore[attr-defined]
        if old is not None:
            self._unindex(old)
        self._index(record)
        self.dirty[(record.KIND, record.id)] = record  # type: ignore[attr-defined]

    def remove(self, record: Record) -> None:
        """Delete a record; a no-op if it is already gone."""
        current = self.records[record.KIND].get(record.id)  # type: ignore[attr-defined]
        if current is None:
            return
        self._unindex(current)
        self.dirty[(record.KIND, record.id)] = None  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ typed views

    @property
    def networks(self) -> dict[str, Network]:
        return self.records[Network.KIND]

    @property
    def groups(self) -> dict[str, SecurityGroup]:
        return self.records[SecurityGroup.KIND]

    @property
    def rules(self) -> dict[str, Rule]:
        return self.records[Rule.KIND]

    @property
    def images(self) -> dict[str, Image]:
        return self.records[Image.KIND]

    @property
    def instances(self) -> dict[str, Instance]:
        return self.records[Instance.KIND]

    @property
    def ports(self) -> dict[str, Port]:
        return self.records[Port.KIND]

    @property
    def quotas(self) -> dict[str, Quota]:
        return self.records[Quota.KIND]

    @property
    def flavors(self) -> dict[str, Flavor]:
        """Stored flavors by flavor ID (see :func:`secfw.api.visible_flavors` for the
        five defaults of a store that never stored a flavor)."""
        return self.records[Flavor.KIND]

    @property
    def keypairs(self) -> dict[str, Keypair]:
        return self.records[Keypair.KIND]

    @property
    def settings(self) -> dict[str, Setting]:
        return self.records[Setting.KIND]

    @property
    def floating_pools(self) -> dict[str, FloatingPool]:
        return self.records[FloatingPool.KIND]

    @property
    def floating_ips(self) -> dict[str, FloatingIp]:
        """Allocated floating IPs by address."""
        return self.records[FloatingIp.KIND]

    def floating_of(self, port_id: str) -> list[FloatingIp]:
        """The floating IPs associated with a port, by address."""
        return [self.floating_ips[a] for a in sorted(self.floating_by_port.get(port_id, ()))]

    @property
    def hosts(self) -> dict[str, Host]:
        """Registered compute hosts by name."""
        return self.records[Host.KIND]

    @property
    def volumes(self) -> dict[str, Volume]:
        return self.records[Volume.KIND]

    @property
    def volume_snapshots(self) -> dict[str, VolumeSnapshot]:
        return self.records[VolumeSnapshot.KIND]

    def ports_of(self, instance_id: str) -> list[Port]:
        return sorted(
            (self.ports[p] for p in self.ports_by_instance.get(instance_id, ())), key=lambda p: p.id
        )

    def group_members(self, group_id: str) -> list[Instance]:
        """Instances that use the group (what a source-group rule selects)."""
        return [self.instances[i] for i in sorted(self.instances_by_group.get(group_id, ()))]

    def quota(self, project: str) -> Quota:
        return self.quotas.get(project) or Quota(project)

    def overlapping_subnets(self, network_id: str) -> tuple[str, ...]:
        """The subnets (IPv4 and IPv6 CIDRs) of every other network that overlaps
        network ``network_id``, sorted; empty for nearly every network (only two
        VLAN networks may overlap). An address inside one of them is not
        ``network_id``'s alone: the same address exists in another network."""
        found = self.__dict__.get("_overlapping")
        if found is None:
            found = self.__dict__["_overlapping"] = _overlaps(self.networks.values())
        return found.get(network_id, ())

    def twin_claims(self, network_id: str) -> tuple[str, ...]:
        """What the ports of the *other* networks overlapping ``network_id`` may send
        from inside the overlap (their fixed addresses and address pairs, clipped
        to both subnets), as CIDRs: the addresses that exist twice. Empty unless
        the network overlaps another."""
        twins: dict[str, tuple[str, ...]] = self.__dict__.setdefault("_twins", {})
        found = twins.get(network_id)
        if found is None:
            found = twins[network_id] = self._claims_of_twins(network_id)
        return found

    def _forget_overlaps(self, record: Network | Port) -> None:
        """Drop the caches of :meth:`overlapping_subnets` (a network changed) and
        :meth:`twin_claims` (a network or a port changed). They live in
        ``__dict__`` only: a lazy state is built without ``__init__``."""
        if isinstance(record, Network):
            self.__dict__.pop("_overlapping", None)
        self.__dict__.pop("_twins", None)

    def _claims_of_twins(self, network_id: str) -> tuple[str, ...]:
        mine = self.overlapping_subnets(network_id)
        if not mine:
            return ()
        home = self.networks[network_id]
        own = [ipaddress.ip_network(c) for c in (home.cidr, home.cidr6) if c]
        claims: list[str] = []
        for other in self.networks.values():
            subnets = [ipaddress.ip_network(c) for c in (other.cidr, other.cidr6) if c]
            if other.id == network_id or not any(
                    s.version == o.version and s.overlaps(o) for s in subnets for o in own):
                continue
            for port_id in self.ports_by_network.get(other.id, ()):
                port = self.ports[port_id]
                sent = [c for c in (port.ip, port.ip6) if c]
                sent += [c for c, _ in port.address_pairs()]
                claims += [str(p) for c in sent for p in _clipped(c, subnets, own)]
        return tuple(sorted(set(claims)))

    # ------------------------------------------------------------------ indexes

    def _index(self, record: Record) -> None:
        self.records[record.KIND][record.id] = record  # type: ignore[attr-defined]
        if isinstance(record, Network | Port):
            self._forget_overlaps(record)
        if isinstance(record, SecurityGroup):
            self.group_by_name[(record.project, record.name)] = record.id
            self.projects.add(record.project)
        elif isinstance(record, Rule):
            self.rules_by_group[record.group_id][record.id] = record
            if record.remote_group_id:
                self.rules_by_remote[record.remote_group_id].add(record.id)
        elif isinstance(record, Instance):
            for group_id in record.security_groups:
                self.instances_by_group[group_id].add(record.id)
        elif isinstance(record, Keypair):
            self.keypair_by_name[(record.project, record.name)] = record.id
        elif isinstance(record, FloatingIp):
            if record.port_id is not None:
                self.floating_by_port[record.port_id].add(record.id)
        elif isinstance(record, Port):
            self.ports_by_instance[record.instance_id].add(record.id)
            self.ports_by_network[record.network_id].add(record.id)
            self.used_ips[record.network_id].add(record.ip)
            if record.ip6:
                self.used_ips[record.network_id].add(record.ip6)
            self.used_macs.add(record.mac)

    def _unindex(self, record: Record) -> None:
        del self.records[record.KIND][record.id]  # type: ignore[attr-defined]
        if isinstance(record, Network | Port):
            self._forget_overlaps(record)
        if isinstance(record, SecurityGroup):
            self.group_by_name.pop((record.project, record.name), None)
        elif isinstance(record, Rule):
            _discard(self.rules_by_group, record.group_id, record.id)
            if record.remote_group_id:
                _discard(self.rules_by_remote, record.remote_group_id, record.id)
        elif isinstance(record, Instance):
            for group_id in record.security_groups:
                _discard(self.instances_by_group, group_id, record.id)
        elif isinstance(record, Keypair):
            self.keypair_by_name.pop((record.project, record.name), None)
        elif isinstance(record, FloatingIp):
            if record.port_id is not None:
                _discard(self.floating_by_port, record.port_id, record.id)
        elif isinstance(record, Port):
            _discard(self.ports_by_instance, record.instance_id, record.id)
            _discard(self.ports_by_network, record.network_id, record.id)
            _discard(self.used_ips, record.network_id, record.ip)
            if record.ip6:
                _discard(self.used_ips, record.network_id, record.ip6)
                self.alloc_hint.pop(record.network_id + "/6", None)
            self.used_macs.discard(record.mac)
            self.alloc_hint.pop(record.network_id, None)


#: The indexes of each kind, with how to make an empty one.
_INDEXES: dict[str, dict[str, Callable[[], Any]]] = {
    SecurityGroup.KIND: {"group_by_name": dict, "projects": set},
    Rule.KIND: {"rules_by_group": lambda: defaultdict(dict),
                "rules_by_remote": lambda: defaultdict(set)},
    Instance.KIND: {"instances_by_group": lambda: defaultdict(set)},
    Port.KIND: {"ports_by_instance": lambda: defaultdict(set),
                "ports_by_network": lambda: defaultdict(set),
                "used_ips": lambda: defaultdict(set), "used_macs": set, "alloc_hint": dict},
    Keypair.KIND: {"keypair_by_name": dict},
    FloatingIp.KIND: {"floating_by_port": lambda: defaultdict(set)},
}
_INDEX_KIND = {name: kind for kind, names in _INDEXES.items() for name in names}


class _LazyRecords(dict[str, dict[str, Any]]):
    """``records`` of a lazy state: a kind missing is read on first access."""

    def __init__(self, load: Callable[[str], None]) -> None:
        super().__init__()
        self._load = load

    def __missing__(self, kind: str) -> dict[str, Any]:
        self._load(kind)
        return dict.__getitem__(self, kind)


def _overlaps(networks: Iterable[Network]) -> dict[str, tuple[str, ...]]:
    """network id -> the sorted subnets of the other networks overlapping it.

    Two CIDRs overlap only when one contains the other, so each subnet is looked
    up among its own supernets (at most 32 or 128 of them): O(networks × prefix
    length), not O(networks²) — the bench clouds have thousands of networks."""
    networks = list(networks)
    by_subnet: dict[Any, list[str]] = defaultdict(list)
    subnets: list[tuple[str, Any]] = []
    for network in networks:
        for cidr in filter(None, (network.cidr, network.cidr6)):
            parsed = ipaddress.ip_network(cidr)
            by_subnet[parsed].append(network.id)
            subnets.append((network.id, parsed))
    text = {n.id: tuple(filter(None, (n.cidr, n.cidr6))) for n in networks}
    found: dict[str, set[str]] = defaultdict(set)
    for network_id, subnet in subnets:
        for prefix in range(subnet.prefixlen + 1):
            for other in by_subnet.get(subnet.supernet(new_prefix=prefix), ()):
                if other != network_id:  # other's subnet contains this one's
                    found[network_id].update(
                        c for c in text[other] if ipaddress.ip_network(c).overlaps(subnet))
                    found[other].add(str(subnet))
    return {k: tuple(sorted(v)) for k, v in found.items()}


def _clipped(cidr: str, theirs: list[Any], mine: list[Any]) -> list[Any]:
    """The part of ``cidr`` inside one of ``theirs`` and one of ``mine`` (CIDRs
    are nested or disjoint: each intersection is the smaller of the two)."""
    parts = [ipaddress.ip_network(cidr, strict=False)]
    for bound in (theirs, mine):
        parts = [p if p.subnet_of(b) else b for p in parts for b in bound
                 if b.version == p.version and p.overlaps(b)]
    return parts


def _discard(index: dict[str, Any], key: str, member: str) -> None:
    """Remove ``member`` from ``index[key]`` (a set or dict) and drop empty keys."""
    bucket = index.get(key)
    if bucket is None:
        return
    if isinstance(bucket, dict):
        bucket.pop(member, None)
    else:
        bucket.discard(member)
    if not bucket:
        del index[key]


def free_addresses(cidr: str, used: set[str], start: int = 0) -> Iterator[tuple[int, str]]:
    """Allocatable addresses of a subnet in order, as ``(offset, address)``.

    Skips the network address, the gateway (the first host, ``.1``/``::1``) and
    the last address (IPv4 broadcast; kept free in IPv6 too, for symmetry), and
    anything in ``used``. ``start`` is an offset hint.
    """
    net = ipaddress.ip_network(cidr)
    first = max(start, 2)
    for offset in range(first, net.num_addresses - 1):
        address = str(net.network_address + offset)
        if address not in used:
            yield offset, address

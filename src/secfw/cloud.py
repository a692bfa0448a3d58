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

import bisect
import ipaddress
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

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
from secfw.store.indexes import (
    INDEX_KINDS,
    TALLY_KINDS,
    add_tally,
    address_bucket,
    entries,
    pair,
    past_runs,
    runs_contain,
    tallies,
    tally_delta,
)

R = TypeVar("R", bound=Record)
#: A record as it was and as it is now (None: did not exist / no longer exists).
Replaced = tuple[Record | None, Record | None]


class CloudState:
    """Every record of the cloud, with exact secondary indexes."""

    # Each index is derived from the records of one kind (see _INDEXES below).
    group_by_name: dict[tuple[str, str], str]
    rules_by_group: dict[str, dict[str, Rule]]
    rules_by_remote: dict[str, set[str]]
    instances_by_group: dict[str, set[str]]
    instances_by_name: dict[tuple[str, str], set[str]]
    used_taps: set[str] | _PointSet
    volumes_by_instance: dict[str, set[str]]
    snapshots_by_volume: dict[str, set[str]]
    ports_by_instance: dict[str, set[str]]
    ports_by_network: dict[str, set[str]]
    used_ips: dict[str, set[str]]
    used_macs: set[str] | _PointSet
    #: lowest offset that may be free, per network (reset when an address is freed)
    alloc_hint: dict[str, int]
    keypair_by_name: dict[tuple[str, str], str]
    #: associated floating addresses by port id
    floating_by_port: dict[str, set[str]]

    def __init__(self, revision: int = 0) -> None:
        self.revision = revision
        self.records: dict[str, dict[str, Any]] = {kind: {} for kind in RECORD_TYPES}
        self.dirty: dict[tuple[str, str], Record | None] = {}
        self._snapshot: Snapshot | None = None
        for kind in _INDEXES:
            self._new_indexes(kind)

    def _new_indexes(self, kind: str) -> None:
        for name, empty in _INDEXES[kind].items():
            setattr(self, name, empty())

    # ------------------------------------------------------------------ loading

    @classmethod
    def lazy(cls, snapshot: Snapshot) -> CloudState:
        """A state that reads what it is asked for, by key, from ``snapshot``
        (a write transaction's: :class:`~secfw.store.base.KeyedSnapshot`): a
        record by id, an index by key (one bucket of the store's derived
        indexes, :mod:`secfw.store.indexes`), a tally (:meth:`usage`). Only
        iterating over a whole kind or index reads the whole kind. What a write
        costs then follows the keys it touches, not the size of the cloud.

        Same answers as :meth:`from_snapshot` otherwise: every view and index
        is exact, this transaction's own changes included."""
        state = cls.__new__(cls)
        state.revision = snapshot.revision
        state.dirty = {}
        state._snapshot = snapshot
        state.records = {kind: _KeyedKind(state, kind) for kind in RECORD_TYPES}
        for name, (index, shape) in _KEYED_VIEWS.items():
            setattr(state, name, _IndexView(state, index, shape))
        state.used_ips = _UsedAddresses(state)
        state.used_macs = _PointSet(state, "mac")
        state.used_taps = _PointSet(state, "tap")
        state.alloc_hint = {}
        return state

    def usage(self, name: str, bucket: str) -> dict[str, int]:
        """A tally of :func:`secfw.store.indexes.tallies` (a project's groups,
        instances, cores and RAM; a host's placed instances), this state's own
        changes included; a missing field is 0."""
        snapshot = self._snapshot
        if snapshot is None:
            return self._eager_tallies(name).get((name, bucket), {})
        moved = self.__dict__.get("_moved", {}).get((name, bucket), {})
        return add_tally(snapshot.tally(name, bucket), moved)

    def _eager_tallies(self, name: str) -> dict[tuple[str, str], dict[str, int]]:
        """Every tally of one kind, summed once per state (and again after a
        change of that kind: :meth:`_index` drops the cache)."""
        kind = TALLY_KINDS[name]
        cache: dict[str, Any] = self.__dict__.setdefault("_tallies", {})
        if kind not in cache:
            totals: dict[tuple[str, str], dict[str, int]] = {}
            for record in self.records[kind].values():
                for key, fields in tallies(kind, record.to_doc()).items():
                    totals[key] = add_tally(totals.get(key, {}), fields)
            cache[kind] = totals
        found: dict[tuple[str, str], dict[str, int]] = cache[kind]
        return found

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
        self._track(old, record)
        self._index(record)
        self.dirty[(record.KIND, record.id)] = record  # type: ignore[attr-defined]

    def remove(self, record: Record) -> None:
        """Delete a record; a no-op if it is already gone."""
        current = self.records[record.KIND].get(record.id)  # type: ignore[attr-defined]
        if current is None:
            return
        self._unindex(current)
        self._track(current, None)
        self.dirty[(record.KIND, record.id)] = None  # type: ignore[attr-defined]

    def _track(self, old: Record | None, new: Record | None) -> None:
        """A lazy state's record of how its own changes move the store's index
        buckets and tallies (what a bucket or tally read later lays over the
        stored one): per change, not per read, so a batch of thousands of
        changes stays linear."""
        if self._snapshot is None:
            return
        record = new or old
        kind, doc_id = record.KIND, record.id  # type: ignore[union-attr]
        old_doc = old.to_doc() if old is not None else None
        new_doc = new.to_doc() if new is not None else None
        overlay: dict[tuple[str, str], dict[str, bool]] = self.__dict__.setdefault(
            "_overlay", {})
        after = entries(kind, doc_id, new_doc)
        for index, bucket, _ in entries(kind, doc_id, old_doc) - after:
            overlay.setdefault((index, bucket), {})[doc_id] = False
        for index, bucket, _ in after:
            overlay.setdefault((index, bucket), {})[doc_id] = True
        moved: dict[tuple[str, str], dict[str, int]] = self.__dict__.setdefault("_moved", {})
        for key, fields in tally_delta(kind, old_doc, new_doc).items():
            moved[key] = add_tally(moved.get(key, {}), fields)

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

    def prefetch(self, kind: str, ids: Iterable[str]) -> None:
        """Read these records together ahead of use (a lazy state; else nothing)."""
        if self._snapshot is not None:
            self._snapshot.prefetch(kind, list(ids))

    def prefetch_buckets(self, index: str, buckets: Iterable[str]) -> None:
        """Read these buckets of a store index together (a lazy state; else nothing)."""
        if self._snapshot is not None:
            self._snapshot.prefetch_buckets(index, list(buckets))

    def ordered(self, index: str, bucket: str, after: tuple[str, str] | None,
                chunk: int) -> Iterator[list[Any]]:
        """The records of ``bucket`` of an ordered index
        (:data:`~secfw.store.indexes.ORDER_INDEXES`) after the entry ``after``,
        in order, ``chunk`` entries read at a time (each chunk's records read
        together). A lazy state only: the store's index as of the
        transaction's start (this state's own changes are not in it)."""
        snapshot = self._snapshot
        if snapshot is None:
            raise TypeError("ordered() reads a store's index: a lazy state only")
        kind = INDEX_KINDS[index]
        while True:
            found = snapshot.page(index, bucket, after, chunk)
            self.prefetch(kind, [doc_id for _, doc_id in found])
            records = [self.records[kind].get(doc_id) for _, doc_id in found]
            yield [record for record in records if record is not None]
            if len(found) < chunk:
                return
            after = found[-1]

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
        self.__dict__.pop("_tallies", None)
        if isinstance(record, Network | Port):
            self._forget_overlaps(record)
        if isinstance(record, SecurityGroup):
            self.group_by_name[(record.project, record.name)] = record.id
        elif isinstance(record, Rule):
            self.rules_by_group[record.group_id][record.id] = record
            if record.remote_group_id:
                self.rules_by_remote[record.remote_group_id].add(record.id)
        elif isinstance(record, Instance):
            for group_id in record.security_groups:
                self.instances_by_group[group_id].add(record.id)
            self.instances_by_name[(record.project, record.name)].add(record.id)
        elif isinstance(record, Volume):
            if record.attached_to:
                self.volumes_by_instance[record.attached_to].add(record.id)
        elif isinstance(record, VolumeSnapshot):
            self.snapshots_by_volume[record.volume_id].add(record.id)
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
            self.used_taps.add(record.tap)

    def _unindex(self, record: Record) -> None:
        del self.records[record.KIND][record.id]  # type: ignore[attr-defined]
        self.__dict__.pop("_tallies", None)
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
            _discard(self.instances_by_name, (record.project, record.name), record.id)
        elif isinstance(record, Volume):
            if record.attached_to:
                _discard(self.volumes_by_instance, record.attached_to, record.id)
        elif isinstance(record, VolumeSnapshot):
            _discard(self.snapshots_by_volume, record.volume_id, record.id)
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
            self.used_taps.discard(record.tap)
            self.alloc_hint.pop(record.network_id, None)


#: The indexes of each kind, with how to make an empty one.
_INDEXES: dict[str, dict[str, Callable[[], Any]]] = {
    SecurityGroup.KIND: {"group_by_name": dict},
    Rule.KIND: {"rules_by_group": lambda: defaultdict(dict),
                "rules_by_remote": lambda: defaultdict(set)},
    Instance.KIND: {"instances_by_group": lambda: defaultdict(set),
                    "instances_by_name": lambda: defaultdict(set)},
    Port.KIND: {"ports_by_instance": lambda: defaultdict(set),
                "ports_by_network": lambda: defaultdict(set),
                "used_ips": lambda: defaultdict(set), "used_macs": set, "used_taps": set,
                "alloc_hint": dict},
    Volume.KIND: {"volumes_by_instance": lambda: defaultdict(set)},
    VolumeSnapshot.KIND: {"snapshots_by_volume": lambda: defaultdict(set)},
    Keypair.KIND: {"keypair_by_name": dict},
    FloatingIp.KIND: {"floating_by_port": lambda: defaultdict(set)},
}
_INDEX_KIND = {name: kind for kind, names in _INDEXES.items() for name in names}


#: The indexes a lazy state reads by key: attribute -> (store index, shape):
#: "one" maps a key to one id, "ids" to a set of ids, "records" to {id: record}.
_KEYED_VIEWS: dict[str, tuple[str, str]] = {
    "group_by_name": ("group-name", "one"),
    "rules_by_group": ("rules-by-group", "records"),
    "rules_by_remote": ("rules-by-remote", "ids"),
    "instances_by_group": ("instances-by-group", "ids"),
    "instances_by_name": ("instance-name", "ids"),
    "ports_by_instance": ("ports-by-instance", "ids"),
    "ports_by_network": ("ports-by-network", "ids"),
    "keypair_by_name": ("keypair-name", "one"),
    "floating_by_port": ("floating-by-port", "ids"),
    "volumes_by_instance": ("volumes-by-instance", "ids"),
    "snapshots_by_volume": ("snapshots-by-volume", "ids"),
}
#: Indexes whose key is a (project, name) pair (a JSON pair in the store).
_PAIR_INDEXES = {"group-name", "instance-name", "keypair-name"}


class _LazyDict(dict[Any, Any]):
    """A dict whose entries are read on first use: a key through
    :meth:`_ensure`, everything through :meth:`_load_all` (iterating, sizing,
    comparing). Subclasses say how a key and the whole are read."""

    def _ensure(self, key: Any) -> None:
        raise NotImplementedError

    def _load_all(self) -> None:
        raise NotImplementedError

    def get(self, key: Any, default: Any = None) -> Any:
        self._ensure(key)
        return dict.get(self, key, default)

    def __delitem__(self, key: Any) -> None:
        self._ensure(key)
        dict.__delitem__(self, key)

    def pop(self, key: Any, *default: Any) -> Any:
        self._ensure(key)
        return dict.pop(self, key, *default)

    def __iter__(self) -> Iterator[Any]:
        self._load_all()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._load_all()
        return dict.__len__(self)

    def keys(self) -> Any:
        self._load_all()
        return dict.keys(self)

    def values(self) -> Any:
        self._load_all()
        return dict.values(self)

    def items(self) -> Any:
        self._load_all()
        return dict.items(self)

    def __eq__(self, other: object) -> bool:
        self._load_all()
        return dict.__eq__(self, other)

    __hash__ = None


class _KeyedKind(_LazyDict):
    """The records of one kind in a lazy state: each id read when first asked
    for; the whole kind only when iterated."""

    def __init__(self, state: CloudState, kind: str) -> None:
        super().__init__()
        assert state._snapshot is not None
        self._snapshot = state._snapshot
        self._kind = kind
        self._type = RECORD_TYPES[kind]
        self._known: set[str] = set()
        self._complete = False

    def _ensure(self, doc_id: str) -> None:
        if self._complete or doc_id in self._known:
            return
        self._known.add(doc_id)
        doc = self._snapshot.get(self._kind, doc_id)
        if doc is not None:
            dict.__setitem__(self, doc_id, self._type.from_doc(doc))

    def seed(self, doc_id: str, doc: dict[str, Any]) -> Any:
        """The record ``doc_id``, parsed from ``doc`` (read by an index) unless
        this state already holds it (then its own version)."""
        if not self._complete and doc_id not in self._known:
            self._known.add(doc_id)
            dict.__setitem__(self, doc_id, self._type.from_doc(doc))
        return dict.get(self, doc_id)

    def _load_all(self) -> None:
        if self._complete:
            return
        for doc_id, doc in self._snapshot.kind(self._kind).items():
            if doc_id not in self._known:
                dict.__setitem__(self, doc_id, self._type.from_doc(doc))
        self._complete = True

    def __getitem__(self, doc_id: str) -> Any:
        self._ensure(doc_id)
        return dict.__getitem__(self, doc_id)

    def __contains__(self, doc_id: object) -> bool:
        if isinstance(doc_id, str):
            self._ensure(doc_id)
        return dict.__contains__(self, doc_id)

    def __setitem__(self, doc_id: str, record: Any) -> None:
        self._known.add(doc_id)
        dict.__setitem__(self, doc_id, record)



class _IndexView(_LazyDict):
    """One index of a lazy state: a key's bucket read from the store's index
    when first touched, this state's own changes laid over it; iterating reads
    the whole kind and derives every bucket."""

    def __init__(self, state: CloudState, index: str, shape: str) -> None:
        super().__init__()
        self._state = state
        self._index = index
        self._shape = shape
        self._kind = INDEX_KINDS[index]
        self._loaded: set[Any] = set()
        self._complete = False

    def _bucket(self, key: Any) -> str:
        return pair(*key) if self._index in _PAIR_INDEXES else str(key)

    def _key(self, bucket: str) -> Any:
        return tuple(json.loads(bucket)) if self._index in _PAIR_INDEXES else bucket

    def _buckets_of(self, record: Record) -> set[str]:
        doc_id: str = record.id  # type: ignore[attr-defined]
        return {bucket for index, bucket, _ in entries(self._kind, doc_id, record.to_doc())
                if index == self._index}

    def _ensure(self, key: Any) -> None:
        if self._complete or key in self._loaded:
            return
        self._loaded.add(key)
        if self._shape == "ids":  # read only when read: adding an id needs no read
            dict.__setitem__(self, key, _LazyIds(self, key))
            return
        ids, docs = self._stored(key)
        if ids:
            dict.__setitem__(self, key, self._value(ids, docs))

    def _stored(self, key: Any) -> tuple[set[str], dict[str, Any]]:
        """The ids in ``key``'s bucket (and, for "records", their documents):
        the store's, with this transaction's changed records laid over."""
        snapshot = self._state._snapshot
        assert snapshot is not None
        bucket = self._bucket(key)
        docs: dict[str, Any] = {}
        if self._shape == "records":
            docs = snapshot.members(self._index, bucket)
            ids = set(docs)
        else:
            ids = set(snapshot.lookup(self._index, bucket))
        overlay = self._state.__dict__.get("_overlay", {}).get((self._index, bucket), {})
        for doc_id, inside in overlay.items():  # this transaction's changes
            if inside:
                ids.add(doc_id)
            else:
                ids.discard(doc_id)
        return ids, docs

    def _value(self, ids: set[str], docs: dict[str, Any]) -> Any:
        if self._shape == "one":
            return min(ids)
        if self._shape == "ids":
            return ids
        records = self._state.records[self._kind]
        assert isinstance(records, _KeyedKind)
        found = {i: records.seed(i, docs[i]) if i in docs else records.get(i) for i in ids}
        return {i: record for i, record in found.items() if record is not None}

    def _load_all(self) -> None:
        """Every bucket, from every record of the kind as this state holds it."""
        if self._complete:
            return
        dict.clear(self)
        for record in self._state.records[self._kind].values():
            for bucket in self._buckets_of(record):
                key, doc_id = self._key(bucket), record.id
                if self._shape == "one":
                    dict.__setitem__(self, key, min(doc_id, dict.get(self, key, doc_id)))
                elif self._shape == "ids":
                    dict.setdefault(self, key, set()).add(doc_id)
                else:
                    dict.setdefault(self, key, {})[doc_id] = record
        self._complete = True

    def __contains__(self, key: object) -> bool:
        self._ensure(key)
        found = dict.get(self, key)
        return bool(found) if isinstance(found, _LazyIds) else dict.__contains__(self, key)

    def __getitem__(self, key: Any) -> Any:
        self._ensure(key)
        if not dict.__contains__(self, key) and self._shape != "one":
            dict.__setitem__(self, key, set() if self._shape == "ids" else {})
        return dict.__getitem__(self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._ensure(key)
        dict.__setitem__(self, key, value)



class _WholeSet:
    """The set protocol of a lazy set whose whole content, :meth:`_whole`,
    costs a read of the store: iterating, sizing and comparing read it; only
    membership (each class's own ``__contains__``) is cheap. Unhashable, as
    a set is."""

    def _whole(self) -> set[str]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        return iter(self._whole())

    def __len__(self) -> int:
        return len(self._whole())

    def __eq__(self, other: object) -> bool:
        return self._whole() == other

    __hash__ = None  # type: ignore[assignment]


class _StoreLookups:
    """Membership in one of the store's indexes, looked up once per value and
    remembered (:meth:`_in_store`; subclasses say how: :meth:`_lookup`). Always
    true: telling an empty one would read it whole, and callers only ask
    about members."""

    def __init__(self, state: CloudState) -> None:
        self._state = state
        self._stored: dict[str, bool] = {}

    def _snapshot(self) -> Snapshot:
        assert self._state._snapshot is not None
        return self._state._snapshot

    def _lookup(self, value: str) -> bool:
        raise NotImplementedError

    def _in_store(self, value: str) -> bool:
        if value not in self._stored:
            self._stored[value] = self._lookup(value)
        return self._stored[value]

    def __bool__(self) -> bool:
        return True


class _LazyIds(_WholeSet):
    """One bucket of an "ids" index of a lazy state: ids added and removed by
    this transaction are kept aside, and the stored bucket is read only when
    the bucket itself is read (booting into a group of thousands of members
    adds one id, it does not read the thousands)."""

    def __init__(self, view: _IndexView, key: Any) -> None:
        self._view = view
        self._key = key
        self._stored: set[str] | None = None
        self.added: set[str] = set()
        self.removed: set[str] = set()

    def _whole(self) -> set[str]:
        if self._stored is None:
            self._stored = self._view._stored(self._key)[0]
        return (self._stored - self.removed) | self.added

    def add(self, doc_id: str) -> None:
        self.removed.discard(doc_id)
        self.added.add(doc_id)

    def discard(self, doc_id: str) -> None:
        self.added.discard(doc_id)
        self.removed.add(doc_id)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._whole()

    def __bool__(self) -> bool:
        return bool(self._whole())


class _PointSet(_StoreLookups, _WholeSet):
    """A set of values of a port index (``mac``, ``tap``) in a lazy state:
    membership is one lookup in the store's index, this state's own additions
    and removals laid over it. Iterating reads every port."""

    def __init__(self, state: CloudState, index: str) -> None:
        super().__init__(state)
        self._index = index
        self.added: set[str] = set()
        self.removed: set[str] = set()

    def _lookup(self, value: str) -> bool:
        return bool(self._snapshot().lookup(self._index, value))

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, str) or value in self.removed:
            return False
        return value in self.added or self._in_store(value)

    def add(self, value: str) -> None:
        if value in self.removed:
            self.removed.discard(value)
        elif not self._in_store(value):
            self.added.add(value)

    def discard(self, value: str) -> None:
        if value in self.added:
            self.added.discard(value)
        elif value in self:
            self.removed.add(value)

    def _whole(self) -> set[str]:
        return {bucket for _, bucket, _ in self._entries()}

    def _entries(self) -> Iterator[tuple[str, str, str]]:
        for port in self._state.ports.values():
            for entry in entries(Port.KIND, port.id, port.to_doc()):
                if entry[0] == self._index:
                    yield entry


class _AddressSet(_StoreLookups):
    """The used addresses of one network in a lazy state: the store's
    allocation records of the network (IPv4 and IPv6, see
    :mod:`secfw.store.indexes`), one key each, with this state's own additions
    and removals laid over. Membership and :meth:`lowest_free` read those
    records only — never the network's address entries, whose number grows
    with the network."""

    def __init__(self, state: CloudState, network_id: str) -> None:
        super().__init__(state)
        self._network = network_id
        #: this state's additions and removals as sorted integers (_number)
        self._added: list[int] = []
        self._removed: list[int] = []

    def _runs(self, version: int) -> list[list[int]]:
        return self._snapshot().address_runs(address_bucket(self._network, version))

    def _lookup(self, address: str) -> bool:
        parsed = ipaddress.ip_address(address)
        return runs_contain(self._runs(parsed.version), int(parsed))

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        number = _number(address)
        if _has(self._removed, number):
            return False
        return _has(self._added, number) or self._in_store(address)

    def add(self, address: str) -> None:
        number = _number(address)
        if _has(self._removed, number):
            self._removed.remove(number)
        elif not _has(self._added, number) and not self._in_store(address):
            bisect.insort(self._added, number)

    def discard(self, address: str) -> None:
        number = _number(address)
        if _has(self._added, number):
            self._added.remove(number)
        elif address in self:
            bisect.insort(self._removed, number)

    def lowest_free(self, cidr: str, start: int) -> tuple[int, str] | None:
        """What :func:`free_addresses` yields first: past the stored runs and
        this state's additions, or an address this state freed, whichever is
        lower. Steps: at most one per run and per addition."""
        net = ipaddress.ip_network(cidr)
        base, tag = int(net.network_address), net.version << 128
        first, last = base + max(start, 2), base + net.num_addresses - 2
        runs = self._runs(net.version)
        found = first
        while found <= last:
            found = past_runs(runs, found)
            if found > last or not _has(self._added, tag + found):
                break
            found += 1
        at = bisect.bisect_left(self._removed, tag + first)
        if at < len(self._removed) and self._removed[at] - tag < found:
            found = self._removed[at] - tag  # freed by this state: no longer in use
        if found > last:
            return None
        return found - base, str(ipaddress.ip_address(found))


class _UsedAddresses(dict[str, Any]):
    """``used_ips`` of a lazy state: network id -> :class:`_AddressSet`.
    Iterating derives every network's set from every port."""

    def __init__(self, state: CloudState) -> None:
        super().__init__()
        self._state = state

    def __missing__(self, network_id: str) -> _AddressSet:
        found = _AddressSet(self._state, network_id)
        dict.__setitem__(self, network_id, found)
        return found

    def get(self, network_id: str, default: Any = None) -> Any:
        return self[network_id]

    def _all(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = defaultdict(set)
        for port in self._state.ports.values():
            found[port.network_id].update(a for a in (port.ip, port.ip6) if a)
        return dict(found)

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def keys(self) -> Any:
        return self._all().keys()

    def values(self) -> Any:
        return self._all().values()

    def items(self) -> Any:
        return self._all().items()

    def __eq__(self, other: object) -> bool:
        return self._all() == other

    __hash__ = None


def _number(address: str) -> int:
    """An address as an integer, IPv4 and IPv6 apart (the version above 128 bits)."""
    parsed = ipaddress.ip_address(address)
    return (parsed.version << 128) + int(parsed)


def _has(numbers: list[int], number: int) -> bool:
    index = bisect.bisect_left(numbers, number)
    return index < len(numbers) and numbers[index] == number


def order_item(index: str, bucket: str, record: Record) -> str | None:
    """The item of ``record`` in ``bucket`` of an ordered index (None: not in it)."""
    doc_id: str = record.id  # type: ignore[attr-defined]
    for name, found_bucket, item in entries(record.KIND, doc_id, record.to_doc()):
        if name == index and found_bucket == bucket:
            return item
    return None


def first_free(used: Any, cidr: str, start: int) -> tuple[int, str] | None:
    """The lowest free ``(offset, address)`` of ``cidr`` from offset ``start``
    (see :func:`free_addresses`), ``used`` a set or a lazy state's address set."""
    if isinstance(used, _AddressSet):
        return used.lowest_free(cidr, start)
    return next(free_addresses(cidr, used, start), None)


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


def _discard(index: dict[Any, Any], key: Any, member: str) -> None:
    """Remove ``member`` from ``index[key]`` (a set or dict) and drop empty keys."""
    bucket = index.get(key)
    if bucket is None:
        return
    if isinstance(bucket, _LazyIds):  # its emptiness would need the stored bucket
        bucket.discard(member)
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

"""The part of the cloud one host's agent holds: its per-host view.

An agent compiles the filter of ONE host (:func:`secfw.compiler.build.compile_host`),
and that filter reads only part of the cloud. :class:`HostView` keeps that part,
as a :class:`~secfw.cloud.CloudState` the compiler reads unchanged, and filters
the store's change feed into it:

=====================  ========================================================
kept                   why (what the compiler reads)
=====================  ========================================================
networks, settings,    every network's CIDRs (``internal``, overlaps, metadata
floating pools and     route marks); the pools (a full pass checks conntrack's
IPs, rules             NAT bindings); rules are per group, not per port — the
                       chains of a group that starts being used here need them
the host's instances   its ports' policies, its groups' chains
and their ports
member instances       instances (on any host) in a *source group* referenced by
(compact)              a rule of a group used here; kept as id, host and groups
                       only — no name, metadata, user data, flavor
their ports            their addresses (the source groups' sets)
same-net ports         every port of a network one of the host's ports is on
                       (the same-net sets)
overlapping networks'  all their ports (the twin addresses a source group's set
ports                  leaves out; rare: only VLAN networks overlap)
=====================  ========================================================

Every other instance and port — the bulk of a large cloud — is dropped when it
is read. What is kept is a superset of what the filter reads, so the filter
compiled from the view equals the one compiled from the whole cloud
(property-tested: ``tests/test_hostview.py``).

A change can make the host need records it dropped without changing them: a
rule naming a source group not referenced before (its members), a port on a
network new to the host (that network's ports), an instance that joins a
referenced group (its ports), a network change that makes networks overlap.
:meth:`HostView.apply` recognises these and returns None: the caller reloads
the store and rebuilds the view with :meth:`HostView.load`. An index of every
port's instance (two ids per port) tells whether an instance entering the view
brought all its ports in the same batch (a boot does), so only a real
widening costs a reload. Records that stop being needed stay until the next
load (a superset is still exact).

What the host needs (:class:`Interest`) is kept as reference counts updated
record by record — a group by the host instances using it, a source group by
the rules of used groups naming it, a network by the host ports on it — so a
change costs what it touches, never a walk over the host's instances and
ports; a batch widens the view when a count it moved rose from zero.

Pure: no I/O (the caller reads the store).
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

from secfw.cloud import CloudState, Replaced
from secfw.model import RECORD_TYPES, Instance, Network, Port, Record, Rule
from secfw.store.base import Change, Doc, KindReader

#: Kinds kept whole: small next to instances and ports, or read by every host.
KEPT_KINDS = ("network", "setting", "floatingpool", "floatingip", "rule")


@dataclass(frozen=True)
class Interest:
    """What the host needs, derived from the view: the groups its instances use,
    the source groups their rules reference, the networks of its ports, and the
    networks that overlap another (all of whose ports are kept)."""

    groups: frozenset[str]
    sources: frozenset[str]
    networks: frozenset[str]
    overlapping: frozenset[str]

    def wider_than(self, other: Interest) -> bool:
        """Whether this interest needs records ``other``'s did not keep."""
        return not (self.sources <= other.sources and self.networks <= other.networks
                    and self.overlapping <= other.overlapping)

    @classmethod
    def of(cls, state: CloudState, host: str) -> Interest:
        """The interest of ``host`` computed from scratch from ``state`` (what
        :class:`HostView` keeps counted; the tests compare the two)."""
        mine = [i for i in state.instances.values() if i.host == host]
        groups = {g for i in mine for g in i.security_groups}
        sources = {r.remote_group_id for g in groups
                   for r in state.rules_by_group.get(g, {}).values() if r.remote_group_id}
        networks = {state.ports[p].network_id for i in mine
                    for p in state.ports_by_instance.get(i.id, ())}
        return cls(frozenset(groups), frozenset(sources), frozenset(networks),
                   _overlapping(state))


class HostView:
    """One host's part of the cloud (see the module docstring)."""

    def __init__(self, host: str) -> None:
        self.host = host
        #: Whole loads so far (:meth:`load`), and those :meth:`apply` asked for.
        self.loads = self.widenings = 0
        self._reset(0)

    def _reset(self, revision: int) -> None:
        self.state = CloudState(revision)
        #: This host's instances → their groups (each once).
        self._host_instances: dict[str, tuple[str, ...]] = {}
        #: This host's ports → their networks.
        self._host_ports: dict[str, str] = {}
        #: Every port of the cloud → its instance (ids only): see the module doc.
        self._owner: dict[str, str] = {}
        #: ... and every instance → its ports: tuples (an instance has one or
        #: a few ports; a set of one is 216 bytes, a tuple 48)
        self._owned: dict[str, tuple[str, ...]] = {}
        # The interest, counted (module doc): a key is in it while its count is
        # positive; a count at zero is deleted.
        self._groups: Counter[str] = Counter()
        self._sources: Counter[str] = Counter()
        self._networks: Counter[str] = Counter()
        self._overlap: frozenset[str] | None = frozenset()  # None: a network changed
        #: (counter, key) → whether the key was in the interest when the batch
        #: began, for every key whose count crossed zero during the batch.
        self._crossed: dict[tuple[str, str], bool] = {}

    @property
    def interest(self) -> Interest:
        """What the host needs now (built from the counts: for reports and tests)."""
        return Interest(frozenset(self._groups), frozenset(self._sources),
                        frozenset(self._networks), self._overlapping())

    # ------------------------------------------------------------------ loading

    def load(self, reader: KindReader) -> CloudState:
        """Rebuild the view from every document ``reader`` holds, one kind at a
        time (a :class:`~secfw.store.base.Snapshot`, or a store's
        :meth:`~secfw.store.base.Store.scan`, which streams): the kept kinds,
        the instances once, the ports twice (first the port index and this
        host's ports, whose networks decide which other ports are kept).
        Only the records kept are parsed into records."""
        self._reset(reader.revision)
        self.loads += 1
        for kind in KEPT_KINDS:
            for doc in reader.iter_kind(kind):
                self._put(RECORD_TYPES[kind].from_doc(doc))
        others: list[tuple[str, str, tuple[str, ...]]] = []  # other hosts' grouped instances
        for doc in reader.iter_kind(Instance.KIND):
            if doc.get("host") == self.host:
                instance: Instance = Instance.from_doc(doc)
                self.state.put(instance)  # counted below, all at once
                self._host_instances[instance.id] = tuple(dict.fromkeys(instance.security_groups))
            elif doc.get("security_groups"):
                others.append((doc["id"], doc.get("host", ""), tuple(doc["security_groups"])))
        self._count_host_groups()
        for doc in reader.iter_kind(Port.KIND):
            self._own(doc["id"], doc["instance_id"])
            if doc["instance_id"] in self._host_instances:
                self._put(Port.from_doc(doc))
        for instance_id, host, groups in others:
            if self._referenced(groups):
                self._put(_compact(instance_id, host, groups))
        del others
        for doc in reader.iter_kind(Port.KIND):
            if doc["id"] not in self.state.ports and self._wants_port(doc):
                self._put(Port.from_doc(doc))
        self.state.dirty.clear()
        self._crossed.clear()
        _tighten(self.state.instances_by_group)
        return self.state

    def _count_host_groups(self) -> None:
        """At load, once this host's instances are in the view (and the rules,
        no port yet): count the groups they use and the source groups those
        groups' rules name in two C-level passes — what :meth:`_count_instance`
        does instance by instance (200,000 calls at 10,000 ports, ~15 % of a
        load), with the same result (the ports are counted as they come)."""
        self._groups.update(chain.from_iterable(self._host_instances.values()))
        rules = self.state.rules_by_group
        self._sources.update(rule.remote_group_id for group in self._groups
                             for rule in rules.get(group, {}).values() if rule.remote_group_id)

    # ------------------------------------------------------------------ following

    def apply(self, revision: int, changes: Iterable[Change]) -> list[Replaced] | None:
        """Apply a batch of the change feed; the records replaced *in the view*
        (entering: ``(None, new)``, leaving: ``(old, None)``), or None when the
        batch widened what the host needs beyond what the view kept: the
        caller must :meth:`load` the store again (the view is then stale).

        This host's instances and ports go first: they decide the interest
        against which the other instances and ports of the batch are kept.
        Costs the batch: nothing here walks the view."""
        self._crossed.clear()
        overlap_before = self._overlapping()
        by_kind: defaultdict[str, list[Change]] = defaultdict(list)
        for change in changes:
            by_kind[change.kind].append(change)
        replaced: list[Replaced] = []
        for kind in KEPT_KINDS:
            for change in by_kind.get(kind, ()):
                replaced += self._replace(kind, change.id, _parsed(kind, change.doc))
        instances, ports = by_kind.get(Instance.KIND, []), by_kind.get(Port.KIND, [])
        for change in ports:
            self._own(change.id, change.doc["instance_id"] if change.doc else None)
        entering = self._follow_host(instances, ports, replaced)
        entering |= self._follow_instances(instances, replaced)
        self._follow_ports(ports, replaced)
        self.state.revision = revision
        self.state.dirty.clear()
        if self._widened(overlap_before) or self._missing_ports(entering):
            self.widenings += 1
            return None
        return replaced

    def _widened(self, overlap_before: frozenset[str]) -> bool:
        """Whether the batch made the host need a source group, a network or an
        overlapping network it did not need when the batch began."""
        counters = {"sources": self._sources, "networks": self._networks}
        return (any(not was and key in counters[name]
                    for (name, key), was in self._crossed.items() if name in counters)
                or not self._overlapping() <= overlap_before)

    def _follow_host(self, instances: list[Change], ports: list[Change],
                     replaced: list[Replaced]) -> set[str]:
        """Apply the changes of this host's instances (now or before) and then of
        their ports, and take them out of ``instances`` and ``ports``; the
        instances that entered the view."""
        mine = [c for c in instances
                if (c.doc and c.doc.get("host") == self.host) or c.id in self._host_instances]
        entering = self._follow_instances(mine, replaced)
        host_ports = [c for c in ports if self._owner.get(c.id) in self._host_instances]
        self._follow_ports(host_ports, replaced)
        instances[:] = _without(instances, mine)
        ports[:] = _without(ports, host_ports)
        return entering

    def _follow_instances(self, changes: list[Change], replaced: list[Replaced]) -> set[str]:
        """Apply instance changes; the ids that entered the view."""
        entering = set()
        for change in changes:
            was = change.id in self.state.instances
            new = self._instance(change.doc) if change.doc is not None else None
            replaced += self._replace(Instance.KIND, change.id, new)
            if new is not None and not was:
                entering.add(change.id)
        return entering

    def _follow_ports(self, changes: list[Change], replaced: list[Replaced]) -> None:
        for change in changes:
            keep = change.doc is not None and self._wants_port(change.doc)
            replaced += self._replace(Port.KIND, change.id,
                                      Port.from_doc(change.doc) if keep and change.doc else None)

    def _missing_ports(self, entering: set[str]) -> bool:
        """Whether an instance that entered the view has a port the view lacks
        (it joined a referenced group, or came to this host, without its ports
        changing: they were dropped earlier)."""
        return any(p not in self.state.ports for i in entering for p in self._owned.get(i, ()))

    # ------------------------------------------------------------------ deciding

    def _referenced(self, groups: Iterable[str]) -> bool:
        """Whether one of ``groups`` is a source group referenced here."""
        return any(g in self._sources for g in groups)

    def _overlapping(self) -> frozenset[str]:
        """The networks that overlap another (recomputed after a network changed:
        networks are few next to ports, and change rarely)."""
        if self._overlap is None:
            self._overlap = _overlapping(self.state)
        return self._overlap

    def _instance(self, doc: Doc) -> Instance | None:
        """The record kept for an instance document: whole for this host's, a
        compact one for a member of a referenced source group, else None."""
        if doc.get("host") == self.host:
            whole: Instance = Instance.from_doc(doc)
            return whole
        groups = tuple(doc.get("security_groups", ()))
        if not self._referenced(groups):
            return None
        return _compact(doc["id"], doc.get("host", ""), groups)

    def _wants_port(self, doc: Doc) -> bool:
        network = doc.get("network_id")
        return (doc.get("instance_id") in self.state.instances
                or network in self._networks or network in self._overlapping())

    # ------------------------------------------------------------------ bookkeeping

    def _own(self, port_id: str, instance_id: str | None) -> None:
        old = self._owner.pop(port_id, None)
        if old is not None:
            left = tuple(p for p in self._owned[old] if p != port_id)
            if left:
                self._owned[old] = left
            else:
                del self._owned[old]
        if instance_id is not None:
            instance_id = sys.intern(instance_id)  # one copy, shared with the records'
            self._owner[port_id] = instance_id
            self._owned[instance_id] = (*self._owned.get(instance_id, ()), port_id)

    def _put(self, record: Record) -> None:
        old = self.state.records[record.KIND].get(record.id)  # type: ignore[attr-defined]
        self.state.put(record)
        self._count(old, record)

    def _replace(self, kind: str, record_id: str, new: Record | None) -> list[Replaced]:
        """Put ``new`` (None: remove) in place of the view's record; the
        replacement, or nothing when neither existed."""
        old = self.state.records[kind].get(record_id)
        if new is not None:
            self._put(new)
        elif old is not None:
            self.state.remove(old)
            self._count(old, None)
        else:
            return []
        return [(old, new)]

    # ------------------------------------------------------------------ counting

    def _count(self, old: Record | None, new: Record | None) -> None:
        """Move the interest's counts for one record replaced in the view (the
        state already holds ``new``). Invariants: ``_groups`` counts the host
        instances using each group; ``_sources`` the rules naming each source
        group among the rules of groups in ``_groups``; ``_networks`` the host
        ports (``_host_ports``) on each network."""
        record = new if new is not None else old
        if isinstance(record, Rule):
            for rule, step in ((old, -1), (new, 1)):
                if isinstance(rule, Rule):
                    self._reference(rule, step)
        elif isinstance(record, Instance):
            self._count_instance(record.id, new if isinstance(new, Instance) else None)
        elif isinstance(record, Port):
            self._count_port(record.id)
        elif isinstance(record, Network):
            self._overlap = None

    def _reference(self, rule: Rule, step: int) -> None:
        """A rule came (``step`` 1) or went (-1): it names a source group used here
        while its own group is used here."""
        if rule.remote_group_id and rule.group_id in self._groups:
            self._move("sources", self._sources, rule.remote_group_id, step)

    def _count_instance(self, instance_id: str, new: Instance | None) -> None:
        """An instance replaced: its groups' use, and whether its ports are the host's."""
        before = self._host_instances.pop(instance_id, None)
        after = (tuple(dict.fromkeys(new.security_groups))
                 if new is not None and new.host == self.host else None)
        if after is not None:
            self._host_instances[instance_id] = after
        for group in set(before or ()) - set(after or ()):
            self._use_group(group, -1)
        for group in set(after or ()) - set(before or ()):
            self._use_group(group, 1)
        if (before is None) != (after is None):
            for port_id in self.state.ports_by_instance.get(instance_id, ()):
                self._count_port(port_id)

    def _use_group(self, group_id: str, step: int) -> None:
        """One host instance more (``step`` 1) or fewer (-1) uses the group; when
        its use begins or ends, so do the references of its rules."""
        if self._move("groups", self._groups, group_id, step):
            for rule in self.state.rules_by_group.get(group_id, {}).values():
                if rule.remote_group_id:
                    self._move("sources", self._sources, rule.remote_group_id, step)

    def _count_port(self, port_id: str) -> None:
        """Recount one port: a host port while the view holds it and its
        instance is on this host."""
        port = self.state.ports.get(port_id)
        network = (port.network_id if port is not None
                   and port.instance_id in self._host_instances else None)
        before = self._host_ports.get(port_id)
        if before == network:
            return
        if before is not None:
            del self._host_ports[port_id]
            self._move("networks", self._networks, before, -1)
        if network is not None:
            self._host_ports[port_id] = network
            self._move("networks", self._networks, network, 1)

    def _move(self, name: str, counter: Counter[str], key: str, step: int) -> bool:
        """Add ``step`` to ``counter[key]``; True when the key entered or left
        (its count crossed zero), which :meth:`_widened` remembers."""
        count = counter[key] + step
        if count > 0:
            counter[key] = count
            if count != step:
                return False
        else:
            counter.pop(key, None)
        self._crossed.setdefault((name, key), count <= 0)
        return True

    def counts(self) -> dict[str, Any]:
        """What the view holds (the bench reports it)."""
        state = self.state
        return {"instances": len(state.instances), "ports": len(state.ports),
                "host_instances": len(self._host_instances), "rules": len(state.rules),
                "port_index": len(self._owner), "sources": len(self._sources),
                "loads": self.loads, "widenings": self.widenings}


def _compact(instance_id: str, host: str, groups: tuple[str, ...]) -> Instance:
    """A member of a source group as the view keeps it: what its ports' addresses
    are put into sets by (its groups), nothing else of the instance."""
    return Instance(id=sys.intern(instance_id), project="", name="", flavor="", image_id="",
                    host=sys.intern(host), security_groups=groups)


def _tighten(index: dict[str, set[str]]) -> None:
    """Replace each set of ``index`` by a copy, in place. A set grown one
    ``add`` at a time quadruples its table whenever it is 60 % full, so it can
    hold 4 slots per member; a copy is sized for its members at once, ~2
    (CPython's Objects/setobject.c: ``set_table_resize``, ``set_update_internal``).
    The groups' member sets are most of the view's indexes: 16.8 -> 8.4 MB at
    10,000 ports, where 500 groups have 400 members each."""
    for key, members in index.items():
        index[key] = set(members)


def _overlapping(state: CloudState) -> frozenset[str]:
    """The networks of ``state`` that overlap another."""
    return frozenset(n for n in state.networks if state.overlapping_subnets(n))


def _without(changes: list[Change], done: list[Change]) -> list[Change]:
    ids = {c.id for c in done}
    return [c for c in changes if c.id not in ids]


def _parsed(kind: str, doc: Doc | None) -> Record | None:
    return RECORD_TYPES[kind].from_doc(doc) if doc is not None else None



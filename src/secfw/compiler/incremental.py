"""Model → IR, change by change: :func:`~.build.compile_host` at the cost of the change.

A long-running agent follows the cloud through the store's change feed
(:meth:`secfw.cloud.CloudState.apply_changes`, which says which records were
replaced). :class:`HostCompiler` keeps the pieces of the last
:class:`~.ir.HostFilter` — one :class:`~.ir.PortPolicy` per port, one
:class:`~.ir.GroupChain` per (group, direction), one :class:`~.ir.AddressSet` per
referenced source group and family — and recomputes only those a replaced record
can reach:

==================  ============================================================
record replaced     what is recomputed
==================  ============================================================
rule of group G     G's chains; if G's "has an egress rule" flipped, the policies
                    of the host's ports whose instance uses G
instance I          I's ports' policies when I is (or was) on this host; the
                    address sets of every group I is (or was) in
port P              P's policy when its instance is on this host; the address
                    sets of its instance's groups; the same-net sets of its
                    network (old and new: a port on *any* host counts)
network             everything (rare: a network's CIDRs reach every port on it)
floating IP, port,  the host's NAT (``floating``, ``internal``): one pass over the
instance             associated floating IPs
anything else       nothing (names, images and quotas are not in the IR)
==================  ============================================================

Contract: after :meth:`HostCompiler.update` the result equals what
``compile_host`` returns for the same state — property-tested against it over
random change sequences (``tests/test_incremental.py``). Pieces that did
not change are the *same objects* as in the previous result, and so are the
``ports``, ``chains`` and ``sets`` tuples when nothing in them changed: a backend
can skip what is identical (``is``) instead of comparing it. Pure, like the rest
of the compiler: no I/O.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from secfw.cloud import CloudState, Replaced
from secfw.compiler.build import (
    SAME_NET_PREFIX,
    address_set,
    chain_name,
    compile_host,
    floating_nat,
    group_chain,
    has_egress_rule,
    host_key,
    internal_networks,
    network_subnet,
    normalise_addresses,
    port_policy,
    same_net_addresses,
    same_net_set_name,
)
from secfw.compiler.ir import (
    AddressSet,
    Family,
    FloatingNat,
    GroupChain,
    HostFilter,
    PortPolicy,
)
from secfw.compiler.sources import FixedAddresses, shared_fixed_addresses
from secfw.model import FloatingIp, Instance, Network, Port, Rule

FAMILY_SUFFIXES = ("v4", "v6")
FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")


@dataclass
class _Dirty:
    """What one batch of replaced records reaches (see the module table)."""

    instances: set[str] = field(default_factory=set)
    rule_groups: set[str] = field(default_factory=set)
    member_groups: set[str] = field(default_factory=set)
    networks: set[str] = field(default_factory=set)
    ports: list[tuple[Port | None, Port | None]] = field(default_factory=list)
    floating: bool = False
    everything: bool = False


class HostCompiler:
    """The IR of one host, kept current by :meth:`update` (see the module doc)."""

    def __init__(self, host: str, allow_same_net: bool = True) -> None:
        self.host = host
        self.allow_same_net = allow_same_net
        self._result: HostFilter | None = None
        self._instance_groups: dict[str, tuple[str, ...]] = {}
        self._instance_ports: dict[str, tuple[str, ...]] = {}
        self._policies: dict[str, PortPolicy] = {}
        #: The policies in the result's order (:func:`_port_order`), patched by
        #: bisection: a changed port costs O(log n) compares and a C-level copy
        #: of the list, not a sort of the host's ports.
        self._port_list: list[PortPolicy] = []
        self._fixed = FixedAddresses()
        self._group_use: Counter[str] = Counter()
        self._with_egress: set[str] = set()
        self._chains: dict[str, GroupChain] = {}
        self._references: Counter[str] = Counter()
        self._same_net_use: Counter[str] = Counter()
        self._sets: dict[str, AddressSet] = {}
        #: The same-net sets in use, kept element by element (:class:`_SameNet`).
        self._same_net: dict[str, _SameNet] = {}
        self._floating: tuple[FloatingNat, ...] = ()
        self._internal: tuple[str, ...] = ()

    @property
    def result(self) -> HostFilter | None:
        """The last filter computed (None before the first :meth:`full`)."""
        return self._result

    def full(self, state: CloudState) -> HostFilter:
        """Compile from scratch (``compile_host``) and remember the pieces."""
        result = compile_host(state, self.host, self.allow_same_net)
        self._remember(state, result)
        return result

    def update(self, state: CloudState, replaced: Iterable[Replaced]) -> HostFilter:
        """The filter after ``replaced`` (already applied to ``state``); a full
        compile when there is no earlier result or a network changed."""
        dirty = self._dirty(state, replaced)
        if self._result is None or dirty.everything:
            return self.full(state)
        use_changed = self._retrack(state, dirty.instances)
        flipped = self._refresh_egress(state, dirty.rule_groups | use_changed)
        stale = (dirty.instances & self._instance_groups.keys()) | self._host_users(state, flipped)
        ports_changed = self._refresh_policies(state, stale) or (
            len(self._policies) != len(self._result.ports))
        chains_changed = self._refresh_chains(state, dirty.rule_groups | use_changed)
        self._move_same_net(dirty.ports)
        sets_changed = self._refresh_sets(state, _stale_sets(dirty))
        if dirty.floating:
            self._refresh_floating(state)
        return self._assemble(ports_changed, chains_changed, sets_changed)

    def _refresh_floating(self, state: CloudState) -> None:
        """Recompute the host's NAT (one pass over the associated floating IPs:
        they are few next to ports); equal tuples stay the same objects."""
        floating = floating_nat(state, self.host)
        internal = internal_networks(state) if floating else ()
        if floating != self._floating:
            self._floating = floating
        if internal != self._internal:
            self._internal = internal

    # ------------------------------------------------------------------ bookkeeping

    def _remember(self, state: CloudState, result: HostFilter) -> None:
        self._result = result
        self._policies = {p.port_id: p for p in result.ports}
        self._port_list = sorted(result.ports, key=_port_order)
        self._fixed = FixedAddresses(result.ports)
        self._same_net_use = Counter(name for p in result.ports for name in p.same_net_sets)
        self._instance_groups, self._instance_ports = {}, {}
        self._group_use = Counter()
        for instance in state.instances.values():
            if instance.host == self.host:
                self._track_instance(state, instance)
        self._chains = {c.name: c for c in result.chains}
        self._with_egress = {c.group_id for c in result.chains if c.direction == "egress"}
        self._references = Counter(
            name for c in result.chains for name in _references(c))
        self._sets = {s.name: s for s in result.sets}
        self._same_net = {name: _SameNet(state, s.owner_id, s.family)
                          for name, s in self._sets.items() if name.startswith(SAME_NET_PREFIX)}
        self._floating, self._internal = result.floating, result.internal

    def _track_instance(self, state: CloudState, instance: Instance) -> None:
        self._instance_groups[instance.id] = tuple(dict.fromkeys(instance.security_groups))
        ports = state.ports_by_instance.get(instance.id, ())
        self._instance_ports[instance.id] = tuple(sorted(ports))
        self._group_use.update(self._instance_groups[instance.id])

    def _untrack_instance(self, instance_id: str) -> tuple[str, ...]:
        """Stop tracking an instance; returns its ports (their policies stay until
        :meth:`_retrack` knows which ports are gone)."""
        self._group_use.subtract(self._instance_groups.pop(instance_id, ()))
        return self._instance_ports.pop(instance_id, ())

    def _dirty(self, state: CloudState, replaced: Iterable[Replaced]) -> _Dirty:
        dirty = _Dirty()
        for old, new in replaced:
            if isinstance(old, Network) or isinstance(new, Network):
                dirty.everything = True
            if isinstance(old, FloatingIp | Port | Instance) or isinstance(
                    new, FloatingIp | Port | Instance):
                dirty.floating = True
            for record in (old, new):
                if isinstance(record, Rule):
                    dirty.rule_groups.add(record.group_id)
                elif isinstance(record, Instance) and record.host == self.host:
                    dirty.instances.add(record.id)
                elif isinstance(record, Port):
                    self._port_touched(state, record, dirty)
                    dirty.networks.add(record.network_id)
                    # its addresses may be another member's twins: which source-
                    # group sets that changes is not tracked (overlap is rare)
                    if state.overlapping_subnets(record.network_id):
                        dirty.everything = True
            if isinstance(old, Instance) or isinstance(new, Instance):
                dirty.member_groups |= _membership_change(old, new)
            if isinstance(old, Port) or isinstance(new, Port):
                dirty.ports.append((old, new))  # type: ignore[arg-type]
        return dirty

    def _port_touched(self, state: CloudState, port: Port, dirty: _Dirty) -> None:
        """A port's addresses reach its instance's groups' sets (an instance removed
        in the same feed is itself replaced: its old groups are marked from it)."""
        instance = state.instances.get(port.instance_id)
        if port.instance_id in self._instance_groups or (
                instance is not None and instance.host == self.host):
            dirty.instances.add(port.instance_id)
        if instance is not None:
            dirty.member_groups.update(instance.security_groups)

    # ------------------------------------------------------------------ refreshing

    def _retrack(self, state: CloudState, instance_ids: set[str]) -> set[str]:
        """Re-track the dirty instances that are (or were) on this host; returns the
        groups whose use on this host began or ended (their chains appear or go)."""
        instances = {i: state.instances.get(i) for i in instance_ids}
        touched = {g for i in instance_ids for g in self._instance_groups.get(i, ())}
        touched.update(g for inst in instances.values() if inst for g in inst.security_groups)
        used_before = {g for g in touched if self._group_use[g] > 0}
        for instance_id, instance in instances.items():
            ports_before = self._untrack_instance(instance_id)
            if instance is not None and instance.host == self.host:
                self._track_instance(state, instance)
            for port_id in set(ports_before) - set(self._instance_ports.get(instance_id, ())):
                self._set_policy(port_id, None)
        for group_id in touched:
            if self._group_use[group_id] <= 0:
                del self._group_use[group_id]
        return used_before ^ {g for g in touched if self._group_use[g] > 0}

    def _refresh_egress(self, state: CloudState, groups: set[str]) -> set[str]:
        """Update "has an egress rule" (of groups used here) for ``groups``;
        returns those that flipped."""
        flipped = set()
        for group_id in groups:
            has = group_id in self._group_use and has_egress_rule(state, group_id)
            if has != (group_id in self._with_egress):
                flipped.add(group_id)
                (self._with_egress.add if has else self._with_egress.discard)(group_id)
        return flipped

    def _host_users(self, state: CloudState, groups: set[str]) -> set[str]:
        """The host instances that use any of ``groups``."""
        return {i for g in groups for i in state.instances_by_group.get(g, ())
                if i in self._instance_groups}

    def _refresh_policies(self, state: CloudState, instance_ids: set[str]) -> bool:
        """Recompute the policies of the ports of tracked host instances; a policy
        equal to the one before is kept as the same object. Returns whether any
        policy changed."""
        changed = False
        for instance_id in instance_ids:
            instance = state.instances[instance_id]
            for port_id in self._instance_ports[instance_id]:
                fresh = port_policy(state, instance, state.ports[port_id],
                                    self.allow_same_net, self._with_egress)
                if self._policies.get(port_id) != fresh:
                    self._set_policy(port_id, fresh)
                    changed = True
        return changed

    def _set_policy(self, port_id: str, policy: PortPolicy | None) -> None:
        """Replace (None: drop) a port's policy, counting the same-net sets in use
        and keeping the ordered list and the fixed-address index."""
        old = self._policies.pop(port_id, None)
        ports = self._port_list
        if old is not None:
            self._same_net_use.subtract(old.same_net_sets)
            self._fixed.remove(old)
            del ports[bisect.bisect_left(ports, _port_order(old), key=_port_order)]
        if policy is not None:
            self._policies[port_id] = policy
            self._same_net_use.update(policy.same_net_sets)
            self._fixed.add(policy)
            ports.insert(bisect.bisect_left(ports, _port_order(policy), key=_port_order),
                         policy)

    def shared_fixed_addresses(self, ports: tuple[PortPolicy, ...]) -> dict[str, str]:
        """:func:`~secfw.compiler.sources.shared_fixed_addresses` of ``ports``:
        from the index when they are the last result's ports (what an agent
        pass asks), else computed."""
        if self._result is not None and ports is self._result.ports:
            return self._fixed.shared()
        return shared_fixed_addresses(ports)

    def _refresh_chains(self, state: CloudState, groups: set[str]) -> bool:
        """Recompute the chains of ``groups`` (present while used; egress only with
        an egress rule); returns whether any chain changed."""
        changed = False
        for group_id in groups:
            for direction in ("ingress", "egress"):
                name = chain_name(group_id, direction)
                wanted = group_id in self._group_use and (
                    direction == "ingress" or group_id in self._with_egress)
                chain = group_chain(state, group_id, direction) if wanted else None
                changed |= self._replace_chain(name, chain)
        return changed

    def _replace_chain(self, name: str, chain: GroupChain | None) -> bool:
        old = self._chains.get(name)
        if old == chain:
            return False
        if old is not None:
            self._references.subtract(_references(old))
            del self._chains[name]
        if chain is not None:
            self._references.update(_references(chain))
            self._chains[name] = chain
        return True

    def _move_same_net(self, ports: list[tuple[Port | None, Port | None]]) -> None:
        """Move the ports replaced out of (old) and into (new) the same-net sets
        kept here; a set appearing later is built from the state, which already
        holds them."""
        for old, new in ports:  # in feed order: a port replaced twice moves twice
            for port, step in ((old, -1), (new, 1)):
                if port is None:
                    continue
                for family in FAMILIES:
                    kept = self._same_net.get(same_net_set_name(port.network_id, family))
                    if kept is not None:
                        kept.move(port, step)

    def _refresh_sets(self, state: CloudState, stale: set[str]) -> bool:
        """Drop sets no chain and no port references, compute new ones, recompute
        the ``stale`` ones; returns whether any set changed."""
        referenced = {name for name, n in self._references.items() if n > 0}
        referenced.update(name for name, n in self._same_net_use.items() if n > 0)
        gone = set(self._sets) - referenced
        for name in gone:
            del self._sets[name]
            self._same_net.pop(name, None)
        changed = bool(gone)
        for name in sorted((referenced - set(self._sets)) | (stale & referenced)):
            fresh = self._address_set(state, name)
            if self._sets.get(name) != fresh:
                self._sets[name] = fresh
                changed = True
        return changed

    def _address_set(self, state: CloudState, name: str) -> AddressSet:
        """``address_set(state, name)``: a same-net set from what is kept of it
        (kept from now on when it is new here), a source group's computed (its
        members' ports: a few, however big the host)."""
        if not name.startswith(SAME_NET_PREFIX):
            return address_set(state, name)
        kept = self._same_net.get(name)
        if kept is None:
            network_id = name[len(SAME_NET_PREFIX):-len("-v4")]
            family: Family = "ipv4" if name.endswith("-v4") else "ipv6"
            kept = self._same_net[name] = _SameNet(state, network_id, family)
        return kept.address_set()

    def _assemble(self, ports_changed: bool, chains_changed: bool,
                  sets_changed: bool) -> HostFilter:
        """The new filter; a part that did not change is the previous tuple itself."""
        previous = self._result
        assert previous is not None
        ports = previous.ports
        if ports_changed:
            ports = tuple(self._port_list)
        chains = previous.chains
        if chains_changed:
            chains = tuple(self._chains[n] for n in sorted(self._chains))
        sets = previous.sets
        if sets_changed:
            sets = tuple(self._sets[n] for n in sorted(self._sets))
        nat = (self._floating, self._internal)
        if (ports, chains, sets, *nat) == (previous.ports, previous.chains, previous.sets,
                                            previous.floating, previous.internal):
            return previous
        self._result = HostFilter(self.host, ports, chains, sets, *nat)
        return self._result


class _SameNet:
    """One network's same-net set of one family, kept element by element.

    :func:`~secfw.compiler.build.same_net_set` walks every port of the network
    (on any host): a port added on a flat network of 10k ports would cost 10k.
    Here each address a port puts in the set (``same_net_addresses``) is
    counted — two ports may claim one address (pairs) and it stays while one
    does — and the single addresses are kept in the set's order, patched by
    bisection. The elements are then a copy of that list: what
    ``normalise_addresses`` gives for the same addresses, since single
    addresses are neither merged nor reordered by it. A network CIDR among them
    (an allowed address pair) needs merging: then ``normalise_addresses`` runs
    over the distinct addresses (rare)."""

    def __init__(self, state: CloudState, network_id: str, family: Family) -> None:
        self.network_id, self.family = network_id, family
        self.name = same_net_set_name(network_id, family)
        self.subnet = network_subnet(state.networks[network_id], family)
        self._hosts: dict[str, int] = {}  # canonical single address → ports claiming it
        self._networks: Counter[str] = Counter()  # any other CIDR → ports claiming it
        for port_id in state.ports_by_network.get(network_id, ()):
            for text in same_net_addresses(state.ports[port_id], family, self.subnet):
                self._tally(text, 1)
        self._order = sorted(self._hosts, key=_address_order)

    def move(self, port: Port, step: int) -> None:
        """Count ``port``'s addresses in (``step`` 1) or out (-1) of the set."""
        for text in same_net_addresses(port, self.family, self.subnet):
            key = self._tally(text, step)
            if key is None:
                continue
            if key[2] in self._hosts:  # entered
                bisect.insort(self._order, key[2], key=_address_order)
            else:  # left
                del self._order[bisect.bisect_left(self._order, key, key=_address_order)]

    def _tally(self, text: str, step: int) -> tuple[int, int, str] | None:
        """Count one address; its key when a single address entered or left."""
        key = host_key(text)
        if key is None:
            self._networks[text] += step
            if self._networks[text] <= 0:
                del self._networks[text]
            return None
        count = self._hosts.get(key[2], 0) + step
        if count > 0:
            self._hosts[key[2]] = count
            return key if count == step else None
        self._hosts.pop(key[2], None)
        return key

    def address_set(self) -> AddressSet:
        """The set as ``same_net_set`` computes it from the same ports."""
        elements = (tuple(self._order) if not self._networks
                    else normalise_addresses([*self._order, *self._networks]))
        return AddressSet(self.name, self.network_id, self.family, elements)


def _address_order(address: str) -> tuple[int, int, str]:
    """The order of a set's single addresses (``normalise_addresses``' own)."""
    key = host_key(address)
    assert key is not None, address  # only single addresses are ordered here
    return key


def _port_order(policy: PortPolicy) -> tuple[str, str, str]:
    """The order of a filter's ports: by tap, as ``compile_host`` sorts them
    (its list is by instance and port id before that stable sort)."""
    return policy.tap, policy.instance_id, policy.port_id


def _stale_sets(dirty: _Dirty) -> set[str]:
    """The address sets a batch may have changed: its groups' and its networks'."""
    stale = {f"sg-{g}-{suffix}" for g in dirty.member_groups for suffix in FAMILY_SUFFIXES}
    stale.update(same_net_set_name(n, f) for n in dirty.networks for f in FAMILIES)
    return stale


def _references(chain: GroupChain) -> list[str]:
    """The address sets a chain's rules name (each once)."""
    return list(dict.fromkeys(r.remote_set for r in chain.rules if r.remote_set))


def _membership_change(old: object, new: object) -> set[str]:
    """Groups whose member list an instance record's replacement changes: all of
    its groups when it came or went, else those it joined or left."""
    old_groups = set(old.security_groups) if isinstance(old, Instance) else set()
    new_groups = set(new.security_groups) if isinstance(new, Instance) else set()
    if isinstance(old, Instance) and isinstance(new, Instance):
        return old_groups ^ new_groups
    return old_groups | new_groups

"""``SecfwFirewallDriver``: Neutron's ``FirewallDriver`` on secfw's nftables backend.

Neutron's L2 agent (linuxbridge, OVS with the hybrid plug) loads it with
``[securitygroup] firewall_driver = secfw`` through the
``neutron.agent.firewall_drivers`` entry point, and drives it as it drives its own
drivers (neutron/agent/securitygroups_rpc.py): inside ``defer_apply()`` it pushes
every group's rules (``update_security_group_rules``) and every remote group's
member addresses (``update_security_group_members``), then calls
``prepare_port_filter``/``update_port_filter`` per port; ``remove_port_filter`` when
a port goes.

The driver keeps only what Neutron pushed — port dicts, rules and members per group,
in memory (no secfw store) — and turns it into secfw's IR
(:mod:`secfw.neutron.convert`): one :class:`~secfw.compiler.ir.HostFilter` for the
whole host, applied by :class:`~secfw.backends.nftables.NftablesBackend` as one
atomic nftables transaction (the minimal plan against what it committed last).
Outside ``defer_apply`` every call applies at once; inside, the whole burst is one
transaction at ``filter_defer_apply_off``.

Fail-closed: a port whose groups' rules were not pushed yet gets empty chains (it
receives and sends nothing but what the protections let through), and a remote
group without members matches no one. A failed apply raises and leaves the
kernel as it was (nftables transactions are all-or-nothing); the next apply then
reads the kernel back and plans against it. Established connections a change no
longer allows are deleted from conntrack, as Neutron's drivers do.

Neutron need not be importable: the base class is Neutron's ``FirewallDriver``
when it is (so ``isinstance`` checks in the agent pass), ``object`` otherwise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from secfw.backends.nftables import KernelState, NftablesBackend
from secfw.compiler.build import chain_name, set_name
from secfw.compiler.ir import AddressSet, Family, GroupChain, HostFilter, PortPolicy
from secfw.neutron import convert

if TYPE_CHECKING:
    _Base = object
else:  # Neutron's abstract base when the agent runs us; the driver works without it
    try:
        from neutron.agent.firewall import FirewallDriver as _Base
    except ImportError:
        _Base = object

log = logging.getLogger(__name__)

Port = dict[str, Any]


class SecfwFirewallDriver(_Base):
    """Neutron's firewall driver interface, compiled by secfw, applied with nftables.

    ``topology`` is ``bridged`` (the default: Neutron's taps hang off Linux
    bridges) or ``routed``; ``netns`` applies inside a network namespace (tests,
    the bench) instead of the agent's own. Neutron's agent passes
    ``integration_bridge`` to OVS-capable drivers; it is accepted and unused.
    """

    def __init__(self, integration_bridge: object = None, *, netns: str | None = None,
                 topology: str = "bridged", host: str = "neutron",
                 backend: NftablesBackend | None = None) -> None:
        self.backend = backend if backend is not None else NftablesBackend(
            netns=netns, topology=topology)
        self.host = host
        self._ports: dict[str, Port] = {}
        self._policies: dict[str, PortPolicy] = {}
        self._rules: dict[str, tuple[GroupChain, ...]] = {}
        self._members: dict[str, tuple[AddressSet, ...]] = {}
        self._pushed_rules: dict[str, list[dict[str, Any]]] = {}
        self._pushed_members: dict[str, dict[str, list[object]]] = {}
        self._trusted: set[str] = set()
        self._deferred = 0
        self._dirty = False
        self._committed: KernelState | None = None
        self._applied: HostFilter | None = None
        self.applies = 0  # transactions committed (for tests and the bench)

    # ---- the ports Neutron hands over

    @property
    def ports(self) -> dict[str, Port]:
        """The filtered ports, keyed by ``device`` (the agent looks ports up so)."""
        return self._ports

    def prepare_port_filter(self, port: Mapping[str, Any]) -> None:
        """Start filtering ``port`` (applied now, or at the end of the deferral)."""
        self._set_port(port)

    def update_port_filter(self, port: Mapping[str, Any]) -> None:
        """Refilter ``port`` (new groups, addresses, pairs or port security). A port
        not filtered yet is ignored, as Neutron's own drivers do."""
        if port.get("device") not in self._ports:
            log.info("update_port_filter: %s is not filtered; ignored", port.get("device"))
            return
        self._set_port(port)

    def apply_port_filter(self, port: Mapping[str, Any]) -> None:
        """Nothing to do: :meth:`prepare_port_filter` already filters the port."""

    def remove_port_filter(self, port: Mapping[str, Any]) -> None:
        """Stop filtering ``port``; its tap then falls back to the table's default
        (not a filtered port: dropped, docs/nftables.md)."""
        device = str(port.get("device"))
        if self._ports.pop(device, None) is not None:
            self._policies.pop(device, None)
            self._changed()

    def _set_port(self, port: Mapping[str, Any]) -> None:
        policy = convert.port_policy(port)  # validates before anything is kept
        device = str(port["device"])
        if self._policies.get(device) == policy and self._ports[device] == port:
            return
        self._ports[device] = dict(port)
        self._policies[device] = policy
        self._changed()

    # ---- the groups' rules and members

    def update_security_group_rules(self, sg_id: str, rules: Iterable[Mapping[str, Any]]) -> None:
        """Replace the rules of group ``sg_id`` (Neutron sends them all each time)."""
        key = convert.group_key(sg_id)
        pushed = [dict(r) for r in rules]
        # The agent pushes every group of every port it refreshes, mostly unchanged:
        # keeping the same chain objects lets the renderer reuse their rendering.
        if self._pushed_rules.get(key) == pushed:
            return
        self._rules[key] = convert.group_chains(key, pushed)
        self._pushed_rules[key] = pushed
        self._changed()

    def update_security_group_members(self, sg_id: str,
                                      ips: Mapping[str, Iterable[object]]) -> None:
        """Replace the member addresses of remote group ``sg_id`` (``{"IPv4": [(ip,
        mac), …], "IPv6": […]}``; an address group's addresses come the same way)."""
        key = convert.group_key(sg_id)
        pushed = {k: [tuple(e) if isinstance(e, list) else e for e in v] for k, v in ips.items()}
        if self._pushed_members.get(key) == pushed:  # unchanged: same objects (see above)
            return
        self._members[key] = convert.member_sets(key, pushed)
        self._pushed_members[key] = pushed
        self._changed()

    def security_group_updated(self, action_type: str, sec_group_ids: Iterable[str],
                               device_id: str | None = None) -> None:
        """A notice only: the agent follows it with the rules or members themselves
        (``update_security_group_*``) and ``update_port_filter``."""
        log.debug("security group %s updated: %s", action_type, sorted(sec_group_ids))

    def process_trusted_ports(self, port_ids: Iterable[str]) -> None:
        """Trusted ports (network:dhcp, routers) are not filtered by this driver:
        noted only, as Neutron's iptables driver leaves them unfiltered too."""
        self._trusted.update(port_ids)

    def remove_trusted_ports(self, port_ids: Iterable[str]) -> None:
        self._trusted.difference_update(port_ids)

    # ---- deferral and apply

    def filter_defer_apply_on(self) -> None:
        """Hold every change until the matching :meth:`filter_defer_apply_off`
        (calls nest; the outermost off applies)."""
        self._deferred += 1

    def filter_defer_apply_off(self) -> None:
        """Apply everything held since the first :meth:`filter_defer_apply_on` as one
        transaction (nothing when nothing changed)."""
        self._deferred = max(0, self._deferred - 1)
        if self._deferred == 0 and self._dirty:
            self.apply()

    @contextlib.contextmanager
    def defer_apply(self) -> Iterator[None]:
        """``with driver.defer_apply(): …`` — one transaction for the whole block."""
        self.filter_defer_apply_on()
        try:
            yield
        finally:
            self.filter_defer_apply_off()

    def _changed(self) -> None:
        self._dirty = True
        if self._deferred == 0:
            self.apply()

    def host_filter(self) -> HostFilter:
        """The whole host's filter as the IR, from what Neutron pushed (pure)."""
        policies = sorted(self._policies.values(), key=lambda p: p.tap)
        groups = sorted({g for port in self._ports.values() for g in convert.port_groups(port)})
        chains = [c for g in groups for c in self._group_chains(g)]
        wanted = sorted({r.remote_set for c in chains for r in c.rules if r.remote_set})
        sets = [self._member_set(name) for name in wanted]
        return HostFilter(self.host, tuple(policies),
                          tuple(sorted(chains, key=lambda c: c.name)), tuple(sets))

    def _group_chains(self, group: str) -> tuple[GroupChain, ...]:
        """The group's chains; empty ones (fail-closed) until its rules arrive."""
        known = self._rules.get(group)
        if known is not None:
            return known
        return tuple(GroupChain(chain_name(group, d), group, d, ())
                     for d in ("ingress", "egress"))

    def _member_set(self, name: str) -> AddressSet:
        """The member set ``name`` (``sg-<group>-v4``/``-v6``); empty until pushed."""
        group = name[len("sg-"):-len("-v4")]
        for member_set in self._members.get(group, ()):
            if member_set.name == name:
                return member_set
        family: Family = "ipv4" if name.endswith("-v4") else "ipv6"
        return AddressSet(set_name(group, family), group, family, ())

    def apply(self) -> None:
        """Compile and commit the host's filter now, as one atomic transaction.
        Raises SecfwError (kernel unchanged) when it cannot; the next apply then
        plans against the kernel's state read back."""
        desired = self.host_filter()
        current = self._committed if self._committed is not None else self.backend.read()
        self._committed = None
        plan = self.backend.plan(current, desired)
        if not plan.empty:
            self.backend.apply(plan)
            self.applies += 1
        self._committed = self.backend.committed(desired)
        self._dirty = False
        previous, self._applied = self._applied, desired
        if previous is not None:
            self.backend.revoke(previous, desired)

    def cleanup(self) -> None:
        """Delete secfw's tables (the driver is being replaced)."""
        self.backend.cleanup()
        self._committed = None

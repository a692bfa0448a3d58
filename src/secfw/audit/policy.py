"""The whole cloud's filters, indexed for audits.

:class:`CloudPolicy` compiles the IR of every host that has instances
(:func:`secfw.compiler.build.compile_host`) and keeps, per port, its
:class:`~secfw.compiler.ir.PortPolicy` with the
:class:`~secfw.compiler.evaluate.PolicyIndex` of its host: a flow between two
hosts is judged by the egress of the source port on its host and the ingress of
the destination port on its own — what the two kernels do.

Who sends from an address (the audits' one convention, the oracle's too): the
port whose fixed address it is (the lowest port id if several), else the lowest
port id among the ports with an allowed address pair containing it; an address
no port has is outside the cloud (only the destination's ingress applies).
Anti-spoofing makes this true for packets leaving a tap; a packet the uplink
delivers with a port's address is judged the same way.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import netaddr

from secfw.cloud import CloudState
from secfw.compiler.build import compile_host
from secfw.compiler.evaluate import PolicyIndex
from secfw.compiler.explain import describe_rule
from secfw.compiler.ir import AddressSet, Family, GroupChain, IRRule, PortPolicy
from secfw.errors import ConflictError
from secfw.model import Instance, Network, Port

#: The whole address space of a family.
EVERYWHERE = {"ipv4": "0.0.0.0/0", "ipv6": "::/0"}


def family_of(address: str) -> Family:
    """``ipv4`` or ``ipv6`` for an address or CIDR."""
    return "ipv4" if ipaddress.ip_network(address, strict=False).version == 4 else "ipv6"


def everywhere(family: Family) -> netaddr.IPSet:
    """Every address of ``family``."""
    return netaddr.IPSet([EVERYWHERE[family]])


@dataclass(frozen=True)
class PortView:
    """One port as the audits see it: its model records and its host's filter."""

    port: Port
    instance: Instance
    network: Network
    policy: PortPolicy
    index: PolicyIndex

    def address(self, family: Family) -> str | None:
        """The port's fixed address of ``family`` (None when it has none)."""
        return self.port.ip if family == "ipv4" else self.port.ip6


class CloudPolicy:
    """The compiled filters of every host of ``state`` (see the module docstring)."""

    def __init__(self, state: CloudState, allow_same_net: bool = True) -> None:
        self.state = state
        self.allow_same_net = allow_same_net
        self.ports: dict[str, PortView] = {}
        # an instance in ERROR has no host (and no port): nothing to compile for it
        hosts = sorted({i.host for i in state.instances.values() if i.host})
        set_cache: dict[str, AddressSet] = {}
        for host in hosts:
            index = PolicyIndex(compile_host(state, host, allow_same_net, set_cache))
            for policy in index.hf.ports:
                port = state.ports[policy.port_id]
                instance = state.instances[port.instance_id]
                self.ports[port.id] = PortView(
                    port, instance, state.networks[port.network_id], policy, index)
        self._fixed: dict[str, str] = {}
        #: fixed addresses of ports on two overlapping networks: they name no one port
        self._shared: dict[str, int] = {}
        for port_id in sorted(self.ports, reverse=True):  # the lowest id wins
            for address in _fixed_addresses(self.ports[port_id].port):
                if address in self._fixed:
                    self._shared[address] = self._shared.get(address, 1) + 1
                self._fixed[address] = port_id
        self._paired = sorted(
            (port_id, netaddr.IPNetwork(cidr))
            for port_id, view in self.ports.items()
            for cidr, _ in view.port.address_pairs()
        )
        self._attributed: dict[Family, dict[str, netaddr.IPSet]] = {}
        self._sets: dict[str, netaddr.IPSet] = {}
        self._protected: dict[Family, netaddr.IPSet] = {}
        # one object per CIDR and per rule reference: the audits of a whole cloud
        # meet the same rules on thousands of ports (and UnionCache keys by identity)
        self._cidrs: dict[str, netaddr.IPSet] = {}
        self._refs: dict[tuple[str, str, str], dict[str, Any]] = {}

    # ------------------------------------------------------------------ addresses

    def owner(self, address: str) -> PortView | None:
        """The port that sends from ``address`` (module docstring), or None."""
        canonical = str(ipaddress.ip_address(address))
        if canonical in self._shared:
            raise ConflictError(
                f"{canonical} is the fixed address of {self._shared[canonical]} ports on "
                "overlapping networks: an address does not say which one (audit the "
                "instances by name, or their host with verify)")
        port_id = self._fixed.get(canonical)
        if port_id is None:
            addr = netaddr.IPAddress(canonical)
            port_id = next((pid for pid, net in self._paired
                            if net.version == addr.version and addr in net), None)
        return None if port_id is None else self.ports[port_id]

    def attributed(self, family: Family) -> dict[str, netaddr.IPSet]:
        """For each port id, the addresses of ``family`` :meth:`owner` gives it
        (an exact partition of the addresses the cloud's ports have)."""
        found = self._attributed.get(family)
        if found is not None:
            return found
        version = 4 if family == "ipv4" else 6
        fixed = netaddr.IPSet(a for a in self._fixed if ":" in a) if version == 6 else \
            netaddr.IPSet(a for a in self._fixed if ":" not in a)
        # one IPSet built per port from its list (IPSet.add re-compacts every time)
        owned: dict[str, list[str]] = {pid: [] for pid in self.ports}
        for address, port_id in self._fixed.items():
            if (":" in address) == (version == 6):
                owned[port_id].append(address)
        found = {pid: netaddr.IPSet(addresses) for pid, addresses in owned.items()}
        claimed = netaddr.IPSet()
        for port_id, network in self._paired:  # sorted by port id: the lowest wins
            if network.version != version:
                continue
            found[port_id] |= netaddr.IPSet([network]) - fixed - claimed
            claimed.add(network)
        self._attributed[family] = found
        return found

    def protected(self, family: Family) -> netaddr.IPSet:
        """The addresses of ``family`` that filtered ports (port security on) own."""
        found = self._protected.get(family)
        if found is None:
            cidrs = [cidr for port_id, owned in self.attributed(family).items()
                     if self.ports[port_id].policy.port_security for cidr in owned.iter_cidrs()]
            found = netaddr.IPSet(cidrs)
            self._protected[family] = found
        return found

    # ------------------------------------------------------------------ naming

    def group_name(self, group_id: str) -> str:
        group = self.state.groups.get(group_id)
        return group.name if group is not None else group_id

    def rule_ref(self, chain: GroupChain, rule: IRRule) -> dict[str, Any]:
        """A rule as the audits name it: group (name), group_id, project, rule_id,
        direction and a short description. Built once per (group, rule,
        direction) and shared: callers must not mutate it."""
        key = (chain.group_id, rule.rule_id, chain.direction)
        found = self._refs.get(key)
        if found is None:
            found = self._refs[key] = self._rule_ref(chain, rule)
        return found

    def _rule_ref(self, chain: GroupChain, rule: IRRule) -> dict[str, Any]:
        group = self.state.groups.get(chain.group_id)
        model = self.state.rules.get(rule.rule_id)
        return {
            "group": group.name if group else chain.group_id,
            "group_id": chain.group_id,
            "project": group.project if group else None,
            "rule_id": rule.rule_id,
            "direction": chain.direction,
            "rule": describe_rule(self.state, model) if model else rule.rule_id,
        }

    def chains(self, view: PortView, direction: str) -> list[GroupChain]:
        """The group chains of ``view`` in ``direction``, in the instance's order."""
        names = view.policy.ingress_chains if direction == "ingress" else \
            view.policy.egress_chains
        return [chain for name in names
                if (chain := view.index.chains.get(name)) is not None]

    def address_set(self, view: PortView, name: str) -> netaddr.IPSet:
        """The IR address set ``name`` of ``view``'s host. Cached by name: a set's
        name is derived from its group's or network's id, and its elements are the
        same on every host (members on any host)."""
        found = self._sets.get(name)
        if found is None:
            found = netaddr.IPSet(str(n) for n in view.index.members(name))
            self._sets[name] = found
        return found

    def same_net_members(self, view: PortView, family: Family) -> netaddr.IPSet:
        """The same-net sources ``view`` accepts in ``family`` (empty when off)."""
        names = [n for n in view.policy.same_net_sets
                 if n.endswith("-v4" if family == "ipv4" else "-v6")]
        if len(names) == 1:
            return self.address_set(view, names[0])
        found = netaddr.IPSet()
        for name in names:
            found |= self.address_set(view, name)
        return found

    def remote_set(self, view: PortView, rule: IRRule) -> netaddr.IPSet:
        """The remote addresses ``rule`` (of ``view``'s host) accepts."""
        if rule.remote_set is not None:
            return self.address_set(view, rule.remote_set)
        cidr = rule.remote_cidr if rule.remote_cidr is not None else EVERYWHERE[rule.family]
        found = self._cidrs.get(cidr)
        if found is None:
            found = self._cidrs[cidr] = netaddr.IPSet([cidr])
        return found


def _fixed_addresses(port: Port) -> list[str]:
    return [str(ipaddress.ip_address(a)) for a in (port.ip, port.ip6) if a]

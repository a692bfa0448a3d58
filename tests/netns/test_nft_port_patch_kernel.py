"""The per-port plan (render.Renderer's patched port-derived sets) applied by nft
on top of the old table gives exactly the full rendering's state: read back from
the kernel after each port change (added, removed, groups changed, address pair
added, port security off), it equals ``KernelState.from_ruleset(render(...))``,
and every one of those plans is made of element commands only (O(change)).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from secfw.backends.nftables import KernelState, NftablesBackend, render
from secfw.compiler.ir import AddressPair, AddressSet, GroupChain, HostFilter, PortPolicy

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.timeout(60),
]

CHAINS = tuple(GroupChain(f"sg-{i}-{d[:2]}", f"g{i}", d, ())  # type: ignore[arg-type]
               for i in range(4) for d in ("ingress", "egress"))
SETS = (AddressSet("net-a-v4", "a", "ipv4", ("10.0.0.1/32",)),)


def port(index: int, groups: tuple[int, ...] = (1, 2), pair: bool = False,
         security: bool = True) -> PortPolicy:
    return PortPolicy(
        tap=f"tap-{index:04d}", port_id=f"p{index}", instance_id=f"i{index}",
        mac=f"fa:16:3e:00:00:{index:02x}", ipv4=(f"10.0.0.{index + 2}",),
        ipv6=(f"fd00::{index + 2:x}",), same_net_sets=("net-a-v4",) if security else (),
        ingress_chains=tuple(f"sg-{g}-in" for g in groups),
        egress_chains=tuple(f"sg-{g}-eg" for g in groups), egress_open=False,
        allowed_pairs=(AddressPair(f"192.168.{index}.0/24", "fa:16:3e:ff:00:01"),) if pair
        else (), port_security=security)


def host(ports: dict[int, PortPolicy]) -> HostFilter:
    return HostFilter("h1", tuple(ports[i] for i in sorted(ports)), CHAINS, SETS)


Change = Callable[[dict[int, PortPolicy]], object]
CHANGES: list[tuple[str, Change]] = [
    ("port added", lambda p: p.__setitem__(9, port(9, (2, 1)))),
    ("port removed", lambda p: p.pop(3)),
    ("group removed from a port", lambda p: p.__setitem__(4, port(4, (2,)))),
    ("groups replaced", lambda p: p.__setitem__(5, port(5, (3, 0)))),
    ("address pair added", lambda p: p.__setitem__(6, port(6, pair=True))),
    ("port security off", lambda p: p.__setitem__(7, port(7, security=False))),
]


def test_patched_port_plans_reach_the_full_rendering_state(scratch_ns: Callable[[], str]) -> None:
    backend = NftablesBackend(netns=scratch_ns())
    ports = {i: port(i) for i in range(8)}
    previous = host(ports)
    backend.apply(backend.plan(None, previous))
    for label, change in CHANGES:
        change(ports)
        desired = host(ports)
        transaction = backend.plan(backend.committed(previous), desired)
        assert not transaction.full and transaction.commands, label
        assert all(" element " in c for c in transaction.commands), (label, transaction.text)
        backend.apply(transaction)
        assert backend.read() == KernelState.from_ruleset(render(desired)), label
        previous = desired

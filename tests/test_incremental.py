"""The incremental pipeline equals the full one after any sequence of changes.

The API invariants machine (random, valid and invalid API calls on two hosts) is
extended with what reaches the IR beyond it — egress rules, IPv6 rules, rules
deleted by id, allowed address pairs and port security — and follows the store
through its change feed, as the agent does. After every step, for each host,
:class:`HostCompiler` fed the replaced records must give exactly what
``compile_host`` gives from scratch; and pieces that did not change must be the
same objects as before (what lets a backend skip them). Downstream, the
nftables backend's :class:`Renderer` and :class:`StateCache`, fed those results
pass after pass, must give exactly what a fresh ``render`` and
``KernelState.from_ruleset`` give, on both topologies; and the plan from the
previous pass's state must be what it is without any sharing.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule
from test_invariants import GROUPS, PROJECTS, CloudMachine

from secfw.api import Api
from secfw.backends.nftables.plan import plan
from secfw.backends.nftables.render import Renderer, render
from secfw.backends.nftables.state import KernelState, StateCache
from secfw.cloud import CloudState
from secfw.compiler.build import compile_host
from secfw.compiler.incremental import HostCompiler
from secfw.compiler.ir import HostFilter
from secfw.compiler.sources import shared_fixed_addresses
from secfw.store import open_store

HOST_NAMES = ("h1", "h2")
PAIRS = st.sampled_from([[], ["10.9.0.0/24"], ["10.9.0.7"], ["10.0.0.3,fa:16:3e:00:00:99"],
                         ["fd00::/64"]])


class IncrementalMachine(CloudMachine):
    """CloudMachine plus an incremental compiler per host (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.compilers = {h: HostCompiler(h) for h in HOST_NAMES}
        self.renderers = {(h, t): (Renderer(t), StateCache())
                          for h in HOST_NAMES for t in ("routed", "bridged")}
        self.previous: dict[str, HostFilter] = {}
        for compiler in self.compilers.values():
            compiler.full(self.follower)

    def seed_project(self, project: str) -> None:
        """The parent's seed plus vm2 on the other host in ``db``: ``db``'s rule
        from ``web`` makes web's address set referenced on h2, so vm1 (h1, in
        ``web``) joining or leaving groups changes a set in use."""
        super().seed_project(project)
        self.attempt(lambda: self.api.boot(project, "vm2", "m1.tiny", "img", "h2", ["db"],
                                           ["flat"]))

    def follow(self) -> None:
        """Replay the change feed, then feed what it replaced to the compilers."""
        self.previous = {h: c.result for h, c in self.compilers.items() if c.result}
        revision, changes = self.api.store.changes_since(self.follower.revision)
        replaced = self.follower.apply_changes(revision, changes)
        for compiler in self.compilers.values():
            compiler.update(self.follower, replaced)

    # ------------------------------------------------------------------ more changes

    @rule(project=PROJECTS, group=GROUPS, protocol=st.sampled_from([None, "tcp", "icmp"]),
          ethertype=st.sampled_from(["IPv4", "IPv6"]))
    def add_egress_rule(self, project: str, group: str, protocol: str | None,
                        ethertype: str) -> None:
        self.attempt(lambda: self.api.rule_create(
            project, group, direction="egress", ethertype=ethertype, protocol=protocol))

    @rule(project=PROJECTS, group=GROUPS, source=GROUPS,
          ethertype=st.sampled_from(["IPv4", "IPv6"]))
    def add_ingress_group_rule(self, project: str, group: str, source: str,
                               ethertype: str) -> None:
        self.attempt(lambda: self.api.rule_create(
            project, group, ethertype=ethertype, protocol="udp", dst_port="53",
            remote_group=source))

    @rule(index=st.integers(min_value=0, max_value=50))
    def delete_rule_by_id(self, index: int) -> None:
        rules = sorted(self.follower.rules.values(), key=lambda r: r.id)
        if rules:
            chosen = rules[index % len(rules)]
            project = self.follower.groups[chosen.group_id].project
            self.attempt(lambda: self.api.rule_delete(project, chosen.id))

    @rule(index=st.integers(min_value=0, max_value=50), pairs=PAIRS,
          security=st.sampled_from([None, True, False]))
    def update_port(self, index: int, pairs: list[str], security: bool | None) -> None:
        ports = sorted(self.follower.ports.values(), key=lambda p: p.id)
        if ports:
            port = ports[index % len(ports)]
            project = self.follower.instances[port.instance_id].project
            self.attempt(lambda: self.api.port_update(
                project, port.id, pairs if security is not False else [], security))

    # ------------------------------------------------------------------ the contract

    @invariant()
    def incremental_equals_full(self) -> None:
        for host, compiler in self.compilers.items():
            assert compiler.result == compile_host(self.follower, host)

    @invariant()
    def indexed_shared_addresses_are_the_computed_ones(self) -> None:
        """The compiler's fixed-address index, patched port by port, answers as
        the addresses of its result's ports computed afresh."""
        for compiler in self.compilers.values():
            ports = compiler.result.ports if compiler.result else ()
            assert compiler.shared_fixed_addresses(ports) == shared_fixed_addresses(ports)

    @invariant()
    def unchanged_pieces_are_the_same_objects(self) -> None:
        for host, compiler in self.compilers.items():
            before, after = self.previous.get(host), compiler.result
            if before is None or after is None:
                continue
            _assert_reused(before.ports, after.ports, lambda p: p.port_id)
            _assert_reused(before.chains, after.chains, lambda c: c.name)
            _assert_reused(before.sets, after.sets, lambda s: s.name)


    @invariant()
    def cached_rendering_equals_fresh_rendering(self) -> None:
        for (host, topology), (renderer, states) in self.renderers.items():
            result = self.compilers[host].result
            assert result is not None
            previous = self.previous.get(host, result)
            before = states.state(renderer.render(previous), renderer.delta)
            ruleset = renderer.render(result)
            assert ruleset == render(result, topology)
            after = states.state(ruleset, renderer.delta)
            assert after == KernelState.from_ruleset(ruleset)
            fresh_before = KernelState.from_ruleset(render(previous, topology))
            expected = plan(fresh_before, ruleset)
            assert plan(before, ruleset, after) == expected
            assert plan(before, ruleset, after, renderer.delta) == expected


def _assert_reused(before: tuple[object, ...], after: tuple[object, ...],
                   key: object) -> None:
    """Every piece of ``after`` equal to the piece of ``before`` with its key is that
    very object; an unchanged tuple is the same tuple."""
    keyed = {key(p): p for p in before}  # type: ignore[operator]
    for piece in after:
        old = keyed.get(key(piece))  # type: ignore[operator]
        if old == piece:
            assert old is piece, f"equal but rebuilt: {piece}"
    if before == after:
        assert before is after


def test_update_without_a_result_compiles_in_full(tmp_path: object) -> None:
    api = Api(open_store(f"sqlite:///{tmp_path}/secfw.db"))
    api.net_create("p", "net", "10.0.0.0/24")
    api.image_create("p", "img", visibility="public")
    api.boot("p", "vm", "m1.tiny", "img", "h1", ["default"], ["net"])
    state = CloudState.from_snapshot(api.store.load())
    assert HostCompiler("h1").update(state, []) == compile_host(state, "h1")


IncrementalMachine.TestCase.settings = CloudMachine.TestCase.settings  # same budget
TestIncrementalCompile = IncrementalMachine.TestCase

"""The desired state's chains canonicalise their rules only when a planner
compares them (backends/nftables/state.py ``ChainState.of``): a sync into an
empty table canonicalises nothing, and a lazy state equals the eager one."""

from __future__ import annotations

import pytest
from test_nft_render import small

from secfw.backends.nftables import KernelState, plan, render
from secfw.backends.nftables import state as state_module
from secfw.backends.nftables.state import ChainState, RuleState, StateCache, rule_state
from secfw.backends.nftables.syntax import Rule


def test_planning_into_an_empty_table_canonicalises_no_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[object] = []

    def counted(rule: Rule) -> RuleState:
        calls.append(rule)
        return rule_state(rule)

    monkeypatch.setattr(state_module, "rule_state", counted)
    ruleset = render(small())
    want = StateCache().state(ruleset)
    empty = KernelState(sets={}, chains={})  # the tables exist, empty: not a full replacement
    transaction = plan(empty, ruleset, want)
    commands = transaction.commands
    assert not transaction.full
    assert any(c.startswith("add rule") for c in commands)
    assert calls == []


def test_a_lazy_chain_state_equals_the_eager_one() -> None:
    for chain in render(small()).chains:
        lazy = ChainState.of(chain)
        eager = ChainState(chain.hook, tuple(rule_state(r) for r in chain.rules))
        assert lazy == eager and hash(lazy) == hash(eager)
        assert ChainState.of(chain).rules == eager.rules

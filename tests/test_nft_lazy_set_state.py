"""The desired state's sets build their frozensets only when read
(backends/nftables/state.py ``SetState.of_members``): a first pass against the
closed filter plans without building the new sets' frozensets (they are not
held while libnftables parses the transaction), and a lazy state is
indistinguishable from the eager one."""

from __future__ import annotations

from test_nft_render import small

from secfw.agent.kernelrecord import StateDigest
from secfw.agent.reconciler import closed_filter
from secfw.backends.nftables import KernelState, plan, render
from secfw.backends.nftables.state import SetState, StateCache


def _eager(state: SetState) -> SetState:
    return SetState(state.key_type, state.flags, state.is_map, frozenset(state.elements),
                    state.data_type)


def _pending(state: SetState) -> bool:
    """Whether the state's frozenset is still to be built (white box: the slot)."""
    return state._members is not None


def test_planning_from_the_closed_filter_builds_only_the_sets_it_already_has() -> None:
    closed = KernelState.from_ruleset(render(closed_filter("h")))
    ruleset = render(small())
    want = StateCache().state(ruleset)
    assert all(_pending(s) for s in want.sets.values())
    transaction = plan(closed, ruleset, want)
    assert not transaction.full
    built = {key for key, s in want.sets.items() if not _pending(s)}
    assert built <= set(closed.sets)
    assert set(want.sets) - set(closed.sets), "the small filter has sets of its own"
    eager = KernelState(sets={k: _eager(s) for k, s in want.sets.items()},
                        chains=want.chains, tables=want.tables)
    assert plan(closed, ruleset, eager).commands == transaction.commands


def test_a_lazy_set_state_equals_the_eager_one() -> None:
    ruleset = render(small())
    digest = StateDigest()
    for named in ruleset.sets:
        lazy = KernelState.from_ruleset(ruleset).sets[(named.family, named.name)]
        eager = _eager(KernelState.from_ruleset(ruleset).sets[(named.family, named.name)])
        assert lazy.size == eager.size == len(frozenset(named.elements))
        assert lazy == eager and hash(lazy) == hash(eager) and repr(lazy) == repr(eager)
        assert digest(KernelState({("inet", "s"): lazy}, {})) == digest(
            KernelState({("inet", "s"): eager}, {}))
        gone = frozenset(list(eager.elements)[:1])
        assert lazy.patched(gone, frozenset()).elements == eager.elements - gone


def test_a_lazy_set_state_builds_its_frozenset_once() -> None:
    named = next(s for s in render(small()).sets if len(s.elements) > 1)
    state = KernelState.from_ruleset(render(small())).sets[(named.family, named.name)]
    first = state.elements
    assert first == frozenset(named.elements) and state.elements is first
    assert not _pending(state)


def test_patching_a_rendered_state_keeps_its_members_as_the_base() -> None:
    """The first port change after a full pass: the rendered state is patched
    without building its frozenset, and every patched state in a chain equals
    the eager computation (elements, size, equality, hash)."""
    named = max(render(small()).sets, key=lambda s: len(s.elements))
    assert len(named.elements) > 2
    state = KernelState.from_ruleset(render(small())).sets[(named.family, named.name)]
    eager = frozenset(named.elements)
    first, second = named.elements[0], named.elements[1]
    extra = named.elements[0]._replace(key=("zz-not-there",))
    steps = [(frozenset({first}), frozenset()), (frozenset(), frozenset({extra})),
             (frozenset({second, extra}), frozenset({first}))]
    for lost, gained in steps:
        patched = state.patched(lost, gained)
        eager = (eager - lost) | gained
        assert patched.size == len(eager)
        assert patched.elements == eager and patched == _eager(patched)
        assert hash(patched) == hash(_eager(patched))
        state = patched
    fresh = KernelState.from_ruleset(render(small())).sets[(named.family, named.name)]
    fresh.patched(frozenset({first}), frozenset())
    assert _pending(fresh), "patching must not build the rendered state's frozenset"

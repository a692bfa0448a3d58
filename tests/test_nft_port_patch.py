"""A port added, removed or changed costs what it changes (render.Renderer's
per-port path): after any sequence of port changes the patched ruleset is exactly
the fresh rendering, the patched state exactly its state, and the plan from the
delta's element changes exactly the plan from comparing everything — and applying
that plan's element changes to the old state gives the new state.

The kernel side (the same plan applied by nft on top of the old table, read back)
is tests/netns/test_nft_port_patch_kernel.py.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

from hypothesis import given, settings
from hypothesis import strategies as st

from secfw.backends.nftables import state as state_module
from secfw.backends.nftables.plan import plan
from secfw.backends.nftables.render import Delta, Renderer, render
from secfw.backends.nftables.state import KernelState, SetState, StateCache
from secfw.backends.nftables.syntax import Element, Ruleset
from secfw.compiler.ir import AddressPair, AddressSet, GroupChain, HostFilter, PortPolicy
from secfw.errors import SecfwError

CHAINS = tuple(GroupChain(f"sg-{i}-{d[:2]}", f"g{i}", d, ())  # type: ignore[arg-type]
               for i in range(4) for d in ("ingress", "egress"))
SETS = (AddressSet("net-a-v4", "a", "ipv4", ("10.0.0.1/32",)),
        AddressSet("net-b-v4", "b", "ipv4", ("10.1.0.1/32",)))


def port(index: int, groups: tuple[int, ...], pair: bool, security: bool) -> PortPolicy:
    """Port ``index``: tap ``tap-<index>``, in groups ``groups`` (both directions),
    on network a or b, with an address-pair network when ``pair``."""
    net = "a" if index % 2 else "b"
    return PortPolicy(
        tap=f"tap-{index:04d}", port_id=f"p{index}", instance_id=f"i{index}",
        mac=f"fa:16:3e:00:{index // 256:02x}:{index % 256:02x}",
        ipv4=(f"10.{0 if net == 'a' else 1}.{index // 200}.{index % 200 + 2}",),
        ipv6=(f"fd00::{index + 2:x}",),
        same_net_sets=(f"net-{net}-v4",) if security else (),
        ingress_chains=tuple(f"sg-{g}-in" for g in groups),
        egress_chains=tuple(f"sg-{g}-eg" for g in groups), egress_open=not groups,
        allowed_pairs=(AddressPair(f"192.168.{index}.0/24", "fa:16:3e:ff:00:01"),) if pair
        else (), port_security=security)


def host(ports: dict[int, PortPolicy], bare: int = 0) -> HostFilter:
    """The host of ``ports``; its same-net sets hold their network's addresses,
    new objects each time (as the compiler makes them: a port joining changes
    its network's set), sorted canonical /32s — and, with ``bare`` 1, also one
    bare address (not canonical: the renderer makes it canonical); with 2, that
    address both bare and canonical (one element)."""
    nets = {name: [net.elements[0]] for net in SETS for name in [net.name]}
    for p in ports.values():
        nets[f"net-{'a' if p.ipv4[0].startswith('10.0.') else 'b'}-v4"].append(f"{p.ipv4[0]}/32")
    nets["net-a-v4"] += ["10.0.99.1", "10.0.99.1/32"][:bare]
    sets = tuple(_same_net(net.name, net.owner_id, tuple(sorted(nets[net.name])))
                 for net in SETS)
    return HostFilter("h1", tuple(ports[i] for i in sorted(ports)), CHAINS, sets)


@cache
def _same_net(name: str, owner: str, elements: tuple[str, ...]) -> AddressSet:
    """One object per content, as the compiler hands an unchanged set over."""
    return AddressSet(name, owner, "ipv4", elements)


GROUPS = st.lists(st.integers(0, 3), max_size=4, unique=True).map(tuple)
#: (what, port index, its groups, address pair, port security, a bare address)
STEP = st.tuples(st.sampled_from(["set", "remove"]), st.integers(0, 11), GROUPS,
                 st.booleans(), st.booleans(), st.integers(0, 2))


@settings(max_examples=60, deadline=None)
@given(st.lists(STEP, min_size=1, max_size=12))
def test_patched_ports_equal_fresh_rendering(steps: list[tuple[str, int, tuple[int, ...],
                                                               bool, bool, int]]) -> None:
    # Start with every port in two groups: slot widths then rarely change, so most
    # steps take the per-port path (a width change renders whole, also checked).
    ports = {i: port(i, (i % 4, (i + 1) % 4), False, True) for i in range(12)}
    renderer, states = Renderer("routed"), StateCache()
    previous = host(ports, steps[0][5])  # a bare address may be there from the start
    before = states.state(renderer.render(previous), renderer.delta)
    for what, index, groups, pair, security, bare in steps:
        if what == "remove":
            ports.pop(index, None)
        else:
            ports[index] = port(index, groups, pair, security)
        current = host(ports, bare)
        ruleset = renderer.render(current)
        assert ruleset == render(current)
        after = states.state(ruleset, renderer.delta)
        assert after == KernelState.from_ruleset(ruleset)
        expected = plan(KernelState.from_ruleset(render(previous)), ruleset)
        planned = plan(before, ruleset, after, renderer.delta)
        assert planned == expected
        assert _applied(before, renderer.delta) == after
        previous, before = current, after


def test_a_port_added_is_patched_not_rendered_whole() -> None:
    """The per-port path is taken (so the test above checks it): the port-derived
    sets a new port is not in stay the same objects, and the delta lists only the
    sets it is in, each with exactly its elements gained."""
    ports = {i: port(i, (1, 2), False, True) for i in range(8)}
    renderer = Renderer("routed")
    first = renderer.render(host(ports))
    ports[20] = port(20, (2, 1), False, True)
    second = renderer.render(host(ports))
    assert renderer.delta is not None and renderer.delta.elements
    address = Element((f"{ports[20].ipv4[0]}/32",))
    for key, (lost, gained) in renderer.delta.elements.items():
        if key[1] in {s.name for s in SETS}:  # its network's same-net set: its address
            assert not lost and gained == {address}, key
            continue
        assert not lost and gained and all(e.key[0] == "tap-0020" for e in gained), key
    unchanged = {s.name for s in second.sets} - {k[1] for k in renderer.delta.sets}
    old = {s.name: s for s in first.sets}
    assert "arp_open" in unchanged  # a protected port is not in it
    assert all(old[s.name] is s for s in second.sets if s.name in unchanged)


def _applied(state: KernelState, delta: Delta | None) -> KernelState:
    """``state`` with the delta's element changes applied to each set (what the
    plan's element commands do), the other changed objects taken whole."""
    assert delta is not None
    sets, chains = dict(state.sets), dict(state.chains)
    fresh = KernelState.from_ruleset(Ruleset(
        tuple(s for s in delta.sets.values() if s is not None),
        tuple(c for c in delta.chains.values() if c is not None)))
    for key in delta.sets:
        if key in delta.elements:
            lost, gained = delta.elements[key]
            assert lost <= sets[key].elements and not gained & sets[key].elements
            sets[key] = sets[key].with_elements((sets[key].elements - lost) | gained)
        elif key in fresh.sets:
            sets[key] = fresh.sets[key]
        else:
            del sets[key]
    for key in delta.chains:
        if key in fresh.chains:
            chains[key] = fresh.chains[key]
        else:
            del chains[key]
    return replace(state, sets=sets, chains=chains)


#: a universe of elements small enough for changes to collide often
_UNIVERSE = [Element((f"tap-{i:02d}",)) for i in range(40)]


@settings(max_examples=80, deadline=None)
@given(st.sets(st.sampled_from(_UNIVERSE)),
       st.lists(st.tuples(st.sets(st.sampled_from(_UNIVERSE)),
                          st.sets(st.sampled_from(_UNIVERSE)), st.booleans()), max_size=30),
       st.sampled_from([0, 64]))
def test_patched_set_state_equals_the_set_it_describes(
        start: set[Element], changes: list[tuple[set[Element], set[Element], bool]],
        slack: int) -> None:
    """SetState.patched folds successive changes into one against a shared base:
    at every step its elements, size, equality and hash are those of the plain
    set, whether or not an earlier step's elements were read (built), and
    whether the fold builds them early (slack 0: often) or not."""
    was, state_module._FOLD_SLACK = state_module._FOLD_SLACK, slack
    try:
        _check_patches(start, changes)
    finally:
        state_module._FOLD_SLACK = was


def _check_patches(start: set[Element],
                   changes: list[tuple[set[Element], set[Element], bool]]) -> None:
    expected = frozenset(start)
    state = SetState(("ifname",), (), False, expected)
    for drop, add, read in changes:
        lost = frozenset(drop) & expected  # a delta's lost: present; its gained: absent
        gained = frozenset(add) - expected
        state = state.patched(lost, gained)
        expected = (expected - lost) | gained
        assert state.size == len(expected)
        if read:
            plain = SetState(("ifname",), (), False, expected)
            assert state == plain and hash(state) == hash(plain)
    assert state.elements == expected and state.size == len(expected)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 80), st.lists(st.tuples(st.sampled_from(["add", "drop", "swap", "dup"]),
                                              st.integers(0, 200)), max_size=6))
def test_moved_ports_are_the_identity_difference(size: int,
                                                 edits: list[tuple[str, int]]) -> None:
    """``render._moved_ports`` (a run scan, or id maps past its limit) gives the
    policies of each tuple missing from the other, by identity, as id maps do;
    a policy twice in the new tuple is never hidden from the caller's checks."""
    from secfw.backends.nftables.render import _moved_ports, _PortIds

    old = [port(i, (i % 4,), False, True) for i in range(size)]
    new = list(old)
    for verb, at in edits:
        where = at % (len(new) + 1)
        if verb == "add":
            new.insert(where, port(1000 + at, (0,), False, True))
        elif verb == "drop" and new:
            del new[where % len(new)]
        elif verb == "swap" and new:
            new[where % len(new)] = replace(new[where % len(new)], mac="fa:16:3e:ff:ff:ff")
        elif verb == "dup" and new:
            new.insert(where, new[at % len(new)])
    moved = _moved_ports(_PortIds(tuple(old)), _PortIds(tuple(new)))
    gone = {id(p) for p in old} - {id(p) for p in new}
    come = {id(p) for p in new} - {id(p) for p in old}
    if len({id(p) for p in new}) != len(new):  # a duplicate: refused, or left visible
        assert moved is None or len(moved[1]) != len({p.tap for p in moved[1]}) or any(
            p.tap in {q.tap for q in old if id(q) not in gone} for p in moved[1])
        return
    assert moved is not None
    assert sorted(map(id, moved[0])) == sorted(gone) and sorted(map(id, moved[1])) == sorted(come)


#: (edit, position, address index, a fresh string object of the same text)
SET_EDIT = st.tuples(st.sampled_from(["insert", "delete", "replace"] * 6
                                     + ["dup", "network", "noncanonical"]),
                     st.integers(0, 300), st.integers(0, 400), st.booleans())


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 120), st.lists(st.lists(SET_EDIT, max_size=3), max_size=10))
def test_patched_address_set_equals_fresh_rendering(size: int,
                                                    versions: list[list[tuple[str, int, int,
                                                                              bool]]]) -> None:
    """An address set changed version after version (one run of edits or
    several; texts shared with the previous version or equal new strings;
    duplicates, networks and non-canonical texts that send it whole) renders
    as a fresh rendering, and the delta's elements are exactly the difference."""
    def address(i: int) -> str:
        return f"10.7.{i // 200}.{i % 200 + 1}/32"  # canonical, as the compiler's

    texts = [address(i) for i in range(size)]
    renderer = Renderer()
    previous = renderer.render(HostFilter("h1", (), (), (AddressSet("s-v4", "o", "ipv4",
                                                                     tuple(texts)),)))
    for edits in versions:
        for verb, at, which, fresh in edits:
            where = at % (len(texts) + 1)
            text = "".join(address(which)) if fresh else address(which)
            if verb == "insert":
                texts.insert(where, text)
            elif verb in ("delete", "replace") and texts:
                del texts[where % len(texts)]
                if verb == "replace":
                    texts.insert(where % (len(texts) + 1), text)
            elif verb == "dup" and texts:
                texts.insert(where, "".join(texts[at % len(texts)]))
            elif verb == "network":
                texts.insert(where, "10.9.0.0/24")
            elif verb == "noncanonical":
                texts.insert(where, "10.7.0.1")  # not canonical: rendered whole
        hf = HostFilter("h1", (), (), (AddressSet("s-v4", "o", "ipv4", tuple(texts)),))
        try:
            expected = render(hf)
        except SecfwError as exc:  # the same refusal either way
            try:
                renderer.render(hf)
            except type(exc):
                renderer = Renderer()
                previous = None
                continue
            raise AssertionError("the patched rendering accepted what render refuses") from exc
        ruleset = renderer.render(hf)
        assert ruleset == expected
        delta = renderer.delta
        key = ("inet", "s-v4")
        if previous is not None and delta is not None and key in delta.elements:
            before = next(s for s in previous.sets if s.name == "s-v4").elements
            now = next(s for s in ruleset.sets if s.name == "s-v4").elements
            lost, gained = delta.elements[key]
            assert lost == frozenset(before) - frozenset(now)
            assert gained == frozenset(now) - frozenset(before)
        previous = ruleset

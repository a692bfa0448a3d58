"""The whole-cloud audits' fast paths against straightforward references.

* :func:`secfw.audit.space.adds_nothing` (lint's shadow check, cell by cell
  inside the rule's boxes) must say what comparing two sweeps says — without
  and with the rule's openers — on random openers: several protocols, ranges
  of any protocol, ICMP types, touching and overlapping selector ranges,
  address sets that nest, overlap or are empty, as IPSets and as Spans.
* exposure and lint must print the same bytes as their references
  (``shared=False``: one sweep of each port's whole filter; two sweeps per
  rule): the JSON of the rows and findings, key order included, on the
  bench-shaped clouds of test_audit_shared.
"""

from __future__ import annotations

import json

import netaddr
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from test_audit import CloudSpec, build, fresh_api
from test_audit_shared import bench_like_clouds, exposure_prone_clouds

from secfw.audit.exposure import exposure
from secfw.audit.lint import lint
from secfw.audit.policy import CloudPolicy
from secfw.audit.space import ALL, Box, Opener, Spans, UnionCache, adds_nothing, sweep

#: Address sets that nest, overlap, touch or are apart (and the empty one).
_SETS = ((), ("0.0.0.0/0",), ("10.0.0.0/8",), ("10.1.0.0/16",), ("10.1.0.0/16", "10.3.0.0/16"),
         ("10.0.0.0/9",), ("10.128.0.0/9",), ("192.168.1.0/24",), ("10.1.2.3/32",))
#: Selector ranges that touch and overlap (ports; ICMP type 8 = 2048..2303).
_RANGES = ((0, 65535), (20, 30), (20, 25), (26, 30), (22, 22), (24, 40), (31, 40),
           (2048, 2303), (2048, 2048), (0, 2047))


@st.composite
def openers(draw: st.DrawFn) -> Opener:
    """An opener as the audits make them: one protocol and a selector range, or
    every protocol (a rule of any protocol, same-net)."""
    cidrs = draw(st.sampled_from(_SETS))
    if draw(st.integers(0, 4)) == 0:
        box = ALL
    else:
        protocol = draw(st.sampled_from((1, 6, 6, 17)))
        low, high = draw(st.sampled_from(_RANGES))
        box = Box(protocol, protocol, low, high)
    return Opener(netaddr.IPSet(cidrs), box, {"n": draw(st.integers(0, 99))})


def _as_spans(found: list[Opener]) -> list[Opener]:
    return [Opener(Spans.of(o.addresses, 4), o.box, o.label) for o in found]


def _by_sweeps(ours: list[Opener], others: list[Opener]) -> bool:
    """The reference: the same regions (boxes and addresses) without and with ``ours``."""
    before = [(r.box, r.addresses) for r in sweep("ipv4", others)]
    return before == [(r.box, r.addresses) for r in sweep("ipv4", [*others, *ours])]


#: A rule covered only by two others, each over part of its ports (and one of
#: any protocol over part of its addresses).
_SPLIT = ([Opener(netaddr.IPSet(["10.0.0.0/8"]), Box(6, 6, 20, 30), {})],
          [Opener(netaddr.IPSet(["10.0.0.0/8"]), Box(6, 6, 20, 25), {}),
           Opener(netaddr.IPSet(["0.0.0.0/0"]), Box(6, 6, 24, 30), {}),
           Opener(netaddr.IPSet(["10.1.0.0/16"]), ALL, {})])


@settings(max_examples=400, deadline=None)
@example(ours=_SPLIT[0], others=_SPLIT[1])
@given(ours=st.lists(openers(), min_size=1, max_size=2),
       others=st.lists(openers(), max_size=6))
def test_adds_nothing_is_what_two_sweeps_say(ours: list[Opener],
                                             others: list[Opener]) -> None:
    expected = _by_sweeps(ours, others)
    note(f"expected {expected}")
    assert adds_nothing(ours, others) == expected
    assert adds_nothing(_as_spans(ours), _as_spans(others), UnionCache()) == expected


def test_adds_nothing_needs_every_cell_covered() -> None:
    """A rule covered in parts (20-25 by one rule, 26-30 by another) adds
    nothing; with a gap (26-29 only) or narrower addresses in one part it does."""
    rule = [Opener(netaddr.IPSet(["10.0.0.0/8"]), Box(6, 6, 20, 30), {})]
    left = Opener(netaddr.IPSet(["10.0.0.0/8"]), Box(6, 6, 20, 25), {})
    right = Opener(netaddr.IPSet(["0.0.0.0/0"]), Box(6, 6, 26, 30), {})
    assert adds_nothing(rule, [left, right])
    assert not adds_nothing(rule, [left, Opener(right.addresses, Box(6, 6, 26, 29), {})])
    assert not adds_nothing(rule, [left, Opener(netaddr.IPSet(["10.0.0.0/9"]), right.box, {})])
    assert not adds_nothing(rule, [Opener(left.addresses, Box(17, 17, 20, 30), {})])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=bench_like_clouds() | exposure_prone_clouds())
def test_fast_audits_print_the_references_bytes(spec: CloudSpec) -> None:
    """The JSON ``secfw audit exposure`` / ``lint`` print (rows and findings in
    order, keys in order) is the references' byte for byte."""
    with fresh_api() as api:
        state = build(api, spec)
        note(str(spec))
        allow = spec.allow_same_net
        views = sorted(CloudPolicy(state, allow).ports.values(), key=lambda v: v.port.id)
        reference = json.dumps(exposure(CloudPolicy(state, allow), views, shared=False))
        cp = CloudPolicy(state, allow)
        assert json.dumps(exposure(cp, [cp.ports[v.port.id] for v in views])) == reference
        groups = list(state.groups.values())
        reference = json.dumps(lint(CloudPolicy(state, allow), groups, shared=False))
        assert json.dumps(lint(CloudPolicy(state, allow), groups)) == reference

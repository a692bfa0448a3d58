"""The whole-cloud audits' shared computations give the per-port answers.

``lint`` decides shadows once per distinct filter, on the openers that meet the
rule's box, with unions of sets shared across the run; ``exposure`` (and any
sweep given a :class:`~secfw.audit.space.UnionCache`) shares unions across
ports. On hypothesis-generated clouds (those of ``test_audit.py``) both must
equal the reference: two sweeps of each port's whole filter, no sharing.
"""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from test_audit import CloudSpec, InstanceSpec, RuleSpec, build, cloud_specs, fresh_api

from secfw.audit.exposure import exposure
from secfw.audit.lint import lint
from secfw.audit.policy import CloudPolicy
from secfw.audit.reach import ingress_openers, specials
from secfw.audit.space import Opener, UnionCache, sweep
from secfw.cloud import CloudState
from secfw.lab.demo import build_guide_cloud

#: Overlapping pieces: shadows need rules covered by others, wholly or in parts.
_RANGES = ((20, 30), (20, 25), (26, 30), (22, 22), (24, 28))
_REMOTES = ("10.0.0.0/8", "10.0.0.0/8", "10.1.0.0/16", None, 0)


@st.composite
def overlapping_rule(draw: st.DrawFn) -> RuleSpec:
    low, high = draw(st.sampled_from(_RANGES))
    protocol = draw(st.sampled_from(("tcp", "tcp", "tcp", None)))
    ports = protocol is not None
    return RuleSpec(draw(st.sampled_from(("ingress", "ingress", "egress"))), "IPv4", protocol,
                    low if ports else None, high if ports else None,
                    draw(st.sampled_from(_REMOTES)))


@st.composite
def shadow_prone_clouds(draw: st.DrawFn) -> CloudSpec:
    """Three groups of overlapping rules, instances in several of them."""
    groups = tuple(tuple(draw(st.lists(overlapping_rule(), min_size=1, max_size=5)))
                   for _ in range(3))
    instances = tuple(
        InstanceSpec(draw(st.integers(0, 1)),
                     tuple(draw(st.lists(st.integers(0, 2), unique=True, min_size=1,
                                         max_size=3))),
                     draw(st.sampled_from(("h1", "h2"))), (), True)
        for _ in range(draw(st.integers(2, 4))))
    return CloudSpec(groups, instances, draw(st.booleans()))


#: A rule covered only by two rules that each cover part of its box.
_SPLIT_COVER = CloudSpec(
    ((RuleSpec("ingress", "IPv4", "tcp", 20, 30, "10.0.0.0/8"),),
     (RuleSpec("ingress", "IPv4", "tcp", 20, 25, "10.0.0.0/8"),
      RuleSpec("ingress", "IPv4", "tcp", 26, 30, "10.0.0.0/8"))),
    (InstanceSpec(0, (0, 1), "h1", (), True), InstanceSpec(0, (0, 1), "h2", (), True)), False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(spec=_SPLIT_COVER)
@given(spec=cloud_specs() | shadow_prone_clouds())
def test_shared_lint_equals_per_port_lint(spec: CloudSpec) -> None:
    with fresh_api() as api:
        state = build(api, spec)
        note(str(spec))
        groups = list(state.groups.values())
        reference = lint(CloudPolicy(state, spec.allow_same_net), groups, shared=False)
        if spec == _SPLIT_COVER:  # the example does exercise a shadow
            assert any(f["kind"] == "shadowed" and f["rule"] == "tcp 20-30 from 10.0.0.0/8"
                       for f in reference)
        assert lint(CloudPolicy(state, spec.allow_same_net), groups) == reference


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=cloud_specs())
def test_sweeps_sharing_unions_equal_lone_sweeps(spec: CloudSpec) -> None:
    with fresh_api() as api:
        state = build(api, spec)
        note(str(spec))
        cp = CloudPolicy(state, spec.allow_same_net)
        unions = UnionCache()
        for view in sorted(cp.ports.values(), key=lambda v: v.port.id):
            for family in ("ipv4", "ipv6"):
                openers: list[Opener] = ingress_openers(cp, view, family)
                extra = specials(cp, view, "ingress", family)
                alone = sweep(family, openers, (), extra)
                shared = sweep(family, openers, (), extra, unions)
                assert [(r.box, r.addresses, r.labels) for r in shared] == \
                    [(r.box, r.addresses, r.labels) for r in alone]


# --------------------------------------------------------------------------- exposure

#: Broad sources beside narrow ones, touching and overlapping port ranges: what the
#: cluster-by-cluster exposure must get right (regions that merge across rules).
_EXPOSURE_RANGES = ((20, 30), (31, 40), (22, 22), (24, 28), (41, 41), (1, 65535))
_EXPOSURE_REMOTES = ("0.0.0.0/0", "0.0.0.0/1", "128.0.0.0/1", "10.0.0.0/8", "10.1.0.0/16",
                     None, 0)


@st.composite
def exposure_rule(draw: st.DrawFn) -> RuleSpec:
    low, high = draw(st.sampled_from(_EXPOSURE_RANGES))
    protocol = draw(st.sampled_from(("tcp", "tcp", "udp", "icmp", None)))
    if protocol == "icmp":
        low, high = draw(st.sampled_from(((8, 0), (0, 0), (13, 0))))
    ports = protocol is not None
    return RuleSpec("ingress", "IPv4", protocol, low if ports else None,
                    high if ports else None, draw(st.sampled_from(_EXPOSURE_REMOTES)))


@st.composite
def exposure_prone_clouds(draw: st.DrawFn) -> CloudSpec:
    """Three groups of rules with broad and narrow sources, instances in several."""
    groups = tuple(tuple(draw(st.lists(exposure_rule(), min_size=1, max_size=5)))
                   for _ in range(3))
    instances = tuple(
        InstanceSpec(draw(st.integers(0, 1)),
                     tuple(draw(st.lists(st.integers(0, 2), unique=True, min_size=1,
                                         max_size=3))),
                     draw(st.sampled_from(("h1", "h2"))), (),
                     draw(st.sampled_from((True, True, True, False))))
        for _ in range(draw(st.integers(2, 4))))
    return CloudSpec(groups, instances, draw(st.booleans()))


#: Two groups whose broad rules touch (tcp 20-30 and 31-40 from anywhere): one
#: region across both, labelled by both (and by the 10.0.0.0/8 rule inside it).
_TOUCHING = CloudSpec(
    ((RuleSpec("ingress", "IPv4", "tcp", 20, 30, "0.0.0.0/0"),),
     (RuleSpec("ingress", "IPv4", "tcp", 31, 40, "0.0.0.0/0"),
      RuleSpec("ingress", "IPv4", "tcp", 24, 28, "10.0.0.0/8"))),
    (InstanceSpec(0, (0, 1), "h1", (), True), InstanceSpec(0, (1,), "h2", (), True)), True)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(spec=_TOUCHING)
@given(spec=cloud_specs() | exposure_prone_clouds())
def test_clustered_exposure_equals_whole_sweeps(spec: CloudSpec) -> None:
    """The cluster-by-cluster exposure (the default) gives exactly the rows of one
    whole sweep per port filter (the reference)."""
    with fresh_api() as api:
        state = build(api, spec)
        note(str(spec))
        views = sorted(CloudPolicy(state, spec.allow_same_net).ports.values(),
                       key=lambda v: v.port.id)
        reference = exposure(CloudPolicy(state, spec.allow_same_net), views, shared=False)
        if spec == _TOUCHING:  # the example does exercise a region across two rules
            assert any(r["ports"] == "20-40" and {"tcp 20-30 from 0.0.0.0/0", "tcp 31-40 from "
                       "0.0.0.0/0"} <= {rule.get("rule") for rule in r["rules"]}
                       for r in reference)
        cp = CloudPolicy(state, spec.allow_same_net)
        assert exposure(cp, [cp.ports[v.port.id] for v in views]) == reference


# ------------------------------------------------------------- the bench's shape

#: Two groups whose clusters a third joins: g0's tcp 20-25 and 30-35 are two
#: clusters, g1's tcp 24-31 merges them into one window on the ports that have both.
_BRIDGED = CloudSpec(
    ((RuleSpec("ingress", "IPv4", "tcp", 20, 25, "0.0.0.0/0"),
      RuleSpec("ingress", "IPv4", "tcp", 30, 35, "0.0.0.0/0"),
      RuleSpec("ingress", "IPv4", "icmp", None, None, "0.0.0.0/0")),
     (RuleSpec("ingress", "IPv4", "tcp", 24, 31, "10.0.0.0/8"),
      RuleSpec("ingress", "IPv4", "icmp", None, None, "0.0.0.0/0")),
     (RuleSpec("ingress", "IPv4", "udp", 20, 25, "0.0.0.0/0"),
      RuleSpec("ingress", "IPv4", "icmp", 8, None, "0.0.0.0/0"))),
    (InstanceSpec(0, (0, 1, 2), "h1", (), True), InstanceSpec(0, (2, 0), "h2", (), True),
     InstanceSpec(0, (1, 0), "h1", (), True), InstanceSpec(1, (0,), "h2", (), True)), True)


#: Windows of equal content with other rules in them: g0's ICMP rule is covered
#: by g1's on vm0 and by g2's on vm1 (both must be named).
_EQUAL_WINDOWS = CloudSpec(
    tuple((RuleSpec("ingress", "IPv4", "icmp", None, None, "0.0.0.0/0"),) for _ in range(3)),
    (InstanceSpec(0, (0, 1), "h1", (), True), InstanceSpec(0, (0, 2), "h2", (), True)), False)


@st.composite
def bench_like_rule(draw: st.DrawFn, group: int) -> RuleSpec:
    """A rule as the bench's: ICMP from anywhere, or tcp/udp at the group's own
    ports (neighbouring groups' ranges touch or overlap) from anywhere, a /8 or
    a /24."""
    if draw(st.integers(0, 3)) == 0:
        kind = draw(st.sampled_from((None, 8, 13)))
        return RuleSpec("ingress", "IPv4", "icmp", kind, None,
                        draw(st.sampled_from(("0.0.0.0/0", "10.0.0.0/8"))))
    low = 100 + 10 * group + draw(st.integers(0, 9))
    return RuleSpec("ingress", "IPv4", draw(st.sampled_from(("tcp", "udp"))), low,
                    low + draw(st.integers(0, 12)),
                    draw(st.sampled_from(("0.0.0.0/0", "10.0.0.0/8", "10.1.2.0/24", 1))))


@st.composite
def bench_like_clouds(draw: st.DrawFn) -> CloudSpec:
    """Five groups of the bench's shape, instances with several of them in any
    order: the ICMP window holds a rule of most groups (labels differ from port
    to port), some ports' clusters are apart, others touch."""
    groups = tuple(tuple(draw(st.lists(bench_like_rule(g), min_size=1, max_size=4)))
                   for g in range(5))
    instances = tuple(
        InstanceSpec(draw(st.integers(0, 1)),
                     tuple(draw(st.permutations(range(5)))[:draw(st.integers(1, 4))]),
                     draw(st.sampled_from(("h1", "h2"))), (),
                     draw(st.sampled_from((True, True, True, False))))
        for _ in range(draw(st.integers(2, 5))))
    return CloudSpec(groups, instances, draw(st.booleans()))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(spec=_BRIDGED)
@example(spec=_EQUAL_WINDOWS)
@given(spec=bench_like_clouds())
def test_audits_by_windows_equal_references_on_bench_like_clouds(spec: CloudSpec) -> None:
    """Exposure by entries (clusters apart, tangled, the ICMP window per port) and
    lint by windows (shared between ports, the ICMP window per port) give the
    references' rows and findings, in their order."""
    with fresh_api() as api:
        state = build(api, spec)
        note(str(spec))
        views = sorted(CloudPolicy(state, spec.allow_same_net).ports.values(),
                       key=lambda v: v.port.id)
        reference = exposure(CloudPolicy(state, spec.allow_same_net), views, shared=False)
        if spec == _BRIDGED:  # g0's second cluster, labelled through g1's rule
            assert any(r["ports"] == "30-35" and r["instance"] == "vm0" and
                       "tcp 24-31 from 10.0.0.0/8" in {x.get("rule") for x in r["rules"]}
                       for r in reference)
        cp = CloudPolicy(state, spec.allow_same_net)
        assert exposure(cp, [cp.ports[v.port.id] for v in views]) == reference
        groups = list(state.groups.values())
        findings = lint(CloudPolicy(state, spec.allow_same_net), groups, shared=False)
        assert lint(CloudPolicy(state, spec.allow_same_net), groups) == findings


def test_shared_audits_on_the_guide_cloud() -> None:
    """On the guide's cloud (default groups: rules of any protocol), exposure and
    lint give the references' rows and findings."""
    with fresh_api() as api:
        build_guide_cloud(api)
        state = CloudState.from_snapshot(api.store.load())
        reference = exposure(CloudPolicy(state), list(CloudPolicy(state).ports.values()),
                             shared=False)
        cp = CloudPolicy(state)
        assert reference and exposure(cp, list(cp.ports.values())) == reference
        groups = list(state.groups.values())
        findings = lint(CloudPolicy(state), groups, shared=False)
        assert findings and lint(CloudPolicy(state), groups) == findings

"""The audits at one size (issue #14's speed targets): on the bench cloud, after
the agent loaded the host's table into the bench namespace.

* ``index_s`` — :class:`~secfw.audit.policy.CloudPolicy` (every host's IR);
* ``explain_ms`` / ``reach_ms`` — medians over :data:`SAMPLES` host instances
  (explain: a source-group member to the instance on tcp 22; reach: its ingress,
  the senders' egress included), the first reach apart (``reach_first_ms``: it
  fills the per-cloud caches);
* ``exposure_s`` / ``lint_s`` — the whole cloud (every port, every group);
* ``verify_s`` — the whole host: the namespace's tables read back
  (``verify_read_s``) and verified (``verify_check_s``: each group chain and set
  once, then each port's own parts — as data, the skeleton and its elements
  against the model's rendering, :mod:`secfw.audit.skeleton`; probed when they
  differ, :mod:`secfw.audit.chainverify`);
  ``verify_host_ports``, ``verify_probes``, ``verify_differences`` (0).

Targets (10k ports, 500 groups, 5,000 rules): explain < 50 ms, reach < 200 ms,
exposure and lint < 5 s, verify < 10 s.
"""

from __future__ import annotations

import time

from secfw.audit.explain import FlowQuery, explain
from secfw.audit.exposure import exposure
from secfw.audit.lint import lint
from secfw.audit.policy import CloudPolicy, PortView
from secfw.audit.reach import reach
from secfw.audit.verify import nft_kernel, verify
from secfw.backends.nftables import NftablesExecutor
from secfw.bench import profiles
from secfw.bench.common import Row, median, rounded, timed
from secfw.cloud import CloudState
from secfw.model import SecurityGroup
from secfw.store.base import Store

SAMPLES = 9
#: ``--quick``: exposure of this many sampled ports, lint of this many groups of the
#: first (each group's shadowing is judged on every port that has it: seconds each).
QUICK_PORTS, QUICK_GROUPS = 2, 3


def measure(store: Store, host: str, netns: str | None, whole_cloud: bool = True) -> Row:
    """The audit figures (module docstring); ``netns`` None: no verify. Without
    ``whole_cloud`` (``--quick``), exposure and lint cover only a few sampled
    ports and groups (``audit_scope``: ``"sample"``): the smoke run checks that
    they run, the figures come from full runs."""
    state = CloudState.from_snapshot(store.load())
    cp, index_s = timed(lambda: CloudPolicy(state))
    views = _views(cp, host)
    others = sorted((v for v in cp.ports.values() if v.instance.host != host),
                    key=lambda v: v.port.id)
    source = others[0].port.ip if others else "203.0.113.5"
    row: Row = {"ports": len(cp.ports), "index_s": rounded(index_s)}
    explains = [_ms(lambda v=v: explain(cp, FlowQuery(source, v.port.ip, 6, 22)))
                for v in views]
    reaches = [_ms(lambda v=v: reach(cp, v, "ingress", "ipv4")) for v in views]
    row.update(explain_ms=rounded(median(explains), 2), reach_first_ms=rounded(reaches[0], 1),
               reach_ms=rounded(median(reaches[1:] or reaches), 1))
    scope, groups = _scope(cp, views, whole_cloud)
    row["audit_scope"] = "cloud" if whole_cloud else "sample"
    rows, row["exposure_s"] = timed(lambda: exposure(cp, scope))
    row["exposure_rows"] = len(rows)
    findings, row["lint_s"] = timed(lambda: lint(cp, groups))
    row["lint_findings"] = len(findings)
    if netns is not None:
        start = time.perf_counter()
        listing = NftablesExecutor(netns).read_json() or {"nftables": []}
        judge, _, _ = nft_kernel(listing)
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        differences, probes = verify(cp, host, judge)
        check_s = time.perf_counter() - start
        host_ports = sum(1 for v in cp.ports.values() if v.instance.host == host)
        row.update(verify_s=rounded(read_s + check_s), verify_read_s=rounded(read_s),
                   verify_check_s=rounded(check_s), verify_host_ports=host_ports,
                   verify_probes=probes, verify_differences=len(differences))
    for key in ("exposure_s", "lint_s"):
        row[key] = rounded(row[key])
    return row


def _views(cp: CloudPolicy, host: str) -> list[PortView]:
    """The first :data:`SAMPLES` ports of ``host`` (by port id)."""
    return sorted((v for v in cp.ports.values() if v.instance.host == host),
                  key=lambda v: v.port.id)[:SAMPLES]


def _scope(cp: CloudPolicy, views: list[PortView], whole_cloud: bool
           ) -> tuple[list[PortView], list[SecurityGroup]]:
    """(the ports exposure covers, the groups lint covers): see :func:`measure`."""
    scope = list(cp.ports.values()) if whole_cloud else views[:QUICK_PORTS]
    groups = (list(cp.state.groups.values()) if whole_cloud else
              [cp.state.groups[g] for g in sorted(views[0].instance.security_groups)
               [:QUICK_GROUPS]] if views else [])
    return scope, groups


#: The audits :func:`profile` can take again, by the start of their target's text.
PROFILED = ("audit exposure", "audit lint", "audit verify")


def profile(store: Store, host: str, netns: str | None, which: str,
            whole_cloud: bool = True) -> profiles.Taken:
    """One more run of the audit ``which`` (one of :data:`PROFILED`) under the
    profiler, on the scope :func:`measure` timed; the index is built outside it."""
    cp = CloudPolicy(CloudState.from_snapshot(store.load()))
    scope, groups = _scope(cp, _views(cp, host), whole_cloud)
    session = profiles.Session()
    if which == "audit exposure":
        session.call(lambda: exposure(cp, scope))
    elif which == "audit lint":
        session.call(lambda: lint(cp, groups))
    elif which == "audit verify" and netns is not None:
        def read_and_verify() -> object:
            listing = NftablesExecutor(netns).read_json() or {"nftables": []}
            return verify(cp, host, nft_kernel(listing)[0])
        session.call(read_and_verify)
    else:
        raise ValueError(f"no profile for {which!r}")
    return session.taken()


def _ms(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return (time.perf_counter() - start) * 1000

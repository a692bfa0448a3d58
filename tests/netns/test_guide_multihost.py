"""The operations guide's example cloud on three hosts and one etcd (secfw.lab.demohosts).

etcd is started by the test in the lab's fabric namespace; each of the three host
namespaces runs a real ``secfw agent``. Every probe of the demo's matrix — every
instance and the internet to every instance, and to web1's floating address — is
a real packet compared with the oracle (``compiler.explain.decide``). Routed only
in ``make test`` (~40 s on the shared 2-core VM); the bridged lab is
``secfw demo --hosts 3 --topology bridged``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from secfw.lab.demo import Probe
from secfw.lab.demohosts import FLOATING_POOL, PLACEMENT, run
from secfw.lab.multihost import MultiHostLab, host_names, opened

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]


def _one(probes: list[Probe], source: str, destination: str, service: str) -> Probe:
    found = [p for p in probes
             if (p.source, p.destination, p.service) == (source, destination, service)]
    assert len(found) == 1, (source, destination, service)
    return found[0]


def test_guide_cloud_on_three_hosts_matches_the_oracle(tmp_path: Path) -> None:
    """Every probe agrees with the oracle, and the matrix shows both hosts at work:
    tools1 (host 2) -> web1 (host 1) tcp/443 is dropped by host 2's egress alone
    (web1 accepts 443 from db1 on host 3), web2 (host 2) -> web1 tcp/22 by host
    1's ingress alone (web2's egress is open); the floating address answers from
    every host."""
    name = f"g{uuid.uuid4().hex[:6]}m"
    with opened(MultiHostLab(name, host_names(name, 3), tmp_path / "lab")) as lab:
        probes, placement = run(lab, tmp_path)
    assert placement == {n: lab.hosts[i] for n, i in PLACEMENT.items()}
    wrong = [p for p in probes if not p.agrees]
    assert not wrong, f"{len(wrong)} of {len(probes)} probes disagree: {wrong[:5]}"
    assert {p.source for p in probes} == {"external", *PLACEMENT}
    assert len(probes) == 5 * 5 * 5 + 6 * 5  # (4 instances + external) x 5 targets

    egress_only = _one(probes, "tools1", "web1", "tcp/443")
    assert not egress_only.measured and "egress" in egress_only.reason
    assert _one(probes, "db1", "web1", "tcp/443").measured  # web1's ingress accepts 443
    assert not _one(probes, "web2", "web1", "tcp/22").measured
    assert _one(probes, "web2", "web1", "tcp/80").measured  # web2's egress is open

    floating = [p for p in probes if " via " in p.destination]
    assert floating and all(p.destination.split(" via ")[1].startswith(FLOATING_POOL[:7])
                            for p in floating)
    crossing = {p.source for p in floating if p.measured} - {"external", "web1"}
    assert crossing == {"web2", "tools1", "db1", "beta1"}  # from hosts 2 and 3 too

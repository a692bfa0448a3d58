"""The bench's profiled repetitions on a tiny cloud (secfw.bench.control): the
agent as a profiled process (pstats, RSS samples by area) and the in-process
compile + full apply (the libnftables call among the areas), each written as
the report's profile file. Cheap: two ports, seconds."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from secfw.api import Api
from secfw.bench import control, profiles
from secfw.bench.namespaces import scratch_netns
from secfw.store import open_store

pytestmark = pytest.mark.netns
HOST = "h1"


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[tuple[Api, str]]:
    """Two instances on ``HOST``, one group referencing the other."""
    url = f"sqlite:///{tmp_path}/secfw.db"
    api = Api(open_store(url))
    api.net_create("p", "a", "10.0.0.0/24")
    api.image_create("p", "img", visibility="public")
    for name in ("web", "db"):
        api.secgroup_create("p", name, name)
    api.secgroup_add_group_rule("p", "db", "web")
    api.boot("p", "db1", "m1.tiny", "img", HOST, ["db"], ["a"])
    api.boot("p", "web1", "m1.tiny", "img", HOST, ["web"], ["a"])
    yield api, url
    api.store.close()


def test_the_agent_process_is_profiled_with_its_rss(tiny: tuple[Api, str],
                                                    tmp_path: Path) -> None:
    _, url = tiny
    with scratch_netns() as ns:
        taken = control.profile_agent_once(ns, url, HOST, 120.0, tmp_path / "agent")
    row = profiles.record(taken, "agent peak RSS < 300 MB", 2, tmp_path, measured_s=None)
    areas = dict(row["areas"])
    assert math.isclose(sum(areas.values()), 1.0, abs_tol=1e-3)
    # the kernel's share is carved out of the nft call's (profiles.summarise): on a
    # tiny host the whole call can be system time, leaving only the kernel's area
    assert profiles.IMPORTS in areas
    assert profiles.NFT_CALL in areas or profiles.KERNEL in areas
    assert row["peak_rss_mb"] > 0 and row["rss_growth"]
    assert math.isclose(sum(share for _, share in row["rss_growth"]), 1.0, abs_tol=1e-3)
    assert profiles.measured_text(row).startswith("RSS growth ")
    assert "peak RSS" in (tmp_path / row["file"]).read_text(encoding="utf-8")


def test_compile_and_apply_are_profiled_in_process(tiny: tuple[Api, str],
                                                   tmp_path: Path) -> None:
    api, _ = tiny
    taken = control.profile_compile_apply(api.store, HOST)
    row = profiles.record(taken, "10k ports: compile + full apply", 2, tmp_path)
    areas = dict(row["areas"])
    assert profiles.NFT_CALL in areas or profiles.KERNEL in areas
    assert any(area.startswith("secfw ") for area in areas)
    assert math.isclose(sum(areas.values()), 1.0, abs_tol=1e-3)

"""The floating-IP bench's cloud builds past nova's default quotas (10 instances):
``make bench`` stopped there with a QuotaError."""

from __future__ import annotations

from pathlib import Path

from secfw.api import Api
from secfw.bench.floating import HOST, build
from secfw.store import open_store


def test_build_boots_more_instances_than_the_default_quota(tmp_path: Path) -> None:
    api = Api(open_store(f"sqlite:///{tmp_path}/bench.db"))
    try:
        addresses = build(api, 11)
        state = api.snapshot()
    finally:
        api.store.close()
    assert len(set(addresses)) == 11
    assert sum(1 for i in state.instances.values() if i.host == HOST) == 12  # + spare

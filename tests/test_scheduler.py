"""The scheduler's pure functions: capabilities, fitting, the choice among hosts."""

from __future__ import annotations

import pytest

from secfw.cloud import CloudState
from secfw.errors import QuotaError
from secfw.model import Flavor, Host, Instance, Quota
from secfw.scheduler import Demand, check_quota, choose_host, host_usage, required_properties


def state_with(*records: object) -> CloudState:
    state = CloudState()
    for record in records:
        state.put(record)  # type: ignore[arg-type]
    return state


def placed(name: str, host: str, ram: int, state: str = "ACTIVE") -> Instance:
    return Instance(name, "p", name, "f", "img", host, state=state, vcpus=1, ram_mb=ram,
                    disk_gb=1)


def test_only_unscoped_and_capabilities_specs_constrain_hosts() -> None:
    flavor = Flavor("9", "f", 1, 1, 0, 1, extra_specs={
        "gpu": "true", "capabilities:cpu_arch": "x86_64", "hw:cpu_policy": "dedicated",
        "quota:disk_read_bytes_sec": "10"})
    assert required_properties(flavor) == {"gpu": "true", "cpu_arch": "x86_64"}


def test_most_free_ram_wins_ties_by_name_error_instances_use_nothing() -> None:
    state = state_with(Host("b", 4, 4096, 10), Host("a", 4, 4096, 10),
                       placed("x", "a", 1024), placed("y", "b", 3000, state="ERROR"))
    assert host_usage(state, "b").ram_mb == 0
    assert choose_host(state, Demand(1, 512, 1), {}) == "b"
    state.put(placed("z", "b", 1024))
    assert choose_host(state, Demand(1, 512, 1), {}) == "a"
    assert choose_host(state, Demand(1, 3073, 1), {}) is None
    assert choose_host(state, Demand(1, 512, 1), {"gpu": "true"}) is None


def test_quota_check_names_the_quota_and_allows_unlimited() -> None:
    used = {"instances": 10, "cores": 0, "ram": 0}
    with pytest.raises(QuotaError, match="Quota exceeded for instances: Requested 1, but "
                       "already used 10 of 10 instances"):
        check_quota(Quota("p"), used, {"instances": 1})
    check_quota(Quota("p", instances=-1), used, {"instances": 1})

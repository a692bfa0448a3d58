"""``secfw agent --register``: the agent registers its host for the scheduler."""

from __future__ import annotations

import os

from secfw.agent.register import HostRegistrar, local_capacity, register_host
from secfw.api import Api
from secfw.errors import StoreError


def test_local_capacity_is_this_machine() -> None:
    vcpus, ram_mb, disk_gb = local_capacity()
    assert vcpus == os.cpu_count()
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        total_kb = int(meminfo.readline().split()[1])
    assert abs(ram_mb - total_kb // 1024) <= 1   # MemTotal is the same pages, in kB
    assert disk_gb >= 0


def test_register_once_and_never_overwrite_the_operators_figures(api: Api) -> None:
    assert register_host(api.store, "c1") is True
    registered = api.host_show("c1")[0]
    assert (registered.vcpus, registered.ram_mb) == local_capacity()[:2]
    revision = api.store.revision()
    assert register_host(api.store, "c1") is False
    assert api.store.revision() == revision            # nothing written
    api.host_add("admin", "c2", "2", "1024", "10", ["gpu=true"])
    assert register_host(api.store, "c2") is False
    assert api.host_show("c2")[0].properties == {"gpu": "true"}


class _DownStore:
    """A store that cannot be read (an outage)."""

    def load(self) -> None:
        raise StoreError("store unreachable")


def test_registrar_retries_after_a_store_failure(api: Api) -> None:
    registrar = HostRegistrar(_DownStore(), "c1")  # type: ignore[arg-type]
    registrar.on_sync(None)  # type: ignore[arg-type]
    assert not registrar.done
    registrar.store = api.store
    registrar.on_sync(None)  # type: ignore[arg-type]
    assert registrar.done and [h.id for h, _ in api.host_list()] == ["c1"]

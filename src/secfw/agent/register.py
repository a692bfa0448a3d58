"""The agent registers its compute host for the scheduler (``agent --register``).

The capacity is this machine's: its CPUs, its memory and the size of the file
system that holds instance disks (nova-compute reports the same three figures
for its hypervisor). A host already registered is left as the operator set it:
registration never overwrites capacity or properties.
"""

from __future__ import annotations

import logging
import os
import shutil

from secfw.agent.daemon import log_event
from secfw.agent.loop import LoopObserver
from secfw.agent.reconciler import SyncResult
from secfw.api import Api
from secfw.errors import ConflictError, SecfwError
from secfw.model import ADMIN_PROJECT
from secfw.store.base import Store

_log = logging.getLogger("secfw.agent")

#: Where a compute host keeps instance disks (nova's default ``instances_path``
#: lives under it); "/" when it does not exist.
DISK_PATH = "/var/lib"


def local_capacity(disk_path: str = DISK_PATH) -> tuple[int, int, int]:
    """(vCPUs, memory MB, disk GB) of this machine."""
    vcpus = os.cpu_count() or 1
    ram_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
    path = disk_path if os.path.isdir(disk_path) else "/"
    disk_gb = shutil.disk_usage(path).total // 2**30
    return vcpus, max(ram_mb, 1), disk_gb


def register_host(store: Store, host: str) -> bool:
    """Register ``host`` with the local capacity unless it is registered; True
    when this call registered it."""
    api = Api(store)
    if host in api.snapshot().hosts:
        return False
    try:
        api.host_add(ADMIN_PROJECT, host, *local_capacity())
    except ConflictError:  # another process registered it first
        return False
    return True


class HostRegistrar(LoopObserver):
    """Registers the host after the first successful pass (the kernel is closed or
    synced by then: registering never delays the fail-closed start), retrying
    after each later pass until the store accepts it."""

    def __init__(self, store: Store, host: str) -> None:
        self.store = store
        self.host = host
        self.done = False

    def on_sync(self, result: SyncResult) -> None:
        if self.done:
            return
        try:
            registered = register_host(self.store, self.host)
        except SecfwError as exc:
            log_event(_log, logging.ERROR, "register_failed", host=self.host, error=str(exc))
            return
        self.done = True
        log_event(_log, logging.INFO, "registered" if registered else "already_registered",
                  host=self.host)

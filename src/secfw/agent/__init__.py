"""The host agent: keeps one compute host's packet filter equal to the store.

Modules:

* :mod:`.reconciler` — the logic: one level-based pass (store → IR → backend).
* :mod:`.loop` — the triggers (store, taps, resync timer, signals, retries) and
  the observers that watch every pass.
* :mod:`.status` — the status file ``secfw agent status`` reads.
* :mod:`.metrics` — Prometheus metrics.
* :mod:`.linkwatch` — taps appearing and disappearing (rtnetlink).
* :mod:`.storewatch` — a store file replaced under the agent.
* :mod:`.daemon` — logging (logfmt) and systemd notification.
"""

from secfw.agent.loop import (
    AgentLoop,
    AgentStatus,
    Backoff,
    LoopObserver,
    LoopSettings,
    SystemdNotifier,
    Trigger,
    Wakeup,
    error_text,
    failure_reason,
)
from secfw.agent.reconciler import (
    DescribingBackend,
    FilterBackend,
    Plan,
    Reconciler,
    SyncResult,
)

__all__ = [
    "AgentLoop", "AgentStatus", "Backoff", "DescribingBackend", "FilterBackend", "LoopObserver",
    "LoopSettings", "Plan", "Reconciler", "SyncResult", "SystemdNotifier", "Trigger", "Wakeup",
    "error_text", "failure_reason",
]

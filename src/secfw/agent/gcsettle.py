"""Keep the agent's long-lived state out of the cyclic garbage collector's way.

The agent holds its model, IR, ruleset and kernel state between passes: ~700k
container objects at 10k ports. CPython's gen-2 ("full") collection walks every
tracked object, so one landing in a pass costs seconds at 10k ports (measured:
0.35 s of CPU per full collection for the state alone; 2–3 s pauses with the
pass's own garbage under load). :func:`gc.freeze` moves every tracked object to
a permanent generation the collector never walks (Python docs, ``gc.freeze``);
reference counting still frees them as usual — only *cyclic* garbage among frozen
objects waits.

:class:`GcSettler` therefore settles after a full pass (the state was replaced
whole) and after every :data:`SETTLE_EVERY`-th other pass: unfreeze, one full
collection (cycles that became garbage while frozen go now), freeze again. So
frozen garbage is bounded by what :data:`SETTLE_EVERY` passes leave, and the
collections inside a pass walk only what was allocated since the last settle.
"""

from __future__ import annotations

import gc

from secfw.agent.loop import AgentStatus, LoopObserver
from secfw.agent.reconciler import SyncResult

#: Incremental passes between two settles (each settle is one full collection,
#: ~0.35 s at 10k ports, paid after a pass, not inside one).
SETTLE_EVERY = 200


def settle() -> int:
    """Unfreeze, collect everything, freeze what is left; the number of
    unreachable objects found (what :func:`gc.collect` returns)."""
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    return found


class GcSettler(LoopObserver):
    """Settles (:func:`settle`) after every full pass and every ``every``-th
    other successful pass; see the module doc."""

    def __init__(self, every: int = SETTLE_EVERY) -> None:
        self.every = max(every, 1)
        self.since = 0

    def on_sync(self, result: SyncResult) -> None:
        self.since += 1
        if result.full or self.since >= self.every:
            self.since = 0
            settle()

    def on_stop(self, status: AgentStatus) -> None:
        """Hand the frozen objects back (the process may go on, as in tests)."""
        gc.unfreeze()

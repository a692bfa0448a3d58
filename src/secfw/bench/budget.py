"""The run's wall-clock budget, and a guess of each step's time from smaller sizes.

A step at size N is skipped (with the reason in the report) when its estimated
time exceeds what is left. The estimate scales the same step's last measured
time linearly with the number of ports, times a safety factor: the costs
measured here grow at most linearly, so this errs on the side of skipping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from secfw.bench.common import Row, guarded, skipped, timed

SAFETY = 1.5


@dataclass
class Budget:
    """Seconds left for the run, and the last (ports, seconds) of every step."""

    seconds: float
    started: float = field(default_factory=time.monotonic)
    history: dict[str, tuple[int, float]] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def estimate(self, step: str, ports: int) -> float:
        """Expected seconds for ``step`` at ``ports`` (0 when never measured)."""
        if step not in self.history:
            return 0.0
        last_ports, last_seconds = self.history[step]
        return last_seconds * max(1.0, ports / max(last_ports, 1)) * SAFETY

    def why_not(self, step: str, ports: int) -> str | None:
        """None when ``step`` fits in the budget, else the reason to skip it."""
        left = self.remaining()
        if left <= 0:
            return f"time budget of {self.seconds:.0f} s used up"
        guess = self.estimate(step, ports)
        if guess > left:
            last_ports, last_seconds = self.history[step]
            return (f"estimated {guess:.0f} s (from {last_seconds:.1f} s at {last_ports:,} "
                    f"ports), only {left:.0f} s of the budget left")
        return None

    def run(self, step: str, ports: int, fn: Callable[[], Row]) -> Row:
        """``fn()`` if it fits (recording its time), else a skipped record."""
        reason = self.why_not(step, ports)
        if reason is not None:
            return skipped(reason)
        row, seconds = timed(lambda: guarded(fn))
        self.history[step] = (ports, seconds)
        return row

"""The periodic kernel check, off the loop's thread: resync without a stall.

Reading a 10,000-port table back costs seconds (libnftables lists ~300k
elements, Python parses and canonicalises them: docs/agent.md, "Resync"). Done
on the loop's thread, as a full pass, it held back every change made meanwhile
for as long. :class:`KernelCheck` reads the table back on a thread of its own
and compares it with what the loop last committed (:meth:`Reconciler.reference`),
while the loop keeps applying changes. Only when the kernel differs does the
loop run a full pass — which reads back again, on its own thread, and repairs
exactly what differs (the same drift repair as before).

The listing and the reference must describe the same moment. The reconciler's
*epoch* moves on every transaction it applies and whenever it forgets what it
committed; the check takes ``(epoch, reference)`` before listing and again
after. Equal epochs: nothing of this process touched the kernel during the
listing, so any difference is someone else's doing (drift). Different epochs:
the listing may straddle one of the loop's own commits, so only the objects the
loop left alone meanwhile are compared (:func:`by_object`; on a busy host the
changes keep coming faster than a 10k-port read-back). Where that cannot be
told (no reference: a failure; a backend state without objects) the check is
repeated, :data:`ATTEMPTS` times, then the loop runs a full pass.

Tampering that happens after the listing was taken is found by the next
check, exactly as tampering just after a full pass's read-back always was.

No listing at all when the backend has a generation (nftables: the namespace's
commit counter, :mod:`secfw.backends.nftables.generation`) and the reconciler
knows the generation at which the kernel held its reference: the same
generation now means no transaction of anyone's committed since, so the kernel
still holds it (outcome ``unchanged``). A listing that finds the reference,
with the generation the same before and after it, teaches the reconciler that
generation (:meth:`Checked.confirm_generation`), so a chain broken by someone
else's commit costs one read-back.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

#: How many checks in a row may be spoilt by the loop's own commits before the
#: loop runs a full pass instead.
ATTEMPTS = 3


class Checked(Protocol):
    """What :class:`KernelCheck` needs from the reconciler."""

    def reference(self) -> tuple[int, Any] | None: ...

    def epoch(self) -> int: ...

    def known_generation(self, epoch: int) -> int | None: ...

    def confirm_generation(self, epoch: int, generation: int) -> None: ...

    def generation_probe(self) -> Callable[[], int | None] | None: ...


@dataclass(frozen=True)
class CheckResult:
    """``outcome``: ``same`` (the kernel holds what the loop committed),
    ``unchanged`` (the same, known without a read-back: the generation has not
    moved since the kernel held it), ``differs`` (drift: a full pass must
    repair it), ``void`` (the loop committed during the listing, or knew
    nothing to compare with: try again) or ``failed`` (the read-back raised:
    ``error``). ``seconds``: the listing and comparison."""

    outcome: str
    seconds: float
    error: str = ""


class KernelCheck:
    """One background kernel check at a time (see the module docstring).

    :meth:`start` is called on the loop's thread; ``done`` is called on the
    check's thread with the result (the loop's wake-up: it must be thread-safe).
    """

    def __init__(self, done: Callable[[CheckResult], None],
                 clock: Callable[[], float]) -> None:
        self._done = done
        self._clock = clock
        self._thread: threading.Thread | None = None
        #: Checks started so far (for the bench and tests).
        self.started = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, reconciler: Checked, read: Callable[[], Any]) -> bool:
        """Start a check reading with ``read`` (callable on another thread);
        False when one is still running (nothing started)."""
        if self.running:
            return False
        self._thread = threading.Thread(target=self._run, args=(reconciler, read),
                                        name="secfw-kernel-check", daemon=True)
        self._thread.start()
        self.started += 1
        return True

    def join(self, timeout: float | None = None) -> None:
        """Wait for the running check (tests, and stopping)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, reconciler: Checked, read: Callable[[], Any]) -> None:
        started = self._clock()
        try:
            outcome = compare(reconciler, read)
        except Exception as exc:  # reported to the loop, which decides (a full pass)
            result = CheckResult("failed", self._clock() - started,
                                 f"{type(exc).__name__}: {exc}")
        else:
            result = CheckResult(outcome, self._clock() - started)
        self._done(result)


def compare(reconciler: Checked, read: Callable[[], Any]) -> str:
    """``unchanged``, ``same``, ``differs`` or ``void`` (see :class:`CheckResult`):
    ``unchanged`` when the generation is the one the reference was held at;
    else the kernel read with ``read`` against the reconciler's reference, when
    the epoch held still across the listing — else object by object
    (:func:`by_object`)."""
    reference = reconciler.reference()
    if reference is None:
        return "void"
    epoch, expected = reference
    probe = reconciler.generation_probe()
    before = probe() if probe is not None else None
    if before is not None and before == reconciler.known_generation(epoch):
        return "unchanged"
    actual = read()
    later = probe() if probe is not None else None
    after = reconciler.reference()
    if after is not None and after[0] == epoch:
        if actual != expected:
            return "differs"
        if before is not None and before == later:  # no commit during the listing
            reconciler.confirm_generation(epoch, before)
        return "same"
    return "void" if after is None else by_object(actual, expected, after[1])


def by_object(actual: Any, before: Any, after: Any) -> str:
    """The loop committed while the kernel was listed: compare only the objects
    (nftables sets and chains) the loop left alone meanwhile — the same object
    in the references before and after (the backend's state cache keeps an
    unchanged object's state as it was). What the loop did not touch cannot be
    caught half-way by its commit, so a difference there is drift; the objects
    it changed are checked at the next resync. ``void`` for states without
    objects (iptables: its checks then repeat, a full pass after three)."""
    parts = ("sets", "chains")
    if not all(_made_of_objects(state) for state in (before, after)):
        return "void"
    if actual is None:
        return "differs"  # the loop never deletes secfw's table: someone else did
    if before.tables == after.tables and actual.tables != after.tables:
        return "differs"
    for part in parts:
        old, new, kernel = (getattr(s, part) for s in (before, after, actual))
        for key in old.keys() | new.keys() | kernel.keys():
            was, now = old.get(key), new.get(key)
            if (was is now or was == now) and kernel.get(key) != now:
                return "differs"
    return "same"


def _made_of_objects(state: Any) -> bool:
    """A state that is exactly its ``sets``, ``chains`` and ``tables`` (nftables'
    KernelState): nothing else in it could hold a difference by_object skips."""
    if not dataclasses.is_dataclass(state) or isinstance(state, type):
        return False
    return {f.name for f in dataclasses.fields(state)} == {"sets", "chains", "tables"}

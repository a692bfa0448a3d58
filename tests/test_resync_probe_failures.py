"""agent.resync.compare when the generation cannot be read: never ``unchanged``
(that needs a generation read now, equal to the one vouched for); the kernel is
read back and compared, and a probe that fails during the listing vouches for
nothing new."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from secfw.agent.resync import CheckResult, KernelCheck, compare


class Checked:
    """A reconciler that vouched for generation 7 at epoch 1, with ``probe``."""

    def __init__(self, probe: Callable[[], int | None]) -> None:
        self.probe = probe
        self.confirmed: list[tuple[int, int]] = []

    def reference(self) -> tuple[int, Any]:
        return 1, "committed"

    def epoch(self) -> int:
        return 1

    def known_generation(self, epoch: int) -> int | None:
        return 7 if epoch == 1 else None

    def confirm_generation(self, epoch: int, generation: int) -> None:
        self.confirmed.append((epoch, generation))

    def generation_probe(self) -> Callable[[], int | None]:
        return self.probe


@pytest.mark.parametrize("kernel", ["committed", "tampered"])
def test_an_unreadable_generation_reads_the_kernel_back(kernel: str) -> None:
    reads: list[str] = []

    def read() -> str:
        reads.append(kernel)
        return kernel

    checked = Checked(lambda: None)
    assert compare(checked, read) == ("same" if kernel == "committed" else "differs")
    assert reads == [kernel]
    assert checked.confirmed == []  # nothing new is vouched for


def test_a_generation_that_fails_after_the_listing_vouches_for_nothing() -> None:
    answers = iter([8, None])  # moved since: read back; then unreadable
    checked = Checked(lambda: next(answers))
    assert compare(checked, lambda: "committed") == "same"
    assert checked.confirmed == []


def test_a_probe_that_raises_fails_the_check() -> None:
    """A probe error ends the background check as ``failed`` (the loop answers
    with a full pass, which reads back), never as ``unchanged``."""
    def broken() -> int | None:
        raise OSError("netlink")

    results: list[CheckResult] = []
    check = KernelCheck(results.append, time.monotonic)
    assert check.start(Checked(broken), lambda: "committed")
    check.join(10)
    assert [r.outcome for r in results] == ["failed"]
    assert "netlink" in results[0].error

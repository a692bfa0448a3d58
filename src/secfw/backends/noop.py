"""A backend that does everything but touch the kernel: the scale bench's hosts.

:class:`NoopBackend` is the nftables backend with its kernel edge cut: it renders
the IR, plans the minimal transaction against what it last "committed" and builds
the transaction's ``nft -f`` text exactly as :class:`NftablesBackend` does, then
keeps the result in memory instead of handing it to libnftables. Reading back
gives that memory; conntrack revocation, br_netfilter's switches and cleanup are
no-ops. It lets one machine run many real agent loops (store watch, incremental
compile, render, plan) as simulated compute hosts (``secfw.bench.manyhosts``).
It is not in :data:`secfw.backends.BACKENDS`: no command line offers it, so no
host can be left unfiltered by choosing it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from secfw.backends.nftables.backend import NftablesBackend
from secfw.backends.nftables.plan import Transaction
from secfw.backends.nftables.state import KernelState
from secfw.compiler.ir import HostFilter
from secfw.errors import BackendError


class _NoKernel:
    """Stands where the executor would: a namespace name (None), no generation
    to read and no commit bracketed by one (the kernel check always reads back)."""

    netns: str | None = None
    last_commit: tuple[int, int] | None = None

    def generation_reader(self) -> None:
        return None


class NoopBackend(NftablesBackend):
    """nftables' render and plan without a kernel (module docstring).

    ``transactions`` and ``commands`` count what :meth:`apply` was given (non-empty
    plans only); ``text_bytes`` the size of their ``nft -f`` text."""

    name = "noop"

    def __init__(self, netns: str | None = None, topology: str = "routed") -> None:
        # The executor is never called: every method that would reach it is overridden.
        super().__init__(executor=_NoKernel(), topology=topology)  # type: ignore[arg-type]
        self.kernel: KernelState | None = None
        self.transactions = self.commands = self.text_bytes = 0

    def read(self) -> KernelState | None:
        """What was last committed (None before the first commit)."""
        return self.kernel

    def apply(self, plan: object) -> None:
        """Build the transaction's text (the work before the nft call) and count it."""
        if not isinstance(plan, Transaction):
            raise BackendError(f"noop: cannot apply a {type(plan).__name__}")
        if not plan.empty:
            self.text_bytes += len(plan.text)
            self.transactions += 1
            self.commands += plan.size

    def committed(self, desired: HostFilter) -> KernelState:
        """The state after ``desired`` (also what :meth:`read` gives from now on)."""
        self.kernel = super().committed(desired)
        return self.kernel

    def restore_switches(self) -> str | None:
        return None

    def revoke(self, previous: HostFilter | None, desired: HostFilter,
               pools: Iterable[str] | None = None) -> Any:
        """No connection tracking to clean: nothing to revoke."""
        return None

    def cleanup(self) -> None:
        self.kernel = None

"""The nftables backend as the agent uses it (``secfw.agent.FilterBackend``).

Glue only: :func:`.render.render` the IR, :func:`.plan.plan` against the state
read back or committed, :class:`.executor.NftablesExecutor` to apply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from secfw.backends import TOPOLOGIES, capped_names
from secfw.backends.nftables.executor import NftablesExecutor
from secfw.backends.nftables.flowtable import FlowtablePath
from secfw.backends.nftables.plan import DETACH_ELEMENTS, Transaction
from secfw.backends.nftables.plan import plan as plan_transaction
from secfw.backends.nftables.render import Renderer, Ruleset, render
from secfw.backends.nftables.state import KernelState, StateCache
from secfw.backends.nftables.summary import element_count, summarize
from secfw.compiler.ir import HostFilter
from secfw.errors import BackendError
from secfw.gcpause import collector_paused
from secfw.netns import bridge_netfilter_enabled, enable_bridge_netfilter, tap_links

if TYPE_CHECKING:
    from secfw.conntrack import Revocation

log = logging.getLogger(__name__)


class NftablesBackend:
    """Renders, plans and applies one host's filter as secfw's nftables tables."""

    name = "nftables"

    def __init__(self, executor: NftablesExecutor | None = None, netns: str | None = None,
                 topology: str = "routed", flowtable: str = "off") -> None:
        """Use ``executor``, or open one in the current namespace or in ``netns``,
        for a ``routed`` or ``bridged`` host (BackendError for anything else).
        ``flowtable``: ``off``, ``auto`` or ``on`` (:mod:`.flowtable`)."""
        if topology not in TOPOLOGIES:
            raise BackendError(
                f"nftables: unknown topology {topology!r} (known: {', '.join(TOPOLOGIES)})")
        self.topology = topology
        self.executor = executor if executor is not None else NftablesExecutor(netns)
        try:
            self.flowtable = FlowtablePath(flowtable, topology)
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        #: The generations around the last :meth:`apply` (executor.last_commit).
        self.last_commit: tuple[int, int] | None = None
        #: Elements a plan adds to sets empty in the kernel from which it
        #: detaches them first (:mod:`.plan`, "Detached sets"); None: never.
        self.detach_elements: int | None = DETACH_ELEMENTS
        self.reset()

    def reset(self) -> None:
        """Forget every cached rendering (after a refused render: the caches may be
        half-updated); the next plan renders and compares everything."""
        self._last: tuple[HostFilter, Ruleset, KernelState] | None = None
        # Successive syncs share unchanged pieces, rendered once (render.Renderer,
        # state.StateCache): a membership change costs the set it changes.
        self._renderer = Renderer(self.topology)
        self._states = StateCache()
        self._before: KernelState | None = None  # the state of the rendering before _last

    def check(self, desired: HostFilter) -> None:
        """Render ``desired`` from scratch, touching no cache and no kernel: raises
        BackendError (or UnsupportedError) exactly when :meth:`plan` would."""
        render(desired, self.topology)

    def render(self, desired: HostFilter) -> Ruleset:
        """The ruleset of ``desired``; the last one is kept, as plan and committed
        are called with the same IR in one sync."""
        return self._rendered(desired)[1]

    def _rendered(self, desired: HostFilter) -> tuple[HostFilter, Ruleset, KernelState]:
        """``desired`` rendered, and the state it gives the kernel — built once per
        sync, shared by :meth:`plan` and :meth:`committed`."""
        if self._last is None or self._last[0] is not desired:
            self._before = self._last[2] if self._last is not None else None
            ruleset = self._renderer.render(desired)
            with collector_paused():  # ~10^5 small acyclic objects (secfw.gcpause)
                state = self._states.state(ruleset, self._renderer.delta)
                self._last = (desired, ruleset, state)
        return self._last

    def read(self) -> KernelState | None:
        """The tables as the kernel holds them; None when absent — and, on a
        bridged host, when br_netfilter's switches are off (someone turned them
        off: bridged traffic then bypasses the inet table, so the state counts as
        lost and the next apply, a full one, turns them back on)."""
        if self.topology == "bridged" and not bridge_netfilter_enabled(self.executor.netns):
            return None
        return self.executor.read_state()

    def reader(self) -> Callable[[], KernelState | None]:
        """A function equal to :meth:`read` for another thread (the agent's
        background kernel check, secfw.agent.resync): it opens a libnftables
        context of its own on that thread, as one context must not be used
        by two threads at once (executor module docstring)."""
        netns, topology = self.executor.netns, self.topology

        def read() -> KernelState | None:
            if topology == "bridged" and not bridge_netfilter_enabled(netns):
                return None
            return NftablesExecutor(netns).read_state()

        return read

    def generation(self) -> Callable[[], int | None]:
        """A function, callable from any thread, reading the namespace's nftables
        generation (secfw.backends.nftables.generation); it returns None when the
        generation cannot be read — and on a bridged host whose br_netfilter
        switches are off, as :meth:`read` counts that as a lost state."""
        netns, topology = self.executor.netns, self.topology
        reader = self.executor.generation_reader()

        def current() -> int | None:
            if reader is None or (topology == "bridged" and not bridge_netfilter_enabled(netns)):
                return None
            try:
                return reader.read()
            except BackendError:
                return None

        return current

    def namespace_id(self) -> str:
        """The namespace's identity for as long as the machine runs (boot id and
        netns cookie: generation.GenerationReader.namespace); "" when unknown."""
        reader = self.executor.generation_reader()
        return reader.namespace() if reader is not None else ""

    def plan(self, current: KernelState | None, desired: HostFilter) -> Transaction:
        """The minimal transaction from ``current`` (None: unknown/absent) to ``desired``."""
        _, ruleset, want = self._rendered(desired)
        # The renderer's delta is relative to the previous rendering: it is all
        # that needs comparing only when the kernel holds exactly that (the
        # agent's incremental pass); a state read back is compared whole.
        delta = self._renderer.delta if current is self._before is not None else None
        with collector_paused():
            return plan_transaction(current, ruleset, want, delta, self.detach_elements)

    def apply(self, plan: object) -> None:
        """Commit ``plan`` (a :class:`Transaction` from :meth:`plan`) atomically;
        BackendError and no change on failure. Typed ``object`` to fit the agent's
        backend-neutral ``Plan`` protocol."""
        if not isinstance(plan, Transaction):
            raise BackendError(f"nftables: cannot apply a {type(plan).__name__}")
        if self.topology == "bridged":  # before the marks: they are useless without it
            self._enable_bridge_netfilter()
        self.last_commit = None
        self.executor.apply(plan)
        self.last_commit = self.executor.last_commit if not plan.empty else None
        if self.flowtable.enabled:
            self._sync_flowtable()
            self.last_commit = None  # two transactions: not one bump to account for

    def _sync_flowtable(self) -> None:
        """The flowtable lists the desired ports' taps that exist (a flowtable
        device must exist when the table is committed)."""
        wanted = {port.tap for port in self._last[0].ports} if self._last else set()
        try:
            present = tap_links(self.executor.netns)[0]
        except OSError as exc:
            raise BackendError(f"flowtable: cannot list the taps: {exc}") from exc
        self.flowtable.sync(self.executor, wanted & set(present))

    def refused_ports(self, desired: HostFilter) -> dict[str, str]:
        """Port id → why, for ports left closed before any plan: all of them
        when the flowtable is required (``on``) but cannot be used."""
        return self.flowtable.refused(desired)

    def _enable_bridge_netfilter(self) -> None:
        """Turn br_netfilter's switches on; without br_netfilter only the closed
        filter may be applied: its bridge table drops every tap's frames at layer
        2 by itself, where any port's ruleset needs the inet hooks to see them."""
        try:
            enable_bridge_netfilter(self.executor.netns)
        except BackendError:
            if self._last is not None and not self._last[0].ports:
                log.warning("br_netfilter unavailable: applying the closed filter only")
                return
            raise

    def restore_switches(self) -> str | None:
        """On a bridged host, turn br_netfilter's switches back on at once when
        someone turned them off (bridged traffic bypasses the inet table while
        they are off); what was restored, or None. BackendError when they cannot
        be turned on."""
        if self.topology != "bridged" or bridge_netfilter_enabled(self.executor.netns):
            return None
        enable_bridge_netfilter(self.executor.netns)
        return "br_netfilter switches (net.bridge.bridge-nf-call-ip*tables) were off"

    def committed(self, desired: HostFilter) -> KernelState:
        """The state the kernel holds once ``desired`` was applied (no round trip)."""
        return self._rendered(desired)[2]

    def describe(self, plan: Transaction) -> dict[str, Any]:
        """What ``plan`` changes, in a few words (chains, sets, element counts):
        :func:`~secfw.backends.nftables.summary.summarize`, with at most
        :data:`~secfw.backends.DESCRIBE_NAMES` chain and set names and their
        counts when there are more."""
        return capped_names(summarize(plan))

    def element_count(self, state: KernelState) -> int:
        """Elements in the sets and maps of ``state`` (for metrics)."""
        return element_count(state)

    def revoke(self, previous: HostFilter | None, desired: HostFilter,
               pools: Iterable[str] | None = None) -> Revocation | None:
        """Delete the conntrack entries of established connections that ``desired``
        (already committed) no longer allows but ``previous`` did — in the
        executor's namespace (:func:`secfw.conntrack.revoke`). ``previous`` None:
        check every connection of every port. ``pools`` (full passes): also delete
        the NAT bindings through floating addresses that ``desired`` does not map
        that way (:func:`secfw.conntrack.stale_nat`).

        Never raises: the filter is already right; a failure is logged and the
        result is None (entries then only expire by their timeouts).
        """
        from secfw.conntrack import revoke

        try:
            result = revoke(previous, desired, self.executor.netns, pools)
        except BackendError as exc:
            log.warning("conntrack revocation failed: %s", exc)
            return None
        if result.deleted:
            log.info("revoked %d connection(s) of %d examined", result.deleted, result.examined)
        return result

    def cleanup(self) -> None:
        """Delete secfw's tables ``inet``, ``arp`` and ``bridge secfw`` (and nothing
        else; br_netfilter's switches stay as they are: others may rely on them),
        and the flowtable's table when the fast path is on."""
        self.executor.delete_table()
        if self.flowtable.enabled:
            self.flowtable.remove(self.executor)

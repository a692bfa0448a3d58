"""The iptables backend as the agent uses it (``secfw.agent.FilterBackend``).

Glue only: :func:`.render.render` the IR, :func:`.plan.plan` against the state
read back or committed, :class:`.executor.IptablesExecutor` to apply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from secfw.backends import capped_names
from secfw.backends.iptables import metadata
from secfw.backends.iptables.executor import IptablesExecutor, Runner, Variant
from secfw.backends.iptables.plan import IptPlan
from secfw.backends.iptables.plan import plan as plan_changes
from secfw.backends.iptables.render import DEFAULT_MARK, IptState, RenderOptions, render
from secfw.backends.iptables.state import element_count
from secfw.compiler.ir import HostFilter
from secfw.errors import BackendError
from secfw.netns import bridge_netfilter_enabled, enable_bridge_netfilter

if TYPE_CHECKING:
    from secfw.conntrack import Revocation

log = logging.getLogger(__name__)

class IptablesBackend:
    """Renders, plans and applies one host's filter as ``secfw-…`` chains in the
    filter tables of iptables and ip6tables, and ``secfw-…`` ipsets."""

    name = "iptables"

    def __init__(
        self,
        executor: IptablesExecutor | None = None,
        netns: str | None = None,
        variant: Variant | None = None,
        *,
        strict: bool = False,
        mark: int = DEFAULT_MARK,
        runner: Runner | None = None,
        topology: str = "routed",
    ) -> None:
        """Use ``executor``, or one in the current namespace or ``netns`` with
        ``variant`` ("nft" or "legacy"; detected when None). ``strict``: refuse
        (UnsupportedError) what iptables cannot enforce, i.e. ARP anti-spoofing;
        ``mark``: the packet-mark bit the group chains use (render.DEFAULT_MARK);
        ``topology``: ``routed`` or ``bridged`` (BackendError for anything else)."""
        self.options = RenderOptions(mark=mark, strict=strict, topology=topology)
        self.executor = executor if executor is not None else IptablesExecutor(
            netns, variant, runner)
        self._last: tuple[HostFilter, IptState] | None = None

    @property
    def topology(self) -> str:
        """``routed`` or ``bridged``."""
        return self.options.topology

    def reset(self) -> None:
        """Forget the cached rendering."""
        self._last = None

    def refused_ports(self, desired: HostFilter) -> dict[str, str]:
        """Port id → why, for ports this backend refuses whatever else the host
        holds (the agent leaves them closed before it asks for a plan): with a
        metadata redirect, the ports whose network overlaps another — their
        server replies would need routing by network (``metadata.nat_chain``)."""
        if desired.metadata is None:
            return {}
        taps = {p.tap for p in desired.metadata.ports if p.route}
        return {p.port_id: metadata.OVERLAP_REFUSED for p in desired.ports if p.tap in taps}

    def check(self, desired: HostFilter) -> None:
        """Render ``desired`` from scratch, touching no cache and no kernel: raises
        BackendError (or UnsupportedError) exactly when :meth:`plan` would."""
        render(desired, self.options)

    def restore_switches(self) -> str | None:
        """On a bridged host, turn br_netfilter's switches back on at once when
        someone turned them off (bridged traffic bypasses iptables while they are
        off); what was restored, or None. BackendError when they cannot be."""
        if self.topology != "bridged" or bridge_netfilter_enabled(self.executor.netns):
            return None
        enable_bridge_netfilter(self.executor.netns)
        return "br_netfilter switches (net.bridge.bridge-nf-call-ip*tables) were off"

    def render(self, desired: HostFilter) -> IptState:
        """The state of ``desired``; the last one is kept, as plan and committed
        are called with the same IR in one sync."""
        if self._last is None or self._last[0] is not desired:
            self._last = (desired, render(desired, self.options))
        return self._last[1]

    def read(self) -> IptState | None:
        """secfw's chains and sets as the kernel holds them; None when absent —
        and on a bridged host when br_netfilter's switches are off (bridged
        traffic then bypasses iptables: the next, full, apply turns them on),
        and when one of iptables-nft's tables carries a flag (``dormant``: its
        chains see no packet; the next, full, apply clears it)."""
        if self.options.topology == "bridged" and not bridge_netfilter_enabled(
                self.executor.netns):
            return None
        if self.executor.flagged_tables():
            return None
        return self.executor.read_state()

    def reader(self) -> Callable[[], IptState | None]:
        """A function equal to :meth:`read` for another thread (the agent's
        background kernel check, secfw.agent.resync): reading runs the save
        tools as subprocesses and touches no render cache."""
        return self.read

    def plan(self, current: IptState | None, desired: HostFilter) -> IptPlan:
        """The minimal plan from ``current`` (None: nothing known) to ``desired``."""
        return plan_changes(current, self.render(desired))

    def apply(self, plan: object) -> None:
        """Apply ``plan`` (an :class:`IptPlan` from :meth:`plan`); BackendError on
        failure (each table's commit is atomic). Typed ``object`` to fit the
        agent's backend-neutral ``Plan`` protocol."""
        if not isinstance(plan, IptPlan):
            raise BackendError(f"iptables: cannot apply a {type(plan).__name__}")
        if self.options.topology == "bridged":  # bridged IP must reach the filter
            enable_bridge_netfilter(self.executor.netns)
        if plan.full:  # after a read that found a flagged table (read)
            self.executor.clear_table_flags(self.executor.flagged_tables())
        self.executor.apply(plan)

    def committed(self, desired: HostFilter) -> IptState:
        """The state the kernel holds once ``desired`` was applied (no round trip)."""
        return self.render(desired)

    def describe(self, plan: IptPlan) -> dict[str, Any]:
        """What ``plan`` changes, in a few words (chains, sets, element counts):
        ``{"replaced": True}`` for a plan made from nothing (everything is
        written); otherwise at most :data:`~secfw.backends.DESCRIBE_NAMES` chain
        and set names, with their counts when there are more."""
        if plan.full:
            return {"replaced": True}
        return capped_names({"replaced": False, **plan.summary})

    def element_count(self, state: IptState | None) -> int:
        """Elements in the sets of ``state`` (for metrics)."""
        return element_count(state)

    def revoke(self, previous: HostFilter | None, desired: HostFilter,
               pools: Iterable[str] | None = None) -> Revocation | None:
        """Delete the conntrack entries of established connections that ``desired``
        (already committed) no longer allows but ``previous`` did, in the
        executor's namespace — :func:`secfw.conntrack.revoke`, which judges them
        on the IR, so both backends revoke alike. ``previous`` None: check every
        connection of every port. ``pools`` (full passes): also delete the NAT
        bindings through floating addresses that ``desired`` does not map that
        way (:func:`secfw.conntrack.stale_nat`).

        Never raises: the filter is already right; a failure (ctnetlink
        unusable, its module unavailable) is logged and the result is None
        (entries then only expire by their timeouts).
        """
        try:
            from secfw.conntrack import revoke

            result = revoke(previous, desired, self.executor.netns, pools)
        except (BackendError, ImportError) as exc:
            log.warning("conntrack revocation failed: %s", exc)
            return None
        if result.deleted:
            log.info("revoked %d connection(s) of %d examined", result.deleted, result.examined)
        return result

    def cleanup(self) -> None:
        """Remove secfw's jumps, chains and sets (and nothing else)."""
        self.executor.cleanup()

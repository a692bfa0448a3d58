"""Assembling the agent of one compute host: backend, topology guard, reconciler.

The edge where the agent meets the host: the backend is opened in the agent's
namespace (or ``netns``), and the tap layout is read over rtnetlink
(:func:`secfw.netns.tap_links`) before every pass.
"""

from __future__ import annotations

from typing import Any

from secfw.agent.reconciler import Reconciler, TopologyGuard
from secfw.agent.topology import AUTO, TapLayout, decide
from secfw.backends import get_backend
from secfw.config import Config
from secfw.errors import BackendError, TopologyError
from secfw.netns import tap_links
from secfw.store.base import Store


def layout_probe(netns: str | None) -> TapLayout:
    """The tap layout of ``netns`` (the agent's own when None); BackendError when
    rtnetlink cannot be read."""
    try:
        return TapLayout.of(*tap_links(netns))
    except OSError as exc:
        raise BackendError(f"cannot read the host's interfaces: {exc}") from exc


def host_reconciler(
    store: Store, host: str, config: Config, backend: str, topology: str,
    netns: str | None = None,
) -> Reconciler:
    """The reconciler of ``host`` for ``backend`` and ``topology`` (``auto``,
    ``routed`` or ``bridged``), checking the taps before every pass."""

    # The flowtable is an nftables option (off by default: no argument then, so
    # other backends never see it).
    options = {"flowtable": config.flowtable} if (
        config.flowtable != "off" and backend == "nftables") else {}

    def make_backend(chosen: str) -> Any:
        return get_backend(backend, netns=netns, topology=chosen, **options)

    def probe() -> TapLayout:
        return layout_probe(netns)

    guard = TopologyGuard(topology, probe, make_backend)
    return Reconciler(store, host, config, make_backend(_initial(topology, probe)), guard)


def _initial(topology: str, probe: Any) -> str:
    """The topology to open the backend with: the configured one, or for ``auto``
    what the host shows now (routed when it cannot tell yet; the first pass
    checks again and switches or refuses)."""
    if topology != AUTO:
        return topology
    try:
        return decide(AUTO, probe())
    except (BackendError, TopologyError):
        return "routed"

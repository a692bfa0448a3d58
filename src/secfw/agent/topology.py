"""Which topology the host really has, checked against the one configured.

The layouts differ in how a packet is tied to its port: by interface name on a
routed host, by the bridge table's mark on a bridged one. Each layout's
``iifname != "tap*" accept`` / unmarked-packet rules let everything else
through — so the *wrong* layout lets every instance's traffic through (a bridged
tap's IP traffic reaches the inet hooks with the bridge as its interface). The
agent therefore looks at the taps themselves before every pass: a tap enslaved
to a Linux bridge means bridged, a tap with no bridge master means routed.

* ``auto`` (the default): follow what the taps show; with no tap yet, bridged
  when the namespace holds a bridge (nova-network creates its bridges before any
  instance), else routed.
* ``routed`` / ``bridged``: refuse taps that contradict it (:class:`TopologyError`,
  whose ``actual`` tells the agent which closed filter really closes them).

A host whose taps show both is refused in every mode: one host, one layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from secfw.backends import TOPOLOGIES
from secfw.errors import TopologyError

AUTO = "auto"
#: What ``--topology`` accepts.
CHOICES = (AUTO, *TOPOLOGIES)


@dataclass(frozen=True)
class TapLayout:
    """What the namespace shows: taps that are bridge ports, taps that are not,
    and whether any bridge exists."""

    bridged: tuple[str, ...]
    routed: tuple[str, ...]
    has_bridge: bool

    @classmethod
    def of(cls, taps: dict[str, bool], has_bridge: bool) -> TapLayout:
        """From :func:`secfw.netns.tap_links`' answer."""
        return cls(tuple(sorted(t for t, b in taps.items() if b)),
                   tuple(sorted(t for t, b in taps.items() if not b)), has_bridge)

    @property
    def shown(self) -> str | None:
        """The topology the taps show; None when there is no tap (or both kinds)."""
        if self.bridged and not self.routed:
            return "bridged"
        if self.routed and not self.bridged:
            return "routed"
        return None


def decide(configured: str, layout: TapLayout) -> str:
    """The topology to program for ``configured`` (``auto``, ``routed`` or
    ``bridged``) given what the namespace shows; TopologyError when they clash."""
    if layout.bridged and layout.routed:
        raise TopologyError(
            f"taps {_few(layout.bridged)} are bridge ports but {_few(layout.routed)} are "
            "not: one host must have one topology", actual=None)
    shown = layout.shown
    if configured == AUTO:
        return shown or ("bridged" if layout.has_bridge else "routed")
    if shown is None or shown == configured:
        return configured
    which = layout.bridged if shown == "bridged" else layout.routed
    kind = "are bridge ports" if shown == "bridged" else "are not bridge ports"
    raise TopologyError(
        f"--topology {configured}, but taps {_few(which)} {kind}: this host is {shown} "
        f"(use --topology {shown} or auto); taps stay closed", actual=shown)


def _few(taps: tuple[str, ...]) -> str:
    """Up to three names, and how many more."""
    shown = ", ".join(taps[:3])
    return shown if len(taps) <= 3 else f"{shown} and {len(taps) - 3} more"

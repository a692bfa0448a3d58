"""Which topology the host really has, checked against the one configured.

The layouts differ in how a packet is tied to its port: by interface name on a
routed host, by the bridge table's mark on a bridged one. The *wrong* layout
must never let a tap's traffic through: each layout drops the other kind of tap
in the kernel (nftables: the routed layout's bridge table drops frames of taps
that are bridge ports, the bridged layout's inet hooks drop packets that enter
or leave by a tap as an IP interface). On top of that the agent looks at the
taps before full passes and after link events: a tap enslaved to a Linux
bridge is certain evidence of a bridged host; a tap with no master is a routed
tap — or a bridged host's tap that the hypervisor has not plugged into its
bridge yet (libvirt creates the tap, then enslaves it).

* ``auto`` (the default): bridged as soon as any tap is a bridge port (unplugged
  taps beside them are being plugged); routed when there are taps and none is;
  with no tap, the current choice, or at start bridged when the namespace holds
  a bridge (nova-network creates its bridges before any instance), else routed.
* ``routed``: a tap that is a bridge port contradicts it — :class:`TopologyError`
  (``actual`` bridged: the layout whose closed filter really closes the taps).
* ``bridged``: taps without a master contradict it only when the namespace has
  no bridge at all (they cannot be waiting to be plugged) — TopologyError with
  ``actual`` routed. Otherwise they are dropped by the bridged layout until
  they are plugged.
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


def decide(configured: str, layout: TapLayout, current: str | None = None) -> str:
    """The topology to program for ``configured`` (``auto``, ``routed`` or
    ``bridged``) given what the namespace shows and the topology programmed now
    (None at start); TopologyError when they clash (module docstring)."""
    if configured == AUTO:
        if layout.bridged:
            return "bridged"
        if layout.routed:
            return "routed"
        return current or ("bridged" if layout.has_bridge else "routed")
    if configured == "routed" and layout.bridged:
        raise TopologyError(
            f"--topology routed, but taps {_few(layout.bridged)} are bridge ports: this host "
            "is bridged (use --topology bridged or auto); taps stay closed", actual="bridged")
    if configured == "bridged" and layout.routed and not layout.has_bridge:
        raise TopologyError(
            f"--topology bridged, but taps {_few(layout.routed)} are not bridge ports and "
            "there is no bridge: this host is routed (use --topology routed or auto); "
            "taps stay closed", actual="routed")
    return configured


def _few(taps: tuple[str, ...]) -> str:
    """Up to three names, and how many more."""
    shown = ", ".join(taps[:3])
    return shown if len(taps) <= 3 else f"{shown} and {len(taps) - 3} more"

"""Per-port isolation: one port a backend cannot express must not block the host.

When a backend refuses a host's filter (a rule it cannot express, two ports
claiming one tap, a malformed address), the agent does not give up on the whole
host — that would leave every other port *stale*: permissions removed in the
store would never reach the kernel. Instead :func:`isolate` finds the ports (and
group chains) at fault, and the agent applies the filter without them. A port
left out of the filter has no entry in the backend's port maps, so its tap falls
through to the fail-closed rule (``iifname "tap*" drop``, the bridge table's
unknown-tap drop, iptables' final DROP): it is *closed*, not open.

The search is logarithmic in the number of ports: the group chains are checked
together (and one by one only when that fails), then the ports are split in
halves until each failing half is a single port. Only the failure path pays for
it; :class:`Isolation` remembers the answer while the ports and chains it was
computed for are unchanged (the incremental compiler hands unchanged tuples on
as the same objects), so later passes cost what they did before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from secfw.compiler.ir import GroupChain, HostFilter, MetadataRedirect, PortPolicy
from secfw.errors import SecfwError

#: Renders a filter without touching the kernel; raises SecfwError when the
#: backend cannot express it.
Check = Callable[[HostFilter], None]


@dataclass(frozen=True)
class IsolatedPort:
    """A port left closed, and why (the backend's own one-line message)."""

    tap: str
    port_id: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"tap": self.tap, "port_id": self.port_id, "reason": self.reason}


@dataclass
class Isolation:
    """Which ports of a host's filter are left out, remembered across passes.

    ``apply(desired)`` returns the filter to program: ``desired`` itself when
    nothing is isolated, else ``desired`` without the isolated ports and chains
    (the same tuple objects while ``desired``'s ports and chains are the same
    objects, so the renderer's caches keep working).
    """

    isolated: tuple[IsolatedPort, ...] = ()
    _key: tuple[int, int] | None = None
    _kept: tuple[tuple[PortPolicy, ...], tuple[GroupChain, ...]] = ((), ())
    _anchor: list[object] = field(default_factory=list)  # keeps _key's objects alive

    def cached(self, desired: HostFilter) -> HostFilter | None:
        """The restricted filter when ``desired`` has the ports and chains the last
        isolation was computed for; None when it must be recomputed."""
        if not self.isolated or self._key != (id(desired.ports), id(desired.chains)):
            return None
        return _with_nat(desired, self._kept[0], self._kept[1])

    def compute(self, desired: HostFilter, check: Check,
                forced: dict[str, str] | None = None) -> HostFilter:
        """Find what ``check`` refuses (see the module docstring) and remember it;
        return ``desired`` without it. ``forced``: port id → why, ports to leave
        out whatever the backend says (the agent's own refusals)."""
        bad_chains = _bad_chains(desired, check)
        good_chains = tuple(c for c in desired.chains if c.name not in bad_chains)
        isolated = _bad_ports(desired, good_chains, bad_chains, check, forced or {})
        bad_ids = {p.port_id for p in isolated}
        kept_ports = tuple(p for p in desired.ports if p.port_id not in bad_ids)
        self.isolated = tuple(sorted(isolated, key=lambda p: (p.tap, p.port_id)))
        self._key = (id(desired.ports), id(desired.chains))
        self._anchor = [desired.ports, desired.chains]
        self._kept = (kept_ports, good_chains)
        return _with_nat(desired, kept_ports, good_chains)

    def clear(self) -> None:
        """Nothing isolated any more (the whole filter was accepted)."""
        self.isolated, self._key, self._anchor = (), None, []


def _with_nat(desired: HostFilter, ports: tuple[PortPolicy, ...],
              chains: tuple[GroupChain, ...]) -> HostFilter:
    """``desired`` restricted to ``ports`` and ``chains``, with the floating-IP NAT
    and the metadata redirect of the kept ports only (an isolated port gets no
    traffic through NAT either)."""
    kept = {p.port_id for p in ports}
    floating = tuple(n for n in desired.floating if n.port_id in kept)
    return HostFilter(desired.host, ports, chains, desired.sets, floating,
                      desired.internal if floating else (),
                      _kept_metadata(desired.metadata, ports))


def _kept_metadata(md: MetadataRedirect | None, kept: Iterable[PortPolicy]
                   ) -> MetadataRedirect | None:
    """The metadata redirect of the kept ports only (an isolated port's tap stays
    closed, its metadata included)."""
    if md is None:
        return None
    taps = {p.tap for p in kept}
    return replace(md, ports=tuple(p for p in md.ports if p.tap in taps))


def _refused(check: Check, candidate: HostFilter) -> str | None:
    """``check``'s error message for ``candidate``, or None when it is accepted."""
    try:
        check(candidate)
    except SecfwError as exc:
        return str(exc)
    return None


def _bad_chains(desired: HostFilter, check: Check) -> dict[str, str]:
    """Group chains the backend refuses on their own (with the sets they use)."""
    by_name = {s.name: s for s in desired.sets}

    def alone(chains: tuple[GroupChain, ...]) -> HostFilter:
        used = {r.remote_set for c in chains for r in c.rules if r.remote_set}
        return HostFilter(desired.host, (), chains,
                          tuple(by_name[n] for n in sorted(used) if n in by_name))

    if _refused(check, alone(desired.chains)) is None:
        return {}
    found = {}
    for chain in desired.chains:
        reason = _refused(check, alone((chain,)))
        if reason is not None:
            found[chain.name] = reason
    return found


def _bad_ports(
    desired: HostFilter, chains: tuple[GroupChain, ...], bad_chains: dict[str, str],
    check: Check, forced: dict[str, str],
) -> list[IsolatedPort]:
    """Ports that are ``forced`` out, share a tap, use a refused chain, or are
    refused themselves."""
    isolated: list[IsolatedPort] = []
    claims = Counter(p.tap for p in desired.ports)
    candidates: list[PortPolicy] = []
    for port in desired.ports:
        reason = forced.get(port.port_id) or _static_reason(port, claims, bad_chains)
        if reason is None:
            candidates.append(port)
        else:
            isolated.append(IsolatedPort(port.tap, port.port_id, reason))

    def refused(ports: Sequence[PortPolicy]) -> str | None:
        return _refused(check, HostFilter(desired.host, tuple(ports), chains, desired.sets))

    for port, reason in _bisect(candidates, refused):
        isolated.append(IsolatedPort(port.tap, port.port_id, reason))
    return isolated


def _static_reason(
    port: PortPolicy, claims: Counter[str], bad_chains: dict[str, str]
) -> str | None:
    """Why ``port`` is refused without asking the backend, if it is."""
    if claims[port.tap] > 1:
        return (f"tap {port.tap} is claimed by {claims[port.tap]} ports "
                "(port ids sharing their first 11 characters)")
    for name in (*port.ingress_chains, *port.egress_chains):
        if name in bad_chains:
            return f"uses a group chain the backend refuses: {bad_chains[name]}"
    return None


def _bisect(
    ports: Sequence[PortPolicy], refused: Callable[[Sequence[PortPolicy]], str | None]
) -> list[tuple[PortPolicy, str]]:
    """The single ports ``refused`` refuses, found by halving refused groups.

    Assumes a refusal is caused by single ports (what isolation is for); a group
    that fails while both of its halves pass (a clash between ports) isolates the
    whole group, so the result is still a filter the backend accepts.
    """
    if not ports:
        return []
    reason = refused(ports)
    if reason is None:
        return []
    if len(ports) == 1:
        return [(ports[0], reason)]
    middle = len(ports) // 2
    found = _bisect(ports[:middle], refused) + _bisect(ports[middle:], refused)
    return found or [(port, reason) for port in ports]

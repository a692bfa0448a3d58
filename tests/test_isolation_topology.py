"""Fail-closed logic without a kernel: per-port isolation, the topology decision,
unique tap names at boot, and what the reconciler leaves in a (fake) kernel when
passes fail. The same guarantees with real packets: tests/netns/test_failclosed.py."""

from __future__ import annotations

from typing import Any

import pytest

from secfw import api as api_module
from secfw.agent.isolation import Isolation
from secfw.agent.reconciler import Reconciler, TopologyGuard
from secfw.agent.topology import AUTO, TapLayout, decide
from secfw.api import Api
from secfw.backends.iptables.render import RenderOptions
from secfw.backends.iptables.render import render as ipt_render
from secfw.backends.nftables.render import render as nft_render
from secfw.compiler.ir import GroupChain, HostFilter, IRRule, PortPolicy, PortRange
from secfw.config import Config
from secfw.errors import BackendError, ConflictError, TopologyError

HOST = "compute1"


def _port(tap: str, port_id: str | None = None, chains: tuple[str, ...] = ("g-web",),
          mac: str = "fa:16:3e:00:00:01") -> PortPolicy:
    return PortPolicy(tap, port_id or f"id-{tap}", f"inst-{tap}", mac, ("10.0.0.5",), (),
                      chains)


WEB = GroupChain("g-web", "web", "ingress",
                 (IRRule("r1", "ipv4", 6, PortRange(80, 80), remote_cidr="0.0.0.0/0"),))
#: A rule no backend can express: ports without a protocol.
BROKEN = GroupChain("g-bad", "bad", "ingress", (IRRule("r2", "ipv4", None, PortRange(22, 22)),))


def _checks() -> list[Any]:
    return [lambda hf: nft_render(hf, "routed"), lambda hf: nft_render(hf, "bridged"),
            lambda hf: ipt_render(hf, RenderOptions())]


@pytest.mark.parametrize("check", _checks(), ids=["nft-routed", "nft-bridged", "iptables"])
def test_isolation_leaves_out_exactly_the_ports_the_backend_refuses(check: Any) -> None:
    good = [_port(f"tap{i:02d}", mac=f"fa:16:3e:00:00:{i:02x}") for i in range(1, 9)]
    bad_mac = _port("tapbadmac", mac="01:00:5e:00:00:01")  # multicast: not a port's MAC
    uses_broken = _port("tapbroken", chains=("g-bad",))
    twin_a = _port("taptwin", "id-a", mac="fa:16:3e:00:01:01")
    twin_b = _port("taptwin", "id-b", mac="fa:16:3e:00:01:02")
    desired = HostFilter(HOST, (*good[:4], bad_mac, twin_a, *good[4:], uses_broken, twin_b),
                         (BROKEN, WEB), ())
    with pytest.raises(BackendError):  # the whole filter is refused
        check(desired)
    isolation = Isolation()
    kept = isolation.compute(desired, check)
    check(kept)  # what is left is accepted
    assert [p.tap for p in kept.ports] == [p.tap for p in good]
    assert [c.name for c in kept.chains] == ["g-web"]
    isolated = {(p.tap, p.port_id) for p in isolation.isolated}
    assert isolated == {("tapbadmac", "id-tapbadmac"), ("tapbroken", "id-tapbroken"),
                        ("taptwin", "id-a"), ("taptwin", "id-b")}
    reasons = {p.port_id: p.reason for p in isolation.isolated}
    assert "claimed by 2 ports" in reasons["id-a"] and "refuses" in reasons["id-tapbroken"]
    assert "01:00:5e:00:00:01" in reasons["id-tapbadmac"]


def test_isolation_is_remembered_while_ports_and_chains_are_the_same_objects() -> None:
    ports = (_port("tap01"), _port("tap02", mac="01:00:5e:00:00:01"))
    desired = HostFilter(HOST, ports, (WEB,), ())
    isolation = Isolation()
    first = isolation.compute(desired, _checks()[0])
    again = isolation.cached(HostFilter(HOST, ports, desired.chains, ()))
    assert again is not None and again.ports is first.ports  # the renderer's caches hold
    assert isolation.cached(HostFilter(HOST, (ports[0],), desired.chains, ())) is None
    isolation.clear()
    assert isolation.cached(desired) is None and isolation.isolated == ()


# --------------------------------------------------------------------------- topology


def _layout(bridged: tuple[str, ...] = (), routed: tuple[str, ...] = (),
            has_bridge: bool = False) -> TapLayout:
    return TapLayout.of({**{t: True for t in bridged}, **{t: False for t in routed}},
                        has_bridge or bool(bridged))


def test_auto_follows_the_taps_and_guesses_from_bridges_before_any_tap() -> None:
    assert decide(AUTO, _layout(bridged=("tapa",))) == "bridged"
    assert decide(AUTO, _layout(routed=("tapa",))) == "routed"
    assert decide(AUTO, _layout()) == "routed"
    assert decide(AUTO, _layout(has_bridge=True)) == "bridged"
    assert decide(AUTO, _layout(), current="bridged") == "bridged"  # last tap gone: no flap


def test_auto_on_a_bridged_host_stays_bridged_while_a_new_tap_is_plugged() -> None:
    """libvirt creates a tap, then enslaves it: a bridge port elsewhere on the host
    is the evidence that counts (the unplugged tap is dropped meanwhile)."""
    assert decide(AUTO, _layout(bridged=("tapa",), routed=("tapnew",))) == "bridged"
    assert decide("bridged", _layout(bridged=("tapa",), routed=("tapnew",))) == "bridged"
    assert decide("bridged", _layout(routed=("tapnew",), has_bridge=True)) == "bridged"


def test_an_explicit_topology_the_taps_contradict_is_refused_naming_the_real_one() -> None:
    assert decide("routed", _layout()) == "routed"  # no tap: nothing contradicts
    assert decide("bridged", _layout(bridged=("tapa",))) == "bridged"
    with pytest.raises(TopologyError, match=r"--topology routed.*tapa.*bridge ports") as err:
        decide("routed", _layout(bridged=("tapa",)))
    assert err.value.actual == "bridged"
    with pytest.raises(TopologyError, match=r"no bridge") as err:
        decide("bridged", _layout(routed=("tapb",)))
    assert err.value.actual == "routed"


# --------------------------------------------------------------------------- boot


def _booting_api(api: Api) -> None:
    api.net_create("admin", "net", "10.0.0.0/24")
    api.image_create("admin", "cirros", visibility="public")


def test_boot_never_gives_two_ports_one_tap(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    _booting_api(api)
    ids = iter(["aaaaaaaa-bbb-1", "aaaaaaaa-bbb-2", "cccccccc-ddd-1"])
    monkeypatch.setattr(api_module, "new_port_id", lambda: next(ids))
    api.boot("admin", "one", "m1.tiny", "cirros", HOST, None, ["net"])
    api.boot("admin", "two", "m1.tiny", "cirros", HOST, None, ["net"])
    taps = sorted(p.tap for p in api.snapshot().ports.values())
    assert taps == ["tapaaaaaaaa-bb", "tapcccccccc-dd"]


def test_boot_refuses_when_every_id_collides(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    _booting_api(api)
    monkeypatch.setattr(api_module, "new_port_id", lambda: "aaaaaaaa-bbb-same")
    api.boot("admin", "one", "m1.tiny", "cirros", HOST, None, ["net"])
    before = api.store.revision()
    with pytest.raises(ConflictError, match="tap name"):
        api.boot("admin", "two", "m1.tiny", "cirros", HOST, None, ["net"])
    assert api.store.revision() == before  # nothing changed


# --------------------------------------------------------------------------- reconciler


class _Kernel:
    """A fake backend for one topology that records what each topology committed."""

    def __init__(self, topology: str, tables: dict[str, Any]) -> None:
        self.topology, self.tables, self.name = topology, tables, "fake"

    def read(self) -> Any:
        return self.tables.get("state")

    def plan(self, current: Any, desired: HostFilter) -> Any:
        target = (self.topology, tuple(p.tap for p in desired.ports))
        return _Plan(() if current == target else ("replace",), target)

    def apply(self, plan: Any) -> None:
        self.tables["state"] = plan.target

    def committed(self, desired: HostFilter) -> Any:
        return (self.topology, tuple(p.tap for p in desired.ports))

    def cleanup(self) -> None:
        self.tables.clear()


class _Plan:
    def __init__(self, commands: tuple[str, ...], target: Any) -> None:
        self.commands, self.target = commands, target

    @property
    def empty(self) -> bool:
        return not self.commands

    @property
    def size(self) -> int:
        return len(self.commands)


def test_a_wrong_topology_closes_the_taps_with_the_layout_they_really_have(api: Api) -> None:
    tables: dict[str, Any] = {}
    layout = _layout(bridged=("tapa",))
    guard = TopologyGuard("routed", lambda: layout, lambda t: _Kernel(t, tables))
    reconciler = Reconciler(api.store, HOST, Config(), _Kernel("routed", tables), guard)
    with pytest.raises(TopologyError):
        reconciler.reconcile(full=True)
    assert tables["state"] == ("bridged", ())  # closed, in the bridged layout
    auto = Reconciler(api.store, HOST, Config(), _Kernel("routed", tables),
                      TopologyGuard(AUTO, lambda: layout, lambda t: _Kernel(t, tables)))
    auto.reconcile(full=True)
    assert getattr(auto.backend, "topology", None) == "bridged"


def test_close_if_absent_closes_an_empty_kernel_and_leaves_a_table_alone(api: Api) -> None:
    tables: dict[str, Any] = {}
    reconciler = Reconciler(api.store, HOST, Config(), _Kernel("routed", tables))
    result = reconciler.close_if_absent()
    assert result is not None and result.closed and tables["state"] == ("routed", ())
    tables["state"] = ("routed", ("tapold",))  # an earlier agent's ruleset
    assert reconciler.close_if_absent() is None and tables["state"] == ("routed", ("tapold",))


# --------------------------------------------------------------------------- br_netfilter


class _Executor:
    """Records what would be applied (no kernel, so no generation to read)."""

    netns = None
    last_commit = None

    def generation_reader(self) -> None:
        return None

    def __init__(self) -> None:
        self.applied: list[Any] = []

    def apply(self, tx: Any) -> None:
        self.applied.append(tx)


def test_without_br_netfilter_only_the_closed_filter_is_applied_on_a_bridged_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """br_netfilter missing: the bridge table of the closed filter drops every
    tap's frames at layer 2 by itself, so it is applied; a ruleset with ports
    would pass bridged IP unfiltered (the inet hooks never see it): refused."""
    from secfw.backends.nftables import backend as nft_backend

    def missing(_netns: Any) -> None:
        raise BackendError("bridged topology needs br_netfilter: load it")

    monkeypatch.setattr(nft_backend, "enable_bridge_netfilter", missing)
    executor = _Executor()
    backend = nft_backend.NftablesBackend(executor=executor, topology="bridged")  # type: ignore[arg-type]
    backend.apply(backend.plan(None, HostFilter(HOST, (), (), ())))
    assert len(executor.applied) == 1
    with pytest.raises(BackendError, match="br_netfilter"):
        backend.apply(backend.plan(None, HostFilter(HOST, (_port("tap01"),), (WEB,), ())))
    assert len(executor.applied) == 1

"""secfw.neutron: Neutron's agent-side data → IR, and the driver's call contract.

The driver runs on a recording backend here (no kernel): what matters is the
IR it compiles from Neutron's calls and how many transactions a burst costs.
Real packets: tests/netns/test_neutron_driver_packets.py.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from secfw.backends.nftables import render, to_nft_text
from secfw.compiler.build import chain_name, set_name
from secfw.compiler.ir import HostFilter, IcmpMatch, PortRange
from secfw.errors import ValidationError
from secfw.neutron import SecfwFirewallDriver, convert

WEB, DB = str(uuid.UUID(int=1)), str(uuid.UUID(int=2))


class RecordingBackend:
    """Just enough of NftablesBackend: each non-empty plan is the desired IR."""

    def __init__(self) -> None:
        self.applied: list[HostFilter] = []
        self.revoked: list[tuple[HostFilter, HostFilter]] = []

    def read(self) -> None:
        return None

    def plan(self, current: Any, desired: HostFilter) -> Any:
        class Plan:
            empty = current == desired
            ir = desired
        return Plan()

    def apply(self, plan: Any) -> None:
        self.applied.append(plan.ir)

    def committed(self, desired: HostFilter) -> HostFilter:
        return desired

    def revoke(self, previous: HostFilter, desired: HostFilter) -> None:
        self.revoked.append((previous, desired))

    def cleanup(self) -> None:
        pass


def port(device: str = "tapaaaaaaaa-01", groups: tuple[str, ...] = (WEB,),
         **extra: Any) -> dict[str, Any]:
    return {"device": device, "mac_address": "FA:16:3E:00:00:01",
            "fixed_ips": ["10.0.0.5", "2001:db8::5"], "security_groups": list(groups),
            "allowed_address_pairs": [], "port_security_enabled": True, **extra}


@pytest.fixture
def driver() -> SecfwFirewallDriver:
    return SecfwFirewallDriver(backend=RecordingBackend())  # type: ignore[arg-type]


def backend(driver: SecfwFirewallDriver) -> RecordingBackend:
    assert isinstance(driver.backend, RecordingBackend)
    return driver.backend


# ---- conversion


def test_port_dict_becomes_a_policy_with_neutron_semantics() -> None:
    policy = convert.port_policy(port(allowed_address_pairs=[
        {"ip_address": "10.0.0.64/26", "mac_address": "fa:16:3e:00:00:02"},
        {"ip_address": "10.0.0.9"}]))
    assert policy.tap == "tapaaaaaaaa-01"
    assert policy.mac == "fa:16:3e:00:00:01"
    assert (policy.ipv4, policy.ipv6) == (("10.0.0.5",), ("2001:db8::5",))
    assert policy.ingress_chains == (chain_name(WEB, "ingress"),)
    assert policy.egress_chains == (chain_name(WEB, "egress"),)
    assert not policy.egress_open and policy.same_net_sets == ()
    assert [(p.cidr, p.mac) for p in policy.allowed_pairs] == [
        ("10.0.0.64/26", "fa:16:3e:00:00:02"), ("10.0.0.9/32", "fa:16:3e:00:00:01")]


def test_tap_names_follow_both_agents() -> None:
    assert convert.tap_name("tap12345678-9a") == "tap12345678-9a"  # linuxbridge: device
    assert convert.tap_name("12345678-9abc-def0") == "tap12345678-9a"  # OVS hybrid: port id


def test_port_security_off_and_fixed_ip_dicts() -> None:
    policy = convert.port_policy(port(port_security_enabled=False,
                                      fixed_ips=[{"ip_address": "10.0.0.7"}]))
    assert not policy.port_security and policy.ipv4 == ("10.0.0.7",)


def test_rules_as_the_server_sends_them() -> None:
    ingress, egress, icmp6, any_src = (convert.ir_rule(r)[1] for r in (
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
         "port_range_min": 80, "port_range_max": 81, "source_ip_prefix": "192.0.2.7/24"},
        {"direction": "egress", "ethertype": "IPv4", "protocol": "17",
         "port_range_min": 53, "dest_ip_prefix": "192.0.2.0/24"},
        {"direction": "ingress", "ethertype": "IPv6", "protocol": "icmp",
         "port_range_min": 128, "remote_group_id": DB},
        {"direction": "ingress", "ethertype": "IPv4", "source_ip_prefix": "0.0.0.0/0"}))
    assert (ingress.protocol, ingress.ports, ingress.remote_cidr) == (
        6, PortRange(80, 81), "192.0.2.0/24")
    assert (egress.protocol, egress.ports, egress.remote_cidr) == (17, PortRange(53, 53),
                                                                   "192.0.2.0/24")
    assert (icmp6.protocol, icmp6.icmp, icmp6.remote_set) == (
        58, IcmpMatch(128, None), set_name(DB, "ipv6"))
    assert any_src.protocol is None and any_src.remote_cidr is None


@pytest.mark.parametrize("rule", [
    {"direction": "sideways", "ethertype": "IPv4"},
    {"direction": "ingress", "ethertype": "IPv5"},
    {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp; flush ruleset"},
    {"direction": "ingress", "ethertype": "IPv4", "source_ip_prefix": "2001:db8::/64"},
    {"direction": "ingress", "ethertype": "IPv4", "remote_group_id": "web } accept"},
    {"direction": "ingress", "ethertype": "IPv4", "port_range_min": 22},  # no protocol
])
def test_malformed_rules_are_refused(rule: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        convert.ir_rule(rule)


def test_group_ids_are_uuids_only(driver: SecfwFirewallDriver) -> None:
    with pytest.raises(ValidationError):
        driver.update_security_group_rules("default; flush ruleset", [])
    with pytest.raises(ValidationError):
        driver.prepare_port_filter(port(groups=("web",)))
    assert driver.ports == {} and backend(driver).applied == []


def test_member_addresses_pairs_or_strings() -> None:
    v4, v6 = convert.member_sets(DB, {"IPv4": [("10.0.0.9", "fa:16:3e:00:00:09"), "10.0.0.8"],
                                      "IPv6": [("2001:db8::9", "fa:16:3e:00:00:09")]})
    assert v4.elements == ("10.0.0.8/32", "10.0.0.9/32")
    assert v6.elements == ("2001:db8::9/128",)


# ---- the driver's calls


def test_a_deferred_burst_is_one_transaction(driver: SecfwFirewallDriver) -> None:
    with driver.defer_apply():
        driver.update_security_group_rules(WEB, [
            {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
             "port_range_min": 22, "port_range_max": 22, "remote_group_id": DB}])
        driver.update_security_group_members(DB, {"IPv4": [("10.0.0.9", "x")], "IPv6": []})
        for n in range(5):
            driver.prepare_port_filter(port(f"tapaaaaaaaa-0{n}"))
    applied = backend(driver).applied
    assert len(applied) == 1
    assert [p.tap for p in applied[0].ports] == [f"tapaaaaaaaa-0{n}" for n in range(5)]
    members = {s.name: s.elements for s in applied[0].sets}
    assert members == {set_name(DB, "ipv4"): ("10.0.0.9/32",)}
    assert set(driver.ports) == {f"tapaaaaaaaa-0{n}" for n in range(5)}


def test_outside_deferral_each_call_applies(driver: SecfwFirewallDriver) -> None:
    driver.prepare_port_filter(port())
    driver.update_security_group_rules(WEB, [{"direction": "ingress", "ethertype": "IPv4"}])
    assert len(backend(driver).applied) == 2
    driver.update_security_group_rules(WEB, [{"direction": "ingress", "ethertype": "IPv4"}])
    assert len(backend(driver).applied) == 2  # same filter: an empty plan is not applied


def test_unpushed_groups_and_members_fail_closed(driver: SecfwFirewallDriver) -> None:
    driver.update_security_group_rules(WEB, [
        {"direction": "ingress", "ethertype": "IPv4", "remote_group_id": DB}])
    driver.prepare_port_filter(port(groups=(WEB, DB)))
    hf = backend(driver).applied[-1]
    db_in = hf.chain(chain_name(DB, "ingress"))
    assert db_in is not None and db_in.rules == ()
    assert [(s.name, s.elements) for s in hf.sets] == [(set_name(DB, "ipv4"), ())]


def test_update_and_remove_port(driver: SecfwFirewallDriver) -> None:
    driver.update_port_filter(port())  # not filtered yet: ignored
    assert backend(driver).applied == []
    driver.prepare_port_filter(port())
    driver.update_port_filter(port(port_security_enabled=False))
    assert not backend(driver).applied[-1].ports[0].port_security
    driver.remove_port_filter(port())
    assert driver.ports == {} and backend(driver).applied[-1].ports == ()
    assert len(backend(driver).revoked) == 2  # every change after the first revokes


def test_the_compiled_filter_renders_without_neutron_text(driver: SecfwFirewallDriver) -> None:
    """Names are data: what Neutron sends (descriptions, protocol names) never
    reaches the ruleset; only validated ids, addresses and digests do."""
    with driver.defer_apply():
        driver.update_security_group_rules(WEB, [
            {"direction": "ingress", "ethertype": "IPv4", "protocol": "TCP",
             "port_range_min": 80, "port_range_max": 80, "description": "evil\"; flush"},
            {"direction": "egress", "ethertype": "IPv6", "protocol": "ipv6-icmp"}])
        driver.prepare_port_filter(port())
    text = to_nft_text(render(backend(driver).applied[-1], "bridged"))
    assert "evil" not in text and "flush" not in text
    assert chain_name(WEB, "ingress") in text

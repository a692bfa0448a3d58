"""Neutron loads secfw's firewall driver as its L2 agent does (``make conformance``).

Needs the ``neutron`` extra (``make conformance`` installs it and sets
SECFW_REQUIRE_CONFORMANCE=1, which turns its absence into a failure); skipped
without it. The driver's behaviour is tested without Neutron:
tests/test_neutron_driver.py and tests/netns/test_neutron_driver_packets.py.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

pytestmark = pytest.mark.conformance


@pytest.fixture(scope="module")
def firewall() -> Any:
    """Neutron's neutron.agent.firewall module."""
    try:
        from neutron.agent import firewall as module
    except ImportError:
        if os.environ.get("SECFW_REQUIRE_CONFORMANCE") == "1":
            pytest.fail("neutron missing: pip install -e '.[neutron]'")
        pytest.skip("neutron not installed (the neutron extra)")
    return module


def test_the_entry_point_loads_a_complete_firewall_driver(firewall: Any) -> None:
    """``firewall_driver = secfw`` resolves, through Neutron's own loader, to a
    concrete subclass of Neutron's FirewallDriver (no abstract method left)."""
    from secfw.neutron import SecfwFirewallDriver

    cls = firewall.load_firewall_driver_class("secfw")
    assert cls is SecfwFirewallDriver
    assert issubclass(cls, firewall.FirewallDriver)
    assert not getattr(cls, "__abstractmethods__", frozenset())


def test_the_agent_can_construct_it(firewall: Any) -> None:
    """securitygroups_rpc.init_firewall passes integration_bridge first."""
    driver = firewall.load_firewall_driver_class("secfw")(integration_bridge=None)
    assert isinstance(driver, firewall.FirewallDriver)
    assert driver.ports == {}
    with driver.defer_apply():  # nothing pushed: nothing applied
        pass
    assert driver.applies == 0

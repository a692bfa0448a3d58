"""secfw as a Neutron firewall driver (``firewall_driver = secfw``).

:class:`SecfwFirewallDriver` (:mod:`.driver`) implements Neutron's agent-side
``FirewallDriver`` on secfw's compiler IR and nftables backend; :mod:`.convert`
turns Neutron's port dicts, rules and member addresses into that IR. Neutron itself
is optional (the ``neutron`` extra): the driver works, and is tested, without it.
"""

from secfw.neutron.driver import SecfwFirewallDriver

__all__ = ["SecfwFirewallDriver"]

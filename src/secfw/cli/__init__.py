"""The ``secfw`` command line: one module per family of commands.

:mod:`~secfw.cli.main` is the entry point (``secfw = secfw.cli.main:run``) and
the nova/openstack-style security-group, network and server commands; it loads
the others only when their command is asked for (a plain command stays light):
:mod:`~secfw.cli.compute` (flavors, keypairs, images, compute hosts),
:mod:`~secfw.cli.floating` (floating IPs), :mod:`~secfw.cli.volume` (volumes),
:mod:`~secfw.cli.store` (dump, restore), :mod:`~secfw.cli.host` (``agent``,
``compile``, ``demo``, ``lab``, ``metadata``); :mod:`~secfw.cli.output` prints
every table and JSON answer. ``secfw audit`` lives with the audits
(:mod:`secfw.audit.cli`).
"""

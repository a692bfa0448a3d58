"""A Neutron-compatible REST API (v2.0) for secfw's security groups.

``secfw api serve --listen ADDR:PORT [--config FILE]`` serves
:func:`secfw.neutron_api.app.create_app` with waitress; openstackclient,
openstacksdk and other Neutron clients drive secfw's model through it. The
package is kept apart from the nova-style CLI: it is a second front end to the
same :class:`secfw.api.Api`.
"""

"""The namespace lab and the demos: compute hosts and instances as network namespaces.

:mod:`~secfw.lab.hostlab` builds one host (routed or bridged) and its
instances; :mod:`~secfw.lab.multihost` several hosts on an underlay with an etcd
member (``secfw lab up --hosts N``); :mod:`~secfw.lab.etcdlocal` starts local
etcd members and clusters; :mod:`~secfw.lab.netns_tools` runs probes inside
namespaces (TCP/UDP/ICMP, crafted packets); :mod:`~secfw.lab.demo` and
:mod:`~secfw.lab.demohosts` are ``secfw demo`` on one host and on several.
Nothing here is needed by the agent or the compiler.
"""

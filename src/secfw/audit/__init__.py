"""Firewall rule audits: explain a flow, the exact flow space that reaches a port,
exposure and lint (issue #14).

The audits read the cloud through the compiled IR of every host and decide with
:class:`secfw.compiler.evaluate.PolicyIndex` — the evaluator the conntrack
revocation uses — so audits and revocation share one reading of the semantics,
while :mod:`secfw.compiler.explain` stays an independent oracle the tests compare
them with. Pure: no I/O (the CLI in :mod:`secfw.audit.cli` reads the store).

* :mod:`.policy` — the cloud's filters indexed for audits (:class:`CloudPolicy`):
  which port owns an address, the rules that admit a concrete flow;
* :mod:`.space` — flow spaces: address sets × protocol × port (or ICMP
  type/code) intervals, and the sweep that turns allow rules into minimal regions;
* :mod:`.explain` — ``secfw audit explain``; :mod:`.reach` — ``reach``;
  :mod:`.exposure` — ``exposure``; :mod:`.lint` — ``lint``.
"""

"""The iptables + ipset backend: ``secfw-…`` chains and sets (see docs/iptables.md).

* :func:`render` — HostFilter IR → :class:`IptState` (pure); :func:`to_text` /
  :func:`compile_text` print it as ipset and iptables-restore input.
* :func:`from_save` — the same normal form, read back from the tools' output.
* :func:`plan` — the minimal :class:`IptPlan` from one state to another.
* :class:`IptablesExecutor` — runs the tools (optionally in a namespace).
* :class:`IptablesBackend` — the above, as the agent drives a backend.
"""

from secfw.backends.iptables.backend import IptablesBackend
from secfw.backends.iptables.executor import IptablesExecutor, detect_variant
from secfw.backends.iptables.plan import IptPlan, plan
from secfw.backends.iptables.render import (
    IpSet,
    IptState,
    RenderOptions,
    Table,
    compile_text,
    render,
    to_text,
)
from secfw.backends.iptables.state import from_save

__all__ = [
    "IpSet",
    "IptPlan",
    "IptState",
    "IptablesBackend",
    "IptablesExecutor",
    "RenderOptions",
    "Table",
    "compile_text",
    "detect_variant",
    "from_save",
    "plan",
    "render",
    "to_text",
]

"""An optional nftables flowtable fast path for established flows (off by default).

A flowtable (kernel ``Documentation/networking/nf_flowtable.rst``, nft(8)
"FLOWTABLES") lets packets of a flow that a ``flow add @ft`` rule offloaded skip
the forward hook: the ingress hook of the devices listed finds the flow and
forwards it at once. secfw can add one for kernels that have it:

* :func:`probe` — whether this kernel can create a flowtable at all: one
  ``flowtable … hook ingress`` in a scratch namespace, cached per process. A
  kernel without ``nf_flow_table_inet`` answers ENOENT ("No such file or
  directory"); :func:`parse_probe` turns nft's answer into a
  :class:`FlowtableSupport` with that error as the reason.
* :func:`render_flowtable` — the whole table ``inet secfw_flow``: the flowtable
  on the host's taps and one forward chain, at a priority *after* secfw's own
  forward chains (-1 and 0, :mod:`.layout`), that offloads ``ct state
  established`` TCP/UDP flows. A packet secfw drops never reaches that chain, so
  only flows secfw already admitted are offloaded, and only established ones: the
  first packet of every flow still walks the security groups.
* :class:`FlowtablePath` — the backend's setting, ``off`` (default), ``auto``
  (used when the probe finds it, else logged once and left out) or ``on``
  (required: where the kernel has none, or on a bridged host, every port is left
  closed with the reason; the agent's isolation, docs/agent.md — never a
  ruleset the kernel would half accept).

It is its own table, so secfw's table, its read-back and its plans do not change.
Routed hosts only: bridged frames are not forwarded by the IP stack, which the
``inet`` flowtable needs. **Untested here**: the development kernel has no
``nf_flow_table``; only the probe, the refusal and the rendered text are tested.
Offloaded packets skip the forward hook — secfw's anti-spoofing there included;
the flowtable matches the flow's own addresses, ports and input device, so a
packet from another tap or another address is not offloaded, but the source MAC
is not checked on offloaded packets.
"""

from __future__ import annotations

import functools
import logging
import re
import subprocess
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from secfw.backends.nftables.executor import NftablesExecutor
from secfw.compiler.ir import HostFilter
from secfw.errors import BackendError

log = logging.getLogger(__name__)

MODES = ("off", "auto", "on")
TABLE = "secfw_flow"
#: After secfw's forward chains (priorities -1 and 0, :mod:`.layout`): only the
#: packets they accepted get here.
FORWARD_PRIORITY = 10
#: Interface names the flowtable may list (IFNAMSIZ - 1 characters, no quoting needed).
_DEVICE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_PROBE_TEXT = (
    "table inet secfw_probe {\n"
    "  flowtable ft {\n"
    "    hook ingress priority filter\n"
    '    devices = { "lo" }\n'
    "  }\n"
    "}\n"
)


@dataclass(frozen=True)
class FlowtableSupport:
    """Whether the kernel can create an ``inet`` flowtable, and why not."""

    available: bool
    reason: str = ""


def parse_probe(returncode: int, stderr: str) -> FlowtableSupport:
    """The probe's outcome from nft's exit status and error output.

    nft prints ``FILE:LINE:COL: Error: MESSAGE`` and then the offending line;
    the reason is the first MESSAGE, with a hint when it is ENOENT (no
    ``nf_flow_table`` in this kernel, nor as a module)."""
    if returncode == 0:
        return FlowtableSupport(True)
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    message = next((line.split("Error:", 1)[1].strip() for line in lines if "Error:" in line),
                   lines[0] if lines else f"nft exit status {returncode}")
    if "No such file or directory" in message:
        message += " (no nf_flow_table in this kernel)"
    return FlowtableSupport(False, f"flowtable … hook ingress: {message}")


@functools.cache
def probe() -> FlowtableSupport:
    """Create one flowtable in a new scratch namespace, then delete the namespace.

    Cached for the process: the kernel does not gain the module while it runs.
    A namespace that cannot be made counts as unavailable, with that reason."""
    ns = f"sfw-ftp-{uuid.uuid4().hex[:8]}"
    added = _run(["ip", "netns", "add", ns])
    if added.returncode != 0:
        return FlowtableSupport(False, f"probe namespace: {added.stderr.strip()}")
    try:
        done = _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], _PROBE_TEXT)
        return parse_probe(done.returncode, done.stderr)
    finally:
        _run(["ip", "netns", "del", ns])


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(argv, 1, "", str(exc))


def render_flowtable(devices: Iterable[str]) -> str:
    """A transaction replacing table ``inet secfw_flow``: the flowtable on
    ``devices`` (sorted, deduplicated) and the chain that offloads established
    flows; with no device, only the table's removal. BackendError for a device
    name that is not a plain interface name (names are never syntax)."""
    names = sorted(set(devices))
    bad = [name for name in names if not _DEVICE.fullmatch(name)]
    if bad:
        raise BackendError(f"flowtable: not an interface name: {bad[0]!r}")
    header = f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
    if not names:
        return header
    listed = ", ".join(f'"{name}"' for name in names)
    return header + (
        f"table inet {TABLE} {{\n"
        "  flowtable ft {\n"
        "    hook ingress priority filter\n"
        f"    devices = {{ {listed} }}\n"
        "  }\n"
        "  chain forward {\n"
        f"    type filter hook forward priority {FORWARD_PRIORITY}; policy accept;\n"
        "    ct state established meta l4proto { tcp, udp } flow add @ft\n"
        "  }\n"
        "}\n"
    )


def refusal(mode: str, topology: str, support: FlowtableSupport | None) -> str | None:
    """Why the fast path cannot be used in ``mode`` (None: it can, or is not
    asked for). ValueError for an unknown mode."""
    if mode not in MODES:
        raise ValueError(f"flowtable: unknown mode {mode!r} (known: {', '.join(MODES)})")
    if mode == "off":
        return None
    if topology != "routed":
        return "flowtable: only on routed hosts (bridged frames are not IP-forwarded)"
    if support is None or not support.available:
        return f"flowtable: not available on this kernel ({support.reason if support else '?'})"
    return None


class FlowtablePath:
    """The backend's flowtable setting and the table it keeps (see the module doc)."""

    def __init__(self, mode: str, topology: str,
                 support: FlowtableSupport | None = None) -> None:
        """``support``: the probe's answer (probed here when needed and not given)."""
        if support is None and mode != "off" and topology == "routed":
            support = probe()
        why = refusal(mode, topology, support)
        self.mode = mode
        self.enabled = mode != "off" and why is None
        #: ``on`` only: why every port is refused (left closed).
        self.required_but_missing = why if mode == "on" else None
        self._applied: str | None = None
        if mode == "auto" and why is not None:
            log.warning("%s: left out (--flowtable auto)", why)

    def refused(self, desired: HostFilter) -> dict[str, str]:
        """Port id → why, for every port when the flowtable is required but missing."""
        if self.required_but_missing is None:
            return {}
        return {port.port_id: self.required_but_missing for port in desired.ports}

    def sync(self, executor: NftablesExecutor, devices: Iterable[str]) -> None:
        """Make table ``inet secfw_flow`` list ``devices`` (the host's taps that
        exist); nothing when disabled or unchanged since the last call."""
        if not self.enabled:
            return
        text = render_flowtable(devices)
        if text != self._applied:
            executor.apply_text(text)
            self._applied = text

    def remove(self, executor: NftablesExecutor) -> None:
        """Delete table ``inet secfw_flow`` (absent is not an error)."""
        executor.apply_text(render_flowtable(()))
        self._applied = None

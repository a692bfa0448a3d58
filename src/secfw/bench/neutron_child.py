"""One firewall driver's run of the Neutron bench scenario, in a process of its own.

``ip netns exec NS python -m secfw.bench.neutron_child DRIVER RESULT [--listing]``
reads the workload (:meth:`~secfw.bench.neutron.Workload.to_json`) on stdin,
builds ``DRIVER`` (``secfw`` or ``neutron``) the way Neutron's L2 agent would on
a host, drives it through :func:`~secfw.bench.neutron.scenario`, summarises the
ruleset it left in the namespace and writes one JSON object to ``RESULT``.

The process runs *inside* the namespace and builds both drivers for "this host"
(Neutron's ``namespace=None``, secfw's ``netns=None``), as an agent does: every
iptables, ipset and nft command runs directly, not through ``ip netns exec``.

The process ends with :func:`os._exit`: Neutron's conntrack manager starts a
non-daemon worker thread with no way to stop it (``ip_conntrack.py``: "this
should have some kind of termination event"), so a normal exit would wait for
it forever — the "hang" an earlier in-process attempt ran into.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from secfw.agent.daemon import peak_rss_kb
from secfw.bench.common import Row
from secfw.bench.neutron import PROFILE_ENV, Workload, scenario

#: What Neutron's iptables manager names its chains after (argv[0], cut to 16
#: characters); the linuxbridge agent's, so chain names have their real length.
AGENT_BINARY = "neutron-linuxbridge-agent"


def neutron_driver(lock_dir: str) -> Any:
    """Neutron's IptablesFirewallDriver, configured as the L2 agent configures it.

    ``[securitygroup] enable_ipset = True`` (Neutron's default, stated), no root
    helper (this process is root) and privsep started the agent's way
    (``setup_privsep``), as a daemon. Without a root helper oslo.privsep would
    still prefix its daemon with ``sudo`` (its built-in default), so
    ``[privsep] helper_command`` names ``privsep-helper`` from this
    interpreter's bin directory (oslo.privsep appends the context and socket
    arguments). Every ``ipset``/``iptables-restore`` goes through that daemon, as
    on a real host.
    """
    sys.argv[0] = AGENT_BINARY  # read when iptables_manager is imported
    import neutron.privileged  # noqa: F401  (registers the [privsep] options)
    from neutron.conf.agent import common as agent_config
    from neutron.conf.agent import securitygroups_rpc as sg_config
    from oslo_config import cfg

    agent_config.register_root_helper(cfg.CONF)
    sg_config.register_securitygroups_opts(cfg.CONF)
    cfg.CONF([], project="neutron", default_config_files=[])
    cfg.CONF.set_override("enable_ipset", True, "SECURITYGROUP")
    cfg.CONF.set_override("root_helper", "", "AGENT")
    cfg.CONF.set_override("lock_path", lock_dir, "oslo_concurrency")
    cfg.CONF.set_override("helper_command",
                          str(Path(sys.executable).parent / "privsep-helper"), "privsep")
    agent_config.setup_privsep()
    from neutron.agent.linux.iptables_firewall import IptablesFirewallDriver

    return IptablesFirewallDriver()


def secfw_driver() -> Any:
    """secfw's driver as ``firewall_driver = secfw`` builds it (bridged, nftables)."""
    from secfw.neutron import SecfwFirewallDriver

    return SecfwFirewallDriver()


def _lines(*cmd: str) -> list[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    return done.stdout.splitlines()


def _taps(lines: list[str]) -> list[str]:
    """The tap names a ruleset's text mentions (as matches, set or map elements)."""
    return sorted({m for line in lines for m in re.findall(r"\btap[0-9A-Za-z_-]+", line)})


def listing(which: str) -> Row:
    """The chains, sets and taps the driver left in this namespace, read from the kernel."""
    if which == "neutron":
        saved = _lines("iptables-save", "-t", "filter")
        return {"chains": sorted(line[1:].split()[0] for line in saved
                                 if line.startswith(":")),
                "rules": sum(line.startswith("-A ") for line in saved),
                "sets": sorted(_lines("ipset", "list", "-n")), "taps": _taps(saved)}
    ruleset = json.loads("\n".join(_lines("nft", "-j", "list", "ruleset")))["nftables"]
    return {"chains": sorted(o["chain"]["name"] for o in ruleset if "chain" in o),
            "rules": sum("rule" in o for o in ruleset),
            "sets": sorted(o["set"]["name"] for o in ruleset if "set" in o),
            "taps": _taps(_lines("nft", "list", "ruleset"))}


def run(which: str, load: Workload, with_names: bool) -> Row:
    """The scenario's figures, the ruleset's size (and names) and the peak RSS."""
    with tempfile.TemporaryDirectory(prefix="secfw-neutron-locks-") as locks:
        driver = neutron_driver(locks) if which == "neutron" else secfw_driver()
        stem = os.environ.get(PROFILE_ENV)
        row = scenario(driver, load) if not stem else _profiled(driver, load, Path(stem))
        found = listing(which)
    row["ruleset"] = found if with_names else {
        "chains": len(found["chains"]), "rules": found["rules"], "sets": len(found["sets"]),
        "taps": len(found["taps"])}
    # VmHWM, not ru_maxrss: that one includes the parent's size at fork (see
    # secfw.agent.daemon.peak_rss_kb)
    peak_kb = peak_rss_kb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row["peak_rss_mb"] = round(peak_kb / 1024, 1)
    if which == "secfw":
        row["transactions"] = driver.applies
    return row


def _profiled(driver: Any, load: Workload, stem: Path) -> Row:
    """:func:`scenario` with its full sync under the profiler; the profile
    written as :mod:`secfw.bench.profiled` writes it (``stem``.pstats, .json)."""
    from secfw.bench import profiles

    session = profiles.Session()
    row = scenario(driver, load, session.call)
    session.profiler.dump_stats(str(stem.with_suffix(".pstats")))
    measured = session.measured
    stem.with_suffix(".json").write_text(json.dumps(
        {"wall_s": measured.wall_s, "nft_sys_s": measured.nft_sys_s, "gc_s": measured.gc_s}),
        encoding="utf-8")
    return row


def main(argv: list[str]) -> None:
    """Run, write the result (or the error) to the result file, and _exit."""
    which, result = argv[0], Path(argv[1])
    try:
        row = run(which, Workload.from_json(sys.stdin.read()), "--listing" in argv[2:])
    except Exception as exc:  # reported by the parent, never raised there
        row = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    result.write_text(json.dumps(row) + "\n", encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see the module doc: Neutron leaves a thread that never ends


if __name__ == "__main__":
    main(sys.argv[1:])

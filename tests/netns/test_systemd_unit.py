"""The shipped systemd unit gives the agent what it needs, and no more is assumed.

``packaging/secfw-agent.service`` runs the agent as root with a capability bounding
set, ``ProtectSystem=strict`` (every mount read-only but the unit's writable paths)
and ``ProtectKernelTunables=yes`` (``/proc/sys`` and ``/sys`` read-only). PID 1 here
is not systemd, so :func:`sandbox_script` rebuilds that environment for one command,
from the settings parsed out of the unit file itself:

* a private mount namespace (``unshare --mount``, private propagation: nothing
  leaks to the host) with a fresh tmpfs on ``/run``, as on a booted host, where
  nothing has created ``/run/xtables.lock`` yet;
* the unit's ``ExecStartPre=+…`` commands, which systemd runs outside the sandbox;
* ``PrivateDevices=yes``: a ``/dev`` with only the pseudo devices (null, zero, full,
  random, urandom, tty), ``shm`` and ``pts``;
* every mount remounted read-only except ``/proc`` and ``/dev`` (``ProtectSystem=
  strict`` leaves those API trees to other options), ``/proc/sys`` made read-only
  (``ProtectKernelTunables=yes``), then ``ReadWritePaths=``, ``RuntimeDirectory=``
  and the store's directory (the stand-in for ``StateDirectory=``) writable again;
* ``setpriv``: no-new-privs, the bounding set = ``CapabilityBoundingSet=`` and the
  inheritable/ambient sets = ``AmbientCapabilities=``. The agent runs as root (the
  unit sets no ``User=``), so after ``execve`` its permitted and effective sets are
  exactly the bounding set (capabilities(7), "Transformation of capabilities during
  execve()"), as under systemd.

Not emulated: the seccomp filters (``RestrictAddressFamilies=``, ``RestrictNamespaces=``,
…), ``PrivateTmp=`` and ``ProtectHome=``.

The agent then runs ``--once`` in the lab's host namespace for each backend and
topology, and for iptables also with the legacy variant, and real packets judge
the filter it installed; the daemon runs too, with the unit's environment and a
``NOTIFY_SOCKET``, and must have its filter in place once it says ``READY=1``.
On a bridged host br_netfilter's switches start off (as some distributions ship
them), so the agent has to write them.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts, setpriv)"),
]

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "secfw-agent.service"
EXT = "external"
BRIDGE_NF = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")


# --------------------------------------------------------------------------- the unit


def service_settings(text: str) -> dict[str, list[str]]:
    """The ``[Service]`` section of a unit: each key's assignments in order.

    Comments (``#``/``;``), line continuations (a trailing ``\\``) and repeated keys
    are handled as systemd.syntax(7) says; an empty assignment resets the key's list.
    """
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            values = settings.setdefault(key.strip(), [])
            if value.strip():
                values.append(value.strip())
            else:
                values.clear()
    return settings


def capabilities(settings: dict[str, list[str]], key: str) -> list[str]:
    """``setpriv`` names (``net_admin``) of a capability setting (lists are ORed).

    An inverted list (``~CAP_…``) is not supported by this emulation: the test fails
    rather than guess."""
    names: list[str] = []
    for value in settings.get(key, []):
        assert not value.startswith("~"), f"{key}={value}: inverted lists not emulated"
        names += [word.removeprefix("CAP_").lower() for word in value.split()]
    return names


def privileged_pre_commands(settings: dict[str, list[str]]) -> list[list[str]]:
    """The ``ExecStartPre=+…`` command lines (run with full privileges, unsandboxed).

    Any other ExecStartPre, or one with specifiers or variables, is not emulated and
    fails the test."""
    commands = []
    for value in settings.get("ExecStartPre", []):
        assert value.startswith("+") and not any(c in value for c in "%$"), (
            f"ExecStartPre={value}: only plain '+' commands are emulated")
        commands.append(shlex.split(value.lstrip("+-")))
    return commands


def writable_paths(settings: dict[str, list[str]]) -> list[tuple[str, bool]]:
    """``(path, optional)`` of each ``ReadWritePaths=`` entry (``-``: may be absent)."""
    paths = []
    for value in settings.get("ReadWritePaths", []):
        for word in value.split():
            paths.append((word.lstrip("-"), word.startswith("-")))
    return paths


# --------------------------------------------------------------------------- the sandbox


#: The device nodes systemd's PrivateDevices=yes keeps (systemd.exec(5)).
PSEUDO_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def private_dev() -> list[str]:
    """Shell steps that replace ``/dev`` with one holding only :data:`PSEUDO_DEVICES`
    (bound from the real ones), ``shm``, ``pts`` and the fd links; built aside in
    ``/run`` (the fresh tmpfs) and moved over ``/dev``."""
    steps = ["mkdir /run/.dev", "mount -t tmpfs -o mode=0755,nosuid,noexec secfw-dev /run/.dev"]
    for name in PSEUDO_DEVICES:
        steps.append(f"touch /run/.dev/{name} && mount --bind /dev/{name} /run/.dev/{name}")
    steps += ["mkdir /run/.dev/shm /run/.dev/pts",
              "mount -t tmpfs -o mode=1777,nosuid,nodev secfw-shm /run/.dev/shm",
              "mount --bind /dev/pts /run/.dev/pts",
              "ln -s /proc/self/fd /run/.dev/fd",
              *(f"ln -s /proc/self/fd/{n} /run/.dev/{name}"
                for n, name in enumerate(("stdin", "stdout", "stderr"))),
              "mount --move /run/.dev /dev", "rmdir /run/.dev"]
    return steps


def sandbox_script(settings: dict[str, list[str]], state_dir: Path) -> str:
    """A ``sh`` script that sets up the unit's file system view (module docstring)
    in the mount namespace it runs in, then execs ``setpriv … "$@"``."""
    assert settings.get("ProtectSystem") == ["strict"], settings.get("ProtectSystem")
    assert settings.get("ProtectKernelTunables") == ["yes"]
    assert "User" not in settings, "the emulation runs the agent as root, as the unit does"
    runtime = [f"/run/{name}" for value in settings.get("RuntimeDirectory", [])
               for name in value.split()]
    steps = ["mount -t tmpfs -o mode=0755,nosuid,nodev secfw-run /run"]
    steps += [shlex.join(command) for command in privileged_pre_commands(settings)]
    steps += [f"mkdir -p {shlex.quote(path)}" for path in runtime]
    if settings.get("PrivateDevices") == ["yes"]:
        steps += private_dev()
    steps.append(
        # ProtectSystem=strict: every mount but the /proc and /dev trees read-only
        # (mounts hidden under the new /run are no mount points any more: skipped)
        "for mp in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do"
        ' case "$mp" in /proc|/proc/*|/dev|/dev/*) continue;; esac;'
        ' if mountpoint -q "$mp"; then mount -o remount,bind,ro "$mp"; fi; done')
    steps.append("mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys")
    writable = [(path, False) for path in (*runtime, str(state_dir))]
    for path, optional in [*writable, *writable_paths(settings)]:
        bind = (f"mount --bind {shlex.quote(path)} {shlex.quote(path)}"
                f" && mount -o remount,bind,rw {shlex.quote(path)}")
        steps.append(f"if [ -e {shlex.quote(path)} ]; then {bind}; fi" if optional else bind)
    bounding = ",".join(["-all", *(f"+{c}" for c in capabilities(
        settings, "CapabilityBoundingSet"))])
    ambient = ",".join(["-all", *(f"+{c}" for c in capabilities(
        settings, "AmbientCapabilities"))])
    no_new_privs = ["--no-new-privs"] if settings.get("NoNewPrivileges") == ["yes"] else []
    steps.append(shlex.join(["exec", "setpriv", *no_new_privs, "--bounding-set", bounding,
                             "--inh-caps", ambient, "--ambient-caps", ambient, "--"])
                 + ' "$@"')
    return "\n".join(["set -eu", *steps])


def unit_environment(settings: dict[str, list[str]]) -> dict[str, str]:
    """The unit's ``Environment=`` variables, except those with specifiers (``%H``:
    the tests pass ``--host`` instead)."""
    variables = {}
    for value in settings.get("Environment", []):
        for word in shlex.split(value):
            name, _, setting = word.partition("=")
            if "%" not in setting:
                variables[name] = setting
    return variables


def sandboxed_agent(env, unit: Path, *args: str) -> list[str]:
    """The command line that runs ``secfw agent ARGS`` for ``env``'s host as the
    unit would, in the lab's host namespace (environment: :func:`unit_environment`)."""
    settings = service_settings(unit.read_text())
    store_dir = Path(env.store_url.removeprefix("sqlite:///")).parent
    agent = [env.helpers.secfw_command(), "--store", env.store_url, "agent", "--host",
             env.host, *env.agent_args, *args]
    return ["ip", "netns", "exec", env.lab.host_ns, "unshare", "--mount",
            "--propagation", "private", "sh", "-c", sandbox_script(settings, store_dir),
            "sandbox", *agent]


# --------------------------------------------------------------------------- the tests


def web_instance(env) -> None:
    """One instance, ``web``, whose only group allows tcp/80 from anywhere; the lab
    is brought up without any agent (then nothing filters)."""
    from secfw.lab.demo import lab_ports

    env.api.net_create("p", "net-a", "10.1.0.0/24")
    env.api.secgroup_create("p", "http", "web only")
    env.api.secgroup_add_rule("p", "http", "tcp", "80", "80", "0.0.0.0/0")
    env.boot("web", ["http"], "net-a")
    env.lab.up(lab_ports(env.api.snapshot(), env.host))


def bridge_netfilter_off(env) -> None:
    """br_netfilter's switches off in the host namespace (the agent must turn them on)."""
    for key in BRIDGE_NF:
        env.helpers.run("ip", "netns", "exec", env.lab.host_ns, "sysctl", "-qw", f"{key}=0")


def bridge_netfilter_values(env) -> set[str]:
    out = env.helpers.run("ip", "netns", "exec", env.lab.host_ns, "sysctl", "-n",
                          *BRIDGE_NF).stdout
    return set(out.split())


def run_under_unit(env, unit: Path = UNIT) -> None:
    """Run the agent once as the unit would and check it filters with real packets:
    tcp/80 (allowed) passes, tcp/22 (not allowed) is dropped."""
    assert env.tcp(EXT, "web", 22), "the lab alone must let tcp/22 in (else no proof)"
    if env.topology == "bridged":
        bridge_netfilter_off(env)
    done = env.helpers.run(*sandboxed_agent(env, unit, "--once"), check=False,
                           env=unit_environment(service_settings(unit.read_text())))
    assert done.returncode == 0, f"agent failed under the unit's sandbox: {done.stderr}"
    assert "msg=sync " in done.stderr, done.stderr
    if env.topology == "bridged":
        assert bridge_netfilter_values(env) == {"1"}
    assert env.tcp(EXT, "web", 80)
    assert not env.tcp(EXT, "web", 22)


def test_agent_filters_with_exactly_the_units_privileges(env):
    """Each backend × topology (iptables: the system's default variant): the agent run
    with the unit's capabilities and read-only file system installs a filter that
    passes allowed and drops disallowed traffic."""
    web_instance(env)
    run_under_unit(env)
    if env.backend_name == "iptables":  # nothing in either variant: the system default
        version = env.helpers.run("iptables", "-V").stdout
        assert env.iptables_variant() == ("legacy" if "legacy" in version else "nft")


@pytest.mark.backends("iptables", reason="the legacy variant is iptables' own")
def test_iptables_legacy_filters_with_exactly_the_units_privileges(env):
    """iptables-legacy (chosen because the host's legacy tables already hold rules,
    as kube-proxy's detection does) under the unit: raw socket, xtables lock on a
    read-only /run; the filter lands in the legacy tables and filters."""
    web_instance(env)
    run = env.helpers.run
    host = env.lab.host_ns
    run("ip", "netns", "exec", host, "iptables-legacy", "-w", "-N", "operator-rules")
    run("ip", "netns", "exec", host, "iptables-legacy", "-w", "-A", "operator-rules",
        "-j", "RETURN")
    run_under_unit(env)
    assert env.iptables_variant() == "legacy"


def forget_neighbours(env) -> None:
    """Flush the neighbour caches of the lab's namespaces on the path to ``web``.

    While the closed filter held, ARP to and from the instance was dropped: the
    entries are left INCOMPLETE/FAILED, and the kernel sends its next request only
    after the retransmit time (1 s, ip-neighbour(8)), longer than a probe waits. A
    flush makes the next packet resolve at once, so the probe sees the filter only.
    """
    namespaces = {env.lab.host_ns, env.lab.external_ns, env.ns("web")}
    if env.topology == "bridged":
        namespaces.add(env.lab.router_ns)
    for ns in sorted(namespaces):
        env.helpers.run("ip", "-n", ns, "neigh", "flush", "all")


def wait_for_notification(notify: socket.socket, line: str, seconds: float = 60.0) -> str:
    """The first sd_notify datagram with ``line`` in it (a whole line, or a part of a
    ``STATUS=`` line); AssertionError with what came instead when none arrives
    within ``seconds`` (a bound on a hang, not a measurement)."""
    deadline = time.monotonic() + seconds
    seen: list[str] = []
    while (left := deadline - time.monotonic()) > 0:
        notify.settimeout(left)
        try:
            message = notify.recv(4096).decode()
        except TimeoutError:
            break
        if line in message.splitlines() or any(
                line in status for status in message.splitlines()
                if status.startswith("STATUS=")):
            return message
        seen.append(message)
    raise AssertionError(f"no {line!r} within {seconds} s; got {seen[-3:]}")


def test_agent_daemon_is_ready_only_with_the_filter_in_place(env, tmp_path):
    """The daemon itself (not ``--once``) under the unit: by its ``READY=1`` (which
    releases the units ordered after it) disallowed traffic is dropped, its first
    pass then puts the groups' ruleset in place, and SIGTERM ends
    it with status 0 and no error logged: its status reports go to the read-only
    /run's ``RuntimeDirectory``, metrics (the unit's address) and link events work
    with the unit's capabilities."""
    web_instance(env)
    if env.topology == "bridged":
        bridge_netfilter_off(env)
    notify_path = tmp_path / "notify"
    log_path = tmp_path / "agent.log"
    settings = service_settings(UNIT.read_text())
    environment = {**os.environ, **unit_environment(settings),
                   "NOTIFY_SOCKET": str(notify_path)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, \
            log_path.open("w") as log:
        notify.bind(str(notify_path))
        agent = subprocess.Popen(sandboxed_agent(env, UNIT), stdout=subprocess.DEVNULL,
                                 stderr=log, env=environment)
        try:
            # READY=1 (units ordered after it start now): never while taps could
            # still be reached unfiltered — the closed filter or a ruleset is in place
            wait_for_notification(notify, "READY=1")
            assert not env.tcp(EXT, "web", 22)
            wait_for_notification(notify, "kernel holds ruleset")
            forget_neighbours(env)
            assert env.tcp(EXT, "web", 80)
            assert not env.tcp(EXT, "web", 22)
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=60) == 0, log_path.read_text()
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait(timeout=10)
    lines = log_path.read_text().splitlines()
    assert not [line for line in lines if "level=error" in line], lines
    assert any("msg=started" in line and "metrics=127.0.0.1:" in line for line in lines), lines

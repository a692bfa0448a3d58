"""Running ``secfw agent`` as an operator does, for the namespace tests.

:class:`AgentProcess` starts ``ip netns exec HOSTNS secfw agent --host H …`` and
parses its logfmt stderr; :func:`poll` is the bounded wait every such test uses
(no assertion is timed: a wait that exceeds its limit fails, and the latency it
observed is printed). ``web_cloud`` / ``filtered_as_expected`` are the small
cloud most agent tests judge with real packets. The fixtures ``env`` and
``agents`` (conftest.py) hand these out.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secfw.agent.status import read_report, status_path
from secfw.api import Api
from secfw.lab import netns_tools
from secfw.lab.demo import lab_ports

EXT = "external"
#: Seconds any wait may take before the test fails. Only a bound that keeps a broken
#: test finite — a wait ends as soon as its event is seen — so it is generous: under
#: ``make test`` (3 xdist workers on 2 cores, other jobs beside them) an agent took
#: more than 10 s from exec to its first log line (Python start-up and imports).
POLL_LIMIT = 60.0
RESYNC = "0.5"
MEASURED: dict[str, float] = {}



# --------------------------------------------------------------------------- helpers


def poll(check: Callable[[], Any], what: str, limit: float = POLL_LIMIT) -> float:
    """Seconds until ``check()`` is truthy; fails after ``limit`` seconds."""
    started = time.monotonic()
    while not check():
        elapsed = time.monotonic() - started
        assert elapsed < limit, f"not within {limit} s: {what}"
        time.sleep(0.02)
    return time.monotonic() - started


def measured(name: str, seconds: float) -> None:
    MEASURED[name] = seconds
    print(f"\nMEASURED {name}: {seconds * 1000:.0f} ms")


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> dict[str, str]:
    """``k=v k="v w"`` → dict (quotes removed, escapes kept)."""
    return {k: v[1:-1] if v.startswith('"') else v for k, v in _FIELD.findall(line)}


def log_time(event: dict[str, str]) -> float:
    """The Unix time of a log event's ``ts``."""
    stamp = datetime.strptime(event["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=UTC).timestamp()


class AgentProcess:
    """``secfw agent`` in the host namespace (optionally without DAC override, so
    that file permissions bind it), its stderr parsed as logfmt events."""

    def __init__(self, env: Any, state_dir: Path, *args: str, drop_dac: bool = False,
                 extra_env: dict[str, str] | None = None, store_url: str | None = None) -> None:
        command = ["ip", "netns", "exec", env.lab.host_ns]
        if drop_dac:  # root without CAP_DAC_OVERRIDE: chmod 000 makes the store unreadable
            command += ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
        command += [env.helpers.secfw_command(), "--store", store_url or env.store_url, "agent",
                    "--host", env.host, *env.agent_args, "--state-dir", str(state_dir),
                    "--resync-interval", RESYNC,
                    "--poll-interval", "0.05", "--backoff-max", "1", *args]
        self.env, self.state_dir = env, state_dir
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, **(extra_env or {})})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def events(self, msg: str) -> list[dict[str, str]]:
        return [e for e in map(parse_logfmt, list(self.lines)) if e.get("msg") == msg]

    def wait_event(self, msg: str, count: int = 1, **match: str) -> dict[str, str]:
        """The ``count``-th event ``msg`` whose fields include ``match``."""

        def found() -> list[dict[str, str]]:
            assert self.proc.poll() is None, f"agent exited: {self.lines}"
            return [e for e in self.events(msg)
                    if all(e.get(k) == v for k, v in match.items())]

        poll(lambda: len(found()) >= count, f"{count} x {msg} {match}: {self.lines[-20:]}")
        return found()[count - 1]

    def status(self) -> dict[str, Any]:
        """The agent's report (waiting for the first one: it follows the first log line)."""
        path = status_path(self.state_dir, self.env.host)
        poll(path.exists, f"a status report in {self.state_dir}: {self.lines[-5:]}")
        return read_report(self.state_dir, self.env.host).as_dict()

    def wait_status(self, **expected: Any) -> dict[str, Any]:
        """The agent's report once its fields include ``expected``: the report is
        written after the pass it describes (after the kernel commit and the log
        line), so a check right after seeing the kernel change must wait for it."""
        poll(lambda: all(self.status().get(k) == v for k, v in expected.items()),
             f"status with {expected}: {self.lines[-5:]}")
        return self.status()

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=POLL_LIMIT)
        self.finish_reading()
        return code

    def finish_reading(self) -> None:
        """Once the process has exited: wait until every line it wrote is in
        ``lines`` (the reader thread ends at EOF), so a check of its last events
        cannot run before the reader got to them."""
        self._reader.join(timeout=POLL_LIMIT)
        assert not self._reader.is_alive(), "the agent's stderr was not closed"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()


def web_cloud(env: Any, *, lab: bool = True) -> None:
    """``web`` (global_http: tcp 80 and 443 from anywhere) on net-a, and ``db``
    (ssh from global_http) on net-b; the lab brought up unless ``lab`` is false, no
    agent yet."""
    api = env.api
    api.net_create("p", "net-a", "10.1.0.0/24")
    api.net_create("p", "net-b", "10.2.0.0/24")
    api.secgroup_create("p", "global_http", "web")
    api.secgroup_add_rule("p", "global_http", "tcp", "80", "80", "0.0.0.0/0")
    api.secgroup_add_rule("p", "global_http", "tcp", "443", "443", "0.0.0.0/0")
    api.secgroup_create("p", "cluster", "ssh from web")
    api.secgroup_add_group_rule("p", "cluster", "global_http", "tcp", "22", "22")
    env.boot("web", ["global_http"], "net-a")
    env.boot("db", ["cluster"], "net-b")
    if lab:
        lab_sync(env)


def lab_sync(env: Any, api: Api | None = None) -> None:
    env.lab.up(lab_ports((api or env.api).snapshot(), env.host))


def cached_tcp(env: Any, src: str, dst: str, port: int) -> bool:
    """Whether a TCP connection ``src`` → ``dst:port`` (web, db or external) is
    accepted. Namespaces and addresses are looked up once per test (cached on
    ``env``), so this works while the store is unreadable or unloadable."""
    if not hasattr(env, "endpoints"):
        env.endpoints = {n: (env.ns(n), env.ip(n)) for n in ("web", "db", EXT)}
    ends = env.endpoints
    with netns_tools.listen(ends[dst][0], "tcp", port):
        return netns_tools.tcp_connect(ends[src][0], ends[dst][1], port, 0.3)


def filtered_as_expected(env: Any) -> bool:
    """web:80 open from outside, web:22 closed, db:22 open from web only
    (:func:`cached_tcp`: works while the store is unreadable)."""
    return (cached_tcp(env, EXT, "web", 80) and not cached_tcp(env, EXT, "web", 22)
            and cached_tcp(env, "web", "db", 22) and not cached_tcp(env, EXT, "db", 22))


def table_exists(env: Any) -> bool:
    """secfw's table (nftables) or chains (iptables) exist."""
    return bool(env.secfw_present())

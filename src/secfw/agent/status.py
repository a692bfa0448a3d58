"""The agent's status report: a JSON file the running agent rewrites, ``status`` reads.

One file per host in the state directory (``--state-dir``, default
``/run/secfw``): ``agent-<first 16 hex digits of SHA-256(host)>.json``. Host
names are user data, so they never reach a path. The agent writes the file
after every pass and at least every ``heartbeat`` seconds while it runs, and a
last time with ``running: false`` when it stops cleanly; each write is atomic
(a temporary file in the same directory, then ``rename(2)``), so a reader never
sees half a report.

:func:`read_report` classifies what it finds, so ``secfw agent status`` can say
clearly what is going on:

======== ==============================================================
state    meaning
======== ==============================================================
healthy  a running agent's last pass succeeded
unhealthy a running agent's last pass failed (it keeps the last ruleset)
stopped  the agent exited cleanly (SIGTERM); the ruleset stays in force
gone     the process that wrote the report no longer exists (killed, crashed)
stale    no heartbeat for longer than expected: the agent is hung or slow
======== ==============================================================

No file at all is :class:`~secfw.errors.NotFoundError` ("no agent has reported").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secfw.agent.daemon import log_event
from secfw.agent.loop import LoopObserver
from secfw.errors import NotFoundError, StoreError

if TYPE_CHECKING:
    from secfw.agent.loop import AgentStatus

log = logging.getLogger("secfw.agent")

DEFAULT_STATE_DIR = "/run/secfw"
VERSION = 1
#: Slack added to three heartbeats before a report counts as stale: a big full
#: sync (seconds) or a store busy timeout (30 s) delays the next write.
STALE_SLACK = 30.0


def status_path(state_dir: Path | str, host: str) -> Path:
    """Where the report of ``host`` lives in ``state_dir``."""
    digest = hashlib.sha256(host.encode()).hexdigest()[:16]
    return Path(state_dir) / f"agent-{digest}.json"


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Replace ``path`` by ``report`` atomically (temp file + rename, same directory).

    Creates the directory (mode 0755) if needed. Raises OSError on failure; the
    previous report, if any, is then left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(prefix=".agent-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(report, handle, indent=1, sort_keys=True)
            handle.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class Report:
    """A report as read back: the document, its classified state and age (seconds)."""

    state: str
    age: float
    doc: dict[str, Any]
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """The document plus ``state``, ``state_reason`` and ``age_seconds``."""
        return {"state": self.state, "state_reason": self.reason,
                "age_seconds": round(self.age, 1), **self.doc}


def read_report(state_dir: Path | str, host: str, now: float | None = None) -> Report:
    """Read and classify the report of ``host`` (see the module docstring).

    Raises NotFoundError when no agent has reported for ``host`` in ``state_dir``,
    StoreError when the file exists but cannot be read or is not a report.
    """
    path = status_path(state_dir, host)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise NotFoundError(
            f"no agent has reported for host {host!r} (no {path}; is it running, "
            f"with --state-dir {state_dir}?)") from exc
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read agent report {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != VERSION or doc.get("host") != host:
        raise StoreError(f"{path} is not a version {VERSION} agent report for host {host!r}")
    age = (time.time() if now is None else now) - float(doc.get("written_at", 0))
    state, reason = classify(doc, age)
    return Report(state, age, doc, reason)


def classify(doc: dict[str, Any], age: float) -> tuple[str, str]:
    """``(state, reason)`` of a report ``age`` seconds old (module docstring's table)."""
    if not doc.get("running"):
        return "stopped", "the agent exited cleanly; the last ruleset stays in force"
    if not _alive(doc):
        return "gone", (f"agent process {doc.get('pid')} no longer exists (killed or crashed); "
                        "the last ruleset stays in force")
    limit = 3 * float(doc.get("heartbeat_interval", 60)) + STALE_SLACK
    if age > limit:
        return "stale", f"no report for {age:.0f} s (expected one every " \
                        f"{doc.get('heartbeat_interval')} s): the agent may be hung"
    if doc.get("healthy"):
        return "healthy", "the last pass succeeded"
    return "unhealthy", f"the last pass failed: {doc.get('last_error')}"


def _alive(doc: dict[str, Any]) -> bool:
    """Whether the writer process still exists; True when that cannot be told (the
    report comes from another PID namespace, where its pid means nothing here)."""
    pid = doc.get("pid")
    if not isinstance(pid, int) or pid <= 0 or doc.get("pid_ns") != pid_namespace():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_namespace() -> str:
    """This process's PID namespace (``pid:[4026531836]``), "" if unknown."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


class StatusWriter(LoopObserver):
    """A loop observer that keeps the report file of one host current.

    A failed write is logged once (and its recovery once), never raised: the
    report is for people, the filter matters more.
    """

    def __init__(self, state_dir: Path | str, host: str) -> None:
        self.host = host
        self.path = status_path(state_dir, host)
        self._failing = False

    def on_status(self, status: AgentStatus) -> None:
        """Write the report of a running agent."""
        self._write(status, running=True)

    def on_stop(self, status: AgentStatus) -> None:
        """Write the final report: the agent stopped cleanly."""
        self._write(status, running=False)

    def _write(self, status: AgentStatus, running: bool) -> None:
        report = {
            "version": VERSION,
            "host": self.host,
            "pid": os.getpid(),
            "pid_ns": pid_namespace(),
            "running": running,
            "written_at": time.time(),
            **status.as_dict(),
        }
        try:
            write_report(self.path, report)
        except OSError as exc:
            if not self._failing:
                log_event(log, logging.ERROR, "status_write_failed", path=str(self.path),
                          error=exc.strerror or str(exc))
            self._failing = True
            return
        if self._failing:
            log_event(log, logging.INFO, "status_write_recovered", path=str(self.path))
        self._failing = False

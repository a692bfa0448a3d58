"""Plumbing for running a secfw process as a service: logfmt logs and sd_notify.

* :class:`LogfmtFormatter` — one ``key=value`` line per event on stderr, which
  journald stores as is (``journalctl -u secfw-agent``) and log shippers parse
  without a grammar. An event is a short name (``msg=sync``) plus fields passed
  as ``extra={"fields": {...}}`` (see :func:`log_event`). Values are quoted when
  they need it and never contain a raw newline, so an event is always one line,
  tracebacks included.
* :func:`sd_notify` — the systemd readiness protocol (sd_notify(3)) without
  libsystemd: one datagram to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``.
  Outside systemd (no variable) it does nothing.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from typing import Any

#: A value that needs quotes in logfmt: empty, or with a space, quote, ``=`` or a
#: control character in it.
_NEEDS_QUOTES = re.compile(r'^$|[\s"=\\\x00-\x1f\x7f]')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPED = re.compile(r'[\\"\x00-\x1f\x7f]')


def logfmt_value(value: Any) -> str:
    """``value`` as one logfmt token: bare when safe, else double-quoted and escaped.

    Lists and tuples become comma-separated; None becomes the empty string.
    """
    if value is None:
        text = ""
    elif isinstance(value, list | tuple | set | frozenset):
        text = ",".join(str(item) for item in value)
    else:
        text = str(value)
    if not _NEEDS_QUOTES.search(text):
        return text
    escaped = _ESCAPED.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"), text)
    return f'"{escaped}"'


def logfmt(fields: dict[str, Any]) -> str:
    """``key=value`` pairs in the given order, separated by spaces."""
    return " ".join(f"{key}={logfmt_value(value)}" for key, value in fields.items())


class LogfmtFormatter(logging.Formatter):
    """``ts=… level=… logger=… msg=EVENT k=v …`` — one line per record (module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        head: dict[str, Any] = {
            "ts": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            head.update(fields)
        if record.exc_info:
            head["traceback"] = self.formatException(record.exc_info)
        return logfmt(head)


def log_event(logger: logging.Logger, level: int, event: str, /, **fields: Any) -> None:
    """Log ``event`` (a short word, e.g. ``sync``) with structured ``fields``."""
    logger.log(level, event, extra={"fields": fields})


def peak_rss_kb() -> int | None:
    """This process's peak resident set size in KiB (``VmHWM`` of
    /proc/self/status, proc(5)); None where there is no such file.

    Not ``getrusage``'s ``ru_maxrss``: exec(2) folds the *old* address space's
    peak into it (``setmax_mm_hiwater_rss`` in fs/exec.c), and a child that a
    big process forked (or vforked) starts with the parent's pages mapped, so
    a small agent started by a 700 MB benchmark reports 700 MB there. VmHWM
    belongs to the address space exec created."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def configure_logging(level: int = logging.INFO) -> None:
    """Send the ``secfw`` loggers to stderr in logfmt (journald captures stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("secfw")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd; False when not run by systemd.

    ``$NOTIFY_SOCKET`` is a filesystem path, or an abstract socket name when it
    starts with ``@`` (sd_notify(3)). A send failure is reported as False, never
    raised: notification is best effort and must not stop the daemon.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings systemd expects (half of ``WatchdogSec``),
    or None when the watchdog is off or meant for another process (sd_watchdog_enabled(3))."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6

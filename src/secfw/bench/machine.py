"""What the benchmark ran on: recorded in the JSON and Markdown reports."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

from secfw.bench.common import Row

REPO = Path(__file__).resolve().parents[3]


def _first_line(*command: str, cwd: Path | None = None) -> str:
    """First line of a command's output, or "unknown" when it cannot run."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False,
                              cwd=cwd)
    except OSError:
        return "unknown"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else "unknown"


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _source_revision() -> Row:
    """The git commit of the code measured, and whether src/ had local changes."""
    commit = _first_line("git", "rev-parse", "--short", "HEAD", cwd=REPO)
    status = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True,
                            text=True, timeout=10, check=False, cwd=REPO)
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return {"commit": commit, "src_modified": dirty}


def machine_info() -> Row:
    """Cores, kernel, nft / iperf3 / Python versions, memory, code revision and date."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cores": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "kernel": platform.release(),
        "nft": _first_line("nft", "--version"),
        "iperf3": _first_line("iperf3", "--version"),
        "python": platform.python_version(),
        "source": _source_revision(),
    }

"""The shipped systemd unit is one systemd accepts without a single complaint.

``systemd-analyze verify`` loads a unit as PID 1 would and prints every problem
(unknown keys, unparsable values, missing executables) on stderr, yet exits 0 for
most of them, so the test fails on any line that names the unit. The unit runs
``/usr/local/bin/secfw``, which a test machine need not have: the copy verified
here runs this environment's ``secfw`` instead; nothing else is changed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "packaging" / "secfw-agent.service"
INSTALLED_SECFW = "/usr/local/bin/secfw"


def secfw_script() -> str:
    """This environment's ``secfw`` console script (the venv's, else PATH's)."""
    candidate = Path(sys.executable).parent / "secfw"
    found = str(candidate) if candidate.exists() else shutil.which("secfw")
    assert found, "no secfw script: run `make venv`"
    return found


def verify_complaints(text: str, directory: Path, name: str = UNIT.name) -> list[str]:
    """The lines ``systemd-analyze verify`` prints about the unit ``text`` (saved as
    ``name``, default ``secfw-agent.service``, in ``directory``)."""
    unit = directory / name
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)
    lines = (done.stdout + done.stderr).splitlines()
    complaints = [line for line in lines if name in line]
    if done.returncode != 0 and not complaints:
        complaints = lines or [f"exit status {done.returncode}"]
    return complaints


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="needs systemd-analyze (package systemd; `make deps` installs it)")
def test_metadata_unit_passes_systemd_analyze_verify(tmp_path):
    """The metadata service's unit, checked the same way."""
    unit = UNIT.with_name("secfw-metadata.service")
    text = unit.read_text()
    assert f"ExecStart={INSTALLED_SECFW} metadata serve " in text
    runnable = text.replace(f"ExecStart={INSTALLED_SECFW} ", f"ExecStart={secfw_script()} ")
    assert verify_complaints(runnable, tmp_path, unit.name) == []
    broken = runnable.replace("\nNoNewPrivileges=yes\n", "\nNoNewPrivileges=yes\nNoSuchKey=1\n")
    assert any("NoSuchKey" in line for line in verify_complaints(broken, tmp_path, unit.name))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="needs systemd-analyze (package systemd; `make deps` installs it)")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    """The unit, with ExecStart pointing at an existing secfw, verifies cleanly; the
    same check does report a broken copy (so it can fail)."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_SECFW} " in text
    runnable = text.replace(f"ExecStart={INSTALLED_SECFW} ", f"ExecStart={secfw_script()} ")
    assert verify_complaints(runnable, tmp_path) == []

    broken = runnable.replace("\nNoNewPrivileges=yes\n", "\nNoNewPrivileges=yes\nNoSuchKey=1\n")
    assert broken != runnable
    assert any("NoSuchKey" in line for line in verify_complaints(broken, tmp_path))

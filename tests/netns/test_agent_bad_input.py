"""``secfw agent`` refuses a bad ``--state-dir`` before it touches anything:
one line ``secfw: error: …`` on stderr, a non-zero exit, nothing on stdout —
and the namespace's ruleset exactly as it was (here: empty). A real process in
a scratch namespace: an agent that does start (it did, before the directory was
checked) must not reach the machine's own ruleset. The options refused before
any kernel access are checked in process (tests/test_agent_options.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from secfw.api import Api
from secfw.bench.control import secfw_command
from secfw.store import open_store

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)"),
]

#: What a bad invocation may take at most; an agent that starts (the daemon)
#: instead of refusing would run until then.
TIMEOUT_S = 30


def refused(ns: str, store_url: str, state_dir: Path, *args: str) -> str:
    """Run ``secfw --store URL agent --host h1 ARGS`` in ``ns`` and check the
    contract: non-zero exit, nothing on stdout, one ``secfw: error:`` line (its
    text returned), the namespace's ruleset still empty."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECFW_")}
    env["SECFW_STATE_DIR"] = str(state_dir)
    command = ["ip", "netns", "exec", ns, secfw_command(), "--store", store_url,
               "agent", "--host", "h1", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
                          check=False)
    assert done.returncode != 0, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("secfw: error: "), done.stderr
    ruleset = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
                             capture_output=True, text=True, timeout=TIMEOUT_S, check=True)
    assert ruleset.stdout.strip() == ""
    return lines[0]


#: Agent arguments with a bad --state-dir; ``{file}``: a plain file.
CASES = {
    "a file": ["--once", "--state-dir", "{file}"],
    "under a file": ["--once", "--state-dir", "{file}/sub"],
    "empty": ["--once", "--state-dir", ""],
    "a file, daemon": ["--state-dir", "{file}"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_state_dir_is_one_line_and_changes_nothing(
        case: str, tmp_path: Path, scratch_ns: Callable[[], str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x", encoding="utf-8")
    store_url = f"sqlite:///{tmp_path / 'secfw.db'}"
    Api(open_store(store_url)).store.close()
    args = [arg.format(file=afile) for arg in CASES[case]]
    assert "--state-dir" in refused(scratch_ns(), store_url, tmp_path / "state", *args)


@pytest.mark.parametrize("form", ["sqlite:///{dir}/missing.db", "{dir}/missing.db"])
def test_a_store_that_does_not_exist_is_refused_not_created(
        form: str, tmp_path: Path, scratch_ns: Callable[[], str]) -> None:
    """``agent --once`` on a mistyped store path: refused before the kernel is
    touched, and no empty store left behind (it used to create one, install
    the filter of a host without ports and exit 0)."""
    url = form.format(dir=tmp_path)
    assert "no such file" in refused(scratch_ns(), url, tmp_path / "state", "--once")
    assert not (tmp_path / "missing.db").exists()

"""The no-op backend (secfw.backends.noop): nftables' render and plan, no kernel.

The scale bench's simulated hosts run the real agent on it, so it must do the
same work as the nftables backend up to the kernel call: the same plans, the
same incremental behaviour, and a read-back equal to what it committed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from secfw.agent.reconciler import Reconciler
from secfw.api import Api
from secfw.backends import BACKENDS, get_backend
from secfw.backends.nftables import NftablesBackend
from secfw.backends.noop import NoopBackend
from secfw.config import Config
from secfw.errors import BackendError
from secfw.lab.demo import build_guide_cloud
from secfw.store import open_store

HOST = "compute1"


class _Unused:
    """An executor the nftables backend must not call in these tests."""

    netns: str | None = None


@pytest.fixture
def api(tmp_path: Path) -> Api:
    made = Api(open_store(f"sqlite:///{tmp_path / 'c.db'}"))
    build_guide_cloud(made)
    return made


def test_noop_plans_what_nftables_plans_and_reads_back_its_commit(api: Api) -> None:
    backend = NoopBackend()
    reconciler = Reconciler(api.store, HOST, Config(), backend)
    first = reconciler.reconcile(full=True)
    assert first.full and first.commands > 0 and backend.transactions == 1
    assert first.programmed is not None
    real = NftablesBackend(executor=_Unused())  # type: ignore[arg-type]
    # what nftables would have sent from an empty kernel, and would hold after it
    assert backend.text_bytes == len(real.plan(None, first.programmed).text)
    assert backend.read() == real.committed(first.programmed)

    again = reconciler.reconcile(full=True)  # reads back what it committed: converged
    assert again.commands == 0 and backend.transactions == 1

    api.secgroup_add_rule("alpha", "global_http", "tcp", "8080", "8080", "0.0.0.0/0")
    change = reconciler.reconcile()
    assert not change.full and change.commands > 0 and backend.transactions == 2


def test_noop_is_not_a_command_line_backend() -> None:
    """No `secfw agent --backend noop`: a real host must never run unfiltered."""
    assert "noop" not in BACKENDS
    assert isinstance(get_backend("noop"), NoopBackend)
    with pytest.raises(BackendError):
        NoopBackend().apply(object())

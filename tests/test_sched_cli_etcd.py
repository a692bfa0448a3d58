"""Scheduling and volume flows of test_sched_cli.py run again on the etcd store.

Imported here so pytest collects them in this module, where ``store_url`` names
a fresh prefix on the session's etcd (as tests/test_cli_etcd.py does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from test_sched_cli import (  # noqa: F401  (collected by pytest from this module)
    hosts,
    test_a_volume_is_attached_to_one_instance_at_a_time,
    test_boot_from_volume_uses_no_flavor_disk_and_deletes_on_terminate,
    test_compute_quotas_refuse_the_boot_and_change_nothing,
    test_no_fitting_host_is_the_guides_novalidhost_error,
    test_snapshot_of_an_attached_volume_needs_force,
)

if TYPE_CHECKING:
    from conftest import EtcdServer


@pytest.fixture
def store_url(etcd_server: EtcdServer) -> str:
    """A fresh prefix on the session's etcd instead of a SQLite file."""
    return etcd_server.url()

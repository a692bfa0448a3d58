"""A host's view of the cloud compiles to the filter of the whole cloud.

:class:`~secfw.agent.hostview.HostView` keeps only what one host's filter reads
and follows the change feed into it, asking for a reload when a change widens
what the host needs. The incremental machine's random API calls (boots on three
hosts, group rules, memberships, ports, floating IPs…) drive it: after every
step, for each host, the filter compiled from the view — from scratch, and
incrementally from the records the view says it replaced, as the agent does —
must equal the filter compiled from the whole cloud.
"""

from __future__ import annotations

import shutil
import sys
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant
from test_incremental import IncrementalMachine

from secfw.agent.hostview import HostView, Interest, _tighten
from secfw.api import Api
from secfw.cloud import CloudState
from secfw.compiler.build import compile_host
from secfw.compiler.incremental import HostCompiler
from secfw.store import open_store

VIEW_HOSTS = ("h1", "h2", "h3", "nowhere")


class HostViewMachine(IncrementalMachine):
    """The incremental machine with a view and a compiler on it per host."""

    def __init__(self) -> None:
        self.views: dict[str, HostView] = {}
        self.view_compilers: dict[str, HostCompiler] = {}
        super().__init__()
        snapshot = self.api.store.load()
        for host in VIEW_HOSTS:
            self.views[host] = view = HostView(host)
            self.view_compilers[host] = HostCompiler(host)
            self.view_compilers[host].full(view.load(snapshot))

    def follow(self) -> None:
        """The agent's way: the view takes the batch, or the store is reloaded."""
        revision_before = self.follower.revision
        super().follow()
        if not self.views:
            return
        revision, changes = self.api.store.changes_since(revision_before)
        for host, view in self.views.items():
            replaced = view.apply(revision, changes)
            compiler = self.view_compilers[host]
            if replaced is None:
                compiler.full(view.load(self.api.store.load()))
            else:
                compiler.update(view.state, replaced)

    def cached_rendering_equals_fresh_rendering(self) -> None:  # type: ignore[override]
        """Not checked again here (test_incremental does)."""

    @invariant()
    def view_compiles_to_the_whole_clouds_filter(self) -> None:
        for host, view in self.views.items():
            expected = compile_host(self.follower, host)
            assert compile_host(view.state, host) == expected, host
            assert self.view_compilers[host].result == expected, host

    @invariant()
    def counted_interest_is_the_recomputed_one(self) -> None:
        """The view's counts (moved record by record) name what a walk over
        the view finds: its hosts' groups, their rules' sources, their ports'
        networks, the overlapping networks."""
        for host, view in self.views.items():
            assert view.interest == Interest.of(view.state, host), host


HostViewMachine.TestCase.settings = settings(
    max_examples=20, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestHostView = HostViewMachine.TestCase


def _cloud() -> tuple[Api, str]:
    tmp = tempfile.mkdtemp(prefix="secfw-hostview-")
    api = Api(open_store(f"sqlite:///{tmp}/secfw.db"))
    api.net_create("p", "a", "10.0.0.0/24")
    api.net_create("p", "b", "10.1.0.0/24")
    api.image_create("p", "img", visibility="public")
    for name in ("web", "db", "other"):
        api.secgroup_create("p", name, name)
    api.secgroup_add_group_rule("p", "db", "web")
    return api, tmp


def test_the_view_drops_what_the_host_does_not_need() -> None:
    """db's host keeps web's members (their addresses) and its own network's
    ports; an instance elsewhere in an unreferenced group, on another network,
    is dropped whole."""
    api, tmp = _cloud()
    try:
        api.boot("p", "db1", "m1.tiny", "img", "h1", ["db"], ["a"])
        api.boot("p", "web1", "m1.tiny", "img", "h2", ["web"], ["b"])
        api.boot("p", "lone", "m1.tiny", "img", "h3", ["other"], ["b"])
        view = HostView("h1")
        state = view.load(api.store.load())
        ids = {i.name: i.id for i in _full(api).instances.values()}
        assert set(state.instances) == {ids["db1"], ids["web1"]}
        assert {p.instance_id for p in state.ports.values()} == set(state.instances)
        assert state.instances[ids["web1"]].name == ""  # compact: id, host and groups
        assert state.instances[ids["db1"]].name == "db1"
    finally:
        api.store.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_rule_naming_a_new_source_group_asks_for_a_reload() -> None:
    api, tmp = _cloud()
    try:
        api.boot("p", "db1", "m1.tiny", "img", "h1", ["db"], ["a"])
        api.boot("p", "lone", "m1.tiny", "img", "h3", ["other"], ["b"])
        view = HostView("h1")
        view.load(api.store.load())
        revision = api.store.revision()
        api.secgroup_add_group_rule("p", "db", "other")
        assert view.apply(*api.store.changes_since(revision)) is None
        assert view.widenings == 1
        state = view.load(api.store.load())
        assert compile_host(state, "h1") == compile_host(
            _full(api), "h1")
    finally:
        api.store.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_boot_elsewhere_into_a_referenced_group_needs_no_reload() -> None:
    """The boot's instance and ports come in one batch: the view takes them."""
    api, tmp = _cloud()
    try:
        api.boot("p", "db1", "m1.tiny", "img", "h1", ["db"], ["a"])
        view = HostView("h1")
        view.load(api.store.load())
        revision = api.store.revision()
        api.boot("p", "web9", "m1.tiny", "img", "h2", ["web"], ["b"])
        replaced = view.apply(*api.store.changes_since(revision))
        assert replaced is not None and view.widenings == 0
        assert compile_host(view.state, "h1") == compile_host(
            _full(api), "h1")
    finally:
        api.store.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _full(api: Api) -> CloudState:
    return CloudState.from_snapshot(api.store.load())


def test_an_instance_joining_a_referenced_group_brings_its_ports_by_a_reload() -> None:
    """web2 (host h2, network b) was dropped from h1's view; joining ``web``
    (which db's rule references) changes its instance record only: its ports
    must be read again, or web2's address would be missing from the set."""
    api, tmp = _cloud()
    try:
        api.boot("p", "db1", "m1.tiny", "img", "h1", ["db"], ["a"])
        api.boot("p", "web2", "m1.tiny", "img", "h2", ["other"], ["b"])
        view = HostView("h1")
        view.load(api.store.load())
        assert len(view.state.ports) == 1
        revision = api.store.revision()
        api.add_secgroup("p", "web2", "web")
        assert view.apply(*api.store.changes_since(revision)) is None
        state = view.load(api.store.load())
        assert compile_host(state, "h1") == compile_host(_full(api), "h1")
        assert any(s.elements for s in compile_host(state, "h1").sets if s.name.startswith("sg-"))
    finally:
        api.store.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_tightened_member_sets_hold_the_same_members_in_less_memory() -> None:
    """HostView.load copies the groups' member sets once loaded (hostview._tighten):
    the same members, in a table sized for them (a set grown by ``add`` keeps
    room for up to 4x its members)."""
    grown: set[str] = set()
    for index in range(400):  # a bench host group's members at 10,000 ports
        grown.add(f"instance-{index}")
    index = {"g": grown, "empty": set[str]()}
    before = sys.getsizeof(grown)
    _tighten(index)
    assert index == {"g": grown, "empty": set()}
    assert sys.getsizeof(index["g"]) < before


def test_the_port_index_follows_ports_moving_and_going() -> None:
    """The port index (port -> instance, instance -> ports) as ports are added,
    moved to another instance and deleted: an instance entering the view asks
    for a reload exactly while it owns a port the view lacks."""
    view = HostView("h1")
    view._own("p1", "i1")
    view._own("p2", "i1")
    view._own("p3", "i2")
    assert view._missing_ports({"i1"}) and view._missing_ports({"i2"})
    view._own("p2", "i2")  # moved
    view._own("p1", None)  # deleted
    assert view._owned == {"i2": ("p3", "p2")}
    assert not view._missing_ports({"i1"}) and view._missing_ports({"i2"})
    view._own("p3", None)
    view._own("p2", None)
    assert view._owned == {} and not view._missing_ports({"i2"})

"""Two VLAN networks with the same addresses on one host (issue #17), with real
packets: each instance reads its OWN metadata, a source-group member of one
network does not open a port to its address twin on the other, and a routed
host — which cannot route one address to two taps — keeps both taps closed.
docs/semantics.md, "Overlapping networks"."""

from __future__ import annotations

from typing import Any

import pytest
from test_protection import AFTER_CUT, Stream

pytestmark = pytest.mark.netns

CIDR = "10.1.0.0/24"
USER_DATA = "/openstack/latest/user_data"


def _twins(cloud: Any) -> None:
    """``a`` (project pa, network na) and ``b`` (project pb, network nb): two VLAN
    networks with one CIDR, so both instances get 10.1.0.2; ``c`` on a network
    that overlaps nothing."""
    cloud.api.net_create("pa", "na", CIDR, vlan=101)
    cloud.api.net_create("pb", "nb", CIDR, vlan=102)
    cloud.api.net_create("pa", "nc", "10.2.0.0/24", vlan=103)
    for name, project, net in (("a", "pa", "na"), ("b", "pb", "nb"), ("c", "pa", "nc")):
        cloud.api.boot(project, name, "m1.tiny", "cirros", cloud.host, None, [net],
                       user_data=f"{name}'s own data".encode())
    assert cloud.ip("a") == cloud.ip("b") == "10.1.0.2"


@pytest.mark.topologies("bridged", reason="a routed host refuses the twins (test below)")
@pytest.mark.backends("nftables", reason="iptables refuses them: test below")
def test_twins_each_read_their_own_user_data(cloud: Any) -> None:
    """The redirect tells the twins apart by tap (conntrack mark); the server's
    reply to 10.1.0.2 leaves by the asker's bridge because the agent marks it
    with its network's routing mark (``metadata-route``) — by destination alone
    the host would send both answers into one of the two bridges."""
    _twins(cloud)
    cloud.serve_metadata()
    cloud.sync()
    for _ in range(3):  # alternately: neither a route cache nor a neighbour entry decides
        assert cloud.metadata("a", USER_DATA) == (200, b"a's own data")
        assert cloud.metadata("b", USER_DATA) == (200, b"b's own data")
    assert cloud.metadata("c", USER_DATA) == (200, b"c's own data")


@pytest.mark.topologies("bridged")
@pytest.mark.backends("iptables", reason="nftables serves them: test above")
def test_iptables_keeps_the_twins_closed(cloud: Any) -> None:
    """The iptables backend has no reply routing by network: it refuses the
    twins' metadata, and the agent keeps their taps closed (not open, not
    served another's data) while the rest of the host works."""
    _twins(cloud)
    cloud.serve_metadata()
    result = cloud.sync()
    closed = {p.tap: p.reason for p in result.isolated}
    assert set(closed) == {cloud.port("a").tap, cloud.port("b").tap}
    assert all("overlaps another" in reason for reason in closed.values())
    assert cloud.metadata("a", USER_DATA) is None
    assert cloud.metadata("b", USER_DATA) is None
    assert cloud.metadata("c", USER_DATA) == (200, b"c's own data")


@pytest.mark.topologies("routed", reason="a bridged host keeps the twins apart (above)")
def test_a_routed_host_keeps_both_twins_closed(cloud: Any) -> None:
    """One address cannot be routed to two taps: the agent leaves both closed,
    says why in its result (what ``secfw agent`` logs and its status reports),
    and programs the rest of the host."""
    _twins(cloud)
    cloud.serve_metadata()
    result = cloud.sync()
    closed = {p.tap: p.reason for p in result.isolated}
    assert set(closed) == {cloud.port("a").tap, cloud.port("b").tap}
    assert all("overlapping networks cannot both be routed" in r for r in closed.values())
    assert cloud.taps_in_ruleset() == {cloud.port("c").tap}
    for name in ("a", "b"):
        assert cloud.metadata(name, USER_DATA) is None
        assert not cloud.tcp(name, "external", 80)
    assert cloud.metadata("c", USER_DATA) == (200, b"c's own data")
    assert cloud.tcp("c", "external", 80)


@pytest.mark.topologies("bridged", reason="a routed host refuses the twins (test above)")
def test_a_source_group_member_does_not_admit_its_twin(cloud: Any) -> None:
    """``db`` admits tcp/22 from group ``web``. ``m`` (network nb, 10.1.0.2) is a
    member; ``lone`` (network na, also 10.1.0.2) is not, and must not get in to
    ``db1`` on na; ``w`` (na, 10.1.0.4, a member) does. Same-net is off, so only
    the groups decide."""
    cloud.configure(allow_same_net=False)
    api = cloud.api
    api.net_create("p", "na", CIDR, vlan=101)
    api.net_create("p", "nb", CIDR, vlan=102)
    api.secgroup_create("p", "web", "members")
    api.secgroup_create("p", "db", "ssh from web")
    api.secgroup_add_group_rule("p", "db", "web", "tcp", "22", "22")
    cloud.boot("lone", (), "na")
    cloud.boot("db1", ("db",), "na")
    cloud.boot("w", ("web",), "na")
    cloud.boot("m", ("web",), "nb")
    assert cloud.ip("lone") == cloud.ip("m") == "10.1.0.2"
    cloud.sync()
    assert cloud.tcp("w", "db1", 22)
    assert not cloud.tcp("lone", "db1", 22)


@pytest.mark.topologies("bridged", reason="a routed host refuses the twins (test above)")
def test_an_established_connection_to_a_twin_is_cut_with_its_rule(cloud: Any) -> None:
    """``c`` keeps a TCP stream open to ``a`` (10.1.0.2 on na); ``b`` (10.1.0.2 on
    nb, same host) still admits that port. Removing a's rule must cut the stream:
    revocation judges a conntrack entry by the ports that own its addresses, and
    the tuple does not say which twin — a verdict taken from ``b`` would keep it."""
    cloud.configure(allow_same_net=False)
    api = cloud.api
    for project, net, vlan in (("pa", "na", 101), ("pb", "nb", 102)):
        api.net_create(project, net, CIDR, vlan=vlan)
        api.secgroup_create(project, "svc", "tcp 8080")
        api.secgroup_add_rule(project, "svc", "tcp", "8080", "8080", "0.0.0.0/0")
    cloud.boot("a", ("svc",), "na", project="pa")
    cloud.boot("b", ("svc",), "nb", project="pb")
    cloud.boot("c", (), "na", project="pa")
    assert cloud.ip("a") == cloud.ip("b")
    cloud.sync()
    rule = api.rule_list("pa", "svc")[0]
    with Stream(cloud.ns("c"), cloud.ns("a"), cloud.ip("a"), 8080) as stream:
        stream.wait_flowing()
        api.rule_delete("pa", rule.id)
        cloud.sync()
        assert stream.silent_for(AFTER_CUT), "data sent after the sync still arrives"
    assert not cloud.tcp("c", "a", 8080)  # nor does a new one get in


@pytest.mark.topologies("bridged", reason="a routed host refuses the twins (test above)")
@pytest.mark.backends("nftables", reason="iptables refuses the twins' metadata")
def test_audit_verify_finds_a_twin_host_clean(cloud: Any) -> None:
    """``secfw audit verify`` reads the twins' host (metadata-route chain included)
    and probes it port by port: no false difference."""
    from test_audit_verify_nat import verified

    _twins(cloud)
    cloud.serve_metadata()
    cloud.sync()
    found, _ = verified(cloud)
    assert found == []

"""Scheduling, compute quotas and volumes (cinder) through the command line.

The guide's examples are typed as the guide types them; every bad input is one
line on stderr, the README's exit status, and an unchanged store (``Cli.fails``).
An instance the scheduler cannot place exists in ERROR with nova's NoValidHost
fault and has no port: the compiler of any host never sees it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from secfw.api import Api
from secfw.cloud import CloudState
from secfw.compiler.build import compile_host

if TYPE_CHECKING:
    from conftest import Cli


@pytest.fixture
def hosts(cli: Cli, api: Api) -> Cli:
    """A network, the public image cirros, two registered hosts (c1 has an ssd)."""
    api.net_create("admin", "private", "10.0.0.0/24")
    api.image_create("admin", "cirros", visibility="public")
    cli.ok("host-add", "c1", "--vcpus", "4", "--ram-mb", "4096", "--disk-gb", "40",
           "--property", "ssd=true")
    cli.ok("host-add", "c2", "--vcpus", "8", "--ram-mb", "3072", "--disk-gb", "100")
    return cli


def boot(cli: Cli, name: str, flavor: str, *extra: str) -> dict[str, Any]:
    shown: dict[str, Any] = cli.json("boot", name, "--flavor", flavor, "--image", "cirros",
                                     *extra)
    return shown


def compiled_taps(api: Api, host: str) -> set[str]:
    state = CloudState.from_snapshot(api.store.load())
    return {p.tap for p in compile_host(state, host).ports}


# --------------------------------------------------------------------------- scheduling


def test_boot_without_host_goes_to_the_host_with_most_free_ram(hosts: Cli) -> None:
    assert boot(hosts, "a", "m1.small")["host"] == "c1"   # 4096 free beats 3072
    assert boot(hosts, "b", "m1.tiny")["host"] == "c2"    # 3072 free beats 4096 - 2048
    listed = {h["host"]: h for h in hosts.json("host-list")}
    assert (listed["c1"]["vcpus_used"], listed["c1"]["memory_mb_used"],
            listed["c1"]["disk_gb_used"], listed["c1"]["instances"]) == (1, 2048, 10, 1)
    assert listed["c2"]["memory_mb_used"] == 512


def test_no_fitting_host_is_the_guides_novalidhost_error(hosts: Cli, api: Api) -> None:
    """The guide's ``nova show test-instance``: status ERROR, vm_state error, fault
    NoValidHost code 500, hostId blank; and no port anywhere."""
    hosts.ok("flavor-create", "xxl.super", "11", "65536", "100", "16")
    hosts.ok("quota-update", "--ram", "-1", "--cores", "-1")
    shown = boot(hosts, "test-instance", "11")
    assert shown["status"] == "ERROR"
    assert shown["OS-EXT-STS:vm_state"] == "error"
    assert shown["fault"] == {"message": "NoValidHost", "code": 500,
                              "created": shown["updated"]}
    assert shown["hostId"] == "" and shown["host"] == ""
    assert shown["flavor"] == "xxl.super (11)" and shown["networks"] == {}
    table = hosts.ok("show", "test-instance")
    assert "| fault                  | {u'message': u'NoValidHost', u'code': 500, u'created': " \
        in table
    assert hosts.json("port-list") == []
    assert all(compiled_taps(api, h) == set() for h in ("c1", "c2", ""))
    assert {h["host"]: h["instances"] for h in hosts.json("host-list")} == {"c1": 0, "c2": 0}


def test_an_error_instance_is_never_seen_by_the_agent_while_active_ones_are(
    hosts: Cli, api: Api
) -> None:
    fits = boot(hosts, "fits", "m1.medium")          # 4096 MB: only c1
    failed = boot(hosts, "too-big", "m1.medium")     # c1 full now, c2 too small
    assert (fits["status"], failed["status"]) == ("ACTIVE", "ERROR")
    ports = hosts.json("port-list", "--host", "c1")
    assert [p["instance"] for p in ports] == ["fits"]
    assert compiled_taps(api, "c1") == {ports[0]["tap"]}
    hosts.ok("delete", "fits")                       # frees c1
    assert boot(hosts, "again", "m1.medium")["host"] == "c1"


def test_flavor_extra_specs_must_match_host_properties(hosts: Cli) -> None:
    hosts.ok("flavor-create", "fast", "20", "512", "1", "1")
    hosts.ok("flavor-key", "fast", "set", "ssd=true")
    assert boot(hosts, "f1", "fast")["host"] == "c1"  # c2 has more free RAM but no ssd
    hosts.ok("flavor-key", "fast", "set", "capabilities:gpu=yes")
    assert boot(hosts, "f2", "fast")["status"] == "ERROR"
    hosts.ok("flavor-key", "fast", "unset", "capabilities:gpu")
    hosts.ok("flavor-key", "fast", "set", "hw:cpu_policy=dedicated")  # not a capability
    assert boot(hosts, "f3", "fast")["host"] == "c1"


def test_boot_host_forces_a_host_but_a_registered_one_must_fit(hosts: Cli) -> None:
    assert boot(hosts, "legacy", "m1.xlarge", "--host", "unregistered")["host"] == \
        "unregistered"
    assert boot(hosts, "forced", "m1.tiny", "--host", "c1")["host"] == "c1"
    shown = boot(hosts, "no-room", "m1.large", "--host", "c2")
    assert shown["status"] == "ERROR" and shown["fault"]["message"] == "NoValidHost"


def test_host_show_delete_and_capacity_below_use(hosts: Cli) -> None:
    boot(hosts, "a", "m1.small", "--host", "c1")
    assert hosts.json("host-show", "c1")["properties"] == {"ssd": "true"}
    assert "in use" not in hosts.fails("host-delete", "c1", code=6)
    hosts.ok("delete", "a")
    hosts.ok("host-delete", "c1")
    assert [h["host"] for h in hosts.json("host-list")] == ["c2"]
    boot(hosts, "b", "m1.small", "--host", "c9")
    assert "below the 2048" in hosts.fails(
        "host-add", "c9", "--vcpus", "1", "--ram-mb", "1024", "--disk-gb", "10", code=4)


# --------------------------------------------------------------------------- quotas


def test_compute_quotas_refuse_the_boot_and_change_nothing(hosts: Cli) -> None:
    hosts.ok("quota-update", "--instances", "2", "--cores", "2", "--ram", "3000")
    boot(hosts, "a", "m1.small")
    assert "Quota exceeded for ram: Requested 2048, but already used 2048 of 3000 ram" in \
        hosts.fails("boot", "b", "--flavor", "m1.small", "--image", "cirros", code=5)
    assert "Quota exceeded for cores: Requested 2" in hosts.fails(
        "boot", "b", "--flavor", "m1.medium", "--image", "cirros", code=5)
    boot(hosts, "b", "m1.tiny")
    assert "Quota exceeded for instances: Requested 1, but already used 2 of 2" in \
        hosts.fails("boot", "c", "--flavor", "m1.tiny", "--image", "cirros", code=5)
    assert "instances quota 1 is below the 2" in hosts.fails(
        "quota-update", "--instances", "1", code=5)


def test_an_error_instance_counts_against_the_quota_until_deleted(hosts: Cli) -> None:
    hosts.ok("quota-update", "--instances", "1")
    assert boot(hosts, "big", "m1.xlarge")["status"] == "ERROR"
    hosts.fails("boot", "next", "--flavor", "m1.tiny", "--image", "cirros", code=5)
    hosts.ok("delete", "big")
    assert boot(hosts, "next", "m1.tiny")["status"] == "ACTIVE"


# --------------------------------------------------------------------------- volumes


def test_guide_cinder_create_and_list(hosts: Cli) -> None:
    """``cinder create --display-name test-volume 10`` then ``cinder list``."""
    created = hosts.json("volume-create", "--display-name", "test-volume", "10")
    listed = hosts.ok("volume-list").splitlines()
    assert listed[1] == ("| ID                                   | Status | Display Name | Size |"
                         " Volume Type | Attached to |")
    assert listed[3] == (f"| {created['id']} | active | test-volume  | 10   | None        |"
                         "             |")


def test_a_volume_is_attached_to_one_instance_at_a_time(hosts: Cli) -> None:
    boot(hosts, "vm1", "m1.tiny")
    boot(hosts, "vm2", "m1.tiny")
    volume = hosts.json("volume-create", "--display-name", "data", "5")["id"]
    attached = hosts.json("volume-attach", "vm1", "data")
    assert attached["device"] == "/dev/vdb"
    assert "attached to one instance at a time" in hosts.fails(
        "volume-attach", "vm2", volume, code=6)
    assert hosts.json("volume-show", "data")["status"] == "in-use"
    assert hosts.json("show", "vm1")["os-extended-volumes:volumes_attached"] == [
        {"id": volume}]
    assert "detach it first" in hosts.fails("volume-delete", "data", code=6)
    hosts.ok("volume-detach", "vm1", "data")
    assert hosts.json("volume-attach", "vm2", "data", "/dev/vdc")["device"] == "/dev/vdc"
    hosts.ok("delete", "vm2")                                 # detached, not deleted
    assert hosts.json("volume-show", "data")["status"] == "active"
    hosts.ok("volume-delete", "data")
    assert hosts.json("volume-list") == []


def test_snapshot_of_an_attached_volume_needs_force(hosts: Cli) -> None:
    boot(hosts, "vm1", "m1.tiny")
    hosts.ok("volume-create", "--display-name", "data", "5")
    hosts.ok("volume-attach", "vm1", "data")
    assert "--force" in hosts.fails("snapshot-create", "data", code=6)
    assert "--force" in hosts.fails("snapshot-create", "--force", "False", "data", code=6)
    first = hosts.json("snapshot-create", "--force", "True", "--display-name", "s1",
                       "--display-description", "before upgrade", "data")
    bare = hosts.json("snapshot-create", "--force", "data")   # the bare flag form
    assert (first["size"], first["display_name"]) == (5, "s1")
    assert sorted(s["id"] for s in hosts.json("snapshot-list")) == sorted(
        [first["id"], bare["id"]])
    hosts.ok("volume-detach", "vm1", "data")
    assert "2 dependent snapshot" in hosts.fails("volume-delete", "data", code=6)
    hosts.ok("snapshot-delete", "s1")
    hosts.ok("snapshot-delete", bare["id"])
    hosts.ok("volume-delete", "data")


def test_boot_from_volume_uses_no_flavor_disk_and_deletes_on_terminate(
    hosts: Cli, api: Api
) -> None:
    """The guide's ``nova boot --flavor 2 --key-name mykey --block-device-mapping
    vda=13:::0 bootfrom-vol-test`` (our volume IDs are UUIDs)."""
    hosts.ok("keypair-add", "mykey")
    keep = hosts.json("volume-create", "--display-name", "boot", "20")["id"]
    shown = hosts.json("boot", "--flavor", "2", "--key-name", "mykey",
                       "--block-device-mapping", f"vda={keep}:::0", "bootfrom-vol-test")
    assert shown["status"] == "ACTIVE"
    assert shown["image"] == "Attempt to boot from volume - no image supplied"
    assert hosts.json("host-show", shown["host"])["disk_gb_used"] == 0
    assert hosts.json("volume-show", keep)["device"] == "/dev/vda"
    assert "root device" in hosts.fails("volume-detach", "bootfrom-vol-test", keep, code=4)
    snap = hosts.json("snapshot-create", "--force", "True", keep)["id"]
    gone = hosts.json("boot", "--flavor", "1", "--block-device-mapping",
                      f"vda={snap}:snap::1", "from-snap")
    made = gone["os-extended-volumes:volumes_attached"][0]["id"]
    assert hosts.json("volume-show", made)["snapshot_id"] == snap
    hosts.ok("delete", "from-snap")                          # delete-on-terminate: 1
    hosts.ok("delete", "bootfrom-vol-test")                  # delete-on-terminate: 0
    assert [v["id"] for v in hosts.json("volume-list")] == [keep]


def test_volume_quotas(hosts: Cli) -> None:
    hosts.ok("quota-update", "--volumes", "2", "--gigabytes", "15", "--snapshots", "1")
    hosts.ok("volume-create", "--display-name", "a", "5")
    assert "Quota exceeded for gigabytes: Requested 11, but already used 5 of 15" in \
        hosts.fails("volume-create", "11", code=5)
    hosts.ok("snapshot-create", "a")                      # 5 + 5 GB
    assert "Quota exceeded for snapshots" in hosts.fails("snapshot-create", "a", code=5)
    hosts.ok("volume-create", "5")
    assert "Quota exceeded for volumes" in hosts.fails("volume-create", "1", code=5)
    assert "gigabytes quota 10 is below the 15" in hosts.fails(
        "quota-update", "--gigabytes", "10", code=5)


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def cloud(hosts: Cli, api: Api) -> Cli:
    """hosts, plus vm1 (on c1), volumes free (5 GB) and used (on vm1), snapshot s1,
    an ERROR server broken."""
    boot(hosts, "vm1", "m1.tiny", "--host", "c1")
    hosts.ok("volume-create", "--display-name", "free", "5")
    hosts.ok("volume-create", "--display-name", "used", "5")
    hosts.ok("volume-attach", "vm1", "used")
    hosts.ok("snapshot-create", "--display-name", "s1", "free")
    boot(hosts, "broken", "m1.xlarge")
    return hosts


BOOT = ("boot", "x", "--flavor", "1")
BAD_INPUT: list[tuple[tuple[str, ...], int, str]] = [
    # hosts
    (("host-add", "c1", "--vcpus", "1", "--ram-mb", "1", "--disk-gb", "1"), 4,
     "already registered"),
    (("host-add", "c3", "--vcpus", "0", "--ram-mb", "1", "--disk-gb", "1"), 2, "vcpus must be"),
    (("host-add", "c3", "--vcpus", "1", "--ram-mb", "x", "--disk-gb", "1"), 2, "ram-mb must"),
    (("host-add", "c3", "--vcpus", "1", "--ram-mb", "1", "--disk-gb", "-1"), 2, "disk-gb must"),
    (("host-add", "c 3", "--vcpus", "1", "--ram-mb", "1", "--disk-gb", "1"), 2, "whitespace"),
    (("host-add", "", "--vcpus", "1", "--ram-mb", "1", "--disk-gb", "1"), 2, "must not be empty"),
    (("host-add", "c3", "--vcpus", "1", "--ram-mb", "1"), 2, "Missing option '--disk-gb'"),
    (("host-add", "c3", "--vcpus", "1", "--ram-mb", "1", "--disk-gb", "1", "--property", "x"),
     2, "expected KEY=VALUE"),
    (("--project", "alpha", "host-add", "c3", "--vcpus", "1", "--ram-mb", "1", "--disk-gb",
      "1"), 11, "may register compute hosts"),
    (("--project", "alpha", "host-delete", "c2"), 11, "may unregister"),
    (("host-delete", "c1"), 6, "still runs 1 instance"),
    (("host-delete", "nosuch"), 3, "compute host 'nosuch' is not registered"),
    (("host-show", "nosuch"), 3, "is not registered"),
    # boot
    (("boot", "x", "--flavor", "1"), 2, "give --image, or boot from a volume"),
    ((*BOOT, "--block-device-mapping", "vdb=free:::0"), 2, "give --image"),
    ((*BOOT, "--block-device-mapping", "vda"), 2, "expected DEV=ID:[snap]:SIZE"),
    ((*BOOT, "--block-device-mapping", "vda=:::0"), 2, "expected DEV=ID"),
    ((*BOOT, "--block-device-mapping", "vda=free:::0:extra"), 2, "expected DEV=ID"),
    ((*BOOT, "--block-device-mapping", "eth0=free:::0"), 2, "not a block device name"),
    ((*BOOT, "--block-device-mapping", "vda=free::x:0"), 2, "block device size must be"),
    ((*BOOT, "--block-device-mapping", "vda=free::0:0"), 2, "block device size must be"),
    ((*BOOT, "--block-device-mapping", "vda=free::6:0"), 2, "does not match volume"),
    ((*BOOT, "--block-device-mapping", "vda=free:::maybe"), 2, "delete-on-terminate must be"),
    ((*BOOT, "--block-device-mapping", "vda=nosuch:::0"), 3, "No volume with a name or ID"),
    ((*BOOT, "--block-device-mapping", "vda=nosuch:snap::0"), 3, "No snapshot with a name"),
    ((*BOOT, "--block-device-mapping", "vda=s1:snap:4:0"), 2, "smaller than the snapshot"),
    ((*BOOT, "--block-device-mapping", "vda=used:::0"), 6, "already attached"),
    ((*BOOT, "--block-device-mapping", "vda=free:::0", "--block-device-mapping",
      "/dev/vda=s1:snap::0"), 2, "mapped more than once"),
    ((*BOOT, "--block-device-mapping", "vda=free:::0", "--block-device-mapping",
      "vdb=free:::0"), 2, "mapped more than once"),
    (("--project", "alpha", *BOOT, "--block-device-mapping", "vda=free:::0"), 3, "No volume"),
    # quotas
    (("quota-update", "--instances", "x"), 2, "instances must be an integer"),
    (("quota-update", "--cores", "-2"), 2, "cores must be -1"),
    (("quota-update", "--ram", "0"), 5, "ram quota 0 is below the 16896"),  # ERROR counts
    (("quota-update", "--snapshots", "0"), 5, "snapshots quota 0 is below the 1"),
    (("quota-update",), 2, "nothing to update"),
    # volumes
    (("volume-create", "0"), 2, "size must be an integer from 1"),
    (("volume-create", "ten"), 2, "size must be an integer"),
    (("volume-create", "1", "--display-name", ""), 2, "display name must not be empty"),
    (("volume-create", "1", "--display-name", "a\nb"), 2, "control characters"),
    (("volume-create", "1", "--snapshot-id", "nosuch"), 3, "No snapshot"),
    (("volume-create", "4", "--snapshot-id", "s1"), 2, "smaller than the snapshot's 5 GB"),
    (("volume-create", "5", "--snapshot-id", "s1", "--image-id", "cirros"), 2, "not both"),
    (("volume-create", "5", "--image-id", "nosuch"), 3, "image 'nosuch' not found"),
    (("volume-create",), 2, "Missing argument 'SIZE'"),
    (("volume-show", "nosuch"), 3, "No volume with a name or ID of 'nosuch'"),
    (("--project", "alpha", "volume-show", "free"), 3, "No volume"),
    (("volume-delete", "used"), 6, "detach it first"),
    (("volume-delete", "free"), 6, "1 dependent snapshot"),
    (("volume-delete", "nosuch"), 3, "No volume"),
    (("volume-attach", "vm1", "free", "vda"), 4, "device /dev/vda is already in use"),
    (("volume-attach", "vm1", "free", "/dev/vdb"), 4, "device /dev/vdb is already in use"),
    (("volume-attach", "vm1", "free", "floppy"), 2, "not a block device name"),
    (("volume-attach", "broken", "free"), 4, "while it is in vm_state error"),
    (("volume-attach", "nosuch", "free"), 3, "No server"),
    (("volume-attach", "vm1", "nosuch"), 3, "No volume"),
    (("--project", "alpha", "volume-attach", "vm1", "free"), 3, "No server"),
    (("volume-detach", "vm1", "free"), 3, "is not attached to server 'vm1'"),
    (("volume-detach", "vm1", "nosuch"), 3, "No volume"),
    (("snapshot-create", "used"), 6, "attached to a server"),
    (("snapshot-create", "--force", "maybe", "used"), 2, "--force must be true or false"),
    (("snapshot-create",), 2, "give exactly one VOLUME"),
    (("snapshot-create", "a", "b"), 2, "give exactly one VOLUME"),
    (("snapshot-create", "nosuch"), 3, "No volume"),
    (("snapshot-create", "free", "--display-name", " "), 2, "must not be empty"),
    (("snapshot-delete", "nosuch"), 3, "No snapshot"),
    (("snapshot-show", "nosuch"), 3, "No snapshot"),
    # an ERROR server
    (("image-create", "broken", "snap"), 4, "Cannot snapshot server 'broken'"),
]


@pytest.mark.parametrize(("args", "code", "message"), BAD_INPUT,
                         ids=[" ".join(a)[:60] for a, _, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_changes_nothing(
    cloud: Cli, args: tuple[str, ...], code: int, message: str
) -> None:
    assert message in cloud.fails(*args, code=code)


# --------------------------------------------------------------------------- README


def readme_block(command: str) -> str:
    """The output the README shows after ``$ secfw COMMAND`` (up to the next prompt)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    after = readme.split(f"$ secfw {command}\n", 1)[1]
    return re.split(r"\n(?:\$ |```)", after, maxsplit=1)[0] + "\n"


def same_but_ids_and_times(expected: str, actual: str) -> str:
    """``actual`` with its UUIDs and times replaced by the README's, in order."""
    for pattern in (r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"):
        wanted = iter(re.findall(pattern, expected))
        actual = re.sub(pattern, lambda _m, w=wanted: next(w), actual)  # type: ignore[misc]
    return actual


def test_readme_scheduling_examples_are_the_commands_output(cli: Cli, api: Api) -> None:
    """The README's host-list, NoValidHost show and volume-list: the commands' output,
    byte for byte but for the generated IDs and the times."""
    api.net_create("admin", "private", "10.0.0.0/24")
    cli.ok("image-create", "quantal-test", "--visibility", "public")
    cli.ok("host-add", "compute1", "--vcpus", "8", "--ram-mb", "16384", "--disk-gb", "200",
           "--property", "ssd=true")
    cli.ok("host-add", "compute2", "--vcpus", "4", "--ram-mb", "8192", "--disk-gb", "100")
    cli.ok("flavor-create", "xxl.super", "11", "65536", "100", "16")
    cli.ok("quota-update", "--ram", "131072", "--cores", "32")
    cli.ok("boot", "test-instance", "--flavor", "xxl.super", "--image", "quantal-test")
    shown = readme_block("show test-instance")
    assert same_but_ids_and_times(shown, cli.ok("show", "test-instance")) == shown
    cli.ok("boot", "web1", "--flavor", "m1.small", "--image", "quantal-test")
    assert cli.ok("host-list") == readme_block("host-list")
    cli.ok("volume-create", "--display-name", "test-volume", "10")
    listed = readme_block("volume-list")
    assert same_but_ids_and_times(listed, cli.ok("volume-list")) == listed


def test_the_compute_read_commands_never_load_the_whole_store(
        cloud: Cli, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each reads its own kinds (flavors, images, hosts, volumes, …) by key or kind:
    loading every document cost ~6 s of CPU per command at 50k ports."""

    def no_load(_self: object) -> None:
        raise AssertionError("a read command loaded the whole store")

    monkeypatch.setattr(type(api.store), "load", no_load)
    for command in (("flavor-list",), ("flavor-show", "m1.tiny"), ("keypair-list",),
                    ("image-list",), ("image-show", "cirros"), ("host-list",),
                    ("host-show", "c1"), ("volume-list",), ("volume-show", "free"),
                    ("snapshot-list",), ("snapshot-show", "s1"), ("floating-ip-pool-list",),
                    ("floating-ip-list",), ("list-secgroup", "vm1")):
        cloud.ok(*command)
    hosts = cloud.json("host-list")  # usage from the tallies, as from the whole store
    assert {h["host"]: h["instances"] for h in hosts} == {"c1": 1, "c2": 0}, hosts

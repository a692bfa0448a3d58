"""The compute model's commands: flavors, keypairs, glance images, snapshots, instance data.

The guide's commands are typed as the guide types them; every bad input is one
line on stderr, the README's exit status, and an unchanged store (``Cli.fails``)
— and, for image bytes, an unchanged image directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from click.testing import Result
from cryptography.hazmat.primitives import serialization

from secfw.api import Api
from secfw.cli.main import main

if TYPE_CHECKING:
    from conftest import Cli

CIRROS = b"\x00QFI\xfb not really qcow2, but bytes all the same" * 100


def run_with_stdin(cli: Cli, data: bytes, *args: str) -> Result:
    return cli.runner.invoke(main, ["--store", cli.store_url, *args], input=data)


def image_dir(cli: Cli) -> Path:
    """The image directory of the test's SQLite store (``…/secfw.db-images``)."""
    return Path(cli.store_url[len("sqlite://"):] + "-images")


def image_files(cli: Cli) -> dict[str, bytes]:
    directory = image_dir(cli)
    if not directory.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name != ".lock"}


@pytest.fixture
def booted(cli: Cli, api: Api) -> Cli:
    """A network, the public image cirros, server vm1 (m1.tiny) on h1."""
    api.net_create("admin", "private", "10.0.0.0/24")
    api.image_create("admin", "cirros", visibility="public")
    api.boot("admin", "vm1", "m1.tiny", "cirros", "h1")
    return cli


# --------------------------------------------------------------------------- images


def test_guide_glance_image_create_from_stdin(cli: Cli) -> None:
    """``glance image-create --name='cirros image' --is-public=true … < cirros.img``."""
    result = run_with_stdin(cli, CIRROS, "image-create", "--name=cirros image",
                            "--is-public=true", "--container-format=bare",
                            "--disk-format=qcow2", "-f", "json")
    assert result.exit_code == 0, result.stderr
    image = json.loads(result.stdout)
    digest = hashlib.sha256(CIRROS).hexdigest()
    assert (image["name"], image["is_public"], image["disk_format"],
            image["container_format"]) == ("cirros image", True, "qcow2", "bare")
    assert image["size"] == len(CIRROS)
    assert image["checksum"] == hashlib.md5(CIRROS).hexdigest()
    assert image_files(cli) == {digest: CIRROS}
    listed = cli.ok("image-list")
    assert listed.splitlines()[1] == (
        "| ID                                   | Name         | Disk Format "
        "| Container Format | Size | Status |")
    assert f"| {image['id']} | cirros image | qcow2       | bare             | {len(CIRROS)} |" \
        in listed
    shown = cli.ok("image-show", "cirros image")
    assert f"| checksum         | {hashlib.md5(CIRROS).hexdigest()} " in shown
    assert "| is_public        | True " in shown


def test_image_file_location_and_properties(cli: Cli, tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    source.write_bytes(b"raw disk")
    from_file = cli.json("image-create", "--name", "f", "--file", str(source), "--disk-format",
                         "raw", "--min-disk", "2", "--min-ram", "256", "--property",
                         "os_distro=cirros", "--property", "hw=a=b")
    assert (from_file["size"], from_file["min_disk"], from_file["min_ram"]) == (8, 2, 256)
    assert from_file["properties"] == {"os_distro": "cirros", "hw": "a=b"}
    # the same bytes again are stored once
    again = cli.json("image-create", "--name", "g", "--file", str(source))
    assert again["checksum"] == from_file["checksum"]
    assert list(image_files(cli)) == [hashlib.sha256(b"raw disk").hexdigest()]
    # a location is recorded, nothing is fetched (the port is closed: a fetch would fail)
    remote = cli.json("image-create", "--name", "r", "--location",
                      "http://127.0.0.1:9/cirros.img")
    assert (remote["location"], remote["size"], remote["checksum"]) == (
        "http://127.0.0.1:9/cirros.img", None, None)
    assert "| Property 'os_distro' | cirros " in cli.ok("image-show", "f")
    # the short form NAME takes --file too (but never reads stdin)
    short = cli.json("image-create", "s", "--file", str(source), "--disk-format", "raw")
    assert (short["size"], short["disk_format"]) == (8, "raw")
    result = run_with_stdin(cli, b"ignored", "image-create", "t", "-f", "json")
    assert json.loads(result.stdout)["size"] is None


def test_image_update_and_delete_keeps_servers_and_shared_bytes(cli: Cli, tmp_path: Path
                                                                  ) -> None:
    cli.ok("net-create", "private", "10.0.0.0/24")
    source = tmp_path / "disk"
    source.write_bytes(b"bytes")
    first = cli.json("image-create", "--name", "one", "--file", str(source), "--is-public",
                     "true")
    cli.json("image-create", "--name", "two", "--file", str(source))
    updated = cli.json("image-update", "one", "--name", "uno", "--property", "a=1",
                       "--min-ram", "128")
    assert (updated["name"], updated["properties"], updated["min_ram"]) == (
        "uno", {"a": "1"}, 128)
    purged = cli.json("image-update", "uno", "--purge-props", "--property", "b=2")
    assert purged["properties"] == {"b": "2"}
    server = cli.json("boot", "vm", "--flavor", "1", "--image", "uno", "--host", "h1")
    assert server["image"] == f"uno ({first['id']})"
    assert cli.ok("image-delete", "uno") == ""
    assert len(image_files(cli)) == 1  # "two" still has these bytes
    assert cli.json("show", "vm")["image"] == first["id"]
    assert cli.json("port-list")[0]["instance"] == "vm"
    cli.ok("image-delete", "two")
    assert image_files(cli) == {}


def test_nova_snapshot_is_an_image_with_the_guides_properties(booted: Cli) -> None:
    server = booted.json("show", "vm1")
    base = booted.json("image-show", "cirros")
    snap = booted.json("image-create", "vm1", "mon-snapshot")
    assert snap["properties"] == {
        "image_type": "snapshot", "instance_uuid": server["id"],
        "base_image_ref": base["id"], "image_location": "snapshot", "owner_id": "admin"}
    assert snap["min_disk"] == 1  # m1.tiny's disk
    assert [i["name"] for i in booted.json("image-list")] == ["cirros", "mon-snapshot"]
    booted.ok("delete", "vm1")
    booted.ok("image-delete", "cirros")
    kept = booted.json("image-show", "mon-snapshot")
    assert kept["properties"]["base_image_ref"] == base["id"]


def test_boot_checks_min_disk_and_min_ram_against_the_flavor(booted: Cli) -> None:
    booted.ok("image-create", "--name", "win", "--min-disk", "10", "--min-ram", "1024")
    booted.ok("flavor-create", "smalldisk", "19", "2048", "5", "1")
    line = booted.fails("boot", "w", "--flavor", "m1.tiny", "--image", "win", "--host", "h1",
                        code=4)
    assert "Flavor's memory is too small for requested image" in line
    line = booted.fails("boot", "w", "--flavor", "smalldisk", "--image", "win", "--host", "h1",
                        code=4)
    assert "Flavor's disk is too small for requested image" in line
    booted.ok("boot", "w", "--flavor", "m1.small", "--image", "win", "--host", "h1")
    # a flavor disk of 0 means "the image's own size": no min_disk check
    booted.ok("flavor-create", "zero", "20", "2048", "0", "1")
    booted.ok("boot", "z", "--flavor", "zero", "--image", "win", "--host", "h1")


# --------------------------------------------------------------------------- flavors


def test_flavor_lifecycle(cli: Cli) -> None:
    created = cli.ok("flavor-create", "xxl.super", "11", "65536", "100", "16", "--ephemeral",
                     "10", "--swap", "1024", "--rxtx-factor", "2.0")
    assert "| 11 | xxl.super | 65536     | 100  | 10        | 16    | {}          |" in created
    assert cli.ok("flavor-key", "xxl.super", "set", "gpu=true", "hw:cpu=dedicated") == ""
    shown = cli.json("flavor-show", "11")
    assert shown["extra_specs"] == {"gpu": "true", "hw:cpu": "dedicated"}
    assert (shown["swap"], shown["rxtx_factor"], shown["ephemeral"]) == (1024, 2.0, 10)
    assert "| extra_specs | {u'gpu': u'true', u'hw:cpu': u'dedicated'} |" in cli.ok(
        "flavor-show", "11")
    cli.ok("flavor-key", "11", "unset", "gpu")
    assert cli.json("flavor-show", "11")["extra_specs"] == {"hw:cpu": "dedicated"}
    assert [f["id"] for f in cli.json("flavor-list")] == ["1", "2", "3", "4", "5", "11"]
    assert cli.ok("flavor-delete", "xxl.super") == ""
    assert [f["id"] for f in cli.json("flavor-list")] == ["1", "2", "3", "4", "5"]
    # deleting a default is final: the defaults are not seeded again
    cli.ok("flavor-delete", "m1.xlarge")
    assert [f["name"] for f in cli.json("flavor-list")][-1] == "m1.large"


def test_private_flavor_access(cli: Cli) -> None:
    cli.ok("net-create", "private", "10.0.0.0/24")
    cli.ok("image-create", "cirros", "--visibility", "public")
    cli.ok("flavor-create", "gold", "auto", "1024", "10", "2", "--is-public", "false")
    gold = next(f for f in cli.json("flavor-list") if f["name"] == "gold")
    assert len(gold["id"]) == 36 and gold["is_public"] is False
    boot = ("boot", "x", "--flavor", "gold", "--image", "cirros", "--host", "h1")
    assert "flavor 'gold' not found" in cli.fails("--project", "alpha", *boot, code=3)
    assert "gold" not in {f["name"] for f in cli.json("flavor-list", "--project", "alpha")}
    out = cli.ok("flavor-access-add", "gold", "alpha")
    assert f"| {gold['id']} | alpha     |" in out
    assert cli.ok("flavor-access-list", "--flavor", "gold").splitlines()[1] == (
        "| Flavor_ID                            | Tenant_ID |")
    cli.ok("--project", "alpha", *boot)
    assert cli.json("flavor-access-remove", "gold", "alpha") == []
    assert "not found" in cli.fails("--project", "alpha", "boot", "y", "--flavor", "gold",
                                    "--image", "cirros", "--host", "h1", code=3)


# --------------------------------------------------------------------------- keypairs


def test_guide_keypair_add_generates_a_real_pair(cli: Cli, tmp_path: Path) -> None:
    """``nova keypair-add mykey > mykey.pem``; the fingerprint is ssh-keygen's MD5 one."""
    pem = cli.ok("keypair-add", "mykey")
    assert pem.startswith("-----BEGIN RSA PRIVATE KEY-----\n")
    private = serialization.load_pem_private_key(pem.encode(), password=None)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
    shown = cli.json("keypair-show", "mykey")
    assert shown["public_key"].split()[:2] == public.split()
    assert "BEGIN" not in json.dumps(cli.json("keypair-list"))  # the private key is not kept
    (tmp_path / "mykey.pub").write_text(public + " me@host\n")
    if shutil.which("ssh-keygen"):
        out = subprocess.run(["ssh-keygen", "-l", "-E", "md5", "-f", str(tmp_path / "mykey.pub")],
                             capture_output=True, text=True, check=True).stdout
        assert out.split()[1] == "MD5:" + shown["fingerprint"]
    # nova keypair-add --pub-key mykey.pub mykey2
    assert cli.ok("keypair-add", "--pub-key", str(tmp_path / "mykey.pub"), "mykey2") == ""
    listed = cli.json("keypair-list")
    assert [(k["name"], k["fingerprint"]) for k in listed] == [
        ("mykey", shown["fingerprint"]), ("mykey2", shown["fingerprint"])]
    assert "| mykey2 | ssh  |" in cli.ok("keypair-list")
    assert cli.ok("keypair-delete", "mykey2") == ""
    assert [k["name"] for k in cli.json("keypair-list")] == ["mykey"]


def test_keypairs_are_per_project(cli: Cli, tmp_path: Path) -> None:
    cli.ok("keypair-add", "k")
    cli.ok("--project", "other", "keypair-add", "k")
    assert len(cli.json("--project", "other", "keypair-list")) == 1


# --------------------------------------------------------------------------- instance data


GUIDE_METADATA_ROW = "| metadata               | {u'description': u'Small test image'} "


def test_guide_boot_with_key_meta_and_user_data(booted: Cli, api: Api, tmp_path: Path) -> None:
    """``nova boot --image=test-image --flavor=1 smallimage --meta description='Small test
    image'``, ``--key_name mykey``, ``--user-data mydata.file``."""
    booted.ok("keypair-add", "mykey")
    (tmp_path / "mydata.file").write_bytes(b"#cloud-config\nruncmd: [ls]\n")
    out = booted.ok("boot", "--image=cirros", "--flavor=1", "smallimage", "--meta",
                    "description=Small test image", "--key_name", "mykey", "--user-data",
                    str(tmp_path / "mydata.file"), "--host", "h1")
    assert GUIDE_METADATA_ROW in out
    shown = booted.json("show", "smallimage")
    assert (shown["key_name"], shown["metadata"], shown["status"]) == (
        "mykey", {"description": "Small test image"}, "ACTIVE")
    assert shown["OS-EXT-STS:vm_state"] == "active" and shown["flavor"] == "m1.tiny (1)"
    assert shown["created"].endswith("Z") and shown["hostId"] == "h1"
    assert api.user_data("admin", "smallimage") == b"#cloud-config\nruncmd: [ls]\n"
    assert booted.ok("meta", "smallimage", "set", "creator=ops", "role=web") == ""
    assert booted.json("show", "smallimage")["metadata"] == {
        "description": "Small test image", "creator": "ops", "role": "web"}
    booted.ok("meta", "smallimage", "delete", "role", "creator")
    assert booted.json("show", "smallimage")["metadata"] == {"description": "Small test image"}
    # the keypair may go; the server keeps its name (as nova does)
    booted.ok("keypair-delete", "mykey")
    assert booted.json("show", "smallimage")["key_name"] == "mykey"


def test_other_projects_see_an_opaque_host_id(booted: Cli) -> None:
    booted.ok("--project", "alpha", "boot", "a", "--flavor", "1", "--image", "cirros",
              "--host", "h1")
    shown = booted.json("--project", "alpha", "show", "a")
    assert "host" not in shown
    assert shown["hostId"] == hashlib.sha224(b"alphah1").hexdigest()


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def cloud(booted: Cli, tmp_path: Path) -> Cli:
    booted.ok("flavor-create", "gold", "42", "1024", "10", "2", "--is-public", "false")
    booted.ok("keypair-add", "mykey")
    booted.ok("image-create", "--name", "big", "--min-ram", "4096")
    (tmp_path / "bad.pub").write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC= broken\n")
    (tmp_path / "two.pub").write_text(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n" * 2)
    (tmp_path / "big.data").write_bytes(b"u" * 49150)
    os.chdir(tmp_path)
    return booted


BOOT = ("boot", "x", "--image", "cirros", "--host", "h1")
BAD_INPUT: list[tuple[tuple[str, ...], int, str]] = [
    # flavors
    (("--project", "alpha", "flavor-create", "f", "9", "1", "1", "1"), 11,
     "only the 'admin' project may create flavors"),
    (("--project", "alpha", "flavor-delete", "1"), 11, "may delete flavors"),
    (("--project", "alpha", "flavor-key", "1", "set", "a=b"), 11, "may change flavor"),
    (("--project", "alpha", "flavor-access-add", "gold", "alpha"), 11, "may change flavor"),
    (("flavor-create", "m1.tiny", "9", "1", "1", "1"), 4, "Flavor with name m1.tiny already"),
    (("flavor-create", "f", "1", "1", "1", "1"), 4, "Flavor with ID 1 already exists."),
    (("flavor-create", "f", "9", "0", "1", "1"), 2, "memory (MB) must be an integer from 1"),
    (("flavor-create", "f", "9", "1", "-1", "1"), 2, "disk (GB) must be an integer from 0"),
    (("flavor-create", "f", "9", "1", "1", "0"), 2, "VCPUs must be an integer from 1"),
    (("flavor-create", "f", "9", "1", "1", "x"), 2, "VCPUs must be an integer"),
    (("flavor-create", "f", "9", "1", "1", "1", "--swap", "-5"), 2, "swap (MB)"),
    (("flavor-create", "f", "9", "1", "1", "1", "--rxtx-factor", "0"), 2, "rxtx factor"),
    (("flavor-create", "f", "9", "1", "1", "1", "--rxtx-factor", "nan"), 2, "rxtx factor"),
    (("flavor-create", "f", "9", "1", "1", "1", "--is-public", "maybe"), 2,
     "is-public must be true or false"),
    (("flavor-create", "f", "a/b", "1", "1", "1"), 2, "flavor ID 'a/b' must be"),
    (("flavor-create", "", "9", "1", "1", "1"), 2, "flavor name must not be empty"),
    (("flavor-delete", "nosuch"), 3, "flavor 'nosuch' not found"),
    (("flavor-show", "nosuch"), 3, "flavor 'nosuch' not found"),
    (("--project", "alpha", "flavor-show", "gold"), 3, "flavor 'gold' not found"),
    (("flavor-key", "1", "set"), 2, "give at least one"),
    (("flavor-key", "1", "set", "novalue"), 2, "expected KEY=VALUE"),
    (("flavor-key", "1", "unset", "a=b"), 2, "unset takes keys only"),
    (("flavor-key", "1", "unset", "nokey"), 3, "Flavor 1 has no extra specs with key nokey."),
    (("flavor-key", "1", "modify", "a=b"), 2, "'modify' is not one of 'set', 'unset'"),
    (("flavor-access-add", "1", "alpha"), 4, "Can not add access to a public flavor."),
    (("flavor-access-add", "gold", ""), 2, "project must not be empty"),
    (("flavor-access-remove", "gold", "alpha"), 3, "Flavor access not found"),
    (("flavor-access-list", "--flavor", "1"), 4, "not available for public flavors"),
    (("flavor-access-list",), 2, "Missing option '--flavor'"),
    # keypairs
    (("keypair-add", "mykey"), 4, "Key pair 'mykey' already exists."),
    (("keypair-add", ""), 2, "keypair name must not be empty"),
    (("keypair-add", "k", "--pub-key", "bad.pub"), 2, "not a valid OpenSSH public key"),
    (("keypair-add", "k", "--pub-key", "two.pub"), 2, "must be one line"),
    (("keypair-add", "k", "--pub-key", "nosuch.pub"), 2, "cannot read public key file"),
    (("keypair-show", "nosuch"), 3, "keypair 'nosuch'"),
    (("keypair-delete", "nosuch"), 3, "keypair 'nosuch'"),
    (("--project", "alpha", "keypair-show", "mykey"), 3, "keypair 'mykey'"),
    # images
    (("image-create", "--name", "i", "--disk-format", "zip"), 2, "disk format 'zip'"),
    (("image-create", "--name", "i", "--container-format", "box"), 2, "container format 'box'"),
    (("image-create", "--name", "i", "--min-disk", "-1"), 2, "min-disk (GB) must be"),
    (("image-create", "--name", "i", "--min-ram", "lots"), 2, "min-ram (MB) must be"),
    (("image-create", "--name", "i", "--is-public", "yes please"), 2, "--is-public must be"),
    (("image-create", "--name", "i", "--is-public", "true", "--visibility", "public"), 2,
     "not both"),
    (("image-create", "--name", "i", "--property", "novalue"), 2, "expected KEY=VALUE"),
    (("image-create", "--name", "i", "--property", "=v"), 2, "property key must not be empty"),
    (("image-create", "--name", "i", "--location", "not a url"), 2, "is not a URL"),
    (("image-create", "--name", "i", "--copy-from", "http://x/y"), 2, "downloads nothing"),
    (("image-create", "--name", "i", "--file", "nosuch.img"), 2, "cannot read image file"),
    (("image-create", "--name", "i", "--file", "bad.pub", "--location", "http://x/y"), 2,
     "not both"),
    (("image-create", "--name", "cirros"), 4, "image 'cirros' already exists"),
    (("image-create", "--name", "i", "extra"), 2, "give --name NAME (an image), NAME, or"),
    (("image-create",), 2, "give --name NAME"),
    (("image-create", "a", "b", "c"), 2, "give --name NAME"),
    (("image-create", "nosuch", "snap"), 3, "No server with a name or ID of 'nosuch'"),
    (("image-create", "vm1", "cirros"), 4, "image 'cirros' already exists"),
    (("image-create", "vm1", "snap", "--property", "a=b"), 2, "takes no image options"),
    (("image-create", "vm1", "snap", "--disk-format", "raw"), 2, "takes no image options"),
    (("image-show", "nosuch"), 3, "image 'nosuch' not found"),
    (("image-update", "cirros"), 2, "nothing to update"),
    (("image-update", "cirros", "--name", "big"), 4, "image 'big' already exists"),
    (("image-update", "cirros", "--min-disk", "x"), 2, "min-disk (GB) must be"),
    (("image-update", "nosuch", "--name", "n"), 3, "image 'nosuch' not found"),
    (("--project", "alpha", "image-update", "cirros", "--name", "mine"), 11,
     "only its owner may change or delete it"),
    (("--project", "alpha", "image-delete", "cirros"), 11, "only its owner"),
    (("image-delete", "nosuch"), 3, "image 'nosuch' not found"),
    # boot and instance data
    ((*BOOT, "--flavor", "1", "--key-name", "nosuch"), 3, "keypair 'nosuch'"),
    (("--project", "alpha", *BOOT, "--flavor", "1", "--key-name", "mykey"), 3, "keypair"),
    ((*BOOT, "--flavor", "gold"), 3, "never"),  # replaced below: admin may use gold
    ((*BOOT, "--flavor", "1", "--meta", "novalue"), 2, "metadata 'novalue': expected KEY=VALUE"),
    ((*BOOT, "--flavor", "1", "--meta", "k=" + "v" * 256), 2, "longer than 255"),
    ((*BOOT, "--flavor", "1", "--user-data", "nosuch.file"), 2, "cannot read user data file"),
    ((*BOOT, "--flavor", "1", "--user-data", "big.data"), 2, "User data too large."),
    (("boot", "x", "--image", "big", "--host", "h1", "--flavor", "1"), 4,
     "Flavor's memory is too small"),
    (("meta", "vm1", "set"), 2, "give at least one"),
    (("meta", "vm1", "set", "novalue"), 2, "expected KEY=VALUE"),
    (("meta", "vm1", "delete", "a=b"), 2, "delete takes keys only"),
    (("meta", "vm1", "delete", "nokey"), 3, "has no metadata item 'nokey'"),
    (("meta", "vm1", "unset", "a"), 2, "'unset' is not one of 'set', 'delete'"),
    (("meta", "nosuch", "set", "a=b"), 3, "No server"),
]
BAD_INPUT = [case for case in BAD_INPUT if case[2] != "never"]


@pytest.mark.parametrize(("args", "code", "message"), BAD_INPUT,
                         ids=[" ".join(a)[:60] for a, _, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_changes_nothing(
    cloud: Cli, args: tuple[str, ...], code: int, message: str
) -> None:
    files = image_files(cloud)
    line = cloud.fails(*args, code=code)
    assert message in line
    assert image_files(cloud) == files


def test_failed_image_create_with_bytes_leaves_no_file(cloud: Cli) -> None:
    """The bytes are written before the record is committed; a refused record
    (here: a duplicate name) removes them again."""
    result = run_with_stdin(cloud, b"orphan?", "image-create", "--name", "cirros")
    assert result.exit_code == 4 and "already exists" in result.stderr
    assert image_files(cloud) == {}
    shared = run_with_stdin(cloud, b"kept", "image-create", "--name", "k")
    assert shared.exit_code == 0
    again = run_with_stdin(cloud, b"kept", "image-create", "--name", "k")
    assert again.exit_code == 4
    assert image_files(cloud) == {hashlib.sha256(b"kept").hexdigest(): b"kept"}


def test_readme_flavor_list_is_the_commands_output(cli: Cli) -> None:
    """The README's ``flavor-list`` example is what the command prints, byte for byte."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("$ secfw flavor-list\n", 1)[1].split("\n$ ", 1)[0] + "\n"
    assert block == cli.ok("flavor-list")


def test_image_delete_and_port_update_read_by_key(
        cli: Cli, api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """image-delete (are its bytes shared?) and port-update (the port's row) read
    the images and the port by key: loading every document cost seconds at 50k."""
    cli.ok("net-create", "private", "10.0.0.0/24")
    source = tmp_path / "disk"
    source.write_bytes(b"bytes")
    cli.json("image-create", "--name", "one", "--file", str(source), "--is-public", "true")
    cli.json("image-create", "--name", "two", "--file", str(source))
    cli.json("boot", "vm", "--flavor", "1", "--image", "one", "--host", "h1")
    tap = cli.json("port-list")[0]["tap"]

    def no_load(_self: object) -> None:
        raise AssertionError("the command loaded the whole store")

    monkeypatch.setattr(type(api.store), "load", no_load)
    cli.ok("image-delete", "one")
    assert len(image_files(cli)) == 1  # "two" still has these bytes
    cli.ok("image-delete", "two")
    assert image_files(cli) == {}
    row = cli.json("port-update", tap, "--no-port-security")
    assert (row["tap"], row["instance"], row["port_security"]) == (tap, "vm", False)

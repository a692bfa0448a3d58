"""Every command output the operations guide shows, reproduced by secfw.

Each test builds the guide's state with the command line, runs the command the
guide runs and compares its output with the guide's table, embedded below as
text (``&nbsp;`` read as a space, ``<br />`` as a line end; the project does not
read the guide). Tables without generated values must be the same bytes. Where
the guide shows IDs, host IDs or times, only those may differ: both tables are
parsed into cells, those cells are replaced by a placeholder and the tables
boxed again (a longer ID widens its column; the guide also shortened IDs by
hand, ``0821...19f``, and padded around them). Every row, column, header, order
and other value must be the guide's; and the real output must be boxed exactly
as the guide's own tables are (columns as wide as their content).

Where the guide is inconsistent with itself, the test says what it follows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from secfw.cli.output import python2_repr

if TYPE_CHECKING:
    from conftest import Cli

# --------------------------------------------------------------------------- the guide

# "nova flavor-list". In print the table lost two columns: the guide shows marks
# (``\+``, ``|/|``, `` /|``) where Swap and RXTX_Factor/Is_Public were, and row 2 lost a
# ``|`` (``m1.small    2048``). These are the columns and cells the guide shows.
GUIDE_FLAVOR_LIST = """\
+----+-----------+-----------+------+-----------+-------+-------------+
| ID | Name      | Memory_MB | Disk | Ephemeral | VCPUs | extra_specs |
+----+-----------+-----------+------+-----------+-------+-------------+
| 1  | m1.tiny   | 512       | 1    | 0         | 1     | {}          |
| 2  | m1.small  | 2048      | 10   | 20        | 1     | {}          |
| 3  | m1.medium | 4096      | 10   | 40        | 2     | {}          |
| 4  | m1.large  | 8192      | 10   | 80        | 4     | {}          |
| 5  | m1.xlarge | 16384     | 10   | 160       | 8     | {}          |
+----+-----------+-----------+------+-----------+-------+-------------+
"""

GUIDE_SECGROUP_LIST = """\
+---------+-------------+
| Name    | Description |
+---------+-------------+
| default | default     |
| open    | all ports   |
+---------+-------------+
"""

# "nova secgroup-list-rules open" (the guide's lines end with a space before <br />)
GUIDE_RULES_OPEN = """\
+-------------+-----------+---------+-----------+--------------+
| IP Protocol | From Port | To Port | IP Range  | Source Group |
+-------------+-----------+---------+-----------+--------------+
| icmp        | -1        | 255     | 0.0.0.0/0 |              |
| tcp         | 1         | 65535   | 0.0.0.0/0 |              |
| udp         | 1         | 65535   | 0.0.0.0/0 |              |
+-------------+-----------+---------+-----------+--------------+
"""

# what "nova secgroup-create global_http …" printed (the guide shows the table only)
GUIDE_SECGROUP_CREATE = """\
+-------------+-------------------------------------+
| Name        | Description                         |
+-------------+-------------------------------------+
| global_http | allow web traffic from the internet |
+-------------+-------------------------------------+
"""

GUIDE_ADD_RULE_80 = """\
+-------------+-----------+---------+-----------+--------------+
| IP Protocol | From Port | To Port | IP Range  | Source Group |
+-------------+-----------+---------+-----------+--------------+
| tcp         | 80        | 80      | 0.0.0.0/0 |              |
+-------------+-----------+---------+-----------+--------------+
"""

GUIDE_ADD_RULE_443 = """\
+-------------+-----------+---------+-----------+--------------+
| IP Protocol | From Port | To Port | IP Range  | Source Group |
+-------------+-----------+---------+-----------+--------------+
| tcp         | 443       | 443     | 0.0.0.0/0 |              |
+-------------+-----------+---------+-----------+--------------+
"""

GUIDE_RULES_GLOBAL_HTTP = """\
+-------------+-----------+---------+-----------+--------------+
| IP Protocol | From Port | To Port | IP Range  | Source Group |
+-------------+-----------+---------+-----------+--------------+
| tcp         | 80        | 80      | 0.0.0.0/0 |              |
| tcp         | 443       | 443     | 0.0.0.0/0 |              |
+-------------+-----------+---------+-----------+--------------+
"""

# "cinder list", as printed: the ID shortened by hand, two columns padded by hand
GUIDE_CINDER_LIST = """\
+------------+---------+--------------------+------+-------------+-------------+
| ID         | Status  | Display Name       | Size | Volume Type | Attached to |
+------------+---------+--------------------+------+-------------+-------------+
| 0821...19f | active  | test-volume        | 10   | None        |             |
+------------+---------+--------------------+------+-------------+-------------+
"""

# "nova show test-instance". The guide's print cut every line at column 78 (the
# ``\`` and ``/`` marks); only the fault lost text: its end, ``': u'…'}``, is
# nova's fault ``created`` (the time of the fault, between created and updated),
# completed here. The right edge of the Value column follows from that cell.
GUIDE_SHOW_TEST_INSTANCE = """\
+------------------------+---------------------------------------------------------------------------------+
| Property               | Value                                                                           |
+------------------------+---------------------------------------------------------------------------------+
| OS-DCF:diskConfig      | MANUAL                                                                          |
| OS-EXT-STS:power_state | 0                                                                               |
| OS-EXT-STS:task_state  | None                                                                            |
| OS-EXT-STS:vm_state    | error                                                                           |
| accessIPv4             |                                                                                 |
| accessIPv6             |                                                                                 |
| config_drive           |                                                                                 |
| created                | 2013-03-01T19:28:24Z                                                            |
| fault                  | {u'message': u'NoValidHost', u'code': 500, u'created': u'2013-03-01T19:28:25Z'} |
| flavor                 | xxl.super (11)                                                                  |
| hostId                 |                                                                                 |
| id                     | 940f3b2f-bd74-45ad-bee7-eb0a7318aa84                                            |
| image                  | quantal-test (65b4f432-7375-42b6-a9b8-7f654a1e676e)                             |
| key_name               | None                                                                            |
| metadata               | {}                                                                              |
| name                   | test-instance                                                                   |
| security_groups        | [{u'name': u'default'}]                                                         |
| status                 | ERROR                                                                           |
| tenant_id              | 98333a1a28e746fa8c629c83a818ad57                                                |
| updated                | 2013-03-01T19:28:26Z                                                            |
| user_id                | a1ef823458d24a68955fec6f3d390019                                                |
+------------------------+---------------------------------------------------------------------------------+
"""  # noqa: E501

# "nova show smallimage", as printed (an older nova than test-instance's; IDs
# shortened by hand). Corrected in SMALLIMAGE_FIXES below.
GUIDE_SHOW_SMALLIMAGE = """\
+------------------------+-----------------------------------------+
| Property               | Value                                   |
+------------------------+-----------------------------------------+
| OS-DCF:diskConfig      | MANUAL                                  |
| OS-EXT-STS:power_state | 1                                       |
| OS-EXT-STS:task_state  | None                                    |
| OS-EXT-STS:vm_state    | active                                  |
| accessIPv4             |                                         |
| accessIPv6             |                                         |
| config_drive           |                                         |
| created                | 2012-05-16T20:48:23Z                    |
| flavor                 | m1.small                                |
| hostId                 | de0...487                               |
| id                     | 8ec...f915                              |
| image                  | natty-image                             |
| key_name               |                                         |
| metadata               | {u'description': u'Small test image'}   |
| name                   | smallimage2                             |
| private network        | 172.16.101.11                           |
| progress               | 0                                       |
| public network         | 10.4.113.11                             |
| status                 | ACTIVE                                  |
| tenant_id              | e83...482                               |
| updated                | 2012-05-16T20:48:35Z                    |
| user_id                | de3...0a9                               |
+------------------------+-----------------------------------------+
"""

#: Where the smallimage table disagrees with its own boot command
#: (``nova boot --image=test-image --flavor=1 smallimage``) or with the newer
#: test-instance table, secfw follows the command and the newer table:
#: flavor 1 is m1.tiny, shown ``name (ID)``; the image booted is test-image, shown
#: ``name (ID)``; the server is named smallimage; no keypair reads ``None``; and
#: the newer nova lists security_groups.
SMALLIMAGE_FIXES = {
    "flavor": "m1.tiny (1)",
    "image": "test-image (65b4f432-7375-42b6-a9b8-7f654a1e676e)",
    "key_name": "None",
    "name": "smallimage",
    "security_groups": "[{u'name': u'default'}]",
}

# --------------------------------------------------------------------------- comparing

#: IDs (UUIDs, keystone's 32 hex digits, SHA-224 host IDs, the guide's ``0821...19f``)
#: and times; rows whose whole value is an ID (a project name is secfw's tenant ID).
GENERATED = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    r"|\b[0-9a-f]{56}\b|\b[0-9a-f]{32}\b|\b[0-9a-f]{3,4}\.\.\.[0-9a-f]{3,4}\b"
    r"|\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\b")
ID_ROWS = ("hostId", "id", "tenant_id", "user_id")

Cells = list[list[str]]


def cells(table: str) -> Cells:
    """The cells of a boxed table, header first (no cell of these tables holds ``|``)."""
    return [[cell.strip() for cell in line.split("|")[1:-1]]
            for line in table.splitlines() if line.startswith("|")]


def box(rows: Cells) -> str:
    """``rows`` boxed as nova's tables are: each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    border = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in rows]
    return "\n".join([border, lines[0], border, *lines[1:], border]) + "\n"


def generated_values_hidden(rows: Cells) -> str:
    """``rows`` boxed with every ID and time replaced by ``<generated>``."""
    hidden = [[GENERATED.sub("<generated>", cell) for cell in row] for row in rows]
    for row in hidden:
        if row[0] in ID_ROWS and row[1]:
            row[1] = "<generated>"
    return box(hidden)


def assert_guide_table(output: str, guide: str) -> None:
    """``output`` is the guide's table but for IDs and times, and is boxed as nova boxes."""
    assert output == box(cells(output))
    assert generated_values_hidden(cells(output)) == generated_values_hidden(cells(guide))


# --------------------------------------------------------------------------- examples


def test_flavor_list(cli: Cli) -> None:
    assert cli.ok("flavor-list") == GUIDE_FLAVOR_LIST


def test_security_group_examples(cli: Cli) -> None:
    """The "open" group, then global_http rule by rule, as the guide types them."""
    cli.ok("--project", "demo", "secgroup-create", "open", "all ports")
    for proto, low, high in (("icmp", "-1", "255"), ("tcp", "1", "65535"),
                             ("udp", "1", "65535")):
        cli.ok("--project", "demo", "secgroup-add-rule", "open", proto, low, high, "0.0.0.0/0")
    assert cli.ok("--project", "demo", "secgroup-list") == GUIDE_SECGROUP_LIST
    assert cli.ok("--project", "demo", "secgroup-list-rules", "open") == GUIDE_RULES_OPEN
    assert cli.ok("secgroup-create", "global_http",
                  "allow web traffic from the internet") == GUIDE_SECGROUP_CREATE
    assert cli.ok("secgroup-add-rule", "global_http", "tcp", "80", "80",
                  "0.0.0.0/0") == GUIDE_ADD_RULE_80
    assert cli.ok("secgroup-add-rule", "global_http", "tcp", "443", "443",
                  "0.0.0.0/0") == GUIDE_ADD_RULE_443
    assert cli.ok("secgroup-list-rules", "global_http") == GUIDE_RULES_GLOBAL_HTTP


def test_cinder_list(cli: Cli) -> None:
    cli.ok("volume-create", "--display-name", "test-volume", "10")
    assert_guide_table(cli.ok("volume-list"), GUIDE_CINDER_LIST)


def test_show_test_instance(cli: Cli) -> None:
    """A flavor no registered host can hold: ERROR with nova's NoValidHost fault."""
    cli.ok("net-create", "private", "10.0.0.0/24")
    cli.ok("image-create", "quantal-test", "--visibility", "public")
    cli.ok("host-add", "compute1", "--vcpus", "8", "--ram-mb", "16384", "--disk-gb", "200")
    cli.ok("flavor-create", "xxl.super", "11", "65536", "100", "16")
    cli.ok("quota-update", "--ram", "131072", "--cores", "32")
    booted = cli.ok("boot", "test-instance", "--flavor", "xxl.super", "--image", "quantal-test")
    shown = cli.ok("show", "test-instance")
    assert booted == shown
    assert_guide_table(shown, GUIDE_SHOW_TEST_INSTANCE)


def smallimage_expected() -> str:
    """The guide's smallimage table with :data:`SMALLIMAGE_FIXES` applied."""
    rows = cells(GUIDE_SHOW_SMALLIMAGE)
    fixed = dict(row for row in rows[1:] if len(row) == 2)  # type: ignore[misc]
    fixed.update(SMALLIMAGE_FIXES)
    return box([rows[0], *([key, fixed[key]] for key in sorted(fixed))])


def test_show_smallimage(cli: Cli) -> None:
    """On the networks private and public, after nine servers took .2 to .10 of each
    (the guide's addresses are .11), seen by its project (an opaque hostId)."""
    cli.ok("net-create", "private", "172.16.101.0/24")
    cli.ok("net-create", "public", "10.4.113.0/24")
    cli.ok("image-create", "test-image", "--visibility", "public")
    nics = ("--nic", "net-id=private", "--nic", "net-id=public", "--host", "compute1")
    for number in range(2, 11):
        cli.ok("--project", "demo", "boot", f"before{number}", "--image", "test-image",
               "--flavor", "1", *nics)
    cli.ok("--project", "demo", "boot", "--image=test-image", "--flavor=1", "smallimage",
           "--meta", "description=Small test image", *nics)
    assert_guide_table(cli.ok("--project", "demo", "show", "smallimage"), smallimage_expected())


def test_the_guides_other_rows(cli: Cli) -> None:
    """What the two examples do not show together: a keypair's name, several groups
    and addresses (IPv4, IPv6, floating) on one network row, the admin's hostId."""
    cli.ok("net-create", "private", "10.0.0.0/24", "--ipv6-cidr", "2001:db8::/64")
    cli.ok("image-create", "cirros", "--visibility", "public")
    cli.ok("keypair-add", "mykey")
    cli.ok("secgroup-create", "web", "web")
    cli.ok("floating-ip-pool-create", "nova", "192.0.2.0/24")
    cli.ok("boot", "vm", "--image", "cirros", "--flavor", "1", "--key-name", "mykey",
           "--security-groups", "default,web", "--host", "compute1")
    cli.ok("floating-ip-create")
    cli.ok("add-floating-ip", "vm", "192.0.2.2")
    rows = dict(row for row in cells(cli.ok("show", "vm"))[1:])  # type: ignore[misc]
    assert rows["key_name"] == "mykey"
    assert rows["security_groups"] == "[{u'name': u'default'}, {u'name': u'web'}]"
    assert rows["private network"] == "10.0.0.2, 2001:db8::2, 192.0.2.2"
    assert rows["hostId"] == "compute1" and "host" not in rows


def test_json_keeps_objects(cli: Cli) -> None:
    """``-f json`` is the same server as data: objects and lists, not their reprs."""
    cli.ok("net-create", "private", "10.0.0.0/24")
    cli.ok("image-create", "cirros", "--visibility", "public")
    cli.ok("boot", "vm", "--image", "cirros", "--flavor", "1", "--meta", "role=web",
           "--host", "compute1")
    shown = cli.json("show", "vm")
    assert shown["metadata"] == {"role": "web"}
    assert shown["security_groups"] == [{"name": "default"}]
    assert shown["networks"] == {"private": ["10.0.0.2"]}
    assert (shown["key_name"], shown["OS-EXT-STS:task_state"]) == (None, None)
    assert (shown["OS-EXT-STS:power_state"], shown["progress"], shown["host"]) == (
        1, 0, "compute1")


def readme_output(command: str) -> str:
    """What the README shows after ``$ secfw COMMAND`` (up to the next prompt or fence)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    after = readme.split(f"$ secfw {command}\n", 1)[1]
    return re.split(r"\n(?:\$ |```)", after, maxsplit=1)[0] + "\n"


@pytest.mark.parametrize(("command", "guide"), [
    ("--project demo secgroup-list", GUIDE_SECGROUP_LIST),
    ("--project demo secgroup-list-rules open", GUIDE_RULES_OPEN),
    ('secgroup-create global_http "allow web traffic from the internet"',
     GUIDE_SECGROUP_CREATE),
    ("flavor-list", GUIDE_FLAVOR_LIST),
    ("volume-list", GUIDE_CINDER_LIST),
    ("show test-instance", GUIDE_SHOW_TEST_INSTANCE),
    ("--project demo show smallimage", smallimage_expected()),
])
def test_the_readme_shows_the_guides_tables(command: str, guide: str) -> None:
    """The README's examples are the guide's tables (but for IDs and times); that they
    are the commands' real output is checked above and in test_sched_cli.py."""
    assert_guide_table(readme_output(command), guide)


@pytest.mark.parametrize(("value", "printed"), [
    ({}, "{}"),
    ({"message": "NoValidHost", "code": 500}, "{u'message': u'NoValidHost', u'code': 500}"),
    ([{"name": "default"}], "[{u'name': u'default'}]"),
    ({"it's": 'say "hi"'}, "{u\"it's\": u'say \"hi\"'}"),
    ({"caf\u00e9": "\u2603\n"}, "{u'caf\\xe9': u'\\u2603\\n'}"),
    ([None, True, 1.5], "[None, True, 1.5]"),
])
def test_python2_repr(value: object, printed: str) -> None:
    """Python 2's repr of unicode data: quotes chosen as Python 2 chose them, every
    non-ASCII or control character escaped (a cell stays one printable line)."""
    assert python2_repr(value) == printed

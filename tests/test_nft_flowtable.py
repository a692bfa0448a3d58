"""The optional flowtable fast path, without a kernel: the probe's parsing, the
rendered table, the modes and what ``on`` refuses (backends/nftables/flowtable.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from test_ipt_render import small

from secfw.backends.nftables.flowtable import (
    FlowtablePath,
    FlowtableSupport,
    parse_probe,
    refusal,
    render_flowtable,
)
from secfw.cli.main import main
from secfw.config import load_config
from secfw.errors import BackendError, ConfigError

ENOENT = ("/dev/stdin:2:12-13: Error: Could not process rule: No such file or directory\n"
          " flowtable ft {\n           ^^\n")
MISSING = FlowtableSupport(False, "flowtable … hook ingress: Could not process rule: "
                                  "No such file or directory (no nf_flow_table in this kernel)")


def test_probe_parsing() -> None:
    assert parse_probe(0, "") == FlowtableSupport(True)
    assert parse_probe(1, ENOENT) == MISSING
    assert parse_probe(1, "Error: Operation not supported\n").reason == (
        "flowtable … hook ingress: Operation not supported")
    assert parse_probe(127, "").reason == "flowtable … hook ingress: nft exit status 127"
    assert parse_probe(1, "sh: nft: not found\n").reason.endswith("sh: nft: not found")


def test_render_lists_the_devices_and_offloads_established_flows_after_secfw() -> None:
    text = render_flowtable(["tapb-01", "tapa-02", "tapb-01"])
    assert text == (
        "add table inet secfw_flow\ndelete table inet secfw_flow\n"
        "table inet secfw_flow {\n"
        "  flowtable ft {\n"
        "    hook ingress priority filter\n"
        '    devices = { "tapa-02", "tapb-01" }\n'
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority 10; policy accept;\n"
        "    ct state established meta l4proto { tcp, udp } flow add @ft\n"
        "  }\n"
        "}\n")
    assert render_flowtable([]) == "add table inet secfw_flow\ndelete table inet secfw_flow\n"


@pytest.mark.parametrize("name", ['tap"x', "tap x", "tap;drop", "t" * 16, ""])
def test_device_names_are_never_syntax(name: str) -> None:
    with pytest.raises(BackendError, match="not an interface name"):
        render_flowtable([name])


def test_modes() -> None:
    available = FlowtableSupport(True)
    assert refusal("off", "bridged", None) is None
    assert refusal("auto", "routed", available) is None
    assert refusal("on", "routed", MISSING) == f"flowtable: not available on this kernel " \
                                               f"({MISSING.reason})"
    assert "routed hosts" in (refusal("on", "bridged", available) or "")
    with pytest.raises(ValueError, match="unknown mode 'yes'"):
        refusal("yes", "routed", available)


def test_on_without_a_flowtable_refuses_every_port_and_auto_none() -> None:
    hf = small()
    required = FlowtablePath("on", "routed", MISSING)
    assert not required.enabled
    refused = required.refused(hf)
    assert set(refused) == {p.port_id for p in hf.ports} and hf.ports
    assert all("not available on this kernel" in why for why in refused.values())
    assert FlowtablePath("auto", "routed", MISSING).refused(hf) == {}
    assert not FlowtablePath("auto", "routed", MISSING).enabled
    assert FlowtablePath("auto", "routed", FlowtableSupport(True)).enabled
    assert FlowtablePath("off", "routed").refused(hf) == {}


def test_config_and_cli(tmp_path: Path) -> None:
    conf = tmp_path / "secfw.conf"
    conf.write_text("[DEFAULT]\nflowtable = Auto\n")
    assert load_config(str(conf)).flowtable == "auto"
    assert load_config(None).flowtable == "off"
    conf.write_text("[DEFAULT]\nflowtable = yes\n")
    with pytest.raises(ConfigError, match="flowtable must be one of off, auto, on"):
        load_config(str(conf))
    store = f"sqlite:///{tmp_path}/s.db"
    done = CliRunner().invoke(main, ["--store", store, "agent", "--host", "h1", "--backend",
                                     "iptables", "--flowtable", "on", "--once"])
    assert done.exit_code == 2 and "needs --backend nftables" in done.output

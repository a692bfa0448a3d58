"""``secfw audit report``: the HTML page looked at in a real headless Chromium.

The operations guide's cloud, plus an instance and a group whose names are HTML
(names are data). The page is written by the CLI, loaded by ``chromium --headless
--dump-dom`` inside a network namespace of its own (``unshare --net``: the page
must need no network), and the DOM Chromium built is checked — no screenshot:

* each ssh matrix cell equals ``audit explain``'s verdict for that pair;
* the exposure table names tools1 (every port open to the internet) and the lint
  table the unused group;
* the hostile names are text: no element or script came from them (the title is
  still ours, nothing set ``data-pwned``).
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from secfw.api import Api
from secfw.audit.explain import FlowQuery, explain
from secfw.audit.policy import CloudPolicy
from secfw.lab.demo import HOST, build_guide_cloud
from secfw.store import open_store

HOSTILE_INSTANCE = '<img src=x onerror="document.body.dataset.pwned=1">'
HOSTILE_GROUP = "<script>document.title='pwned'</script>"


class _Dom(HTMLParser):
    """The cells of every table (with their data- attributes), the title, the tags."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, Any]] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.title = ""
        self._in: list[str] = []
        self._table: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in.append(tag)
        if tag == "table":
            self._table = dict(attrs)
        if tag == "td":
            self.cells.append({"table": self._table, **dict(attrs), "text": ""})

    def handle_endtag(self, tag: str) -> None:
        if self._in and self._in[-1] == tag:
            self._in.pop()

    def handle_data(self, data: str) -> None:
        if self._in and self._in[-1] == "title":
            self.title += data
        elif self._in and self._in[-1] == "td" and self.cells:
            self.cells[-1]["text"] += data


def chromium_dom(page: Path) -> _Dom:
    """The DOM headless Chromium built for ``page``, with no network at all and a
    profile of its own (two Chromiums on one profile hand over to each other: the
    suite runs in parallel)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser is not None, "chromium is one of the Makefile's APT_PACKAGES"
    done = subprocess.run(
        ["unshare", "--net", browser, "--headless", "--no-sandbox", "--disable-gpu",
         f"--user-data-dir={page.parent / 'chromium-profile'}",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True)
    dom = _Dom()
    dom.feed(done.stdout)
    return dom


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_report_in_headless_chromium(cli: Any, store_url: str, tmp_path: Path) -> None:
    api = Api(open_store(store_url))
    build_guide_cloud(api)
    api.secgroup_create("alpha", HOSTILE_GROUP, "unused")
    api.boot("alpha", HOSTILE_INSTANCE, "m1.tiny", "cirros", HOST, ["global_http"],
             ["alpha-net"])
    cp = CloudPolicy(api.snapshot())
    api.store.close()
    page, markdown = tmp_path / "report.html", tmp_path / "report.md"
    assert cli.ok("--project", "alpha", "audit", "report", "--html", str(page),
                  "--markdown", str(markdown)) == ""
    dom = chromium_dom(page)

    assert dom.title == "secfw audit report: project alpha"
    assert not any("pwned" in (attrs.get("data-pwned") or "") or tag == "img" or
                   (tag == "script") for tag, attrs in dom.tags)
    by_label = {f"{v.instance.name} ({v.port.ip})": v for v in cp.ports.values()
                if v.instance.project == "alpha"}
    ssh = [c for c in dom.cells if c["table"].get("data-service") == "ssh tcp/22"]
    assert len(ssh) == len(by_label) ** 2
    checked = 0
    for cell in ssh:
        source, target = by_label[cell["data-from"]], by_label[cell["data-to"]]
        if source is target:
            assert cell["text"] == "-"
            continue
        verdict = explain(cp, FlowQuery(source.port.ip, target.port.ip, 6, 22))["verdict"]
        assert cell["text"] == verdict, (cell, verdict)
        checked += 1
    assert checked == len(by_label) * (len(by_label) - 1)
    assert {c["text"] for c in ssh} == {"allow", "deny", "-"}

    exposure = [c["text"] for c in dom.cells if c["table"].get("class") == "exposure"]
    assert "tools1" in exposure and "internet" in exposure
    lint = [c["text"] for c in dom.cells if c["table"].get("class") == "lint"]
    assert "unused_group" in lint and HOSTILE_GROUP in lint  # as text

    text = markdown.read_text()
    assert "### ssh tcp/22" in text and "&lt;script&gt;" in text and "<script>" not in text

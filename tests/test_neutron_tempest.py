"""Tempest's security-group API tests against ``secfw api serve`` behind a real Keystone.

The test starts, in a temporary directory and on free loopback ports:

1. PyPI ``keystone`` on SQLite (``keystone-manage db_sync``, ``fernet_setup``,
   ``credential_setup``), served by gunicorn from a config file with *no*
   command-line arguments: oslo.config parses the process's argv, so any
   gunicorn argument would reach keystone's option parser and stop it;
2. ``keystone-manage bootstrap`` (admin user, project, role; the identity
   endpoint), once gunicorn has told its port;
3. ``secfw api serve`` with ``auth_strategy = keystone`` (keystonemiddleware's
   auth_token validating tokens against that Keystone), registered in the
   catalog as the ``network`` service;
4. tempest, unmodified, with a minimal ``tempest.conf`` (identity v3, dynamic
   credentials from the admin account, no isolated networks, IPv6 on) running
   ``tempest.api.network.test_security_groups`` and ``..._negative``.

Every selected test must pass: 45 (``SecGroupTest`` and ``SecGroupIPv6Test``:
9 each; ``NegativeSecGroupTest``: 13, ``NegativeSecGroupIPv6Test``: 14), none
skipped. The packages are the ``tempest`` extra (``make conformance``, which
sets SECFW_REQUIRE_CONFORMANCE=1 so their absence fails instead of skipping).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.conformance

BIN = Path(sys.executable).parent
#: Start-up waits (not assertions): Keystone's first import takes ~10 s on a
#: loaded 2-core VM.
START_TIMEOUT_S = 120.0
PASSWORD = "secfw-tempest-admin"
REGION = "RegionOne"
TEMPEST_REGEX = r"^tempest\.api\.network\.test_security_groups"
#: 9 + 9 positive, 13 + 14 negative (the IPv6 class adds the prefix-version test).
EXPECTED_TESTS = 45
#: the extensions secfw serves (``GET /v2.0/extensions``), given to tempest so
#: that it skips nothing it would otherwise probe for.
EXTENSIONS = ("security-group,allowed-address-pairs,port-security,project-id,"
              "standard-attr-description,standard-attr-timestamp,"
              "standard-attr-revisions,security-groups-normalized-cidr")


def _require(tool: str) -> Path:
    path = BIN / tool
    if not path.exists():
        if os.environ.get("SECFW_REQUIRE_CONFORMANCE") == "1":
            pytest.fail(f"{path} missing: pip install -e '.[tempest]'")
        pytest.skip(f"{tool} not installed (the tempest extra)")
    return path


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes]) -> re.Match[str]:
    """The first match of ``pattern`` in the growing file ``log`` (a server's
    output); fails if the server exits or stays silent for START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{log.name}: no {pattern!r}; output:\n{log.read_text()[-4000:]}")


def _terminate(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def _keystone_conf(base: Path) -> Path:
    conf = base / "keystone.conf"
    conf.write_text(
        "[DEFAULT]\n"
        f"log_file = {base / 'keystone.log'}\n"
        "[database]\n"
        f"connection = sqlite:///{base / 'keystone.db'}\n"
        "[token]\nprovider = fernet\n"
        f"[fernet_tokens]\nkey_repository = {base / 'fernet-keys'}\n"
        f"[fernet_receipts]\nkey_repository = {base / 'fernet-keys'}\n"
        f"[credential]\nkey_repository = {base / 'credential-keys'}\n"
        # bcrypt's minimum cost: tempest creates a user per credential set, and
        # the default cost (12) makes each password check ~0.3 s of CPU here.
        "[identity]\npassword_hash_rounds = 4\n"
        "[cache]\nenabled = false\n"
    )
    return conf


def _keystone_manage(conf: Path, *args: str) -> None:
    subprocess.run([str(BIN / "keystone-manage"), "--config-file", str(conf), *args],
                   check=True, capture_output=True, timeout=300)


def _start_keystone(base: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Keystone on a free port; returns the process and its ``/v3`` URL."""
    conf = _keystone_conf(base)
    _keystone_manage(conf, "db_sync")
    for command in ("fernet_setup", "credential_setup"):
        _keystone_manage(conf, command, "--keystone-user", "root", "--keystone-group", "root")
    # gunicorn reads ./gunicorn.conf.py when given no arguments (its default
    # config file); the WSGI app is named there (wsgi_app, gunicorn >= 20.1).
    # One synchronous worker: one request at a time, since concurrent writers
    # on keystone's SQLite file failed with "database is locked" on a loaded VM.
    (base / "gunicorn.conf.py").write_text(
        'bind = ["127.0.0.1:0"]\n'
        'wsgi_app = "keystone.wsgi.api:application"\n'
        "workers = 1\nworker_class = 'sync'\ntimeout = 120\n"
    )
    log = base / "gunicorn.log"
    env = {**os.environ, "OS_KEYSTONE_CONFIG_FILES": str(conf)}
    with log.open("wb") as out:
        proc = subprocess.Popen([str(BIN / "gunicorn")], cwd=base, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        port = _wait_for(log, r"Listening at: http://127\.0\.0\.1:(\d+)", proc).group(1)
        url = f"http://127.0.0.1:{port}/v3"
        _keystone_manage(conf, "bootstrap", "--bootstrap-password", PASSWORD,
                         "--bootstrap-admin-url", url, "--bootstrap-internal-url", url,
                         "--bootstrap-public-url", url, "--bootstrap-region-id", REGION)
        _wait_for(log, r"Booting worker", proc)
    except BaseException:
        _terminate(proc)
        raise
    return proc, url


def _http(url: str, body: dict[str, Any], token: str | None = None) -> tuple[Any, str]:
    """POST JSON; the decoded answer and its X-Subject-Token header."""
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"X-Auth-Token": token} if token else {})})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read()), answer.headers.get("X-Subject-Token", "")


def _register_network(keystone: str, endpoint: str) -> None:
    """The ``network`` service and its public endpoint (secfw) in the catalog."""
    _, token = _http(f"{keystone}/auth/tokens", {"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": "admin", "domain": {"id": "default"}, "password": PASSWORD}}},
        "scope": {"project": {"name": "admin", "domain": {"id": "default"}}},
    }})
    service, _ = _http(f"{keystone}/services",
                       {"service": {"type": "network", "name": "neutron"}}, token)
    for interface in ("public", "internal", "admin"):
        _http(f"{keystone}/endpoints", {"endpoint": {
            "service_id": service["service"]["id"], "interface": interface,
            "url": endpoint, "region_id": REGION}}, token)


def _start_secfw(base: Path, keystone: str) -> tuple[subprocess.Popen[bytes], str]:
    """``secfw api serve`` with auth_strategy keystone; the process and its URL."""
    auth_root = keystone.removesuffix("/v3")
    config = base / "secfw-api.conf"
    config.write_text(
        "[DEFAULT]\nauth_strategy = keystone\n"
        "[keystone_authtoken]\n"
        f"www_authenticate_uri = {auth_root}\nauth_url = {auth_root}\n"
        "auth_type = password\nproject_domain_name = Default\nuser_domain_name = Default\n"
        f"project_name = admin\nusername = admin\npassword = {PASSWORD}\n"
    )
    log = base / "secfw-api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "secfw"), "--store", f"sqlite:///{base / 'secfw.db'}", "api", "serve",
             "--listen", "127.0.0.1:0", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        url = _wait_for(log, r"listening on (http://\S+?)/? ", proc).group(1)
    except BaseException:
        _terminate(proc)
        raise
    return proc, url


def _tempest_workspace(base: Path, keystone: str) -> Path:
    """A tempest workspace (``.stestr.conf`` + ``etc/tempest.conf``) in ``base``;
    not registered with ``tempest init`` (that writes to ~/.tempest)."""
    import tempest

    site = Path(tempest.__file__).parent.parent
    work = base / "tempest"
    (work / "etc").mkdir(parents=True)
    (work / ".stestr.conf").write_text(
        f"[DEFAULT]\ntest_path={site / 'tempest' / 'test_discover'}\ntop_dir={site}\n"
    )
    (work / "etc" / "tempest.conf").write_text(
        f"[DEFAULT]\nlog_file = {work / 'tempest.log'}\n"
        f"[oslo_concurrency]\nlock_path = {work / 'locks'}\n"
        "[auth]\nuse_dynamic_credentials = true\n"
        # Isolated networks would need subnets and routers: not what secfw serves.
        "create_isolated_networks = false\n"
        f"admin_username = admin\nadmin_password = {PASSWORD}\n"
        "admin_project_name = admin\nadmin_domain_name = Default\n"
        f"[identity]\nuri_v3 = {keystone}\nauth_version = v3\nregion = {REGION}\n"
        "[identity-feature-enabled]\napi_v2 = false\n"
        "[service_available]\nneutron = true\nnova = false\ncinder = false\n"
        "glance = false\nswift = false\n"
        f"[network-feature-enabled]\nipv6 = true\napi_extensions = {EXTENSIONS}\n"
        "[enforce_scope]\nneutron = false\n"
        "[validation]\nrun_validation = false\n"
    )
    return work


def _results(work: Path) -> dict[str, str]:
    """test id → status (``success``, ``fail``, ``skip``, …) of the last run,
    read from stestr's subunit stream (class-level errors included)."""
    from subunit import ByteStreamToStreamResult
    from testtools import StreamToDict

    stream = subprocess.run([str(BIN / "stestr"), "last", "--subunit"], cwd=work,
                            capture_output=True, check=True, timeout=120).stdout
    results: dict[str, str] = {}

    def record(test: dict[str, Any]) -> None:
        results[re.sub(r"\[.*\]$", "", test["id"])] = test["status"]

    collector = StreamToDict(record)
    collector.startTestRun()
    ByteStreamToStreamResult(io.BytesIO(stream), non_subunit_name="stdout").run(collector)
    collector.stopTestRun()
    return results


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """Keystone and secfw running; yields (base directory, Keystone's /v3 URL)."""
    for tool in ("keystone-manage", "gunicorn", "stestr", "secfw"):
        _require(tool)
    base = tmp_path_factory.mktemp("tempest")
    keystone, keystone_url = _start_keystone(base)
    try:
        secfw, secfw_url = _start_secfw(base, keystone_url)
        try:
            _register_network(keystone_url, secfw_url)
            yield base, keystone_url
        finally:
            _terminate(secfw)
    finally:
        _terminate(keystone)


@pytest.mark.timeout(1800)
def test_tempest_security_group_tests_pass(cloud: tuple[Path, str]) -> None:
    """Every test tempest selects for security groups passes, none skipped."""
    base, keystone = cloud
    work = _tempest_workspace(base, keystone)
    env = {**os.environ, "TEMPEST_CONFIG_DIR": str(work / "etc"),
           "TEMPEST_CONFIG": "tempest.conf"}
    run = subprocess.run([str(BIN / "stestr"), "run", "--concurrency", "2", TEMPEST_REGEX],
                         cwd=work, env=env, capture_output=True, text=True, timeout=1700,
                         check=False)
    results = _results(work)
    tests = {k: v for k, v in results.items() if k.startswith("tempest.api.network.")}
    bad = {k: v for k, v in results.items() if v != "success"}
    detail = run.stdout[-6000:] if bad or run.returncode else ""
    assert not bad, f"{bad}\n{detail}"
    assert run.returncode == 0, detail
    assert len(tests) == EXPECTED_TESTS, sorted(tests)

# secfw — `make demo` and `make test` do all set-up on a fresh Debian/Ubuntu machine (as root).
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# Debian packages the engine, the lab and the tests need (nft + libnftables for the
# nftables backend, iproute2 for namespaces/veth, conntrack/iperf3 for tests and bench;
# systemd-analyze and util-linux's setpriv/unshare/mountpoint for the systemd unit's tests;
# etcd-server for the etcd store's tests: they start their own etcd on 127.0.0.1;
# chromium for the audit report's test: the page is loaded in headless Chromium).
APT_PACKAGES := nftables libnftables1 iproute2 iptables ipset conntrack iperf3 kmod procps libpcap0.8 \
                systemd util-linux etcd-server chromium
APT_TOOLS    := nft ip iptables ipset conntrack iperf3 sysctl systemd-analyze setpriv unshare mountpoint \
                etcd chromium

.PHONY: all deps venv test unit netns lint demo bench conformance clean

all: test

deps:
	@missing=""; for t in $(APT_TOOLS); do command -v $$t >/dev/null 2>&1 || missing=1; done; \
	 ls /usr/lib/*/libnftables.so.1 /usr/lib/*/libpcap.so.0.8 >/dev/null 2>&1 || missing=1; \
	 $(PYTHON) -c 'import venv, ensurepip' >/dev/null 2>&1 || missing=1; \
	 if [ -n "$$missing" ]; then \
	   echo "installing system packages: $(APT_PACKAGES)"; \
	   apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	     $(APT_PACKAGES) python3-venv python3-pip >/dev/null; \
	 fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Bytecode for every module, refreshed where stale: an installed package has it from
# install time, but this checkout is installed editable and run with
# PYTHONDONTWRITEBYTECODE=1 on the CI/bench VMs, where every `secfw` process then
# compiled secfw's modules again: +60 ms of CPU for `import secfw.cli.main`, +135 ms for the
# agent's modules, on the 2-core VM.
venv: deps $(STAMP)
	@$(PY) -m compileall -q src

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q -m "not netns and not conformance"

netns: venv
	$(VENV)/bin/pytest -q -m netns

# Three workers on two cores: most namespace tests wait on packets and timers, not
# the CPU. --dist loadscope keeps a module's (or class's) tests on one worker, so
# module-scoped labs are built once. Every test owns uniquely named namespaces.
PYTEST_WORKERS ?= 3
test: venv lint
	$(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) --dist loadscope -m "not conformance"

# Unmodified OpenStack clients against `secfw api serve` (the conformance extra:
# python-openstackclient + openstacksdk, and keystonemiddleware for the keystone
# extra: ~65 s to install on a loaded 2-core VM; the tests 1.5-3 min), and Neutron
# loading secfw's firewall driver through its entry point (the neutron extra: 3.5
# more minutes of install on that VM, 8 in a fresh venv; its test takes seconds),
# and tempest's 45 security-group API tests through a real Keystone (the tempest
# extra: tempest 47 + keystone 30 + gunicorn; see README, "The Neutron API").
conformance: venv
	$(PY) -m pip install -q -e '.[conformance,keystone,neutron,tempest]'
	SECFW_REQUIRE_CONFORMANCE=1 $(VENV)/bin/pytest -q -m conformance \
	  tests/test_neutron_openstackclient.py tests/test_neutron_driver_conformance.py \
	  tests/test_neutron_tempest.py tests/netns/test_neutron_bench_harness.py

demo: venv
	$(VENV)/bin/secfw demo

# Every section in turn within one budget, BENCH_BUDGET seconds (an hour): the main
# suite and Neutron's comparison get budgets from it, the sections bounded by their
# sizes have their last time reserved (secfw.bench.whole; bench/results/sections.json
# records each section's budget and time, and latest.md states them).
# `make bench BENCH_ARGS=--quick` passes options through (see bench/README.md).
BENCH_BUDGET ?= 3600
bench: venv
	@# the neutron extra: the side-by-side section runs Neutron's own iptables driver
	@$(PY) -c 'import matplotlib, neutron' 2>/dev/null || $(PY) -m pip install -q -e '.[bench,neutron]'
	$(PY) -m secfw.bench.whole --budget $(BENCH_BUDGET) --main-args='$(BENCH_ARGS)' \
	  --backends-args='$(BACKENDS_ARGS)' --floating-args='$(FLOATING_ARGS)' \
	  --multihost-args='$(MULTIHOST_ARGS)' --manyhosts-args='$(MANYHOSTS_ARGS)' \
	  --neutron-args='$(NEUTRON_BENCH_ARGS)'

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

# shmbroker developer entry points.
#
#   make setup      system packages (apt) + .venv with both distributions installed editable
#   make run        run the daemon in the foreground: make run ARGS="--config config/x.toml"
#   make test       lint + typecheck + pytest (PYTEST_ARGS="-k foo -x")
#   make lint | typecheck | fmt | demo | bench | stress | fuzz | clean
#
# `make setup` is idempotent: each step leaves a stamp file inside .venv, so a
# second run does nothing. Editing pyproject.toml or client/pyproject.toml
# re-runs the pip install; `make clean` starts over.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

# Debian's own interpreter when present: a python under /root (pyenv) cannot be
# run by the other uids that tests and the demo switch to, nor by the service.
PYTHON ?= $(if $(wildcard /usr/bin/python3),/usr/bin/python3,python3)
VENV := .venv
BIN := $(VENV)/bin
VPY := $(BIN)/python
ARGS ?=
PYTEST_ARGS ?=

# Debian packages needed to build systemd-python (and any other C extension).
# tmux: tests/integration/test_top.py runs `shmbrokerctl top` in a real terminal.
APT_PACKAGES := libsystemd-dev pkg-config gcc tmux
# Only for Debian's own interpreter (/usr/bin/python3): its headers and venv
# support are separate packages. Another interpreter (pyenv, a self-built
# Python) carries its own headers and venv, so these are not added for it.
APT_PYTHON_PACKAGES := python3 python3-dev python3-venv

STAMP_SYSDEPS := $(VENV)/.stamp-sysdeps
STAMP_VENV := $(VENV)/.stamp-venv
STAMP_INSTALL := $(VENV)/.stamp-install

.PHONY: help setup run test lint typecheck fmt demo bench stress fuzz clean install uninstall

help:
	@echo "targets: setup run test lint typecheck fmt demo bench stress fuzz clean"
	@echo "  make run ARGS='...'          run shmbrokerd in the foreground"
	@echo "  make test PYTEST_ARGS='...'  lint, typecheck, then pytest"
	@echo "  PYTHON=$(PYTHON) (interpreter used to create $(VENV))"

setup: $(STAMP_INSTALL)

# 1. System packages. dpkg -s is cheap, but the stamp makes re-runs free.
$(STAMP_SYSDEPS):
	@need="$(APT_PACKAGES)"; \
	if command -v "$(PYTHON)" >/dev/null 2>&1; then \
	  prefix="$$("$(PYTHON)" -c 'import sys; print(sys.base_prefix)')"; \
	  if [ "$$prefix" = /usr ]; then need="$$need $(APT_PYTHON_PACKAGES)"; fi; \
	elif [ "$(PYTHON)" = python3 ] || [ "$(PYTHON)" = /usr/bin/python3 ]; then \
	  need="$$need $(APT_PYTHON_PACKAGES)"; \
	else \
	  echo "error: PYTHON=$(PYTHON) not found" >&2; exit 1; \
	fi; \
	missing=""; \
	for p in $$need; do \
	  dpkg -s "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "setup: missing Debian packages:$$missing"; \
	  if [ "$$(id -u)" -ne 0 ]; then \
	    echo "error: not root, cannot install them. Run as root:" >&2; \
	    echo "  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends$$missing" >&2; \
	    echo "then re-run 'make setup'." >&2; \
	    exit 1; \
	  fi; \
	  apt-get update; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$need; \
	fi
	@mkdir -p $(VENV)
	@touch $@

# 2. The virtualenv, with a current pip.
$(STAMP_VENV): $(STAMP_SYSDEPS)
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	@touch $@

# 3. Both distributions, editable. Re-runs whenever either pyproject changes.
$(STAMP_INSTALL): $(STAMP_VENV) pyproject.toml client/pyproject.toml
	$(VPY) -m pip install -e './client[zmq,numpy]' -e '.[dev]'
	@touch $@

run: setup
	exec $(BIN)/shmbrokerd $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(VPY) scripts/unasync.py --check  # _sync.py is generated from _async.py

typecheck: setup
	$(BIN)/mypy

# pytest runs with a /dev/shm of its own (tests/run-isolated): its leak check
# is exact there and can never touch the host's objects.
test: setup lint typecheck
	tests/run-isolated $(VPY) -m pytest $(PYTEST_ARGS)

fmt: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: setup
	$(VPY) examples/demo.py

bench: setup
	$(VPY) -m bench

stress: setup
	SHMBROKER_STRESS=1 SHMBROKER_WRITE_REPORT=1 tests/run-isolated $(VPY) -m pytest tests/stress -m stress

fuzz: setup
	$(VPY) -m tests.fuzz.fuzz_live --messages 1000000 --spawn

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build client/build
	rm -rf ./*.egg-info client/*.egg-info
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

# --- system install (root): what an operator runs, and what the systemd tests use ---
PREFIX := /opt/shmbroker
SYSTEM_PYTHON := /usr/bin/python3
UNITDIR := /etc/systemd/system

install: $(STAMP_SYSDEPS)
	@[ "$$(id -u)" -eq 0 ] || { echo "error: make install needs root" >&2; exit 1; }
	[ -x $(PREFIX)/bin/python ] || $(SYSTEM_PYTHON) -m venv $(PREFIX)
	@# pip builds in the source tree: build from a copy, or root-owned build/ and
	@# *.egg-info directories are left in the checkout.
	src="$$(mktemp -d)"; trap 'rm -rf "$$src"' EXIT; \
	cp -r pyproject.toml README.md shmbrokerd "$$src/"; \
	mkdir "$$src/client"; cp -r client/pyproject.toml client/shmbroker "$$src/client/"; \
	$(PREFIX)/bin/pip install --quiet --disable-pip-version-check "$$src/client[zmq]" "$$src"
	install -d -m 0755 $(PREFIX)/doc /etc/shmbroker /usr/lib/sysusers.d /usr/lib/tmpfiles.d
	install -m 0644 docs/*.md $(PREFIX)/doc/
	install -m 0644 systemd/shmbrokerd.service systemd/shmbrokerd.socket $(UNITDIR)/
	install -m 0644 systemd/shmbroker-exporter.service systemd/shmbroker-exporter.socket $(UNITDIR)/
	install -m 0644 systemd/shmbrokerd.sysusers /usr/lib/sysusers.d/shmbroker.conf
	install -m 0644 systemd/shmbrokerd.tmpfiles /usr/lib/tmpfiles.d/shmbroker.conf
	@# The shipped unit has an fd store, so the installed config says so.
	@# ...and the exporter's user reads stats through the monitor group.
	[ -e /etc/shmbroker/shmbrokerd.toml ] || sed -e 's/^memfd_fdstore = false/memfd_fdstore = true/' \
	  -e 's/^monitor_group = ""/monitor_group = "shmbroker-monitor"/' \
	  config/shmbrokerd.toml > /etc/shmbroker/shmbrokerd.toml
	[ -e /etc/shmbroker/exporter.toml ] || install -m 0644 config/shmbroker-exporter.toml /etc/shmbroker/exporter.toml
	systemd-sysusers /usr/lib/sysusers.d/shmbroker.conf
	systemd-tmpfiles --create /usr/lib/tmpfiles.d/shmbroker.conf
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; start with: systemctl enable --now shmbrokerd.socket"
	@echo "  and for Prometheus: systemctl enable --now shmbroker-exporter.socket"

uninstall:
	@[ "$$(id -u)" -eq 0 ] || { echo "error: make uninstall needs root" >&2; exit 1; }
	if [ -d /run/systemd/system ]; then systemctl disable --now shmbroker-exporter.socket shmbroker-exporter.service || true; fi
	if [ -d /run/systemd/system ]; then systemctl disable --now shmbrokerd.socket shmbrokerd.service || true; fi
	rm -f $(UNITDIR)/shmbrokerd.service $(UNITDIR)/shmbrokerd.socket
	rm -f $(UNITDIR)/shmbroker-exporter.service $(UNITDIR)/shmbroker-exporter.socket
	rm -f /usr/lib/sysusers.d/shmbroker.conf /usr/lib/tmpfiles.d/shmbroker.conf
	rm -rf $(PREFIX)
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "uninstalled; kept /etc/shmbroker, /var/lib/shmbroker and the shmbroker user"

# --- scale and Plasma benchmarks (docs/performance.md, "Scale" and "Repeat open") ---
# Not part of `make bench`: ~1 minute, 100,000 segments (~400 MB of /dev/shm)
# and 1,000 connections; bench/plasma.py creates bench/.venv-plasma (pyarrow 11)
# on first use. Writes bench/out/scale.json and docs/perf-open-latency.png.
STAMP_BENCH := $(VENV)/.stamp-bench

$(STAMP_BENCH): $(STAMP_INSTALL) pyproject.toml
	$(VPY) -m pip install -e '.[bench]'
	@touch $@

.PHONY: bench-scale
bench-scale: setup $(STAMP_BENCH)
	$(VPY) -m bench --only scale
	$(VPY) -m bench --only plasma
	$(VPY) -m bench.plot

# Everything a new machine needs is installed from here: `make demo` and `make test` work on a fresh clone.
# The interpreter of the venvs: the distribution's python3 when it is 3.11 or newer and can make
# a venv, else python3 on PATH (`make test PYTHON=python3.12` chooses). The distribution's is
# what the systemd service should run: built with profile-guided optimisation (a whole turn
# takes 15-30 % less CPU than on a plain source build such as pyenv's default, bench/PROFILE.md),
# kept up to date by the package manager, and outside the home directories the unit hides.
SYSTEM_PYTHON ?= /usr/bin/python3
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell $(SYSTEM_PYTHON) -c 'import ensurepip, sys; sys.exit(sys.version_info < (3, 11))' \
            >/dev/null 2>&1 && echo $(SYSTEM_PYTHON) || echo python3)
endif
# where ProtectHome=yes and PrivateTmp=yes (systemd/agentd.service) leave nothing for the
# service to read
HIDDEN_DIRS ?= /home /root /run/user /tmp /var/tmp
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUNTIME := $(VENV)/.installed-runtime

.PHONY: all venv demo test lint unit sim soak clean install install-unit uninstall bench

all: test

# pip's output goes to $(VENV)/install.log, and is shown only when the install fails.
# The demo needs agentd alone (~45 MB); the tests add the tools and the bench extra (matplotlib:
# `make test` runs a smoke version of the benchmarks), ~400 MB a demo should not wait for.
$(RUNTIME): pyproject.toml constraints.txt
	@echo "installing agentd into $(VENV) (log: $(VENV)/install.log)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip \
	  > $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt \
	  -e . >> $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	@echo "installing the tests' and benchmarks' tools into $(VENV) (log: $(VENV)/install.log)"
	@$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt \
	  -e '.[dev,bench]' >> $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

venv: $(STAMP)

demo: $(RUNTIME)
	$(BIN)/agentd demo

lint: $(STAMP)
	$(BIN)/ruff check agentd tests bench
	$(BIN)/ruff format --check agentd tests bench
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint unit

sim: $(RUNTIME)
	$(BIN)/agentd sim

# 2,000 calls through a real agentd with every fault on and SIGKILL restarts (a few minutes)
soak: $(STAMP)
	$(BIN)/python -m tests.soak --calls 2000 --out soak-report.json

# the benchmarks (minutes; not part of `make test`): writes bench/results.json, REPORT.md, latency.png
bench: $(STAMP)
	$(BIN)/python -m bench.run

# --- systemd deployment (run as root) -------------------------------------------------------
INSTALL_DIR ?= /opt/agentd
CONF_DIR    ?= /etc/agentd
UNIT_DIR    ?= /etc/systemd/system
BIN_DIR     ?= /usr/local/bin

# the unit names INSTALL_DIR and CONF_DIR: absolute, and not where the unit hides them
CHECK_DIRS = for d in "$(INSTALL_DIR)" "$(CONF_DIR)"; do case "$$d" in /*) ;; *) \
	  echo "make install: $$d is not an absolute path (the unit needs one)"; exit 1;; esac; done; \
	$(PYTHON) -c 'import os, sys; at = [os.path.realpath(p) + "/" for p in sys.argv[1:3]]; \
	  sys.exit(any(a.startswith(d.rstrip("/") + "/") for a in at for d in sys.argv[3:]))' \
	  $(INSTALL_DIR) $(CONF_DIR) $(HIDDEN_DIRS) || { \
	  echo "make install: $(INSTALL_DIR) or $(CONF_DIR) is under one of $(HIDDEN_DIRS), which"; \
	  echo "the service cannot read (ProtectHome=yes, PrivateTmp=yes in systemd/agentd.service)"; \
	  exit 1; }

install:
	@$(PYTHON) -c 'import os, sys; at = os.path.realpath(sys.base_prefix) + "/"; \
	  sys.exit(any(at.startswith(d.rstrip("/") + "/") for d in sys.argv[1:]))' $(HIDDEN_DIRS) || { \
	  echo "make install: $(PYTHON) lives under one of $(HIDDEN_DIRS), which the service cannot"; \
	  echo "read (ProtectHome=yes in systemd/agentd.service). Use the system's interpreter, e.g."; \
	  echo "  sudo make install PYTHON=/usr/bin/python3"; exit 1; }
	@$(CHECK_DIRS)
	$(PYTHON) -m venv $(INSTALL_DIR)/venv
	$(INSTALL_DIR)/venv/bin/python -m pip install -q --upgrade pip
	$(INSTALL_DIR)/venv/bin/python -m pip install -q -c constraints.txt .
	getent group agentd >/dev/null || groupadd --system agentd
	install -d -m 0755 $(CONF_DIR)
	[ -e $(CONF_DIR)/agentd.toml ] || install -m 0640 -g agentd systemd/agentd.toml.example $(CONF_DIR)/agentd.toml
	install -d -m 0700 $(CONF_DIR)/credentials
	for c in voipbin-accesskey backend-api-key; do \
	  [ -e $(CONF_DIR)/credentials/$$c ] || install -m 0600 /dev/null $(CONF_DIR)/credentials/$$c; done
	$(MAKE) -s install-unit
	ln -sfn $(INSTALL_DIR)/venv/bin/agentd $(BIN_DIR)/agentd
	-systemctl daemon-reload
	@echo
	@echo "agentd is installed. Left to do:"
	@echo "  1. edit $(CONF_DIR)/agentd.toml and put your access key in $(CONF_DIR)/credentials/voipbin-accesskey"
	@echo "  2. systemctl enable --now agentd"
	@echo "  3. journalctl -u agentd -f"

# the unit with this install's directories: ExecStart and LoadCredential name them, and a unit
# left pointing at /opt/agentd would fail with status=203/EXEC (comments keep the defaults)
install-unit:
	@$(CHECK_DIRS)
	install -d $(UNIT_DIR)
	sed -e '/^#/!s|/opt/agentd|$(INSTALL_DIR)|g' -e '/^#/!s|/etc/agentd|$(CONF_DIR)|g' \
	  systemd/agentd.service > $(UNIT_DIR)/agentd.service.tmp
	chmod 0644 $(UNIT_DIR)/agentd.service.tmp
	mv $(UNIT_DIR)/agentd.service.tmp $(UNIT_DIR)/agentd.service

uninstall:
	-systemctl disable --now agentd
	rm -f $(UNIT_DIR)/agentd.service
	[ "$$(readlink $(BIN_DIR)/agentd)" != "$(INSTALL_DIR)/venv/bin/agentd" ] || rm -f $(BIN_DIR)/agentd
	-systemctl daemon-reload
	rm -rf $(INSTALL_DIR)
	@echo "removed agentd; $(CONF_DIR) (config and credentials) is kept"

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache

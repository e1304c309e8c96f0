# fedaffect: `make demo` and `make test` work on a fresh clone (Debian; apt packages are
# installed when run as root, otherwise they must be present).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := espeak-ng hedgewars-data python3-venv postgresql
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup system-deps demo test test-fast bench clean

setup: system-deps $(VENV)/.installed

# Debian packages: espeak-ng makes the synth corpus, hedgewars-data is a real acted corpus,
# python3-venv lets Debian's Python make the virtual environment.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else echo "warning: missing Debian packages:$$missing (run as root, or: sudo apt-get install$$missing)"; fi; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/fedaffect demo

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf runs data .cache .pytest_cache

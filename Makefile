# kotlin-smtp-py — the two commands: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= examples/config.yaml
export PYTHONPATH := $(CURDIR)
DEBIAN_PACKAGES := redis-server swaks dnsutils postfix iproute2

.PHONY: run test lint typecheck unit deps venv bench clean api-snapshot

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installs Debian packages when we are root and they are missing; then the Python deps.
deps: $(BIN)/python
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing)) >/dev/null; fi; \
	fi
	@$(BIN)/python -c "import kotlin_smtp_py, pytest, mypy, hypothesis, xdist, jsonschema" 2>/dev/null || \
	  ($(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat)
	@$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; import twisted.plugins; list(getPlugins(IPlugin, twisted.plugins))" >/dev/null 2>&1 || true

run: deps
	mkdir -p data/mailboxes/alice data/mailboxes/bob
	$(BIN)/twistd -n --pidfile= smtp --config $(CONFIG)

lint: deps
	$(BIN)/ruff check kotlin_smtp_py tests twisted examples $(wildcard benchmarks)

typecheck: deps
	$(BIN)/mypy

unit: deps
	$(BIN)/python -m pytest -q -x tests

test: deps lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 3 tests

bench: deps
	$(BIN)/python -m benchmarks.e2e --clients 8 --messages 2000 --body-bytes 4096

clean:
	rm -rf $(VENV) data build *.egg-info .mypy_cache .ruff_cache

api-snapshot: deps
	$(BIN)/python -m kotlin_smtp_py.apicheck --write

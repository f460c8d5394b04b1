# The few commands a newcomer needs. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev
# The buf CLI (lint and breaking-change checks of protos/), pinned in tools/buf/package-lock.json
# and installed from the npm registry; reinstalled only when the lock file changes.
BUF := tools/buf/node_modules/.bin/buf
BASELINE := protos/baseline/recsys-v1.binpb

.PHONY: help demo install browser test lint typecheck pytest protos proto-check proto-baseline clean

help:
	@echo "make demo      - build a quick store if needed, run the stack, recommend, click, recommend again"
	@echo "make test      - install into $(VENV), then ruff, mypy and pytest (what CI runs)"
	@echo "make install   - create $(VENV) and install recsys with the [$(EXTRAS)] extra (and, as root, chromium for the browser test)"
	@echo "make protos    - regenerate recsys/v1 from protos/ (committed; a test checks it)"
	@echo "make proto-check    - buf lint, and buf breaking against the released contract ($(BASELINE))"
	@echo "make proto-baseline - at a release: record protos/ as the released contract"
	@echo "make loadtest  - local stack under locust (USERS, RATE, DURATION, TARGET); reports in loadtest/reports/"
	@echo "make k8s       - render the dev and prod overlays into build/k8s/ and validate them"
	@echo "make clean     - remove $(VENV) and caches"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python $(BUF) browser
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'

# tests/services/gateway/test_ui.py drives the demo page in Debian's headless chromium (it skips
# without it). As root with apt, install it when missing, so a fresh machine runs that test;
# otherwise, or if apt fails, say so and carry on: the rest of the install needs no browser.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium and chromium-driver (apt-get) for the browser test"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
	    >/dev/null 2>&1 || echo "apt-get could not install chromium: tests/services/gateway/test_ui.py will skip"; \
	else \
	  echo "no chromium/chromedriver: tests/services/gateway/test_ui.py will skip (apt-get install -y chromium chromium-driver)"; \
	fi

$(BUF): tools/buf/package.json tools/buf/package-lock.json
	npm ci --prefix tools/buf --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

test: lint typecheck pytest

demo: install
	$(BIN)/python scripts/demo.py

protos: install
	$(BIN)/python scripts/gen_protos.py

# What tests/test_protos.py runs too: the style rules of buf.yaml, and no change that breaks
# generated code, the wire or the JSON form against the last released contract.
proto-check: $(BUF)
	$(BUF) lint
	$(BUF) breaking --against $(BASELINE)

# At a release (after proto-check passes): the released contract becomes the new baseline;
# commit the file with the release.
proto-baseline: $(BUF)
	$(BUF) build --exclude-source-info -o $(BASELINE)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info tools/buf/node_modules

# --- operations (docs/operations.md) --------------------------------------------------------
.PHONY: loadtest k8s

# USERS, RATE (spawn rate), DURATION and TARGET come from the environment or the command line,
# e.g. `make loadtest USERS=50 RATE=10 DURATION=2m`. Starts the local stack (building a quick
# store first if ./store has none), runs locust headless, stops everything. Reports go to
# loadtest/reports/. The dev extra carries TensorFlow for that first build.
loadtest: $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,loadtest]'
	$(BIN)/python loadtest/run_loadtest.py

# Renders the dev and prod overlays with `kubectl kustomize` into build/k8s/ and validates
# every object against the Kubernetes schemas bundled in kubernetes-validate (no cluster).
k8s: install
	$(BIN)/python deploy/k8s/manifests.py --validate --out build/k8s deploy/k8s/overlays/dev deploy/k8s/overlays/prod

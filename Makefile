# The few commands a newcomer needs. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev

.PHONY: help demo install test lint typecheck pytest protos clean

help:
	@echo "make demo      - build a quick store if needed, run the stack, recommend, click, recommend again"
	@echo "make test      - install into $(VENV), then ruff, mypy and pytest (what CI runs)"
	@echo "make install   - create $(VENV) and install recsys with the [$(EXTRAS)] extra"
	@echo "make protos    - regenerate recsys/v1 from protos/ (committed; a test checks it)"
	@echo "make clean     - remove $(VENV) and caches"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'

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

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info

# Two commands do all set-up: `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HALFLABEL_REDIS_URL ?= $(shell scripts/ensure-redis)

.PHONY: install serve test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[service,trainer,dev]'
	touch $@

install: $(STAMP)

serve: install
	$(BIN)/halflabel-train fit --data digits --name digits --if-empty
	$(BIN)/halflabel-serve

test: install
	scripts/ensure-browser
	scripts/run-tests $(BIN)/python

lint: install
	$(BIN)/ruff check models service trainer tests benchmarks
	$(BIN)/mypy models service trainer

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

# Two commands do all set-up: `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HALFLABEL_REDIS_URL ?= $(shell scripts/ensure-redis)

.PHONY: install serve test lint bench-tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[service,trainer,dev]'
	touch $@

install: $(STAMP)

serve: install
	$(BIN)/halflabel-train fit --data digits --name digits --if-empty
	$(BIN)/halflabel-serve

# The labelling page is tested in Debian's Chromium: Playwright cannot download its own here.
# redis-server: tests/test_deploy.py runs one on the manifests' config, whichever Redis serves
# the suite. checkov (the manifests' check) pins many packages, so it has a venv of its own.
test: install
	scripts/ensure-packages chromium chromium-driver redis-server
	scripts/ensure-checkov >/dev/null
	scripts/run-tests $(BIN)/python

# What benchmarks/ needs beyond the venv: load generators and the Fashion-MNIST files.
bench-tools: install
	scripts/ensure-packages wrk hey dataset-fashion-mnist

lint: install
	$(BIN)/ruff check models service trainer tests benchmarks
	$(BIN)/mypy models service trainer

clean:
	rm -rf $(VENV) .checkov .pytest_cache .ruff_cache .mypy_cache

# Defended-classifier service: one Makefile for the newcomer path, CI and benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXTRAS ?= train,server,client,dev
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: help venv test test-slow demo bench proto proto-check lint data reproduce reproduce-quick stress clean

help:
	@echo "make demo   - set up a venv, train two small models, export, serve, classify, audit"
	@echo "make test   - run the test suite (slow reproduction runs are skipped; make test-slow)"
	@echo "make bench  - serving and audit benchmarks as ratios against references"
	@echo "make proto  - regenerate protobuf/gRPC stubs from proto/*.proto"

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed; on Debian install python3-venv (apt-get install python3-venv)"; exit 1; }
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[$(EXTRAS)]'
	# torchattacks (reference attacks for cross-checks) declares torchvision, which it never imports.
	$(PIP) install -q --no-deps 'torchattacks>=3.5'
	rm -f $(VENV)/.installed-*
	touch $@

proto: venv
	$(PY) -m proto.generate

proto-check: venv
	$(PY) -m proto.generate --check

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check training server clients robustness tests bench

data:
	@bash scripts/install_data.sh

demo: venv
	@bash scripts/demo.sh

bench: venv
	$(PY) -m bench.run $(BENCH_ARGS)

reproduce: venv
	$(PY) -m training.reproduce --preset full

reproduce-quick: venv
	$(PY) -m training.reproduce --preset quick

stress: venv
	DCS_STRESS_OUT=results/stress/raw.json $(PY) -m pytest -m "slow or not slow" tests/reliability $(PYTEST_ARGS); rc=$$?; $(PY) scripts/stress_summary.py results/stress/raw.json results/stress && exit $$rc

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache demo_out

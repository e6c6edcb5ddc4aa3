# Defended-classifier service: one Makefile for the newcomer path, CI and benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXTRAS ?= train,server,client,dev
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

# Both cores kept busy by niced busy loops while the suite runs (what CI's neighbours do).
LOAD_PROCS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: help venv test test-deps test-loaded test-slow demo bench proto proto-check lint data reproduce reproduce-quick stress clean

help:
	@echo "make demo   - set up a venv, train two small models, export, serve, classify, audit"
	@echo "make test   - run the test suite (slow reproduction runs are skipped; make test-slow)"
	@echo "make bench  - serving and audit benchmarks as ratios against references"
	@echo "make proto  - regenerate protobuf/gRPC stubs from proto/*.proto"
	@echo "make test-deps   - the built wheel at dependency floors / newest / beside proto-plus"
	@echo "make test-loaded - the test suite while every core is kept busy by niced busy loops"

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
	$(PY) scripts/generate_proto.py

proto-check: venv
	$(PY) scripts/generate_proto.py --check

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# The built wheel in fresh venvs outside the repo: every dependency at its floor, at its newest
# release (+ newest tritonclient), beside proto-plus and other top-level names, GPU extra.
test-deps: venv
	$(PY) scripts/test_deps.py $(TEST_DEPS_ARGS)

test-loaded: venv
	bash scripts/with_cpu_hog.sh $(LOAD_PROCS) $(PY) -m pytest $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check training server clients robustness tests bench data scripts dcs

data:
	@bash scripts/install_data.sh

demo: venv
	@bash scripts/demo.sh

bench: venv
	$(PY) -m bench.run $(BENCH_ARGS)

reproduce: venv
	$(PY) -m dcs.training.reproduce --preset full

reproduce-quick: venv
	$(PY) -m dcs.training.reproduce --preset quick

stress: venv
	DCS_STRESS_OUT=results/stress/raw.json $(PY) -m pytest -m "slow or not slow" tests/reliability $(PYTEST_ARGS); rc=$$?; $(PY) scripts/stress_summary.py results/stress/raw.json results/stress && exit $$rc

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache demo_out

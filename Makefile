# HelixAgent: `make run` starts the gateway on :7061, `make test` runs the whole test suite.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Separate stamps: `make run` installs the runtime only; `make test` (and bench) add the test extras.
RUNTIME_STAMP := $(VENV)/.installed-runtime
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test test-compiled compile clean-compiled install bench clean lint

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null

$(RUNTIME_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	@touch $(RUNTIME_STAMP)

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	@touch $(TEST_STAMP)

install: $(RUNTIME_STAMP)

run: $(RUNTIME_STAMP)
	$(VENV)/bin/helixagent serve $(if $(CONFIG),--config $(CONFIG),)

# Without HELIX_TEST_POSTGRES_URL / HELIX_TEST_REDIS_URL the suite starts private PostgreSQL and Redis
# servers on free loopback ports for the session (tests/conftest.py); .ci/run passes the machine's.
test: $(TEST_STAMP)
	$(MAKE) --no-print-directory lint
	./scripts/test-setup.sh
	$(PY) -m pytest $(PYTEST_ARGS)

# The hot modules compiled with mypyc (src/helixagent/compiled.py, scripts/compile.sh; README "Measured",
# round 6), in place; `make clean-compiled` goes back to the sources.  test-compiled runs the whole suite
# against them (it fails unless every listed module is compiled) and removes them afterwards.
compile: $(TEST_STAMP)
	PY=$(PY) ./scripts/compile.sh

clean-compiled:
	PY=$(PY) ./scripts/compile.sh --clean

test-compiled: $(TEST_STAMP)
	PY=$(PY) ./scripts/compile.sh
	./scripts/test-setup.sh
	HELIX_EXPECT_COMPILED=1 $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; PY=$(PY) ./scripts/compile.sh --clean; exit $$rc

# static checks (ruff: src tests bench; mypy: strict on src/helixagent), see scripts/lint.sh
lint: $(TEST_STAMP)
	VENV=$(VENV) ./scripts/lint.sh

bench: $(TEST_STAMP)
	$(PY) bench/perf_bench.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
	find src -name '*.so' -delete; rm -f src/helixagent/compiled.json

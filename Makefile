# HelixAgent: `make run` starts the gateway on :7061, `make test` runs the whole test suite.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install bench clean lint

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/helixagent serve $(if $(CONFIG),--config $(CONFIG),)

test: $(STAMP)
	$(MAKE) --no-print-directory lint
	./scripts/test-setup.sh
	$(PY) -m pytest $(PYTEST_ARGS)

# static checks (ruff: src tests bench; mypy: strict on src/helixagent), see scripts/lint.sh
lint: $(STAMP)
	VENV=$(VENV) ./scripts/lint.sh

bench: $(STAMP)
	$(PY) bench/gateway_bench.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

#!/usr/bin/env bash
# Static checks: ruff (lint rules in pyproject.toml [tool.ruff]) over src, tests and bench, then mypy
# (strict on src/helixagent, [tool.mypy]).  Runs both and exits non-zero if either fails.
# Uses the project's virtualenv when there is one (VENV=... to choose another).
set -u
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ -x "$VENV/bin/ruff" ]; then BIN="$VENV/bin/"; else BIN=""; fi
rc=0
echo "+ ruff check src tests bench"
"${BIN}ruff" check src tests bench || rc=1
echo "+ mypy"
"${BIN}mypy" || rc=1
exit $rc

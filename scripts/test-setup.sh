#!/usr/bin/env bash
# Brings up what the test suite needs on this machine: the PostgreSQL and Redis servers the real-server
# tests use (when their URLs are set; without them the tests start private servers), and system packages
# the tests drive.
set -u
if [ -n "${HELIX_TEST_POSTGRES_URL:-}" ] && command -v pg_ctlcluster >/dev/null 2>&1; then
  if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
fi
if [ -n "${HELIX_TEST_REDIS_URL:-}" ] && command -v redis-server >/dev/null 2>&1; then
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
  fi
fi
# System packages the observability tests drive: promtool (prometheus) checks the alert rules, headless
# Chromium + chromedriver load the dashboard page.
need=""
command -v promtool >/dev/null 2>&1 || need="$need prometheus"
command -v chromium >/dev/null 2>&1 || need="$need chromium"
command -v chromedriver >/dev/null 2>&1 || need="$need chromium-driver"
# nginx checks the compose deployment's nginx.conf (tests/test_deploy_container.py) and runs it in front of
# three gateways (tests/test_scale_out.py)
{ command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; } || need="$need nginx"
# Without HELIX_TEST_*_URL the suite starts private PostgreSQL and Redis servers (tests/conftest.py):
# it needs their binaries.
command -v redis-server >/dev/null 2>&1 || need="$need redis-server"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need="$need postgresql"
if [ -n "$need" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || true
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $need >/dev/null || echo "test-setup: could not install$need" >&2
fi
# The real client programs tests/test_real_clients.py drives (Claude Code, Codex CLI, Gemini CLI), from the
# npm registry at the versions pinned in tests/clients/package.json + package-lock.json, into the
# project-local tests/clients/node_modules (never a global install).  Skipped when already installed at
# the locked versions (npm writes node_modules/.package-lock.json; it must be newer than the lock).
clients=tests/clients
cd "$(dirname "$0")/.." || exit 1
if command -v npm >/dev/null 2>&1; then
  if [ ! -x "$clients/node_modules/.bin/claude" ] || [ ! -x "$clients/node_modules/.bin/codex" ] \
      || [ ! -x "$clients/node_modules/.bin/gemini" ] \
      || [ "$clients/package-lock.json" -nt "$clients/node_modules/.package-lock.json" ]; then
    (cd "$clients" && npm ci --no-audit --no-fund --loglevel=error) || echo "test-setup: npm ci in $clients failed" >&2
  fi
else
  echo "test-setup: npm not found: the real-client tests (tests/test_real_clients.py) need Node 20+ and npm" >&2
fi
# The operations kit (tests/test_ops_kit.py): shellcheck lints deploy/scripts/*.sh and logrotate runs the
# deploy/logrotate example; the test lints only when shellcheck is there.
ops_need=""
command -v shellcheck >/dev/null 2>&1 || ops_need="$ops_need shellcheck"
command -v logrotate >/dev/null 2>&1 || [ -x /usr/sbin/logrotate ] || ops_need="$ops_need logrotate"
if [ -n "$ops_need" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $ops_need >/dev/null \
    || echo "test-setup: could not install$ops_need" >&2
fi
exit 0

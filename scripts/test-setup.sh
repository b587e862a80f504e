#!/usr/bin/env bash
# Brings up what the test suite needs on this machine: the PostgreSQL and Redis servers the real-server
# tests use (when their URLs are set), and system packages the tests drive.
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
exit 0

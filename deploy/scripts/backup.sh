#!/usr/bin/env bash
# HelixAgent backup: the database (pg_dump custom format for postgresql://, SQLite's online backup API for
# sqlite:///), the config file, the record spool and the log file(s), in one timestamped archive
# <out>/helixagent-<UTC time>.tar.gz; old archives rotated (--keep N); optionally encrypted.
#
#   backup.sh [--config FILE] [--out DIR] [--keep N] [--encrypt-to SPEC] [--workdir DIR]
#
#   --config FILE      the gateway's config (default $HELIXAGENT_CONFIG; without either: the defaults)
#   --out DIR          where archives go (default $HELIXAGENT_BACKUP_DIR, else ./backups)
#   --keep N           keep the newest N archives in DIR, delete older ones (default 30; 0 = keep all)
#   --encrypt-to SPEC  age1...      -> age -r (when age is installed), archive .tar.gz.age
#                      file:PATH | env:VAR -> openssl enc -aes-256-cbc -pbkdf2 with that passphrase, .tar.gz.enc
#                      (never a passphrase on the command line: it would show in ps)
#   --workdir DIR      resolve relative paths of the config (sqlite:///./x.db, ./spool) from DIR
#
# Prints the archive's path on stdout.  Nothing secret is printed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=deploy/scripts/_common.sh
. "$here/_common.sh"

config="${HELIXAGENT_CONFIG:-}"
out="${HELIXAGENT_BACKUP_DIR:-./backups}"
keep=30
encrypt=""
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="${2:?--config needs a file}"; shift 2 ;;
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --keep) keep="${2:?--keep needs a number}"; shift 2 ;;
    --encrypt-to) encrypt="${2:?--encrypt-to needs a recipient or passphrase source}"; shift 2 ;;
    --workdir) cd "${2:?--workdir needs a directory}"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
case "$keep" in ''|*[!0-9]*) die "--keep: expected a number, got '$keep'" ;; esac
if [ -n "$config" ]; then
  [ -f "$config" ] || die "config file '$config' does not exist"
  config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
fi
load_settings "$config"

mkdir -p "$out"
out=$(cd "$out" && pwd)
umask 077
stamp=$(date -u +%Y%m%dT%H%M%S%3NZ)
name="helixagent-$stamp"
stage=$(mktemp -d "$out/.staging-XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/$name"
dir="$stage/$name"

# 1. the database
case "$DB_KIND" in
  sqlite)
    [ -f "$DB_FILE" ] || die "SQLite database '$DB_FILE' does not exist"
    # sqlite3's online backup API: a consistent copy while the gateway keeps writing (WAL included)
    "$PY" - "$DB_FILE" "$dir/db.sqlite" <<'PYEOF'
import sqlite3, sys
src = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
dst = sqlite3.connect(sys.argv[2])
with dst:
    src.backup(dst)
dst.close(); src.close()
PYEOF
    ;;
  postgresql)
    args=(--format=custom --no-owner --no-privileges --file="$dir/db.pgdump")
    if [ -n "$PG_SCHEMA" ]; then args+=(--schema="$PG_SCHEMA"); fi
    "$(pg_tool pg_dump)" "${args[@]}" || die "pg_dump failed"
    ;;
esac

# 2. config, spool, logs
if [ -n "$config" ]; then
  mkdir -p "$dir/config" && cp -p "$config" "$dir/config/"
fi
if [ -d "$SPOOL_DIR" ]; then
  mkdir -p "$dir/spool" && cp -pR "$SPOOL_DIR/." "$dir/spool/"
fi
if [ -n "$LOG_FILE" ]; then
  mkdir -p "$dir/logs"
  for f in "$LOG_FILE" "$LOG_FILE"[.-]*; do
    if [ -f "$f" ]; then cp -p "$f" "$dir/logs/"; fi
  done
fi
{
  echo "format=1"
  echo "created=$stamp"
  echo "database=$DB_KIND"
  echo "schema=${PG_SCHEMA:-}"
  echo "config=${config##*/}"
  echo "log_file=${LOG_FILE##*/}"
} > "$dir/MANIFEST"

# 3. archive (+ encryption): written under a temporary name, renamed when complete
archive="$out/$name.tar.gz"
tar -C "$stage" -czf "$stage/$name.tar.gz" "$name"
case "$encrypt" in
  "") mv "$stage/$name.tar.gz" "$archive" ;;
  age1*)
    command -v age >/dev/null 2>&1 || die "--encrypt-to $encrypt: age is not installed"
    age -r "$encrypt" -o "$stage/$name.tar.gz.age" "$stage/$name.tar.gz"
    archive="$archive.age"; mv "$stage/$name.tar.gz.age" "$archive" ;;
  file:*|env:*)
    if [ "${encrypt#file:}" != "$encrypt" ]; then [ -r "${encrypt#file:}" ] || die "--encrypt-to: cannot read ${encrypt#file:}"; fi
    if [ "${encrypt#env:}" != "$encrypt" ]; then
      var=${encrypt#env:}; [ -n "${!var:-}" ] || die "--encrypt-to: \$$var is empty"
    fi
    openssl enc -aes-256-cbc -pbkdf2 -iter 200000 -salt -pass "$encrypt" \
      -in "$stage/$name.tar.gz" -out "$stage/$name.tar.gz.enc"
    archive="$archive.enc"; mv "$stage/$name.tar.gz.enc" "$archive" ;;
  *) die "--encrypt-to: expected age1... (age recipient), file:PATH or env:VAR (openssl passphrase)" ;;
esac

# 4. rotation: archive names sort by time; keep the newest $keep
if [ "$keep" -gt 0 ]; then
  mapfile -t all < <(find "$out" -maxdepth 1 -type f -name 'helixagent-*.tar.gz*' -printf '%f\n' | sort)
  n=${#all[@]}
  for ((i = 0; i < n - keep; i++)); do rm -f -- "$out/${all[$i]}"; done
fi
echo "$archive"

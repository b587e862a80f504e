#!/usr/bin/env bash
# HelixAgent restore: the reverse of backup.sh.  Loads the archive's database dump into the database the
# config names, puts the spool segments back (the writer replays them at start; inserts are idempotent,
# ON CONFLICT (request_id) DO NOTHING), and writes the archived config beside the live one as
# <config>.restored for review (the live config is never overwritten).  Stop the gateway first.
#
#   restore.sh ARCHIVE [--config FILE] [--force] [--decrypt-with SPEC] [--identity FILE] [--logs-to DIR]
#              [--workdir DIR]
#
#   --force              restore even if the target database already holds records (they are replaced)
#   --decrypt-with SPEC  file:PATH | env:VAR: the openssl passphrase of a .tar.gz.enc archive
#   --identity FILE      the age identity of a .tar.gz.age archive
#   --logs-to DIR        also extract the archived log files into DIR
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=deploy/scripts/_common.sh
. "$here/_common.sh"

config="${HELIXAGENT_CONFIG:-}"
archive=""
force=0
decrypt=""
identity=""
logs_to=""
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="${2:?--config needs a file}"; shift 2 ;;
    --force) force=1; shift ;;
    --decrypt-with) decrypt="${2:?--decrypt-with needs file:PATH or env:VAR}"; shift 2 ;;
    --identity) identity="${2:?--identity needs a file}"; shift 2 ;;
    --logs-to) logs_to="${2:?--logs-to needs a directory}"; shift 2 ;;
    --workdir) cd "${2:?--workdir needs a directory}"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) die "unknown argument: $1 (see --help)" ;;
    *) [ -z "$archive" ] || die "one archive at a time"; archive="$1"; shift ;;
  esac
done
[ -n "$archive" ] || die "usage: restore.sh ARCHIVE [--config FILE] [--force] (see --help)"
[ -f "$archive" ] || die "archive '$archive' does not exist"
if [ -n "$config" ]; then
  [ -f "$config" ] || die "config file '$config' does not exist"
  config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
fi
load_settings "$config"

umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tarball="$work/archive.tar.gz"
case "$archive" in
  *.tar.gz.enc)
    case "$decrypt" in
      file:*|env:*) ;;
      *) die "$archive is encrypted: pass --decrypt-with file:PATH or env:VAR" ;;
    esac
    openssl enc -d -aes-256-cbc -pbkdf2 -iter 200000 -pass "$decrypt" -in "$archive" -out "$tarball" \
      || die "could not decrypt $archive (wrong passphrase?)" ;;
  *.tar.gz.age)
    command -v age >/dev/null 2>&1 || die "age is not installed"
    [ -n "$identity" ] || die "$archive is age-encrypted: pass --identity FILE"
    age -d -i "$identity" -o "$tarball" "$archive" || die "could not decrypt $archive" ;;
  *.tar.gz) cp "$archive" "$tarball" ;;
  *) die "$archive: expected a .tar.gz, .tar.gz.enc or .tar.gz.age made by backup.sh" ;;
esac
tar -C "$work" -xzf "$tarball"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'helixagent-*' | head -n 1)
if [ -z "$src" ] || [ ! -f "$src/MANIFEST" ]; then die "$archive is not a backup.sh archive (no MANIFEST)"; fi
kind=$(sed -n 's/^database=//p' "$src/MANIFEST")
[ "$kind" = "$DB_KIND" ] || die "the archive holds a $kind database but the config names a $DB_KIND one"

# rows_in_target: how many rows the target's tables hold (alembic's bookkeeping table aside)
rows_in_target() {
  "$PY" - "$DB_KIND" "${DB_FILE:-}" <<'PYEOF'
import sys
kind, path = sys.argv[1], sys.argv[2]
total = 0
if kind == "sqlite":
    import os, sqlite3
    if os.path.exists(path) and os.path.getsize(path) > 0:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        names = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' AND name != 'alembic_version'")]
        for n in names:
            total += con.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0]
        con.close()
else:
    import psycopg2  # connection parameters from the PG* environment
    con = psycopg2.connect("")
    with con.cursor() as cur:
        cur.execute("SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) FROM information_schema.tables "
                    "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' AND table_name != 'alembic_version'")
        for (n,) in cur.fetchall():
            cur.execute(f"SELECT count(*) FROM {n}")
            total += cur.fetchone()[0]
    con.close()
print(total)
PYEOF
}

rows=$(rows_in_target) || die "could not inspect the target database"
if [ "$rows" -gt 0 ] && [ "$force" -ne 1 ]; then
  die "the target database already holds $rows rows: refusing to overwrite it (pass --force to replace them)"
fi

case "$DB_KIND" in
  sqlite)
    [ -f "$src/db.sqlite" ] || die "the archive has no db.sqlite"
    mkdir -p "$(dirname "$DB_FILE")"
    # the backup API replaces the whole target database page by page, in one transaction
    "$PY" - "$src/db.sqlite" "$DB_FILE" <<'PYEOF'
import sqlite3, sys
src = sqlite3.connect(sys.argv[1])
dst = sqlite3.connect(sys.argv[2])
src.backup(dst)
dst.close(); src.close()
PYEOF
    ;;
  postgresql)
    [ -f "$src/db.pgdump" ] || die "the archive has no db.pgdump"
    restore=$(pg_tool pg_restore)
    # --clean --if-exists drops the archived objects first (the gateway may have created empty tables);
    # the schema itself is kept (it may hold other objects, and the URL's search_path names it)
    "$restore" --list "$src/db.pgdump" | grep -v -E '^[0-9]+; [0-9]+ [0-9]+ SCHEMA ' > "$work/toc" || true
    schema=$(sed -n 's/^schema=//p' "$src/MANIFEST")
    if [ -n "$schema" ]; then
      # (psql quotes the name: :"s" is interpolated from stdin, never from -c)
      echo 'CREATE SCHEMA IF NOT EXISTS :"s";' | "$(pg_tool psql)" -X -q -v ON_ERROR_STOP=1 -v s="$schema" >/dev/null
    fi
    "$restore" --clean --if-exists --no-owner --no-privileges --single-transaction --exit-on-error \
      --use-list="$work/toc" --dbname="${PGDATABASE:-postgres}" "$src/db.pgdump" || die "pg_restore failed"
    ;;
esac
note "database restored ($kind)"

if [ -d "$src/spool" ]; then
  mkdir -p "$SPOOL_DIR"
  cp -pR "$src/spool/." "$SPOOL_DIR/"
  note "spool restored into $SPOOL_DIR"
fi
if [ -n "$config" ] && [ -d "$src/config" ]; then
  for f in "$src/config"/*; do
    if [ -f "$f" ]; then cp -p "$f" "$config.restored"; note "archived config written to $config.restored"; fi
  done
fi
if [ -n "$logs_to" ] && [ -d "$src/logs" ]; then
  mkdir -p "$logs_to" && cp -pR "$src/logs/." "$logs_to/"
  note "logs extracted into $logs_to"
fi

# Shared by backup.sh and restore.sh (sourced, not run).  Reads the gateway's configuration through
# helixagent.config.load_config (the same validation `helixagent serve` applies) and exports what the
# scripts need as shell variables.  Secrets never reach argv or the terminal: a PostgreSQL URL is split
# into libpq's PG* environment variables (PGPASSWORD included) for pg_dump / pg_restore / psql.
# shellcheck shell=bash

die() { echo "${0##*/}: $*" >&2; exit 1; }
note() { echo "${0##*/}: $*" >&2; }

# The Python that has helixagent installed: $HELIXAGENT_PYTHON, else the interpreter of the `helixagent`
# entry point, else python3.
helix_python() {
  if [ -n "${HELIXAGENT_PYTHON:-}" ]; then echo "$HELIXAGENT_PYTHON"; return; fi
  local ep
  if ep=$(command -v helixagent 2>/dev/null); then
    local shebang
    shebang=$(head -c 256 "$ep" | head -n 1)
    if [ "${shebang#\#!}" != "$shebang" ] && [ -x "${shebang#\#!}" ]; then echo "${shebang#\#!}"; return; fi
  fi
  echo python3
}

# load_settings CONFIG: sets DB_KIND (sqlite|postgresql), DB_FILE (sqlite), PG_SCHEMA (postgresql, may be
# empty), SPOOL_DIR, LOG_FILE (may be empty), and exports PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE/
# PGOPTIONS for a PostgreSQL URL.  Relative paths are taken from the current directory (run the script
# from the gateway's working directory, or pass --workdir).
load_settings() {
  local config="$1" out
  PY=$(helix_python)
  out=$(HELIXAGENT_CONFIG="$config" "$PY" - <<'PYEOF'
import os, shlex, sys
from urllib.parse import unquote
from sqlalchemy.engine import make_url
from helixagent.config import ConfigError, load_config
try:
    cfg = load_config(os.environ.get("HELIXAGENT_CONFIG") or None)
except ConfigError as exc:  # the message names the field, never a secret value
    sys.exit(f"config: {exc}")
u = make_url(cfg.database.url)
backend = u.get_backend_name()
def emit(k, v):
    print(f"{k}={shlex.quote('' if v is None else str(v))}")
emit("SPOOL_DIR", os.path.abspath(cfg.database.spool_dir))
emit("LOG_FILE", os.path.abspath(cfg.logging.file) if cfg.logging.file else "")
if backend == "sqlite":
    if not u.database or u.database == ":memory:":
        sys.exit("database.url: an in-memory SQLite database cannot be backed up")
    emit("DB_KIND", "sqlite")
    emit("DB_FILE", os.path.abspath(u.database))
elif backend in ("postgresql", "postgres"):
    emit("DB_KIND", "postgresql")
    q = dict(u.query)
    options = q.get("options", "")
    if isinstance(options, tuple):
        options = options[-1]
    schema = ""
    from helixagent.store.db import pg_server_settings
    sp = pg_server_settings(options).get("search_path", "") if options else ""
    if sp:
        schema = sp.split(",")[0].strip().strip('"')
    for k, v in (("PGHOST", u.host or q.get("host")), ("PGPORT", u.port), ("PGUSER", u.username),
                 ("PGPASSWORD", u.password), ("PGDATABASE", u.database), ("PGOPTIONS", options)):
        if v:
            print(f"export {k}={shlex.quote(str(v))}")
    emit("PG_SCHEMA", schema)
else:
    sys.exit(f"database.url: unsupported database {backend!r}")
PYEOF
) || die "could not read the configuration (${config:-defaults})"
  eval "$out"
}

# pg_tool NAME: the newest PostgreSQL client binary (pg_dump must not be older than the server).
pg_tool() {
  local name="$1" found
  found=$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path "*/bin/$name" 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$found" ]; then echo "$found"; return; fi
  command -v "$name" 2>/dev/null || die "$name is not installed (Debian: apt-get install postgresql-client)"
}

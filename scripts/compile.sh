#!/usr/bin/env bash
# Compile the hot modules listed in src/helixagent/compiled.py (MODULES) to C extensions with mypyc, in
# place (src/helixagent/**/*.so beside the sources, plus mypyc's shared runtime src/*__mypyc*.so), and
# record the SHA-256 of each source compiled (src/helixagent/compiled.json): `helixagent serve` and the
# test suite refuse a compiled module whose source changed since.  --clean removes all of it.
#   scripts/compile.sh            (make compile)
#   scripts/compile.sh --clean    (make clean-compiled)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac
clean() {
  find src -name '*.so' -delete
  rm -f src/helixagent/compiled.json
  rm -f build/mypyc.log
}
clean
if [ "${1:-}" = "--clean" ]; then
  exit 0
fi
mapfile -t files < <(PYTHONPATH=src "$PY" -c 'from helixagent.compiled import MODULES, source_path
import os
for m in MODULES: print(os.path.relpath(source_path(m)))')
mkdir -p build
# (mypyc writes its C files and objects under ./build, and copies each extension beside its source)
"$PY" -m mypyc "${files[@]}" >build/mypyc.log 2>&1 || {
  tail -40 build/mypyc.log >&2
  echo "compile: mypyc failed (build/mypyc.log)" >&2
  exit 1
}
PYTHONPATH=src "$PY" -c 'from helixagent import compiled; compiled.write_manifest()'
n=$(PYTHONPATH=src "$PY" -c 'from helixagent import compiled; print(len(compiled.check()))')
echo "compile: $n modules compiled (src/helixagent/compiled.json)"

# Sourced by the other scripts: find Python 3.11+, make .venv, install exactly what uv.lock pins.
# Usage: . scripts/_venv.sh [uv sync options]   (e.g. --extra test; --no-sync: only uv)
# uv itself comes from the lock (hash-checked, through the venv's pip) the first time and whenever
# the lock moves it; then `uv sync --locked` installs the rest and fails if pyproject.toml and
# uv.lock disagree (scripts/lock.sh refreshes the lock). A second run re-resolves nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CHEFIA_VENV:-$ROOT/.venv}"

find_python() {
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; raise SystemExit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "chefia-rt needs Python 3.11 or newer (python3 --version says: $(python3 --version 2>&1))" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)"
  echo "creating virtualenv $VENV with $PY" >&2
  "$PY" -m venv "$VENV"
fi

uv_version="$("$VENV/bin/python" "$ROOT/scripts/lock_pin.py" --version uv)"
if [ "$("$VENV/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$uv_version" ]; then
  echo "installing uv $uv_version from uv.lock into $VENV" >&2
  "$VENV/bin/python" -m ensurepip --upgrade >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes \
    -r <("$VENV/bin/python" "$ROOT/scripts/lock_pin.py" uv)
fi
# The venv's own Python, never one uv would download.
export UV_PROJECT_ENVIRONMENT="$VENV" UV_PYTHON="$VENV/bin/python" UV_PYTHON_DOWNLOADS=never
if [ "${1:-}" != --no-sync ]; then
  "$VENV/bin/uv" sync --project "$ROOT" --locked --quiet "$@"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"

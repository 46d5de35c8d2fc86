# Sourced by the other scripts: find Python 3.11+, make .venv, install the project into it.
# Usage: . scripts/_venv.sh [extras]   (extras e.g. "test")
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
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

extras="${1:-}"
spec="$ROOT"
[ -n "$extras" ] && spec="${ROOT}[$extras]"
# Editable install: cheap when nothing changed, and picks up new dependencies when something did.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
export PATH="$VENV/bin:$PATH"
cd "$ROOT"

#!/usr/bin/env bash
# Set up .venv with the test extras and run everything: lint, types, the whole test suite, and
# the JS client's (clients/js) install from its lock file, build and tests when node is present.
# Tests that need PostgreSQL/Redis skip with a reason when those are not reachable, unless
# CHEFIA_REQUIRE_SERVICES=1 (CI), where they fail instead. Extra arguments go to pytest.
# The suite mostly waits (processes starting, timeouts running out, services answering), so it
# runs in CHEFIA_TEST_PROCESSES pytest-xdist processes (default 3; `-n 0` in the arguments runs
# it in one). Tests that share a module fixture keep together with an xdist_group mark.
# shellcheck source=scripts/_venv.sh
. "$(dirname "$0")/_venv.sh" --extra test
echo "== ruff" && ruff check chefia_rt tests loadtest scripts && ruff format --check chefia_rt tests loadtest scripts
echo "== mypy" && mypy
echo "== js client (clients/js)"
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
  # Installs exactly what package-lock.json pins, builds (tsc, the browser bundle the pytest
  # Chromium test loads) and runs Node's test runner against the real server.
  (cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build \
    && CHEFIA_PYTHON="$VENV/bin/python" npm test --silent)
elif [ "${CHEFIA_REQUIRE_SERVICES:-}" = 1 ]; then
  echo "node and npm are needed for the JS client's tests (CHEFIA_REQUIRE_SERVICES=1)" >&2
  exit 1
else
  echo "node/npm not installed: the JS client's tests are skipped"
fi
echo "== pytest"
exec python -m pytest -n "${CHEFIA_TEST_PROCESSES:-3}" --dist loadgroup "$@"

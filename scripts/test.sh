#!/usr/bin/env bash
# Set up .venv with the test extras and run everything: lint, types, the whole test suite.
# Tests that need PostgreSQL/Redis skip with a reason when those are not reachable, unless
# CHEFIA_REQUIRE_SERVICES=1 (CI), where they fail instead. Extra arguments go to pytest.
# The suite mostly waits (processes starting, timeouts running out, services answering), so it
# runs in CHEFIA_TEST_PROCESSES pytest-xdist processes (default 3; `-n 0` in the arguments runs
# it in one). Tests that share a module fixture keep together with an xdist_group mark.
# shellcheck source=scripts/_venv.sh
. "$(dirname "$0")/_venv.sh" --extra test
echo "== ruff" && ruff check chefia_rt tests loadtest scripts && ruff format --check chefia_rt tests loadtest scripts
echo "== mypy" && mypy
echo "== pytest"
exec python -m pytest -n "${CHEFIA_TEST_PROCESSES:-3}" --dist loadgroup "$@"

#!/usr/bin/env bash
# Refresh uv.lock: every package to the newest release pyproject.toml's ranges allow (arguments go
# to `uv lock`, e.g. `--upgrade-package redis` to move one). After editing pyproject.toml, run it
# too: scripts/test.sh refuses a lock that disagrees with pyproject.toml. Then run the suite and
# commit pyproject.toml and uv.lock together.
# shellcheck source=scripts/_venv.sh
. "$(dirname "$0")/_venv.sh" --no-sync
if [ $# -eq 0 ]; then set -- --upgrade; fi
exec uv lock "$@"

#!/usr/bin/env bash
# Set up .venv and start chefia-rt. Without DATABASE_URL/REDIS_URL it runs on the embedded
# default: a SQLite file (./chefia-rt.db) and the in-process bus, one worker, port 8001.
# Any argument after the script name goes to `chefia-rt serve`; configure with the environment.
# shellcheck source=scripts/_venv.sh
. "$(dirname "$0")/_venv.sh" --inexact
exec chefia-rt serve "$@"

#!/usr/bin/env bash
# The mutation run (docs/testing.md), outside the 10-minute suite: mutmut puts one small bug at a
# time into a target and runs the target's tests that reach the mutated function; a mutant that
# leaves them green survives. Targets ([tool.chefia.mutation.*] in pyproject.toml): sync
# (chefia_rt/sync, tests/sync), protocol (chefia_rt/protocol, tests/protocol), pipeline
# (chefia_rt/pipeline.py and answers.py, its unit tests, tests/test_worker_batches.py and three end-to-end files).
#   scripts/mutation.sh [sync|protocol|pipeline]...   (default: all three; at nice 19)
# The property tests run under the Hypothesis profile `mutation` (tests/conftest.py, chosen in
# [tool.mutmut] pytest_add_cli_args): a few fixed examples each, no shrinking.
# Each target works in .mutation/TARGET (its mutants/ keeps the results: a rerun tests only the
# mutants it has no result for; delete the folder to start over). There,
# `../../.venv/bin/mutmut show NAME` prints a mutant's diff and `mutmut browse` lists them all.
# shellcheck source=scripts/_venv.sh
. "$(dirname "$0")/_venv.sh" --extra test

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(sync protocol pipeline)
for target in "${targets[@]}"; do
  work="$ROOT/.mutation/$target"
  mkdir -p "$work"
  for linked in chefia_rt tests config docs; do ln -sfn "$ROOT/$linked" "$work/$linked"; done
  # The target's copy of pyproject.toml: [tool.mutmut] with its only_mutate and tests.
  mapfile -t mutants < <(python - "$target" "$work/pyproject.toml" <<'PY'
import json
import re
import sys
import tomllib
from pathlib import Path

target, out = sys.argv[1], Path(sys.argv[2])
text = Path("pyproject.toml").read_text()
targets = tomllib.loads(text)["tool"]["chefia"]["mutation"]
if target not in targets:
    sys.exit(f"unknown target {target!r}: one of {', '.join(targets)}")
chosen = targets[target]
base = tomllib.loads(text)["tool"]["mutmut"]
for key, value in (
    ("only_mutate", chosen["only_mutate"]),
    ("pytest_add_cli_args", base["pytest_add_cli_args"] + chosen.get("pytest_args", [])),
    ("pytest_add_cli_args_test_selection", chosen["tests"]),
):
    text, found = re.subn(rf"(?ms)^{key} = \[.*?\]$", lambda _: f"{key} = {json.dumps(value)}", text, 1)
    assert found, key
out.write_text(text)
sys.stdout.write("".join(f"{m}\n" for m in chosen.get("mutants", [])))
PY
  ) || exit
  # Tests that need PostgreSQL or Redis fail rather than skip: a skipped test kills nothing.
  (cd "$work" && CHEFIA_REQUIRE_SERVICES=1 nice -n 19 mutmut run "${mutants[@]}") || exit
  (cd "$work" && mutmut results --all true) >"$work/mutants/results.txt"
  python - "$target" "$work/mutants/results.txt" "${mutants[@]}" <<'PY'
import fnmatch
import sys
from collections import Counter

target, results, globs = sys.argv[1], sys.argv[2], sys.argv[3:] or ["*"]
statuses: Counter[str] = Counter()
for line in open(results):
    name, _, status = line.strip().rpartition(": ")
    if name and any(fnmatch.fnmatchcase(name, g) for g in globs):
        statuses[status] += 1
total = sum(statuses.values())
killed = statuses["killed"] + statuses["timeout"]
score = f"{100 * killed / total:.1f} %" if total else "-"
print(f"{target}: {killed}/{total} killed ({score});", ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())))
PY
done

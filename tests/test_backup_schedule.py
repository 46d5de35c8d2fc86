"""BACKUP_SCHEDULE for containers: `chefia-rt backup --schedule` waits for the times next_run
computes, which must be exactly those of the systemd timer deploy.sh writes from the same
expression (cron_to_oncalendar), as systemd-analyze itself computes them."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from chefia_rt.schedule import cron_to_oncalendar, next_run
from tests.services import service_missing
from tests.test_backup import cli

BASE = datetime(2026, 12, 5, 0, 40, tzinfo=UTC)
CRONS = [
    "0 2 * * *",
    "*/20 9-11 * * 1-5",
    "0 3 1,15 * sun",  # day of month OR day of week
    "30 4 29 2 *",
    "@weekly",
    "5 0 * jan,jul sat",
]


def systemd_times(calendar: str, count: int) -> list[datetime]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        service_missing("systemd-analyze", "not installed (apt-get install systemd)")
    assert analyze is not None
    done = subprocess.run(
        [analyze, "calendar", f"--iterations={count}", "--base-time=2026-12-05 00:40:00 UTC",
         f"{calendar} UTC"],
        capture_output=True, text=True, timeout=30, check=True, env={"TZ": "UTC"},
    )  # fmt: skip
    stamps = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\S+ \S+) UTC", done.stdout)
    return [datetime.fromisoformat(f"{stamp}+00:00") for stamp in stamps]


@pytest.mark.parametrize("cron", CRONS)
def test_next_run_agrees_with_the_systemd_timer(cron: str) -> None:
    count = 6
    expected = sorted(t for line in cron_to_oncalendar(cron) for t in systemd_times(line, count))
    ours, moment = [], BASE
    for _ in range(count):
        moment = next_run(cron, moment)
        ours.append(moment)
    assert ours == expected[:count]


def test_schedule_off_exits_at_once(tmp_path: Path) -> None:
    off = cli("backup", "--schedule", cwd=tmp_path, BACKUP_ENABLED="false")
    assert off.returncode == 0
    assert "scheduled backups are off (BACKUP_ENABLED=false)" in off.stderr
    bad = cli("backup", "--schedule", cwd=tmp_path, BACKUP_SCHEDULE="0 25 * * *")
    assert bad.returncode == 1 and "BACKUP_SCHEDULE" in bad.stderr

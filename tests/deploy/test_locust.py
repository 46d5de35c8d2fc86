"""loadtest/locustfile.py headless against a real server: 200 terminals (20 stores of 10) for
20 s, zero failures, and both confirmations ("ack") and pushes ("push") counted in Locust's
statistics. Latencies are printed, never asserted (the machine is shared)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from chefia_rt.server import LISTEN_BACKLOG
from tests.deploy.serving import server_process
from tests.helpers import free_port
from tests.services import service_missing

ROOT = Path(__file__).resolve().parents[2]
USERS = 200
SECONDS = 20


def server_env(tmp_path: Path, port: int) -> dict[str, str]:
    """The embedded default (SQLite, in-process bus, one worker), open mode, on `port`."""
    env = dict(
        os.environ,
        WS_HOST="127.0.0.1",
        WS_PORT=str(port),
        DATABASE_URL=f"sqlite:///{tmp_path / 'load.db'}",
        WS_LOG_LEVEL="WARNING",
    )
    env.pop("JWT_SECRET_KEY", None)
    env.pop("REDIS_URL", None)
    return env


def read_stats(prefix: Path) -> dict[str, dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def test_locust_headless_200_users(tmp_path: Path) -> None:
    port = free_port()
    prefix = tmp_path / "locust"
    serve = [sys.executable, "-m", "chefia_rt", "serve"]
    with server_process(serve, tmp_path, server_env(tmp_path, port), port):
        # The accept queue is not asyncio's default of 100, which overflowed under a reconnect
        # storm: LISTEN_BACKLOG, capped by the kernel's somaxconn.
        if shutil.which("ss") is None:
            service_missing("ss", "not installed (apt-get install iproute2)")
        listening = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=30
        )
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        backlogs = {int(line.split()[2]) for line in listening.stdout.splitlines()}
        assert backlogs == {min(LISTEN_BACKLOG, somaxconn)}, listening.stdout
        started = time.monotonic()
        command = [
            sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest/locustfile.py"),
            "--headless", "--users", str(USERS), "--spawn-rate", "100",
            "--run-time", f"{SECONDS}s", "--stop-timeout", "5",
            "--host", f"ws://127.0.0.1:{port}",
            "--op-rate", "1", "--terminals-per-store", "10", "--ack-timeout", "15",
            "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
        ]  # fmt: skip
        run = subprocess.run(
            command,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=SECONDS + 90,
            check=False,
        )
        print(f"locust ran {time.monotonic() - started:.1f}s, exit {run.returncode}")
        print(run.stderr[-3000:])

    stats = read_stats(prefix)
    failures = Path(f"{prefix}_failures.csv").read_text().splitlines()[1:]
    assert failures == [], failures
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("connect", "ack", "push"):
        row = stats[name]
        print(
            f"{name}: {row['Request Count']} requests, median {row['Median Response Time']} ms, "
            f"p99 {row['99%']} ms, max {row['Max Response Time']} ms"
        )
        assert int(row["Failure Count"]) == 0, row
    assert int(stats["connect"]["Request Count"]) == USERS
    acks, pushes = int(stats["ack"]["Request Count"]), int(stats["push"]["Request Count"])
    assert acks > 0 and pushes > 0
    # Every confirmed operation goes to the 9 other terminals of its store.
    assert pushes > acks, (acks, pushes)
    assert int(stats["Aggregated"]["Failure Count"]) == 0

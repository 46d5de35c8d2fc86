"""Soak: steady load on a 2-node x 2-worker cluster for a long time, watching for leaks.

    python -m tests.faults.soak --minutes 30       # not part of the test suite

Needs the local PostgreSQL (a fresh schema) and Redis (a prefix of its own), like the cluster
tests. Every `--every` seconds it prints the RSS and open file descriptors of every server
process (supervisors and workers); at the end it runs the fault suite's checker (nothing lost,
every terminal got every operation once in order) and flags any process whose RSS grew more
than `--rss-growth` (default 20 %) or whose descriptors grew by more than 10 from the first
sample after warm-up to the last. Exit status 1 when anything was flagged or the check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster import Cluster, running_cluster
from tests.faults.load import Fleet, check, report, table

FD_GROWTH = 10


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def server_processes(cluster: Cluster) -> dict[str, int]:
    """Name -> pid of every supervisor and worker of the cluster."""
    found: dict[str, int] = {}
    for node in cluster.nodes:
        found[f"node{node.index}"] = node.pid
        for i, pid in enumerate(node.worker_pids()):
            found[f"node{node.index}/w{i}"] = pid
    return found


async def soak(minutes: float, every: float, stores: int, writers: int, rss_growth: float) -> int:
    with tempfile.TemporaryDirectory(prefix="chefia-soak-") as tmp:
        async with running_cluster(Path(tmp), nodes=2, workers=2) as cluster:
            fleet = Fleet([node.url for node in cluster.nodes])
            fleet.add_stores("soak", stores, writers)
            await fleet.start()
            print(f"soak: {len(fleet.terminals)} terminals, {minutes:g} min", flush=True)
            samples: dict[str, list[tuple[float, int, int]]] = {}
            started = time.monotonic()
            end = started + minutes * 60
            try:
                while time.monotonic() < end:
                    await asyncio.sleep(min(every, max(0.0, end - time.monotonic())))
                    elapsed = time.monotonic() - started
                    line = []
                    for name, pid in server_processes(cluster).items():
                        rss, fds = rss_kib(pid), open_fds(pid)
                        if rss is None or fds is None:
                            continue
                        samples.setdefault(f"{name}:{pid}", []).append((elapsed, rss, fds))
                        line.append(f"{name} {rss / 1024:.1f}MB {fds}fd")
                    ops = sum(len(t.answers) for t in fleet.terminals)
                    print(f"{elapsed:7.0f}s ops {ops:7d} | " + " | ".join(line), flush=True)
                await fleet.settle(cluster.dsn, 60)
                verdict = await check(cluster.dsn, fleet)
            finally:
                await fleet.close()
    print("\n" + table([report("soak", fleet, verdict, [])]))
    flagged = []
    print("| process | samples | RSS first → last (MB) | fds first → last |\n|---|---|---|---|")
    for name, series in samples.items():
        # The first sample is taken after the warm-up of one interval: imports, pools, caches.
        first, last = series[0], series[-1]
        grew_rss = last[1] > first[1] * (1 + rss_growth)
        grew_fds = last[2] > first[2] + FD_GROWTH
        mark = " **GREW**" if grew_rss or grew_fds else ""
        print(
            f"| {name} | {len(series)} | {first[1] / 1024:.1f} → {last[1] / 1024:.1f} "
            f"| {first[2]} → {last[2]}{mark} |"
        )
        if mark:
            flagged.append(name)
    for problem in verdict.problems:
        print("PROBLEM:", problem)
    if flagged:
        print("growth flagged:", ", ".join(flagged))
    return 1 if flagged or verdict.problems else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--stores", type=int, default=4)
    parser.add_argument("--writers", type=int, default=5, help="writers per store (+1 display)")
    parser.add_argument("--rss-growth", type=float, default=0.2, help="flag above this fraction")
    args = parser.parse_args()
    sys.exit(
        asyncio.run(soak(args.minutes, args.every, args.stores, args.writers, args.rss_growth))
    )


if __name__ == "__main__":
    main()

"""One Locust run against a `chefia-rt serve` this script starts, stops and cleans up after.

    python -m loadtest.locust_run                  # the issue's case: see the defaults below
    python -m loadtest.locust_run --mode embedded --users 200 --op-rate 1 --run-time 20

Defaults are the performance issue's case: 1000 terminals (100 stores of 10) spawned at 100/s,
0.5 operations/s each for 60 s, Locust with `--processes 2`, against 2 workers on PostgreSQL (a
fresh schema of the DSN's database, dropped after) and Redis (a unique REDIS_PREFIX, its keys
deleted after), MAX_WS_CONNECTIONS above the whole run on every worker (SO_REUSEPORT does not
split evenly) and the soft descriptor limit raised to the hard one (inherited by both sides).

It starts the server on a free port, waits for /health and for every worker, runs Locust
headless on loadtest/locustfile.py, and prints: Locust's own summary; a table of connect, ack,
push and generator lag (count, failures, p50, p95, p99, max); the failures by reason; the
terminals' own counts (the locustfile's --totals-dir) against the operation log and the server's
`sync_operations_total`; the server's receive-to-answer histogram; the CPU seconds of the server
(per process), the generator, PostgreSQL and Redis; the load average; the server log's warnings
and errors by message. `--json FILE` writes the same figures. Every step has a deadline;
whatever it started is stopped, by pid, on the way out. Exit status: Locust's (1 when anything
failed).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import csv
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import redis

from loadtest.bench import child_pids, cpu_ticks, free_port, server_env
from loadtest.bench_store import DEFAULT_DSN, cpu_used_us, postgres_cpu, with_search_path

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
DEFAULT_REDIS = os.environ.get(
    "CHEFIA_BENCH_REDIS_URL", os.environ.get("CHEFIA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
)
CLOCK_TICK_S = 1 / os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
REQUESTS = ("connect", "ack", "push", "connection", "generator")
STATS_COLUMNS = (
    "Request Count",
    "Failure Count",
    "Median Response Time",
    "95%",
    "99%",
    "Max Response Time",
)


# ---- processes ------------------------------------------------------------------------------


def family(pid: int) -> list[int]:
    """`pid` and its living children (the supervisor and its workers)."""
    return [pid, *child_pids(pid)]


def cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    """pid -> utime + stime in seconds, for each that still exists."""
    return {pid: ticks * CLOCK_TICK_S for pid, ticks in cpu_ticks(pids).items()}


class Sampler(threading.Thread):
    """Every second, the CPU seconds of each process under the given roots (the root and its
    children) and the highest 1-minute load average; a process that exits keeps its last value."""

    def __init__(self, roots: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.first: dict[str, dict[int, float]] = {name: {} for name in roots}
        self.last: dict[str, dict[int, float]] = {name: {} for name in roots}
        self.max_load = 0.0
        self.done = threading.Event()
        self.sample()

    def sample(self) -> None:
        for name, root in self.roots.items():
            for pid, seconds in cpu_seconds(family(root)).items():
                self.first[name].setdefault(pid, seconds)
                self.last[name][pid] = seconds
        self.max_load = max(self.max_load, os.getloadavg()[0])

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.sample()

    def finish(self) -> None:
        self.done.set()
        self.join(5)
        self.sample()

    def used(self, name: str) -> dict[int, float]:
        """pid -> CPU seconds since the start (a process born since counts from its first
        sample, less than a second after it started)."""
        first, last = self.first[name], self.last[name]
        return {pid: last[pid] - first[pid] for pid in last}


def stop(proc: subprocess.Popen[bytes], pids: Sequence[int], timeout: float) -> None:
    """SIGTERM, wait, then SIGKILL whichever of `pids` (all started here) is still alive."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    for pid in cpu_ticks(pids):  # the ones still alive
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < needed:
        print(f"warning: descriptor limit {hard} < {needed} this run needs", file=sys.stderr)
    return hard


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- the server -----------------------------------------------------------------------------


class Storage:
    """The server's storage for one run: a fresh PostgreSQL schema + Redis prefix, or SQLite."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        tag = uuid.uuid4().hex[:12]
        self.schema = f"locust_{tag}" if args.mode == "pg" else None
        self.prefix = f"locust-{tag}" if args.mode == "pg" else None
        self.sqlite = workdir / "locust.db"

    def env(self) -> dict[str, str]:
        if self.schema is None:
            return {"DATABASE_URL": f"sqlite:///{self.sqlite}", "WS_WORKERS": "1"}
        assert self.prefix is not None
        return {
            "DATABASE_URL": with_search_path(self.args.dsn, self.schema),
            "REDIS_URL": self.args.redis_url,
            "REDIS_PREFIX": self.prefix,
            "WS_WORKERS": str(self.args.workers),
        }

    def create(self) -> None:
        if self.schema is not None:
            asyncio.run(self._sql(f'CREATE SCHEMA "{self.schema}"'))

    def operations(self) -> dict[str, int]:
        """Rows of the operation log: all of them and the stores they belong to."""
        query = "SELECT count(*), count(DISTINCT store_id) FROM sync_operations"
        if self.schema is None:
            import sqlite3

            with contextlib.closing(sqlite3.connect(self.sqlite)) as db:
                rows, stores = db.execute(query).fetchone()
        else:
            rows, stores = asyncio.run(self._sql(query, schema=self.schema))
        return {"rows": int(rows), "stores": int(stores)}

    def drop(self) -> None:
        if self.schema is not None:
            asyncio.run(self._sql(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
        if self.prefix is not None:
            client = redis.Redis.from_url(self.args.redis_url, socket_timeout=5)
            try:
                keys = list(client.scan_iter(match=f"{self.prefix}:*", count=500))
                for start in range(0, len(keys), 500):
                    client.delete(*keys[start : start + 500])
            finally:
                client.close()

    async def _sql(self, query: str, schema: str = "public") -> Any:
        db = await asyncpg.connect(with_search_path(self.args.dsn, schema), timeout=10)
        try:
            return await db.fetchrow(query)
        finally:
            await db.close()


def redis_cpu_seconds(url: str) -> float | None:
    """The Redis server's own CPU (INFO cpu), all its clients included."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            info = client.info("cpu")
        finally:
            client.close()
    except redis.RedisError:
        return None
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


@contextlib.contextmanager
def server(args: argparse.Namespace, storage: Storage, workdir: Path) -> Iterator[Server]:
    port = free_port()
    env = server_env(port, args.max_connections or args.users + 100, **storage.env())
    env.update(item.split("=", 1) for item in args.server_env)
    log_path = workdir / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chefia_rt", "serve"],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Server(proc, port, log_path)
    try:
        running.wait_ready(1 if args.mode == "embedded" else args.workers)
        yield running
    finally:
        stop(proc, running.pids(), STOP_TIMEOUT)


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.seen: set[int] = {proc.pid}

    def pids(self) -> list[int]:
        self.seen.update(family(self.proc.pid))
        return sorted(self.seen)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as answer:
            body: bytes = answer.read()
            return body

    def wait_ready(self, workers: int) -> None:
        """/health answers and every worker process is up (each listens before it answers)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log_tail()}")
            try:
                self.get("/health")
                workers_up = len(family(self.proc.pid)) - (1 if workers > 1 else 0)
                if workers_up >= workers:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready within {READY_TIMEOUT:g} s:\n{self.log_tail()}")
            time.sleep(0.2)
        time.sleep(1.0 if workers > 1 else 0)  # the last worker's socket is in the group
        self.pids()

    def answered(self) -> tuple[dict[str, float], dict[str, str]]:
        """From /metrics (the whole node): answered operations by status, and the quantiles of
        the server's own latency from receiving an operation to sending its answer."""
        found: dict[str, float] = collections.defaultdict(float)
        buckets: dict[float, float] = collections.defaultdict(float)
        for line in self.get("/metrics").decode().splitlines():
            if line.startswith("sync_operations_total{"):
                status = re.search(r'status="([^"]*)"', line)
                found[status.group(1) if status else "?"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("websocket_message_duration_seconds_bucket{"):
                bound = re.search(r'le="([^"]*)"', line)
                if bound is not None:
                    buckets[float(bound.group(1))] += float(line.rsplit(" ", 1)[1])
        return dict(found), bucket_quantiles(buckets, (0.5, 0.95, 0.99))

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def log_summary(self) -> list[tuple[int, str]]:
        """Warnings and errors of the server's log (JSON lines), counted by level + message."""
        counts: collections.Counter[str] = collections.Counter()
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                if "Traceback" in line or "Error" in line:
                    counts[f"(text) {line.strip()[:140]}"] += 1
                continue
            if isinstance(entry, dict) and entry.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                message = re.sub(r"0x[0-9a-f]+", "0x…", str(entry.get("message", "")))
                message = re.sub(r"\d+", "N", message)[:140]
                counts[f"{entry['level']} {entry.get('logger', '')}: {message}"] += 1
        return [(n, what) for what, n in counts.most_common()]


def bucket_quantiles(buckets: dict[float, float], quantiles: Sequence[float]) -> dict[str, str]:
    """Upper bounds of the histogram buckets (cumulative counts by `le`) holding each quantile."""
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0.0
    found = {}
    for q in quantiles:
        bound = next((le for le, count in ordered if total and count >= q * total), None)
        label = f"p{q * 100:g}"
        found[label] = "-" if bound is None else f"<= {bound * 1000:g} ms"
    return found


# ---- Locust ---------------------------------------------------------------------------------


def locust_command(args: argparse.Namespace, port: int, csv_prefix: Path) -> list[str]:
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
        "--run-time", f"{args.run_time}s", "--stop-timeout", "5",
        "--processes", str(args.processes), "--host", f"ws://127.0.0.1:{port}",
        "--op-rate", str(args.op_rate), "--terminals-per-store", str(args.terminals_per_store),
        "--ack-timeout", str(args.ack_timeout), "--totals-dir", str(csv_prefix.parent),
        "--csv", str(csv_prefix), "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    return command + list(args.locust_arg)


def run_locust(
    command: list[str], log_path: Path, timeout: float, server_pid: int
) -> tuple[int, Sampler]:
    """Locust to its end or `timeout` (then its whole process group is killed): its exit status
    and the CPU of its processes and the server's, sampled meanwhile."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=log_path.parent,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sampler = Sampler({"server": server_pid, "locust": proc.pid})
        sampler.start()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"Locust still running after {timeout:g} s: stopped", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                code = proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
        finally:
            sampler.finish()
    return code, sampler


def locust_summary(log_path: Path) -> str:
    """Locust's printed statistics: from its last request table to the end of its output."""
    lines = log_path.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^Type\s+Name\s", line)]
    return "\n".join(lines[starts[0] if starts else max(0, len(lines) - 60) :])


def read_stats(csv_prefix: Path) -> dict[str, dict[str, str]]:
    path = Path(f"{csv_prefix}_stats.csv")
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def read_failures(csv_prefix: Path) -> list[dict[str, str]]:
    path = Path(f"{csv_prefix}_failures.csv")
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_totals(directory: Path) -> dict[str, int]:
    """The locustfile's operation counts (--totals-dir), summed over its processes."""
    found: collections.Counter[str] = collections.Counter()
    for path in directory.glob("totals-*.json"):
        found.update(json.loads(path.read_text()))
    return dict(sorted(found.items()))


def _ms(value: str) -> str:
    if value in ("", "N/A"):
        return "-"
    number = float(value)
    return f"{number / 1000:.1f} s" if number >= 10_000 else f"{number:.0f} ms"


def stats_table(stats: dict[str, dict[str, str]], seconds: float) -> str:
    rows = [
        "| request | count | failures | p50 | p95 | p99 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in REQUESTS:
        row = stats.get(name)
        if row is None:
            continue
        count = int(row["Request Count"])
        rate = f" ({count / seconds:.0f}/s)" if name in ("ack", "push") and seconds else ""
        label = "generator lag" if name == "generator" else name
        rows.append(
            f"| {label} | {count}{rate} | {row['Failure Count']} "
            f"| {_ms(row['Median Response Time'])} | {_ms(row['95%'])} | {_ms(row['99%'])} "
            f"| {_ms(row['Max Response Time'])} |"
        )
    return "\n".join(rows)


# ---- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    raise_fd_limit(2 * args.users + 200)
    workdir = Path(tempfile.mkdtemp(prefix="chefia-locust-"))
    try:
        return measure(args, workdir)
    finally:
        if args.keep:
            kept = Path(args.keep)
            kept.mkdir(parents=True, exist_ok=True)
            for path in [*workdir.glob("*.log"), *workdir.glob("locust_*.csv")]:
                shutil.copy(path, kept / path.name)
            print(f"\nlogs and CSVs kept in {kept}")
        shutil.rmtree(workdir, ignore_errors=True)


def measure(args: argparse.Namespace, workdir: Path) -> int:
    storage = Storage(args, workdir)
    csv_prefix = workdir / "locust"
    spawn_s = args.users / args.spawn_rate
    storage.create()
    try:
        with server(args, storage, workdir) as srv:
            print(
                f"server: pid {srv.proc.pid}, port {srv.port}, storage "
                + (f"schema {storage.schema}, REDIS_PREFIX {storage.prefix}" if storage.schema
                   else str(storage.sqlite)),
                flush=True,
            )  # fmt: skip
            before_load = load_average()
            pg_before = postgres_cpu()
            redis_before = redis_cpu_seconds(args.redis_url) if args.mode == "pg" else None
            started = time.monotonic()
            code, sampler = run_locust(
                locust_command(args, srv.port, csv_prefix),
                workdir / "locust.log",
                spawn_s + args.run_time + 60,
                srv.proc.pid,
            )
            wall = time.monotonic() - started
            pg_s = cpu_used_us(pg_before, postgres_cpu()) / 1e6 if args.mode == "pg" else None
            redis_after = redis_cpu_seconds(args.redis_url) if args.mode == "pg" else None
            after_load = load_average()
            time.sleep(1.0)  # the last commits of what Locust sent before it stopped
            answered, server_latency = srv.answered()
            log_summary = srv.log_summary()
        operations = storage.operations()  # after the server's drain
    finally:
        with contextlib.suppress(Exception):
            storage.drop()

    stats = read_stats(csv_prefix)
    failures = read_failures(csv_prefix)
    totals = read_totals(workdir)
    cpu: dict[str, float] = {}
    for name in ("server", "locust"):
        for pid, seconds in sampler.used(name).items():
            cpu[f"{name} {pid}"] = round(seconds, 1)
    if pg_s is not None:
        cpu["postgresql"] = round(pg_s, 1)
    if redis_before is not None and redis_after is not None:
        cpu["redis"] = round(redis_after - redis_before, 1)
    report = {
        "users": args.users,
        "op_rate": args.op_rate,
        "run_time_s": args.run_time,
        "mode": args.mode,
        "workers": args.workers if args.mode == "pg" else 1,
        "processes": args.processes,
        "cores": os.cpu_count(),
        "locust_exit_code": code,
        "stats": {
            name: {k: row[k] for k in STATS_COLUMNS}
            for name, row in stats.items()
            if name in REQUESTS or name == "Aggregated"
        },
        "failures": [{k: f[k] for k in ("Name", "Error", "Occurrences")} for f in failures],
        "totals": totals,
        "log_rows": operations["rows"],
        "log_stores": operations["stores"],
        "answered": answered,
        "server_latency": server_latency,
        "server_log": [[n, what] for n, what in log_summary],
        "cpu_seconds": cpu,
        "wall_seconds": round(wall, 1),
        "load_average": {"before": before_load, "after": after_load, "max_1min": sampler.max_load},
    }
    print_report(report, locust_summary(workdir / "locust.log"), args)
    if args.json:
        Path(args.json).write_text(json.dumps(report))
    return code


def print_report(report: dict[str, Any], summary: str, args: argparse.Namespace) -> None:
    print("== Locust's summary")
    print(summary)
    print(
        f"\n== {args.users} users ({args.terminals_per_store} per store) at {args.op_rate} ops/s "
        f"for {args.run_time} s (spawned at {args.spawn_rate}/s), --processes {args.processes}, "
        f"--ack-timeout {args.ack_timeout:g} s; server: {args.mode}, "
        f"{report['workers']} worker(s); {report['cores']} cores"
    )
    print(stats_table(report["stats"], args.run_time))
    load = report["load_average"]
    print(
        f"\nload average before {load['before']}, at the end {load['after']}, "
        f"highest 1-minute {load['max_1min']:.2f}"
    )
    failures = report["failures"]
    print(f"\n== Failures ({sum(int(f['Occurrences']) for f in failures)})")
    for failure in failures:
        print(f"{failure['Occurrences']:>6}  {failure['Name']}: {failure['Error'][:160]}")
    acks = report["stats"].get("ack", {})
    acked = int(acks.get("Request Count", 0)) - int(acks.get("Failure Count", 0))
    totals, rows = report["totals"], report["log_rows"]
    print("\n== Totals")
    print(f"sent and their outcomes, by the terminals: {json.dumps(totals)}")
    print(f"in Locust's statistics: {acked} confirmed (its last report may miss the end)")
    print(f"operations in the operation log: {rows} ({report['log_stores']} stores)")
    print(f"answered by the server (sync_operations_total): {json.dumps(report['answered'])}")
    print(
        f"sent but not in the log: {totals.get('sent', 0) - rows}; "
        f"confirmed but not in the log: {max(0, totals.get('confirmed', 0) - rows)}"
    )
    latency = json.dumps(report["server_latency"])
    print(f"the server's receive-to-answer latency (its histogram): {latency}")
    wall = report["wall_seconds"]
    print(f"CPU seconds over {wall:.0f} s of Locust ({wall * report['cores']:.0f} core-seconds):")
    cpu = report["cpu_seconds"]
    for group in ("server", "locust", "postgresql", "redis"):
        parts = {k: v for k, v in cpu.items() if k.split()[0] == group}
        if parts:
            total = sum(parts.values())
            each = f" (by process: {', '.join(f'{v:g}' for v in parts.values())})"
            print(
                f"  {group}: {total:.1f} = {total / wall:.2f} cores{each if len(parts) > 1 else ''}"
            )
    log = report["server_log"]
    print(f"\n== Server log: warnings and errors ({sum(n for n, _ in log)})")
    for count, what in log[:20]:
        print(f"{count:>6}  {what}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.locust_run",
        description="Locust headless against a chefia-rt server started (and stopped) here.",
    )
    parser.add_argument("--mode", choices=("pg", "embedded"), default="pg")
    parser.add_argument("--workers", type=int, default=2, help="pg mode (default 2)")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--spawn-rate", type=float, default=100.0)
    parser.add_argument("--run-time", type=int, default=60, help="seconds")
    parser.add_argument("--op-rate", type=float, default=0.5, help="per terminal")
    parser.add_argument("--terminals-per-store", type=int, default=10)
    parser.add_argument("--processes", type=int, default=2, help="Locust processes")
    parser.add_argument("--ack-timeout", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--max-connections", type=int, default=0, help="MAX_WS_CONNECTIONS (default users+100)"
    )
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL DSN (pg mode)")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS, help="Redis URL (pg mode)")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="for the server (e.g. WS_TRANSPORT=picows)",
    )
    parser.add_argument("--keep", metavar="DIR", help="copy the logs and Locust's CSVs into DIR")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON to FILE")
    parser.add_argument(
        "--locust-arg", action="append", default=[], metavar="ARG", help="passed to Locust"
    )
    args = parser.parse_args(argv)
    if min(args.users, args.workers, args.run_time, args.processes) < 1:
        parser.error("--users, --workers, --run-time and --processes must be at least 1")
    if min(args.spawn_rate, args.op_rate, args.ack_timeout) <= 0:
        parser.error("--spawn-rate, --op-rate and --ack-timeout must be positive")
    for item in args.server_env:
        if "=" not in item:
            parser.error(f"--server-env {item!r}: NAME=VALUE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)  # cleanup runs in the `finally` blocks
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

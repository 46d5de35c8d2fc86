"""What Redis and PostgreSQL cost per operation, apart from the server (docs/capacity.md).

    python -m loadtest.capacity services [--duration 30] [bench options...]
    python -m loadtest.capacity bus [--subscribers 1,2,4] [--rate 2000] [--duration 10]

`services` runs the rush-hour bench, `python -m loadtest.bench --mode pg --server ours`, with
any further options passed on, against a private redis-server (a free port, no persistence, as
the machine's) and the machine's PostgreSQL under an application_name of its own, and reads
what each service spent apart from other work on the machine:
- Redis: its CPU (INFO cpu), commands and network bytes, over the whole bench;
- PostgreSQL: the CPU of the backends serving the server (found by application_name in
  pg_stat_activity every half second, read from /proc) and the WAL the cluster wrote (the
  whole cluster's: other work on it counts too);
per operation: the bench's measured operations plus its warm-up (the same rate for
min(2, duration/2) seconds); connecting the terminals counts too, so a longer --duration gives a
figure closer to the steady state.

`bus` measures the Redis bus alone as workers are added: a publisher (a RedisBus, as a worker
has, publishing one table UPDATE per message at --rate for --duration) and N subscriber
processes (each a RedisBus delivering to no terminal) on a private redis-server. Every worker
of every node subscribes to the one channel of committed operations and decodes each of them,
so the subscriber's CPU per operation is what every worker pays for every operation of the
whole deployment, and Redis's grows with the subscribers.

Each prints one JSON line on stdout and a short table on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import redis

from loadtest.bench import cpu_ticks, free_port
from loadtest.bench_store import DEFAULT_DSN

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICK_S = 1 / os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL = 0.5
BENCH_WARMUP_MAX_S = 2.0  # loadtest/bench.py's rush warm-up: min(2, duration / 2) seconds


def process_cpu_s(pid: int) -> float | None:
    ticks = cpu_ticks([pid]).get(pid)
    return None if ticks is None else ticks * CLOCK_TICK_S


def _per_op(value: float, ops: int, scale: float = 1.0) -> float | None:
    return round(value * scale / ops, 2) if ops else None


@contextlib.contextmanager
def private_redis() -> Any:
    """A redis-server of our own on a free port, as configured as the machine's (no
    persistence); yields (url, pid)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with contextlib.closing(redis.Redis.from_url(url, socket_timeout=1)) as client:
                    client.ping()
                break
            except redis.RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the private redis-server did not start") from None
                time.sleep(0.05)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_info(url: str) -> dict[str, float]:
    with contextlib.closing(redis.Redis.from_url(url, socket_timeout=5)) as client:
        info = client.info("all")
    return {
        "cpu_s": float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
        "commands": float(info["total_commands_processed"]),
        "net_in": float(info["total_net_input_bytes"]),
        "net_out": float(info["total_net_output_bytes"]),
    }


# ---- services ---------------------------------------------------------------------------------


def with_application_name(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "application_name"]
    query.append(("application_name", name))
    return urlunsplit(parts._replace(query=urlencode(query)))


class Backends:
    """CPU seconds of the PostgreSQL backends with one application_name, sampled."""

    def __init__(self, dsn: str, name: str) -> None:
        self.dsn = dsn
        self.name = name
        self.seconds: dict[int, float] = {}

    async def sample_until(self, done: asyncio.Event) -> None:
        db = await asyncpg.connect(self.dsn, timeout=10)
        try:
            while not done.is_set():
                rows = await db.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1", self.name
                )
                for row in rows:
                    if (seconds := process_cpu_s(row["pid"])) is not None:
                        self.seconds[row["pid"]] = seconds  # all of its life is ours
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), SAMPLE_INTERVAL)
        finally:
            await db.close()

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


async def wal_lsn(dsn: str) -> str:
    db = await asyncpg.connect(dsn, timeout=10)
    try:
        return str(await db.fetchval("SELECT pg_current_wal_lsn()::text"))
    finally:
        await db.close()


async def wal_bytes(dsn: str, since: str) -> int:
    db = await asyncpg.connect(dsn, timeout=10)
    try:
        query = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)"
        return int(await db.fetchval(query, since))
    finally:
        await db.close()


async def services(args: argparse.Namespace, bench_args: list[str]) -> dict[str, Any]:
    name = f"chefia-capacity-{uuid.uuid4().hex[:10]}"
    dsn = with_application_name(args.dsn, name)
    with private_redis() as (redis_url, _):
        argv = [sys.executable, "-m", "loadtest.bench", "--mode", "pg", "--server", "ours"]
        argv += ["--scenario", "rush", "--dsn", dsn, "--redis-url", redis_url, *bench_args]
        redis_before = redis_info(redis_url)
        wal_start = await wal_lsn(args.dsn)
        backends = Backends(args.dsn, name)
        done = asyncio.Event()
        sampler = asyncio.create_task(backends.sample_until(done))
        bench = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await bench.communicate()
        done.set()
        await sampler
        redis_after = redis_info(redis_url)
        wal = await wal_bytes(args.dsn, wal_start)
    if bench.returncode != 0:
        raise SystemExit(f"the bench failed ({bench.returncode}): {out.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    ours = result.get("ours")
    if not isinstance(ours, dict):
        raise SystemExit("capacity services measures one server: no --transport both")
    rate, seconds = result["rate_per_terminal"], result["duration_s"]
    terminals = result["stores"] * result["terminals_per_store"]
    warmup = int(rate * terminals * min(BENCH_WARMUP_MAX_S, seconds / 2))
    ops = int(ours["ops_confirmed"]) + warmup
    spent = {k: redis_after[k] - redis_before[k] for k in redis_after}
    return {
        "bench": "capacity_services",
        "command": " ".join(argv[1:]),
        "operations": ops,
        "connections": terminals,
        "offered_ops_s": ours["offered_ops_s"],
        "achieved_ops_s": ours["achieved_ops_s"],
        "ack_p99_ms": ours["ack_p99_ms"],
        "errors": ours["errors"],
        "error_samples": ours.get("error_samples", []),
        "server_cpu_us_per_op": ours["server_cpu_us_per_op"],
        "pg_cpu_us_per_op_all_postgres": ours["pg_cpu_us_per_op"],
        "pg_backends_cpu_us_per_op": _per_op(backends.total_s, ops, 1e6),
        "pg_backends": len(backends.seconds),
        "pg_wal_bytes_per_op": _per_op(wal, ops),
        "redis_cpu_us_per_op": _per_op(spent["cpu_s"], ops, 1e6),
        "redis_commands_per_op": _per_op(spent["commands"], ops),
        "redis_net_in_bytes_per_op": _per_op(spent["net_in"], ops),
        "redis_net_out_bytes_per_op": _per_op(spent["net_out"], ops),
        "client_cpu_us_per_op": ours["client_cpu_us_per_op"],
        "load_average": ours.get("load_average"),
    }


# ---- bus --------------------------------------------------------------------------------------


def _push(store: str, n: int) -> Any:
    """A committed table UPDATE as the writer publishes it."""
    from chefia_rt.bus.base import Push
    from chefia_rt.domain import OpRecord

    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    record = OpRecord(
        id=f"op-{n}",
        store_id=store,
        entity_type="tables",
        entity_id=f"table-{n % 40}",
        operation="UPDATE",
        data={"status": "occupied", "guests": n % 8 + 1},
        version=n,
        seq=n,
        status="applied",
        conflict_resolved=False,
        terminal_id=f"pos-{n % 10:02d}",
        user_id=None,
        priority="medium",
        timestamp=now,
        server_time=now,
    )
    return Push(record, record.terminal_id)


async def subscriber(url: str, prefix: str) -> None:
    """A worker's bus that delivers to no terminal: counts, reports on a line of stdin."""
    from chefia_rt.bus.redis import RedisBus

    received = 0

    def deliver(_store: str, pushes: Sequence[Any]) -> None:
        nonlocal received
        received += len(pushes)

    bus = RedisBus(url, prefix)
    await bus.start(deliver, lambda *_: None, lambda: None)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        print(json.dumps({"received": received}), flush=True)
    await bus.close()


async def bus_run(args: argparse.Namespace, subscribers: int) -> dict[str, Any]:
    from chefia_rt.bus.redis import RedisBus

    with private_redis() as (url, redis_pid):
        prefix = f"capacity-{uuid.uuid4().hex[:8]}"
        argv = [sys.executable, "-m", "loadtest.capacity", "bus-subscriber", url, prefix]
        children = [
            await asyncio.create_subprocess_exec(
                *argv, cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
            for _ in range(subscribers)
        ]
        try:
            for child in children:
                assert child.stdout is not None
                line = await asyncio.wait_for(child.stdout.readline(), 30)
                if line.strip() != b"ready":
                    raise SystemExit(f"a subscriber did not start: {line!r}")
            publisher = RedisBus(url, prefix)
            await publisher.start(lambda *_: None, lambda *_: None, lambda: None)
            pushes = [_push(f"store-{n % args.stores:04d}", n) for n in range(args.stores * 4)]
            before = {c.pid: process_cpu_s(c.pid) or 0.0 for c in children}
            redis_before = process_cpu_s(redis_pid) or 0.0
            publisher_before = time.process_time()
            total = int(args.rate * args.duration)
            started = time.perf_counter()
            sent = 0
            while sent < total:
                due = min(total, int((time.perf_counter() - started) * args.rate) + 1)
                while sent < due:
                    push = pushes[sent % len(pushes)]
                    await publisher.publish(push.record.store_id, [push])
                    sent += 1
                await asyncio.sleep(0.002)
            await publisher.close()  # what is queued goes out first
            publisher_s = time.process_time() - publisher_before
            received: list[int] = []
            for _ in range(40):  # the subscribers' tail, at most 2 s
                received = []
                for child in children:
                    assert child.stdin is not None and child.stdout is not None
                    child.stdin.write(b"report\n")
                    await child.stdin.drain()
                    received.append(json.loads(await child.stdout.readline())["received"])
                if min(received) >= total:
                    break
                await asyncio.sleep(0.05)
            subscriber_s = [(process_cpu_s(c.pid) or 0.0) - before[c.pid] for c in children]
            redis_s = (process_cpu_s(redis_pid) or 0.0) - redis_before
        finally:
            for child in children:
                if child.stdin is not None:
                    child.stdin.close()
            for child in children:
                try:
                    await asyncio.wait_for(child.wait(), 10)
                except TimeoutError:
                    child.kill()
                    await child.wait()
    elapsed = time.perf_counter() - started
    return {
        "subscribers": subscribers,
        "published": total,
        "received_min": min(received, default=0),
        "seconds": round(elapsed, 1),
        "redis_cpu_us_per_op": _per_op(redis_s, total, 1e6),
        "redis_cpu_us_per_delivery": _per_op(redis_s, total * (subscribers + 1), 1e6),
        "subscriber_cpu_us_per_op": _per_op(sum(subscriber_s) / subscribers, total, 1e6),
        "publisher_cpu_us_per_op": _per_op(publisher_s, total, 1e6),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


async def bus(args: argparse.Namespace) -> dict[str, Any]:
    runs = [await bus_run(args, n) for n in args.subscribers]
    return {
        "bench": "capacity_bus",
        "rate": args.rate,
        "duration_s": args.duration,
        "stores": args.stores,
        "runs": runs,
    }


# ---- command line -----------------------------------------------------------------------------


def _counts(value: str) -> list[int]:
    items = [int(v) for v in value.split(",") if v]
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return items


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m loadtest.capacity", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("services", help="the rush-hour bench's Redis and PostgreSQL cost")
    run.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL DSN")
    fan = commands.add_parser("bus", help="the Redis bus's cost per operation and subscriber")
    fan.add_argument("--subscribers", type=_counts, default=[1, 2, 4])
    fan.add_argument("--rate", type=float, default=2000.0, help="operations per second")
    fan.add_argument("--duration", type=float, default=10.0, help="seconds")
    fan.add_argument("--stores", type=int, default=100)
    sub = commands.add_parser("bus-subscriber")  # one subscriber process of `bus`
    sub.add_argument("url")
    sub.add_argument("prefix")
    return parser.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parse_args(argv)
    if args.command != "services" and rest:
        raise SystemExit(f"unknown arguments: {' '.join(rest)}")
    import uvloop

    if args.command == "bus-subscriber":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        uvloop.run(subscriber(args.url, args.prefix))
        return 0
    result = uvloop.run(services(args, rest) if args.command == "services" else bus(args))
    print(json.dumps(result), flush=True)
    rows = result.get("runs", [result])
    keys = [k for k in rows[0] if k.endswith(("_per_op", "_per_delivery")) or k == "subscribers"]
    print("| " + " | ".join(keys) + " |", file=sys.stderr)
    print("|" + "---|" * len(keys), file=sys.stderr)
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

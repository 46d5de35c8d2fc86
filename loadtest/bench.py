"""The rush-hour benchmark (docs/benchmarks.md §3): our server against a bare `websockets` baseline.

    python -m loadtest.bench [--mode embedded|pg] [--stores 100] [--terminals 10] [--rate 2]
                             [--duration 10] [--scenario rush|sweep|idle|flat] [--server both]
                             [--transport websockets|picows|both]

Prints ONE JSON line. S stores x T terminals (msgpack) each send UPDATEs of their own `tables`
entities (no lock needed) at an open-loop rate R per terminal; every operation is confirmed to
its sender and pushed to the T-1 other terminals of its store. The load generator is this
process (uvloop, raw `websockets` clients); the servers are separate processes it starts:

- ours, `--mode embedded`: `python -m chefia_rt serve`, one worker, SQLite, in-process bus;
- ours, `--mode pg`: the same with PostgreSQL (a fresh schema of the DSN's database) + Redis (a
  unique REDIS_PREFIX) + `--workers` (2) workers under the supervisor; both cleaned up after;
- baseline (loadtest/baseline_server.py): bare websockets on uvloop that only acknowledges and
  forwards (no storage, validation or batching), under the same load, in the same invocation;
- with `--durable-baseline`, also that relay acknowledging and forwarding only once each operation
  is on disk (group commit into SQLite, fdatasync of the WAL): `baseline_durable`, and ratios
  `ratio_durable` (`ratio_websockets_durable`, ...) beside the ratios to the bare relay.

`--transport` is our server's WS_TRANSPORT; `both` runs ours once on each WebSocket front end, then
the baseline, and reports each (`ours_websockets`, `ours_picows`) with its own ratios to the
baseline (`ratio_websockets`, `ratio_picows`); with one transport the keys are `ours` and `ratio`.

Latencies start at the operation's *scheduled* send time (open loop, so a stalled generator or
server shows up as latency instead of hiding as a lower rate): ack = its confirmation arrived,
propagation = a push of it arrived at another terminal. Deliveries expected are T-1 per
operation confirmed with a seq; duplicates are pushes a terminal got twice (or of its own op).
CPU is utime+stime from /proc/<pid>/stat over the measured window: the server's processes
(supervisor and workers), PostgreSQL's (every process named postgres*, as loadtest/bench_store.py
does; other work on the machine's PostgreSQL counts too) and this generator's own. RSS per
connection is the growth of the server processes' RSS while the terminals connected.

Stalls: latency over time is the p99 of each 250 ms window of scheduled send times
(`ack_window_p99_ms`, `propagation_window_p99_ms`), with the worst window, when it started in the
run and its ratio to the run's p99 (`*_worst_window_*`); for our server, the worst event-loop lag
of each worker over the run (`loop_lag_max_ms_by_worker`, from /ws/stats, which lists each
worker's worst lag of every recent second). Where a batch's time went: for our server, the mean
milliseconds per committed batch of each stage over the run (`batch_stages_ms`, from the
`sync_batch_stage_seconds_total` counters of /metrics; docs/operations.md names the stages).
A Markdown table of the rush run goes to stderr, and the stages under it.

Scenarios:
- rush (default): one run at --rate, ours and the baseline, with ratios ours / baseline;
- sweep: --rates per terminal, rising, each for --duration, until p99 ack > 50 ms or something
  is lost; reports the highest passing total rate and each server's best achieved ops/s;
- idle: --idle-connections connections that send nothing; RSS per connection (raises the soft
  RLIMIT_NOFILE to the hard one);
- flat: CPU per op at --flat-stores (default 20 and 200 stores x T terminals) at the same rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import lz4.frame
import msgpack
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from chefia_rt.config import TRANSPORTS
from loadtest.bench_store import (
    DEFAULT_DSN,
    _positive,
    cpu_used_us,
    postgres_cpu,
    print_result,
    with_search_path,
)

DEFAULT_REDIS = os.environ.get(
    "CHEFIA_BENCH_REDIS_URL", os.environ.get("CHEFIA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
)
ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
COMPRESSED = b"compressed:"
TICK = 0.002  # seconds between the generator's sending rounds
WINDOW = 0.25  # seconds: latency over time is the p99 of each window of send times
STATS_INTERVAL = 2.0  # our server's WS_STATS_INTERVAL (its default, set for the bench)
READY_TIMEOUT = 30.0
CONNECT_CONCURRENCY = 100
CONNECT_ATTEMPTS = 8
ACK_TARGET_MS = 50.0  # the sweep's bar: p99 ack at most this
SERVER_ENV_PREFIXES = ("WS_", "MAX_WS_", "DATABASE_", "REDIS_", "JWT_", "SYNC_", "METRICS_")
STATUSES = ("free", "occupied", "ordering", "eating", "paying", "cleaning")


# ---- /proc ----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # fields from the state on (stat field 3)


def cpu_ticks(pids: Sequence[int]) -> dict[int, int]:
    """pid -> utime + stime of each process that still exists."""
    found = {}
    for pid in pids:
        if (fields := _stat_fields(pid)) is not None:
            found[pid] = int(fields[11]) + int(fields[12])
    return found


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    return total


def child_pids(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- servers --------------------------------------------------------------------------------


def server_env(port: int, max_connections: int, **settings: str) -> dict[str, str]:
    """The environment of a benchmarked `chefia-rt serve`: this process's, less any server
    setting it may carry, on 127.0.0.1:`port`, quiet logs, room for `max_connections`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVER_ENV_PREFIXES)}
    env.update(
        WS_HOST="127.0.0.1",
        WS_PORT=str(port),
        WS_LOG_LEVEL="WARNING",
        MAX_WS_CONNECTIONS=str(max_connections),
        PYTHONUNBUFFERED="1",
        **settings,
    )
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A server under test, started by this process, and how to reach and measure it."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    path: str  # the WebSocket path prefix, terminal id follows

    def pids(self) -> list[int]:
        """The supervisor (or single process) and its workers."""
        return [self.proc.pid, *child_pids(self.proc.pid)]

    def url(self, store: str, terminal: str) -> str:
        return (
            f"ws://127.0.0.1:{self.port}{self.path}/{terminal}"
            f"?store_id={store}&type=pos&encoding=msgpack"
        )

    def log_tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-3000:]

    async def stop(self) -> None:
        pids = self.pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.proc.wait, 20)  # a drain commits what is queued
        for pid in pids:  # only the processes this server ran, by pid
            if _stat_fields(pid) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


async def wait_ready(server: ServerProcess) -> None:
    """Until a probe terminal is greeted (every worker of a supervisor is up by then or soon)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
        try:
            async with asyncio.timeout(2):
                async with websockets.connect(
                    server.url("bench-probe", "probe"), compression=None
                ) as ws:
                    await ws.recv()
            return
        except (OSError, TimeoutError, websockets.InvalidHandshake, ConnectionClosed):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} never got ready:\n{server.log_tail()}") from None
            await asyncio.sleep(0.1)


def spawn(
    name: str, argv: list[str], env: dict[str, str], workdir: Path, path: str, port: int
) -> ServerProcess:
    """Start a server process, its output into NAME.log in the work directory."""
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return ServerProcess(name, port, proc, log_path, path)


@contextlib.asynccontextmanager
async def baseline_server(workdir: Path, durable: bool = False) -> AsyncIterator[ServerProcess]:
    port = free_port()
    argv = [sys.executable, "-m", "loadtest.baseline_server", "--port", str(port)]
    if durable:
        argv += ["--durable", str(workdir / f"durable-{port}.db")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = spawn("baseline", argv, env, workdir, "/ws", port)
    try:
        await wait_ready(server)
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def our_server(
    args: argparse.Namespace, workdir: Path, transport: str
) -> AsyncIterator[ServerProcess]:
    """`chefia-rt serve` in the chosen mode on `transport`, with its own storage, cleaned up
    afterwards."""
    port = free_port()
    # Room for every scenario's terminals on one worker (SO_REUSEPORT may not spread evenly).
    busiest = args.terminals * max(args.stores, *args.flat_stores)
    env = server_env(
        port,
        100 + max(1000, args.idle_connections, busiest),
        WS_STATS_INTERVAL=str(STATS_INTERVAL),
        WS_TRANSPORT=transport,
    )
    env.update(kv.split("=", 1) for kv in args.server_env)
    schema = prefix = None
    if args.mode == "pg":
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        prefix = f"bench-{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(with_search_path(args.dsn, "public"), timeout=10)
        try:
            await admin.execute(f'CREATE SCHEMA "{schema}"')
        finally:
            await admin.close()
        env.update(
            DATABASE_URL=with_search_path(args.dsn, schema),
            REDIS_URL=args.redis_url,
            REDIS_PREFIX=prefix,
            WS_WORKERS=str(args.workers),
        )
    else:
        env.update(DATABASE_URL=f"sqlite:///{workdir / 'bench.db'}", WS_WORKERS="1")
    argv = [sys.executable, "-m", "chefia_rt", "serve"]
    server = spawn(f"ours-{args.mode}-{transport}", argv, env, workdir, "/ws", port)
    try:
        await wait_ready(server)
        if args.mode == "pg":
            await _wait_workers(server, args.workers)
        yield server
    finally:
        await server.stop()
        if schema is not None:
            admin = await asyncpg.connect(with_search_path(args.dsn, "public"), timeout=10)
            try:
                await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await admin.close()
        if prefix is not None:
            client = aioredis.from_url(args.redis_url, socket_timeout=5)
            try:
                keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=500)]
                if keys:
                    await client.delete(*keys)
            finally:
                await client.aclose()


async def _wait_workers(server: ServerProcess, workers: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while len(server.pids()) < workers + 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name}: workers never started:\n{server.log_tail()}")
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # every worker answering (the probe reached only one of them)


# ---- terminals ------------------------------------------------------------------------------


@dataclass
class Phase:
    """What one measured run sent and received."""

    scheduled: dict[str, float] = field(default_factory=dict)  # op id -> scheduled send time
    acks: list[float] = field(default_factory=list)
    ack_sent: list[float] = field(default_factory=list)  # each ack's scheduled send time
    propagation: list[float] = field(default_factory=list)
    propagation_sent: list[float] = field(default_factory=list)
    confirmed_with_seq: int = 0
    deliveries_expected: int = 0
    deliveries_received: int = 0
    duplicates: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    last_ack: float = 0.0

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:200])


class Term:
    """One benchmark terminal: a raw websockets client reading in its own task."""

    __slots__ = ("closed", "index", "name", "peers", "seen", "store", "task", "versions", "ws")

    def __init__(self, index: int, store: str, name: str, ws: ClientConnection) -> None:
        self.index = index
        self.store = store
        self.name = name
        self.ws = ws
        self.peers = 0
        self.versions: list[int] = [0, 0]  # its two tables
        self.seen: set[str] = set()
        self.closed = False
        self.task: asyncio.Task[None] | None = None


class Load:
    """Connections to one server and the open-loop generator that drives them."""

    def __init__(self, server: ServerProcess, stores: int, terminals: int) -> None:
        self.server = server
        self.stores = stores
        self.terminals = terminals
        self.terms: list[Term] = []
        self.phase = Phase()
        self.phases = 0  # op ids carry the phase: an id seen before is answered `duplicate`
        self.loop = asyncio.get_running_loop()

    async def connect(self, idle: bool = False) -> None:
        """Open S x T connections (each greeted) and start reading them."""
        tag = uuid.uuid4().hex[:6]
        specs = [
            (s * self.terminals + t, f"store-{tag}-{s:04d}", f"t{s:04d}-{t:02d}")
            for s in range(self.stores)
            for t in range(self.terminals)
        ]
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(index: int, store: str, name: str) -> Term:
            async with gate:
                for attempt in range(CONNECT_ATTEMPTS):
                    try:
                        ws = await websockets.connect(
                            self.server.url(store, name),
                            compression=None,
                            ping_interval=None,
                            max_queue=None if not idle else 16,
                            open_timeout=30,
                        )
                        await asyncio.wait_for(ws.recv(), 30)  # connection_established
                        return Term(index, store, name, ws)
                    except (OSError, TimeoutError, websockets.InvalidHandshake, ConnectionClosed):
                        # Refused or closed 1013 (busy): a terminal reconnects, and so do we.
                        await asyncio.sleep(0.2 * (attempt + 1))
                raise RuntimeError(f"{name} could not connect in {CONNECT_ATTEMPTS} attempts")

        self.terms = list(await asyncio.gather(*(one(*spec) for spec in specs)))
        for term in self.terms:
            term.peers = self.terminals - 1
            if not idle:
                term.task = asyncio.create_task(self._read(term))

    async def close(self) -> None:
        for term in self.terms:
            if term.task is not None:
                term.task.cancel()
        for start in range(0, len(self.terms), 500):
            await asyncio.gather(
                *(t.ws.close() for t in self.terms[start : start + 500]), return_exceptions=True
            )
        self.terms = []

    async def _read(self, term: Term) -> None:
        try:
            async for frame in term.ws:
                now = time.perf_counter()
                body = frame if isinstance(frame, bytes) else frame.encode()
                if body.startswith(COMPRESSED):
                    body = lz4.frame.decompress(body[len(COMPRESSED) :])
                message = msgpack.unpackb(body)
                if message.get("type") == "message_batch":
                    for inner in message["messages"]:
                        self._handle(term, inner, now)
                else:
                    self._handle(term, message, now)
        except ConnectionClosed as exc:
            if not term.closed:
                self.phase.error(f"{term.name} closed by the server: {exc}")
        finally:
            term.closed = True

    def _handle(self, term: Term, message: dict[str, Any], now: float) -> None:
        phase = self.phase
        kind = message.get("type")
        if kind == "data_sync":
            op_id = message["operation"]["id"]
            start = phase.scheduled.get(op_id)
            if start is None:
                return  # an earlier phase's operation arriving late
            if op_id in term.seen or op_id.startswith(f"{term.index}:"):
                phase.duplicates += 1
                return
            term.seen.add(op_id)
            phase.deliveries_received += 1
            phase.propagation.append(now - start)
            phase.propagation_sent.append(start)
        elif kind == "sync_confirmation":
            op_id = message["operation_id"]
            start = phase.scheduled.get(op_id)
            if start is None:
                return
            phase.acks.append(now - start)
            phase.ack_sent.append(start)
            phase.last_ack = now
            if message.get("seq") is not None:
                phase.confirmed_with_seq += 1
                phase.deliveries_expected += term.peers
        elif kind in ("sync_error", "sync_conflict", "error", "resync_required"):
            phase.error(f"{term.name}: {message}")

    async def run(self, rate: float, duration: float, drain_timeout: float) -> dict[str, Any]:
        """Send at `rate` ops/s per terminal for `duration` s, wait for the tail, measure."""
        self.phase = phase = Phase()
        self.phases += 1
        for term in self.terms:
            term.seen = set()
        pids = self.server.pids()
        total_rate = rate * len(self.terms)
        planned = int(total_rate * duration)
        if self.server.name.startswith("ours"):
            # Every worker's report has written the stages of what ran before (the warm-up).
            await asyncio.sleep(STATS_INTERVAL + 0.5)
        stages_before = await self.batch_stages()
        cpu_before = cpu_ticks(pids)
        pg_before = postgres_cpu()
        client_before = time.process_time()
        started = time.perf_counter() + 0.05
        wall_started = time.time() + 0.05
        sent = 0
        terms = self.terms
        count = len(terms)
        packb = msgpack.packb
        stamp = ""
        stamp_at = 0.0
        while sent < planned:
            now = time.perf_counter()
            due = min(planned, int((now - started) * total_rate) + 1) if now >= started else 0
            if now - stamp_at > 0.5:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
                stamp_at = now
            while sent < due:
                term = terms[sent % count]
                n = sent // count
                table = n % 2
                term.versions[table] += 1
                op_id = f"{term.index}:{self.phases}:{n}"
                phase.scheduled[op_id] = started + sent / total_rate
                frame = packb(
                    {
                        "type": "data_sync",
                        "operation": {
                            "id": op_id,
                            "entity_type": "tables",
                            "entity_id": f"table-{term.name}-{table}",
                            "operation": "UPDATE",
                            "data": {"status": STATUSES[n % len(STATUSES)], "guests": n % 8 + 1},
                            "version": term.versions[table],
                            "timestamp": stamp,
                        },
                    }
                )
                sent += 1
                if term.closed:
                    phase.error(f"{term.name}: not sent, connection closed")
                    continue
                try:
                    await term.ws.send(frame)
                except ConnectionClosed:
                    phase.error(f"{term.name}: send failed, connection closed")
            await asyncio.sleep(TICK)
        send_seconds = time.perf_counter() - started
        # The tail: every answer and every delivery, or the drain timeout.
        for _ in range(int(drain_timeout / 0.02)):
            answered = len(phase.acks) + phase.errors >= sent
            if answered and phase.deliveries_received >= phase.deliveries_expected:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # late duplicates would show up here
        client_us = (time.process_time() - client_before) * 1e6
        server_us = cpu_used_us_pids(cpu_before, cpu_ticks(pids))
        pg_us = cpu_used_us(pg_before, postgres_cpu())
        confirmed = len(phase.acks)
        span = (phase.last_ack - started) if phase.last_ack > started else send_seconds
        lag = await self.loop_lag(wall_started, time.time())
        stages = stage_means(stages_before, await self.batch_stages())
        return {
            "connections": len(self.terms),
            "rate_per_terminal": rate,
            "ops_sent": sent,
            "ops_confirmed": confirmed,
            "offered_ops_s": round(sent / send_seconds, 1),
            "achieved_ops_s": round(confirmed / span, 1) if span > 0 else None,
            "ack_p50_ms": _percentile(phase.acks, 50),
            "ack_p99_ms": _percentile(phase.acks, 99),
            "propagation_p50_ms": _percentile(phase.propagation, 50),
            "propagation_p99_ms": _percentile(phase.propagation, 99),
            "deliveries_expected": phase.deliveries_expected,
            "deliveries_received": phase.deliveries_received,
            "duplicates": phase.duplicates,
            "errors": phase.errors,
            "error_samples": phase.error_samples,
            "server_cpu_us_per_op": round(server_us / confirmed, 1) if confirmed else None,
            "pg_cpu_us_per_op": round(pg_us / confirmed, 1) if confirmed else None,
            "client_cpu_us_per_op": round(client_us / sent, 1) if sent else None,
            "server_processes": len(pids),
            **window_figures("ack", phase.ack_sent, phase.acks, started),
            **window_figures("propagation", phase.propagation_sent, phase.propagation, started),
            **lag,
            "batch_stages_ms": stages,
        }

    async def batch_stages(self) -> dict[str, float] | None:
        """Our server's stage counters so far, from /metrics (every worker's, as each wrote them
        at its last report): seconds by stage, and the batches timed (`batches`); None for the
        baseline."""
        if not self.server.name.startswith("ours"):
            return None
        url = f"http://127.0.0.1:{self.server.port}/metrics"
        text = (await asyncio.to_thread(_http_get, url)).decode()
        found: dict[str, float] = {}
        for stage, number in STAGE_SAMPLE.findall(text):
            found[stage] = found.get(stage, 0.0) + float(number)
        found["batches"] = sum(float(number) for number in BATCHES_SAMPLE.findall(text))
        return found

    async def loop_lag(self, since: float, until: float) -> dict[str, Any]:
        """The worst event-loop lag of each worker of our server between two wall-clock times,
        from /ws/stats (each worker's lag per second, shared on the bus every WS_STATS_INTERVAL);
        None for the baseline, which has no such figure."""
        if not self.server.name.startswith("ours"):
            return {
                "loop_lag_max_ms_by_worker": None,
                "loop_lag_max_ms": None,
                "loop_lag_ms_by_second": None,
            }
        await asyncio.sleep(STATS_INTERVAL + 0.5)  # every worker has reported since `until`
        url = f"http://127.0.0.1:{self.server.port}/ws/stats"
        stats = json.loads(await asyncio.to_thread(_http_get, url))
        workers = sorted((stats.get("worker_loop_lag") or {}).items())
        by_worker = {w: worst_lag_ms(f.get("by_second") or [], since, until) for w, f in workers}
        found = [ms for ms in by_worker.values() if ms is not None]
        return {
            "loop_lag_max_ms_by_worker": by_worker,
            "loop_lag_max_ms": max(found, default=None),
            # Each second of the run (from its start), to set beside the latency windows.
            "loop_lag_ms_by_second": {
                w: [
                    [math.floor(second - since), ms]
                    for second, ms in f.get("by_second") or []
                    if since - 1 < second <= until
                ]
                for w, f in workers
            },
        }


def cpu_used_us_pids(before: dict[int, int], after: dict[int, int]) -> float:
    return CLOCK_TICK_US * sum(t - before.get(pid, 0) for pid, t in after.items())


STAGE_SAMPLE = re.compile(
    r'^sync_batch_stage_seconds_total\{[^}]*stage="([a-z]+)"[^}]*\} (\S+)$', re.M
)
BATCHES_SAMPLE = re.compile(r"^sync_batches_timed_total(?:\{[^}]*\})? (\S+)$", re.M)


def stage_means(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> dict[str, float] | None:
    """Mean milliseconds per committed batch of each stage between two readings of the
    counters, and the batches timed (`batches`)."""
    if before is None or after is None:
        return None
    batches = after["batches"] - before["batches"]
    means = {
        stage: round(1000 * (spent - before.get(stage, 0.0)) / batches, 2)
        for stage, spent in after.items()
        if stage != "batches" and batches > 0
    }
    means["batches"] = batches
    return means


def _http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as answer:
        body: bytes = answer.read()
        return body


def worst_lag_ms(by_second: Sequence[Sequence[float]], since: float, until: float) -> float | None:
    """The largest lag of the [epoch second, ms] entries whose second overlaps [since, until]."""
    found = [ms for second, ms in by_second if since - 1 < second <= until]
    return max(found, default=None)


def window_p99s(
    sent: Sequence[float], latencies: Sequence[float], started: float, width: float = WINDOW
) -> list[float | None]:
    """p99 (ms) of the latencies of each `width`-second window of scheduled send times from
    `started` on, in order; None for a window without any."""
    buckets: list[list[float]] = []
    for at, latency in zip(sent, latencies, strict=True):
        index = max(0, int((at - started) / width))
        while len(buckets) <= index:
            buckets.append([])
        buckets[index].append(latency)
    return [_percentile(bucket, 99) for bucket in buckets]


def window_figures(
    name: str, sent: Sequence[float], latencies: Sequence[float], started: float
) -> dict[str, Any]:
    """Latency over time: p99 per 250 ms window, the worst window (its p99, when it started in
    the run, its ratio to the whole run's p99)."""
    series = window_p99s(sent, latencies, started)
    run_p99 = _percentile(list(latencies), 99)
    worst = max((p for p in series if p is not None), default=None)
    at = series.index(worst) * WINDOW if worst is not None else None
    return {
        f"{name}_window_p99_ms": series,
        f"{name}_worst_window_p99_ms": worst,
        f"{name}_worst_window_at_s": at,
        f"{name}_worst_window_ratio": _ratio(worst, run_p99),
    }


def _percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[index] * 1000, 2)


def lost(figures: dict[str, Any]) -> bool:
    return bool(
        figures["errors"]
        or figures["ops_confirmed"] < figures["ops_sent"]
        or figures["deliveries_received"] < figures["deliveries_expected"]
        or figures["duplicates"]
    )


# ---- scenarios ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def server_of(
    kind: str, args: argparse.Namespace, workdir: Path
) -> AsyncIterator[ServerProcess]:
    if kind in BASELINES:
        async with baseline_server(workdir, durable=kind == "baseline_durable") as server:
            yield server
    else:
        async with our_server(args, workdir, transport_of(kind, args.transport)) as server:
            yield server


def transport_of(kind: str, default: str) -> str:
    """Our server's WS_TRANSPORT in the run named `kind`: "ours_<transport>", or "ours" (the
    one `--transport`, `default`)."""
    return kind.removeprefix("ours_") if kind.startswith("ours_") else default


def our_kinds(args: argparse.Namespace) -> list[str]:
    if args.transport != "both":
        return ["ours"]
    return [f"ours_{transport}" for transport in TRANSPORTS]


async def rush(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    async with server_of(kind, args, workdir) as server:
        await asyncio.sleep(0.5)
        rss_before = rss_kib(server.pids())
        load = Load(server, args.stores, args.terminals)
        await load.connect()
        await asyncio.sleep(1.0)
        rss_after = rss_kib(server.pids())
        try:
            await load.run(args.rate, min(2.0, args.duration / 2), args.drain_timeout)  # warm-up
            profiler = start_profiler(args, kind, server)
            figures = await load.run(args.rate, args.duration, args.drain_timeout)
            if profiler is not None:
                await asyncio.to_thread(profiler.wait, 60)
        finally:
            await load.close()
    figures["rss_per_connection_kib"] = round(
        (rss_after - rss_before) / (args.stores * args.terminals), 2
    )
    figures["load_average"] = load_average()
    if not kind.startswith("ours") or args.mode == "embedded":
        figures["pg_cpu_us_per_op"] = None  # it uses no PostgreSQL: only others' work would show
    return figures


def start_profiler(
    args: argparse.Namespace, kind: str, server: ServerProcess
) -> subprocess.Popen[bytes] | None:
    """py-spy on the server's processes for the measured run (--profile DIR), a flame graph."""
    if args.profile is None:
        return None
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    suffix = "svg" if args.profile_format == "flamegraph" else "txt"
    out = Path(args.profile) / f"flame-{kind}-{args.mode}.{suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [py_spy, "record", "--pid", str(server.proc.pid), "--subprocesses", "--nonblocking"]
    argv += ["--duration", str(int(args.duration)), "--rate", "200", "-o", str(out)]
    argv += ["--format", args.profile_format]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def sweep(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    runs = []
    async with server_of(kind, args, workdir) as server:
        load = Load(server, args.stores, args.terminals)
        await load.connect()
        try:
            await load.run(args.rates[0], 2.0, args.drain_timeout)  # warm-up
            for rate in args.rates:
                figures = await load.run(rate, args.duration, args.drain_timeout)
                figures["load_average"] = load_average()
                runs.append(figures)
                if lost(figures) or (figures["ack_p99_ms"] or 0) > ACK_TARGET_MS:
                    break
                await asyncio.sleep(1.0)
        finally:
            await load.close()
    passing = [r for r in runs if not lost(r) and (r["ack_p99_ms"] or 0) <= ACK_TARGET_MS]
    return {
        "highest_ok_offered_ops_s": max((r["offered_ops_s"] for r in passing), default=None),
        "best_achieved_ops_s": max((r["achieved_ops_s"] or 0 for r in runs), default=None),
        "runs": [
            {
                k: r[k]
                for k in (
                    "offered_ops_s",
                    "achieved_ops_s",
                    "ack_p50_ms",
                    "ack_p99_ms",
                    "propagation_p99_ms",
                    "ack_worst_window_p99_ms",
                    "ack_worst_window_ratio",
                    "loop_lag_max_ms",
                    "deliveries_expected",
                    "deliveries_received",
                    "errors",
                    "server_cpu_us_per_op",
                    "client_cpu_us_per_op",
                    "load_average",
                )
            }
            for r in runs
        ],
    }


async def idle(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    stores = max(1, args.idle_connections // args.terminals)
    async with server_of(kind, args, workdir) as server:
        await asyncio.sleep(0.5)
        before = rss_kib(server.pids())
        load = Load(server, stores, args.terminals)
        started = time.monotonic()
        await load.connect(idle=True)
        connect_s = time.monotonic() - started
        await asyncio.sleep(2.0)
        after = rss_kib(server.pids())
        held = sum(1 for t in load.terms if t.ws.close_code is None)
        await load.close()
    return {
        "connections": stores * args.terminals,
        "held": held,
        "connect_seconds": round(connect_s, 1),
        "server_rss_before_kib": before,
        "server_rss_after_kib": after,
        "rss_per_connection_kib": round((after - before) / (stores * args.terminals), 2),
    }


async def flat(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    async with server_of(kind, args, workdir) as server:
        for stores in args.flat_stores:
            load = Load(server, stores, args.terminals)
            await load.connect()
            try:
                await load.run(args.rate, 2.0, args.drain_timeout)
                figures = await load.run(args.rate, args.duration, args.drain_timeout)
            finally:
                await load.close()
            result[str(stores * args.terminals)] = {
                k: figures[k]
                for k in (
                    "offered_ops_s",
                    "achieved_ops_s",
                    "ack_p99_ms",
                    "server_cpu_us_per_op",
                    "pg_cpu_us_per_op",
                    "errors",
                    "deliveries_expected",
                    "deliveries_received",
                )
            } | {"load_average": load_average()}
            await asyncio.sleep(1.0)
    sizes = list(result)
    first, last = result[sizes[0]], result[sizes[-1]]
    if first["server_cpu_us_per_op"] and last["server_cpu_us_per_op"]:
        result["cpu_per_op_change"] = round(
            last["server_cpu_us_per_op"] / first["server_cpu_us_per_op"] - 1, 3
        )
    return result


SCENARIOS = {"rush": rush, "sweep": sweep, "idle": idle, "flat": flat}
# The baselines' run names and table labels: the bare relay, and the relay that acknowledges and
# forwards only once the operation is on disk (loadtest/baseline_server.py --durable).
BASELINES = {"baseline": "baseline relay", "baseline_durable": "baseline durable relay"}

RATIO_KEYS = (
    "achieved_ops_s",
    "ack_p50_ms",
    "ack_p99_ms",
    "propagation_p99_ms",
    "ack_worst_window_p99_ms",
    "server_cpu_us_per_op",
    "rss_per_connection_kib",
)


def _ratio(ours: Any, baseline: Any) -> float | None:
    if not isinstance(ours, int | float) or not isinstance(baseline, int | float) or not baseline:
        return None
    return round(ours / baseline, 3)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="chefia-bench-"))
    result: dict[str, Any] = {
        "bench": "rush_hour",
        "scenario": args.scenario,
        "mode": args.mode,
        "workers": args.workers if args.mode == "pg" else 1,
        "stores": args.stores,
        "terminals_per_store": args.terminals,
        "rate_per_terminal": args.rate,
        "duration_s": args.duration,
        "transport": args.transport,
        "cores": os.cpu_count(),
        "load_average_before": load_average(),
    }
    try:
        ours = our_kinds(args)
        baselines = ["baseline", "baseline_durable"] if args.durable_baseline else ["baseline"]
        kinds = {"both": [*ours, *baselines], "ours": ours, "baseline": baselines}
        for kind in kinds[args.server]:
            result[kind] = await SCENARIOS[args.scenario](kind, args, workdir)
            await asyncio.sleep(1.0)
        if args.scenario in ("rush", "idle") and args.server == "both":
            for kind in ours:
                for baseline in baselines:
                    name = "ratio" + kind.removeprefix("ours") + baseline.removeprefix("baseline")
                    result[name] = {
                        key: _ratio(result[kind].get(key), result[baseline].get(key))
                        for key in RATIO_KEYS
                        if key in result[kind]
                    }
    finally:
        if args.keep_logs:
            result["logs"] = str(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return number


def _list(kind: type) -> Any:
    def parse(value: str) -> list[Any]:
        items = [kind(v) for v in value.split(",") if v]
        if not items or any(i <= 0 for i in items):
            raise argparse.ArgumentTypeError("a comma-separated list of positive numbers")
        return items

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description="The rush-hour benchmark (docs/benchmarks.md §3) against a bare "
        "websockets baseline; prints one JSON line.",
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="rush")
    parser.add_argument("--mode", choices=("embedded", "pg"), default="embedded")
    parser.add_argument("--server", choices=("both", "ours", "baseline"), default="both")
    parser.add_argument(
        "--durable-baseline",
        action="store_true",
        help="also the relay that acknowledges only once on disk (ratio_*_durable)",
    )
    parser.add_argument(
        "--transport",
        choices=(*TRANSPORTS, "both"),
        default=TRANSPORTS[0],
        help="our server's WS_TRANSPORT; both: a run on each",
    )
    parser.add_argument("--stores", type=_positive, default=100)
    parser.add_argument("--terminals", type=_positive, default=10, help="per store")
    parser.add_argument("--rate", type=_positive_float, default=2.0, help="ops/s per terminal")
    parser.add_argument("--duration", type=_positive_float, default=10.0, help="seconds per run")
    parser.add_argument("--drain-timeout", type=_positive_float, default=15.0)
    parser.add_argument(
        "--rates",
        type=_list(float),
        default=[0.5, 1, 2, 3, 4, 6, 8],
        help="sweep, per terminal",
    )
    parser.add_argument("--idle-connections", type=_positive, default=10_000)
    parser.add_argument("--flat-stores", type=_list(int), default=[20, 200])
    parser.add_argument("--workers", type=_positive, default=2, help="pg mode")
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL DSN (pg mode)")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS, help="Redis URL (pg mode)")
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="NAME=VALUE", help="for our server"
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy flame graphs of the measured run (rush) into DIR"
    )
    parser.add_argument("--profile-format", choices=("flamegraph", "raw"), default="flamegraph")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = parser.parse_args(argv)
    if args.scenario != "idle":
        args.idle_connections = 0
    for item in args.server_env:
        if "=" not in item:
            parser.error(f"--server-env {item!r}: NAME=VALUE")
    return args


def raise_fd_limit() -> None:
    """Many connections need many descriptors (here and in the servers, which inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


def table(result: dict[str, Any]) -> str:
    """The rush run as a Markdown table (the docs/benchmarks.md §3 shows this one)."""
    head = (
        "| server | offered ops/s | ack p50 / p99 ms | worst 250 ms ack p99 (x run p99) "
        "| propagation p99 ms | worst 250 ms propagation p99 (x) | CPU us/op (+PG) "
        "| worst loop lag ms per worker | load average |"
    )
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for kind in ("ours", *(f"ours_{t}" for t in TRANSPORTS), *BASELINES):
        f = result.get(kind)
        if not isinstance(f, dict) or "ack_p99_ms" not in f:
            continue
        if kind in BASELINES:
            label = BASELINES[kind]
        else:
            label = f"ours {result['mode']} ({transport_of(kind, result['transport'])})"
        lag = f.get("loop_lag_max_ms_by_worker")
        lags = ", ".join(_ms(v) for v in lag.values()) if lag else "-"
        pg = f" (+{_ms(f['pg_cpu_us_per_op'])})" if f.get("pg_cpu_us_per_op") is not None else ""
        rows.append(
            f"| {label} | {_ms(f['offered_ops_s'])} "
            f"| {_ms(f['ack_p50_ms'])} / {_ms(f['ack_p99_ms'])} "
            f"| {_ms(f['ack_worst_window_p99_ms'])} ({_ms(f['ack_worst_window_ratio'])}x) "
            f"| {_ms(f['propagation_p99_ms'])} "
            f"| {_ms(f['propagation_worst_window_p99_ms'])} "
            f"({_ms(f['propagation_worst_window_ratio'])}x) "
            f"| {_ms(f['server_cpu_us_per_op'])}{pg} | {lags} "
            f"| {' '.join(_ms(x) for x in f['load_average'])} |"
        )
    for kind in ("ours", *(f"ours_{t}" for t in TRANSPORTS)):
        f = result.get(kind)
        stages = f.get("batch_stages_ms") if isinstance(f, dict) else None
        if stages:
            spent = ", ".join(f"{k} {_ms(v)}" for k, v in stages.items() if k != "batches")
            label = f"ours {result['mode']} ({transport_of(kind, result['transport'])})"
            rows.append(f"\n{label}, ms per batch ({stages['batches']:g} batches): {spent}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """The JSON line on stdout; the rush run's table on stderr."""
    args = parse_args(argv)
    raise_fd_limit()
    import uvloop

    def run() -> dict[str, Any]:
        result = uvloop.run(bench(args))
        if args.scenario == "rush":
            print(table(result), file=sys.stderr)
        return result

    return print_result("bench", run)


if __name__ == "__main__":
    sys.exit(main())

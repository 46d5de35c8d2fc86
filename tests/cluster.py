"""A real cluster for end-to-end tests: N nodes x W workers, joined over PostgreSQL and Redis.

Each node is `python -m chefia_rt serve` (a supervisor) with WS_WORKERS=W on its own free port of
127.0.0.1. Every node shares one DATABASE_URL (a fresh PostgreSQL schema) and the shared Redis
under one REDIS_PREFIX of its own, so clusters of concurrent tests never see each other.

    async with running_cluster(tmp_path, nodes=2, workers=2) as cluster:
        a = await cluster.connect(0, "pos-1", "s1", on_worker=cluster.nodes[0].workers[1])

SO_REUSEPORT spreads connections over a node's workers by a hash of the connection's addresses,
so a terminal is put on a given worker by reconnecting until it lands there. Every attempt is a
real connection of that terminal (a takeover of its current one, and closing a wrong attempt
unregisters it), so pin a terminal when it connects, before it holds locks.

Each node's output goes to `node-<i>.log` under tmp_path. Cleanup SIGTERMs, then SIGKILLs, every
process the cluster started or saw serving (workers included, even orphaned ones), drops the
schema and deletes the prefix's Redis keys (never anything else in the shared Redis).

Fault tests that break PostgreSQL or Redis pass `dsn` / `redis_url` of their own throwaway
instances (tests/faults/pg.py, tests/faults/redis.py); the cluster then leaves the database to
its owner instead of dropping a schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import websockets
from redis.exceptions import RedisError
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.helpers import Terminal, free_port, server_transport
from tests.services import REDIS_URL, drop_pg_schema, new_pg_schema, service_missing

# Hang guards, not limits under test: a loaded machine starts processes and answers slowly.
READY_TIMEOUT = 120.0
HEALTH_HANG_GUARD = 60.0
STOP_TIMEOUT = 5.0
PROBE_STORE = "cluster-probe"  # probes stay out of the stores tests look at

# The server's own settings, from the environment running the tests, must not leak in.
_SERVER_ENV_PREFIXES = (
    "WS_",
    "MAX_WS_",
    "DATABASE_",
    "REDIS_",
    "JWT_",
    "SYNC_",
    "METRICS_",
    "PROMETHEUS_",  # nodes sharing one metrics directory would count each other's workers
    "TERMINAL_",
    "MONITOR_",  # alert thresholds and the event poll a test sets explicitly
)


# ---- processes ----------------------------------------------------------------------------------


def process_state(pid: int) -> str | None:
    """The /proc state letter of a process (R, S, Z, ...), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses: the state follows the last ')'.
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """True while the process runs; a zombie has exited (only its parent has not reaped it)."""
    state = process_state(pid)
    return state is not None and state != "Z"


def children(pid: int) -> list[int]:
    """Live child processes of `pid`, oldest first."""
    found: list[tuple[float, int]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # fields[0] state, [1] ppid, ... [19] starttime (clock ticks since boot)
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(fields[19]), int(entry.name)))
    return [p for _, p in sorted(found)]


def is_chefia(pid: int) -> bool:
    """Guard against pid reuse: only ever signal a process that is one of ours."""
    try:
        return b"chefia_rt" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def signal_pid(pid: int, sig: int) -> None:
    if is_chefia(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def worker_pid(worker: str) -> int:
    """The pid of a worker as connection_established names it ("host/pid")."""
    return int(worker.rsplit("/", 1)[1])


async def wait_gone(pids: list[int] | set[int], timeout: float) -> set[int]:
    """Wait until none of `pids` runs; the ones still running after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        left = {p for p in pids if alive(p)}
        if not left or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(0.05)


# ---- the cluster --------------------------------------------------------------------------------


class ClusterTerminal(Terminal):
    """A test terminal that knows which worker serves it."""

    @property
    def worker(self) -> str:
        return str(self.established["worker"])

    @property
    def pid(self) -> int:
        return worker_pid(self.worker)

    @property
    def close_code(self) -> int | None:
        """The close code the server sent, once it did."""
        received = self.ws.protocol.close_rcvd
        return None if received is None else received.code


@dataclass(eq=False)
class ClusterNode:
    """One node: a supervisor process and the workers it runs on one port."""

    index: int
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    # Workers last seen serving ("host/pid"), in the order they were first seen.
    workers: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def worker_pids(self) -> list[int]:
        """The supervisor's live worker processes, from /proc (oldest first)."""
        return children(self.pid) if self.proc is not None and self.proc.poll() is None else []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the supervisor and its workers at once: the machine's power cut."""
        pids = [p for p in self.worker_pids() if is_chefia(p)]
        signal_pid(self.pid, signal.SIGKILL)
        for pid in pids:
            signal_pid(pid, signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(STOP_TIMEOUT)


class Cluster:
    """N nodes x W workers sharing a PostgreSQL schema and a Redis prefix."""

    def __init__(
        self,
        tmp_path: Path,
        dsn: str,
        *,
        nodes: int,
        workers: int,
        env: dict[str, str] | None = None,
        redis_url: str = REDIS_URL,
        own_schema: bool = True,
    ) -> None:
        self.tmp_path = tmp_path
        self.dsn = dsn
        self.redis_url = redis_url
        self.own_schema = own_schema  # a schema of the shared PostgreSQL, dropped at close
        self.workers_per_node = workers
        self.prefix = f"t-{uuid.uuid4().hex[:12]}"
        self.extra_env = env or {}
        self.nodes = [ClusterNode(i, free_port(), tmp_path / f"node-{i}.log") for i in range(nodes)]
        # Every worker pid ever seen serving: cleanup reaches workers a dead supervisor orphaned.
        self.seen_pids: set[int] = set()
        self._probes = 0

    # ---- life cycle -----------------------------------------------------------------------

    def env(self, node: ClusterNode) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SERVER_ENV_PREFIXES)}
        env.update(
            DATABASE_URL=self.dsn,
            REDIS_URL=self.redis_url,
            REDIS_PREFIX=self.prefix,
            WS_WORKERS=str(self.workers_per_node),
            WS_HOST="127.0.0.1",
            WS_PORT=str(node.port),
            WS_LOG_LEVEL="INFO",
            WS_TRANSPORT=server_transport(),
            # 4 workers x the default pool of 8 would crowd a PostgreSQL shared by other tests.
            DATABASE_POOL_SIZE="4",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def start_node(self, node: ClusterNode) -> None:
        """Spawn a node's supervisor (its output appended to the node's log)."""
        with open(node.log_path, "ab") as log:
            node.proc = subprocess.Popen(
                [sys.executable, "-m", "chefia_rt", "serve"],
                cwd=self.tmp_path,
                env=self.env(node),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of pytest must not reach it uncontrolled
            )
        node.workers = []

    async def start(self) -> None:
        for node in self.nodes:
            self.start_node(node)
        await asyncio.gather(*(self.wait_ready(node) for node in self.nodes))

    async def wait_ready(self, node: ClusterNode, timeout: float = READY_TIMEOUT) -> None:
        """Until /health answers 200 and every one of the node's W workers has served."""
        deadline = time.monotonic() + timeout
        while (status := await self.health_status(node)) != 200:
            self._check_running(node)
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"hang guard: node {node.index}: /health never answered 200 (last {status}):\n"
                    + node.log()
                )
            await asyncio.sleep(0.05)
        node.workers = sorted(await self.serving_workers(node, deadline - time.monotonic()))

    def _check_running(self, node: ClusterNode) -> None:
        assert node.proc is not None
        if node.proc.poll() is not None:
            raise AssertionError(
                f"node {node.index} exited with {node.proc.returncode}:\n{node.log()}"
            )

    async def serving_workers(
        self, node: ClusterNode, timeout: float = READY_TIMEOUT, count: int | None = None
    ) -> set[str]:
        """Connect probe terminals until `count` (default W) distinct live workers answered.

        Only workers that are still running count: a probe may land on one that was just
        replaced and is draining.
        """
        want = self.workers_per_node if count is None else count
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while True:
            seen = {w for w in seen if alive(worker_pid(w))}
            if len(seen) >= want:
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"node {node.index}: only workers {sorted(seen)} of {want} answered "
                    f"in {timeout:.0f}s:\n{node.log()}"
                )
            self._probes += 1
            try:
                probe = await self.connect(
                    node, f"probe-{self._probes}", PROBE_STORE, tries=1, timeout=2.0
                )
            except (OSError, InvalidHandshake, TimeoutError, ConnectionClosed):
                self._check_running(node)
                await asyncio.sleep(0.05)
                continue
            seen.add(probe.worker)
            await probe.close()

    async def health_status(self, node: ClusterNode) -> int | None:
        """The HTTP status of GET /health, None when nothing answers (nothing listens, or the
        connection ends without a status line). The timeout is a hang guard: a server that
        takes long to answer (its storage down, the machine loaded) is waited for, since the
        answer it gives then is what the tests look at."""
        try:
            async with asyncio.timeout(HEALTH_HANG_GUARD):
                reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
                try:
                    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    head = await reader.readline()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return None
        parts = head.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None

    async def close(self) -> None:
        """SIGTERM then SIGKILL every process of the cluster, drop the schema and the keys."""
        pids = set(self.seen_pids)
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                pids.update(node.worker_pids())
                pids.add(node.pid)
        for pid in pids:
            signal_pid(pid, signal.SIGTERM)
        for pid in await wait_gone(pids, STOP_TIMEOUT):
            for child in children(pid):
                signal_pid(child, signal.SIGKILL)
            signal_pid(pid, signal.SIGKILL)
        for node in self.nodes:
            if node.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(STOP_TIMEOUT)
        await wait_gone(pids, STOP_TIMEOUT)
        if self.own_schema:
            await drop_pg_schema(self.dsn)
        await self._forget_redis_keys()

    async def _forget_redis_keys(self) -> None:
        """Delete this cluster's keys (presence hashes do not expire); only its own prefix."""
        client = aioredis.from_url(self.redis_url, socket_timeout=5)
        try:
            keys = [k async for k in client.scan_iter(match=f"{self.prefix}:*", count=500)]
            if keys:
                await client.delete(*keys)
        except (RedisError, OSError):
            pass
        finally:
            await client.aclose()

    # ---- terminals ------------------------------------------------------------------------

    def node(self, node: int | ClusterNode) -> ClusterNode:
        return self.nodes[node] if isinstance(node, int) else node

    async def connect(
        self,
        node: int | ClusterNode,
        terminal_id: str,
        store: str = "s1",
        *,
        type: str = "pos",
        encoding: str = "json",
        since: int | None = None,
        on_worker: str | int | None = None,
        tries: int = 60,
        timeout: float = 5.0,
        **query: str,
    ) -> ClusterTerminal:
        """Connect a terminal to a node; with `on_worker` (a "host/pid" name or a pid),
        reconnect until it lands on that worker (at most `tries` connections)."""
        target = self.node(node)
        params = {"store_id": store, "type": type, "encoding": encoding, **query}
        if since is not None:
            params["since"] = str(since)
        url = f"{target.url}/{terminal_id}?" + "&".join(f"{k}={v}" for k, v in params.items())
        wanted = worker_pid(on_worker) if isinstance(on_worker, str) else on_worker
        landed: list[str] = []
        for _ in range(tries):
            async with asyncio.timeout(timeout):
                ws = await websockets.connect(url, open_timeout=timeout)
                terminal = ClusterTerminal(ws, encoding)
                try:
                    terminal.established = await terminal.expect("connection_established")
                except BaseException:
                    await ws.close()
                    raise
            self.seen_pids.add(terminal.pid)
            if wanted is None or terminal.pid == wanted:
                return terminal
            landed.append(terminal.worker)
            await terminal.close()
        raise AssertionError(
            f"{terminal_id} never landed on worker {on_worker} of node {target.index} "
            f"in {tries} tries (landed on {sorted(set(landed))})"
        )

    # ---- storage --------------------------------------------------------------------------

    async def rows(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Query the cluster's schema directly (what is really committed)."""
        conn = await asyncpg.connect(self.dsn, timeout=5)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def log(self, store: str) -> list[tuple[int, str]]:
        """The store's operation log as (seq, id), in seq order."""
        rows = await self.rows(
            "SELECT seq, id FROM sync_operations WHERE store_id = $1 ORDER BY seq", store
        )
        return [(int(r["seq"]), str(r["id"])) for r in rows]


@contextlib.asynccontextmanager
async def running_cluster(
    tmp_path: Path,
    *,
    nodes: int = 2,
    workers: int = 2,
    env: dict[str, str] | None = None,
    dsn: str | None = None,
    redis_url: str | None = None,
) -> AsyncIterator[Cluster]:
    """Start `nodes` x `workers` and wait until every worker serves; stop everything after.
    Without `dsn` / `redis_url`: a fresh schema of the shared PostgreSQL, the shared Redis."""
    if redis_url is None:
        await _require_redis()
    cluster = Cluster(
        tmp_path,
        dsn or await new_pg_schema(),
        nodes=nodes,
        workers=workers,
        env=env,
        redis_url=redis_url or REDIS_URL,
        own_schema=dsn is None,
    )
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.close()


async def _require_redis() -> None:
    client = aioredis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        service_missing("Redis", f"{REDIS_URL}: {exc}")
    finally:
        await client.aclose()

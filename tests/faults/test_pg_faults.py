"""PostgreSQL failing under a real server with real terminals sending steadily (SPEC §4, §5).

A `python -m chefia_rt serve` process runs on a throwaway PostgreSQL (tests/faults/pg.py) and six
WebSocket terminals of two stores send operations at a steady rate, each re-sending (same id)
every operation not confirmed yet, as a POS does. Mid-load, PostgreSQL fails:

- stopped with `-m immediate` (a crash) for a few seconds, then started again: while it is down
  operations are answered `sync_error` 1013 and /health says 503, yet every WebSocket stays open;
  once it is back the server recovers by itself (/health 200 within a bound) and the re-sent
  operations are confirmed;
- or its connections are cut with pg_terminate_backend, again and again for two seconds, from a
  separate admin connection (a failover, an operator's kill, a pooler restart).

Then, from the database and the terminals: every confirmed operation is stored exactly once with
the seq it was confirmed with, every stored one was confirmed, seqs are gapless per store, and
every other terminal of the store received every operation exactly once, in seq order.

Smaller tests pin down what those scenarios found: the store re-reads on a connection that died
under a read and never lets a failed connection reset undo a commit (fixed in store/postgres.py),
and two bugs they found outside the store: a resume or snapshot refused while storage is down
no longer stops the terminal's stream, and a catch-up that meets a failed storage read retries
instead of closing the terminal's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from chefia_rt.errors import StorageUnavailable
from chefia_rt.store.postgres import PostgresStore
from tests.faults.pg import ThrowawayPostgres, throwaway_postgres
from tests.helpers import Terminal, free_port, op, running_server
from tests.services import drop_pg_schema, new_pg_schema
from tests.store.test_contract import make_op, sync

pytestmark = [pytest.mark.faults, pytest.mark.slow]

STORES = {"s1": ["pos-1", "pos-2", "waiter-1"], "s2": ["pos-3", "pos-4", "waiter-2"]}
SEND_INTERVAL = 0.05  # per terminal: 20 ops/s, 120 ops/s in all
RETRY_AFTER = 0.4  # a 1013 is re-sent this much later
UNANSWERED_AFTER = 8.0  # an op with no answer at all is re-sent after this long
RECOVERY_BOUND = 15.0  # PostgreSQL back → /health 200 within this many seconds
SCENARIO_BOUND = 40.0


class ServerProcess:
    """`python -m chefia_rt serve` on a throwaway PostgreSQL."""

    def __init__(self, tmp_path: Path, dsn: str) -> None:
        self.tmp_path = tmp_path
        self.dsn = dsn
        self.port = free_port()
        self.logfile = tmp_path / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.logfile.read_text(errors="replace")[-6000:]
        return ""

    async def start(self) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("WS_", "MAX_WS_", "DATABASE_", "REDIS_", "JWT_", "SYNC_"))
        }
        env.update(
            DATABASE_URL=self.dsn,
            WS_HOST="127.0.0.1",
            WS_PORT=str(self.port),
            WS_LOG_LEVEL="INFO",
            SYNC_COMMIT_TIMEOUT="2",
            SYNC_RECONCILE_INTERVAL="0.5",
        )
        proc = self._spawn(env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{self.log()}")
            if await self.health() == 200:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"server not ready:\n{self.log()}")

    def _spawn(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.logfile, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chefia_rt", "serve"],
                cwd=self.tmp_path,  # no .env of the repository
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.proc

    async def health(self) -> int | None:
        """/health's status code, None when the server does not answer within 3 seconds."""
        try:
            async with asyncio.timeout(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    head = await reader.readline()
                finally:
                    writer.close()
            return int(head.split()[1])
        except (OSError, TimeoutError, IndexError, ValueError):
            return None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class LoadTerminal:
    """A terminal sending steadily and re-sending every op not confirmed, with the same id."""

    terminal_id: str
    store_id: str
    terminal: Terminal
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)
    unconfirmed: dict[str, float] = field(default_factory=dict)  # id -> when to re-send
    confirmed: dict[str, int] = field(default_factory=dict)  # id -> seq
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[int] = field(default_factory=Counter)
    error_times: list[float] = field(default_factory=list)
    pushes: list[tuple[int, str, str]] = field(default_factory=list)  # seq, op id, origin
    contradictions: list[str] = field(default_factory=list)
    closed: str | None = None
    resends: int = 0

    async def receive(self) -> None:
        try:
            while True:
                message = await self.terminal.recv(timeout=3600)
                self._take(message)
        except ConnectionClosed as exc:
            self.closed = f"connection closed: {exc}"

    def _take(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "sync_confirmation":
            op_id, seq = message["operation_id"], message["seq"]
            self.statuses[message["status"]] += 1
            if self.confirmed.setdefault(op_id, seq) != seq:
                self.contradictions.append(
                    f"{op_id} confirmed with seqs {self.confirmed[op_id]}, {seq}"
                )
            self.unconfirmed.pop(op_id, None)
        elif kind == "sync_error":
            self.errors[message["code"]] += 1
            self.error_times.append(time.monotonic())
            op_id = message["operation_id"]
            if message["code"] == 1013 and op_id in self.unconfirmed:
                self.unconfirmed[op_id] = time.monotonic() + RETRY_AFTER
        elif kind == "data_sync":
            operation = message["operation"]
            self.pushes.append((operation["seq"], operation["id"], operation["terminal_id"]))

    async def send_new(self, n: int) -> None:
        op_id = f"{self.terminal_id}-{n:05d}"
        message = op(op_id, f"{self.terminal_id}-t{n:05d}", {"n": n, "by": self.terminal_id})
        self.sent[op_id] = message
        self.unconfirmed[op_id] = time.monotonic() + UNANSWERED_AFTER
        await self.terminal.send(message)

    async def resend_due(self) -> None:
        now = time.monotonic()
        for op_id, due in list(self.unconfirmed.items()):
            if due <= now and op_id not in self.confirmed:
                self.unconfirmed[op_id] = now + UNANSWERED_AFTER
                self.resends += 1
                await self.terminal.send(self.sent[op_id])


@dataclass
class Load:
    """Every terminal's send and receive loops; `producing` off → only re-sends go on."""

    terminals: list[LoadTerminal]
    producing: bool = True
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        for t in self.terminals:
            self.tasks.append(asyncio.create_task(t.receive()))
            self.tasks.append(asyncio.create_task(self._send(t)))

    async def _send(self, t: LoadTerminal) -> None:
        n = 0
        with contextlib.suppress(ConnectionClosed):
            while True:
                if self.producing:
                    await t.send_new(n)
                    n += 1
                await t.resend_due()
                await asyncio.sleep(SEND_INTERVAL)

    def unconfirmed(self) -> int:
        return sum(len(t.unconfirmed) for t in self.terminals)

    def errors_1013_since(self, moment: float) -> int:
        return sum(1 for t in self.terminals for at in t.error_times if at >= moment)

    async def settle(self, timeout: float) -> None:
        """Stop producing; wait until everything sent is confirmed."""
        self.producing = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.unconfirmed():
                return
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for t in self.terminals:
            with contextlib.suppress(Exception):
                await t.terminal.close()


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[ThrowawayPostgres, ServerProcess]]:
    with throwaway_postgres() as cluster:
        server = ServerProcess(tmp_path, cluster.dsn)
        try:
            await server.start()
            yield cluster, server
        finally:
            server.stop()


async def _connect(server: ServerProcess) -> list[LoadTerminal]:
    terminals = []
    for store_id, names in STORES.items():
        for n, name in enumerate(names):
            encoding = "msgpack" if n % 2 else "json"
            kind = name.split("-")[0]
            ws = await websockets.connect(
                f"ws://127.0.0.1:{server.port}/ws/{name}"
                f"?store_id={store_id}&type={kind}&encoding={encoding}",
                max_size=None,
            )
            terminal = Terminal(ws, encoding)
            terminal.established = await terminal.expect("connection_established")
            terminals.append(LoadTerminal(name, store_id, terminal))
    return terminals


async def _wait_health(server: ServerProcess, want: int, timeout: float) -> float | None:
    """Seconds until /health answers `want`, None if it did not within `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await server.health() == want:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    return None


async def _wait_deliveries(load: Load, timeout: float = 10) -> None:
    """Give the last pushes (and a reconcile round) time to reach every other terminal of
    the store: what was confirmed to anyone, as far as the terminals know."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(
            {seq for seq, _, origin in t.pushes if origin != t.terminal_id}
            >= {
                seq
                for other in load.terminals
                if other.store_id == t.store_id and other is not t
                for seq in other.confirmed.values()
            }
            for t in load.terminals
        ):
            return
        await asyncio.sleep(0.1)


async def _check(cluster: ThrowawayPostgres, server: ServerProcess, load: Load) -> dict[str, Any]:
    """Everything SPEC §4 promises, from the database and what the terminals saw."""
    terminals = load.terminals
    log = server.log()
    for t in terminals:
        assert t.closed is None, (
            f"{t.terminal_id}: server dropped the WebSocket ({t.closed})\n{log}"
        )
        assert not t.contradictions, t.contradictions
        assert set(t.errors) <= {1013}, f"{t.terminal_id}: unexpected errors {t.errors}"
        assert set(t.statuses) <= {"applied", "duplicate"}, t.statuses
        assert not t.unconfirmed, f"{t.terminal_id}: {len(t.unconfirmed)} never confirmed\n{log}"

    conn = await asyncpg.connect(cluster.dsn)
    try:
        rows = await conn.fetch(
            "SELECT id, store_id, seq, terminal_id, version FROM sync_operations"
        )
        last_seqs = dict(await conn.fetch("SELECT store_id, last_seq FROM store_seqs"))
        audit_counts = dict(
            await conn.fetch("SELECT operation_id, count(*) FROM audit_logs_master GROUP BY 1")
        )
        versions = Counter(r[0] for r in await conn.fetch("SELECT version FROM entities"))
    finally:
        await conn.close()

    stored = {r["id"]: r for r in rows}
    assert len(stored) == len(rows)
    confirmed = {op_id: seq for t in terminals for op_id, seq in t.confirmed.items()}
    sent = {op_id for t in terminals for op_id in t.sent}
    # Exactly once: one log row, one audit row, one entity version per operation.
    assert set(stored) == set(confirmed) == sent, "an op stored but never confirmed, or lost"
    assert all(stored[i]["seq"] == seq for i, seq in confirmed.items()), "confirmed seq differs"
    assert all(audit_counts.get(i) == 1 for i in stored), "an operation applied twice"
    assert versions == {1: len(stored)}

    expected: dict[str, set[int]] = {}
    for store_id, names in STORES.items():
        seqs = sorted(r["seq"] for r in rows if r["store_id"] == store_id)
        assert seqs == list(range(1, len(seqs) + 1)), f"{store_id}: seqs not gapless"
        assert last_seqs.get(store_id) == len(seqs)
        for name in names:
            expected[name] = {
                r["seq"] for r in rows if r["store_id"] == store_id and r["terminal_id"] != name
            }
    echoes = 0
    for t in terminals:
        seqs = [seq for seq, _, _ in t.pushes]
        assert seqs == sorted(set(seqs)), f"{t.terminal_id}: pushes out of order or repeated"
        others = [seq for seq, _, origin in t.pushes if origin != t.terminal_id]
        assert set(others) == expected[t.terminal_id], (
            f"{t.terminal_id}: missing {sorted(expected[t.terminal_id] - set(others))[:20]}"
        )
        for seq, op_id, _ in t.pushes:
            assert stored[op_id]["seq"] == seq and stored[op_id]["store_id"] == t.store_id
        echoes += len(t.pushes) - len(others)
    return {
        "stored": len(stored),
        "resends": sum(t.resends for t in terminals),
        "errors_1013": sum(t.errors[1013] for t in terminals),
        "duplicates": sum(t.statuses["duplicate"] for t in terminals),
        "own_ops_echoed_by_catch_up": echoes,
    }


async def test_postgres_stopped_and_restarted_under_load(
    setup: tuple[ThrowawayPostgres, ServerProcess],
) -> None:
    cluster, server = setup
    started = time.monotonic()
    load = Load(await _connect(server))
    load.start()
    try:
        await asyncio.sleep(2)
        assert sum(len(t.confirmed) for t in load.terminals) > 50, server.log()

        down_at = time.monotonic()
        await asyncio.to_thread(cluster.stop, "immediate")
        health_503 = await _wait_health(server, 503, timeout=5)
        assert health_503 is not None, (
            f"/health never said 503 with PostgreSQL down\n{server.log()}"
        )
        await asyncio.sleep(3)
        # Down: answered 1013, never a silent drop, and the connections stay.
        assert load.errors_1013_since(down_at) > 20, "no 1013 while storage was down"
        assert await server.health() == 503
        assert all(t.closed is None for t in load.terminals), server.log()
        assert server.proc is not None and server.proc.poll() is None

        await asyncio.to_thread(cluster.start)
        recovered = await _wait_health(server, 200, timeout=RECOVERY_BOUND)
        assert recovered is not None, f"/health stuck after PostgreSQL came back\n{server.log()}"
        await asyncio.sleep(2)  # load on the recovered storage
        await load.settle(timeout=15)
        await _wait_deliveries(load)
    finally:
        await load.stop()
    server.stop()
    figures = await _check(cluster, server, load)
    assert figures["errors_1013"] > 0
    print(f"stop/restart: recovered in {recovered:.2f}s; {figures}")
    assert time.monotonic() - started < SCENARIO_BOUND


async def test_postgres_connections_cut_repeatedly_under_load(
    setup: tuple[ThrowawayPostgres, ServerProcess],
) -> None:
    cluster, server = setup
    started = time.monotonic()
    load = Load(await _connect(server))
    load.start()
    cuts = 0
    try:
        await asyncio.sleep(2)
        admin = await asyncpg.connect(cluster.dsn)
        try:
            until = time.monotonic() + 2
            while time.monotonic() < until:
                cuts += await admin.fetchval(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()) AS cut"
                )
                await asyncio.sleep(0.05)
        finally:
            await admin.close()
        assert cuts > 5, "the server held no connection to cut"
        recovered = await _wait_health(server, 200, timeout=RECOVERY_BOUND)
        assert recovered is not None, f"/health stuck after the cuts\n{server.log()}"
        await asyncio.sleep(2)
        await load.settle(timeout=15)
        await _wait_deliveries(load)
    finally:
        await load.stop()
    server.stop()
    figures = await _check(cluster, server, load)
    print(f"terminate_backend x{cuts}: recovered in {recovered:.2f}s; {figures}")
    assert time.monotonic() - started < SCENARIO_BOUND


# ---- stream requests and catch-ups while storage is down -----------------------------------


async def _connect_one(server: ServerProcess, name: str) -> Terminal:
    ws = await websockets.connect(f"ws://127.0.0.1:{server.port}/ws/{name}?store_id=s1")
    terminal = Terminal(ws, "json")
    terminal.established = await terminal.expect("connection_established")
    return terminal


@pytest.mark.parametrize("request_type", ["resume", "snapshot_request"])
async def test_a_stream_request_refused_while_postgres_is_down_keeps_the_stream(
    setup: tuple[ThrowawayPostgres, ServerProcess], request_type: str
) -> None:
    cluster, server = setup
    reader = await _connect_one(server, "pos-a")
    writer = await _connect_one(server, "pos-b")
    try:
        await writer.send(op("op1", "T1", {"n": 1}))
        await writer.expect("sync_confirmation")
        assert (await reader.expect("data_sync"))["operation"]["seq"] == 1

        await asyncio.to_thread(cluster.stop, "immediate")
        requests = {"resume": {"type": "resume", "since": 1}, "snapshot_request": {}}
        await reader.send({"type": request_type, **requests[request_type]})
        refused = await reader.expect("error")
        assert refused["code"] == 1013
        await asyncio.to_thread(cluster.start)
        assert await _wait_health(server, 200, timeout=RECOVERY_BOUND) is not None

        await writer.send(op("op2", "T2", {"n": 2}))
        await writer.expect("sync_confirmation")
        # The terminal asked for nothing new (its request was refused): the stream goes on.
        pushed = await reader.until("data_sync", timeout=5)
        assert pushed["operation"]["seq"] == 2
    finally:
        await reader.close()
        await writer.close()


async def test_a_catch_up_that_meets_a_storage_hiccup_keeps_the_connection(
    tmp_path: Path,
) -> None:
    async with (
        running_server(tmp_path) as running,
        running.terminal("pos-a") as reader,
        running.terminal("pos-b") as writer,
    ):
        await writer.send(op("op1", "T1", {"n": 1}))
        await writer.expect("sync_confirmation")
        assert (await reader.expect("data_sync"))["operation"]["seq"] == 1

        hub = running.node.hub
        read_ops = hub._read_ops
        failures = [StorageUnavailable("PostgreSQL unavailable: ConnectionDoesNotExistError")]

        async def hiccup(store_id: str, after_seq: int, limit: int) -> list[Any]:
            if failures:
                raise failures.pop()
            return await read_ops(store_id, after_seq, limit)

        hub._read_ops = hiccup
        await reader.send({"type": "resume", "since": 0})
        replayed = await reader.until("data_sync", timeout=5)
        assert replayed["operation"]["seq"] == 1


# ---- the store's own handling of connections that die under it (shared PostgreSQL) ----------


@pytest.fixture
async def store() -> AsyncIterator[PostgresStore]:
    dsn = await new_pg_schema()
    opened = PostgresStore(dsn, max_size=1)
    try:
        await opened.open()
        yield opened
    finally:
        await opened.close()
        await drop_pg_schema(dsn)


def _cut_first(calls: list[int]) -> Callable[[asyncpg.Connection], Awaitable[int]]:
    """A call whose first run finds its connection cut by the server (pg_terminate_backend)."""

    async def run(conn: asyncpg.Connection) -> int:
        calls.append(1)
        if len(calls) == 1:
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return int(await conn.fetchval("SELECT 42"))

    return run


async def test_a_read_whose_connection_is_cut_reads_again(store: PostgresStore) -> None:
    """A dead pooled connection must not fail a read (a failed hub catch-up closes the
    terminal's WebSocket); a write is never repeated behind the node's back."""
    calls: list[int] = []
    assert await store._with(_cut_first(calls), read_only=True) == 42
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(StorageUnavailable):
        await store._with(_cut_first(calls))
    assert len(calls) == 1
    assert await store.ping()


async def test_a_connection_failing_its_reset_does_not_undo_a_commit(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg resets a connection on release; when that fails (the connection was cut right
    after COMMIT) the batch is still committed and must be answered as such, not as 1013."""
    release = asyncpg.Pool.release

    async def failing_release(
        pool: asyncpg.Pool, conn: asyncpg.Connection, *, timeout: float | None = None
    ) -> None:
        await release(pool, conn, timeout=timeout)
        raise asyncpg.InternalClientError(
            "cannot switch to state 15; another operation (2) is in progress"
        )

    monkeypatch.setattr(asyncpg.Pool, "release", failing_release)
    (outcome,) = await sync(store, [make_op("op1", "T1", {"n": 1})])
    assert outcome.status == "applied" and outcome.record is not None
    assert outcome.record.seq == 1
    monkeypatch.undo()
    (again,) = await sync(store, [make_op("op1", "T1", {"n": 1})])
    assert again.status == "duplicate"

"""PostgreSQL failing under a real server (docs/protocol.md §9, §10), one failure at a time.

PostgreSQL restarted and its connections cut under load, with terminals checked against the
database, are scenarios of the reliability suite (tests/faults/test_reliability.py, on a 2-node
cluster). The tests here hold the single behaviours those scenarios rely on: the store re-reads
on a connection that died under a read and never lets a failed connection reset undo a commit; a
resume or snapshot refused while storage is down leaves the terminal's stream going; and a
catch-up that meets a failed storage read retries instead of closing the terminal's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import websockets

from chefia_rt.errors import StorageUnavailable
from chefia_rt.store.postgres import PostgresStore
from tests.faults.pg import ThrowawayPostgres, throwaway_postgres
from tests.helpers import DEFAULT_TIMEOUT, Terminal, free_port, op, running_server
from tests.services import drop_pg_schema, new_pg_schema
from tests.store.test_contract import make_op, sync

pytestmark = [pytest.mark.faults, pytest.mark.slow]

# PostgreSQL back → /health 200 within this many seconds: a hang guard (a loaded machine's
# reconnect takes what it takes), not a recovery time under test.
RECOVERY_BOUND = 60.0


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
        """/health's status code, None when the server does not answer (the timeout is a hang
        guard: a loaded machine's slow answer is still the answer)."""
        try:
            async with asyncio.timeout(DEFAULT_TIMEOUT):
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


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[ThrowawayPostgres, ServerProcess]]:
    with throwaway_postgres() as cluster:
        server = ServerProcess(tmp_path, cluster.dsn)
        try:
            await server.start()
            yield cluster, server
        finally:
            server.stop()


async def _wait_health(server: ServerProcess, want: int, timeout: float) -> float | None:
    """Seconds until /health answers `want`, None if it did not within `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await server.health() == want:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    return None


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
        pushed = await reader.until("data_sync")
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

        hub = running.worker.hub
        read_ops = hub._read_ops
        failures = [StorageUnavailable("PostgreSQL unavailable: ConnectionDoesNotExistError")]

        async def hiccup(store_id: str, after_seq: int, limit: int) -> list[Any]:
            if failures:
                raise failures.pop()
            return await read_ops(store_id, after_seq, limit)

        hub._read_ops = hiccup
        await reader.send({"type": "resume", "since": 0})
        replayed = await reader.until("data_sync")
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

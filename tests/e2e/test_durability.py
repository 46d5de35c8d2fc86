"""Durability (docs/protocol.md §9.1) against a real server process: `kill -9` loses no confirmed
operation, retries apply once, and SIGTERM drains and closes with 1001."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from chefia_rt.store.sqlite import SQLiteStore
from tests.helpers import Terminal, drain, free_port, op, running_server, server_transport

pytestmark = pytest.mark.asyncio

STORE = "s1"


class ServerProcess:
    """`python -m chefia_rt serve` on SQLite in a temporary directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.db_path = tmp_path / "rt.db"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.tmp_path.glob("server-*.log"))
        )

    async def start(self) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("WS_", "MAX_WS_", "DATABASE_URL", "REDIS_URL", "JWT_"))
        }
        env.update(
            DATABASE_URL=f"sqlite:///{self.db_path}",
            WS_HOST="127.0.0.1",
            WS_PORT=str(self.port),
            WS_LOG_LEVEL="INFO",
            WS_TRANSPORT=server_transport(),
        )
        self._spawn(env)
        await self.wait_ready()

    def _spawn(self, env: dict[str, str]) -> None:
        self.starts += 1
        with open(self.tmp_path / f"server-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chefia_rt", "serve"],
                cwd=self.tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def wait_ready(self, timeout: float = 15.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await asyncio.wait_for(reader.read(12), 2)
                writer.close()
                if head == b"HTTP/1.1 200":
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"server not ready in {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """kill -9: no chance to flush or say goodbye."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def connect(
        self, terminal_id: str, *, encoding: str = "json", since: int | None = None
    ) -> Terminal:
        query = f"store_id={STORE}&encoding={encoding}"
        if since is not None:
            query += f"&since={since}"
        ws = await websockets.connect(f"{self.url}/{terminal_id}?{query}")
        terminal = Terminal(ws, encoding)
        terminal.established = await terminal.expect("connection_established")
        return terminal

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.db_path)) as db:
            return db.execute(sql, params).fetchall()


@pytest.fixture
async def proc(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def table_op(i: int) -> dict[str, Any]:
    """Operation i: its own table, so every op applies on its own and retries are exact."""
    return op(f"op-{i:04d}", f"t{i:04d}", {"seats": i % 12, "n": i})


def check_log(proc: ServerProcess) -> list[tuple[str, int]]:
    """(id, seq) of the store's log, checked gapless and without repeats."""
    rows = proc.rows("SELECT id, seq FROM sync_operations WHERE store_id = ? ORDER BY seq", STORE)
    seqs = [seq for _, seq in rows]
    assert seqs == list(range(1, len(rows) + 1)), "seqs not gapless"
    assert len({i for i, _ in rows}) == len(rows), "an operation applied twice"
    last = proc.rows("SELECT last_seq FROM store_seqs WHERE store_id = ?", STORE)
    assert last == ([(len(rows),)] if rows else []), "store_seqs out of step with the log"
    versions = proc.rows("SELECT entity_id, version FROM entities WHERE store_id = ?", STORE)
    assert len(versions) == len(rows)
    assert all(v == 1 for _, v in versions)
    return rows


@pytest.mark.parametrize(
    ("kill_after", "encoding"), [(1, "json"), (73, "msgpack")], ids=["early", "mid-stream"]
)
async def test_kill_9_loses_no_confirmed_operation(
    proc: ServerProcess, kill_after: int, encoding: str
) -> None:
    total = 300
    await proc.start()
    sender = await proc.connect("pos-1", encoding=encoding)
    confirmed: dict[str, int] = {}

    async def keep_sending() -> None:
        # Pipelined and still going at the kill: operations are queued, mid-batch, unsent.
        with contextlib.suppress(ConnectionClosed):
            for i in range(total):
                await sender.send(table_op(i))
                if i % 5 == 4:
                    await asyncio.sleep(0.002)

    sending = asyncio.create_task(keep_sending())
    try:
        while len(confirmed) < kill_after:
            message = await sender.expect("sync_confirmation")
            assert message["status"] == "applied"
            confirmed[message["operation_id"]] = message["seq"]
        proc.kill()
        await sending
        # Confirmations already on their way before the kill count as confirmed too.
        for message in await drain(sender):
            if message["type"] == "sync_confirmation":
                confirmed[message["operation_id"]] = message["seq"]
    finally:
        sending.cancel()
        await sender.close()
    assert len(confirmed) < total, "the kill came too late to test anything"

    # Straight from the database file: every confirmation is there with its seq.
    rows = check_log(proc)
    stored = dict(rows)
    for op_id, seq in confirmed.items():
        assert stored.get(op_id) == seq, f"confirmed {op_id} (seq {seq}) lost"
    assert set(stored) <= {f"op-{i:04d}" for i in range(total)}

    await proc.start()
    # A terminal resuming from 0 gets exactly the log, in order.
    reader = await proc.connect("pos-2", since=0)
    try:
        assert reader.established["last_seq"] == len(rows)
        replay = [await reader.expect("data_sync") for _ in rows]
        assert [(m["operation"]["id"], m["operation"]["seq"]) for m in replay] == rows
        await reader.nothing()

        # Retrying everything with the same ids applies each missing op once.
        sender = await proc.connect("pos-1", encoding=encoding)
        try:
            for i in range(total):
                await sender.send(table_op(i))
            answers = [await sender.expect("sync_confirmation") for _ in range(total)]
        finally:
            await sender.close()
        by_id = {a["operation_id"]: a for a in answers}
        assert len(by_id) == total
        for op_id, seq in stored.items():
            assert by_id[op_id]["status"] == "duplicate"
            assert by_id[op_id]["seq"] == seq
        fresh = [a for a in answers if a["status"] != "duplicate"]
        assert all(a["status"] == "applied" for a in fresh)
        assert sorted(a["seq"] for a in fresh) == list(range(len(rows) + 1, total + 1))
        # The listener sees only the newly applied ones, continuing the sequence.
        live = [await reader.expect("data_sync") for _ in fresh]
        assert [m["operation"]["seq"] for m in live] == list(range(len(rows) + 1, total + 1))
        await reader.nothing()
    finally:
        await reader.close()
    assert len(check_log(proc)) == total


async def test_kill_9_repeatedly_keeps_the_log_gapless(proc: ServerProcess) -> None:
    confirmed: dict[str, int] = {}
    sent = 0
    for _round in range(3):
        await proc.start()
        sender = await proc.connect("pos-1")
        try:
            for i in range(sent, sent + 100):
                await sender.send(table_op(i))
            first = await sender.expect("sync_confirmation")
            confirmed[first["operation_id"]] = first["seq"]
            proc.kill()
            for message in await drain(sender):
                if message["type"] == "sync_confirmation":
                    confirmed[message["operation_id"]] = message["seq"]
        finally:
            await sender.close()
        sent += 100
        stored = dict(check_log(proc))
        assert all(stored.get(k) == v for k, v in confirmed.items())


async def test_sigterm_drains_closes_1001_and_exits_0(proc: ServerProcess) -> None:
    total = 400
    await proc.start()
    sender = await proc.connect("pos-1")
    listener = await proc.connect("pos-2", encoding="msgpack")
    try:
        for i in range(total):
            await sender.send(table_op(i))
        first = await sender.expect("sync_confirmation")
        assert proc.proc is not None
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        rest = await drain(sender)
        pushed = await drain(listener)
        assert proc.proc.wait(10) == 0, proc.log()
        assert time.monotonic() - started < 15
        assert sender.ws.protocol.close_rcvd is not None
        assert sender.ws.protocol.close_rcvd.code == 1001
        assert listener.ws.protocol.close_rcvd is not None
        assert listener.ws.protocol.close_rcvd.code == 1001
    finally:
        await sender.close()
        await listener.close()

    answers = [first, *rest]
    confirmed = {a["operation_id"]: a["seq"] for a in answers if a["type"] == "sync_confirmation"}
    errors = [a for a in answers if a["type"] == "sync_error"]
    assert all(e["code"] == 1013 for e in errors), errors
    assert not confirmed.keys() & {e["operation_id"] for e in errors}
    assert {a["type"] for a in answers} <= {"sync_confirmation", "sync_error"}

    rows = check_log(proc)
    # Queued writes were committed, and every committed write was confirmed before the close:
    # a graceful stop leaves no operation whose sender does not know it landed.
    assert dict(rows) == confirmed
    # The listener got what was committed, in order (a prefix at worst: it was closed too).
    seqs = [m["operation"]["seq"] for m in pushed if m["type"] == "data_sync"]
    assert seqs == list(range(1, len(seqs) + 1))
    # Every session was logged as ended, with the shutdown close code.
    sessions = proc.rows(
        "SELECT terminal_id, disconnected_at, close_code FROM websocket_connections"
    )
    assert {t for t, _, _ in sessions} == {"pos-1", "pos-2"}
    assert all(d is not None for _, d, _ in sessions), sessions
    log = proc.log()
    assert "Traceback" not in log, log
    assert "OPEN MODE" in log  # warned loudly at start


async def test_sigterm_on_an_idle_server(proc: ServerProcess) -> None:
    await proc.start()
    terminal = await proc.connect("pos-1")
    try:
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        await drain(terminal)
        assert proc.proc.wait(5) == 0
        assert terminal.ws.protocol.close_rcvd is not None
        assert terminal.ws.protocol.close_rcvd.code == 1001
    finally:
        await terminal.close()


async def test_sigterm_with_a_terminal_that_stopped_reading(proc: ServerProcess) -> None:
    """A terminal that no longer reads cannot hold up a graceful stop."""
    await proc.start()
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        stuck.connect(("127.0.0.1", proc.port))
        stuck.sendall(
            b"GET /ws/stuck-1?store_id=s1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        sender = await proc.connect("pos-1")
        try:
            pad = "w" * 16_000
            for i in range(0, 400, 20):  # ~6 MB for the stuck terminal: its socket is full
                for j in range(i, i + 20):
                    await sender.send(op(f"op-{j}", f"t{j}", {"pad": pad}))
                for _ in range(20):
                    await sender.expect("sync_confirmation")
            assert proc.proc is not None
            started = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            await drain(sender)
            assert sender.ws.protocol.close_rcvd is not None
            assert sender.ws.protocol.close_rcvd.code == 1001
            assert proc.proc.wait(15) == 0, proc.log()
            elapsed = time.monotonic() - started
        finally:
            await sender.close()
    finally:
        stuck.close()
    # About 6 s: the bounded close of the stuck terminal, then the drain. Bounded, not timed.
    assert elapsed < 20, f"graceful stop took {elapsed:.1f}s"


async def test_a_commit_that_fails_is_answered_retry_never_confirmed(tmp_path: Path) -> None:
    """The disk fills up (SQLite's own page limit on the server's connection, a real SQLITE_FULL):
    the operations of the failed batch are answered 1013, none is confirmed, stored or pushed;
    once there is room again, their retries are applied and pushed once."""
    async with (
        running_server(tmp_path) as server,
        server.terminal("pos-a", encoding="msgpack") as a,
        server.terminal("pos-b") as b,
    ):
        await a.send(op("small", "t0", {"n": 0}, operation="CREATE"))
        assert (await a.expect("sync_confirmation"))["seq"] == 1
        assert (await b.expect("data_sync"))["operation"]["id"] == "small"
        store = server.worker.store
        assert isinstance(store, SQLiteStore)

        def cap(db: sqlite3.Connection) -> int:
            pages = int(db.execute("PRAGMA page_count").fetchone()[0])
            db.execute(f"PRAGMA max_page_count={pages}")
            return pages

        pages = await store._run(cap)
        big = [op(f"big-{n}", f"t{n}", {"blob": "x" * 5000}, operation="CREATE") for n in range(30)]
        await a.send({"type": "message_batch", "messages": big, "count": len(big)})
        answers = [await a.recv() for _ in big]
        assert {(x["type"], x["code"]) for x in answers} == {("sync_error", 1013)}, answers[:3]
        await b.nothing()
        assert (await store.log_bounds("s1")).last_seq == 1

        await store._run(lambda db: db.execute(f"PRAGMA max_page_count={pages * 1000}"))
        await a.send({"type": "message_batch", "messages": big, "count": len(big)})
        answers = [await a.recv() for _ in big]
        assert [x["seq"] for x in answers] == list(range(2, 32)), answers[:3]
        pushed = [(await b.expect("data_sync"))["operation"]["id"] for _ in big]
        assert pushed == [f"big-{n}" for n in range(30)]
        await b.nothing()

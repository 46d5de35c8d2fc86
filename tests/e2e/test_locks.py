"""End to end: entity locks (docs/protocol.md §8) and what a takeover does to them
(§2.5)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from chefia_rt.errors import Code, StorageUnavailable
from tests.e2e.test_sync_flow import (  # noqa: F401  (wire_checks: autouse fixture)
    ENCODINGS,
    confirmed,
    other,
    quiet,
    sync,
    wire_checks,
)
from tests.helpers import RunningServer, Terminal, eventually, op


def acquire(entity_id: str, entity_type: str = "orders", **extra: Any) -> dict[str, Any]:
    return {"type": "acquire_lock", "entity_type": entity_type, "entity_id": entity_id, **extra}


def release(entity_id: str, entity_type: str = "orders", **extra: Any) -> dict[str, Any]:
    return {"type": "release_lock", "entity_type": entity_type, "entity_id": entity_id, **extra}


def epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


async def wait_for_lock(terminal: Terminal, entity_id: str, timeout: float = 3.0) -> dict[str, Any]:
    """Ask for a lock until it is granted (it is freed by something the server does on its
    own time: an expiry, a disconnect)."""
    async with asyncio.timeout(timeout):
        while True:
            await terminal.send(acquire(entity_id))
            answer = await terminal.recv()
            if answer["type"] == "lock_acquired":
                return answer
            assert answer["type"] == "lock_failed", answer
            await asyncio.sleep(0.02)


async def locked_error(terminal: Terminal, message: dict[str, Any]) -> dict[str, Any]:
    await terminal.send(message)
    error = await terminal.expect("sync_error")
    assert error["code"] == Code.LOCKED, error
    assert error["operation_id"] == message["operation"]["id"]
    assert error["entity_type"] == message["operation"]["entity_type"]
    assert error["entity_id"] == message["operation"]["entity_id"]
    return error


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_acquire_fail_write_release(server: RunningServer, encoding: str) -> None:
    async with (
        server.terminal("pos-a", encoding=encoding) as a,
        server.terminal("pos-b", encoding=other(encoding)) as b,
    ):
        await sync(
            a, [b], op("c1", "o1", {"status": "open"}, entity_type="orders", operation="CREATE")
        )
        before = time.time()
        await a.send(acquire("o1", timeout=60_000, lock_id="my-lock"))
        lock = await a.expect("lock_acquired")
        assert lock["lock_id"] == "my-lock"
        assert (lock["entity_type"], lock["entity_id"]) == ("orders", "o1")
        assert before + 59 < epoch(lock["expires_at"]) < time.time() + 61
        # Without a lock_id the server names the lock.
        await a.send(acquire("o2"))
        lock2 = await a.expect("lock_acquired")
        assert lock2["lock_id"]
        assert time.time() + 25 < epoch(lock2["expires_at"]) < time.time() + 31  # 30 s default

        await b.send(acquire("o1"))
        failed = await b.expect("lock_failed")
        assert failed["locked_by"] == "pos-a"
        assert failed["reason"]
        assert failed["locked_until"] == lock["expires_at"]
        assert (failed["entity_type"], failed["entity_id"]) == ("orders", "o1")

        # The holder writes; the other terminal is refused with 4009 and nothing is pushed.
        await sync(a, [b], op("a1", "o1", {"status": "preparing"}, entity_type="orders", version=2))
        await locked_error(b, op("b1", "o1", {"status": "void"}, entity_type="orders", version=3))
        await locked_error(b, op("b2", "o1", entity_type="orders", operation="DELETE", version=3))
        await quiet(a, b)

        # Released: the other terminal takes it and writes.
        await a.send(release("o1", lock_id="my-lock"))
        released = await a.expect("lock_released")
        assert (released["entity_type"], released["entity_id"]) == ("orders", "o1")
        assert released["lock_id"] == "my-lock"
        await b.send(acquire("o1"))
        await b.expect("lock_acquired")
        await sync(b, [a], op("b3", "o1", {"status": "served"}, entity_type="orders", version=3))
        await locked_error(a, op("a2", "o1", {"status": "x"}, entity_type="orders", version=4))
        await quiet(a, b)


async def test_a_lock_blocks_writes_to_any_entity_type(server: RunningServer) -> None:
    """Tables need no lock, but one held by another terminal still refuses its writes."""
    async with server.terminal("pos-a") as a, server.terminal("waiter-b", type="waiter") as b:
        await sync(a, [b], op("c1", "t1", {"status": "free"}, operation="CREATE"))
        await a.send(acquire("t1", entity_type="tables"))
        await a.expect("lock_acquired")
        await locked_error(b, op("b1", "t1", {"status": "busy"}, version=2))
        await locked_error(b, op("b2", "t1", {"status": "busy"}, operation="CREATE"))
        bulk = {"updates": [{"entity_id": "t1", "data": {"status": "busy"}, "version": 2}]}
        await locked_error(b, op("b3", "tX", bulk, operation="BULK_UPDATE"))
        await sync(a, [b], op("a1", "t1", {"status": "busy"}, version=2))
        # An entity that does not exist yet can be locked too: nobody else creates it.
        await a.send(acquire("t9", entity_type="tables"))
        await a.expect("lock_acquired")
        await locked_error(b, op("b4", "t9", {"status": "free"}, operation="CREATE"))
        await sync(a, [b], op("a2", "t9", {"status": "free"}, operation="CREATE"))
        await quiet(a, b)


async def test_writes_that_need_a_lock(server: RunningServer) -> None:
    """orders and cashier_operations need the lock for UPDATE/DELETE (not CREATE); so does any
    op flagged requires_lock."""
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        await sync(a, [b], op("c1", "o1", {"n": 1}, entity_type="orders", operation="CREATE"))
        await locked_error(a, op("u1", "o1", {"n": 2}, entity_type="orders", version=2))
        await locked_error(a, op("d1", "o1", entity_type="orders", operation="DELETE", version=2))
        await sync(a, [b], op("c2", "t1", {"n": 1}, operation="CREATE"))
        await locked_error(a, op("u2", "t1", {"n": 2}, version=2, requires_lock=True))
        # An upsert of an unknown order is an UPDATE: it needs the lock too.
        await locked_error(a, op("u3", "o-new", {"n": 1}, entity_type="orders"))
        await quiet(a, b)
        # With the locks, all of it goes through.
        for entity_id, entity_type in (("o1", "orders"), ("t1", "tables"), ("o-new", "orders")):
            await a.send(acquire(entity_id, entity_type=entity_type))
            await a.expect("lock_acquired")
        await sync(a, [b], op("u1", "o1", {"n": 2}, entity_type="orders", version=2))
        await sync(a, [b], op("u2", "t1", {"n": 2}, version=2, requires_lock=True))
        await sync(a, [b], op("u3", "o-new", {"n": 1}, entity_type="orders"))
        await sync(a, [b], op("d1", "o1", entity_type="orders", operation="DELETE", version=3))
        await quiet(a, b)


async def test_reacquire_renews_and_release_of_a_foreign_lock(server: RunningServer) -> None:
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        await a.send(acquire("o1", timeout=1_000))
        first = await a.expect("lock_acquired")
        await a.send(acquire("o1", timeout=120_000))
        renewed = await a.expect("lock_acquired")
        assert epoch(renewed["expires_at"]) > epoch(first["expires_at"]) + 100
        # Releasing a lock one does not hold does not free it.
        await b.send(release("o1"))
        answer = await b.expect("lock_released")
        assert answer.get("released") is False
        await b.send(acquire("o1"))
        assert (await b.expect("lock_failed"))["locked_by"] == "pos-a"
        await quiet(a, b)


async def test_lock_expires_on_its_own(server: RunningServer) -> None:
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        await sync(a, [b], op("c1", "o1", {"n": 1}, entity_type="orders", operation="CREATE"))
        # Long enough for another terminal to see it taken on a loaded machine.
        await a.send(acquire("o1", timeout=1_500))
        lock = await a.expect("lock_acquired")
        await b.send(acquire("o1"))
        await b.expect("lock_failed")
        # Past its expiry the lease is gone: the holder may no longer write, another may lock.
        await asyncio.sleep(max(0.0, epoch(lock["expires_at"]) - time.time()) + 0.05)
        await locked_error(a, op("a1", "o1", {"n": 2}, entity_type="orders", version=2))
        await b.send(acquire("o1"))
        await b.expect("lock_acquired")
        await sync(b, [a], op("b1", "o1", {"n": 3}, entity_type="orders", version=2))
        await quiet(a, b)


async def test_disconnect_releases_the_locks(server: RunningServer) -> None:
    async with server.terminal("pos-b") as b:
        async with server.terminal("pos-a") as a:
            for entity_id in ("o1", "o2"):
                await a.send(acquire(entity_id))
                await a.expect("lock_acquired")
            await b.send(acquire("o1"))
            await b.expect("lock_failed")
        await wait_for_lock(b, "o1")
        await wait_for_lock(b, "o2")


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_locks_survive_a_takeover(server: RunningServer, encoding: str) -> None:
    """A second connection of the same terminal replaces the first (4004) and keeps its locks;
    they go when the terminal disconnects for good."""
    async with server.terminal("pos-b") as b:
        first = await server.connect("pos-a", encoding=encoding)
        try:
            await sync(
                first, [b], op("c1", "o1", {"n": 1}, entity_type="orders", operation="CREATE")
            )
            await first.send(acquire("o1"))
            await first.expect("lock_acquired")
            async with server.terminal("pos-a", encoding=encoding) as second:
                await first.ws.wait_closed()
                assert first.ws.close_code == Code.REPLACED
                # The old socket is gone on the server too by now; the lock is still there.
                await second.send({"type": "ping"})
                await second.expect("pong")
                await b.send(acquire("o1"))
                assert (await b.expect("lock_failed"))["locked_by"] == "pos-a"
                await locked_error(b, op("b1", "o1", {"n": 9}, entity_type="orders", version=2))
                conf, _ = await sync(
                    second, [b], op("a1", "o1", {"n": 2}, entity_type="orders", version=2)
                )
                assert conf["version"] == 2
                await second.send(release("o1"))
                await second.expect("lock_released")
                await second.send(acquire("o1"))
                await second.expect("lock_acquired")
            await wait_for_lock(b, "o1")
            await sync(b, [], op("b2", "o1", {"n": 3}, entity_type="orders", version=3))
        finally:
            await first.close()


async def test_takeovers_in_a_row_keep_one_terminal(server: RunningServer) -> None:
    """Several quick reconnects: every older socket is closed with 4004, the newest works and
    still holds the lock; the others' endings do not release it."""
    async with server.terminal("pos-b") as b:
        older: list[Terminal] = []
        try:
            newest = await server.connect("pos-a")
            await newest.send(acquire("o1"))
            await newest.expect("lock_acquired")
            for _ in range(4):
                older.append(newest)
                newest = await server.connect("pos-a")
            for t in older:
                await t.ws.wait_closed()
                assert t.ws.close_code == Code.REPLACED
            await newest.send({"type": "ping"})
            await newest.expect("pong")
            await b.send(acquire("o1"))
            await b.expect("lock_failed")
            await sync(newest, [b], op("a1", "o1", {"n": 1}, entity_type="orders"))
            await newest.close()
            await wait_for_lock(b, "o1")
        finally:
            for t in older:
                await t.close()


async def test_a_takeover_that_fails_to_open_releases_the_locks(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage fails while a reconnecting terminal is being set up: the new socket is closed
    with 1013, the old one was replaced (4004), so the terminal is gone: its locks must go and
    it must not linger as connected."""
    async with server.terminal("pos-b") as b:
        first = await server.connect("pos-a")
        try:
            await first.send(acquire("o1"))
            await first.expect("lock_acquired")
            original = server.worker.store.log_bounds
            failures = [StorageUnavailable("storage error: disk I/O error")]

            async def failing_log_bounds(*args: Any) -> Any:
                if failures:
                    raise failures.pop()
                return await original(*args)

            monkeypatch.setattr(server.worker.store, "log_bounds", failing_log_bounds)
            second = await server.connect("pos-a", greet=False)
            await second.ws.wait_closed()
            assert second.ws.close_code == Code.TRY_AGAIN_LATER
            await first.ws.wait_closed()
            assert first.ws.close_code == Code.REPLACED
            await wait_for_lock(b, "o1")
            assert [s.terminal_id for s in server.worker.hub.sessions()] == ["pos-b"]
        finally:
            await first.close()


@asynccontextmanager
async def commits_held(server: RunningServer) -> AsyncIterator[None]:
    """Another connection holds what the writer's next commit needs first: the SQLite file's
    write lock, or store s1's seq row in PostgreSQL. That commit waits until this ends."""
    settings = server.settings
    if settings.storage_kind == "sqlite":
        blocker = sqlite3.connect(settings.sqlite_path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            yield
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        return
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1 FROM store_seqs WHERE store_id = 's1' FOR UPDATE")
        yield
    finally:
        await conn.execute("ROLLBACK")
        await conn.close()


async def test_a_lock_granted_while_a_write_waits_in_the_queue_stops_it(
    server: RunningServer,
) -> None:
    """Leases are checked when the batch's commit begins, not when the write arrived: a write
    still queued behind a waiting commit when another terminal is granted the lock gets 4009,
    and only the one already committing goes through. (On PostgreSQL the grant is marked in
    storage without waiting for the held seq row.)"""
    node = server.worker
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        await sync(a, [b], op("c1", "o1", {"status": "open"}, operation="CREATE"))
        async with commits_held(server):
            await a.send(op("c2", "o2", {"status": "open"}, operation="CREATE"))
            await a.send({"type": "ping", "timestamp": 1})
            await a.expect("pong")
            # The writer took c2 and waits.
            await eventually(node.pipeline._queue.empty, what="the writer takes c2")
            await a.send(op("u1", "o1", {"status": "paid"}))
            await a.send({"type": "ping", "timestamp": 2})
            await a.expect("pong")  # u1 passed the server's checks and waits in the queue
            await b.send(acquire("o1", "tables", timeout=60_000))
            await b.expect("lock_acquired")
        await confirmed(a, "c2")
        error = await a.expect("sync_error")
        assert (error["operation_id"], error["code"]) == ("u1", Code.LOCKED), error
        assert "locked by pos-b" in error["error"], error
        await b.expect("data_sync")  # c2 only
        await quiet(a, b)


async def test_locked_writes_of_one_batch_are_told_apart_in_one_log_read(
    server: RunningServer,
) -> None:
    """Several writes of one batch that a lock forbids: those already in the log (retries of
    confirmed ones) are answered `duplicate`, the others 4009, in their order. On SQLite the
    writer tells them apart with one read of the log for all of them; on PostgreSQL the batch's
    own read of the log does, and there is no other."""
    node = server.worker
    reads: list[int] = []
    logged = node.store.logged

    async def counted(keys: Any) -> set[tuple[str, str]]:
        reads.append(len(keys))
        return await logged(keys)

    node.store.logged = counted  # type: ignore[method-assign]
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        for i in (1, 2):
            await sync(a, [b], op(f"c{i}", f"o{i}", {"n": i}, operation="CREATE"))
        for entity_id in ("o1", "o2"):
            await b.send(acquire(entity_id, "tables"))
            await b.expect("lock_acquired")
        async with commits_held(server):  # the writer's next commit waits
            await a.send(op("c3", "o3", {"n": 3}, operation="CREATE"))
            await a.send({"type": "ping", "timestamp": 0})
            await a.expect("pong")  # c3 is queued
            await eventually(node.pipeline._queue.empty, what="the writer takes c3")
            for message in (
                op("u1", "o1", {"n": 9}, version=2),  # locked: 4009
                op("c1", "o1", {"n": 1}, operation="CREATE"),  # a retry: duplicate
                op("u2", "o2", {"n": 9}, version=2),  # locked: 4009
                op("c2", "o2", {"n": 2}, operation="CREATE"),  # a retry: duplicate
            ):
                await a.send(message)
            await a.send({"type": "ping", "timestamp": 1})
            await a.expect("pong")  # all four wait in the queue: one batch
        await confirmed(a, "c3")
        answers = [await a.expect("sync_error"), await a.expect("sync_error")]
        assert [(e["operation_id"], e["code"]) for e in answers] == [
            ("u1", Code.LOCKED),
            ("u2", Code.LOCKED),
        ]
        await confirmed(a, "c1", "duplicate")
        await confirmed(a, "c2", "duplicate")
        assert reads == ([] if node.store.marks_leases else [4])
        await b.expect("data_sync")  # c3 only
        await quiet(a, b)

"""Health and stats on the WebSocket port (docs/operations.md §3) and storage failures under a
running server."""

from __future__ import annotations

import asyncio
import gc
import json
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from chefia_rt import __version__
from chefia_rt.store.sqlite import SQLiteStore
from tests.helpers import DEFAULT_TIMEOUT, RunningServer, eventually, op, running_server

pytestmark = pytest.mark.asyncio


STATS_KEYS = {
    "total_connections",
    "connections_by_type",
    "message_throughput",
    "average_latency",
    "conflict_rate",
    "uptime_seconds",
    "operations_per_minute",
}


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def get(server: RunningServer, path: str) -> tuple[int, dict[str, Any]]:
    """GET a path of the server with a plain HTTP client; (status, JSON body)."""
    status, headers, body = await asyncio.to_thread(_get, server.http + path)
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    return status, json.loads(body)


async def raw_http(server: RunningServer, request: bytes) -> bytes:
    """Send raw bytes, read the whole answer (the server closes after it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(DEFAULT_TIMEOUT):  # a hang guard
            return await reader.read(-1)
    finally:
        writer.close()


class FailingPing(SQLiteStore):
    """A store whose health check reports it down (the database is unreachable)."""

    async def ping(self) -> bool:
        return False


def break_storage(server: RunningServer) -> sqlite3.Connection:
    """Make the SQLite store unusable under the running server; returns the connection."""
    store = server.worker.store
    assert isinstance(store, SQLiteStore)
    db = store._db
    assert db is not None
    store._db = None
    return db


def repair_storage(server: RunningServer, db: sqlite3.Connection) -> None:
    store = server.worker.store
    assert isinstance(store, SQLiteStore)
    store._db = db


# ---- health -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/api/v1/health", "/health?probe=lb"])
async def test_health_ok(server: RunningServer, path: str) -> None:
    status, body = await get(server, path)
    assert status == 200
    assert body["status"] == "ok"
    assert body["version"] == __version__
    assert isinstance(body["uptime_seconds"], int | float) and body["uptime_seconds"] >= 0
    assert body["storage"] == {"kind": server.worker.store.kind, "ok": True}
    assert body["bus"] == {"kind": "memory", "ok": True}
    assert body["workers"] == 1
    # Open mode is shown, loudly.
    assert body["auth"] == "open"
    assert "JWT_SECRET_KEY" in body["warning"]


async def test_health_503_when_storage_ping_fails(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        real = server.worker.store
        server.worker.store = FailingPing(str(tmp_path / "other.db"))
        try:
            status, body = await get(server, "/health")
        finally:
            server.worker.store = real
        assert status == 503
        assert body["status"] != "ok"
        assert body["storage"]["ok"] is False
        status, _ = await get(server, "/health")
        assert status == 200


async def test_health_503_when_storage_connection_is_gone(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        await _health_503_while_broken(server)


async def _health_503_while_broken(server: RunningServer) -> None:
    db = break_storage(server)
    try:
        status, body = await get(server, "/api/v1/health")
        assert status == 503
        assert body["storage"]["ok"] is False
    finally:
        repair_storage(server, db)
    status, _ = await get(server, "/api/v1/health")
    assert status == 200


async def refused_with_retry(server: RunningServer) -> None:
    """A terminal connecting now is closed 1013 (retry) before it is sent anything."""
    terminal = await server.connect("pos-1", greet=False)
    try:
        with pytest.raises(ConnectionClosed):
            await terminal.recv()
        assert terminal.ws.protocol.close_rcvd is not None
        assert terminal.ws.protocol.close_rcvd.code == 1013
    finally:
        await terminal.close()


async def test_health_503_after_the_store_is_closed(tmp_path: Path) -> None:
    """`store.close()` under a running server: health says 503, never a 500."""
    async with running_server(tmp_path) as server:
        store = server.worker.store
        await store.close()
        status, body = await get(server, "/health")
        assert status == 503
        assert body["status"] in ("down", "degraded")
        assert body["version"] == __version__
        # A terminal connecting now is told to retry, and leaves nothing behind.
        await refused_with_retry(server)
        assert len(server.worker.hub) == 0
        # Put a working store back so that the server can shut down normally.
        fresh = SQLiteStore(str(tmp_path / "chefia.db"))
        await fresh.open()
        server.worker.store = fresh


# ---- stats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ws/stats", "/api/v1/websocket/stats"])
async def test_stats_keys_on_an_idle_server(server: RunningServer, path: str) -> None:
    status, body = await get(server, path)
    assert status == 200
    assert set(body) >= STATS_KEYS
    assert body["total_connections"] == 0
    assert body["connections_by_type"] == {}
    assert body["operations_per_minute"] == 0
    assert body["conflict_rate"] == 0


async def test_stats_reflect_traffic(server: RunningServer) -> None:
    async with (
        server.terminal("pos-1") as pos,
        server.terminal("pos-2") as pos2,
        server.terminal("kds-1", type="kds"),
        server.terminal("mon-1", type="monitor"),
    ):
        for i in range(10):
            await pos.send(op(f"op-{i}", "t1", {"seats": i}, version=i + 1))
            assert (await pos.until("sync_confirmation"))["status"] == "applied"
        # One stale write on a last_write_wins entity: a resolved conflict.
        await pos2.send(
            op("op-stale", "t1", {"seats": 99}, version=3, timestamp="2020-01-01T00:00:00Z")
        )
        stale = await pos2.until("sync_confirmation")
        assert stale["status"] == "resolved"
        status, body = await get(server, "/ws/stats")
        assert status == 200
        assert body["total_connections"] == 4
        assert body["connections_by_type"] == {"pos": 2, "kds": 1, "monitor": 1}
        assert body["operations_per_minute"] == 11
        assert body["message_throughput"] > 0
        assert body["average_latency"] > 0
        assert body["conflict_rate"] == pytest.approx(1 / 11, abs=1e-3)
        assert body["uptime_seconds"] >= 0
    await eventually(lambda: len(server.worker.hub) == 0)
    _, body = await get(server, "/api/v1/websocket/stats")
    assert body["total_connections"] == 0
    assert body["connections_by_type"] == {}
    assert body["operations_per_minute"] == 11


# ---- other paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/nope", "/ws", "/ws/", "/health/extra", "/api/v1/"])
async def test_unknown_path_is_404(server: RunningServer, path: str) -> None:
    status, body = await get(server, path)
    assert status == 404
    assert body["error"] == "not found"


async def test_websocket_upgrade_outside_ws_path_is_404(server: RunningServer) -> None:
    answer = await raw_http(
        server,
        b"GET /other/pos-1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 404")


async def test_garbage_request_does_not_hurt_the_server(server: RunningServer) -> None:
    await raw_http(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n")
    await raw_http(server, b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    status, _ = await get(server, "/health")
    assert status == 200


# ---- storage unavailable ----------------------------------------------------------------------


def _rows(db_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path) as db:
        return db.execute(sql).fetchall()


async def test_operations_get_1013_while_storage_is_down(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path) as server,
        server.terminal("pos-1") as pos,
        server.terminal("pos-2") as other,
    ):
        await pos.send(op("op-1", "t1", {"seats": 1}))
        assert (await pos.expect("sync_confirmation"))["seq"] == 1
        await other.expect("data_sync")

        db = break_storage(server)
        try:
            for i in (2, 3, 4):
                await pos.send(op(f"op-{i}", "t1", {"seats": i}, version=i))
            for i in (2, 3, 4):
                error = await pos.expect("sync_error")
                assert error["operation_id"] == f"op-{i}"
                assert error["code"] == 1013
                assert error["entity_type"] == "tables"
                assert error["entity_id"] == "t1"
            await other.nothing()
            # Reads that need storage fail the same way, and the connection stays.
            await pos.send({"type": "snapshot_request"})
            assert (await pos.expect("error"))["code"] == 1013
            await pos.send({"type": "resume", "since": 0})
            assert (await pos.expect("error"))["code"] == 1013
            # The server keeps running: pings, health (503), stats.
            await pos.send({"type": "ping"})
            await pos.expect("pong")
            status, _ = await get(server, "/health")
            assert status == 503
            status, _ = await get(server, "/ws/stats")
            assert status == 200
        finally:
            repair_storage(server, db)

        # Nothing was half-written: the log and the entity are as after op-1.
        db_path = tmp_path / "chefia.db"
        assert _rows(db_path, "SELECT id, seq FROM sync_operations") == [("op-1", 1)]
        assert _rows(db_path, "SELECT version, data FROM entities") == [(1, '{"seats":1}')]

        # Retrying once storage is back applies each operation exactly once.
        for i in (2, 3, 4):
            await pos.send(op(f"op-{i}", "t1", {"seats": i}, version=i))
            confirmation = await pos.expect("sync_confirmation")
            assert (confirmation["operation_id"], confirmation["seq"]) == (f"op-{i}", i)
            assert confirmation["status"] == "applied"
        for i in (2, 3, 4):
            assert (await other.expect("data_sync"))["operation"]["seq"] == i


async def test_connecting_while_storage_is_down_leaves_no_ghost(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        db = break_storage(server)
        try:
            await refused_with_retry(server)
            _, body = await get(server, "/ws/stats")
            assert body["total_connections"] == 0, "a refused connection still counts"
        finally:
            repair_storage(server, db)
        async with server.terminal("pos-1") as terminal:
            await terminal.send({"type": "ping"})
            await terminal.expect("pong")


async def test_a_locked_database_times_out_and_the_retry_is_safe(tmp_path: Path) -> None:
    """A commit that times out may still land; retrying the same id never applies it twice."""
    async with (
        running_server(tmp_path, sync_commit_timeout=0.5) as server,
        server.terminal("pos-1") as pos,
        server.terminal("pos-2") as other,
    ):
        blocker = sqlite3.connect(tmp_path / "chefia.db", isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database
            await pos.send(op("op-1", "t1", {"seats": 1}))
            error = await pos.expect("sync_error")
            assert error["code"] == 1013
            assert error["operation_id"] == "op-1"
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        # The pending transaction lands now and is pushed; the retry is a duplicate.
        pushed = await other.expect("data_sync")
        assert pushed["operation"]["id"] == "op-1"
        await pos.send(op("op-1", "t1", {"seats": 1}))
        confirmation = await pos.expect("sync_confirmation")
        assert confirmation["status"] == "duplicate"
        assert confirmation["seq"] == 1
        assert _rows(tmp_path / "chefia.db", "SELECT count(*) FROM sync_operations") == [(1,)]
        # The late commit's state went into the RequestCache too: no read finds it missing.
        status, body = await get(server, "/api/v1/entities/tables/t1?store_id=s1")
        assert (status, body["version"], body["data"]) == (200, 1, {"seats": 1})


async def test_allowed_origins_refuse_other_browsers(tmp_path: Path) -> None:
    async with running_server(tmp_path, ws_allowed_origins="https://pos.example") as server:
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"{server.url}/pos-1", origin=Origin("https://evil.example"))
        assert refused.value.response.status_code == 403
        async with websockets.connect(
            f"{server.url}/pos-1", origin=Origin("https://pos.example")
        ) as ws:
            assert '"connection_established"' in await asyncio.wait_for(ws.recv(), 5)
        # Native terminals send no Origin at all.
        async with server.terminal("pos-2") as terminal:
            assert terminal.established["terminal_id"] == "pos-2"


async def test_failed_session_log_write_is_handled(tmp_path: Path) -> None:
    """(Regression: Worker.spawn left a side task's exception unretrieved, so a session-log write
    failing while storage is down surfaced as "Task exception was never retrieved".)"""
    loop = asyncio.get_running_loop()
    leaked: list[str] = []
    loop.set_exception_handler(lambda _loop, context: leaked.append(context["message"]))
    try:
        async with running_server(tmp_path) as server:
            async with server.terminal("pos-1"):
                db = break_storage(server)
            # The disconnect spawns the session-log write, which fails on the broken storage.
            await eventually(lambda: len(server.worker.hub) == 0)
            await eventually(lambda: not server.worker._background)
            gc.collect()
            repair_storage(server, db)
    finally:
        loop.set_exception_handler(None)
    assert not [m for m in leaked if "never retrieved" in m], leaked


async def test_health_is_503_while_draining_so_balancers_stop_sending(
    server: RunningServer,
) -> None:
    server.worker.pipeline.draining = True
    status, body = await get(server, "/health")
    assert status == 503
    assert body["status"] == "draining"
    server.worker.pipeline.draining = False

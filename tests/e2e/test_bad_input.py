"""Limits and bad input (docs/protocol.md §10, §11) and the handshake rules (§2), against a running
server.

Auth and rate limits are covered elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

import lz4.frame
import msgpack
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from chefia_rt.domain import EntityKey
from tests.helpers import (
    DEFAULT_TIMEOUT,
    RunningServer,
    Terminal,
    closed_with,
    eventually,
    op,
    running_server,
    still_usable,
)

pytestmark = pytest.mark.asyncio


async def handshake_close(server: RunningServer, path_and_query: str) -> int | None:
    """Connect to a raw URL and return the close code the server answers with."""
    ws = await websockets.connect(f"{server.url}/{path_and_query}")
    terminal = Terminal(ws, "json")
    try:
        return await closed_with(terminal)
    finally:
        await ws.close()


# ---- frame size -------------------------------------------------------------------------------


async def test_frame_over_max_size_closes_1009(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, max_ws_message_size=4096) as server,
        server.terminal("pos-1") as terminal,
    ):
        await still_usable(terminal)
        await terminal.ws.send(json.dumps({"type": "ping", "pad": "x" * 5000}))
        assert await closed_with(terminal) == 1009


async def test_frame_just_under_max_size_is_fine(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, max_ws_message_size=4096) as server,
        server.terminal("pos-1") as terminal,
    ):
        frame = json.dumps({"type": "ping", "timestamp": 1, "pad": ""})
        frame = frame.replace('"pad": ""', '"pad": "' + "x" * (4096 - len(frame)) + '"')
        assert len(frame) == 4096
        await terminal.ws.send(frame)
        assert (await terminal.expect("pong"))["timestamp"] == 1


async def test_compressed_frame_inflating_beyond_max_closes_1009(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, max_ws_message_size=4096) as server,
        server.terminal("pos-1", encoding="msgpack") as terminal,
    ):
        body = msgpack.packb({"type": "ping", "pad": "x" * 100_000})
        frame = b"compressed:" + lz4.frame.compress(body)
        assert len(frame) < 4096  # small on the wire, a bomb once inflated
        await terminal.ws.send(frame)
        assert await closed_with(terminal) == 1009


async def test_compressed_frame_within_max_is_accepted(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, max_ws_message_size=4096) as server,
        server.terminal("pos-1", encoding="msgpack") as terminal,
    ):
        body = msgpack.packb({"type": "ping", "timestamp": 7, "pad": "y" * 3000})
        await terminal.ws.send(b"compressed:" + lz4.frame.compress(body))
        assert (await terminal.expect("pong"))["timestamp"] == 7


# ---- undecodable frames, unknown types, schema violations ---------------------------------------

ERROR_FRAMES: list[tuple[str, str | bytes, str]] = [
    ("text-not-json", "{not json", "undecodable JSON"),
    ("text-not-object", "[1, 2, 3]", "object"),
    ("binary-not-msgpack", b"\xc1\xc1\xc1", "undecodable msgpack"),
    ("binary-not-map", msgpack.packb([1, 2]), "map"),
    ("bad-lz4", b"compressed:not lz4 at all", "lz4"),
    ("unknown-type", json.dumps({"type": "drop_tables"}), "unknown message type"),
    ("no-type", json.dumps({"operation": {}}), "unknown message type"),
    (
        "lock-timeout-too-long",
        json.dumps(
            {"type": "acquire_lock", "entity_type": "orders", "entity_id": "o1", "timeout": 10**9}
        ),
        "timeout",
    ),
    ("nan", '{"type": "ping", "timestamp": NaN}', "NaN"),
]


@pytest.mark.parametrize(
    ("frame", "reason"), [(f, r) for _, f, r in ERROR_FRAMES], ids=[i for i, _, _ in ERROR_FRAMES]
)
async def test_invalid_frame_gets_error_4006_and_connection_stays(
    server: RunningServer, frame: str | bytes, reason: str
) -> None:
    async with server.terminal("pos-1") as terminal:
        await terminal.ws.send(frame)
        error = await terminal.expect("error")
        assert error["code"] == 4006
        assert reason in error["error"]
        await still_usable(terminal)


def _with(message: dict[str, Any], **changes: Any) -> dict[str, Any]:
    operation = {**message["operation"], **changes}
    return {**message, "operation": {k: v for k, v in operation.items() if v is not None}}


BASE = op("op-bad-1", "t1", {"seats": 4})
SCHEMA_VIOLATIONS: list[tuple[str, dict[str, Any], str]] = [
    ("bad-operation-kind", _with(BASE, operation="UPSERT"), "operation.operation"),
    ("bad-version-zero", _with(BASE, version=0), "operation.version"),
    ("bad-version-text", _with(BASE, version="2"), "operation.version"),
    ("bad-version-float", _with(BASE, version=1.5), "operation.version"),
    ("bad-timestamp", _with(BASE, timestamp="yesterday at noon"), "timestamp"),
    ("bad-timestamp-type", _with(BASE, timestamp=12345), "timestamp"),
    ("bad-priority", _with(BASE, priority="urgent"), "priority"),
    ("bad-entity-type", _with(BASE, entity_type="orders; drop"), "entity_type"),
    (
        "missing-entity-id",
        {**BASE, "operation": {k: v for k, v in BASE["operation"].items() if k != "entity_id"}},
        "entity_id",
    ),
    ("data-not-object", _with(BASE, data=[1, 2]), "data"),
    ("requires-lock-text", _with(BASE, requires_lock="no"), "requires_lock"),
    ("bulk-without-updates", _with(BASE, operation="BULK_UPDATE", data={"x": 1}), "updates"),
]


@pytest.mark.parametrize(
    ("message", "field"),
    [(m, f) for _, m, f in SCHEMA_VIOLATIONS],
    ids=[i for i, _, _ in SCHEMA_VIOLATIONS],
)
async def test_schema_violation_gets_sync_error_4006_with_operation_id(
    server: RunningServer, message: dict[str, Any], field: str
) -> None:
    async with server.terminal("pos-1") as terminal:
        await terminal.send(message)
        error = await terminal.expect("sync_error")
        assert error["code"] == 4006
        assert error["operation_id"] == "op-bad-1"
        assert field in error["error"], error
        assert error["entity_type"] == message["operation"].get("entity_type")
        await still_usable(terminal)
        # The same connection still writes.
        await terminal.send(op("op-good-1", "t1", {"seats": 2}))
        confirmation = await terminal.expect("sync_confirmation")
        assert confirmation["operation_id"] == "op-good-1"
        assert confirmation["status"] == "applied"


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_data_sync_without_id_is_rejected_4006(server: RunningServer, encoding: str) -> None:
    async with server.terminal("pos-1", encoding=encoding) as terminal:
        message = op("x", "t1", {"seats": 4})
        del message["operation"]["id"]
        await terminal.send(message)
        error = await terminal.recv()
        assert error["type"] in ("error", "sync_error")
        assert error["code"] == 4006
        assert "id" in error["error"]
        assert error.get("operation_id") is None
        await still_usable(terminal)


async def test_data_sync_without_operation_gets_error(server: RunningServer) -> None:
    async with server.terminal("pos-1") as terminal:
        await terminal.send({"type": "data_sync", "operation": "CREATE"})
        error = await terminal.recv()
        assert error["type"] == "error"
        assert error["code"] == 4006
        assert "operation" in error["error"]
        await still_usable(terminal)


async def test_rejected_operation_is_not_applied_or_pushed(server: RunningServer) -> None:
    async with server.terminal("pos-1") as writer, server.terminal("pos-2") as reader:
        await writer.send(_with(BASE, version=0))
        await writer.expect("sync_error")
        await reader.nothing()
        assert await server.worker.store.get_entity(EntityKey("s1", "tables", "t1")) is None
        bounds = await server.worker.store.log_bounds("s1")
        assert bounds.last_seq == 0


async def test_repeated_invalid_frames_close_4006(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path) as server,
        server.terminal("pos-1") as terminal,
        server.terminal("pos-2") as bystander,
    ):
        limit = server.settings.ws_invalid_frame_limit
        assert limit == 20
        # Both kinds count: undecodable frames and schema violations of operations.
        for i in range(limit - 1):
            if i % 2:
                await terminal.ws.send("garbage")
            else:
                await terminal.send(_with(BASE, id=f"op-{i}", version=-1))
            reply = await terminal.recv()
            assert reply["code"] == 4006
        await still_usable(terminal)  # 19 is still tolerated
        await terminal.ws.send("garbage")
        assert await closed_with(terminal) == 4006
        await still_usable(bystander)


async def test_permission_errors_do_not_count_as_abuse(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, ws_invalid_frame_limit=3) as server,
        server.terminal("mon-1", type="monitor") as monitor,
    ):
        for i in range(5):
            await monitor.send(op(f"op-m{i}", "t1", {"seats": 1}))
            assert (await monitor.until("sync_error"))["code"] == 4008
        await still_usable(monitor)


# ---- connection limit -------------------------------------------------------------------------


async def test_connections_over_limit_are_refused_with_503(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, max_ws_connections=2) as server,
        server.terminal("pos-1"),
        server.terminal("pos-2") as second,
    ):
        with pytest.raises(InvalidStatus) as refused:
            await server.connect("pos-3")
        assert refused.value.response.status_code == 503
        # A freed slot can be used again.
        await second.close()
        await eventually(lambda: len(server.worker.hub) == 1)
        async with server.terminal("pos-3") as third:
            await still_usable(third)


async def test_concurrent_handshakes_respect_the_connection_limit(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_ws_connections=3) as server:
        results = await asyncio.gather(
            *(server.connect(f"pos-{i}") for i in range(12)), return_exceptions=True
        )
        try:
            opened = [r for r in results if isinstance(r, Terminal)]
            refused = [r for r in results if isinstance(r, InvalidStatus)]
            assert len(opened) + len(refused) == 12, results
            assert all(r.response.status_code == 503 for r in refused)
            assert len(opened) <= 3
            assert len(server.worker.hub) <= 3
        finally:
            for r in results:
                if isinstance(r, Terminal):
                    await r.close()


# ---- permissions ------------------------------------------------------------------------------


async def test_monitor_may_not_write(server: RunningServer) -> None:
    async with server.terminal("mon-1", type="monitor") as monitor:
        await monitor.send(op("op-m1", "t1", {"seats": 4}))
        error = await monitor.until("sync_error")
        assert error["code"] == 4008
        assert error["operation_id"] == "op-m1"
        await monitor.send({"type": "acquire_lock", "entity_type": "tables", "entity_id": "t1"})
        error = await monitor.until("error")
        assert error["code"] == 4008
        await still_usable(monitor)
    assert (await server.worker.store.log_bounds("s1")).last_seq == 0


async def test_kds_may_not_touch_cashier_operations(server: RunningServer) -> None:
    async with server.terminal("kds-1", type="kds") as kds:
        await kds.send(
            op(
                "op-k1",
                "cash-1",
                {"amount": 10},
                entity_type="cashier_operations",
                operation="CREATE",
            )
        )
        error = await kds.until("sync_error")
        assert error["code"] == 4008
        assert error["operation_id"] == "op-k1"
        assert error["entity_type"] == "cashier_operations"
        await still_usable(kds)


async def test_kds_may_update_only_an_orders_status_with_the_lock(server: RunningServer) -> None:
    async with (
        server.terminal("pos-1") as pos,
        server.terminal("kds-1", type="kds") as kds,
    ):
        await pos.send(
            op(
                "op-o1",
                "order-1",
                {"status": "open", "items": ["soup"]},
                entity_type="orders",
                operation="CREATE",
            )
        )
        assert (await pos.expect("sync_confirmation"))["status"] == "applied"
        pushed = await kds.until("data_sync")
        assert pushed["operation"]["version"] == 1

        # Without the order lock: 4009.
        await kds.send(
            op("op-k1", "order-1", {"status": "preparing"}, entity_type="orders", version=2)
        )
        assert (await kds.until("sync_error"))["code"] == 4009

        await kds.send({"type": "acquire_lock", "entity_type": "orders", "entity_id": "order-1"})
        await kds.until("lock_acquired")
        # More than the status: 4008.
        await kds.send(
            op(
                "op-k2",
                "order-1",
                {"status": "ready", "items": []},
                entity_type="orders",
                version=2,
            )
        )
        error = await kds.until("sync_error")
        assert error["code"] == 4008
        # Status only: applied.
        await kds.send(
            op("op-k3", "order-1", {"status": "preparing"}, entity_type="orders", version=2)
        )
        confirmation = await kds.until("sync_confirmation")
        assert confirmation["operation_id"] == "op-k3"
        assert confirmation["status"] == "applied"
        assert confirmation["version"] == 2
        pushed = await pos.until("data_sync")
        assert pushed["operation"]["data"] == {"status": "preparing", "items": ["soup"]}


# ---- slow readers -----------------------------------------------------------------------------


@pytest.mark.parametrize(("configured", "bounded"), [(65536, True), (0, False)])
async def test_send_buffer_of_each_connection_is_bounded(
    tmp_path: Path, configured: int, bounded: bool
) -> None:
    """WS_SEND_BUFFER caps the kernel's send buffer: with its autotuning (up to 4 MiB) a display
    that stopped reading held megabytes and was noticed (closed 1013) only after tens of seconds
    on a loaded machine; 0 leaves the kernel's autotuning alone."""
    async with (
        running_server(tmp_path, ws_send_buffer=configured) as server,
        server.terminal("pos-1"),
    ):
        (ws,) = server.server.connections()
        sock = ws.transport.get_extra_info("socket")
        size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    if bounded:
        assert size == 2 * configured  # Linux doubles it for its bookkeeping
    else:
        assert size != 2 * 65536


async def test_slow_reader_is_closed_1013_and_others_keep_receiving(tmp_path: Path) -> None:
    async with running_server(tmp_path, ws_message_queue_size=16) as server:
        # A tiny receive buffer and no client-side queue, so the server's socket fills quickly.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        slow_ws = await websockets.connect(
            f"{server.url}/slow-1?store_id=s1", sock=sock, max_queue=1
        )
        slow = Terminal(slow_ws, "json")
        try:
            slow.established = await slow.expect("connection_established")
            async with server.terminal("pos-1") as writer, server.terminal("pos-2") as reader:
                session = server.worker.hub.get("s1", "slow-1")
                assert session is not None
                received: list[dict[str, Any]] = []

                async def read_all() -> None:
                    while True:
                        received.append(await reader.expect("data_sync"))

                reading = asyncio.create_task(read_all())
                pad = "z" * 16_000
                sent = 0
                try:
                    # Small pipelined chunks: the writer's own answers fit its tiny queue too.
                    while not session.closed and sent < 3000:
                        for i in range(sent, sent + 8):
                            await writer.send(op(f"op-{i}", f"t{i}", {"pad": pad}))
                        for i in range(sent, sent + 8):
                            confirmation = await writer.expect("sync_confirmation")
                            assert confirmation["operation_id"] == f"op-{i}"
                        sent += 8
                    assert session.closed, "slow reader not closed"
                    assert session.close_code == 1013
                    await eventually(lambda: len(received) >= sent)
                finally:
                    reading.cancel()
                # The others got every operation, in order.
                assert [m["operation"]["id"] for m in received] == [f"op-{i}" for i in range(sent)]
                assert [m["operation"]["seq"] for m in received] == list(range(1, sent + 1))
                await still_usable(writer)
                # The slow terminal, once it reads, finds the close code behind its backlog.
                assert await closed_with(slow) == 1013
                # ...and resumes with since.
                async with server.terminal("slow-1", since=sent - 3) as again:
                    seqs = [(await again.expect("data_sync"))["operation"]["seq"] for _ in range(3)]
                    assert seqs == [sent - 2, sent - 1, sent]
        finally:
            await slow_ws.close()


async def test_small_queue_session_still_goes_live(tmp_path: Path) -> None:
    """A terminal that only listens receives pushes, whatever WS_MESSAGE_QUEUE_SIZE is.

    (Regression: the catch-up waited for room for a 500-op page, so with a smaller queue a
    session never went live.)
    """
    async with (
        running_server(tmp_path, ws_message_queue_size=2) as server,
        server.terminal("pos-1") as writer,
        server.terminal("pos-2") as listener,
    ):
        await writer.send(op("op-1", "t1", {"seats": 1}))
        await writer.expect("sync_confirmation")
        pushed = await listener.expect("data_sync")
        assert pushed["operation"]["id"] == "op-1"


async def test_a_batch_larger_than_the_queue_reaches_a_terminal_that_reads(
    tmp_path: Path,
) -> None:
    """One commit of more operations than WS_MESSAGE_QUEUE_SIZE is handed to every receiver at
    once: a receiver whose socket takes them gets them all, it is not closed 1013 as slow."""
    async with (
        running_server(tmp_path, ws_message_queue_size=4) as server,
        server.terminal("pos-1", encoding="msgpack") as writer,
        server.terminal("pos-2") as listener,
    ):
        ops = [op(f"op-{i}", f"t{i}", {"seats": i}) for i in range(12)]
        # One frame: the server queues all of them before the writer runs, so one batch.
        await writer.ws.send(msgpack.packb({"type": "message_batch", "count": 12, "messages": ops}))
        for i in range(12):
            assert (await writer.expect("sync_confirmation"))["operation_id"] == f"op-{i}"
        pushed = [(await listener.expect("data_sync"))["operation"]["id"] for _ in range(12)]
        assert pushed == [f"op-{i}" for i in range(12)]
        await still_usable(listener)


# ---- handshake --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("x" * 65, 4001),
        ("pos%201", 4001),  # a space
        ("pos%2F1", 4001),  # a slash
        ("pos-1%0A", 4001),  # a trailing newline
        ("p%C3%B3s", 4001),  # non-ASCII
        ("", 4001),
        ("pos-1?type=toaster", 4002),
        ("pos-1?type=POS", 4002),
        ("pos-1?encoding=xml", 4006),
        ("pos-1?since=-1", 4006),
        ("pos-1?since=abc", 4006),
        ("pos-1?store_id=bad%20store", 4006),
    ],
)
async def test_bad_handshake_is_closed(server: RunningServer, path: str, code: int) -> None:
    assert await handshake_close(server, path) == code
    assert len(server.worker.hub) == 0


async def test_longest_valid_terminal_id_is_accepted(server: RunningServer) -> None:
    terminal_id = "A-z0.9_:" * 8
    assert len(terminal_id) == 64
    async with server.terminal(terminal_id) as terminal:
        assert terminal.established["terminal_id"] == terminal_id


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_subprotocol_negotiates_the_encoding(server: RunningServer, encoding: str) -> None:
    async with websockets.connect(
        f"{server.url}/pos-1?store_id=s1", subprotocols=[f"chefia.v1.{encoding}"]
    ) as ws:
        assert ws.subprotocol == f"chefia.v1.{encoding}"
        frame = await asyncio.wait_for(ws.recv(), 5)
        if encoding == "msgpack":
            assert isinstance(frame, bytes)
            greeting = msgpack.unpackb(frame)
        else:
            assert isinstance(frame, str)
            greeting = json.loads(frame)
        assert greeting["type"] == "connection_established"
        assert greeting["encoding"] == encoding
        # Incoming frames are decoded by frame type whatever was negotiated.
        await ws.send(json.dumps({"type": "ping", "timestamp": 3}))
        pong = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(pong, bytes if encoding == "msgpack" else str)


async def test_unknown_subprotocol_falls_back_to_json(server: RunningServer) -> None:
    async with websockets.connect(
        f"{server.url}/pos-1", subprotocols=["chefia.v9.xml", "chefia.v1.msgpack"]
    ) as ws:
        assert ws.subprotocol == "chefia.v1.msgpack"
    async with websockets.connect(f"{server.url}/pos-2", subprotocols=["graphql-ws"]) as ws2:
        assert ws2.subprotocol is None
        assert isinstance(await asyncio.wait_for(ws2.recv(), 5), str)


# ---- idle timeout -----------------------------------------------------------------------------


class RawClient:
    """A WebSocket client done by hand on a TCP socket: it never answers pings."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, path: str, receive_buffer: int | None = None) -> RawClient:
        """Open the WebSocket; `receive_buffer` shrinks the kernel's, so that a client reading
        nothing soon leaves the server's sends stuck."""
        sock = socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame from the server (servers do not mask)."""
        b0, b1 = await self.reader.readexactly(2)
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return b0 & 0x0F, await self.reader.readexactly(length)

    def send_text(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        assert len(payload) < 126
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def close(self) -> None:
        self.writer.close()


async def test_silent_connection_is_closed_after_the_timeout(tmp_path: Path) -> None:
    async with running_server(
        tmp_path, ws_connection_timeout=1, ws_heartbeat_interval=0.3
    ) as server:
        client = await RawClient.connect(server.port, "/ws/raw-1?store_id=s1")
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            pings = 0
            async with asyncio.timeout(DEFAULT_TIMEOUT):  # a hang guard
                while True:
                    opcode, payload = await client.frame()
                    if opcode == 0x9:
                        pings += 1  # never answered
                    elif opcode == 0x8:
                        code = struct.unpack("!H", payload[:2])[0]
                        break
            elapsed = loop.time() - started
            # How many pings fit in the timeout depends on the machine's load; that the server
            # sends them is what test_client_answering_pings_stays_open_past_the_timeout needs.
            print(f"{pings} pings before the close")
            assert code == 1001
            assert elapsed >= 1.0, elapsed  # not before the timeout
            client.close()  # a peer that is really gone; the server then forgets it at once
            await eventually(lambda: len(server.worker.hub) == 0)
        finally:
            client.close()


async def test_raw_client_sending_frames_is_not_idle(tmp_path: Path) -> None:
    async with running_server(
        tmp_path, ws_connection_timeout=1, ws_heartbeat_interval=0.3
    ) as server:
        client = await RawClient.connect(server.port, "/ws/raw-1?store_id=s1")
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 2.0
            while loop.time() < deadline:
                client.send_text('{"type":"ping"}')
                async with asyncio.timeout(DEFAULT_TIMEOUT):  # a hang guard
                    while True:
                        opcode, payload = await client.frame()
                        assert opcode != 0x8, f"closed: {payload!r}"
                        if opcode == 0x1 and b'"pong"' in payload:
                            break
                await asyncio.sleep(0.2)
        finally:
            client.close()


async def test_client_answering_pings_stays_open_past_the_timeout(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, ws_connection_timeout=1, ws_heartbeat_interval=0.3) as server,
        server.terminal("pos-1") as terminal,
    ):
        assert terminal.established["heartbeat_interval"] == 0.3
        await terminal.silent_for(2.0)  # protocol pings are answered by the client library
        await still_usable(terminal)


async def test_stuck_reader_with_a_full_socket_is_closed_after_the_timeout(
    tmp_path: Path,
) -> None:
    """A terminal that stopped reading once the server's socket buffer filled, in a store that
    then goes quiet: nothing overflows its queue, so only the heartbeat can notice it."""
    async with running_server(
        tmp_path, ws_connection_timeout=5, ws_heartbeat_interval=0.3
    ) as server:
        client = await RawClient.connect(server.port, "/ws/stuck-1?store_id=s1", 4096)
        # From here on the client reads nothing (its pongs would come from reading). Until the
        # socket is full it sends a frame at every step, so that the timeout counts from the
        # end of the setup, however long a loaded machine takes for it; then it goes silent.
        try:
            async with server.terminal("pos-1") as pos:
                session = server.worker.hub.get("s1", "stuck-1")
                assert session is not None
                pad = "q" * 16_000
                for i in range(100):  # 1.6 MB: more than the sockets hold, less than the queue
                    client.send_text('{"type":"ping"}')
                    await pos.send(op(f"op-{i}", f"t{i}", {"pad": pad}))
                for _ in range(100):
                    client.send_text('{"type":"ping"}')
                    await pos.expect("sync_confirmation")
                assert not session.closed, "closed for overflowing its queue; send less"
                await eventually(
                    lambda: server.worker.hub.get("s1", "stuck-1") is None,
                    what="the silent terminal closed by the heartbeat",
                )
                assert session.close_code == 1001
        finally:
            client.close()


async def test_a_reader_that_stalls_its_catch_up_is_closed_1013(tmp_path: Path) -> None:
    """A terminal resuming far behind that reads nothing: its catch-up waits for room, where a
    live stream's queue would overflow. It is closed 1013 after WS_STALL_TIMEOUT, not kept
    connected and stale for as long as it answers pings (seen in the reliability suite)."""
    async with running_server(
        tmp_path,
        ws_message_queue_size=20,
        ws_stall_timeout=0.5,
        ws_send_buffer=4096,
        ws_connection_timeout=60,
    ) as server:
        async with server.terminal("pos-1") as pos:
            pad = "s" * 16_000
            for i in range(60):  # ~1 MB behind: more than sockets and queue hold
                await pos.send(op(f"op-{i}", f"t{i}", {"pad": pad}))
            for _ in range(60):
                await pos.expect("sync_confirmation")
        client = await RawClient.connect(server.port, "/ws/stuck-2?store_id=s1&since=0", 4096)
        try:
            await eventually(lambda: server.worker.hub.get("s1", "stuck-2") is not None)
            session = server.worker.hub.get("s1", "stuck-2")
            assert session is not None
            # From here on it reads nothing. Liveness bound, not a timing: 0.5 s of stall, then
            # the bounded close.
            await eventually(lambda: server.worker.hub.get("s1", "stuck-2") is None)
            assert session.close_code == 1013
        finally:
            client.close()


async def test_a_terminal_replacing_its_own_connection_is_let_in_at_capacity(
    tmp_path: Path,
) -> None:
    async with running_server(tmp_path, max_ws_connections=1) as server:
        first = await server.connect("pos-1")
        second = await server.connect("pos-1")  # the takeover takes no new slot
        await asyncio.wait_for(first.ws.wait_closed(), 5)
        assert first.ws.close_code == 4004
        assert second.established["terminal_id"] == "pos-1"
        await second.close()


async def test_an_unexpected_error_costs_one_answer_not_the_connection(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.worker.sessions, "snapshot", broken)
    async with server.terminal("pos-1") as terminal:
        await terminal.send({"type": "snapshot_request"})
        error = await terminal.expect("error")
        assert error["code"] == 1011
        await terminal.send({"type": "ping"})
        await terminal.expect("pong")

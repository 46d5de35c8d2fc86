"""Wire-level edges where the WebSocket front ends (WS_TRANSPORT) could differ: fragmented
messages, invalid text, frames that arrive with the handshake, the closing handshake, pings, and
the HTTP side of the same port. Each runs on both front ends (tests/e2e/conftest.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import struct
from pathlib import Path

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.helpers import (
    DEFAULT_TIMEOUT,
    RunningServer,
    closed_with,
    eventually,
    http_get,
    running_server,
    still_usable,
)


async def test_the_configured_transport_serves(server: RunningServer, transport: str) -> None:
    assert server.server.transport_name == transport
    assert server.settings.ws_transport == transport


async def test_a_fragmented_message_is_joined(server: RunningServer) -> None:
    async with server.terminal("pos-1") as terminal:
        message = json.dumps({"type": "ping", "timestamp": 7})
        await terminal.ws.send([message[:5], message[5:12], message[12:]])
        assert (await terminal.expect("pong"))["timestamp"] == 7
        await still_usable(terminal)


async def test_a_fragmented_message_over_the_limit_closes_1009(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, max_ws_message_size=4096) as server,
        server.terminal("pos-1") as terminal,
    ):
        # Each fragment fits; the message does not.
        message = json.dumps({"type": "ping", "pad": "x" * 6000})
        await terminal.ws.send([message[:3000], message[3000:]])
        assert await closed_with(terminal) == 1009


async def test_a_client_breaking_the_protocol_is_no_server_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An oversized frame is the client's fault: closed 1009, and no ERROR line in the server's
    log (alerts watch for those)."""
    with caplog.at_level(logging.INFO):
        async with (
            running_server(tmp_path, max_ws_message_size=4096) as server,
            server.terminal("pos-1") as terminal,
        ):
            await terminal.ws.send(json.dumps({"type": "ping", "pad": "x" * 5000}))
            assert await closed_with(terminal) == 1009
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_invalid_utf8_in_a_text_frame_closes_1007(server: RunningServer) -> None:
    async with server.terminal("pos-1") as terminal:
        # A text frame whose payload is not UTF-8, written under the client library.
        terminal.ws.transport.write(_masked_frame(0x1, b'{"type": "ping", "x": "\xff"}'))
        assert await closed_with(terminal) == 1007


async def test_the_peer_close_is_answered_with_its_code(server: RunningServer) -> None:
    terminal = await server.connect("pos-1")
    await terminal.ws.close(4321, "bye")
    assert terminal.ws.protocol.close_rcvd is not None
    assert terminal.ws.protocol.close_rcvd.code == 4321
    await eventually(lambda: not len(server.worker.hub), what="the session gone")


async def test_protocol_pings_are_answered_and_keep_a_terminal_alive(tmp_path: Path) -> None:
    """The heartbeat pings each connection; a client library that answers pongs stays past
    WS_CONNECTION_TIMEOUT, and its own pings are answered. (Only time passing can show a
    timeout that does not fire: 2 s, ten times the ping interval, so that a loaded machine's
    stalls between a ping and its pong stay far inside it.)"""
    async with (
        running_server(tmp_path, ws_heartbeat_interval=0.2, ws_connection_timeout=2) as server,
        server.terminal("pos-1") as terminal,
    ):
        for _ in range(9):
            latency = await asyncio.wait_for(await terminal.ws.ping(), DEFAULT_TIMEOUT)
            assert latency >= 0
            await asyncio.sleep(0.3)
        await still_usable(terminal)


async def test_frames_sent_with_the_handshake_are_served(server: RunningServer) -> None:
    """A client may write its first frames right behind the upgrade request, in one segment."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws/pos-1?store_id=s1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        ping = json.dumps({"type": "ping", "timestamp": 99}).encode()
        writer.write(request + _masked_frame(0x1, ping))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        kinds = []
        while "pong" not in kinds:
            payload = await asyncio.wait_for(_read_frame(reader), 5)
            kinds.append(json.loads(payload)["type"])
        assert kinds == ["connection_established", "pong"]
    finally:
        writer.close()


async def test_http_and_websocket_share_the_port(server: RunningServer) -> None:
    async with server.terminal("pos-1") as terminal:
        for path, status in [
            ("/health", 200),
            ("/ws/stats", 200),
            ("/metrics", 200),
            ("/monitor", 200),
            ("/api/v1/entities/tables?store_id=s1", 200),
            ("/nowhere", 404),
        ]:
            got, _, _ = await http_get(server.http + path)
            assert got == status, path
        await still_usable(terminal)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 70_000 + b"\r\n\r\n",
        b"NOT HTTP\r\n\r\n",
        b"GET /ws/pos-1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",  # no key
    ],
    ids=["body", "huge-head", "not-http", "no-key"],
)
async def test_a_bad_request_is_refused_and_the_server_serves_on(
    server: RunningServer, raw: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    # websockets drops some of these without an answer; picows' gate answers 400.
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:100]
    status, _, _ = await http_get(server.http + "/health")
    assert status == 200


async def test_a_plain_request_to_the_websocket_path_is_refused(server: RunningServer) -> None:
    status, _, _ = await http_get(f"{server.http}/ws/pos-1")
    assert status == 404
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(f"ws://127.0.0.1:{server.port}/elsewhere/pos-1")
    assert refused.value.response.status_code == 404


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    if len(payload) < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload))
    else:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, len(payload))
    return header + mask + masked


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
    elif size == 127:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
    assert not second & 0x80, "a server frame is never masked"
    assert first & 0x0F == 0x1, f"expected a text frame, got opcode {first & 0x0F}"
    return await reader.readexactly(size)

"""Test terminals: real WebSocket clients speaking the wire protocol, and a server in-process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import lz4.frame
import msgpack
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from chefia_rt.config import Settings, load_settings
from chefia_rt.gateway import Gateway
from chefia_rt.process import make_server
from chefia_rt.protocol.codec import COMPRESSED_PREFIX
from chefia_rt.protocol.messages import OUTGOING
from chefia_rt.worker import Worker

# How long a test waits for something that must come: a hang guard, never the thing tested. A
# loaded machine (the suite beside a CPU burner, docs/testing.md) may take seconds for what takes
# milliseconds when quiet, so this only ends a test that would otherwise wait forever.
DEFAULT_TIMEOUT = 60.0
T = TypeVar("T")
# Timestamps of the pings `Terminal.nothing` sends, unique in the test process.
_PING_MARKERS = itertools.count(9_000_000_001)
REPOSITORY = Path(__file__).resolve().parent.parent


# Ports handed out by free_port: below the kernel's ephemeral range (32768+), one slice per
# pytest-xdist worker. Picking a port with bind(0) and closing it is not enough when tests run in
# parallel processes: two of them could be handed the same port, and with SO_REUSEPORT (which
# the server sets) both servers would bind it and silently share each other's connections.
_PORTS = (20000, 32000)


def _port_slice() -> range:
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    size = (_PORTS[1] - _PORTS[0]) // count
    start = _PORTS[0] + index * size
    return range(start, start + size)


_port_candidates = itertools.cycle(_port_slice())


def free_port() -> int:
    """A port of 127.0.0.1 free now that no other test of this run is given meanwhile."""
    for _ in range(1000):
        port = next(_port_candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))  # no SO_REUSEPORT: fails while anyone holds it
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in this test worker's range")


# The WebSocket front end (WS_TRANSPORT) of the servers tests start: tests/e2e/conftest.py runs
# the end-to-end tests on each.
TEST_TRANSPORT_ENV = "CHEFIA_TEST_TRANSPORT"


def server_transport() -> str:
    """The WS_TRANSPORT the servers of the running test use."""
    return os.environ.get(TEST_TRANSPORT_ENV, "websockets")


def _http_get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=DEFAULT_TIMEOUT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def http_get(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET with a plain HTTP client on a new connection: (status, headers, body)."""
    return await asyncio.to_thread(_http_get, url, headers or {})


# A benchmark's smoke run on a loaded machine takes what it takes: past this it is hung.
BENCH_HANG_GUARD = 900.0


async def run_bench(module: str, *args: str) -> dict[str, Any]:
    """Run `python -m <module> <args>` from the repository root; the one JSON line it prints."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        cwd=REPOSITORY,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await hang_guarded(proc.communicate(), f"python -m {module}", BENCH_HANG_GUARD)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 1, lines
    result: dict[str, Any] = json.loads(lines[0])
    return result


def decode_server_frame(frame: str | bytes) -> list[dict[str, Any]]:
    """What a client does with a server frame: JSON text, or msgpack (maybe lz4, maybe batched)."""
    if isinstance(frame, str):
        message = json.loads(frame)
        assert isinstance(message, dict), "every JSON frame is one object"
        return [message]
    if frame.startswith(COMPRESSED_PREFIX):
        frame = lz4.frame.decompress(frame[len(COMPRESSED_PREFIX) :])
    message = msgpack.unpackb(frame, raw=False)
    if message.get("type") == "message_batch":
        assert message["count"] == len(message["messages"])
        return list(message["messages"])
    return [message]


def validate(message: dict[str, Any]) -> None:
    """A server message against its model (chefia_rt/protocol/outgoing.py), extra fields
    forbidden: what the server sends drifting from the documented contract fails the test."""
    kind = message.get("type")
    assert isinstance(kind, str) and kind in OUTGOING, f"undocumented server message {message}"
    OUTGOING[kind][0].model_validate(message)


async def eventually(
    condition: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT, what: str = ""
) -> None:
    """Wait until `condition()` holds, polling. `timeout` is a hang guard, not a limit under
    test: tripping it means the condition never came."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"hang guard: not reached in {timeout:g} s: {what or condition}")
        await asyncio.sleep(0.01)


async def hang_guarded(awaitable: Awaitable[T], what: str, timeout: float = DEFAULT_TIMEOUT) -> T:
    """Await something that must end; past `timeout` it is a hang, said as such."""
    try:
        async with asyncio.timeout(timeout):
            return await awaitable
    except TimeoutError:
        raise AssertionError(f"hang guard: {what} not done in {timeout:g} s") from None


async def drain(terminal: Terminal, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
    """Every message until the connection ends (which it must: `timeout` is a hang guard)."""
    messages: list[dict[str, Any]] = []
    with contextlib.suppress(ConnectionClosed):
        await hang_guarded(_read_all(terminal, messages), "the connection's end", timeout)
    return messages


async def _read_all(terminal: Terminal, into: list[dict[str, Any]]) -> None:
    while True:
        into.append(await terminal.recv())


async def closed_with(terminal: Terminal, timeout: float = DEFAULT_TIMEOUT) -> int | None:
    """Read until the server closes the connection; return the close code it sent."""
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await terminal.ws.recv()
    rcvd = terminal.ws.protocol.close_rcvd
    return rcvd.code if rcvd is not None else None


async def still_usable(terminal: Terminal) -> None:
    """The connection answers an application ping."""
    await terminal.send({"type": "ping", "timestamp": 42})
    pong = await terminal.until("pong")
    assert pong["timestamp"] == 42


class Terminal:
    """One connected test terminal. `recv` yields messages one at a time, batches unpacked,
    each validated against its model (`validate`)."""

    def __init__(self, ws: ClientConnection, encoding: str) -> None:
        self.ws = ws
        self.encoding = encoding
        self.frames: list[str | bytes] = []
        self._pending: deque[dict[str, Any]] = deque()
        self.established: dict[str, Any] = {}

    async def send(self, message: dict[str, Any]) -> None:
        if self.encoding == "msgpack":
            await self.ws.send(msgpack.packb(message))
        else:
            await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout):
                while not self._pending:
                    frame = await self.ws.recv()
                    self.frames.append(frame)
                    messages = decode_server_frame(frame)
                    for message in messages:
                        validate(message)
                    self._pending.extend(messages)
                return self._pending.popleft()
        except TimeoutError:
            if timeout < DEFAULT_TIMEOUT:
                raise
            raise TimeoutError(f"hang guard: no message in {timeout:g} s") from None

    async def expect(self, kind: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The next message of type `kind`, failing on anything else first."""
        message = await self.recv(timeout)
        assert message["type"] == kind, f"expected {kind}, got {message}"
        return message

    async def until(self, kind: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Skip messages until one of type `kind` arrives."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.recv(timeout)
                if message["type"] == kind:
                    return message

    async def nothing(self) -> None:
        """Assert that nothing is on its way to this terminal, proven by order rather than by
        waiting: the server answers a ping after everything it queued for the connection before
        (earlier, or in the same frame, since an answer may go ahead of pushes waiting for their
        batch), so the pong must be the next message and the last of its frame. A push still on
        its way from another worker through Redis is not ordered with the pong: there, the push
        of a later operation of the same store is the marker to wait for."""
        marker = next(_PING_MARKERS)
        await self.send({"type": "ping", "timestamp": marker})
        message = await self.recv()
        if message.get("type") != "pong" or message.get("timestamp") != marker:
            raise AssertionError(f"unexpected message {message}")
        if self._pending:
            raise AssertionError(f"unexpected message {self._pending[0]}")

    async def silent_for(self, seconds: float) -> None:
        """Let `seconds` pass and assert that nothing arrived meanwhile: for what only the passing
        of time can show (a timeout that must not fire)."""
        try:
            message = await self.recv(seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message {message}")

    async def close(self) -> None:
        await self.ws.close()


def op(
    op_id: str,
    entity_id: str,
    data: dict[str, Any] | None = None,
    *,
    entity_type: str = "tables",
    operation: str = "UPDATE",
    version: int = 1,
    timestamp: str = "2024-01-15T10:30:00.000Z",
    **extra: Any,
) -> dict[str, Any]:
    """A data_sync message."""
    return {
        "type": "data_sync",
        "operation": {
            "id": op_id,
            "entity_type": entity_type,
            "entity_id": entity_id,
            "operation": operation,
            "data": data or {},
            "version": version,
            "timestamp": timestamp,
            **extra,
        },
    }


class RunningServer:
    """A server running in this event loop, on a free port, with its own SQLite file."""

    def __init__(self, settings: Settings, server: Gateway) -> None:
        self.settings = settings
        self.server = server
        self.worker = server.worker
        self.port = server.port()
        self.url = f"ws://127.0.0.1:{self.port}{settings.ws_path}"
        self.http = f"http://127.0.0.1:{self.port}"

    @asynccontextmanager
    async def terminal(
        self,
        terminal_id: str,
        *,
        store: str = "s1",
        type: str = "pos",
        encoding: str = "json",
        since: int | None = None,
        greet: bool = True,
        **query: str,
    ) -> AsyncIterator[Terminal]:
        terminal = await self.connect(
            terminal_id,
            store=store,
            type=type,
            encoding=encoding,
            since=since,
            greet=greet,
            **query,
        )
        try:
            yield terminal
        finally:
            await terminal.close()

    async def connect(
        self,
        terminal_id: str,
        *,
        store: str = "s1",
        type: str = "pos",
        encoding: str = "json",
        since: int | None = None,
        greet: bool = True,
        **query: str,
    ) -> Terminal:
        params = {"store_id": store, "type": type, "encoding": encoding, **query}
        if since is not None:
            params["since"] = str(since)
        qs = "&".join(f"{k}={v}" for k, v in params.items())
        ws = await websockets.connect(f"{self.url}/{terminal_id}?{qs}")
        terminal = Terminal(ws, encoding)
        if greet:
            terminal.established = await terminal.expect("connection_established")
        return terminal


@asynccontextmanager
async def running_server(tmp_path: Path, **overrides: Any) -> AsyncIterator[RunningServer]:
    """Start a Worker + Server on 127.0.0.1:<free port> with SQLite under tmp_path."""
    overrides.setdefault("database_url", f"sqlite:///{tmp_path / 'chefia.db'}")
    overrides.setdefault("ws_host", "127.0.0.1")
    overrides.setdefault("ws_port", 0)
    overrides.setdefault("ws_transport", server_transport())
    settings = load_settings(**overrides)
    node = Worker.create(settings)
    await node.start()
    server = make_server(settings, node)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    await server.start(sock)
    try:
        yield RunningServer(settings, server)
    finally:
        await server.shutdown(timeout=5)

"""The `websockets` front end (WS_TRANSPORT=websockets): listening, the HTTP side through
websockets' `process_request`, the upgrade, and each connection handed to the Gateway."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from typing import Any

import websockets
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from chefia_rt.auth import install_log_redaction
from chefia_rt.gateway import CLOSE_TIMEOUT, LISTEN_BACKLOG, Gateway
from chefia_rt.handshake import SUBPROTOCOLS, choose_subprotocol
from chefia_rt.http import handle_http, handle_metrics_port, is_upgrade
from chefia_rt.hub import Session

__all__ = ["LISTEN_BACKLOG", "Server", "WsTransport"]

SERVED_REQUEST = Request("", Headers())  # what a connection keeps of its handshake


class WsTransport:
    """A session's `websockets` connection, written to with frames the hub built once for every
    receiver (hub.Transport), and the Gateway's Link.

    A frame goes whole to the socket in one `transport.write`, as websockets writes its own
    (pings, pongs, close), so frames never interleave; data frames stop once the closing
    handshake started. Back-pressure is websockets' own: the transport's write buffer limits,
    and `drain` waits with websockets' flow control.

    websockets' `close()` first waits for the socket to drain and only then starts its
    close_timeout, so for a terminal that no longer reads (the slow reader closed with 1013, the
    stuck one closed by the heartbeat) it never returns, and the session is never let go: the
    close here is bounded.
    """

    __slots__ = ("_ws",)

    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws

    def write(self, frames: bytes) -> None:
        ws = self._ws
        if ws.protocol.state is not State.OPEN or ws.transport.is_closing():
            raise ConnectionClosedError(None, None)
        ws.transport.write(frames)

    def writable(self) -> bool:
        return not self._ws.paused

    async def drain(self) -> None:
        await self._ws.drain()

    async def close(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(self._ws.close_timeout):
                await self._ws.close(code, reason)
        except TimeoutError:
            self._ws.transport.abort()

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code

    async def recv(self) -> str | bytes | None:
        try:
            return await self._ws.recv()
        except ConnectionClosed:
            return None

    async def ping(self, session: Session) -> None:
        ws = self._ws
        if ws.paused or ws.protocol.state is not State.OPEN or ws.transport.is_closing():
            return
        try:
            pong = asyncio.ensure_future(await ws.ping())
        except ConnectionClosed:
            return
        pong.add_done_callback(functools.partial(_ponged, session))

    def hurry(self, timeout: float) -> None:
        ws = self._ws
        ws.close_timeout = min(ws.close_timeout or timeout, timeout)

    async def linger(self) -> None:
        """After we closed (abuse, rate limit, takeover), drop what the peer still sends.

        websockets stops reading the socket while its queue of unread frames is full, and the
        peer's answering close frame waits behind them: without this a client that pipelined a
        burst (exactly what gets closed for abuse) would hold the closing handshake, and learn
        of the close, only after the close timeout.
        """
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                while True:
                    await self._ws.recv()


def _ponged(session: Session, pong: asyncio.Future[float]) -> None:
    if not pong.cancelled() and pong.exception() is None:
        session.last_seen = time.monotonic()


class Server(Gateway):
    """Serves one worker's WebSocket and HTTP traffic for its Worker, on `websockets`."""

    transport_name = "websockets"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ws_server: WsServer | None = None
        self.metrics_server: WsServer | None = None

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        if not is_upgrade(request):
            return await handle_http(self.worker, request)
        return self.refuse_upgrade(request)

    @staticmethod
    def select_subprotocol(connection: ServerConnection, offered: Any) -> Subprotocol | None:
        chosen = choose_subprotocol(offered)
        return Subprotocol(chosen) if chosen is not None else None

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        request = ws.request
        # Read: the handshake's headers are not kept for the connection's lifetime (websockets
        # needs a request there, not its contents).
        ws.request, ws.response = SERVED_REQUEST, None
        self.limit_send_buffer(ws.transport.get_extra_info("socket"))
        await self.serve(WsTransport(ws), request, ws.subprotocol)

    async def start(self, sock: socket.socket | None = None) -> None:
        install_log_redaction()  # websockets logs request lines (and their ?token=) at DEBUG
        address: dict[str, Any] = (
            {"sock": sock}
            if sock is not None
            else {"host": self.settings.ws_host, "port": self.settings.ws_port, "reuse_port": True}
        )
        self.ws_server = await websockets.serve(
            self.handler,
            subprotocols=[Subprotocol(s) for s in SUBPROTOCOLS],
            select_subprotocol=self.select_subprotocol,
            process_request=self.process_request,
            compression=None,  # msgpack frames carry lz4 of their own; deflate would cost CPU
            server_header=None,
            ping_interval=None,  # our own heartbeat also measures silence
            max_size=self.settings.max_ws_message_size,
            max_queue=64,
            close_timeout=CLOSE_TIMEOUT,
            backlog=LISTEN_BACKLOG,
            **address,
        )
        self._start_heartbeat()

    async def start_metrics(self, port: int) -> None:
        self.metrics_server = await websockets.serve(
            self.handler,  # never reached: every request is answered before an upgrade
            host=self.settings.ws_host,
            port=port,
            reuse_port=True,
            process_request=lambda _, request: handle_metrics_port(self.worker, request),
            server_header=None,
        )

    def connections(self) -> set[Any]:
        return set(self.ws_server.all_connections) if self.ws_server is not None else set()

    def port(self) -> int:
        assert self.ws_server is not None
        return int(self.ws_server.sockets[0].getsockname()[1])

    def _stop_listening(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.ws_server is not None:
            # websockets answers 503 to a handshake that completes once the listener is closed:
            # one already under way still counts as serving until the drain ends.
            self.ws_server.is_serving = lambda: True  # type: ignore[method-assign]
            self.ws_server.server.close()

    async def _close_connections(self, timeout: float) -> None:
        if self.ws_server is None:
            return
        del self.ws_server.is_serving  # websockets' own again: refuse what comes now
        self.ws_server.close(close_connections=True)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT + 0.5):
                await self.ws_server.wait_closed()
        except TimeoutError:
            # websockets starts a connection's close_timeout only once its socket has drained,
            # which a terminal that stopped reading never lets happen: cut those.
            for ws in list(self.ws_server.all_connections):
                ws.transport.abort()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.ws_server.wait_closed()

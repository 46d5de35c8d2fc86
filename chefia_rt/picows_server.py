"""The `picows` front end (WS_TRANSPORT=picows): picows' Cython frame parser under the same
Gateway as the `websockets` front end, and the HTTP side on the same port.

picows answers an HTTP request only from a synchronous callback, with a response made there,
and refuses a request without `Upgrade: websocket`; our HTTP routes (health, metrics, stats, the
monitor, /api/v1) are coroutines. So each new connection starts with a small HTTP gate of ours
(`_Gate`) that reads the request head and parses it with websockets' HTTP/1.1 parser: a plain
request is answered by chefia_rt/http.py and the connection closed, as websockets does; an
upgrade that passes the Gateway's checks (path, origin, connection limit and takeover) is handed
to picows' protocol on the same transport with the bytes read so far, and picows validates the
handshake, answers 101 with the chosen subprotocol and parses every frame from then on.

Frames the hub built once are written to the asyncio transport as they are (hub.Transport);
back-pressure is the transport's pause_writing/resume_writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any, cast

from picows import (
    WSAutoPingStrategy,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in its stubs
from websockets.exceptions import SecurityError
from websockets.http11 import Request, Response
from websockets.streams import StreamReader

from chefia_rt.auth import install_log_redaction
from chefia_rt.gateway import CLOSE_TIMEOUT, LISTEN_BACKLOG, Gateway
from chefia_rt.handshake import choose_subprotocol
from chefia_rt.http import handle_http, handle_metrics_port, is_upgrade, json_response
from chefia_rt.picows_link import PicowsLink

log = logging.getLogger("chefia_rt.server")

# A request head larger than this is refused (websockets' own limits: 8 KiB a line, 128 headers).
MAX_HEAD = 64 * 1024
OPEN_TIMEOUT = 10.0  # seconds for a new connection to send its request head (websockets' default)
# picows' read buffer of a connection starts this small (it doubles when a frame needs more): an
# idle terminal holds little memory.
READ_BUFFER = 2048


class _PicowsLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows' log of our connections. A frame that breaks the protocol or MAX_WS_MESSAGE_SIZE is
    the client's fault, answered with its close code: logged at INFO, as websockets does, not as
    an error of the server (picows logs it at ERROR)."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level == logging.ERROR and isinstance(msg, str) and msg.startswith("WS parser error"):
            level = logging.INFO
        super().log(level, msg, *args, **kwargs)


def parse_request(head: bytes) -> Request:
    """A whole request head (up to its blank line) as websockets' Request; ValueError (and the
    parser's own errors) for anything else."""
    reader = StreamReader()
    reader.feed_data(head)
    reader.feed_eof()
    parser = Request.parse(reader.read_line)
    try:
        next(parser)
    except StopIteration as done:
        request: Request = done.value
        return request
    raise ValueError("incomplete HTTP request")


class _Gate(asyncio.Protocol):
    """A new connection until its HTTP request head has come (see the module's docstring)."""

    __slots__ = ("_buffer", "_done", "_front", "_metrics_only", "_timer", "_transport")

    def __init__(self, front: PicowsServer, metrics_only: bool) -> None:
        self._front = front
        self._metrics_only = metrics_only
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is none of asyncio's
        self._timer = asyncio.get_running_loop().call_later(OPEN_TIMEOUT, self._transport.abort)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 and len(self._buffer) <= MAX_HEAD:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        transport = self._transport
        assert transport is not None
        transport.pause_reading()
        if end < 0:
            self._front.answer(transport, json_response(400, {"error": "request head too large"}))
            return
        self._front.accept(transport, bytes(self._buffer), end + 4, self._metrics_only)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


class PicowsServer(Gateway):
    """Serves one worker's WebSocket and HTTP traffic for its Worker, on `picows`."""

    transport_name = "picows"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ws_server: asyncio.Server | None = None
        self.metrics_server: asyncio.Server | None = None
        self.links: set[PicowsLink] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        # picows' own lines (each connection accepted, each disconnect) at INFO would be a line
        # per terminal event; with an adapter picows makes no logger per connection either.
        picows_log = logging.getLogger("picows.server")
        if picows_log.level == logging.NOTSET:
            picows_log.setLevel(logging.WARNING)
        self._picows_log = _PicowsLog(picows_log)

    # ---- tasks -----------------------------------------------------------------------------

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def serving(self, link: PicowsLink, coro: Any) -> None:
        self.links.add(link)
        self.spawn(coro)

    # ---- the HTTP gate ---------------------------------------------------------------------

    def answer(self, transport: asyncio.Transport, response: Response) -> None:
        """Send a whole HTTP response and close the connection."""
        if transport.is_closing():
            return
        if "Connection" not in response.headers:
            response.headers["Connection"] = "close"
        transport.write(response.serialize())
        transport.close()

    def accept(
        self, transport: asyncio.Transport, data: bytes, head: int, metrics_only: bool
    ) -> None:
        try:
            request = parse_request(data[:head])
        except (EOFError, SecurityError, ValueError, NotImplementedError) as exc:
            self.answer(transport, json_response(400, {"error": f"invalid HTTP request: {exc}"}))
            return
        if metrics_only:
            self.spawn(self._http(transport, handle_metrics_port(self.worker, request)))
        elif not is_upgrade(request):
            self.spawn(self._http(transport, handle_http(self.worker, request)))
        else:
            self._upgrade(transport, request, data)

    async def _http(self, transport: asyncio.Transport, answer: Any) -> None:
        try:
            response = await answer
        except Exception:
            log.exception("HTTP request failed")
            response = json_response(500, {"error": "internal error"})
        self.answer(transport, response)

    def _upgrade(self, transport: asyncio.Transport, request: Request, data: bytes) -> None:
        refusal = self.refuse_upgrade(request)
        if refusal is None and self._closing:
            refusal = json_response(503, {"error": "shutting down"}, {"Retry-After": "5"})
        if refusal is not None:
            self.answer(transport, refusal)
            return
        offered = [
            name.strip()
            for value in request.headers.get_all("Sec-WebSocket-Protocol")
            for name in value.split(",")
        ]
        subprotocol = choose_subprotocol(offered)
        link = PicowsLink(self, request, subprotocol)
        self.opening += 1  # until its session is registered (Gateway.serve)
        extra = {"Sec-WebSocket-Protocol": subprotocol} if subprotocol else None

        def listener(_: Any) -> WSUpgradeResponseWithListener:
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(extra), link)

        protocol = WSProtocol(
            None,  # host and port: a client's
            None,  # path: a client's
            False,  # the server side
            listener,
            self._picows_log,
            True,  # a bug in a callback closes the connection (1011)
            None,  # handshake timeout: the gate's, already past
            False,  # picows' auto ping: the Gateway's heartbeat pings
            20.0,
            20.0,
            WSAutoPingStrategy.PING_WHEN_IDLE,
            True,  # pongs answered by picows
            self.settings.max_ws_message_size,  # over it: close 1009
            None,  # extra headers: a client's
            READ_BUFFER,
        )
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        # What the gate read (the request head and anything after it) goes to picows as if it
        # had just come from the socket.
        view = memoryview(data)
        while view:
            room = protocol.get_buffer(len(view))
            size = min(len(room), len(view))
            room[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]
        if link.ws is None:
            self.opening -= 1  # picows refused the handshake: it never becomes a connection
        if not transport.is_closing():
            transport.resume_reading()

    # ---- serving ---------------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> None:
        install_log_redaction()
        loop = asyncio.get_running_loop()
        if sock is not None:
            self.ws_server = await loop.create_server(
                lambda: _Gate(self, False), sock=sock, backlog=LISTEN_BACKLOG
            )
        else:
            self.ws_server = await loop.create_server(
                lambda: _Gate(self, False),
                host=self.settings.ws_host,
                port=self.settings.ws_port,
                reuse_port=True,
                backlog=LISTEN_BACKLOG,
            )
        self._start_heartbeat()

    async def start_metrics(self, port: int) -> None:
        self.metrics_server = await asyncio.get_running_loop().create_server(
            lambda: _Gate(self, True), host=self.settings.ws_host, port=port, reuse_port=True
        )

    def connections(self) -> set[Any]:
        return set(self.links)

    def port(self) -> int:
        assert self.ws_server is not None
        return int(self.ws_server.sockets[0].getsockname()[1])

    def _stop_listening(self) -> None:
        for server in (self.metrics_server, self.ws_server):
            if server is not None:
                server.close()

    async def _close_connections(self, timeout: float) -> None:
        self._closing = True
        links = list(self.links)
        closes = [asyncio.ensure_future(link.close(1001, "server shutting down")) for link in links]
        if closes:
            # Each close is bounded by the close timeout (then the connection is cut).
            await asyncio.wait(closes, timeout=CLOSE_TIMEOUT + 0.5)
        for link in links:
            if link.transport is not None and not link._lost:
                link.transport.abort()
        tasks = list(self._tasks)
        if tasks:
            # The connections' serve tasks end once their connection is gone; HTTP answers in
            # flight finish.
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*pending, return_exceptions=True)

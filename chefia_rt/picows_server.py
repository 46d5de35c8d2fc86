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
import time
from collections import deque
from typing import Any, cast

from picows import (
    WSAutoPingStrategy,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in its stubs
from websockets.exceptions import SecurityError
from websockets.http11 import Request, Response
from websockets.streams import StreamReader

from chefia_rt.auth import install_log_redaction
from chefia_rt.errors import Code
from chefia_rt.gateway import CLOSE_TIMEOUT, LISTEN_BACKLOG, Gateway, choose_subprotocol
from chefia_rt.http import handle_http, handle_metrics_port, is_upgrade, json_response
from chefia_rt.hub import Session

log = logging.getLogger("chefia_rt.server")

# A request head larger than this is refused (websockets' own limits: 8 KiB a line, 128 headers).
MAX_HEAD = 64 * 1024
OPEN_TIMEOUT = 10.0  # seconds for a new connection to send its request head (websockets' default)
# Data messages received and not yet served before the socket is no longer read (websockets'
# max_queue of the other front end): a terminal that pipelines more waits in its own buffers.
MAX_QUEUE = 64
# picows' read buffer of a connection starts this small (it doubles when a frame needs more): an
# idle terminal holds little memory.
READ_BUFFER = 2048
PROTOCOL_ERROR = 1002  # close codes of RFC 6455 that websockets sends itself
INVALID_DATA = 1007
_DATA = (WSMsgType.TEXT, WSMsgType.BINARY)


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


class PicowsLink(WSListener):
    """One upgraded connection: picows calls it with every frame; the Gateway reads its data
    messages (`recv`) and writes the hub's frames to it (hub.Transport, Gateway's Link)."""

    __slots__ = (
        "_close_timeout",
        "_drained",
        "_ending",
        "_fragments",
        "_fragments_text",
        "_frames",
        "_front",
        "_lost",
        "_peer_code",
        "_reading_paused",
        "_request",
        "_session",
        "_subprotocol",
        "_waiter",
        "_write_paused",
        "transport",
        "ws",
    )

    def __init__(self, front: PicowsServer, request: Request, subprotocol: str | None) -> None:
        super().__init__()
        self._front = front
        self._request: Request | None = request
        self._subprotocol = subprotocol
        self.ws: WSTransport | None = None
        self.transport: asyncio.Transport | None = None
        self._frames: deque[str | bytes] | None = None  # until a message comes
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._ending = False  # no more messages: a close frame came or went, or the socket died
        self._lost = False
        self._close_timeout = CLOSE_TIMEOUT
        self._session: Session | None = None
        self._peer_code: int | None = None
        self._fragments: list[bytes] | None = None
        self._fragments_text = False

    # ---- picows' callbacks -----------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.ws = transport
        self.transport = transport.underlying_transport
        # picows keeps the handshake for the connection's lifetime; ours was parsed by the gate.
        transport.request.headers.clear()
        transport.response.headers.clear()
        front = self._front
        front.limit_send_buffer(self.transport.get_extra_info("socket"))
        request, self._request = self._request, None
        assert request is not None
        front.serving(self, front.serve(self, request, self._subprotocol, opening=True))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind in _DATA:
            if self._fragments is not None:
                self._fail(PROTOCOL_ERROR, "a new message inside a fragmented one")
            elif frame.fin:
                self._message(frame, kind is WSMsgType.TEXT, None)
            else:
                self._fragments = [frame.get_payload_as_bytes()]
                self._fragments_text = kind is WSMsgType.TEXT
        elif kind is WSMsgType.CONTINUATION:
            self._continuation(frame)
        elif kind is WSMsgType.PONG:
            if self._session is not None:
                self._session.last_seen = time.monotonic()
        elif kind is WSMsgType.CLOSE:
            self._peer_closed(transport, frame)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._lost = True
        self._end()
        self._resume_writers()
        self._front.links.discard(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume_writers()

    # ---- receiving -------------------------------------------------------------------------

    def _message(self, frame: WSFrame, text: bool, joined: bytes | None) -> None:
        if self._ending:
            return  # after a close: dropped, as the other front end does
        if text:
            try:
                data: str | bytes = (
                    frame.get_payload_as_utf8_text() if joined is None else joined.decode()
                )
            except UnicodeDecodeError:
                self._fail(INVALID_DATA, "invalid UTF-8 in a text message")
                return
        else:
            data = frame.get_payload_as_bytes() if joined is None else joined
        frames = self._frames
        if frames is None:
            frames = self._frames = deque()
        frames.append(data)
        self._wake()
        if len(frames) >= MAX_QUEUE and not self._reading_paused:
            assert self.transport is not None
            self._reading_paused = True
            self.transport.pause_reading()

    def _continuation(self, frame: WSFrame) -> None:
        fragments = self._fragments
        if fragments is None:
            self._fail(PROTOCOL_ERROR, "a continuation without a message")
            return
        fragments.append(frame.get_payload_as_bytes())
        if sum(len(f) for f in fragments) > self._front.settings.max_ws_message_size:
            self._fragments = None
            self._fail(Code.MESSAGE_TOO_BIG, "message too big")
            return
        if frame.fin:
            self._fragments = None
            self._message(frame, self._fragments_text, b"".join(fragments))

    def _peer_closed(self, transport: WSTransport, frame: WSFrame) -> None:
        """The peer's close frame: answer it with its code (unless ours went first) and close
        the TCP connection, the server's part of the closing handshake."""
        self._end()
        payload = frame.get_payload_as_bytes()
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        self._peer_code = code
        if not transport.is_close_frame_sent:
            # 1005: the peer's frame had no code, and so has none to send back; 1000 goes.
            transport.send_close(code if code != 1005 else 1000)  # type: ignore[arg-type]
        transport.disconnect()

    def _fail(self, code: int, reason: str) -> None:
        self._end()
        self._front.spawn(self.close(code, reason))

    def _end(self) -> None:
        self._ending = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # ---- the Gateway's Link ----------------------------------------------------------------

    @property
    def close_code(self) -> int | None:
        if not self._lost:
            return None
        return self._peer_code if self._peer_code is not None else 1006

    async def recv(self) -> str | bytes | None:
        while not self._frames:
            if self._ending:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        frames = self._frames
        data = frames.popleft()
        if self._reading_paused and len(frames) <= MAX_QUEUE // 4:
            assert self.transport is not None
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def ping(self, session: Session) -> None:
        self._session = session
        ws = self.ws
        if self._write_paused or self._ending or ws is None or ws.is_close_frame_sent:
            return
        ws.send_ping()

    def hurry(self, timeout: float) -> None:
        self._close_timeout = min(self._close_timeout, timeout)

    async def linger(self) -> None:
        """Nothing to wait for: what the peer still sends is dropped (`_message`), and the
        reading goes on so that its close frame is read."""
        self._frames = None
        self._ending = True
        if self._reading_paused and self.transport is not None and not self._lost:
            self._reading_paused = False
            self.transport.resume_reading()

    # ---- hub.Transport ---------------------------------------------------------------------

    def write(self, frames: bytes) -> None:
        ws, transport = self.ws, self.transport
        if (
            self._ending
            or ws is None
            or transport is None
            or ws.is_close_frame_sent
            or transport.is_closing()
        ):
            raise ConnectionError("the connection is closing")
        transport.write(frames)

    def writable(self) -> bool:
        return not self._write_paused

    async def drain(self) -> None:
        while self._write_paused and not self._lost:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def _resume_writers(self) -> None:
        drained = self._drained
        if drained is not None:
            self._drained = None
            if not drained.done():
                drained.set_result(None)

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame and wait (at most the close timeout, websockets' CLOSE_TIMEOUT)
        for the peer's answer; then the TCP connection is closed, or cut when none came."""
        ws, transport = self.ws, self.transport
        self._end()
        if ws is None or transport is None or self._lost:
            return
        if not ws.is_close_frame_sent:
            ws.send_close(code, reason.encode()[:123])  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(self._close_timeout):
                await ws.wait_disconnected()
        except TimeoutError:
            transport.abort()


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
    """Serves one worker's WebSocket and HTTP traffic for a Node, on `picows`."""

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
            self.spawn(self._http(transport, handle_metrics_port(self.node, request)))
        elif not is_upgrade(request):
            self.spawn(self._http(transport, handle_http(self.node, request)))
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

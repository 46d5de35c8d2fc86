"""One WebSocket connection on picows: its frames in, the hub's prebuilt frames out, and the
close handshake (hub.Transport and gateway.Link over picows' WSListener)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from picows import (
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
)
from websockets.http11 import Request

from chefia_rt.errors import Code
from chefia_rt.gateway import CLOSE_TIMEOUT
from chefia_rt.hub import Session

log = logging.getLogger("chefia_rt.server")

if TYPE_CHECKING:
    from chefia_rt.picows_server import PicowsServer

# Data messages received and not yet served before the socket is no longer read (websockets'
# max_queue of the other front end): a terminal that pipelines more waits in its own buffers.
MAX_QUEUE = 64
PROTOCOL_ERROR = 1002  # close codes of RFC 6455 that websockets sends itself
INVALID_DATA = 1007
_DATA = (WSMsgType.TEXT, WSMsgType.BINARY)


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

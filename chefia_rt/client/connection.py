"""One WebSocket connection of the terminal client, from connecting until it closes.

Three tasks share it and end together: reading (each message goes to the bookkeeping, `core.py`,
while the application has room for events), sending (what the bookkeeping says is next, woken by
`wake`) and ticking (the state file, due resends, and a restart when the bookkeeping asks for one).
The client (`client.py`) makes one Connection an attempt, and reconnects when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from chefia_rt.client.core import ClientCore
from chefia_rt.errors import InvalidMessage, MessageTooBig
from chefia_rt.protocol.codec import decode_frame

log = logging.getLogger("chefia_rt.client")

TICK = 0.1  # seconds between checks for due resends and stuck gaps


@dataclass(frozen=True, slots=True)
class Limits:
    """How long a connection waits and how much it takes (the Client's arguments)."""

    connect_timeout: float
    answer_timeout: float
    keepalive: float
    max_message_size: int
    # Caps the socket's kernel receive buffer (SO_RCVBUF). Linux grows it up to tens of MB
    # for a fast stream; then an application that stops taking events reaches the server
    # (closed 1013, resumed) only after all that is filled.
    receive_buffer: int | None


class Connection:
    """One attempt to connect, and the connection it opens (see the module doc)."""

    def __init__(
        self,
        core: ClientCore,
        limits: Limits,
        *,
        wake: asyncio.Event,
        room: Callable[[], Awaitable[None]],
        save: Callable[[], None],
        greeted: Callable[[dict[str, Any]], None],
    ) -> None:
        self.core = core
        self.limits = limits
        self.name = core.terminal_id
        self.ws: ClientConnection | None = None  # once open
        self._wake = wake  # set when the bookkeeping has something to send
        self._room = room  # returns once the application has room for more events
        self._save = save  # writes the state file
        self._greeted = greeted  # gets the server's greeting

    @property
    def close_code(self) -> int | None:
        """The code of the server's close frame (None: none came)."""
        closed = self.ws.protocol.close_rcvd if self.ws is not None else None
        return closed.code if closed is not None else None

    async def run(self, url: str, token: str | None) -> float | None:
        """Connect and serve the connection until it ends. Returns when it was established
        (None if it never was); a failure to connect is logged, not raised."""
        limits = self.limits
        headers = {"Authorization": f"Bearer {token}"} if token else None
        started: float | None = None
        try:
            async with connect(
                url,
                additional_headers=headers,
                open_timeout=limits.connect_timeout,
                ping_interval=limits.keepalive,
                ping_timeout=limits.keepalive,
                close_timeout=2.0,
                max_size=limits.max_message_size,
                compression=None,
            ) as ws:
                self.ws = ws
                if limits.receive_buffer is not None:
                    sock = ws.transport.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, limits.receive_buffer)
                started = await self._serve(ws)
        except (OSError, InvalidHandshake, TimeoutError, ConnectionClosed) as exc:
            log.info("%s: connection to %s failed: %s", self.name, url, exc)
        return started

    async def _serve(self, ws: ClientConnection) -> float | None:
        """Greet, resend what is unanswered, then read until the connection closes."""
        async with asyncio.timeout(self.limits.connect_timeout):
            first = await self._recv_messages(ws)
        established = time.monotonic()
        if not first or not self.core.established(first[0], established):
            return None
        self._greeted(first[0])
        self._wake.set()
        for message in first[1:]:
            self.core.handle(message, time.monotonic())
        # Reading, sending and the timers end together: when one of them stops (the connection
        # closed, a send timed out, a gap did not fill, or a bug), the connection starts over.
        tasks = [
            asyncio.create_task(self._read_loop(ws), name=f"client-read:{self.name}"),
            asyncio.create_task(self._send_loop(ws), name=f"client-send:{self.name}"),
            asyncio.create_task(self._tick_loop(ws), name=f"client-tick:{self.name}"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and (exc := task.exception()) is not None:
                    log.error("%s: %s failed: %r", self.name, task.get_name(), exc, exc_info=exc)
            if not tasks[0].done():
                # Answers already received are still read, until the closing handshake ends.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.limits.connect_timeout):
                        await ws.close()
                        await asyncio.wait(tasks[:1])
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return established

    async def _recv_messages(self, ws: ClientConnection) -> list[dict[str, Any]]:
        frame = await ws.recv()
        try:
            return decode_frame(frame, self.limits.max_message_size)
        except (InvalidMessage, MessageTooBig) as exc:
            # The server never sends this: something in between is broken. Start over.
            log.warning("%s: undecodable frame from the server: %s", self.name, exc)
            await ws.close(1002, "undecodable frame")
            raise ConnectionClosed(None, None) from None

    async def _read_loop(self, ws: ClientConnection) -> None:
        while True:
            # Backpressure: an application that does not take its events stops the reading
            # (the server then closes this terminal as a slow reader, and it resumes later).
            await self._room()
            try:
                messages = await self._recv_messages(ws)
            except ConnectionClosed:
                return
            for message in messages:
                self.core.handle(message, time.monotonic())

    async def _send_loop(self, ws: ClientConnection) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.core.has_to_send():
                frames = self.core.next_frames(time.monotonic())
                try:
                    async with asyncio.timeout(self.limits.answer_timeout):
                        for frame in frames:
                            await ws.send(frame)
                except TimeoutError:
                    # The server takes nothing: treat the connection as dead and start over.
                    await ws.close(1001, "send timed out")
                    return
                except ConnectionClosed:
                    return

    async def _tick_loop(self, ws: ClientConnection) -> None:
        """Write the state file, resend what is due, and start over when the bookkeeping says
        so (a gap in the stream that does not fill, a refused snapshot)."""
        while True:
            await asyncio.sleep(TICK)
            self._save()
            restart = self.core.tick(time.monotonic())
            if restart is not None:
                await ws.close(1000, restart)
                return

"""The terminal client: `Client`, one terminal kept connected across faults (connect, serve the
connection until it ends, back off, connect again) and the application's side (`send`, `events`,
`close`). What it promises is in the package doc (`chefia_rt.client`); one connection's reading,
sending and timers are `connection.py`, the bookkeeping behind them, without I/O, `core.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode

from websockets.exceptions import ConnectionClosed

from chefia_rt.client.connection import Connection, Limits
from chefia_rt.client.core import ClientCore
from chefia_rt.client.model import (
    Answer,
    Backoff,
    ClientStats,
    ClientStopped,
    Event,
    Reconnects,
    utc_timestamp,
)
from chefia_rt.client.state import ClientState

log = logging.getLogger("chefia_rt.client")


class Events:
    """The events the application has not taken yet, at most `size`: a connection's reader
    waits for room (`room`), the application's `Client.events` for an event (`wait`)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._queue: deque[Event] = deque()
        self._changed = asyncio.Event()  # an event came or went, or the client stopped

    def put(self, event: Event) -> None:
        self._queue.append(event)
        self._changed.set()

    def take(self) -> Event | None:
        if not self._queue:
            return None
        self._changed.set()  # room again: the reader may go on
        return self._queue.popleft()

    def wake(self) -> None:
        self._changed.set()

    async def wait(self) -> None:
        """Until something changed, or a second passed."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._changed.wait()

    async def room(self) -> None:
        """Until the application has taken enough for the reader to go on."""
        while len(self._queue) >= self.size:
            await self.wait()


class Client:
    """One terminal's connection to chefia-rt, kept alive across faults. See the package doc."""

    def __init__(
        self,
        urls: str | Sequence[str],
        terminal_id: str,
        *,
        store_id: str | None = None,
        terminal_type: str = "pos",
        token: str | None = None,
        user_id: str | None = None,
        encoding: Literal["json", "msgpack"] = "msgpack",
        since: int | None = None,
        epoch: str | None = None,
        backoff: Backoff | None = None,
        outbox_size: int = 1000,
        events_size: int = 10_000,
        on_event: Callable[[Event], None] | None = None,
        retry_after: float = 1.0,
        answer_timeout: float = 30.0,
        gap_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        keepalive: float = 20.0,
        max_message_size: int = 1 << 20,
        receive_buffer: int | None = None,
        rand: Callable[[], float] = random.random,
        state_path: str | Path | None = None,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("at least one URL is needed")
        self.terminal_id = terminal_id
        self.store_id = store_id
        self.terminal_type = terminal_type
        self.token = token
        self.user_id = user_id
        self.encoding = encoding
        self.backoff = backoff or Backoff()
        self.outbox_size = outbox_size
        self.events_size = events_size
        self.on_event = on_event
        self.limits = Limits(
            connect_timeout, answer_timeout, keepalive, max_message_size, receive_buffer
        )
        self._rand = rand
        self._wake_sender = asyncio.Event()
        self._core = ClientCore(
            terminal_id,
            encoding=encoding,
            since=since,
            epoch=epoch,
            events_size=events_size,
            retry_after=retry_after,
            answer_timeout=answer_timeout,
            gap_timeout=gap_timeout,
            rand=rand,
            on_event=self._emit,
            on_answer=self._answered,
            on_send=self._wake_sender.set,
        )
        self.stats: ClientStats = self._core.stats
        self.stopped: ClientStopped | None = None
        self.established: dict[str, Any] = {}
        self._answers: dict[str, asyncio.Future[Answer]] = {}  # of the outbox's, by operation id
        self._events = Events(events_size)
        self._outbox_room = asyncio.Event()
        self._connected = asyncio.Event()
        self._connection: Connection | None = None  # the current one, for close()
        self._state_changed = asyncio.Event()  # connected or stopped
        self._runner: asyncio.Task[None] | None = None
        self.state = ClientState(state_path) if state_path is not None else None
        if self.state is not None:
            messages, watermark, saved_epoch = self.state.load()
            if since is None:
                self._core.stream.resume_at(watermark, saved_epoch)
            self._core.restore(messages, time.monotonic())

    @property
    def watermark(self) -> int | None:
        """The highest seq up to which the application has every operation (None: not yet
        connected without a `since`; the first connection then starts at the store's head)."""
        return self._core.stream.watermark

    @property
    def epoch(self) -> str | None:
        """The epoch of the store's seq stream the watermark belongs to (None: not known yet)."""
        return self._core.stream.epoch

    # ---- life cycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start connecting (and reconnecting) in the background."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name=f"client:{self.terminal_id}")

    async def close(self) -> None:
        """Stop: close the connection and fail the answers still awaited with ClientStopped.
        Unanswered operations stay readable with `unanswered()` (to keep them for later)."""
        self._stop(ClientStopped("closed by the application"))
        ws = self._connection.ws if self._connection is not None else None
        if ws is not None:
            # A normal close (1000): cancelling alone would close the socket with 1011.
            with contextlib.suppress(TimeoutError, ConnectionClosed, OSError):
                async with asyncio.timeout(2.0):
                    await ws.close(1000, "closed by the application")
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self.state is not None:
            self._save_state()
            self.state.close()

    def _save_state(self) -> None:
        """Writes what changed since the last time: answered operations, the position."""
        changes = self._core.unsaved()
        if self.state is not None and changes is not None:
            self.state.forget(*changes)

    def _stop(self, reason: ClientStopped) -> None:
        if self.stopped is None:
            self.stopped = reason
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(reason)
                answer.exception()  # retrieved: an app that dropped it gets no warning
        self._events.wake()
        self._outbox_room.set()
        self._state_changed.set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float) -> None:
        """Until a connection is established: TimeoutError after `timeout`, ClientStopped if
        the client stopped (a close that retrying cannot fix, or it gave up)."""
        async with asyncio.timeout(timeout):
            while not self._connected.is_set():
                if self.stopped is not None:
                    raise self.stopped
                self._state_changed.clear()
                await self._state_changed.wait()

    async def wait_stopped(self, timeout: float) -> ClientStopped | None:
        """Until the client stopped by itself (a takeover, giving up); why, or TimeoutError."""
        if self._runner is not None:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._runner)
        return self.stopped

    def unanswered(self) -> list[dict[str, Any]]:
        """The operations still waiting for an answer, in the order they were sent."""
        return [o.message["operation"] for o in self._core.outbox.values()]

    def oldest_unanswered(self) -> float | None:
        """When the oldest unanswered operation was handed to `send` (monotonic clock)."""
        return next((o.queued_at for o in self._core.outbox.values()), None)

    # ---- the application's side -------------------------------------------------------------

    async def send(
        self,
        entity_type: str,
        entity_id: str,
        data: dict[str, Any],
        *,
        operation: str = "UPDATE",
        version: int = 1,
        op_id: str | None = None,
        timestamp: str | None = None,
        timeout: float = 10.0,
        **fields: Any,
    ) -> asyncio.Future[Answer]:
        """Queue one operation and send it as soon as connected; the future resolves with the
        server's Answer. Waits up to `timeout` for room in the outbox (OutboxFull)."""
        if self.stopped is not None:
            raise self.stopped
        outbox = self._core.outbox
        async with asyncio.timeout(timeout):
            while len(outbox) >= self.outbox_size:
                self._outbox_room.clear()
                await self._outbox_room.wait()
                if self.stopped is not None:
                    raise self.stopped
        op_id = op_id or f"{self.terminal_id}-{uuid.uuid4().hex}"
        if op_id in outbox:
            raise ValueError(f"operation {op_id} is already waiting for its answer")
        message = {
            "type": "data_sync",
            "operation": {
                "id": op_id,
                "entity_type": entity_type,
                "entity_id": entity_id,
                "operation": operation,
                "data": data,
                "version": version,
                "timestamp": timestamp or utc_timestamp(),
                **fields,
            },
        }
        # Encoded now, so that a value the wire cannot carry fails here, in the caller.
        encoded = self._core.encode(message)
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        if self.state is not None:
            self.state.put(message)  # committed before it can reach the wire
        self._answers[op_id] = answer
        self._core.queue(message, encoded, time.monotonic())
        return answer

    async def events(self) -> AsyncIterator[Event]:
        """The store's operations (and snapshots) in seq order, each once, until the client
        stops. Only when no `on_event` callback was given."""
        if self.on_event is not None:
            raise RuntimeError("events are handed to on_event")
        while True:
            while (event := self._events.take()) is not None:
                self._core.stream.took(event)
                yield event
            if self.stopped is not None:
                return
            await self._events.wait()

    def request_snapshot(self) -> None:
        """Ask for the store's whole state (also done by itself on resync_required)."""
        self._core.request_snapshot()

    def refresh_token(self, token: str) -> None:
        """Use `token` from now on: sent on the live connection at once (`refresh_token`, so it
        is not closed 4003 when the old token expires) and on every reconnect. The server
        answers token_refreshed, or error 4003 when it refuses it (the old one then stays)."""
        self.token = token
        self._core.send_control({"type": "refresh_token", "token": token})

    # ---- what the bookkeeping tells ---------------------------------------------------------

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)
            self._core.stream.took(event)
        else:
            self._events.put(event)

    def _answered(self, op_id: str, answer: Answer) -> None:
        self._outbox_room.set()
        # An application may cancel the future it was handed (it stopped waiting): the answer
        # is still counted, and the reader must not fail on it (InvalidStateError ended a
        # connection). None: an operation loaded from the state file, whose sender is gone.
        future = self._answers.pop(op_id, None)
        if future is not None and not future.done():
            future.set_result(answer)

    def _greeted(self, greeting: dict[str, Any]) -> None:
        self.established = greeting
        self._connected.set()
        self._state_changed.set()

    # ---- connecting -------------------------------------------------------------------------

    def _url(self, base: str) -> str:
        params: dict[str, str] = {"type": self.terminal_type, "encoding": self.encoding}
        if self.store_id is not None:
            params["store_id"] = self.store_id
        if self.user_id is not None:
            params["user_id"] = self.user_id
        params.update(self._core.stream.resume_params())
        return f"{base.rstrip('/')}/{quote(self.terminal_id, safe='')}?{urlencode(params)}"

    async def _run(self) -> None:
        reconnects = Reconnects(self.backoff, time.monotonic())
        while self.stopped is None:
            url = self._url(reconnects.url(self.urls))
            connection = self._connection = Connection(
                self._core,
                self.limits,
                wake=self._wake_sender,
                room=self._events.room,
                save=self._save_state,
                greeted=self._greeted,
            )
            try:
                started = await connection.run(url, self.token)
            finally:
                self._connected.clear()
                self._connection = None
            code = connection.close_code
            if code is not None:
                self.stats.closes[code] += 1
            gave_up = reconnects.ended(started, code, time.monotonic())
            if gave_up is not None:
                self._stop(ClientStopped(gave_up, code))
                return
            await asyncio.sleep(reconnects.delay(self._rand))

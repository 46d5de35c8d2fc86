"""A connection's two outbound lanes: bounded queues, batching, and writing built frames.

The urgent lane carries answers to the terminal's own requests (confirmations, errors, pongs,
lock answers), so they never wait behind a backlog of pushes. The push lane carries the store's
operations in seq order, and snapshot pages. Both are bounded in messages and, together, in
bytes (WS_QUEUE_MAX_BYTES): a terminal whose live queue overflows is too slow and is closed with
1013 (it resumes with `since`); a catch-up or a snapshot waits for room instead, and a terminal
that reads nothing for WS_STALL_TIMEOUT meanwhile is closed 1013. No frame sent is larger than
MAX_WS_MESSAGE_SIZE unless one message alone is (batches are cut to fit).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chefia_rt.errors import Code
from chefia_rt.frames import BATCH_OVERHEAD, OutFrame, Transport, batch_wire
from chefia_rt.protocol.codec import ws_payload_size


class Flusher:
    """One timer for every session whose pushes wait for the batch window (instead of a timer
    each): the sessions of a store that receive a push together flush together."""

    __slots__ = ("_due", "_handle")

    def __init__(self) -> None:
        self._due: list[Lanes] = []
        self._handle: asyncio.TimerHandle | None = None

    def add(self, session: Lanes, window: float) -> None:
        self._due.append(session)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(window, self._run)

    def _run(self) -> None:
        due, self._due, self._handle = self._due, [], None
        for session in due:
            session._window_ended()


@dataclass(slots=True)
class Outbound:
    """Per-connection sending limits, from Settings."""

    queue_size: int
    # Answers to the terminal's own requests; a terminal that sends without ever reading fills
    # it. At least one full batch of answers must fit whatever WS_MESSAGE_QUEUE_SIZE is.
    urgent_size: int
    batch_max: int
    batch_window: float
    compression_threshold: int | None
    # A catch-up (resume, gap fill) that waits this long for the terminal to read anything is
    # closed 1013, as a live stream's full queue is: the reader stopped while behind.
    stall_timeout: float = 30.0
    # Bytes queued in both lanes together (WS_QUEUE_MAX_BYTES), and the largest frame to send
    # (MAX_WS_MESSAGE_SIZE, what terminals accept).
    max_bytes: int = 8 * 1_048_576
    frame_max: int = 1_048_576
    flusher: Flusher = field(default_factory=Flusher)


class Lanes:
    """The sending half of a session (hub.Session): its lanes, their limits, the writes.

    The lanes exist while they hold something: an idle connection keeps no queue, task or timer
    of its own. Sending is driven by callbacks (`_schedule`, `_flush`); only a connection whose
    send buffer is full has a task (`_drain`). The attributes are the session's (its fields).
    """

    if not TYPE_CHECKING:
        __slots__ = ()  # the attributes are the session's slots (mypy would check them here)

    encoding: str
    transport: Transport
    limits: Outbound
    closed: bool
    bytes_out: int
    messages_out: int
    on_sent: Callable[[list[OutFrame]], None] | None
    _urgent: deque[OutFrame] | None
    _pushes: deque[OutFrame] | None
    _bytes: int
    _flush_at: asyncio.Handle | None
    _windowed: bool
    _drain: asyncio.Task[None] | None
    _room: asyncio.Future[None] | None
    close: Callable[[int, str], None]  # the session's: ends the connection with a close code

    def start(self) -> None:
        """Send what was queued before the connection was ready (connection_established)."""
        self._schedule(True)

    def send(self, message: dict[str, Any]) -> None:
        """Queue an answer to this terminal's own request (the urgent lane)."""
        if self.closed:
            return
        frame = OutFrame(message)
        size = frame.size(self.encoding)
        urgent = self._urgent
        if urgent is None:
            urgent = self._urgent = deque()
        if len(urgent) >= self.limits.urgent_size or not self._bytes_fit(size):
            self.close(Code.TRY_AGAIN_LATER, "outbound queue full")
            return
        urgent.append(frame)
        self._bytes += size
        self._schedule(True)

    def queue_push(self, frame: OutFrame) -> None:
        if self.closed:
            return
        size = frame.size(self.encoding)
        pushes = self._pushes
        limits = self.limits
        if (0 if pushes is None else len(pushes)) < limits.queue_size and (
            not self._bytes or self._bytes + size <= limits.max_bytes
        ):
            # The common case, `_has_room` and `_push` in one: there is room.
            if pushes is None:
                pushes = self._pushes = deque()
            pushes.append(frame)
            self._bytes += size
            if self._drain is None and self._flush_at is None:
                self._schedule(False)
            return
        if not self._has_room(1, size) and self._drain is None:
            # A delivery of more pushes than the queue holds (one large batch) fills it before
            # any scheduled flush runs: only a peer whose socket takes no more is too slow.
            if self._flush_at is not None:
                self._flush_at.cancel()
            self._flush()
        if not self._has_room(1, size):
            self.close(Code.TRY_AGAIN_LATER, "too slow: outbound queue full, resume with since")
            return
        self._push(frame, size)

    def _push(self, frame: OutFrame, size: int) -> None:
        if self._pushes is None:
            self._pushes = deque()
        self._pushes.append(frame)
        self._bytes += size
        self._schedule(False)

    def _bytes_fit(self, size: int) -> bool:
        """`size` more bytes stay within the budget (one message alone always fits)."""
        return self._bytes == 0 or self._bytes + size <= self.limits.max_bytes

    def _has_room(self, count: int, size: int) -> bool:
        pushes = len(self._pushes) if self._pushes is not None else 0
        return pushes + count <= self.limits.queue_size and self._bytes_fit(size)

    async def _wait_for_room(self, count: int, size: int) -> bool:
        """Until `count` more pushes of `size` bytes fit; False when the session closed, which
        it is (1013) when the terminal reads nothing for the stall timeout meanwhile."""
        while not self.closed and not self._has_room(count, size):
            self._room = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self.limits.stall_timeout):
                    await self._room
            except TimeoutError:
                # Live, its queue would have overflowed long ago; waiting on would keep a
                # terminal that stopped reading connected, stale, for as long as it pongs.
                self.close(Code.TRY_AGAIN_LATER, "too slow: stalled catch-up, resume later")
            finally:
                self._room = None
        return not self.closed

    def _made_room(self) -> None:
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    @property
    def queued(self) -> int:
        """Messages waiting to be sent (both lanes)."""
        return (len(self._urgent) if self._urgent else 0) + (
            len(self._pushes) if self._pushes else 0
        )

    def _drop_queued(self) -> None:
        self._urgent = self._pushes = None
        self._bytes = 0
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None

    def _schedule(self, urgent: bool) -> None:
        """Have `_flush` run soon: now for an answer, or when the batch window ends for pushes
        (msgpack batches fill meanwhile) unless a batch is already full."""
        if self.closed or self._drain is not None or self._flush_at is not None:
            return  # already due, or the drain flushes once the peer has read
        window = self.limits.batch_window
        if (
            urgent
            or not window
            or self.encoding != "msgpack"
            or (self._pushes is not None and len(self._pushes) >= self.limits.batch_max)
        ):
            self._flush_at = asyncio.get_running_loop().call_soon(self._flush)
        elif not self._windowed:
            self._windowed = True
            self.limits.flusher.add(self, window)

    def _window_ended(self) -> None:
        self._windowed = False
        if self._flush_at is None and self._drain is None:
            self._flush()

    def _take(self) -> list[OutFrame]:
        """The next frame's messages: at most WS_BATCH_MAX_MESSAGES, and no more bytes than a
        frame may hold (a message alone larger than that still goes, alone)."""
        urgent, pushes = self._urgent, self._pushes
        lone = (
            (pushes if pushes is not None and len(pushes) == 1 else None)
            if not urgent
            else (urgent if not pushes and len(urgent) == 1 else None)
        )
        if lone is not None:  # one message queued, as a connection mostly has: it goes alone
            frame = lone.popleft()
            self._bytes -= frame.size(self.encoding)
            if self._room is not None:
                self._made_room()
            return [frame]
        frames: list[OutFrame] = []
        limit = self.limits.batch_max if self.encoding == "msgpack" else 1
        room = self.limits.frame_max - BATCH_OVERHEAD
        taken = 0
        for lane in (self._urgent, self._pushes):
            while lane and len(frames) < limit:
                size = lane[0].size(self.encoding)
                if frames and taken + size > room:
                    limit = len(frames)  # full: nothing more of either lane
                    break
                frame = lane.popleft()
                taken += size
                frames.append(frame)
        self._bytes -= taken
        self._made_room()
        return frames

    def _flush(self) -> None:
        """Write what the lanes hold, built frames straight to the connection, until they are
        empty or the peer's send buffer is full (then `_drain` waits and flushes again)."""
        self._flush_at = None
        transport = self.transport
        threshold = self.limits.compression_threshold
        json = self.encoding == "json"
        while not self.closed and (self._urgent or self._pushes):
            if not transport.writable():
                self._drain = asyncio.get_running_loop().create_task(self._drain_then_flush())
                return
            frames = self._take()
            wires: list[bytes] | bytes
            if json:
                wires = [f.wire("json", threshold) for f in frames]  # never batched
            elif len(frames) == 1:
                wires = frames[0].wire("msgpack", threshold)
            else:
                wires = batch_wire(frames, threshold)
            if isinstance(wires, bytes):
                data, payload = wires, ws_payload_size(wires)
            else:
                data = wires[0] if len(wires) == 1 else b"".join(wires)
                payload = sum(ws_payload_size(w) for w in wires)
            try:
                transport.write(data)
            except Exception:
                self.closed = True  # the connection is going: its read loop ends the session
                self._drop_queued()
                return
            self.bytes_out += payload
            self.messages_out += len(frames)
            if self.on_sent is not None:
                self.on_sent(frames)
        if not self.closed:
            # Nothing queued: an idle connection keeps no lanes.
            self._urgent = self._pushes = None

    async def _drain_then_flush(self) -> None:
        try:
            await self.transport.drain()
        except Exception:
            self.closed = True
            self._drop_queued()
            return
        finally:
            self._drain = None
        self._flush()

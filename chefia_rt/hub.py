"""This worker's connections: per-terminal outbound lanes, batching, and ordered delivery.

Each session has two lanes. The urgent lane carries answers to the terminal's own requests
(confirmations, errors, pongs, lock answers), so they never wait behind a backlog of pushes. The
push lane carries the store's operations in seq order, and snapshot pages. Both are bounded in
messages and, together, in bytes (WS_QUEUE_MAX_BYTES): a terminal whose live queue overflows is
too slow and is closed with 1013 (it resumes with `since`); a catch-up or a snapshot waits for
room instead, and a terminal that reads nothing for WS_STALL_TIMEOUT meanwhile is closed 1013.
A pushed message is encoded and framed once per encoding and the same bytes are written to every
receiver (a msgpack batch too, when sessions send the same messages together); no frame sent is
larger than MAX_WS_MESSAGE_SIZE unless one message alone is (batches and snapshot pages are cut
to fit). A push is also the receivers' cache invalidation: no other message follows it.

Ordering: a session accepts push seq `next_seq` only. Anything older is a duplicate; anything
newer means a gap, and the session catches up from storage before it goes live again. The same
catch-up serves resume, snapshots and the start of every connection, so the hand-off from stored
to live operations never skips or repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from chefia_rt.bus.base import Push
from chefia_rt.domain import OpRecord
from chefia_rt.errors import Code
from chefia_rt.protocol.codec import (
    encode_json,
    encode_msgpack,
    msgpack_frame,
    ws_frame,
    ws_payload_size,
)

log = logging.getLogger("chefia_rt.hub")

CATCH_UP_PAGE = 500
CATCH_UP_FIRST_PAGE = 16  # the first read, before the size of the store's operations is known
BATCH_OVERHEAD = 64  # bytes a message_batch adds around its messages, at most
SNAPSHOT_PAGE_OVERHEAD = 256  # bytes of a snapshot page besides its entities (store_id aside)
CATCH_UP_RETRY = (0.2, 5.0)  # first and longest wait after a failed storage read
CATCH_UP_PATIENCE = 30.0  # seconds of failing reads before the terminal is told to reconnect
GAP_WAIT = 0.1  # seconds a push that came before one it follows waits for it (Hub)


class Transport(Protocol):
    """What a session needs of its WebSocket.

    Frames come built (`OutFrame.wire`, `batch_wire`): a message or a batch is encoded and
    framed once per encoding, and the same bytes are written to every receiver's connection.
    """

    def write(self, frames: bytes) -> None:
        """Write whole frames now, without waiting; raises once the connection is closing."""
        ...

    def writable(self) -> bool:
        """False while the connection's send buffer is over its limit (the peer reads slowly)."""
        ...

    async def drain(self) -> None:
        """Until the send buffer is back under its limit, or the connection is lost."""
        ...

    async def close(self, code: int, reason: str) -> None: ...


class OutFrame:
    """One outgoing message, encoded and framed at most once per encoding however many receive
    it. A msgpack batch's frame is kept on its first message for the next session that sends
    the same messages together (`batch_wire`)."""

    __slots__ = ("_batch", "_json", "_json_wire", "_msgpack", "_msgpack_wire", "message")

    def __init__(self, message: dict[str, Any]) -> None:
        self.message = message
        self._json: bytes | None = None
        self._msgpack: bytes | None = None
        self._json_wire: bytes | None = None
        self._msgpack_wire: bytes | None = None
        self._batch: tuple[tuple[OutFrame, ...], bytes] | None = None

    def size(self, encoding: str) -> int:
        """Bytes of the message in `encoding` (encodes it if need be)."""
        if encoding == "msgpack" and self._msgpack is not None:
            return len(self._msgpack)
        return len(self.encoded(encoding))

    def encoded(self, encoding: str) -> bytes:
        if encoding == "json":
            if self._json is None:
                self._json = encode_json(self.message).encode()
            return self._json
        if self._msgpack is None:
            self._msgpack = encode_msgpack(self.message)
        return self._msgpack

    def wire(self, encoding: str, compression_threshold: int | None) -> bytes:
        """The message alone in its WebSocket frame (a JSON text frame, or a msgpack binary one,
        lz4-compressed over the threshold: one server uses one threshold)."""
        if encoding == "json":
            if self._json_wire is None:
                self._json_wire = ws_frame(self.encoded("json"), text=True)
            return self._json_wire
        if self._msgpack_wire is None:
            body = msgpack_frame([self.encoded("msgpack")], compression_threshold)
            self._msgpack_wire = ws_frame(body, text=False)
        return self._msgpack_wire


def batch_wire(frames: Sequence[OutFrame], compression_threshold: int | None) -> bytes:
    """Several messages as one `message_batch` frame, built once for every session that sends
    the same ones together (the sessions of a store usually do)."""
    first, rest = frames[0], tuple(frames[1:])  # the key leaves out `first`: no cycle
    cached = first._batch
    if cached is not None and cached[0] == rest:
        return cached[1]
    body = msgpack_frame([f.encoded("msgpack") for f in frames], compression_threshold)
    wire = ws_frame(body, text=False)
    first._batch = (rest, wire)
    return wire


def push_message(record: OpRecord) -> dict[str, Any]:
    """`data_sync` as other terminals receive it: the full state after the operation."""
    return {
        "type": "data_sync",
        "operation": {
            "id": record.id,
            "seq": record.seq,
            "entity_type": record.entity_type,
            "entity_id": record.entity_id,
            "operation": record.operation,
            "data": record.data,
            "version": record.version,
            "deleted": record.deleted,
            "timestamp": record.timestamp,
            "terminal_id": record.terminal_id,
            "user_id": record.user_id,
            "priority": record.priority,
            "server_time": record.server_time,
        },
    }


def snapshot_pages(
    store_id: str,
    seq: int,
    epoch: str,
    entities: Sequence[dict[str, Any]],
    encoding: str,
    frame_max: int,
) -> list[OutFrame]:
    """The store's state at `seq` as `snapshot` messages of at most `frame_max` bytes each.

    Pages are numbered from 0 and the last says `complete: true`; each carries `seq` and `epoch`.
    A terminal joins the entities of pages 0..complete (a page 0 starts a snapshot anew). An
    entity larger than a page goes alone in its own.
    """
    room = frame_max - SNAPSHOT_PAGE_OVERHEAD - len(store_id.encode()) - len(epoch.encode())
    chunks: list[list[dict[str, Any]]] = [[]]
    size = 0
    for entity in entities:
        need = OutFrame(entity).size(encoding) + 1  # a JSON comma; msgpack needs no separator
        if chunks[-1] and size + need > room:
            chunks.append([])
            size = 0
        chunks[-1].append(entity)
        size += need
    last = len(chunks) - 1
    return [
        OutFrame(
            {
                "type": "snapshot",
                "store_id": store_id,
                "seq": seq,
                "epoch": epoch,
                "page": index,
                "complete": index == last,
                "entities": chunk,
            }
        )
        for index, chunk in enumerate(chunks)
    ]


class Flusher:
    """One timer for every session whose pushes wait for the batch window (instead of a timer
    each): the sessions of a store that receive a push together flush together."""

    __slots__ = ("_due", "_handle")

    def __init__(self) -> None:
        self._due: list[Session] = []
        self._handle: asyncio.TimerHandle | None = None

    def add(self, session: Session, window: float) -> None:
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


ReadOps = Callable[[str, int, int], Awaitable[list[OpRecord]]]


@dataclass(eq=False, slots=True)
class Session:
    """One terminal's connection as the hub sees it."""

    terminal_id: str
    terminal_type: str
    store_id: str
    session_id: str
    encoding: str
    user_id: str | None
    transport: Transport
    limits: Outbound
    connected_at: str = ""
    opened_at: float = field(default_factory=time.time)  # orders takeovers across nodes
    replaced: bool = False  # closed by a newer session of the terminal (4004)
    # Ids of operations this session sent whose place in the stream is still ahead: the stream
    # skips them (no echo) even when it goes through storage. Each leaves as the stream passes
    # it or when it got no seq, so the set stays as small as the writes in flight.
    own_ops: set[str] = field(default_factory=set)
    last_seen: float = field(default_factory=time.monotonic)
    acked_seq: int = 0
    metrics: dict[str, Any] | None = None
    ops: int = 0  # operations of this session that changed data (the monitor's figures)
    conflicts: int = 0
    next_seq: int = 1
    live: bool = False
    closed: bool = False
    close_code: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    # Called with what was just sent (WS_LOG_MESSAGES); None costs nothing on the hot path.
    on_sent: Callable[[list[OutFrame]], None] | None = None
    # The lanes exist while they hold something: an idle connection keeps no queue, task or
    # timer of its own. Sending is driven by callbacks (`_schedule`, `_flush`); only a
    # connection whose send buffer is full has a task (`_drain`), and one catching up another.
    _urgent: deque[OutFrame] | None = None
    _pushes: deque[OutFrame] | None = None
    _bytes: int = 0  # encoded size of what both lanes hold
    _flush_at: asyncio.Handle | None = None  # a flush due now
    _windowed: bool = False  # a flush due when the batch window ends (Outbound.flusher)
    _drain: asyncio.Task[None] | None = None
    _room: asyncio.Future[None] | None = None  # a catch-up waiting for room in the push lane
    _catch_up: asyncio.Task[None] | None = None

    # ---- sending ------------------------------------------------------------------------

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

    def close(self, code: int, reason: str) -> None:
        """Close the connection once; queued frames are dropped."""
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self._drop_queued()
        self._made_room()
        if self._catch_up is not None:
            self._catch_up.cancel()
        asyncio.get_running_loop().create_task(self._close_transport(code, reason))

    async def _close_transport(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.transport.close(code, reason)

    def _drop_queued(self) -> None:
        self._urgent = self._pushes = None
        self._bytes = 0
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None

    async def stop(self) -> None:
        """Cancel this session's tasks (the connection ended) and let go of what it queued."""
        self.closed = True
        for task in (self._drain, self._catch_up):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._drain = self._catch_up = None
        self._drop_queued()
        self.own_ops.clear()

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

    def _catch_up_page(self) -> int:
        """Stored ops read per catch-up step, at most: half the push lane, so that a page always
        fits once the lane has drained that far. (A fixed page larger than the lane made the
        catch-up wait for room that could never come.)"""
        return max(1, min(CATCH_UP_PAGE, self.limits.queue_size // 2))

    # ---- ordered delivery -----------------------------------------------------------------

    def offer(self, seq: int, op_id: str, frame: OutFrame, from_self: bool) -> bool:
        """A live push of the store: take it if it is the next one. False for a gap, which the
        caller fills from storage (`Hub.resume`)."""
        if not self.live or self.closed or seq < self.next_seq:
            return True
        if seq > self.next_seq:
            return False
        self.next_seq = seq + 1
        if from_self:
            self.own_ops.discard(op_id)
        else:
            self.queue_push(frame)
        return True

    def pause(self) -> None:
        """Stop the stream until the next `resume_from`: no live pushes, and no catch-up either.

        A catch-up left running while a snapshot or resume position is read would go on
        pushing (and go live) past the position the stream restarts from: ops sent twice.
        """
        self.live = False
        if self._catch_up is not None:
            self._catch_up.cancel()
            self._catch_up = None

    def resume_from(
        self,
        seq: int,
        read_ops: ReadOps,
        head: Callable[[], int],
        first: Sequence[OutFrame] = (),
    ) -> None:
        """Send `first` (a snapshot's pages), then every stored op after `seq`, then go live:
        no gap, no duplicate."""
        if self._catch_up is not None:
            self._catch_up.cancel()
        self.live = False
        self.next_seq = seq + 1
        task = asyncio.create_task(
            self._catch_up_loop(read_ops, head, deque(first)), name=f"catch-up:{self.session_id}"
        )
        task.add_done_callback(self._caught_up)
        self._catch_up = task

    def _caught_up(self, task: asyncio.Task[None]) -> None:
        if self._catch_up is task:
            self._catch_up = None  # a live session keeps no task

    async def _catch_up_loop(
        self, read_ops: ReadOps, head: Callable[[], int], first: deque[OutFrame]
    ) -> None:
        while first:
            frame = first.popleft()  # each page is let go once sent
            size = frame.size(self.encoding)
            if not await self._wait_for_room(1, size):
                return
            self._push(frame, size)
        delay, gave_up_at = CATCH_UP_RETRY[0], time.monotonic() + CATCH_UP_PATIENCE
        while not self.closed:
            try:
                await self._catch_up_pages(read_ops, head)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Storage hiccups (a restart, a cut connection) must not drop the terminal:
                # retry from where it stands, and give up only when storage stays away.
                if time.monotonic() + delay > gave_up_at:
                    log.warning("catch-up of %s failed for good: %s", self.terminal_id, exc)
                    self.close(Code.TRY_AGAIN_LATER, "catch-up failed; reconnect with since")
                    return
                log.info(
                    "catch-up of %s failed (%s); retrying in %.1fs", self.terminal_id, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, CATCH_UP_RETRY[1])

    async def _catch_up_pages(self, read_ops: ReadOps, head: Callable[[], int]) -> None:
        """Queue stored ops from next_seq on, then go live.

        A page read holds about half the byte budget at most: its size follows the size of the
        operations read so far (the first read is small, as nothing is known yet).
        """
        most = self._catch_up_page()
        page = min(most, CATCH_UP_FIRST_PAGE)
        half = self.limits.max_bytes // 2
        while not self.closed:
            if not await self._wait_for_room(page, half):
                return
            records = await read_ops(self.store_id, self.next_seq - 1, page)
            sizes = 0
            for record in records:
                if record.seq == self.next_seq:
                    # This session's own ops are never echoed, even when a gap (their publish
                    # overtook another worker's) sends the stream through storage.
                    if record.id in self.own_ops:
                        self.own_ops.discard(record.id)
                    else:
                        frame = OutFrame(push_message(record))
                        size = frame.size(self.encoding)
                        sizes += size
                        if not await self._wait_for_room(1, size):
                            return
                        self._push(frame, size)
                    self.next_seq += 1
            # Going live happens in the same tick as the check, so no push slips between.
            if len(records) < page and self.next_seq - 1 >= head():
                self.live = True
                return
            if records:
                page = max(1, min(most, half * len(records) // max(1, sizes)))


class _Early:
    """Pushes of a store that came before one they follow, waiting for it."""

    __slots__ = ("pushes", "timer")

    def __init__(self, timer: asyncio.TimerHandle) -> None:
        self.pushes: dict[int, Push] = {}
        self.timer = timer


class Hub:
    """The sessions of this worker, by store and terminal.

    A store's pushes come from every worker that commits its operations, each publishing after
    its own commit: a later seq may arrive first. Such a push waits (up to `gap_wait` seconds)
    for the ones before it, instead of sending every live session of the store to storage for
    them; when they do not come in time, it goes on and the sessions fill the gap from storage.
    """

    __slots__ = ("_early", "_gap_wait", "_heads", "_read_ops", "_stores")

    def __init__(self, read_ops: ReadOps, gap_wait: float = GAP_WAIT) -> None:
        self._stores: dict[str, dict[str, Session]] = {}
        self._heads: dict[str, int] = {}
        self._read_ops = read_ops
        self._gap_wait = gap_wait
        self._early: dict[str, _Early] = {}

    def __len__(self) -> int:
        return sum(len(s) for s in self._stores.values())

    def sessions(self) -> list[Session]:
        return [s for store in self._stores.values() for s in store.values()]

    def store_ids(self) -> list[str]:
        return list(self._stores)

    def store_sessions(self, store_id: str) -> list[Session]:
        return list(self._stores.get(store_id, {}).values())

    def head(self, store_id: str) -> int:
        return self._heads.get(store_id, 0)

    def get(self, store_id: str, terminal_id: str) -> Session | None:
        return self._stores.get(store_id, {}).get(terminal_id)

    def attach(self, session: Session) -> Session | None:
        """Register a session; return the older session of the same terminal it replaces."""
        terminals = self._stores.setdefault(session.store_id, {})
        old = terminals.get(session.terminal_id)
        terminals[session.terminal_id] = session
        return old

    def detach(self, session: Session) -> bool:
        """Forget a session; True when it was still the terminal's current one."""
        terminals = self._stores.get(session.store_id, {})
        if terminals.get(session.terminal_id) is not session:
            return False
        del terminals[session.terminal_id]
        if not terminals:
            del self._stores[session.store_id]
        return True

    def resume(self, session: Session, since: int, first: Sequence[OutFrame] = ()) -> None:
        session.resume_from(since, self._read_ops, lambda: self.head(session.store_id), first)

    def deliver(self, store_id: str, pushes: Sequence[Push]) -> None:
        """Hand a store's committed operations to its sessions in seq order, each encoded once
        (a push ahead of the next one expected waits for it, see the class)."""
        if pushes:
            last = pushes[-1].record.seq or 0
            self._heads[store_id] = max(self._heads.get(store_id, 0), last)
        sessions = self._stores.get(store_id)
        if not sessions:
            return
        # The next seq every live session of the store wants (they move together).
        expected = min(
            (s.next_seq for s in sessions.values() if s.live and not s.closed), default=0
        )
        early = self._early.get(store_id)
        if not expected:
            # No live session to order for (all catching up): as they come.
            ready = [p for p in pushes if p.record.seq is not None]
        else:
            ready = []
            for push in pushes:
                seq = push.record.seq
                if seq is None or seq < expected:
                    continue  # every live session has it already
                if seq > expected:
                    if early is None:
                        timer = asyncio.get_running_loop().call_later(
                            self._gap_wait, self._gap_expired, store_id
                        )
                        early = self._early[store_id] = _Early(timer)
                    early.pushes[seq] = push
                    continue
                ready.append(push)
                expected += 1
                while early is not None and expected in early.pushes:
                    ready.append(early.pushes.pop(expected))
                    expected += 1
            if early is not None and not early.pushes:
                early.timer.cancel()
                del self._early[store_id]
        self._offer(sessions, ready)

    def _gap_expired(self, store_id: str) -> None:
        """The pushes before a store's early ones did not come: the early ones go on (the
        sessions see the gap and fill it from storage)."""
        early = self._early.pop(store_id, None)
        sessions = self._stores.get(store_id)
        if early is not None and sessions:
            self._offer(sessions, [early.pushes[seq] for seq in sorted(early.pushes)])

    def _offer(self, sessions: dict[str, Session], pushes: Sequence[Push]) -> None:
        receivers = list(sessions.values())
        for push in pushes:
            seq = push.record.seq
            if seq is None:
                continue
            # The push is also what invalidates the entity in the receivers' own caches.
            frame = OutFrame(push_message(push.record))
            op_id, origin = push.record.id, push.origin
            for session in receivers:
                if not session.offer(seq, op_id, frame, session.terminal_id == origin):
                    self.resume(session, session.next_seq - 1)

"""This worker's connections: sessions by store and terminal, and their ordered delivery.

A session sends through two lanes (lanes.Lanes) frames built once for every receiver
(frames.OutFrame). Its push stream is a sans-I/O state machine (sync.stream.StreamCursor): the
session feeds it live pushes and stored rows and does what it decides, reading storage in a
catch-up task. A push is also the receivers' cache invalidation: no other message follows it.

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
from typing import Any

from chefia_rt.bus.base import Push
from chefia_rt.domain import OpRecord
from chefia_rt.errors import Code
from chefia_rt.frames import OutFrame, Transport, batch_wire, push_message, snapshot_pages
from chefia_rt.lanes import Flusher, Lanes, Outbound
from chefia_rt.sync.stream import DELIVER, CatchUp, GoLive, Reorder, StreamCursor

__all__ = [
    "Flusher",
    "Hub",
    "OutFrame",
    "Outbound",
    "ReadOps",
    "Session",
    "Transport",
    "batch_wire",
    "push_message",
    "snapshot_pages",
]

log = logging.getLogger("chefia_rt.hub")

CATCH_UP_PAGE = 500
CATCH_UP_FIRST_PAGE = 16  # the first read, before the size of the store's operations is known
CATCH_UP_RETRY = (0.2, 5.0)  # first and longest wait after a failed storage read
CATCH_UP_PATIENCE = 30.0  # seconds of failing reads before the terminal is told to reconnect
GAP_WAIT = 0.1  # seconds a push that came before one it follows waits for it (Hub)

ReadOps = Callable[[str, int, int], Awaitable[list[OpRecord]]]


@dataclass(eq=False, slots=True)
class Session(Lanes):
    """One terminal's connection as the hub sees it: who it is, its figures, its lanes
    (Lanes), and the asyncio half of its push stream around a StreamCursor."""

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
    last_seen: float = field(default_factory=time.monotonic)
    acked_seq: int = 0
    metrics: dict[str, Any] | None = None
    ops: int = 0  # operations of this session that changed data (the monitor's figures)
    conflicts: int = 0
    closed: bool = False
    close_code: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    # Called with what was just sent (WS_LOG_MESSAGES); None costs nothing on the hot path.
    on_sent: Callable[[list[OutFrame]], None] | None = None
    # See Lanes: no queue, task or timer while idle; a task only to drain a full send buffer,
    # and one to catch up.
    _urgent: deque[OutFrame] | None = None
    _pushes: deque[OutFrame] | None = None
    _bytes: int = 0  # encoded size of what both lanes hold
    _flush_at: asyncio.Handle | None = None  # a flush due now
    _windowed: bool = False  # a flush due when the batch window ends (Outbound.flusher)
    _drain: asyncio.Task[None] | None = None
    _room: asyncio.Future[None] | None = None  # a catch-up waiting for room in the push lane
    _catch_up: asyncio.Task[None] | None = None
    _cursor: StreamCursor = field(default_factory=StreamCursor)

    # ---- the stream's state (sync.stream.StreamCursor) ------------------------------------

    @property
    def next_seq(self) -> int:
        return self._cursor.next_seq

    @property
    def live(self) -> bool:
        return self._cursor.live

    @property
    def own_ops(self) -> set[str]:
        """Ids of operations this session sent whose place in the stream is still ahead (the
        stream skips them); the writer adds and removes them (pipeline)."""
        return self._cursor.own_ops

    def own_op_queued(self, op_id: str) -> None:
        """The writer queued this session's operation: its stream skips it from now on."""
        self._cursor.own_op_queued(op_id)

    def own_op_answered(self, op_id: str, seq: int | None) -> None:
        """The writer answered it, with its place in the stream (None: it got none)."""
        self._cursor.own_op_answered(op_id, seq)

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
        self._cursor.stop()

    # ---- ordered delivery -----------------------------------------------------------------

    def offer(self, seq: int, op_id: str, frame: OutFrame, from_self: bool) -> bool:
        """A live push of the store: take it if it is the next one. False for a gap, which the
        caller fills from storage (`Hub.resume`)."""
        if self.closed:
            return True
        decision = self._cursor.push(seq, op_id, from_self)
        if decision is DELIVER:
            self.queue_push(frame)
            return True
        return decision.__class__ is not CatchUp

    def pause(self) -> None:
        """Stop the stream until the next `resume_from`: no live pushes, and no catch-up either."""
        self._cursor.pause()
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
        self._cursor.resume(seq)
        task = asyncio.create_task(
            self._catch_up_loop(read_ops, head, deque(first)), name=f"catch-up:{self.session_id}"
        )
        task.add_done_callback(self._caught_up)
        self._catch_up = task

    def _caught_up(self, task: asyncio.Task[None]) -> None:
        if self._catch_up is task:
            self._catch_up = None  # a live session keeps no task

    def _catch_up_page(self) -> int:
        """Stored ops read per catch-up step, at most: half the push lane, so that a page always
        fits once the lane has drained that far."""
        return max(1, min(CATCH_UP_PAGE, self.limits.queue_size // 2))

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
        """Queue stored ops from next_seq on, as the cursor decides, until it goes live.

        A page read holds about half the byte budget at most: its size follows the size of the
        operations read so far (the first read is small, as nothing is known yet).
        """
        cursor = self._cursor
        most = self._catch_up_page()
        page = min(most, CATCH_UP_FIRST_PAGE)
        half = self.limits.max_bytes // 2
        after = cursor.next_seq - 1
        while not self.closed:
            if not await self._wait_for_room(page, half):
                return
            records = await read_ops(self.store_id, after, page)
            sizes = 0
            for record in records:
                seq = record.seq
                if seq is not None and cursor.row(seq, record.id) is DELIVER:
                    frame = OutFrame(push_message(record))
                    size = frame.size(self.encoding)
                    sizes += size
                    if not await self._wait_for_room(1, size):
                        return
                    self._push(frame, size)
                    cursor.delivered(seq)
            # No await between reading the head and going live: no push slips between.
            step = cursor.page_end(len(records), page, head())
            if isinstance(step, GoLive):
                return
            after = step.after
            if records:
                page = max(1, min(most, half * len(records) // max(1, sizes)))


class _Early:
    """Pushes of a store that came before one they follow, waiting for it."""

    __slots__ = ("order", "timer")

    def __init__(self, order: Reorder[Push], timer: asyncio.TimerHandle) -> None:
        self.order = order
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
        order = early.order if early is not None else Reorder[Push]()
        ready = order.arrive(((push.record.seq, push) for push in pushes), expected)
        if early is None and order.held:
            timer = asyncio.get_running_loop().call_later(
                self._gap_wait, self._gap_expired, store_id
            )
            self._early[store_id] = _Early(order, timer)
        elif early is not None and not order.held:
            early.timer.cancel()
            del self._early[store_id]
        self._offer(sessions, ready)

    def _gap_expired(self, store_id: str) -> None:
        """The pushes before a store's early ones did not come: the early ones go on (the
        sessions see the gap and fill it from storage)."""
        early = self._early.pop(store_id, None)
        sessions = self._stores.get(store_id)
        if early is not None and sessions:
            self._offer(sessions, early.order.give_up())

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

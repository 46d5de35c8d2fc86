"""The terminal client: an asyncio WebSocket client that keeps a terminal in sync through faults.

    async with Client(["ws://127.0.0.1:8001/ws"], "pos-1", store_id="s1") as client:
        answer = await (await client.send("tables", "table-7", {"status": "occupied"}))
        async for event in client.events():   # StoreOp and Snapshot, in seq order, once each
            ...

What it guarantees the application (docs/protocol.md §7, §9; docs/clients.md):

- **Nothing sent is lost.** Every operation waits in a bounded outbox until the server answers
  it. After a reconnect every unanswered one is sent again with its original id (the server
  answers a repeat `duplicate`, which is a confirmation), and one answered `sync_error` 1013 or
  4005 (storage down, rate limit) is sent again a little later.
- **Every operation of the store once, in seq order.** The application gets its own confirmed
  operations and the ones pushed by others as one stream ordered by seq. Confirmations travel in
  the server's urgent lane and may overtake pushes of lower seqs, so the client holds what
  arrives early and keeps a contiguous watermark: the highest seq up to which it has
  everything. It reconnects with `since=` that watermark and `epoch=` the epoch of the store's
  seq stream it was read in, and drops any seq it already has. A restored store starts a new
  epoch: the server then answers resync_required, and the client takes a snapshot rather than
  mixing the two streams (a seq of the new epoch is never taken for one of the old).
- **Reconnects by itself**, with exponential backoff and jitter over the given URLs (a node
  that died sends the terminal to the next one), until `Backoff.max_attempts` /
  `Backoff.max_elapsed` say stop. A takeover (4004: the terminal connected somewhere else) stops
  it at once: two connections of one terminal would only keep replacing each other. Auth and
  protocol closes (4001-4003, 4006, 1009) stop it too: retrying cannot fix them.
- **resync_required** (the log no longer reaches back to the watermark, or the epoch changed) is
  answered with a `snapshot_request`; until the snapshot arrives no operation of the stream is
  handed over. The application gets a Snapshot and the stream goes on after its seq. Keep
  `watermark` and `epoch` together when persisting them (`since=`, `epoch=`).

**Kept across restarts** with `state_path`: an SQLite file holding the outbox and the stream
position. An operation is committed there before it goes on the wire and deleted once answered;
a new client on the same file (after a crash, a restart) sends every unanswered operation again
with its original id (a repeat is answered `duplicate`) and resumes after the watermark of the
events the application took, in that epoch. A `since` given explicitly wins over the file's.

Every wait has a timeout, every task belongs to the client and is cancelled by `close()`, and
every buffer is bounded: the outbox (`send` waits for room), the events not yet taken (the
client stops reading the socket until the application catches up; the server then closes it as
a slow reader with 1013 and the client resumes from its watermark), and the seqs held ahead of
a gap (a gap that does not fill reconnects with `since`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import sqlite3
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from chefia_rt.errors import Code, InvalidMessage, MessageTooBig
from chefia_rt.protocol.codec import decode_frame, encode_json, encode_msgpack, msgpack_frame
from chefia_rt.protocol.messages import (
    ConfirmStatus,
    ConnectionEstablished,
    DataSyncPush,
    ErrorMessage,
    ResyncRequired,
    SyncConfirmation,
    SyncConflict,
    SyncError,
    parse_outgoing,
)
from chefia_rt.protocol.messages import Snapshot as SnapshotPage

log = logging.getLogger("chefia_rt.client")

# Answers that mean "not now": the same operation is sent again after `retry_after`.
RETRY_CODES = frozenset({Code.TRY_AGAIN_LATER, Code.RATE_LIMITED, Code.INTERNAL_ERROR})
# Closes that retrying cannot fix: the client stops and says why.
FATAL_CLOSES = frozenset(
    {
        Code.MESSAGE_TOO_BIG,
        Code.INVALID_TERMINAL_ID,
        Code.INVALID_TERMINAL_TYPE,
        Code.AUTH_FAILED,
        Code.REPLACED,
        Code.INVALID_MESSAGE,
    }
)
SEND_BATCH = 100  # operations per msgpack frame when many wait (a resend after reconnect)
TICK = 0.1  # seconds between checks for due resends and stuck gaps


class ClientStopped(Exception):
    """The client gave up or was told to stop; `code` is the close code that stopped it."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class OutboxFull(Exception):
    """`send` found no room in the outbox within its timeout."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """How reconnects are spaced: initial * factor**n, at most `maximum`, each shortened by a
    random part of up to `jitter` of itself so that terminals cut together do not return
    together. `max_attempts` failed attempts in a row, or `max_elapsed` seconds without a
    connection, stop the client (None: never)."""

    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.5
    max_attempts: int | None = None
    max_elapsed: float | None = None
    # A connection that lived this long resets the backoff; shorter ones (closed again at once,
    # e.g. for the rate limit) keep growing it.
    stable_after: float = 2.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before reconnect attempt number `attempt` (0 for the first)."""
        base = min(self.maximum, self.initial * self.factor**attempt)
        return base * (1 - self.jitter * rand())


@dataclass(frozen=True, slots=True)
class StoreOp:
    """One operation of the store, handed over in seq order. A pushed one carries the entity's
    full state in `operation["data"]`; the terminal's own carries what it sent (a patch for an
    UPDATE) plus the server's `seq`, `version` and `status`."""

    seq: int
    operation: dict[str, Any]
    own: bool


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The store's whole state at `seq` (after resync_required); the stream goes on after it."""

    seq: int
    entities: list[dict[str, Any]]
    epoch: str | None = None  # the epoch of the stream that goes on after it


Event = StoreOp | Snapshot


@dataclass(frozen=True, slots=True)
class Answer:
    """The server's final word on one operation: `confirmed` (sync_confirmation, also for a
    `duplicate`), `conflict` (sync_conflict: needs a person) or `rejected` (sync_error that a
    retry cannot fix, e.g. 4008)."""

    operation_id: str
    kind: Literal["confirmed", "conflict", "rejected"]
    message: dict[str, Any]

    @property
    def seq(self) -> int | None:
        seq = self.message.get("seq")
        return seq if isinstance(seq, int) else None


@dataclass(slots=True)
class ClientStats:
    """Counters for the application's monitoring (and the fault suite's report)."""

    connects: int = 0
    sent: int = 0
    resent: int = 0
    confirmed: int = 0
    duplicates: int = 0
    retries: int = 0  # answers 1013/4005/1011 that sent an operation again later
    rejected: int = 0
    resyncs: int = 0
    closes: Counter[int] = field(default_factory=Counter)

    @property
    def reconnects(self) -> int:
        return max(0, self.connects - 1)


@dataclass(slots=True)
class _Outgoing:
    message: dict[str, Any]
    encoded: str | bytes  # once: a resend costs no encoding
    answer: asyncio.Future[Answer] | None  # None: sent by an earlier client on the same state
    queued_at: float
    sent_at: float | None = None  # None: not sent on the current connection yet
    retry_at: float | None = None
    sends: int = 0


class ClientState:
    """The outbox and the stream position of one terminal in an SQLite file (`state_path`).

    An operation is committed (synchronous=FULL) before `send` hands it to the connection;
    answered ones are deleted and the position written in batches (the client's tick and
    `close`): lost in a crash, an answered operation is sent again and answered `duplicate`,
    and the stream resumes a little earlier (what the application took again comes again).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox"
            " (id TEXT PRIMARY KEY, ord INTEGER NOT NULL, message TEXT NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS position"
            " (one INTEGER PRIMARY KEY CHECK (one = 1), watermark INTEGER, epoch TEXT)"
        )

    def load(self) -> tuple[list[dict[str, Any]], int | None, str | None]:
        """The unanswered `data_sync` messages in send order, the watermark and the epoch."""
        rows = self._db.execute("SELECT message FROM outbox ORDER BY ord").fetchall()
        position = self._db.execute("SELECT watermark, epoch FROM position").fetchone()
        watermark, epoch = position if position is not None else (None, None)
        return [json.loads(text) for (text,) in rows], watermark, epoch

    def put(self, message: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO outbox (id, ord, message)"
            " VALUES (?, (SELECT COALESCE(MAX(ord), 0) + 1 FROM outbox), ?)",
            (message["operation"]["id"], json.dumps(message, separators=(",", ":"))),
        )

    def forget(self, op_ids: Sequence[str], watermark: int | None, epoch: str | None) -> None:
        with self._db:  # one transaction
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in op_ids])
            self._db.execute(
                "INSERT OR REPLACE INTO position (one, watermark, epoch) VALUES (1, ?, ?)",
                (watermark, epoch),
            )

    def close(self) -> None:
        self._db.close()


def utc_timestamp(moment: datetime | None = None) -> str:
    """An operation timestamp as the server compares them: ISO 8601, milliseconds, UTC."""
    moment = moment or datetime.now(UTC)
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


class Client:
    """One terminal's connection to chefia-rt, kept alive across faults. See the module doc."""

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
        self.retry_after = retry_after
        self.answer_timeout = answer_timeout
        self.gap_timeout = gap_timeout
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.max_message_size = max_message_size
        # Caps the socket's kernel receive buffer (SO_RCVBUF). Linux grows it up to tens of MB
        # for a fast stream; then an application that stops taking events reaches the server
        # (closed 1013, resumed) only after all that is filled.
        self.receive_buffer = receive_buffer
        self._rand = rand
        self.stats = ClientStats()
        # The highest seq up to which the application has every operation (None: not yet
        # connected without a `since`; the first connection then starts at the store's head).
        self.watermark = since
        # The epoch of the store's seq stream the watermark belongs to (None: not known yet).
        self.epoch = epoch
        self.stopped: ClientStopped | None = None
        self.established: dict[str, Any] = {}
        self._outbox: dict[str, _Outgoing] = {}  # insertion order is send order
        self._ahead: dict[int, Event] = {}  # seqs above watermark + 1, waiting for the gap
        self._stalled_since: float | None = None  # when a gap opened
        self._events: deque[Event] = deque()
        self._events_changed = asyncio.Event()
        self._outbox_room = asyncio.Event()
        self._to_send: dict[str, None] = {}  # operation ids, an ordered set
        self._control: deque[dict[str, Any]] = deque(maxlen=16)
        self._wake_sender = asyncio.Event()
        self._connected = asyncio.Event()
        self._ws: ClientConnection | None = None  # the current connection, for close()
        self._state_changed = asyncio.Event()  # connected or stopped
        self._awaiting_snapshot = False
        self._snapshot_entities: list[dict[str, Any]] = []  # the pages of a snapshot so far
        self._restart: str | None = None  # why the current connection should be started over
        self._runner: asyncio.Task[None] | None = None
        # The watermark of what the application took (kept in the state file), and the answered
        # operations the file still holds.
        self._delivered = since
        # The epoch of `_delivered` (a Snapshot not taken yet may have moved `epoch` on).
        self._delivered_epoch = epoch
        self._answered: list[str] = []
        self._state_dirty = False
        self.state = ClientState(state_path) if state_path is not None else None
        if self.state is not None:
            messages, watermark, saved_epoch = self.state.load()
            if since is None:
                self.watermark = self._delivered = watermark
                self.epoch = self._delivered_epoch = saved_epoch
            for message in messages:
                encoded = encode_json(message) if encoding == "json" else encode_msgpack(message)
                self._outbox[message["operation"]["id"]] = _Outgoing(
                    message, encoded, None, time.monotonic(), sends=1
                )

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
        if self._ws is not None:
            # A normal close (1000): cancelling alone would close the socket with 1011.
            with contextlib.suppress(TimeoutError, ConnectionClosed, OSError):
                async with asyncio.timeout(2.0):
                    await self._ws.close(1000, "closed by the application")
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self.state is not None:
            self._save_state()
            self.state.close()

    def _save_state(self) -> None:
        """Writes what changed since the last time: answered operations, the position."""
        if self.state is not None and (self._answered or self._state_dirty):
            answered, self._answered = self._answered, []
            self._state_dirty = False
            self.state.forget(answered, self._delivered, self._delivered_epoch)

    def _stop(self, reason: ClientStopped) -> None:
        if self.stopped is None:
            self.stopped = reason
        for outgoing in self._outbox.values():
            if outgoing.answer is not None and not outgoing.answer.done():
                outgoing.answer.set_exception(reason)
                outgoing.answer.exception()  # retrieved: an app that dropped it gets no warning
        self._events_changed.set()
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
        return [o.message["operation"] for o in self._outbox.values()]

    def oldest_unanswered(self) -> float | None:
        """When the oldest unanswered operation was handed to `send` (monotonic clock)."""
        return next((o.queued_at for o in self._outbox.values()), None)

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
        async with asyncio.timeout(timeout):
            while len(self._outbox) >= self.outbox_size:
                self._outbox_room.clear()
                await self._outbox_room.wait()
                if self.stopped is not None:
                    raise self.stopped
        op_id = op_id or f"{self.terminal_id}-{uuid.uuid4().hex}"
        if op_id in self._outbox:
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
        encoded = encode_json(message) if self.encoding == "json" else encode_msgpack(message)
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        if self.state is not None:
            self.state.put(message)  # committed before it can reach the wire
        self._outbox[op_id] = _Outgoing(message, encoded, answer, time.monotonic())
        self._queue_send(op_id)
        return answer

    async def events(self) -> AsyncIterator[Event]:
        """The store's operations (and snapshots) in seq order, each once, until the client
        stops. Only when no `on_event` callback was given."""
        if self.on_event is not None:
            raise RuntimeError("events are handed to on_event")
        while True:
            while self._events:
                event = self._events.popleft()
                self._events_changed.set()  # room again: the reader may go on
                self._took(event)
                yield event
            if self.stopped is not None:
                return
            self._events_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._events_changed.wait()

    def request_snapshot(self) -> None:
        """Ask for the store's whole state (also done by itself on resync_required)."""
        self._awaiting_snapshot = True
        self._control.append({"type": "snapshot_request"})
        self._wake_sender.set()

    def refresh_token(self, token: str) -> None:
        """Use `token` from now on: sent on the live connection at once (`refresh_token`, so it
        is not closed 4003 when the old token expires) and on every reconnect. The server
        answers token_refreshed, or error 4003 when it refuses it (the old one then stays)."""
        self.token = token
        self._control.append({"type": "refresh_token", "token": token})
        self._wake_sender.set()

    # ---- connecting -------------------------------------------------------------------------

    def _url(self, base: str) -> str:
        params: dict[str, str] = {"type": self.terminal_type, "encoding": self.encoding}
        if self.store_id is not None:
            params["store_id"] = self.store_id
        if self.user_id is not None:
            params["user_id"] = self.user_id
        if self.watermark is not None:
            params["since"] = str(self.watermark)
            if self.epoch is not None:
                params["epoch"] = self.epoch
        return f"{base.rstrip('/')}/{quote(self.terminal_id, safe='')}?{urlencode(params)}"

    async def _run(self) -> None:
        attempt = 0  # failed attempts in a row: picks the URL and grows the delay
        down_since = time.monotonic()
        while self.stopped is None:
            url = self._url(self.urls[attempt % len(self.urls)])
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
            started: float | None = None
            opened: ClientConnection | None = None
            try:
                async with connect(
                    url,
                    additional_headers=headers,
                    open_timeout=self.connect_timeout,
                    ping_interval=self.keepalive,
                    ping_timeout=self.keepalive,
                    close_timeout=2.0,
                    max_size=self.max_message_size,
                    compression=None,
                ) as ws:
                    opened = self._ws = ws
                    if self.receive_buffer is not None:
                        sock = ws.transport.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
                    started = await self._serve(ws)
            except (OSError, InvalidHandshake, TimeoutError, ConnectionClosed) as exc:
                log.info("%s: connection to %s failed: %s", self.terminal_id, url, exc)
            finally:
                self._connected.clear()
                self._ws = None
            closed = opened.protocol.close_rcvd if opened is not None else None
            code = closed.code if closed is not None else None
            if code is not None:
                self.stats.closes[code] += 1
            if code in FATAL_CLOSES:
                self._stop(ClientStopped(f"closed by the server with {code}", code))
                return
            now = time.monotonic()
            if started is not None:
                down_since = now
                if now - started >= self.backoff.stable_after:
                    attempt = -1
            attempt += 1
            if self.backoff.max_attempts is not None and attempt >= self.backoff.max_attempts:
                self._stop(ClientStopped(f"gave up after {attempt} failed attempts", code))
                return
            if self.backoff.max_elapsed is not None and now - down_since > self.backoff.max_elapsed:
                self._stop(ClientStopped(f"no connection for {now - down_since:.0f}s", code))
                return
            await asyncio.sleep(self.backoff.delay(attempt, self._rand))

    async def _serve(self, ws: ClientConnection) -> float | None:
        """One connection: greet, resend what is unanswered, then read until it closes.
        Returns when it was established (None if it never was)."""
        async with asyncio.timeout(self.connect_timeout):
            first = await self._recv_messages(ws)
        if not first or first[0].get("type") != "connection_established":
            return None
        try:
            greeting = parse_outgoing(ConnectionEstablished, first[0])
        except ValidationError as invalid:
            log.warning("%s: malformed connection_established: %s", self.terminal_id, invalid)
            return None
        established = time.monotonic()
        self.established = first[0]
        self.stats.connects += 1
        server_epoch = greeting.epoch
        if self.watermark is None:
            self.watermark = greeting.last_seq
            self.epoch = server_epoch
            if self._delivered is None:
                self._delivered = self.watermark
                self._delivered_epoch = server_epoch
                self._state_dirty = True
        elif self.epoch is None:
            self.epoch = server_epoch  # resumed by seqs alone: the stream is this one from now
            if self._delivered_epoch is None:
                self._delivered_epoch = server_epoch
        # The stream restarts after the watermark; what is held ahead of a gap may come again
        # (dropped then as a repeat) and the gap gets a fresh timeout.
        self._stalled_since = time.monotonic() if self._ahead else None
        self._awaiting_snapshot = False
        self._snapshot_entities = []
        self._restart = None
        # Every unanswered operation goes again, in its original order, with its original id.
        self._to_send = dict.fromkeys(self._outbox)
        for outgoing in self._outbox.values():
            outgoing.sent_at = outgoing.retry_at = None
        self._control.clear()
        if server_epoch is not None and self.epoch != server_epoch:
            # Another stream (the store was restored): nothing of it is taken until a snapshot
            # of it (the server says resync_required too; one request answers both).
            self.stats.resyncs += 1
            self.request_snapshot()
        self._connected.set()
        self._state_changed.set()
        self._wake_sender.set()
        for message in first[1:]:
            self._handle(message)
        # Reading, sending and the timers end together: when one of them stops (the connection
        # closed, a send timed out, a gap did not fill, or a bug), the connection starts over.
        tasks = [
            asyncio.create_task(self._read_loop(ws), name=f"client-read:{self.terminal_id}"),
            asyncio.create_task(self._send_loop(ws), name=f"client-send:{self.terminal_id}"),
            asyncio.create_task(self._tick_loop(ws), name=f"client-tick:{self.terminal_id}"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and (exc := task.exception()) is not None:
                    log.error(
                        "%s: %s failed: %r", self.terminal_id, task.get_name(), exc, exc_info=exc
                    )
            if not tasks[0].done():
                # Answers already received are still read, until the closing handshake ends.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.connect_timeout):
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
            return decode_frame(frame, self.max_message_size)
        except (InvalidMessage, MessageTooBig) as exc:
            # The server never sends this: something in between is broken. Start over.
            log.warning("%s: undecodable frame from the server: %s", self.terminal_id, exc)
            await ws.close(1002, "undecodable frame")
            raise ConnectionClosed(None, None) from None

    async def _read_loop(self, ws: ClientConnection) -> None:
        while True:
            # Backpressure: an application that does not take its events stops the reading
            # (the server then closes this terminal as a slow reader, and it resumes later).
            while len(self._events) >= self.events_size:
                self._events_changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._events_changed.wait()
            try:
                messages = await self._recv_messages(ws)
            except ConnectionClosed:
                return
            for message in messages:
                self._handle(message)

    # ---- sending ----------------------------------------------------------------------------

    def _queue_send(self, op_id: str) -> None:
        self._to_send[op_id] = None
        self._wake_sender.set()

    async def _send_loop(self, ws: ClientConnection) -> None:
        while True:
            await self._wake_sender.wait()
            self._wake_sender.clear()
            while self._control or self._to_send:
                bodies: list[str | bytes] = [
                    encode_json(m) if self.encoding == "json" else encode_msgpack(m)
                    for m in self._control
                ]
                self._control.clear()
                now = time.monotonic()
                while self._to_send and len(bodies) < SEND_BATCH:
                    op_id = next(iter(self._to_send))
                    del self._to_send[op_id]
                    outgoing = self._outbox.get(op_id)
                    if outgoing is None:
                        continue  # answered meanwhile
                    if outgoing.sends:
                        self.stats.resent += 1
                    else:
                        self.stats.sent += 1
                    outgoing.sends += 1
                    outgoing.sent_at, outgoing.retry_at = now, None
                    bodies.append(outgoing.encoded)
                try:
                    async with asyncio.timeout(self.answer_timeout):
                        for frame in self._frames(bodies):
                            await ws.send(frame)
                except TimeoutError:
                    # The server takes nothing: treat the connection as dead and start over.
                    await ws.close(1001, "send timed out")
                    return
                except ConnectionClosed:
                    return

    def _frames(self, bodies: list[str | bytes]) -> list[str | bytes]:
        if self.encoding == "json" or len(bodies) < 2:
            return bodies
        return [msgpack_frame([b for b in bodies if isinstance(b, bytes)], None)]

    async def _tick_loop(self, ws: ClientConnection) -> None:
        """Resend what is due (a retry, or an answer that never came), and reconnect when a gap
        in the stream does not fill: the server sends everything after the watermark again."""
        while True:
            await asyncio.sleep(TICK)
            self._save_state()
            now = time.monotonic()
            for op_id, outgoing in self._outbox.items():
                due = outgoing.retry_at
                if due is None and outgoing.sent_at is not None:
                    due = outgoing.sent_at + self.answer_timeout
                if due is not None and due <= now and op_id not in self._to_send:
                    outgoing.sent_at = outgoing.retry_at = now  # not due again until sent
                    self._queue_send(op_id)
            if self._stalled_since is not None and now - self._stalled_since > self.gap_timeout:
                log.warning("%s: seq %s never came; resuming", self.terminal_id, self._next_seq)
                self._restart = "resuming after a gap"
            if self._restart is not None:
                await ws.close(1000, self._restart)
                return

    # ---- receiving --------------------------------------------------------------------------

    def _took(self, event: Event) -> None:
        """The application has `event`: a restart resumes after it."""
        self._delivered = event.seq
        if isinstance(event, Snapshot):
            self._delivered_epoch = event.epoch
        self._state_dirty = True

    @property
    def _next_seq(self) -> int:
        return (self.watermark or 0) + 1

    def _handle(self, message: dict[str, Any]) -> None:
        """Act on one server message, its fields read through its model (protocol/outgoing.py);
        one that does not match the model is logged and ignored."""
        kind = message.get("type")
        try:
            if kind == "data_sync":
                pushed = parse_outgoing(DataSyncPush, message).operation
                own = pushed.terminal_id == self.terminal_id
                self._arrive(pushed.seq, StoreOp(pushed.seq, message["operation"], own))
            elif kind == "sync_confirmation":
                self._confirmed(parse_outgoing(SyncConfirmation, message), message)
            elif kind == "sync_error":
                error = parse_outgoing(SyncError, message)
                self._refused(error.operation_id, error.code in RETRY_CODES, "rejected", message)
            elif kind == "sync_conflict":
                conflict = parse_outgoing(SyncConflict, message)
                self._refused(conflict.operation_id, False, "conflict", message)
            elif kind == "resync_required":
                parse_outgoing(ResyncRequired, message)
                if not self._awaiting_snapshot:
                    self.stats.resyncs += 1
                    self.request_snapshot()
            elif kind == "snapshot":
                self._snapshot(parse_outgoing(SnapshotPage, message), message)
            elif (
                kind == "error"
                and self._awaiting_snapshot
                and parse_outgoing(ErrorMessage, message).code in RETRY_CODES
            ):
                # The snapshot was refused (storage down): reconnecting asks again, after a
                # backoff.
                self._restart = "snapshot refused; retrying"
        except ValidationError as exc:
            log.warning("%s: ignoring a malformed %s: %s", self.terminal_id, kind, exc)

    def _confirmed(self, confirmation: SyncConfirmation, message: dict[str, Any]) -> None:
        outgoing = self._outbox.pop(confirmation.operation_id, None)
        if outgoing is None:
            return  # the answer to a repeat of an operation already answered
        self._answered.append(outgoing.message["operation"]["id"])
        self._outbox_room.set()
        self.stats.confirmed += 1
        if confirmation.status is ConfirmStatus.DUPLICATE:
            self.stats.duplicates += 1
        seq = confirmation.seq
        if seq is not None:
            operation = {
                **outgoing.message["operation"],
                "seq": seq,
                "version": confirmation.version,
                "status": confirmation.status.value,
                "terminal_id": self.terminal_id,
            }
            self._arrive(seq, StoreOp(seq, operation, own=True))
        _settle(outgoing.answer, Answer(outgoing.message["operation"]["id"], "confirmed", message))

    def _refused(
        self,
        op_id: str | None,
        retry: bool,
        kind: Literal["conflict", "rejected"],
        message: dict[str, Any],
    ) -> None:
        outgoing = self._outbox.get(op_id) if op_id is not None else None
        if outgoing is None:
            return
        if retry:
            self.stats.retries += 1
            outgoing.retry_at = time.monotonic() + self.retry_after * (0.5 + self._rand())
            return
        answered_id: str = outgoing.message["operation"]["id"]
        del self._outbox[answered_id]
        self._answered.append(answered_id)
        self._outbox_room.set()
        self.stats.rejected += 1
        _settle(outgoing.answer, Answer(outgoing.message["operation"]["id"], kind, message))

    def _snapshot(self, page: SnapshotPage, message: dict[str, Any]) -> None:
        """One page of a snapshot; the one marked complete hands the whole state over."""
        if page.page == 0:
            self._snapshot_entities = []
        self._snapshot_entities.extend(message["entities"])  # as the server sent them
        if not page.complete:
            return
        entities, self._snapshot_entities = self._snapshot_entities, []
        seq = page.seq
        self._awaiting_snapshot = False
        self.watermark = seq
        self.epoch = page.epoch
        self._ahead = {s: e for s, e in self._ahead.items() if s > seq}
        self._emit(Snapshot(seq, entities, self.epoch))
        self._advance()

    def _arrive(self, seq: int, event: Event) -> None:
        """Take one seq of the stream: hand over everything that is now contiguous."""
        if self.watermark is None or seq <= self.watermark or seq in self._ahead:
            return  # had it already (a replay after a resume, or a duplicate's confirmation)
        if len(self._ahead) >= self.events_size and seq != self._next_seq:
            # The gap-timeout resume sends it again; the seq that fills the gap is always
            # taken, or a full hold would refuse it on every resume.
            return
        self._ahead[seq] = event
        if not self._awaiting_snapshot:  # else held: the snapshot says where the stream is
            self._advance()

    def _advance(self) -> None:
        advanced = False
        while (event := self._ahead.pop(self._next_seq, None)) is not None:
            self.watermark = self._next_seq
            advanced = True
            self._emit(event)
        # A gap times out only when the stream stands still: under load, confirmations often
        # run ahead of pushes, and the gap moves on all the time.
        if not self._ahead:
            self._stalled_since = None
        elif advanced or self._stalled_since is None:
            self._stalled_since = time.monotonic()

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)
            self._took(event)
        else:
            self._events.append(event)
            self._events_changed.set()


def _settle(answer: asyncio.Future[Answer] | None, result: Answer) -> None:
    # An application may cancel the future it was handed (it stopped waiting): the answer is
    # still counted, and the reader must not fail on it (InvalidStateError ended a connection).
    # None: an operation loaded from the state file, whose sender is gone.
    if answer is not None and not answer.done():
        answer.set_result(result)

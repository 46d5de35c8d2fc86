"""The terminal client's bookkeeping, without I/O: the outbox, and what each server message does
to it and to the stream position (`stream.py`). The rules are in the package doc.

It takes the server's messages and the time as arguments and says what to send next; it opens no
connection, starts no task and never waits, so its rules are tested by feeding it messages by
hand. The asyncio side (`client.py`, `connection.py`) owns the connection and the application's
side, and hears from it through three callbacks: `on_event` for each event of the stream in seq
order, `on_answer` for each operation's final answer, and `on_send` when something waits to be
sent.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from chefia_rt.client.model import Answer, ClientStats, Event, StoreOp
from chefia_rt.client.stream import ClientStream
from chefia_rt.errors import Code
from chefia_rt.protocol.codec import encode_json, encode_msgpack, msgpack_frame
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
SEND_BATCH = 100  # operations per msgpack frame when many wait (a resend after reconnect)


@dataclass(slots=True)
class Outgoing:
    """An operation of the outbox, until it is answered."""

    message: dict[str, Any]
    encoded: str | bytes  # once: a resend costs no encoding
    queued_at: float
    sent_at: float | None = None  # None: not sent on the current connection yet
    retry_at: float | None = None
    sends: int = 0


class ClientCore:
    """One terminal's outbox and stream position (see the module doc). Times are monotonic
    seconds, passed in by the caller."""

    def __init__(
        self,
        terminal_id: str,
        *,
        encoding: Literal["json", "msgpack"],
        since: int | None,
        epoch: str | None,
        events_size: int,
        retry_after: float,
        answer_timeout: float,
        gap_timeout: float,
        rand: Callable[[], float],
        on_event: Callable[[Event], None],
        on_answer: Callable[[str, Answer], None],
        on_send: Callable[[], None],
    ) -> None:
        self.terminal_id = terminal_id
        self.encoding = encoding
        self.retry_after = retry_after
        self.answer_timeout = answer_timeout
        self.gap_timeout = gap_timeout
        self._rand = rand
        self._on_answer = on_answer
        self._on_send = on_send
        self.stats = ClientStats()
        self.stream = ClientStream(since, epoch, events_size, on_event)
        self.outbox: dict[str, Outgoing] = {}  # insertion order is send order
        self._to_send: dict[str, None] = {}  # operation ids, an ordered set
        self._control: deque[dict[str, Any]] = deque(maxlen=16)
        self._restart: str | None = None  # why the current connection should be started over
        self._answered: list[str] = []  # answered operations the state file still holds

    # ---- the outbox -------------------------------------------------------------------------

    def encode(self, message: dict[str, Any]) -> str | bytes:
        return encode_json(message) if self.encoding == "json" else encode_msgpack(message)

    def restore(self, messages: Sequence[dict[str, Any]], now: float) -> None:
        """The unanswered operations a state file kept; an earlier client sent them, so every
        send is a resend."""
        for message in messages:
            self.outbox[message["operation"]["id"]] = Outgoing(
                message, self.encode(message), now, sends=1
            )

    def queue(self, message: dict[str, Any], encoded: str | bytes, now: float) -> None:
        """A new operation: into the outbox, and sent as soon as connected."""
        op_id: str = message["operation"]["id"]
        self.outbox[op_id] = Outgoing(message, encoded, now)
        self._queue_send(op_id)

    def _queue_send(self, op_id: str) -> None:
        self._to_send[op_id] = None
        self._on_send()

    def send_control(self, message: dict[str, Any]) -> None:
        """A message that is no operation (sent on this connection only, ahead of operations)."""
        self._control.append(message)
        self._on_send()

    def request_snapshot(self) -> None:
        self.stream.awaiting_snapshot = True
        self.send_control({"type": "snapshot_request"})

    def has_to_send(self) -> bool:
        return bool(self._control or self._to_send)

    def next_frames(self, now: float) -> list[str | bytes]:
        """The frames to send next: the control messages, then up to SEND_BATCH operations."""
        bodies: list[str | bytes] = [self.encode(m) for m in self._control]
        self._control.clear()
        while self._to_send and len(bodies) < SEND_BATCH:
            op_id = next(iter(self._to_send))
            del self._to_send[op_id]
            outgoing = self.outbox.get(op_id)
            if outgoing is None:
                continue  # answered meanwhile
            if outgoing.sends:
                self.stats.resent += 1
            else:
                self.stats.sent += 1
            outgoing.sends += 1
            outgoing.sent_at, outgoing.retry_at = now, None
            bodies.append(outgoing.encoded)
        if self.encoding == "json" or len(bodies) < 2:
            return bodies
        return [msgpack_frame([b for b in bodies if isinstance(b, bytes)], None)]

    def tick(self, now: float) -> str | None:
        """Queue what is due again (a retry, or an answer that never came); and why the
        connection should start over, if it should (a gap in the stream that does not fill:
        the server sends everything after the watermark again)."""
        for op_id, outgoing in self.outbox.items():
            due = outgoing.retry_at
            if due is None and outgoing.sent_at is not None:
                due = outgoing.sent_at + self.answer_timeout
            if due is not None and due <= now and op_id not in self._to_send:
                outgoing.sent_at = outgoing.retry_at = now  # not due again until sent
                self._queue_send(op_id)
        stalled_since = self.stream.stalled_since
        if stalled_since is not None and now - stalled_since > self.gap_timeout:
            log.warning("%s: seq %s never came; resuming", self.terminal_id, self.stream.next_seq)
            self._restart = "resuming after a gap"
        return self._restart

    def unsaved(self) -> tuple[list[str], int | None, str | None] | None:
        """What changed for the state file since the last call: the answered operations, the
        watermark and epoch of what the application took (None: nothing)."""
        stream = self.stream
        if not (self._answered or stream.dirty):
            return None
        answered, self._answered = self._answered, []
        stream.dirty = False
        return answered, stream.delivered, stream.delivered_epoch

    # ---- a connection -----------------------------------------------------------------------

    def established(self, message: dict[str, Any], now: float) -> bool:
        """The server's first message on a connection: True when it is the greeting, and then
        the stream resumes after the watermark and every unanswered operation goes again."""
        if message.get("type") != "connection_established":
            return False
        try:
            greeting = parse_outgoing(ConnectionEstablished, message)
        except ValidationError as invalid:
            log.warning("%s: malformed connection_established: %s", self.terminal_id, invalid)
            return False
        self.stats.connects += 1
        server_epoch = greeting.epoch
        self.stream.greeted(greeting.last_seq, server_epoch, now)
        self._restart = None
        # Every unanswered operation goes again, in its original order, with its original id.
        self._to_send = dict.fromkeys(self.outbox)
        for outgoing in self.outbox.values():
            outgoing.sent_at = outgoing.retry_at = None
        self._control.clear()
        if server_epoch is not None and self.stream.epoch != server_epoch:
            # Another stream (the store was restored): nothing of it is taken until a snapshot
            # of it (the server says resync_required too; one request answers both).
            self.stats.resyncs += 1
            self.request_snapshot()
        return True

    # ---- receiving --------------------------------------------------------------------------

    def handle(self, message: dict[str, Any], now: float) -> None:
        """Act on one server message, its fields read through its model (protocol/outgoing.py);
        one that does not match the model is logged and ignored."""
        kind = message.get("type")
        try:
            if kind == "data_sync":
                pushed = parse_outgoing(DataSyncPush, message).operation
                own = pushed.terminal_id == self.terminal_id
                event = StoreOp(pushed.seq, message["operation"], own)
                self.stream.arrive(pushed.seq, event, now)
            elif kind == "sync_confirmation":
                self._confirmed(parse_outgoing(SyncConfirmation, message), message, now)
            elif kind == "sync_error":
                error = parse_outgoing(SyncError, message)
                retry = error.code in RETRY_CODES
                self._refused(error.operation_id, retry, "rejected", message, now)
            elif kind == "sync_conflict":
                conflict = parse_outgoing(SyncConflict, message)
                self._refused(conflict.operation_id, False, "conflict", message, now)
            elif kind == "resync_required":
                parse_outgoing(ResyncRequired, message)
                if not self.stream.awaiting_snapshot:
                    self.stats.resyncs += 1
                    self.request_snapshot()
            elif kind == "snapshot":
                page = parse_outgoing(SnapshotPage, message)
                self.stream.snapshot_page(
                    page.seq, page.epoch, page.page, page.complete, message["entities"], now
                )
            elif (
                kind == "error"
                and self.stream.awaiting_snapshot
                and parse_outgoing(ErrorMessage, message).code in RETRY_CODES
            ):
                # The snapshot was refused (storage down): reconnecting asks again, after a
                # backoff.
                self._restart = "snapshot refused; retrying"
        except ValidationError as exc:
            log.warning("%s: ignoring a malformed %s: %s", self.terminal_id, kind, exc)

    def _confirmed(
        self, confirmation: SyncConfirmation, message: dict[str, Any], now: float
    ) -> None:
        outgoing = self.outbox.pop(confirmation.operation_id, None)
        if outgoing is None:
            return  # the answer to a repeat of an operation already answered
        op_id: str = outgoing.message["operation"]["id"]
        self._answered.append(op_id)
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
            self.stream.arrive(seq, StoreOp(seq, operation, own=True), now)
        self._on_answer(op_id, Answer(op_id, "confirmed", message))

    def _refused(
        self,
        op_id: str | None,
        retry: bool,
        kind: Literal["conflict", "rejected"],
        message: dict[str, Any],
        now: float,
    ) -> None:
        outgoing = self.outbox.get(op_id) if op_id is not None else None
        if outgoing is None:
            return
        if retry:
            self.stats.retries += 1
            outgoing.retry_at = now + self.retry_after * (0.5 + self._rand())
            return
        answered_id: str = outgoing.message["operation"]["id"]
        del self.outbox[answered_id]
        self._answered.append(answered_id)
        self.stats.rejected += 1
        self._on_answer(answered_id, Answer(answered_id, kind, message))

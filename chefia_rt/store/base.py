"""The storage port: what the node needs from a database, whichever it is.

The store persists and the engine decides: `commit` reads what a batch touches under lock, hands
it to a `decide` callback (the node runs the pure engine there) and writes what it returns in the
same transaction. The store never imports the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from chefia_rt.domain import (
    BatchState,
    BatchWrite,
    ConflictKey,
    Entity,
    EntityKey,
    OpKey,
    OpRecord,
)

T = TypeVar("T")

Decide = Callable[[BatchState], tuple[T, BatchWrite]]
# Awaited with what a batch read, inside its transaction, before `Decide` (Store.commit).
Screen = Callable[[BatchState], Awaitable[None]]


class Laps(dict[str, float]):
    """Where a batch spent its time: seconds by stage, each `lap` ending the stage that ran
    since the previous one (the writer's stages and, inside `Store.commit`, the store's)."""

    __slots__ = ("_mark",)

    def __init__(self) -> None:
        super().__init__()
        self._mark = time.monotonic()

    def lap(self, stage: str) -> None:
        now = time.monotonic()
        self[stage] = self.get(stage, 0.0) + now - self._mark
        self._mark = now


@dataclass(slots=True)
class BatchRequest:
    """What a batch needs read under lock before the engine can decide it; `laps` is where the
    store's commit notes its stages."""

    operation_keys: list[OpKey] = field(default_factory=list)
    entity_keys: list[EntityKey] = field(default_factory=list)
    conflict_keys: list[ConflictKey] = field(default_factory=list)
    store_ids: list[str] = field(default_factory=list)
    laps: Laps = field(default_factory=Laps)


@dataclass(slots=True)
class LogBounds:
    """How far back a store's operation log reaches: `oldest_seq` is the first seq still kept
    (last_seq + 1 when none is), `last_seq` the newest. `epoch` names the store's seq stream:
    set when the stream starts (the first time anyone asks), replaced by a restore, so that a
    seq is only meaningful together with the epoch it was read in."""

    oldest_seq: int
    last_seq: int
    epoch: str


@dataclass(slots=True)
class SessionRecord:
    """One WebSocket session, for the session log (`websocket_connections`)."""

    session_id: str
    terminal_id: str
    terminal_type: str
    store_id: str
    user_id: str | None
    connected_at: str
    disconnected_at: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    close_code: int | None = None


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """Something the deployment did outside the sync path (a backup, a restore), for monitors.

    `created_at` is epoch seconds; `payload` a JSON object (for a backup: archive, bytes,
    seconds, status, and `stores`, each store's watermark)."""

    id: int
    kind: str
    created_at: float
    payload: dict[str, Any]


class Store(Protocol):
    """Durable storage of entities, the operation log, audit, conflicts and sessions.

    Every backend passes tests/store/test_contract.py. After `close` (which may be called more
    than once) every call raises StorageUnavailable and `ping` says False; no backend's own
    exception type ever escapes.
    """

    kind: str
    # True: lock grants are marked here (`mark_lease`), and `commit` reads the marks of the
    # batch's entities and takes a `screen`; the writer then asks the bus for the leases of the
    # marked entities only (docs/architecture.md §3.12).
    marks_leases: bool

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None:
        """Release connections; pending calls finish first."""

    async def commit(
        self, request: BatchRequest, decide: Decide[T], screen: Screen | None = None
    ) -> T:
        """Read the request's rows under lock, call `decide`, write its BatchWrite, commit.

        The BatchState holds the requested operation records (with or without a seq), the
        requested conflicts and the pending conflict of every requested operation logged as
        one (`rows.conflicts_to_read`), the entities of the requested keys and of those
        conflicts' operations, and the last seq (0 if none) of the requested stores and of
        every store of those entities. Operation records and conflicts are keyed by
        (store_id, id).

        The log is append-only: a BatchWrite.op_records row whose (store_id, id) is already
        logged, or a seq another operation holds, fails the whole transaction
        (StorageUnavailable: the retry is answered `duplicate`). A settled_records row replaces
        only that store's `status='conflict'` row of its id; any other fails the transaction.

        It ends a lap of `request.laps` after each stage it goes through (PostgreSQL: `begin`,
        `lock`, `read`, `screen`, `decide`, `write`, `commit`; SQLite: `wait` for the file,
        `read`, `decide`, `write`, `commit`, `sync`), for the metrics.

        A store that marks leases also fills BatchState.leased: the requested entity keys
        whose lease mark was read in force (read before the store seq rows are locked, so a mark
        made while the batch waits for them may be missed: its grant was answered after the
        batch began). It awaits `screen`, when given, with the state before calling `decide`;
        other stores take no `screen` (ValueError).

        An exception from `decide` or `screen` propagates unchanged and nothing is written.
        Raises StorageUnavailable when nothing could be written; after it returns, the batch
        is durable.
        """

    async def mark_lease(self, key: EntityKey, until: float) -> None:
        """Mark that a lock lease on `key` may be in force until `until` (epoch seconds; a mark
        never moves earlier), durably, before the grant is answered. Raises StorageUnavailable
        when it could not. A store that does not mark leases does nothing."""

    async def read_operations(self, store_id: str, after_seq: int, limit: int) -> list[OpRecord]:
        """Applied operations of a store with seq > after_seq, in seq order, at most `limit`.
        Records without a seq (nothing changed, a pending conflict) are never returned."""

    async def get_operation(self, store_id: str, operation_id: str) -> OpRecord | None:
        """The operation log's record of a store's operation id (applied or not), if any."""

    async def logged(self, keys: Sequence[OpKey]) -> set[OpKey]:
        """Which of these (store_id, operation id) the operation log holds (applied or not),
        in one read."""

    async def log_bounds(self, store_id: str) -> LogBounds:
        """The range of seqs the operation log can still replay for a store, and its epoch
        (created, with the stream, when the store has none yet)."""

    async def snapshot(
        self, store_id: str, entity_types: Sequence[str] | None
    ) -> tuple[int, list[Entity]]:
        """The store's entities and the seq they are consistent with, read atomically.

        Tombstones included. `entity_types` None or empty means every type. Ordered by
        (entity_type, entity_id) in code-point order, whatever the database's collation.
        """

    async def get_entity(self, key: EntityKey) -> Entity | None:
        """One entity's current state (tombstones included)."""

    async def list_entities(
        self, store_id: str, entity_type: str, after_id: str | None, limit: int
    ) -> list[Entity]:
        """A page of one type's entities of a store: ids after `after_id` (from the start
        when None), in code-point order of entity_id, at most `limit`. Tombstones included."""

    async def record_session(self, session: SessionRecord) -> None:
        """Insert or update a session log row (rows recorded at once share one transaction;
        later records of a session replace earlier ones)."""

    async def add_server_event(self, kind: str, payload: dict[str, Any], created_at: float) -> int:
        """Record a server event; its id (ids grow)."""

    async def server_events(self, after_id: int | None, limit: int) -> list[ServerEvent]:
        """Events with an id above `after_id`, oldest first, at most `limit`; with None, the
        newest `limit` events (oldest first)."""

    async def ping(self) -> bool:
        """True when storage answers."""

    async def maintain(self, retention: timedelta, now: datetime | None = None) -> None:
        """Daily upkeep: prune operation-log rows older than `retention` without leaving a hole
        in any store's seqs (resumes from before the oldest kept seq get resync_required), prune
        server events older than `retention`, drop lease marks long past, and keep time
        partitions ahead where the backend has them."""


class Coalesced(Generic[T]):
    """Items written together: `add` waits until its item is written, by one call of
    `write_many` with every item added while the previous call ran.

    Session records come in storms (a shift starting, a network coming back): one transaction,
    and one durable flush, for all of them instead of one each in front of the writer's commits.
    """

    def __init__(self, write_many: Callable[[list[T]], Awaitable[None]]) -> None:
        self._write_many = write_many
        self._waiting: list[T] = []
        self._writer: asyncio.Future[None] | None = None
        self.writes = 0  # calls of write_many so far

    async def add(self, item: T) -> None:
        self._waiting.append(item)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._drain())
        # Shielded: one caller cancelled must not cancel the write of the others' items.
        await asyncio.shield(self._writer)

    async def _drain(self) -> None:
        # An item added while a write runs waits for the next one, which this same call makes:
        # every caller awaits this future, so it ends only when nothing is left.
        while self._waiting:
            items, self._waiting = self._waiting, []
            self.writes += 1
            await self._write_many(items)

"""The write pipeline of a worker: queue, batch, commit, answer, publish.

Operations from every connection of the worker meet in one bounded queue; one writer task takes
whatever is waiting (up to SYNC_BATCH_MAX_OPS), checks the batch's leases, commits it as one
transaction with the engine deciding inside it, writes the committed states through the
RequestCache, then answers each sender and publishes the applied operations to every worker's
hub (a slice of the batch at a time, senders first). Group commit comes from the queue itself:
while one transaction is on disk the next batch gathers, so a busy server commits large batches
and an idle one commits at once.

Every answer, whatever it says, is reported once to an `AnswerSink`; what each item is answered
and how it is counted: `answers.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Container, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from chefia_rt.answers import (
    AnswerSink,
    counted,
    own_op_id,
    refusal,
    refused,
    reply,
)
from chefia_rt.bus.base import Bus, Push
from chefia_rt.cache import RequestCache
from chefia_rt.domain import (
    BatchState,
    BatchWrite,
    Entity,
    EntityKey,
    Operation,
    Resolution,
)
from chefia_rt.errors import ChefiaError, Code, Locked, Overloaded, StorageUnavailable
from chefia_rt.hub import Session
from chefia_rt.protocol.messages import utc_now_iso
from chefia_rt.store.base import BatchRequest, Laps, Store
from chefia_rt.sync.engine import Engine, Outcome
from chefia_rt.sync.locks import Lease, check_write

log = logging.getLogger("chefia_rt.pipeline")

# Operations of a committed batch answered and published before the writer lets the event
# loop run again (a few milliseconds of work at most).
ANSWER_SLICE = 64


@dataclass(slots=True)
class Pending:
    """An operation or resolution waiting for the next batch, with who to answer."""

    item: Operation | Resolution
    session: Session
    received: float


@dataclass(frozen=True, slots=True)
class Limits:
    batch_max_ops: int
    queue_size: int
    commit_timeout: float


def batch_request(
    items: Sequence[Operation | Resolution], laps: Laps | None = None
) -> BatchRequest:
    """What the store must read under lock before the engine can decide these items."""
    request = BatchRequest(laps=Laps() if laps is None else laps)
    stores: set[str] = set()
    for item in items:
        stores.add(item.store_id)
        if isinstance(item, Resolution):
            request.conflict_keys.append((item.store_id, item.conflict_id))
        else:
            # A retry of an op that raised a manual conflict repeats that conflict: the store
            # reads it with the op's log record.
            request.operation_keys.append(item.op_key)
            request.entity_keys.extend(item.touched_keys())
    request.store_ids = sorted(stores)
    return request


class WritePipeline:
    """One worker's queue of writes and the task that commits them."""

    def __init__(
        self,
        limits: Limits,
        store: Store,
        bus: Bus,
        engine: Engine,
        cache: RequestCache,
        sink: AnswerSink,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self.limits = limits
        self.store = store
        self.bus = bus
        self.engine = engine
        self.cache = cache
        self.sink = sink
        self._spawn = spawn
        self.draining = False
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(limits.queue_size)
        self._writer: asyncio.Task[None] | None = None
        # States of timed-out commits that landed, until their own write-through is done.
        self._late_written: list[Entity] = []
        self.idle = asyncio.Event()
        self.idle.set()
        # Items queued so far and items the writer is done with (answered, one way or another);
        # the writer takes them in queue order. Waiters: (items queued then, woken when done).
        self._queued_count = 0
        self._done_count = 0
        self._done_waiters: list[tuple[int, asyncio.Future[None]]] = []

    def depth(self) -> int:
        """Items waiting for a batch."""
        return self._queue.qsize()

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="writer")

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    async def drain(self, timeout: float) -> None:
        """Take no more items and wait, at most `timeout`, until the queued ones are done."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.idle.wait()

    def submit(self, item: Operation | Resolution, session: Session, received: float) -> None:
        """Queue an item for the next batch; Overloaded (1013) when the queue is full."""
        if self.draining:
            raise StorageUnavailable("server is shutting down; retry on reconnect")
        try:
            self._queue.put_nowait(Pending(item, session, received))
        except asyncio.QueueFull:
            raise Overloaded("server busy: write queue full, retry") from None
        self.idle.clear()  # set again by the writer once the queue is empty
        self._queued_count += 1
        # Known as this session's own from now on, so no path of the stream echoes it back.
        session.own_op_queued(own_op_id(item))

    async def answered_so_far(self) -> None:
        """Until the writer is done with every item queued so far (each one answered)."""
        if self._done_count >= self._queued_count:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._done_waiters.append((self._queued_count, done))
        await done

    def _wake_done_waiters(self) -> None:
        waiting = []
        for target, done in self._done_waiters:
            if target <= self._done_count:
                if not done.done():
                    done.set_result(None)
            elif not done.done():  # a waiter that gave up is forgotten
                waiting.append((target, done))
        self._done_waiters = waiting

    async def _write_loop(self) -> None:
        limit = self.limits.batch_max_ops
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < limit and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            taken = len(batch)
            laps = Laps()
            try:
                if not self.store.marks_leases:
                    batch = await self._admit(batch)
                    laps.lap("leases")
                if batch:
                    await self._commit(batch, laps)
            except Exception:
                log.exception("batch of %d failed unexpectedly", len(batch))
            finally:
                self._done_count += taken
                self._wake_done_waiters()
                if self._queue.empty():
                    self.idle.set()

    async def _admit(self, batch: list[Pending]) -> list[Pending]:
        """For a store that keeps no lease marks: the batch less the operations that the leases
        of their entities forbid, which are answered 4009 here.

        The leases of the whole batch are read in one call (one round trip to Redis), after
        the operations left the queue and right before their commit starts: a lock granted
        before this read stops every operation of the batch, however long it waited in the
        queue. A lease that cannot be read refuses the operations with 1013 (retry), never
        lets them past.
        """
        keys = _touched(batch)
        if not keys:
            return batch
        try:
            leases = dict(zip(keys, await self.bus.get_leases(keys), strict=True))
        except Exception as exc:
            code, reason = _retry_later(exc, "reading the batch's leases")
            for pending in batch:
                if isinstance(pending.item, Operation):
                    self._refuse(pending, code, reason)
            return [p for p in batch if not isinstance(p.item, Operation)]
        forbidden = self._forbidden(batch, leases)
        if not forbidden:
            return batch
        # A terminal retries when it lost the confirmation, typically with the connection,
        # and that also released its locks. An operation already in the log must still be
        # answered `duplicate` (docs/protocol.md §7.4), never 4009: one read for all of them.
        try:
            logged = await self.store.logged([_operation(batch[i]).op_key for i in forbidden])
        except Exception as exc:
            code, reason = _retry_later(exc, "reading the operation log")
            for index in forbidden:
                self._refuse(batch[index], code, reason)
            return [p for i, p in enumerate(batch) if i not in forbidden]
        admitted = []
        for index, pending in enumerate(batch):
            locked = forbidden.get(index)
            if locked is None or _operation(pending).op_key in logged:
                admitted.append(pending)  # a logged one is answered `duplicate` by the batch
            else:
                self._refuse(pending, locked.code, locked.reason)
        return admitted

    def _screen(
        self, batch: list[Pending], refused: dict[int, tuple[int, str]]
    ) -> Callable[[BatchState], Coroutine[Any, Any, None]]:
        """For a store that marks leases: what checks the batch's leases inside its transaction,
        putting the operations they forbid into `refused` (by position in the batch, with the
        code and reason to answer) for the commit to leave out.

        The store read the marks of the batch's entities with the batch's other rows, after the
        operations left the queue; every grant is marked before it is answered. So a lock
        granted before that read stops the batch, as `_admit` describes, and only the marked
        entities' leases are read from the bus: none at all while nobody locks. Operations
        already logged are answered `duplicate` by the batch, never 4009 (the store read them).
        """

        async def screen(state: BatchState) -> None:
            refused.clear()
            marked = _touched(batch, state.leased)
            leases: dict[EntityKey, Lease | None] = {}
            if marked:
                try:
                    leases = dict(zip(marked, await self.bus.get_leases(marked), strict=True))
                except Exception as exc:
                    failed = _retry_later(exc, "reading the batch's leases")
                    for index, pending in enumerate(batch):
                        if _touched([pending], state.leased):
                            refused[index] = failed
            for index, locked in self._forbidden(batch, leases, refused).items():
                if _operation(batch[index]).op_key not in state.known_ops:
                    refused[index] = (locked.code, locked.reason)

        return screen

    def _forbidden(
        self,
        batch: list[Pending],
        leases: dict[EntityKey, Lease | None],
        skip: Container[int] = (),
    ) -> dict[int, Locked]:
        """The operations of the batch (but those at `skip`) that these leases forbid, by
        position; an entity missing from `leases` has none."""
        now = time.time()
        forbidden: dict[int, Locked] = {}
        for index, pending in enumerate(batch):
            item = pending.item
            if isinstance(item, Operation) and index not in skip:
                try:
                    self._check_leases(item, pending.session.terminal_id, leases, now)
                except Locked as exc:
                    forbidden[index] = exc
        return forbidden

    def _check_leases(
        self, op: Operation, writer: str, leases: dict[EntityKey, Lease | None], now: float
    ) -> None:
        needs_lock = op.operation != "CREATE" and (
            op.requires_lock or self.engine.policies[op.entity_type].requires_lock
        )
        for key in op.touched_keys():
            check_write(key, leases.get(key), writer, needs_lock, now)

    def _refuse(self, pending: Pending, code: int, reason: str) -> None:
        """Answer an item that does not join the batch, or whose batch failed."""
        item = pending.item
        self.sink.answered(refused(pending.session, item, code == Code.TRY_AGAIN_LATER))
        pending.session.own_op_answered(own_op_id(item), None)
        pending.session.send(refusal(item, code, reason))

    async def _commit(self, batch: list[Pending], laps: Laps) -> None:
        items = [p.item for p in batch]
        request = batch_request(items, laps)
        now = utc_now_iso()

        written: list[Entity] = []
        # What the leases forbid, when the store's transaction checks them (`_screen`).
        refused: dict[int, tuple[int, str]] = {}
        screen = self._screen(batch, refused) if self.store.marks_leases else None

        def decide(state: BatchState) -> tuple[list[Outcome], BatchWrite]:
            admitted = [item for i, item in enumerate(items) if i not in refused]
            outcomes, write = self.engine.decide(admitted, state, now)
            written[:] = write.entities  # the last decision is the one committed
            return outcomes, write

        started = time.monotonic()
        commit = asyncio.ensure_future(self.store.commit(request, decide, screen))
        try:
            async with asyncio.timeout(self.limits.commit_timeout):
                outcomes = await asyncio.shield(commit)
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                # The transaction may still land: its pushes go out then, and a retry of any
                # of its operations is answered `duplicate`, so "retry" is always safe.
                commit.add_done_callback(lambda done: self._late_commit(done, written))
                reason = "storage did not answer in time; retry"
            elif isinstance(exc, ChefiaError):
                reason = exc.reason
            else:
                log.exception("commit failed")
                reason = "storage error; retry"
            for pending in batch:
                self._refuse(pending, Code.TRY_AGAIN_LATER, reason)
            return
        for index, (code, reason) in sorted(refused.items()):
            self._refuse(batch[index], code, reason)
        batch = [p for i, p in enumerate(batch) if i not in refused]
        committed = time.monotonic() - started
        # Before anyone is answered: a read after a confirmation must find this version. A
        # timed-out commit that landed since goes too: a retry of its ops is answered
        # `duplicate` in this batch, perhaps before its own write-through has run.
        await self.cache.written([*self._late_written, *written])
        laps.lap("cache")
        # Answered and published a slice at a time, letting the loop run in between: a large
        # batch would otherwise hold every other connection up until all of it is done.
        for start in range(0, len(batch), ANSWER_SLICE):
            if start:
                await asyncio.sleep(0)
            end = start + ANSWER_SLICE
            self._answer(batch[start:end], outcomes[start:end])
            await self._publish(batch[start:end], outcomes[start:end])
        await self.sink.flush()
        laps.lap("answer")
        self.sink.committed(len(batch), committed, laps)

    def _late_commit(self, commit: asyncio.Future[list[Outcome]], written: list[Entity]) -> None:
        if commit.cancelled() or commit.exception() is not None:
            return
        log.warning("a timed-out commit landed late; publishing its operations")
        self._late_written.extend(written)
        self._spawn(self._publish_late(commit.result(), written))

    async def _publish_late(self, outcomes: list[Outcome], written: list[Entity]) -> None:
        # Its senders were answered 1013 and may read: the cache first, as for any commit.
        try:
            await self.cache.written(written)
        finally:
            late = {id(e) for e in written}
            self._late_written = [e for e in self._late_written if id(e) not in late]
        pushes: dict[str, list[Push]] = {}
        for outcome in outcomes:
            if outcome.record is not None and outcome.record.seq is not None:
                origin = outcome.record.terminal_id
                pushes.setdefault(outcome.record.store_id, []).append(Push(outcome.record, origin))
        for store_id, store_pushes in pushes.items():
            await self.bus.publish(store_id, store_pushes)

    def _answer(self, batch: list[Pending], outcomes: list[Outcome]) -> None:
        done = time.monotonic()
        server_time = utc_now_iso()
        policies = self.engine.policies
        for pending, outcome in zip(batch, outcomes, strict=True):
            session, item, record = pending.session, pending.item, outcome.record
            session.own_op_answered(own_op_id(item), None if record is None else record.seq)
            self.sink.answered(counted(session, item, pending.received, outcome, done, policies))
            session.send(reply(item, outcome, server_time, policies))

    async def _publish(self, batch: list[Pending], outcomes: list[Outcome]) -> None:
        pushes: dict[str, list[Push]] = {}
        for pending, outcome in zip(batch, outcomes, strict=True):
            record = outcome.record
            # A duplicate with a seq is published again: its first commit may have landed without
            # being published (a connection lost mid-commit). Sessions that have it drop it.
            if record is None or record.seq is None:
                continue
            pushes.setdefault(record.store_id, []).append(Push(record, pending.session.terminal_id))
        for store_id, store_pushes in pushes.items():
            try:
                await self.bus.publish(store_id, store_pushes)
            except Exception as exc:
                # Committed and confirmed already; receivers fill the gap from storage.
                log.warning("publishing to the bus failed: %s", exc)


def _retry_later(exc: Exception, doing: str) -> tuple[int, str]:
    """The answer for an operation that could not be checked: the error's own (1013 for storage
    or Redis down), or 1013 for anything unexpected, logged, so that no operation of a batch is
    left unanswered."""
    if isinstance(exc, ChefiaError):
        return exc.code, exc.reason
    log.exception("%s failed unexpectedly", doing)
    return Code.TRY_AGAIN_LATER, f"{doing} failed; retry"


def _touched(
    batch: Sequence[Pending], within: Container[EntityKey] | None = None
) -> list[EntityKey]:
    """The entities the batch's operations touch (those `within`, if given), each once."""
    return list(
        dict.fromkeys(
            key
            for pending in batch
            if isinstance(pending.item, Operation)
            for key in pending.item.touched_keys()
            if within is None or key in within
        )
    )


def _operation(pending: Pending) -> Operation:
    assert isinstance(pending.item, Operation)
    return pending.item

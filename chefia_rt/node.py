"""The composition root and the write pipeline.

`Node.create(settings)` builds the store, the bus, the engine and the hub. Operations from every
connection of this worker meet in one bounded queue; one writer task takes whatever is waiting (up
to SYNC_BATCH_MAX_OPS), commits it as one transaction with the engine deciding inside it, then
answers each sender and publishes the applied operations to every worker's hub (a slice of the
batch at a time, senders first). Group commit comes from the queue itself: while one transaction
is on disk the next batch gathers, so a busy server commits large batches and an idle one
commits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from chefia_rt import __version__
from chefia_rt.bus.base import Bus, Push
from chefia_rt.bus.memory import MemoryBus
from chefia_rt.cache import RequestCache
from chefia_rt.config import Settings
from chefia_rt.domain import BatchState, BatchWrite, Entity, EntityKey, Operation, Resolution
from chefia_rt.errors import ChefiaError, Code, Locked, Overloaded, StorageUnavailable
from chefia_rt.hub import Hub, Session, snapshot_pages
from chefia_rt.metrics import Metrics, multiproc_dir_from_env
from chefia_rt.monitoring import TOPIC as MONITOR_TOPIC
from chefia_rt.monitoring import MonitorFeed
from chefia_rt.protocol.messages import format_timestamp, sync_error_msg, utc_now_iso
from chefia_rt.stats import TOPIC as STATS_TOPIC
from chefia_rt.stats import ClusterStats, LoopLag
from chefia_rt.store.base import BatchRequest, LogBounds, SessionRecord, Store
from chefia_rt.supervisor import NODE_ID_ENV
from chefia_rt.sync.engine import Engine, Outcome, conflict_id_for, wire_data
from chefia_rt.sync.locks import Lease, TooManyLocks, check_write
from chefia_rt.sync.permissions import Permissions
from chefia_rt.sync.policies import DEFAULT_POLICY_TABLE, PolicyTable
from chefia_rt.terminals import TOPIC as TERMINAL_TOPIC
from chefia_rt.terminals import (
    TerminalDirectory,
    connect_signal,
    disconnect_signal,
    figures_signal,
)

log = logging.getLogger("chefia_rt.node")

HEALTH_PING_TIMEOUT = 2.0
# Operations of a committed batch answered and published before the writer lets the event
# loop run again (a few milliseconds of work at most).
ANSWER_SLICE = 64


@dataclass(slots=True)
class Pending:
    """An operation or resolution waiting for the next batch, with who to answer."""

    item: Operation | Resolution
    session: Session
    received: float


class Stats:
    """This worker's figures for /ws/stats: per-second buckets over the last minute."""

    WINDOW = 60

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._buckets: deque[list[float]] = deque(maxlen=self.WINDOW)
        self._second = -1
        self.operations = 0
        self.conflicts = 0
        self.latency_sum = 0.0
        self.latency_count = 0

    def _bucket(self) -> list[float]:
        second = int(time.monotonic())
        if second != self._second:
            self._second = second
            self._buckets.append([0.0, 0.0])  # messages, operations
        return self._buckets[-1]

    def message(self, count: int = 1) -> None:
        self._bucket()[0] += count

    def operation(self, latency: float, conflict: bool) -> None:
        self._bucket()[1] += 1
        self.operations += 1
        self.conflicts += conflict
        self.latency_sum += latency
        self.latency_count += 1

    def snapshot(self) -> dict[str, float]:
        """The SPEC §6 figures of this worker, plus the counts that weight them in a sum."""
        self._bucket()
        span = max(1, min(self.WINDOW, len(self._buckets)))
        return {
            "message_throughput": round(sum(b[0] for b in self._buckets) / span, 3),
            "operations_per_minute": sum(b[1] for b in self._buckets),
            "average_latency": round(
                1000 * self.latency_sum / self.latency_count if self.latency_count else 0.0, 3
            ),
            "conflict_rate": round(self.conflicts / self.operations if self.operations else 0, 4),
            "uptime_seconds": round(time.monotonic() - self.started, 1),
            "operations": self.operations,
            "conflicts": self.conflicts,
            "latency_count": self.latency_count,
        }


def make_store(settings: Settings) -> Store:
    """The storage backend DATABASE_URL names."""
    if settings.storage_kind == "sqlite":
        from chefia_rt.store.sqlite import SQLiteStore

        return SQLiteStore(settings.sqlite_path)
    from chefia_rt.store.postgres import PostgresStore

    return PostgresStore(
        settings.database_url,
        max_size=settings.database_pool_size,
        command_timeout=settings.sync_commit_timeout,
    )


def make_bus(settings: Settings) -> Bus:
    """The bus REDIS_URL names (in process without it)."""
    if settings.redis_url is None:
        return MemoryBus(lock_max=settings.locks_per_terminal)
    from chefia_rt.bus.redis import RedisBus

    return RedisBus(
        settings.redis_url, prefix=settings.redis_prefix, lock_max=settings.locks_per_terminal
    )


def _retry_later(exc: Exception, doing: str) -> tuple[int, str]:
    """The answer for an operation that could not be checked: the error's own (1013 for storage
    or Redis down), or 1013 for anything unexpected, logged, so that no operation of a batch is
    left unanswered."""
    if isinstance(exc, ChefiaError):
        return exc.code, exc.reason
    log.exception("%s failed unexpectedly", doing)
    return Code.TRY_AGAIN_LATER, f"{doing} failed; retry"


def batch_request(items: Sequence[Operation | Resolution]) -> BatchRequest:
    """What the store must read under lock before the engine can decide these items."""
    request = BatchRequest()
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


def confirmation_msg(outcome: Outcome, server_time: str) -> dict[str, Any]:
    record = outcome.record
    assert record is not None
    return {
        "type": "sync_confirmation",
        "operation_id": record.id,
        "seq": record.seq,
        "version": record.version,
        "status": outcome.status,
        "conflict_resolved": record.conflict_resolved,
        "entity_type": record.entity_type,
        "entity_id": record.entity_id,
        "server_time": server_time,
    }


def conflict_msg(outcome: Outcome, policy: str) -> dict[str, Any]:
    conflict = outcome.conflict
    assert conflict is not None
    op = conflict.operation
    return {
        "type": "sync_conflict",
        "operation_id": op.id,
        "conflict_id": conflict.id,
        "entity_type": op.entity_type,
        "entity_id": op.entity_id,
        "policy": policy,
        "local_data": op.data,
        "local_version": op.version,
        "server_data": conflict.server_data,
        "server_version": conflict.server_version,
    }


class Node:
    """One worker: storage, bus, engine, hub, and the write pipeline between them."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        bus: Bus,
        engine: Engine,
        permissions: Permissions,
        metrics: Metrics | None = None,
        node_name: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.engine = engine
        self.permissions = permissions
        self.hub = Hub(store.read_operations)
        self.cache = RequestCache(store, bus, settings.cache_ttls, settings.cache_enabled)
        self.stats = Stats()
        self.draining = False
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(settings.sync_queue_size)
        self._writer: asyncio.Task[None] | None = None
        self._chores: list[asyncio.Task[None]] = []
        self._log_heads: dict[str, int] = {}
        self.worker_name = f"{socket.gethostname()}/{os.getpid()}"
        # Every terminal of the deployment, from every worker's "terminal" signals.
        self.terminals = TerminalDirectory(
            stale_after=3 * settings.terminal_report_interval + 2,
            retention=settings.terminal_retention,
        )
        self.node_name = node_name or self.worker_name
        self.metrics = metrics or Metrics(known_entity_types(settings))
        self.metrics.terminal_source = self._terminal_states
        self.loop_lag = LoopLag(self.metrics.event_loop_lag)
        self.cluster_stats = ClusterStats(
            self.worker_name, self.node_name, settings.ws_stats_interval
        )
        self.monitor = MonitorFeed(settings, self.terminals, bus, self.worker_name)
        self._background: set[asyncio.Task[Any]] = set()
        # States of timed-out commits that landed, until their own write-through is done.
        self._late_written: list[Entity] = []
        self._idle = asyncio.Event()
        self._idle.set()
        # Items queued so far and items the writer is done with (answered, one way or another);
        # the writer takes them in queue order. Waiters: (items queued then, woken when done).
        self._queued_count = 0
        self._done_count = 0
        self._done_waiters: list[tuple[int, asyncio.Future[None]]] = []

    @classmethod
    def create(cls, settings: Settings) -> Node:
        return cls(
            settings,
            make_store(settings),
            make_bus(settings),
            Engine(PolicyTable(settings.sync_policies), settings.entity_max_bytes),
            Permissions(settings.terminal_permissions),
            Metrics(known_entity_types(settings), multiproc_dir_from_env()),
            os.environ.get(NODE_ID_ENV),
        )

    # ---- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.open()
        await self.store.maintain(self.retention)
        self.bus.on_signal(TERMINAL_TOPIC, self.terminals.handle)
        self.bus.on_signal(STATS_TOPIC, self.cluster_stats.receive)
        self.bus.on_signal(MONITOR_TOPIC, self.monitor.handle)
        await self.bus.start(self._deliver, self._remote_takeover, self.resync_all)
        await self.cache.start()
        # The last backups, so that a monitor sees them even when this worker started after.
        self.monitor.relay_events(await self.store.server_events(None, 20), live=False)
        self._writer = asyncio.create_task(self._write_loop(), name="writer")
        self._chores = [
            asyncio.create_task(self.loop_lag.run(), name="loop-lag"),
            asyncio.create_task(
                self._every(self.settings.sync_maintenance_interval, self._maintain)
            ),
            asyncio.create_task(self._every(self.settings.sync_reconcile_interval, self.reconcile)),
            asyncio.create_task(
                self._every(self.settings.terminal_report_interval, self.report_terminals)
            ),
            asyncio.create_task(self._every(self.settings.ws_stats_interval, self.report)),
            asyncio.create_task(
                self._every(self.settings.monitor_event_poll_interval, self.poll_server_events)
            ),
        ]
        try:
            await self.report()  # the other workers count this one from its start
        except Exception as exc:  # the periodic report tries again
            log.warning("first stats report failed: %s", exc)

    @property
    def retention(self) -> timedelta:
        return timedelta(days=self.settings.sync_log_retention_days)

    @staticmethod
    async def _every(interval: float, chore: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await chore()
            except Exception as exc:  # storage down: try again next time
                log.warning("%s failed: %s", getattr(chore, "__name__", chore), exc)

    def _terminal_states(self) -> list[tuple[str, str, str, bool]]:
        """terminal_status at scrape time: (store_id, terminal_id, type, online) of the
        deployment."""
        return [
            (v.store_id, v.terminal_id, v.terminal_type, v.status == "online")
            for v in self.terminals.views()
        ]

    def _deliver(self, store_id: str, pushes: Sequence[Push]) -> None:
        if pushes:
            self.metrics.delivered(pushes[-1].record.server_time)
        self.hub.deliver(store_id, pushes)
        self.monitor.on_pushes(store_id, pushes)

    async def report(self) -> None:
        """Every few seconds: sample queue depths and health into the metrics, and tell every
        worker this one's stats (/ws/stats across workers and nodes)."""
        self.metrics.queues(self._queue.qsize(), [s.queued for s in self.hub.sessions()])
        self.metrics.cache(self.cache.stats())
        ok = [False, False]
        for index, ping in enumerate((self.store.ping, self.bus.ping)):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(HEALTH_PING_TIMEOUT):
                    ok[index] = await ping()
        self.metrics.health(*ok)
        await self.bus.signal(STATS_TOPIC, self.cluster_stats.payload(self.websocket_stats()))

    async def _maintain(self) -> None:
        await self.store.maintain(self.retention)

    async def report_terminals(self) -> None:
        """Tell every worker the figures of this worker's sessions; age the directory."""
        await self.bus.signal(TERMINAL_TOPIC, figures_signal(self.hub.sessions(), self.worker_name))
        self.terminals.sweep()
        await self.monitor.tick()

    async def poll_server_events(self) -> None:
        """Backups and restores (written by the CLI into storage) for the monitors' feeds."""
        self.monitor.relay_events(await self.store.server_events(self.monitor.last_event, 100))

    def _remote_takeover(
        self, store_id: str, terminal_id: str, session_id: str, opened_at: float
    ) -> None:
        """A session of a terminal opened on another worker: an older one here gives way."""
        local = self.hub.get(store_id, terminal_id)
        if local is None or local.session_id == session_id or local.opened_at > opened_at:
            return
        local.replaced = True
        local.close(4004, "replaced by a newer connection of the same terminal")

    def resync_all(self) -> None:
        """Pushes may have been missed (the bus reconnected): catch every live session up."""
        for session in self.hub.sessions():
            if session.live and not session.closed:
                self.hub.resume(session, session.next_seq - 1)

    async def reconcile(self) -> None:
        """Catch up live sessions that stayed behind their store's log since the last check.

        The bus is fast but not complete (a publish lost while Redis restarts, a commit that
        landed after its timeout): a session still behind what storage had one check ago missed
        something, and fills the gap from storage like any other gap.
        """
        seen = self._log_heads
        heads = {}
        for store_id in self.hub.store_ids():
            heads[store_id] = (await self.store.log_bounds(store_id)).last_seq
            behind = seen.get(store_id, 0)
            for session in self.hub.store_sessions(store_id):
                if session.live and not session.closed and session.next_seq <= behind:
                    self.hub.resume(session, session.next_seq - 1)
        # Only a complete round replaces the last one: a failed read must not forget what an
        # earlier round saw (that would delay the catch-up by a round).
        self._log_heads = heads

    async def drain(self, timeout: float) -> None:
        """Stop taking operations and commit what is queued (SIGTERM)."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()

    async def stop(self) -> None:
        for chore in self._chores:
            chore.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chore
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        for session in self.hub.sessions():
            await session.stop()
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        await self.cache.close()
        await self.bus.close()
        await self.store.close()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a side task (session log, lock release) owned by the node."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._side_task_done)

    def _side_task_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Side work (the session log, releasing locks) may fail while storage or the bus
            # is down; the connection's own work is not affected, so this is only logged.
            log.warning("side task %s failed: %s", task.get_coro(), exc)

    # ---- sessions ---------------------------------------------------------------------------

    async def open_session(
        self, session: Session, since: int | None, epoch: str | None = None
    ) -> None:
        """Register a connection, greet it, and start its stream at `since` (or now).

        `epoch`, sent with `since`, is the epoch that watermark was read in: another one (the
        store was restored since) gets resync_required whatever the seqs say."""
        old = self.hub.attach(session)
        self.metrics.connected(session.terminal_type)  # close_session counts it out
        if old is not None:
            old.replaced = True
            old.close(4004, "replaced by a newer connection of the same terminal")
        await self.bus.signal(TERMINAL_TOPIC, connect_signal(session, self.worker_name))
        await self.bus.register(
            session.store_id, session.terminal_id, session.session_id, session.opened_at
        )
        bounds = await self.store.log_bounds(session.store_id)
        session.send(
            {
                "type": "connection_established",
                "terminal_id": session.terminal_id,
                "terminal_type": session.terminal_type,
                "store_id": session.store_id,
                "session_id": session.session_id,
                "server_time": utc_now_iso(),
                "last_seq": bounds.last_seq,
                "epoch": bounds.epoch,
                "heartbeat_interval": self.settings.ws_heartbeat_interval,
                "encoding": session.encoding,
                "worker": self.worker_name,
            }
        )
        session.start()
        self.position(session, since, bounds, epoch)
        if session.terminal_type == "monitor":
            self.monitor.attach(session)
        self.spawn(self.store.record_session(self._session_record(session, connected=True)))

    def position(
        self, session: Session, since: int | None, bounds: LogBounds, epoch: str | None = None
    ) -> None:
        """Stream from `since` when the log still reaches it (in the same epoch, when the
        terminal names one); else say resync_required."""
        session.own_ops.clear()  # a resume replays the terminal's own ops too (SPEC §4)
        if since is None:
            self.hub.resume(session, bounds.last_seq)
            return
        reason = None
        if epoch is not None and epoch != bounds.epoch:
            reason = "the store's log was restored since that watermark (another epoch)"
        elif since > bounds.last_seq:
            reason = "since is ahead of the server's log"
        elif since + 1 < bounds.oldest_seq:
            reason = "the operation log no longer reaches back to since"
        if reason is not None:
            self.metrics.resumed("resync_required")
            session.send(
                {
                    "type": "resync_required",
                    "since": since,
                    "oldest_seq": bounds.oldest_seq,
                    "last_seq": bounds.last_seq,
                    "epoch": bounds.epoch,
                    "reason": reason + "; send snapshot_request",
                }
            )
            self.hub.resume(session, bounds.last_seq)
            return
        self.metrics.resumed("resume")
        self.hub.resume(session, since)

    async def resume(self, session: Session, since: int, epoch: str | None = None) -> None:
        session.pause()  # pushes wait for the catch-up from `since`
        try:
            bounds = await self.store.log_bounds(session.store_id)
        except ChefiaError:
            self.hub.resume(session, session.next_seq - 1)  # refused: the stream goes on as it was
            raise
        self.position(session, since, bounds, epoch)

    async def close_session(self, session: Session) -> None:
        """The connection ended: forget it and, unless a newer one replaced it, its locks."""
        await session.stop()
        self.metrics.disconnected(session.terminal_type)
        self.monitor.detach(session)
        if self.hub.detach(session) and not session.replaced:
            # A replaced session says nothing: the monitor must not see a false "offline".
            await self.bus.signal(
                TERMINAL_TOPIC, disconnect_signal(session, self.worker_name, session.close_code)
            )
            self.spawn(
                self.bus.unregister(session.store_id, session.terminal_id, session.session_id)
            )
        self.spawn(self.store.record_session(self._session_record(session, connected=False)))

    def _session_record(self, session: Session, connected: bool) -> SessionRecord:
        return SessionRecord(
            session_id=session.session_id,
            terminal_id=session.terminal_id,
            terminal_type=session.terminal_type,
            store_id=session.store_id,
            user_id=session.user_id,
            connected_at=session.connected_at,
            disconnected_at=None if connected else utc_now_iso(),
            bytes_in=session.bytes_in,
            bytes_out=session.bytes_out,
            messages_in=session.messages_in,
            messages_out=session.messages_out,
            close_code=None if connected else session.close_code,
        )

    async def snapshot(self, session: Session, entity_types: Sequence[str] | None) -> None:
        """Send the store's state at a watermark, then live operations after it."""
        session.pause()  # the stream restarts after the snapshot's watermark
        self.metrics.resumed("snapshot")
        try:
            # Read before the snapshot: a restore between the two reads labels the snapshot
            # with the old epoch, and the terminal's next resume then asks for another one.
            epoch = (await self.store.log_bounds(session.store_id)).epoch
            seq, entities = await self.store.snapshot(session.store_id, entity_types)
        except ChefiaError:
            self.hub.resume(session, session.next_seq - 1)  # refused: the stream goes on as it was
            raise
        wire = [
            {
                "entity_type": e.key.entity_type,
                "entity_id": e.key.entity_id,
                "version": e.version,
                "data": wire_data(e),
                "deleted": e.deleted,
            }
            for e in entities
        ]
        del entities
        # Pages that each fit a frame, sent as the terminal reads them, then the stream after.
        pages = snapshot_pages(
            session.store_id, seq, epoch, wire, session.encoding, self.settings.max_ws_message_size
        )
        self.hub.resume(session, seq, pages)

    # ---- locks ------------------------------------------------------------------------------

    async def acquire_lock(
        self,
        session: Session,
        entity_type: str,
        entity_id: str,
        timeout_ms: int,
        lock_id: str | None,
    ) -> dict[str, Any]:
        self.permissions.check_lock(session.terminal_type, entity_type)
        key = EntityKey(session.store_id, entity_type, entity_id)
        lock_id = lock_id or f"lock-{uuid.uuid4().hex}"
        try:
            taken, lease = await self.bus.acquire_lease(
                key, session.terminal_id, lock_id, timeout_ms / 1000
            )
        except TooManyLocks as exc:
            return {
                "type": "lock_failed",
                "lock_id": lock_id,
                "entity_type": entity_type,
                "entity_id": entity_id,
                "reason": str(exc),
                "locked_by": None,
                "locked_until": None,
            }
        if taken and lease is not None:
            return {
                "type": "lock_acquired",
                "lock_id": lease.lock_id,
                "entity_type": entity_type,
                "entity_id": entity_id,
                "expires_at": _iso(lease.expires_at),
            }
        return {
            "type": "lock_failed",
            "lock_id": lock_id,
            "entity_type": entity_type,
            "entity_id": entity_id,
            "reason": "locked by another terminal",
            "locked_by": lease.owner if lease else None,
            "locked_until": _iso(lease.expires_at) if lease else None,
        }

    async def release_lock(
        self, session: Session, entity_type: str, entity_id: str, lock_id: str | None
    ) -> dict[str, Any]:
        key = EntityKey(session.store_id, entity_type, entity_id)
        released = await self.bus.release_lease(key, session.terminal_id)
        return {
            "type": "lock_released",
            "lock_id": lock_id,
            "entity_type": entity_type,
            "entity_id": entity_id,
            "released": released,
        }

    # ---- writes -----------------------------------------------------------------------------

    async def check_operation(self, session: Session, op: Operation) -> None:
        """Permissions, before an operation may join a batch (its locks are checked by the
        writer, just before the batch commits: see `_admit`)."""
        fields: set[str] = set(op.data)
        if op.operation == "BULK_UPDATE":
            fields = {f for u in op.data["updates"] for f in u.get("data", {})}
        self.permissions.check_write(session.terminal_type, op.entity_type, op.operation, fields)

    async def _admit(self, batch: list[Pending]) -> list[Pending]:
        """The batch less the operations that the leases of their entities forbid, which are
        answered 4009 here.

        The leases of the whole batch are read in one call (one round trip to Redis), after
        the operations left the queue and right before their commit starts: a lock granted
        before this read stops every operation of the batch, however long it waited in the
        queue. A lease that cannot be read refuses the operations with 1013 (retry), never
        lets them past.
        """
        ops = [p for p in batch if isinstance(p.item, Operation)]
        if not ops:
            return batch
        keys = list(dict.fromkeys(k for p in ops for k in _operation(p).touched_keys()))
        try:
            leases = dict(zip(keys, await self.bus.get_leases(keys), strict=True))
        except Exception as exc:
            code, reason = _retry_later(exc, "reading the batch's leases")
            for pending in ops:
                self._refuse(pending, code, reason)
            return [p for p in batch if not isinstance(p.item, Operation)]
        now = time.time()
        refused: dict[int, Locked] = {}
        for index, pending in enumerate(batch):
            item = pending.item
            if isinstance(item, Operation):
                try:
                    self._check_leases(item, pending.session.terminal_id, leases, now)
                except Locked as exc:
                    refused[index] = exc
        if not refused:
            return batch
        # A terminal retries when it lost the confirmation, typically with the connection,
        # and that also released its locks. An operation already in the log must still be
        # answered `duplicate` (SPEC §3 idempotency), never 4009: one read for all of them.
        try:
            logged = await self.store.logged([_operation(batch[i]).op_key for i in refused])
        except Exception as exc:
            code, reason = _retry_later(exc, "reading the operation log")
            for index in refused:
                self._refuse(batch[index], code, reason)
            return [p for i, p in enumerate(batch) if i not in refused]
        admitted = []
        for index, pending in enumerate(batch):
            locked = refused.get(index)
            if locked is None or _operation(pending).op_key in logged:
                admitted.append(pending)  # a logged one is answered `duplicate` by the batch
            else:
                self._refuse(pending, locked.code, locked.reason)
        return admitted

    def _check_leases(
        self, op: Operation, writer: str, leases: dict[EntityKey, Lease | None], now: float
    ) -> None:
        needs_lock = op.operation != "CREATE" and (
            op.requires_lock or self.engine.policies[op.entity_type].requires_lock
        )
        for key in op.touched_keys():
            check_write(key, leases[key], writer, needs_lock, now)

    def _refuse(self, pending: Pending, code: int, reason: str) -> None:
        """Answer an operation that does not join the batch (counted like any answer)."""
        status = "retry" if code == Code.TRY_AGAIN_LATER else "error"
        self.metrics.answered(*_item_labels(pending.item), status, None)
        pending.session.own_ops.discard(_own_op_id(pending.item))
        pending.session.send(
            sync_error_msg(_item_id(pending.item), code, reason, *_item_entity(pending.item))
        )

    def submit(self, item: Operation | Resolution, session: Session, received: float) -> None:
        """Queue an item for the next batch; Overloaded (1013) when the queue is full."""
        if self.draining:
            raise StorageUnavailable("server is shutting down; retry on reconnect")
        try:
            self._queue.put_nowait(Pending(item, session, received))
        except asyncio.QueueFull:
            raise Overloaded("server busy: write queue full, retry") from None
        self._idle.clear()  # set again by the writer once the queue is empty
        self._queued_count += 1
        # Known as this session's own from now on, so no path of the stream echoes it back.
        session.own_ops.add(_own_op_id(item))

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
        limit = self.settings.sync_batch_max_ops
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < limit and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            taken = len(batch)
            try:
                batch = await self._admit(batch)
                if batch:
                    await self._commit(batch)
            except Exception:
                log.exception("batch of %d failed unexpectedly", len(batch))
            finally:
                self._done_count += taken
                self._wake_done_waiters()
                if self._queue.empty():
                    self._idle.set()

    async def _commit(self, batch: list[Pending]) -> None:
        items = [p.item for p in batch]
        request = batch_request(items)
        now = utc_now_iso()

        written: list[Entity] = []

        def decide(state: BatchState) -> tuple[list[Outcome], BatchWrite]:
            outcomes, write = self.engine.decide(items, state, now)
            written[:] = write.entities  # the last decision is the one committed
            return outcomes, write

        started = time.monotonic()
        commit = asyncio.ensure_future(self.store.commit(request, decide))
        try:
            async with asyncio.timeout(self.settings.sync_commit_timeout):
                outcomes = await asyncio.shield(commit)
            self.metrics.committed(len(batch), time.monotonic() - started)
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
                self.metrics.answered(*_item_labels(pending.item), "retry", None)
                pending.session.own_ops.discard(_own_op_id(pending.item))
                pending.session.send(
                    sync_error_msg(
                        _item_id(pending.item), 1013, reason, *_item_entity(pending.item)
                    )
                )
            return
        # Before anyone is answered: a read after a confirmation must find this version. A
        # timed-out commit that landed since goes too: a retry of its ops is answered
        # `duplicate` in this batch, perhaps before its own write-through has run.
        await self.cache.written([*self._late_written, *written])
        # Answered and published a slice at a time, letting the loop run in between: a large
        # batch would otherwise hold every other connection up until all of it is done.
        for start in range(0, len(batch), ANSWER_SLICE):
            if start:
                await asyncio.sleep(0)
            end = start + ANSWER_SLICE
            self._answer(batch[start:end], outcomes[start:end])
            await self._publish(batch[start:end], outcomes[start:end])
        await self.monitor.flush()  # the batch's conflicts, after its operations

    def _late_commit(self, commit: asyncio.Future[list[Outcome]], written: list[Entity]) -> None:
        if commit.cancelled() or commit.exception() is not None:
            return
        log.warning("a timed-out commit landed late; publishing its operations")
        self._late_written.extend(written)
        self.spawn(self._publish_late(commit.result(), written))

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
        for pending, outcome in zip(batch, outcomes, strict=True):
            session = pending.session
            record = outcome.record
            if record is None or record.seq is None or record.seq < session.next_seq:
                session.own_ops.discard(_own_op_id(pending.item))  # no place ahead in the stream
            self._count(pending, outcome, done)
            if outcome.status == "error":
                assert outcome.error is not None
                session.send(
                    sync_error_msg(
                        outcome.id,
                        outcome.error.code,
                        outcome.error.reason,
                        *_item_entity(pending.item),
                    )
                )
                continue
            if outcome.status == "conflict":
                assert outcome.conflict is not None
                policy = self.engine.policies[outcome.conflict.operation.entity_type].policy
                session.send(conflict_msg(outcome, policy))
                self.stats.operation(done - pending.received, conflict=True)
                session.conflicts += 1
                self.monitor.count(session.store_id, done - pending.received, conflict=True)
                self.monitor.note_conflict(outcome.conflict.operation, "pending", policy)
                continue
            session.send(confirmation_msg(outcome, server_time))
            if outcome.status != "duplicate":
                conflict = outcome.record is not None and outcome.record.conflict_resolved
                self.stats.operation(done - pending.received, conflict=conflict)
                session.ops += 1
                session.conflicts += conflict
                self.monitor.count(session.store_id, done - pending.received, conflict)
                if conflict and outcome.record is not None:
                    policy = self.engine.policies[outcome.record.entity_type].policy
                    self.monitor.note_conflict(outcome.record, outcome.status, policy)

    def _count(self, pending: Pending, outcome: Outcome, done: float) -> None:
        """The metrics of one answer: status, latency of new work, and the conflict policy."""
        record = outcome.record
        labels: tuple[str | None, str]
        if record is not None:
            labels = (record.entity_type, record.operation)
        elif outcome.conflict is not None:
            labels = (outcome.conflict.operation.entity_type, outcome.conflict.operation.operation)
        else:
            labels = _item_labels(pending.item)
        fresh = outcome.status not in ("duplicate", "error")
        policy = None
        settled = fresh and record is not None and record.conflict_resolved
        if outcome.status == "conflict" or settled:
            policy = self.engine.policies[labels[0] or ""].policy
        latency = done - pending.received if fresh else None
        self.metrics.answered(labels[0], labels[1], outcome.status, latency, policy)

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

    # ---- health and stats -------------------------------------------------------------------

    async def health(self) -> tuple[bool, dict[str, Any]]:
        storage_ok = await self.store.ping()
        bus_ok = await self.bus.ping()
        # Draining answers 503 so that a load balancer stops sending terminals here.
        status = "draining" if self.draining else "ok" if storage_ok and bus_ok else "degraded"
        body = {
            "status": status,
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self.stats.started, 1),
            "storage": {"kind": self.store.kind, "ok": storage_ok},
            "bus": {"kind": self.bus.kind, "ok": bus_ok},
            "workers": self.settings.workers,
            "auth": "jwt" if self.settings.auth_enabled else "open",
            "connections": len(self.hub),
            "draining": self.draining,
        }
        if not self.settings.auth_enabled:
            body["warning"] = "open mode: JWT_SECRET_KEY is not set, any terminal may connect"
        return storage_ok and not self.draining, body

    def cluster_websocket_stats(self) -> dict[str, Any]:
        """/ws/stats: every worker of every node heard from recently, this one fresh."""
        return self.cluster_stats.aggregate(self.websocket_stats())

    def websocket_stats(self) -> dict[str, Any]:
        """This worker's own figures."""
        by_type: dict[str, int] = {}
        for session in self.hub.sessions():
            by_type[session.terminal_type] = by_type.get(session.terminal_type, 0) + 1
        return {
            "total_connections": len(self.hub),
            "connections_by_type": by_type,
            **self.stats.snapshot(),
            **self.loop_lag.snapshot(),
        }


def _iso(epoch: float) -> str:
    return format_timestamp(datetime.fromtimestamp(epoch, UTC))


def _own_op_id(item: Operation | Resolution) -> str:
    """The operation an item writes: a resolution writes its conflict's operation."""
    if isinstance(item, Operation):
        return item.id
    return item.conflict_id.removeprefix(conflict_id_for(""))


def known_entity_types(settings: Settings) -> set[str]:
    """The entity types metrics name (any other counts as "other", so labels stay bounded)."""
    return set(DEFAULT_POLICY_TABLE) | set(settings.sync_policies)


def _item_labels(item: Operation | Resolution) -> tuple[str | None, str]:
    """(entity_type, operation) of an item with no outcome record to name them."""
    if isinstance(item, Operation):
        return item.entity_type, item.operation
    return None, "RESOLUTION"


def _operation(pending: Pending) -> Operation:
    assert isinstance(pending.item, Operation)
    return pending.item


def _item_id(item: Operation | Resolution) -> str:
    return item.id if isinstance(item, Operation) else item.conflict_id


def _item_entity(item: Operation | Resolution) -> tuple[str | None, str | None]:
    if isinstance(item, Operation):
        return item.entity_type, item.entity_id
    return None, None

"""One worker: the composition of storage, bus, engine, hub and write pipeline, its sessions,
locks, periodic chores and health.

`Worker.create(settings)` builds the store and the bus (`wiring.py`), the engine and the hub; the
write pipeline (`pipeline.py`) commits what the connections send, and this class counts its
answers (`answered`) for the metrics, the worker's stats, the sessions and the monitors.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from datetime import timedelta
from typing import Any

from chefia_rt import __version__
from chefia_rt.answers import Answer
from chefia_rt.bus.base import Bus, Push
from chefia_rt.cache import RequestCache
from chefia_rt.chores import Chores
from chefia_rt.config import Settings
from chefia_rt.domain import EntityKey, Operation
from chefia_rt.hub import Hub, Session
from chefia_rt.metrics import Metrics, multiproc_dir_from_env
from chefia_rt.monitoring import TOPIC as MONITOR_TOPIC
from chefia_rt.monitoring import MonitorFeed
from chefia_rt.pipeline import Limits, WritePipeline
from chefia_rt.protocol import messages as m
from chefia_rt.sessions import Sessions
from chefia_rt.stats import TOPIC as STATS_TOPIC
from chefia_rt.stats import ClusterStats, LoopLag, WorkerStats
from chefia_rt.store.base import Store
from chefia_rt.supervisor import NODE_ID_ENV
from chefia_rt.sync.engine import Engine
from chefia_rt.sync.locks import Lease, TooManyLocks
from chefia_rt.sync.permissions import Permissions
from chefia_rt.sync.policies import PolicyTable
from chefia_rt.terminals import TOPIC as TERMINAL_TOPIC
from chefia_rt.terminals import (
    TerminalDirectory,
)
from chefia_rt.wiring import known_entity_types, make_bus, make_store

log = logging.getLogger("chefia_rt.worker")


class Worker:
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
        self.stats = WorkerStats()
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
        self.chores = Chores(self)
        self.sessions = Sessions(
            settings, store, bus, self.hub, self.metrics, self.monitor, self.worker_name, self.spawn
        )
        self.pipeline = WritePipeline(
            Limits(
                settings.sync_batch_max_ops, settings.sync_queue_size, settings.sync_commit_timeout
            ),
            store,
            bus,
            engine,
            self.cache,
            self,
            self.spawn,
        )

    @classmethod
    def create(cls, settings: Settings) -> Worker:
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
        await self.bus.start(self._deliver, self.sessions.remote_takeover, self.sessions.resync_all)
        await self.cache.start()
        # The last backups, so that a monitor sees them even when this worker started after.
        self.monitor.relay_events(await self.store.server_events(None, 20), live=False)
        self.pipeline.start()
        self.chores.start()
        try:
            await self.chores.report()  # the other workers count this one from its start
        except Exception as exc:  # the periodic report tries again
            log.warning("first stats report failed: %s", exc)

    @property
    def retention(self) -> timedelta:
        return timedelta(days=self.settings.sync_log_retention_days)

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

    @property
    def draining(self) -> bool:
        return self.pipeline.draining

    async def drain(self, timeout: float) -> None:
        """Stop taking operations and commit what is queued (SIGTERM)."""
        await self.pipeline.drain(timeout)

    async def stop(self) -> None:
        await self.chores.stop()
        await self.pipeline.stop()
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
            return m.lock_failed_msg(lock_id, entity_type, entity_id, str(exc))
        if taken and lease is not None:
            await self._mark(lease)
            return m.lock_acquired_msg(lease.lock_id, entity_type, entity_id, lease.expires_at)
        return m.lock_failed_msg(
            lock_id,
            entity_type,
            entity_id,
            "locked by another terminal",
            lease.owner if lease else None,
            lease.expires_at if lease else None,
        )

    async def _mark(self, lease: Lease) -> None:
        """Mark a granted lease in storage before the grant is answered: a store that marks
        leases has its writer read only the marked entities' leases. A grant that could not be
        marked is answered 1013 (StorageUnavailable, retry), never granted: its lease stays in
        the bus until it expires, and writes check it only as far as an earlier mark reaches."""
        await self.store.mark_lease(lease.key, lease.expires_at)

    async def release_lock(
        self, session: Session, entity_type: str, entity_id: str, lock_id: str | None
    ) -> dict[str, Any]:
        key = EntityKey(session.store_id, entity_type, entity_id)
        released = await self.bus.release_lease(key, session.terminal_id)
        return m.lock_released_msg(lock_id, entity_type, entity_id, released)

    # ---- writes -----------------------------------------------------------------------------

    async def check_operation(self, session: Session, op: Operation) -> None:
        """Permissions, before an operation may join a batch (its locks are checked by the
        writer as the batch's commit begins: see WritePipeline `_admit` and `_screen`)."""
        fields: set[str] = set(op.data)
        if op.operation == "BULK_UPDATE":
            fields = {f for u in op.data["updates"] for f in u.get("data", {})}
        self.permissions.check_write(session.terminal_type, op.entity_type, op.operation, fields)

    def answered(self, answer: Answer) -> None:
        """Count one answer of the write pipeline, everywhere it is counted."""
        self.metrics.answered(
            answer.entity_type, answer.operation, answer.status, answer.latency, answer.policy
        )
        if answer.latency is None:
            return  # duplicates, errors and refusals are no new work
        session = answer.session
        self.stats.operation(answer.latency, answer.conflicted)
        session.ops += answer.status != "conflict"
        session.conflicts += answer.conflicted
        self.monitor.count(session.store_id, answer.latency, answer.conflicted)
        if answer.noted is not None:
            status = "pending" if answer.status == "conflict" else answer.status
            assert answer.policy is not None
            self.monitor.note_conflict(answer.noted, status, answer.policy)

    def committed(self, operations: int, seconds: float, laps: Mapping[str, float]) -> None:
        self.metrics.committed(operations, seconds, laps)

    async def flush(self) -> None:
        await self.monitor.flush()  # the batch's conflicts, after its operations

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

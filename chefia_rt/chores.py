"""A worker's periodic chores: stats and queue samples, the terminal directory's figures,
server events for the monitors, the log's retention, and the reconcile that catches up sessions
the bus left behind."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from chefia_rt.stats import TOPIC as STATS_TOPIC
from chefia_rt.terminals import TOPIC as TERMINAL_TOPIC
from chefia_rt.terminals import figures_signal

if TYPE_CHECKING:
    from chefia_rt.worker import Worker

log = logging.getLogger("chefia_rt.worker")

HEALTH_PING_TIMEOUT = 2.0


class Chores:
    """The periodic tasks of one worker, each every its own interval (Settings)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._tasks: list[asyncio.Task[None]] = []
        self._log_heads: dict[str, int] = {}

    def start(self) -> None:
        settings = self.worker.settings
        self._tasks = [
            asyncio.create_task(self.worker.loop_lag.run(), name="loop-lag"),
            asyncio.create_task(self._every(settings.sync_maintenance_interval, self._maintain)),
            asyncio.create_task(self._every(settings.sync_reconcile_interval, self.reconcile)),
            asyncio.create_task(
                self._every(settings.terminal_report_interval, self.report_terminals)
            ),
            asyncio.create_task(self._every(settings.ws_stats_interval, self.report)),
            asyncio.create_task(
                self._every(settings.monitor_event_poll_interval, self.poll_server_events)
            ),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @staticmethod
    async def _every(interval: float, chore: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await chore()
            except Exception as exc:  # storage down: try again next time
                log.warning("%s failed: %s", getattr(chore, "__name__", chore), exc)

    async def report(self) -> None:
        """Every few seconds: sample queue depths and health into the metrics, write the batch
        stages timed since, and tell every worker this one's stats (/ws/stats across workers and
        nodes)."""
        self.worker.metrics.queues(
            self.worker.pipeline.depth(), [s.queued for s in self.worker.hub.sessions()]
        )
        self.worker.metrics.cache(self.worker.cache.stats())
        self.worker.metrics.flush_stages()
        ok = [False, False]
        for index, ping in enumerate((self.worker.store.ping, self.worker.bus.ping)):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(HEALTH_PING_TIMEOUT):
                    ok[index] = await ping()
        self.worker.metrics.health(*ok)
        await self.worker.bus.signal(
            STATS_TOPIC, self.worker.cluster_stats.payload(self.worker.websocket_stats())
        )

    async def _maintain(self) -> None:
        await self.worker.store.maintain(self.worker.retention)

    async def report_terminals(self) -> None:
        """Tell every worker the figures of this worker's sessions; age the directory."""
        await self.worker.bus.signal(
            TERMINAL_TOPIC, figures_signal(self.worker.hub.sessions(), self.worker.worker_name)
        )
        self.worker.terminals.sweep()
        await self.worker.monitor.tick()

    async def poll_server_events(self) -> None:
        """Backups and restores (written by the CLI into storage) for the monitors' feeds."""
        self.worker.monitor.relay_events(
            await self.worker.store.server_events(self.worker.monitor.last_event, 100)
        )

    async def reconcile(self) -> None:
        """Catch up live sessions that stayed behind their store's log since the last check.

        The bus is fast but not complete (a publish lost while Redis restarts, a commit that
        landed after its timeout): a session still behind what storage had one check ago missed
        something, and fills the gap from storage like any other gap.
        """
        seen = self._log_heads
        heads = {}
        for store_id in self.worker.hub.store_ids():
            heads[store_id] = (await self.worker.store.log_bounds(store_id)).last_seq
            behind = seen.get(store_id, 0)
            for session in self.worker.hub.store_sessions(store_id):
                if session.live and not session.closed and session.next_seq <= behind:
                    self.worker.hub.resume(session, session.next_seq - 1)
        # Only a complete round replaces the last one: a failed read must not forget what an
        # earlier round saw (that would delay the catch-up by a round).
        self._log_heads = heads

"""The monitor feed: what `monitor` terminals see of their store (docs/protocol.md §6;
docs/operations.md §7).

A monitor is an ordinary read-only terminal of its store that also receives:
- on connect, `terminal_list` (every terminal of the store, from the cluster-wide directory), the
  active `system_alert`s and the store's recent `sync_activity`;
- `terminal_status_update` when a terminal connects, disconnects or is forgotten, and every few
  seconds a `terminal_list` of the terminals whose figures changed;
- `sync_activity` for every operation of the store (from the pushes every worker gets anyway),
  every conflict and lock (a "monitor" signal from the worker where it happened) and every backup
  or restore (server events that the backup command writes to storage);
- `performance_metrics`: terminals' own reports as they come, and the server's figures for the
  store every TERMINAL_REPORT_INTERVAL (ops/min from every worker's "stats" signals, latency,
  connections);
- `system_alert`s raised and cleared by thresholds (MONITOR_ALERT_*).

Every worker runs one feed for its own monitors. Each message is built once per store and event
and shared as one OutFrame (encoded at most once per encoding) by the store's monitors; monitors
are slow readers like any terminal (bounded push lane, closed 1013 when it overflows). The
server's figures are counted in `monitor_figures.py`, the alerts' rules are `monitor_alerts.py`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any

from chefia_rt.bus.base import Push, Signals
from chefia_rt.config import Settings
from chefia_rt.domain import Operation, OpRecord
from chefia_rt.hub import OutFrame, Session
from chefia_rt.monitor_alerts import StoreAlerts, wanted_alerts
from chefia_rt.monitor_figures import StoreFigures
from chefia_rt.protocol import messages as m
from chefia_rt.protocol.messages import format_epoch, utc_now_iso
from chefia_rt.store.base import ServerEvent
from chefia_rt.terminals import ChangeKind, TerminalDirectory, TerminalView, reported_figures

log = logging.getLogger("chefia_rt.monitoring")

TOPIC = "monitor"
RECENT_ACTIVITY = 200  # lines of activity per store a monitor gets when it connects
# Stores whose recent activity is kept (the most recently active ones): every worker sees every
# store's operations, and a chain of thousands of stores must not cost each worker gigabytes.
RECENT_STORES = 256
# What a terminal's performance_metrics may carry on to monitors besides the known figures.
MAX_EXTRA_METRICS = 32
MAX_METRIC_TEXT = 128


def terminal_message(view: TerminalView, change: str, now: str) -> dict[str, Any]:
    """`terminal_status_update` of one terminal."""
    return m.terminal_status_update_msg(
        store_id=view.store_id,
        terminal_id=view.terminal_id,
        terminal_type=view.terminal_type,
        status=view.status,
        change=change,
        connected_since=view.connected_since,
        last_seen=view.last_seen,
        disconnected_at=view.disconnected_at,
        ops=view.ops,
        conflicts=view.conflicts,
        bytes_in=view.bytes_in,
        bytes_out=view.bytes_out,
        reconnects=view.reconnects,
        response_time_ms=view.response_time_ms,
        memory_mb=view.memory_mb,
        cache_hit_rate=view.cache_hit_rate,
        sent_seq=view.sent_seq,
        acked_seq=view.acked_seq,
        worker=view.worker,
        server_time=now,
    )


def clean_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A terminal's report as monitors get it: numbers, booleans and short texts only, a bounded
    number of them (the report is the terminal's own input, up to a whole frame)."""
    clean: dict[str, Any] = {}
    for name, value in metrics.items():
        if len(clean) >= MAX_EXTRA_METRICS:
            break
        if not isinstance(name, str) or len(name) > 64:
            continue
        number = isinstance(value, int | float) and math.isfinite(value)
        if value is None or isinstance(value, bool) or number:
            clean[name] = value
        elif isinstance(value, str):
            clean[name] = value[:MAX_METRIC_TEXT]
    return clean


class MonitorFeed:
    """This worker's monitors and everything they are sent (see the module doc)."""

    def __init__(
        self,
        settings: Settings,
        directory: TerminalDirectory,
        bus: Signals,
        worker: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.bus = bus
        self.worker = worker
        self._clock = clock
        self.figures = StoreFigures(time.monotonic())
        self.alerts = StoreAlerts()
        self._monitors: dict[str, dict[str, Session]] = {}
        self._recent: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()
        self._last_seq: dict[str, int] = {}
        self._queued: list[dict[str, Any]] = []  # activity to signal at the next flush
        self._changed: dict[str, dict[str, TerminalView]] = {}  # figures to send at the tick
        self._last_event = 0  # the newest server event relayed
        directory.subscribe(self._terminal_changed, self._monitors.__contains__)

    def monitors(self, store_id: str) -> list[Session]:
        return list(self._monitors.get(store_id, {}).values())

    # ---- monitors come and go --------------------------------------------------------------

    def attach(self, session: Session) -> None:
        """A monitor connected: its store's terminals, alerts, recent activity and figures."""
        store_id = session.store_id
        self._evaluate(store_id)  # alerts of a store nobody watched until now
        self._monitors.setdefault(store_id, {})[session.session_id] = session
        now = utc_now_iso()
        terminals = [terminal_message(v, "listed", now) for v in self.directory.views(store_id)]
        session.queue_push(OutFrame(m.terminal_list_msg(store_id, True, terminals, now)))
        for alert in self.alerts.active(store_id):
            session.queue_push(OutFrame(alert))
        for line in self._recent.get(store_id, ()):
            session.queue_push(OutFrame(line))
        session.queue_push(OutFrame(self._server_metrics(store_id)))

    def detach(self, session: Session) -> None:
        monitors = self._monitors.get(session.store_id)
        if monitors is None or monitors.get(session.session_id) is not session:
            return
        del monitors[session.session_id]
        if not monitors:
            del self._monitors[session.store_id]
            # Nobody watches: alerts are evaluated afresh when a monitor comes back.
            self.alerts.forget(session.store_id)
            self._changed.pop(session.store_id, None)

    def _send(self, store_id: str, message: dict[str, Any]) -> None:
        """One frame, shared by every monitor of the store."""
        monitors = self._monitors.get(store_id)
        if not monitors:
            return
        frame = OutFrame(message)
        for session in list(monitors.values()):
            session.queue_push(frame)

    # ---- activity --------------------------------------------------------------------------

    def _activity(self, message: dict[str, Any]) -> None:
        self._remember(message)
        self._send(message["store_id"], message)

    def _remember(self, message: dict[str, Any]) -> None:
        store_id = message["store_id"]
        recent = self._recent.get(store_id)
        if recent is None:
            recent = self._recent[store_id] = deque(maxlen=RECENT_ACTIVITY)
            if len(self._recent) > RECENT_STORES:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(store_id)
        recent.append(message)

    def on_pushes(self, store_id: str, pushes: Sequence[Push]) -> None:
        """Committed operations of a store (every worker gets them): one line each."""
        last = self._last_seq.get(store_id, 0)
        for push in pushes:
            record = push.record
            if record.seq is None or record.seq <= last:
                continue  # republished (a duplicate's retry): already shown
            last = record.seq
            self._activity(
                m.sync_activity_msg(
                    f"op:{record.id}",
                    "data_sync",
                    store_id,
                    record.status,
                    terminal_id=record.terminal_id,
                    entity_type=record.entity_type,
                    entity_id=record.entity_id,
                    operation_id=record.id,
                    operation=record.operation,
                    seq=record.seq,
                    detail={"version": record.version, "priority": record.priority},
                    server_time=record.server_time,
                )
            )
        self._last_seq[store_id] = last

    def count(self, store_id: str, latency: float, conflict: bool) -> None:
        """An answered operation of this worker (receive → answer `latency` seconds)."""
        self.figures.count(store_id, latency, conflict)

    def note_conflict(self, op: Operation | OpRecord, status: str, policy: str) -> None:
        """A conflict this worker settled (or left pending); sent at the next `flush`."""
        self._queued.append(
            m.sync_activity_msg(
                f"conflict:{op.id}",
                "conflict",
                op.store_id,
                status,
                terminal_id=op.terminal_id,
                entity_type=op.entity_type,
                entity_id=op.entity_id,
                operation_id=op.id,
                operation=op.operation,
                detail={"policy": policy},
            )
        )

    async def lock(self, session: Session, answer: dict[str, Any]) -> None:
        """A lock answer this worker gave (lock_acquired, lock_failed, lock_released)."""
        status = str(answer["type"]).removeprefix("lock_")
        detail = {
            k: answer[k]
            for k in ("lock_id", "expires_at", "locked_by", "locked_until", "reason")
            if answer.get(k) is not None
        }
        self._queued.append(
            m.sync_activity_msg(
                f"lock:{session.session_id}:{time.monotonic_ns()}",
                "lock",
                session.store_id,
                status,
                terminal_id=session.terminal_id,
                entity_type=answer.get("entity_type"),
                entity_id=answer.get("entity_id"),
                detail=detail,
            )
        )
        await self.flush()

    async def flush(self) -> None:
        """Send the conflicts and locks noted on this worker to every worker's monitors."""
        if not self._queued:
            return
        items, self._queued = self._queued, []
        await self.bus.signal(TOPIC, {"event": "activity", "items": items})

    async def terminal_metrics(self, session: Session, metrics: dict[str, Any]) -> None:
        """A terminal reported its own figures (performance_metrics)."""
        await self.bus.signal(
            TOPIC,
            {
                "event": "terminal_metrics",
                "store_id": session.store_id,
                "terminal_id": session.terminal_id,
                "terminal_type": session.terminal_type,
                "metrics": clean_metrics(metrics),
            },
        )

    # ---- signals from every worker ---------------------------------------------------------

    def handle(self, payload: dict[str, Any]) -> None:
        """A "monitor" signal (the bus calls this on every worker)."""
        event = payload.get("event")
        if event == "activity":
            for item in payload["items"]:
                self._activity(item)
        elif event == "stats":
            self.figures.add(payload["stores"], time.monotonic())
        elif event == "terminal_metrics":
            store_id, terminal_id = payload["store_id"], payload["terminal_id"]
            metrics = payload["metrics"]
            self.directory.set_reported(store_id, terminal_id, reported_figures(metrics))
            self._send(
                store_id,
                m.performance_metrics_msg(
                    "terminal", store_id, terminal_id, payload["terminal_type"], metrics
                ),
            )
        else:
            log.warning("unknown monitor signal %r", event)

    def _terminal_changed(self, kind: ChangeKind, view: TerminalView) -> None:
        if view.store_id not in self._monitors:
            return
        if kind == "figures":
            self._changed.setdefault(view.store_id, {})[view.terminal_id] = view
            return
        self._changed.get(view.store_id, {}).pop(view.terminal_id, None)
        self._send(view.store_id, terminal_message(view, kind, utc_now_iso()))

    # ---- every few seconds -----------------------------------------------------------------

    async def tick(self) -> None:
        """Share this worker's counts; send changed figures, the server's figures and alerts."""
        stores = self.figures.take_counts()
        if stores:
            payload = {"event": "stats", "worker": self.worker, "stores": stores}
            await self.bus.signal(TOPIC, payload)
        self.figures.trim(time.monotonic(), self._monitors)
        for store_id in list(self._monitors):
            changed = self._changed.pop(store_id, None)
            if changed:
                stamp = utc_now_iso()
                terminals = [terminal_message(v, "figures", stamp) for v in changed.values()]
                self._send(store_id, m.terminal_list_msg(store_id, False, terminals, stamp))
            self._evaluate(store_id)
            self._send(store_id, self._server_metrics(store_id))

    def _figures(self, store_id: str) -> dict[str, Any]:
        return self.figures.figures(store_id, self.directory.views(store_id), time.monotonic())

    def _server_metrics(self, store_id: str) -> dict[str, Any]:
        metrics = self._figures(store_id)
        metrics["health"] = self.alerts.health(store_id)
        metrics["active_alerts"] = len(self.alerts.active(store_id))
        return m.performance_metrics_msg("server", store_id, None, None, metrics)

    def _evaluate(self, store_id: str) -> None:
        """Raise the alerts whose condition holds now, clear those whose condition ended."""
        now = self._clock()
        views = self.directory.views(store_id)
        wanted = wanted_alerts(self.settings, store_id, self._figures(store_id), views, now)
        for message in self.alerts.update(store_id, wanted, now, utc_now_iso()):
            self._send(store_id, message)

    # ---- server events (backups) -----------------------------------------------------------

    def relay_events(self, events: Sequence[ServerEvent], live: bool = True) -> None:
        """Server events read from storage: each a line in every store's feed."""
        for event in events:
            self._last_event = max(self._last_event, event.id)
            payload = event.payload
            stores: dict[str, Any] = payload.get("stores") or {}
            detail_base = {k: v for k, v in payload.items() if k != "stores"}
            # The stores in the archive and every store watched here (a store without data yet
            # is in no archive, yet its monitor should see that backups run).
            targets = sorted(set(stores) | set(self._monitors))
            for store_id in targets:
                # Each store sees its own watermark only: another store's name is not its business.
                detail = {**detail_base, "watermark": stores.get(store_id)}
                message = m.sync_activity_msg(
                    f"event:{event.id}",
                    event.kind,
                    store_id,
                    str(payload.get("status", "ok")),
                    detail=detail,
                    server_time=format_epoch(event.created_at),
                )
                if live:
                    self._activity(message)
                else:
                    self._remember(message)

    @property
    def last_event(self) -> int:
        return self._last_event

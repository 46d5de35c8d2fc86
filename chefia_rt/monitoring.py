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
are slow readers like any terminal (bounded push lane, closed 1013 when it overflows).
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
from chefia_rt.protocol import messages as m
from chefia_rt.protocol.messages import format_epoch, utc_now_iso
from chefia_rt.stats import PerSecond
from chefia_rt.store.base import ServerEvent
from chefia_rt.terminals import ChangeKind, TerminalDirectory, TerminalView, reported_figures

log = logging.getLogger("chefia_rt.monitoring")

TOPIC = "monitor"
RECENT_ACTIVITY = 200  # lines of activity per store a monitor gets when it connects
# Stores whose recent activity is kept (the most recently active ones): every worker sees every
# store's operations, and a chain of thousands of stores must not cost each worker gigabytes.
RECENT_STORES = 256
WINDOW = 60.0  # seconds behind ops/min, average latency and the conflict rate
SHORT_WINDOW = 10.0  # seconds behind ops/s and the recent latency (the charts)
# The conflict rate alert needs this many operations in the window: 1 conflict of 2 ops is noise.
MIN_OPS_FOR_CONFLICT_RATE = 20
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
        self.started = time.monotonic()
        self._monitors: dict[str, dict[str, Session]] = {}
        self._recent: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()
        self._last_seq: dict[str, int] = {}
        self._windows: dict[str, PerSecond] = {}
        self._local: dict[str, list[float]] = {}  # this worker's counts since the last tick
        self._queued: list[dict[str, Any]] = []  # activity to signal at the next flush
        self._alerts: dict[str, dict[str, dict[str, Any]]] = {}  # store -> id -> active alert
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
        for alert in self._alerts.get(store_id, {}).values():
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
            self._alerts.pop(session.store_id, None)
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
        figures = self._local.get(store_id)
        if figures is None:
            figures = self._local[store_id] = [0.0, 0.0, 0.0, 0.0]
        figures[0] += 1
        figures[1] += latency * 1000
        figures[2] += 1
        figures[3] += conflict

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
            now = time.monotonic()
            for store_id, (ops, latency_sum, latency_n, conflicts) in payload["stores"].items():
                window = self._windows.get(store_id)
                if window is None:
                    window = self._windows[store_id] = PerSecond(4, WINDOW)
                window.add(now, ops, latency_sum, latency_n, conflicts)
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
        if self._local:
            stores, self._local = self._local, {}
            payload = {"event": "stats", "worker": self.worker, "stores": stores}
            await self.bus.signal(TOPIC, payload)
        now = time.monotonic()
        for window in self._windows.values():
            window.trim(now)
        for store_id, window in list(self._windows.items()):
            if not window.buckets and store_id not in self._monitors:
                del self._windows[store_id]
        for store_id in list(self._monitors):
            changed = self._changed.pop(store_id, None)
            if changed:
                stamp = utc_now_iso()
                terminals = [terminal_message(v, "figures", stamp) for v in changed.values()]
                self._send(store_id, m.terminal_list_msg(store_id, False, terminals, stamp))
            self._evaluate(store_id)
            self._send(store_id, self._server_metrics(store_id))

    def _figures(self, store_id: str) -> dict[str, Any]:
        now = time.monotonic()
        window = self._windows.get(store_id)
        ops, latency_sum, latency_n, conflicts = (
            window.totals(now, WINDOW) if window else (0.0, 0.0, 0.0, 0.0)
        )
        short = window.totals(now, SHORT_WINDOW) if window else (0.0, 0.0, 0.0, 0.0)
        # Until the server has run a whole window, per-minute figures count what there is.
        span = min(SHORT_WINDOW, max(1.0, now - self.started))
        views = self.directory.views(store_id)
        by_status = {"online": 0, "offline": 0, "error": 0}
        for view in views:
            by_status[view.status] += 1
        return {
            "operations_per_minute": int(ops),
            "operations_per_second": round(short[0] / span, 2),
            "average_latency_ms": round(latency_sum / latency_n, 3) if latency_n else None,
            "recent_latency_ms": round(short[1] / short[2], 3) if short[2] else None,
            "conflict_rate": round(conflicts / ops, 4) if ops else 0.0,
            "window_operations": int(ops),
            "terminals": len(views),
            **by_status,
            "connections": by_status["online"],
            "uptime_seconds": round(now - self.started, 1),
        }

    def _server_metrics(self, store_id: str) -> dict[str, Any]:
        metrics = self._figures(store_id)
        alerts = self._alerts.get(store_id, {}).values()
        metrics["health"] = (
            "critical"
            if any(a["severity"] == "critical" for a in alerts)
            else "warning"
            if alerts
            else "ok"
        )
        metrics["active_alerts"] = len(alerts)
        return m.performance_metrics_msg("server", store_id, None, None, metrics)

    # ---- alerts ----------------------------------------------------------------------------

    def _evaluate(self, store_id: str) -> None:
        """Raise the alerts whose condition holds now, clear those whose condition ended."""
        s = self.settings
        now = self._clock()
        figures = self._figures(store_id)
        wanted: dict[str, dict[str, Any]] = {}

        def want(
            kind: str,
            severity: str,
            message: str,
            value: float,
            threshold: float,
            terminal_id: str | None = None,
            since: float | None = None,
        ) -> None:
            key = f"{kind}:{store_id}:{terminal_id or '*'}"
            wanted[key] = {
                "kind": kind,
                "severity": severity,
                "message": message,
                "value": round(value, 3),
                "threshold": threshold,
                "terminal_id": terminal_id,
                "since": since,
            }

        latency = figures["average_latency_ms"]
        if latency is not None and latency > s.monitor_alert_latency_ms:
            want(
                "latency",
                "warning",
                f"average latency {latency:.0f} ms over the last minute "
                f"(threshold {s.monitor_alert_latency_ms:g} ms)",
                latency,
                s.monitor_alert_latency_ms,
            )
        rate = figures["conflict_rate"]
        if (
            figures["window_operations"] >= MIN_OPS_FOR_CONFLICT_RATE
            and rate > s.monitor_alert_conflict_rate
        ):
            want(
                "conflict_rate",
                "warning",
                f"conflict rate {rate:.1%} over the last minute "
                f"(threshold {s.monitor_alert_conflict_rate:.0%})",
                rate,
                s.monitor_alert_conflict_rate,
            )
        for view in self.directory.views(store_id):
            if view.status != "online" and view.disconnected_at is not None:
                away = now - view.disconnected_at
                # A monitor closing its page is no outage of the restaurant.
                if view.terminal_type != "monitor" and away > s.monitor_alert_offline_after:
                    want(
                        "terminal_offline",
                        "critical",
                        f"{view.terminal_type} terminal {view.terminal_id} has been {view.status} "
                        f"for {away:.0f} s",
                        away,
                        s.monitor_alert_offline_after,
                        view.terminal_id,
                        view.disconnected_at,
                    )
            elif view.memory_mb is not None and view.memory_mb > s.monitor_alert_memory_mb:
                want(
                    "terminal_memory",
                    "warning",
                    f"{view.terminal_type} terminal {view.terminal_id} uses "
                    f"{view.memory_mb:.0f} MB (threshold {s.monitor_alert_memory_mb:g} MB)",
                    view.memory_mb,
                    s.monitor_alert_memory_mb,
                    view.terminal_id,
                )
        active = self._alerts.setdefault(store_id, {})
        stamp = utc_now_iso()
        for key, alert in wanted.items():
            if key in active:
                continue
            since = alert.pop("since") or now
            # The same outage has the same id on every worker (a page that reconnects elsewhere
            # keeps its acknowledgement); a new outage gets a new one.
            message = m.system_alert_msg(
                alert_id=f"{key}:{int(since * 1000)}",
                **alert,
                store_id=store_id,
                active=True,
                since=since,
                server_time=stamp,
            )
            active[key] = message
            self._send(store_id, message)
        for key in [k for k in active if k not in wanted]:
            self._send(store_id, m.alert_cleared_msg(active.pop(key), stamp))

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

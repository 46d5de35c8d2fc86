"""The monitors' system alerts (MONITOR_ALERT_*, docs/operations.md §7): which conditions hold for a
store now, and the `system_alert` / `alert_cleared` messages that raise and clear them as they start
and end. The feed (`monitoring.py`) evaluates a store's alerts every tick and sends what changed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from chefia_rt.config import Settings
from chefia_rt.protocol import messages as m
from chefia_rt.terminals import TerminalView

# The conflict rate alert needs this many operations in the window: 1 conflict of 2 ops is noise.
MIN_OPS_FOR_CONFLICT_RATE = 20


def wanted_alerts(
    settings: Settings,
    store_id: str,
    figures: dict[str, Any],
    views: Sequence[TerminalView],
    now: float,
) -> dict[str, dict[str, Any]]:
    """The alerts whose condition holds now, by key: the store's `figures` (monitor_figures.py)
    and its terminals' `views` against the thresholds; `now` is wall-clock seconds."""
    s = settings
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
    for view in views:
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
    return wanted


class StoreAlerts:
    """The active alerts of each store, as the `system_alert` messages that raised them."""

    def __init__(self) -> None:
        self._active: dict[str, dict[str, dict[str, Any]]] = {}  # store -> key -> message

    def active(self, store_id: str) -> Collection[dict[str, Any]]:
        return self._active.get(store_id, {}).values()

    def forget(self, store_id: str) -> None:
        """Nobody watches the store: its alerts are evaluated afresh when a monitor comes."""
        self._active.pop(store_id, None)

    def health(self, store_id: str) -> str:
        alerts = self.active(store_id)
        if any(a["severity"] == "critical" for a in alerts):
            return "critical"
        return "warning" if alerts else "ok"

    def update(
        self, store_id: str, wanted: dict[str, dict[str, Any]], now: float, stamp: str
    ) -> list[dict[str, Any]]:
        """Make `wanted` the store's active alerts: the messages that raise the new ones and
        clear those whose condition ended, in that order."""
        active = self._active.setdefault(store_id, {})
        messages = []
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
            messages.append(message)
        for key in [k for k in active if k not in wanted]:
            messages.append(m.alert_cleared_msg(active.pop(key), stamp))
        return messages

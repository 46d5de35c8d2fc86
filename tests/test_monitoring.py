"""The monitor feed's rules without a server (chefia_rt/monitoring.py, monitor_alerts.py): what a
terminal's report may carry on, which stores' recent activity is kept, and when an alert is raised
and cleared."""

from __future__ import annotations

import math
from typing import Any

from chefia_rt.bus.memory import MemoryBus
from chefia_rt.config import load_settings
from chefia_rt.monitor_alerts import StoreAlerts, wanted_alerts
from chefia_rt.monitoring import (
    MAX_EXTRA_METRICS,
    MAX_METRIC_TEXT,
    RECENT_ACTIVITY,
    RECENT_STORES,
    MonitorFeed,
    clean_metrics,
)
from chefia_rt.protocol.messages import sync_activity_msg
from chefia_rt.store.base import ServerEvent
from chefia_rt.terminals import TerminalDirectory


def test_a_terminals_report_is_cleaned_before_monitors_get_it() -> None:
    report: dict[str, Any] = {
        "response_time": 12,
        "memory_usage": 54.5,
        "fps": 60,
        "ok": True,
        "note": "x" * 1000,
        "nested": {"a": 1},
        "list": [1, 2],
        "bad": math.inf,
        "n" * 65: 1,
    }
    cleaned = clean_metrics(report)
    assert cleaned == {
        "response_time": 12,
        "memory_usage": 54.5,
        "fps": 60,
        "ok": True,
        "note": "x" * MAX_METRIC_TEXT,
    }
    many = clean_metrics({f"m{i}": i for i in range(1000)})
    assert len(many) == MAX_EXTRA_METRICS


def feed() -> MonitorFeed:
    return MonitorFeed(load_settings(), TerminalDirectory(), MemoryBus(), "host/1")


def test_recent_activity_is_bounded_per_store_and_in_stores() -> None:
    monitor = feed()
    for n in range(RECENT_ACTIVITY + 10):
        monitor.handle(
            {"event": "activity", "items": [sync_activity_msg(f"a{n}", "lock", "s0", "ok")]}
        )
    for store in range(1, RECENT_STORES + 5):
        monitor.handle(
            {"event": "activity", "items": [sync_activity_msg("x", "lock", f"s{store}", "ok")]}
        )
    kept = monitor._recent
    assert len(kept) == RECENT_STORES
    assert "s0" not in kept and "s1" not in kept  # the least recently active went first
    assert all(len(lines) <= RECENT_ACTIVITY for lines in kept.values())


def test_a_backup_event_shows_each_store_only_its_own_watermark() -> None:
    monitor = feed()
    event = ServerEvent(
        7, "backup", 1_700_000_000.0, {"status": "ok", "stores": {"s1": 4, "s2": 9}}
    )
    monitor.relay_events([event], live=False)
    lines = {store: list(recent)[-1] for store, recent in monitor._recent.items()}
    assert set(lines) == {"s1", "s2"}
    assert lines["s1"]["detail"] == {"status": "ok", "watermark": 4}
    assert "s2" not in str(lines["s1"])
    assert monitor.last_event == 7


def figures(latency_ms: float | None, ops: int, conflicts: int) -> dict[str, Any]:
    return {
        "average_latency_ms": latency_ms,
        "conflict_rate": conflicts / ops if ops else 0.0,
        "window_operations": ops,
    }


def test_latency_and_conflict_alerts_hold_over_their_thresholds_only() -> None:
    settings = load_settings()  # latency 100 ms, conflict rate 0.05 from 20 operations on
    assert wanted_alerts(settings, "s1", figures(100.0, 20, 1), [], 0.0) == {}
    wanted = wanted_alerts(settings, "s1", figures(150.0, 20, 2), [], 0.0)
    assert set(wanted) == {"latency:s1:*", "conflict_rate:s1:*"}
    assert wanted["latency:s1:*"]["value"] == 150.0
    # 1 conflict of 2 operations is noise, not a rate.
    assert wanted_alerts(settings, "s1", figures(None, 2, 1), [], 0.0) == {}


def test_an_alert_is_raised_once_and_cleared_when_its_condition_ends() -> None:
    alerts = StoreAlerts()
    slow = wanted_alerts(load_settings(), "s1", figures(150.0, 0, 0), [], 0.0)
    (raised,) = alerts.update("s1", slow, 1000.0, "t1")
    assert raised["type"] == "system_alert" and raised["active"]
    assert raised["alert_id"] == "latency:s1:*:1000000" and alerts.health("s1") == "warning"
    assert alerts.update("s1", slow, 1001.0, "t2") == []  # still active: not sent again
    (cleared,) = alerts.update("s1", {}, 1002.0, "t3")
    assert cleared["alert_id"] == raised["alert_id"] and not cleared["active"]
    assert alerts.health("s1") == "ok" and list(alerts.active("s1")) == []

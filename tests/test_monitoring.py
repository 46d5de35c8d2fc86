"""The monitor feed's rules without a server (chefia_rt/monitoring.py): what a terminal's report
may carry on, and which stores' recent activity is kept."""

from __future__ import annotations

import math
from typing import Any

from chefia_rt.bus.memory import MemoryBus
from chefia_rt.config import load_settings
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

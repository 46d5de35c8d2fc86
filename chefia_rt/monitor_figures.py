"""The server's figures for one store that its monitors get every tick (`performance_metrics` from
"server"): operations per minute and per second, average and recent latency, the conflict rate and
the terminals by status. Each worker counts its own answers; the feed (`monitoring.py`) shares
those counts with every worker by its "stats" signal, and every worker adds every worker's counts
to its windows, so each one's figures cover the whole store.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any

from chefia_rt.stats import PerSecond
from chefia_rt.terminals import TerminalView

WINDOW = 60.0  # seconds behind ops/min, average latency and the conflict rate
SHORT_WINDOW = 10.0  # seconds behind ops/s and the recent latency (the charts)

Counts = dict[str, list[float]]  # store -> [ops, latency ms sum, latency n, conflicts]


class StoreFigures:
    """This worker's counts since they were last shared, and every worker's per store."""

    def __init__(self, started: float) -> None:
        self.started = started  # monotonic: the figures' first window is shorter
        self._windows: dict[str, PerSecond] = {}
        self._local: Counts = {}

    def count(self, store_id: str, latency: float, conflict: bool) -> None:
        """An answered operation of this worker (receive → answer `latency` seconds)."""
        figures = self._local.get(store_id)
        if figures is None:
            figures = self._local[store_id] = [0.0, 0.0, 0.0, 0.0]
        figures[0] += 1
        figures[1] += latency * 1000
        figures[2] += 1
        figures[3] += conflict

    def take_counts(self) -> Counts:
        """This worker's counts since the last call, to share with every worker."""
        counts, self._local = self._local, {}
        return counts

    def add(self, stores: Counts, now: float) -> None:
        """A worker's shared counts (this one's too)."""
        for store_id, (ops, latency_sum, latency_n, conflicts) in stores.items():
            window = self._windows.get(store_id)
            if window is None:
                window = self._windows[store_id] = PerSecond(4, WINDOW)
            window.add(now, ops, latency_sum, latency_n, conflicts)

    def trim(self, now: float, watched: Container[str]) -> None:
        """Let the windows run out; a store without counts or monitors is forgotten."""
        for window in self._windows.values():
            window.trim(now)
        for store_id, window in list(self._windows.items()):
            if not window.buckets and store_id not in watched:
                del self._windows[store_id]

    def figures(self, store_id: str, views: Sequence[TerminalView], now: float) -> dict[str, Any]:
        """The store's figures at monotonic `now`; `views` are its terminals."""
        window = self._windows.get(store_id)
        ops, latency_sum, latency_n, conflicts = (
            window.totals(now, WINDOW) if window else (0.0, 0.0, 0.0, 0.0)
        )
        short = window.totals(now, SHORT_WINDOW) if window else (0.0, 0.0, 0.0, 0.0)
        # Until the server has run a whole window, per-minute figures count what there is.
        span = min(SHORT_WINDOW, max(1.0, now - self.started))
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

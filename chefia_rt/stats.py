"""/ws/stats across every worker and node: each worker's latest snapshot, from "stats" signals.

Every worker sends its own figures (Worker.websocket_stats) on the bus every WS_STATS_INTERVAL
seconds; every worker keeps the latest one per worker and forgets a worker that has been silent
for FORGET_AFTER intervals (it died, or its node left), so whichever worker answers /ws/stats sums
the same deployment. This worker's own entry is always taken fresh at answer time.

Each worker also watches its own event loop (LoopLag): how late a timer fires is how long
something held the loop. Its worst lag of each recent second is in its snapshot, and /ws/stats
lists them per worker (`worker_loop_lag`), so a stall is seen and placed in time.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

TOPIC = "stats"
FORGET_AFTER = 3  # intervals of silence after which a worker no longer counts
_COUNTS = ("total_connections", "operations_per_minute")  # summed, and stay integers


class ClusterStats:
    """The latest snapshot of every worker of the deployment."""

    __slots__ = ("_clock", "_latest", "interval", "node", "worker")

    def __init__(
        self,
        worker: str,
        node: str,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker = worker
        self.node = node
        self.interval = interval
        self._clock = clock
        self._latest: dict[str, tuple[float, dict[str, Any]]] = {}

    def payload(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        """The signal this worker sends: its snapshot, named by worker and node."""
        return {"worker": self.worker, "node": self.node, "stats": snapshot}

    def receive(self, payload: dict[str, Any]) -> None:
        """A "stats" signal from any worker (this one included). Malformed ones are ignored:
        a worker of another version must not break the answer."""
        worker, stats = payload.get("worker"), payload.get("stats")
        if (
            isinstance(worker, str)
            and isinstance(stats, dict)
            and isinstance(payload.get("node"), str)
        ):
            self._latest[worker] = (self._clock(), payload)

    def aggregate(self, own: dict[str, Any]) -> dict[str, Any]:
        """The /ws/stats figures (docs/operations.md §3) summed (rates and counts) or weighted
        (latency, conflict rate) over every worker heard from recently, with `own` (this worker's
        fresh snapshot) in place of its last signal; says how many workers and nodes it covers."""
        now = self._clock()
        horizon = FORGET_AFTER * self.interval
        for worker in [w for w, (at, _) in self._latest.items() if now - at > horizon]:
            del self._latest[worker]
        entries = {w: p for w, (_, p) in self._latest.items()}
        entries[self.worker] = self.payload(own)
        result: dict[str, Any] = {name: 0 for name in _COUNTS}
        throughput = 0.0
        by_type: dict[str, int] = {}
        latency_weight = latency_sum = operations = conflicts = 0.0
        uptime = 0.0
        loop_lag: dict[str, dict[str, Any]] = {}
        for worker, payload in entries.items():
            stats = payload["stats"]
            if "event_loop_lag_max_ms" in stats:
                loop_lag[worker] = {
                    "max_ms": _number(stats.get("event_loop_lag_max_ms")),
                    "by_second": stats.get("event_loop_lag_by_second") or [],
                }
            for name in _COUNTS:
                result[name] += _count(stats.get(name))
            throughput += _number(stats.get("message_throughput"))
            for kind, count in (stats.get("connections_by_type") or {}).items():
                by_type[str(kind)] = by_type.get(str(kind), 0) + _count(count)
            weight = _number(stats.get("latency_count"))
            latency_weight += weight
            latency_sum += weight * _number(stats.get("average_latency"))
            operations += _number(stats.get("operations"))
            conflicts += _number(stats.get("conflicts"))
            uptime = max(uptime, _number(stats.get("uptime_seconds")))
        result["message_throughput"] = round(throughput, 3)
        result["connections_by_type"] = by_type
        result["average_latency"] = round(latency_sum / latency_weight if latency_weight else 0, 3)
        result["conflict_rate"] = round(conflicts / operations if operations else 0.0, 4)
        result["uptime_seconds"] = round(uptime, 1)
        result["workers"] = len(entries)
        result["nodes"] = len({p["node"] for p in entries.values()})
        result["event_loop_lag_max_ms"] = max((w["max_ms"] for w in loop_lag.values()), default=0.0)
        result["worker_loop_lag"] = loop_lag
        return result


class PerSecond:
    """Figures gathered per second of a clock, over its last `seconds` seconds: each bucket is
    [second, figure, ...], every figure summed within its second, or with `highest` the highest
    of the second kept."""

    __slots__ = ("_highest", "buckets", "seconds", "width")

    def __init__(self, width: int, seconds: float, *, highest: bool = False) -> None:
        self.width = width
        self.seconds = seconds
        self._highest = highest
        self.buckets: deque[list[float]] = deque()

    def add(self, now: float, *figures: float) -> None:
        second = float(int(now))
        if not self.buckets or self.buckets[-1][0] != second:
            self.buckets.append([second, *figures])
        else:
            bucket = self.buckets[-1]
            for i, figure in enumerate(figures, 1):
                bucket[i] = max(bucket[i], figure) if self._highest else bucket[i] + figure
        self.trim(now)

    def trim(self, now: float) -> None:
        while self.buckets and self.buckets[0][0] <= now - self.seconds:
            self.buckets.popleft()

    def totals(self, now: float, span: float) -> list[float]:
        """Each figure summed over the buckets of the last `span` seconds."""
        sums = [0.0] * self.width
        for second, *figures in self.buckets:
            if second > now - span:
                for i, figure in enumerate(figures):
                    sums[i] += figure
        return sums


class WorkerStats:
    """This worker's figures for /ws/stats (docs/operations.md §3): messages and operations per
    second over the last minute, and the counts since start."""

    WINDOW = 60

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self._window = PerSecond(2, self.WINDOW)  # messages, operations
        self.operations = 0
        self.conflicts = 0
        self.latency_sum = 0.0
        self.latency_count = 0

    def message(self, count: int = 1) -> None:
        self._window.add(self._clock(), count, 0)

    def operation(self, latency: float, conflict: bool) -> None:
        self._window.add(self._clock(), 0, 1)
        self.operations += 1
        self.conflicts += conflict
        self.latency_sum += latency
        self.latency_count += 1

    def snapshot(self) -> dict[str, float]:
        """The figures of this worker, plus the counts that weight them in a sum."""
        now = self._clock()
        self._window.add(now, 0, 0)
        messages, operations = self._window.totals(now, self.WINDOW)
        span = max(1, min(self.WINDOW, len(self._window.buckets)))
        return {
            "message_throughput": round(messages / span, 3),
            "operations_per_minute": operations,
            "average_latency": round(
                1000 * self.latency_sum / self.latency_count if self.latency_count else 0.0, 3
            ),
            "conflict_rate": round(self.conflicts / self.operations if self.operations else 0, 4),
            "uptime_seconds": round(now - self.started, 1),
            "operations": self.operations,
            "conflicts": self.conflicts,
            "latency_count": self.latency_count,
        }


class LoopLag:
    """How late this worker's event loop runs: a task sleeps CHECK seconds and records the
    overshoot. Keeps the worst since start and the worst of each of the last SECONDS seconds
    (wall clock, so a load generator can match them to its own timeline)."""

    CHECK = 0.1
    SECONDS = 60

    __slots__ = ("_observe", "_seconds", "_wall", "worst")

    def __init__(
        self,
        observe: Callable[[float], None] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._observe = observe
        self._wall = wall
        self.worst = 0.0
        self._seconds = PerSecond(1, self.SECONDS, highest=True)

    def record(self, lag: float) -> None:
        self.worst = max(self.worst, lag)
        if self._observe is not None:
            self._observe(lag)
        self._seconds.add(self._wall(), lag)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.CHECK
            await asyncio.sleep(self.CHECK)
            self.record(max(0.0, loop.time() - due))

    def snapshot(self) -> dict[str, Any]:
        return {
            "event_loop_lag_max_ms": round(self.worst * 1000, 2),
            "event_loop_lag_by_second": [
                [int(at), round(w * 1000, 2)] for at, w in self._seconds.buckets
            ],
        }


def _count(value: object) -> int:
    return round(_number(value))


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

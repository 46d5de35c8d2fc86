"""/ws/stats across every worker and node: each worker's latest snapshot, from "stats" signals.

Every worker sends its own figures (Node.websocket_stats) on the bus every WS_STATS_INTERVAL
seconds; every worker keeps the latest one per worker and forgets a worker that has been silent
for FORGET_AFTER intervals (it died, or its node left), so whichever worker answers /ws/stats sums
the same deployment. This worker's own entry is always taken fresh at answer time.
"""

from __future__ import annotations

import time
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
        """SPEC §6 figures summed (rates and counts) or weighted (latency, conflict rate) over
        every worker heard from recently, with `own` (this worker's fresh snapshot) in place of
        its last signal; says how many workers and nodes it covers."""
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
        for payload in entries.values():
            stats = payload["stats"]
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
        return result


def _count(value: object) -> int:
    return round(_number(value))


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

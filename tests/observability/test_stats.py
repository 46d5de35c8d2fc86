"""ClusterStats: the sum over workers' snapshots, weighting and forgetting (no I/O)."""

from __future__ import annotations

from typing import Any

from chefia_rt.stats import ClusterStats


def snapshot(connections: int, ops: int, latency: float, conflicts: int, **types: int) -> Any:
    return {
        "total_connections": connections,
        "connections_by_type": types,
        "message_throughput": 1.5,
        "operations_per_minute": ops,
        "average_latency": latency,
        "conflict_rate": conflicts / ops if ops else 0,
        "uptime_seconds": 10.0 * connections,
        "operations": ops,
        "conflicts": conflicts,
        "latency_count": ops,
    }


def test_sums_weights_and_counts_workers_and_nodes() -> None:
    now = [100.0]
    stats = ClusterStats("a/1", "a", interval=2.0, clock=lambda: now[0])
    stats.receive({"worker": "a/2", "node": "a", "stats": snapshot(2, 30, 4.0, 3, pos=2)})
    stats.receive({"worker": "b/7", "node": "b", "stats": snapshot(1, 10, 8.0, 0, kds=1)})
    stats.receive({"worker": "junk"})  # malformed: ignored
    total = stats.aggregate(snapshot(3, 60, 1.0, 0, pos=2, waiter=1))
    assert total["workers"] == 3 and total["nodes"] == 2
    assert total["total_connections"] == 6
    assert total["connections_by_type"] == {"pos": 4, "kds": 1, "waiter": 1}
    assert total["operations_per_minute"] == 100
    assert total["message_throughput"] == 4.5
    assert total["average_latency"] == round((30 * 4 + 10 * 8 + 60 * 1) / 100, 3)
    assert total["conflict_rate"] == 0.03
    assert total["uptime_seconds"] == 30.0


def test_a_silent_worker_is_forgotten_after_three_intervals() -> None:
    now = [0.0]
    stats = ClusterStats("a/1", "a", interval=1.0, clock=lambda: now[0])
    stats.receive({"worker": "a/2", "node": "a", "stats": snapshot(5, 0, 0, 0)})
    now[0] = 2.9
    assert stats.aggregate(snapshot(1, 0, 0, 0))["total_connections"] == 6
    now[0] = 3.1
    alone = stats.aggregate(snapshot(1, 0, 0, 0))
    assert alone["total_connections"] == 1 and alone["workers"] == 1

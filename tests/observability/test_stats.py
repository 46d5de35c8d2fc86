"""ClusterStats: the sum over workers' snapshots, weighting and forgetting; /ws/stats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chefia_rt.stats import ClusterStats, LoopLag, PerSecond
from tests.helpers import http_get, op, running_server


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


def test_counts_stay_integers() -> None:
    stats = ClusterStats("a/1", "a", interval=2.0)
    stats.receive({"worker": "a/2", "node": "a", "stats": snapshot(2, 30, 4.0, 3, pos=2)})
    total = stats.aggregate(snapshot(3, 60, 1.0, 0, pos=3))
    for name in ("total_connections", "operations_per_minute", "workers", "nodes"):
        assert type(total[name]) is int, (name, total[name])
    assert all(type(count) is int for count in total["connections_by_type"].values())


def test_per_second_sums_each_second_and_forgets_what_left_the_window() -> None:
    window = PerSecond(2, 60.0)
    window.add(100.2, 1, 10)
    window.add(100.9, 2, 20)
    window.add(130.0, 4, 40)
    assert list(window.buckets) == [[100.0, 3, 30], [130.0, 4, 40]]
    assert window.totals(130.5, 60.0) == [7.0, 70.0]
    assert window.totals(130.5, 10.0) == [4.0, 40.0]  # only the last ten seconds
    window.add(160.0, 1, 1)  # 100 is now 60 seconds back: gone
    assert list(window.buckets) == [[130.0, 4, 40], [160.0, 1, 1]]
    window.trim(190.0)
    assert list(window.buckets) == [[160.0, 1, 1]]


def test_per_second_can_keep_the_highest_of_each_second() -> None:
    window = PerSecond(1, 60.0, highest=True)
    for at, figure in ((5.0, 0.3), (5.5, 0.9), (5.9, 0.1), (6.1, 0.2)):
        window.add(at, figure)
    assert list(window.buckets) == [[5.0, 0.9], [6.0, 0.2]]


def test_loop_lag_keeps_the_worst_of_each_second_and_stats_list_it_per_worker() -> None:
    wall = [1000.1]
    observed: list[float] = []
    lag = LoopLag(observed.append, wall=lambda: wall[0])
    for at, seconds in ((1000.1, 0.002), (1000.9, 0.040), (1001.2, 0.001), (1003.0, 0.0)):
        wall[0] = at
        lag.record(seconds)
    assert observed == [0.002, 0.040, 0.001, 0.0]
    own = lag.snapshot()
    assert own == {
        "event_loop_lag_max_ms": 40.0,
        "event_loop_lag_by_second": [[1000, 40.0], [1001, 1.0], [1003, 0.0]],
    }
    stats = ClusterStats("a/1", "a", interval=2.0)
    other = {"event_loop_lag_max_ms": 250.0, "event_loop_lag_by_second": [[1001, 250.0]]}
    stats.receive({"worker": "a/2", "node": "a", "stats": snapshot(1, 0, 0, 0) | other})
    total = stats.aggregate(snapshot(1, 0, 0, 0) | own)
    assert total["event_loop_lag_max_ms"] == 250.0
    assert total["worker_loop_lag"] == {
        "a/1": {"max_ms": 40.0, "by_second": own["event_loop_lag_by_second"]},
        "a/2": {"max_ms": 250.0, "by_second": [[1001, 250.0]]},
    }


async def test_ws_stats_answers_counts_as_json_integers(tmp_path: Path) -> None:
    """Over HTTP from a running server: `"total_connections":2`, never `2.0`."""
    async with running_server(tmp_path) as server:
        async with server.terminal("pos-1") as pos, server.terminal("kds-1", type="kds"):
            await pos.send(op("op-1", "t1", {"seats": 2}, operation="CREATE"))
            await pos.expect("sync_confirmation")
            status, _, body = await http_get(server.http + "/ws/stats")
        assert status == 200
        stats = json.loads(body)
        assert stats["total_connections"] == 2
        for name in ("total_connections", "operations_per_minute", "workers", "nodes"):
            assert type(stats[name]) is int, (name, stats[name])
        assert stats["connections_by_type"] == {"pos": 1, "kds": 1}

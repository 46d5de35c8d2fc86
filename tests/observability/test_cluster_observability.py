"""Metrics and /ws/stats of real processes: 2 nodes x 2 workers, PostgreSQL, Redis, Prometheus.

One cluster serves every check (starting one costs seconds): each scrape of a node shows both of
its workers' connections whichever worker answers, /ws/stats sums all four workers of both nodes,
a real Prometheus scraping both nodes counts the connections by PromQL (and accepts every
expression of the alert rules and the Grafana dashboard), and a killed worker's connections leave
the node's metrics (the supervisor marks it dead) while its counts stay.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import ClusterNode, running_cluster, signal_pid, worker_pid
from tests.helpers import op
from tests.observability.prometheus import CONFIG_DIR, Prometheus, running_prometheus
from tests.observability.promtext import http_get, promtool_check_metrics, scrape, value

pytestmark = pytest.mark.asyncio

LIVENESS = 120.0  # seconds; a liveness bound (a hang guard), never a speed claim


async def eventually(
    what: str, probe: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool]
) -> Any:
    """Probe until `ok(result)`; fail after LIVENESS seconds with the last result."""
    started = time.monotonic()
    while True:
        result = await probe()
        if ok(result):
            print(f"{what}: {time.monotonic() - started:.2f}s")
            return result
        if time.monotonic() - started > LIVENESS:
            raise AssertionError(f"{what}: not within {LIVENESS:.0f}s; last {result!r}")
        await asyncio.sleep(0.1)


async def stats(node: ClusterNode) -> dict[str, Any]:
    status, _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{node.port}/ws/stats")
    assert status == 200
    return dict(json.loads(body))


def metrics_url(node: ClusterNode) -> str:
    return f"http://127.0.0.1:{node.port}/metrics"


async def connections(node: ClusterNode) -> float | None:
    """The node's connection count; None when the request hit a worker as it was killed (its
    queued connections are reset) or its replacement was not listening yet."""
    try:
        return value(await scrape(metrics_url(node)), "websocket_active_connections")
    except OSError:
        return None


def grafana_expressions() -> list[str]:
    dashboard = json.loads((CONFIG_DIR / "grafana" / "chefia-rt.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    # Grafana's variables, as Grafana would fill them in.
    return [
        e.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*")
        for e in exprs
    ]


async def check_expressions_parse(prometheus: Prometheus) -> None:
    """Every dashboard expression is valid PromQL (the rules were loaded: see /api/v1/rules)."""
    exprs = grafana_expressions()
    assert len(exprs) >= 8
    for expr in exprs:
        await prometheus.query(expr)
    groups = (await prometheus.api("/api/v1/rules"))["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert {"ChefiaHighLatencyP95", "ChefiaTerminalOffline", "ChefiaStorageDown"} <= loaded
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] != "err", rule


async def test_two_nodes_two_workers_metrics_stats_prometheus_and_a_killed_worker(
    tmp_path: Path,
) -> None:
    ops = 6
    async with running_cluster(
        tmp_path, nodes=2, workers=2, env={"WS_STATS_INTERVAL": "0.5"}
    ) as cluster:
        node0, node1 = cluster.nodes
        first, second = node0.workers
        a = await cluster.connect(0, "pos-a", "s1", on_worker=first)
        b = await cluster.connect(0, "pos-b", "s1", on_worker=second)
        c = await cluster.connect(1, "kds-c", "s1", type="kds")
        for i in range(ops):
            await b.send(op(f"b-{i}", f"table-{i}", {"status": "occupied"}))
            await b.until("sync_confirmation")

        # Node 0: both workers' connections in every scrape, whichever worker answers.
        await eventually("node 0 counts 2", lambda: connections(node0), lambda n: n == 2)
        for _ in range(10):
            text = await scrape(metrics_url(node0))
            assert value(text, "websocket_active_connections") == 2
            assert value(text, "websocket_connections", type="pos") == 2
            assert value(text, "sync_operations_total", status="applied") == ops
        promtool_check_metrics(text)
        assert value(await scrape(metrics_url(node1)), "websocket_active_connections") == 1
        # terminal_status is the deployment's: node 1 knows node 0's terminals too.
        await eventually(
            "terminal_status of all three on node 1",
            lambda: scrape(metrics_url(node1)),
            lambda text: all(
                value(text, "terminal_status", terminal_id=t) == 1
                for t in ("pos-a", "pos-b", "kds-c")
            ),
        )

        # /ws/stats from either node covers 4 workers on 2 nodes.
        for node in (node0, node1):
            answer = await eventually(
                f"/ws/stats of node {node.index} covers all",
                lambda node=node: stats(node),  # type: ignore[misc]
                # Signals are a moment old: wait for the latest figures too.
                lambda s: (
                    s["workers"] == 4
                    and s["total_connections"] == 3
                    and s["operations_per_minute"] == ops
                ),
            )
            assert answer["nodes"] == 2
            assert answer["connections_by_type"] == {"pos": 2, "kds": 1}

        async with running_prometheus(
            tmp_path, [f"127.0.0.1:{node0.port}", f"127.0.0.1:{node1.port}"]
        ) as prometheus:
            await eventually(
                "PromQL sum(websocket_active_connections) == 3",
                lambda: prometheus.scalar("sum(websocket_active_connections)"),
                lambda v: v == 3,
            )
            per_node = await prometheus.query("sum by (instance) (websocket_active_connections)")
            assert {r["metric"]["instance"]: float(r["value"][1]) for r in per_node} == {
                f"127.0.0.1:{node0.port}": 2.0,
                f"127.0.0.1:{node1.port}": 1.0,
            }
            await check_expressions_parse(prometheus)

            # Kill the worker serving b: the supervisor marks it dead, its connection leaves.
            signal_pid(worker_pid(second), signal.SIGKILL)
            await eventually("node 0 counts 1", lambda: connections(node0), lambda n: n == 1)
            applied = await eventually(
                "node 0 answers after the kill",
                lambda: _applied(node0),
                lambda n: n is not None,
            )
            assert applied == ops  # what the dead worker counted stays
            # /ws/stats forgets the silent worker; its replacement reports in its place.
            await eventually(
                "/ws/stats without the killed worker",
                lambda: stats(node1),
                lambda s: s["total_connections"] == 2 and s["workers"] == 4,
            )
            await eventually(
                "PromQL sees the killed worker's connection gone",
                lambda: prometheus.scalar("sum(websocket_active_connections)"),
                lambda v: v == 2,
            )
        await asyncio.wait_for(asyncio.gather(a.close(), c.close()), 15)


async def _applied(node: ClusterNode) -> float | None:
    try:
        return value(await scrape(metrics_url(node)), "sync_operations_total", status="applied")
    except OSError:
        return None

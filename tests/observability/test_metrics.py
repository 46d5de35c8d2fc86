"""The metrics of docs/operations.md §4 on a running server (one process): names, labels, counts,
promtool."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chefia_rt.auth import issue_token
from tests.helpers import free_port, op, running_server
from tests.observability.promtext import (
    http_get,
    label_sets,
    promtool_check_metrics,
    scrape,
    value,
)

pytestmark = pytest.mark.asyncio

DOCUMENTED_NAMES = (
    "websocket_active_connections",
    "websocket_message_duration_seconds_bucket",
    "sync_operations_total",
    "sync_conflicts_total",
    "terminal_status",
)


async def test_scrape_after_traffic_names_labels_counts_and_promtool(tmp_path: Path) -> None:
    ops = 5  # the kds never reads its pushes: stay under the client's queue of 16 frames
    async with running_server(tmp_path) as server:
        async with (
            server.terminal("pos-1") as pos,
            server.terminal("kds-1", type="kds") as kds,
            server.terminal("waiter-1", type="waiter", encoding="msgpack") as waiter,
        ):
            for i in range(ops):
                await pos.send(op(f"op-{i}", f"table-{i}", {"status": "occupied"}))
                await pos.until("sync_confirmation")
            await pos.send(op("op-0", "table-0", {"status": "occupied"}))  # resent: duplicate
            assert (await pos.until("sync_confirmation"))["status"] == "duplicate"
            # A stale version of table-1 (now at 1): settled by last write wins, a conflict.
            await waiter.send(
                op("w-1", "table-1", {"guests": 2}, version=1, timestamp="2030-01-01T00:00:00Z")
            )
            assert (await waiter.until("sync_confirmation"))["conflict_resolved"] is True
            await kds.send({"type": "resume", "since": 0})
            # An unknown entity type counts as "other": labels stay bounded.
            await pos.send(op("odd-1", "x-1", {"a": 1}, entity_type="something_new"))
            await pos.until("sync_confirmation")

            server.worker.metrics.flush_stages()  # as the worker's periodic report does
            text = await scrape(server.http + "/metrics")
            promtool_check_metrics(text)
            for name in DOCUMENTED_NAMES:
                assert name in text, name
            assert value(text, "terminal_status", terminal_id="kds-1", type="kds") == 1
            applied = dict(entity_type="tables", operation="UPDATE", status="applied")
            # The waiter's later write won its conflict: applied too.
            assert value(text, "sync_operations_total", **applied) == ops + 1
            assert value(text, "sync_operations_total", status="duplicate") == 1
            assert value(text, "sync_operations_total", entity_type="other") == 1
            assert value(text, "sync_conflicts_total", entity_type="tables") == 1
            assert {"entity_type": "tables", "policy": "last_write_wins"} in label_sets(
                text, "sync_conflicts_total"
            )
            assert value(text, "websocket_active_connections") == 3
            assert value(text, "websocket_connections", type="kds") == 1
            assert value(text, "websocket_connections", type="waiter") == 1
            # Every new operation (not the duplicate) has its receive → confirmation latency.
            assert value(text, "websocket_message_duration_seconds_count") == ops + 2
            assert value(text, "sync_batch_size_sum") >= ops + 2
            assert value(text, "sync_commit_duration_seconds_count") >= 1
            stages = ("leases", "wait", "read", "decide", "write", "commit", "sync", "cache")
            for stage in (*stages, "answer"):
                assert value(text, "sync_batch_stage_seconds_total", stage=stage) > 0, stage
            assert value(text, "sync_batches_timed_total") >= 1
            assert value(text, "websocket_resumes_total", kind="resume") == 1
            assert value(text, "bus_delivery_lag_seconds_count") >= 1
            # The worker's event-loop lag (stats.LoopLag): each check and the worst so far.
            assert "event_loop_lag_seconds_bucket" in text
            assert "event_loop_lag_max_seconds" in text
            # /ws/metrics is the same exposition.
            assert "sync_operations_total" in await scrape(server.http + "/ws/metrics")

        for _ in range(200):  # the closes are seen by the server within 10 s
            if not value(await scrape(server.http + "/metrics"), "websocket_active_connections"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("closed connections still counted")


async def test_health_queue_and_rejection_metrics(tmp_path: Path) -> None:
    key = "k" * 32
    async with running_server(tmp_path, jwt_secret_key=key, ws_rate_limit=1, ws_rate_burst=1) as s:
        good = issue_token((key,), "pos-1", "s1", "pos", 600)
        async with s.terminal("pos-1", token=good) as pos:
            await pos.send(op("a", "t-1"))
            await pos.send(op("b", "t-2"))  # over the burst of 1: 4005
            assert (await pos.until("sync_error"))["code"] == 4005
        status, _, _ = await asyncio.to_thread(http_get, s.http + "/ws/stats")  # no token: 401
        assert status == 401
        await s.worker.chores.report()  # the periodic sample, now
        text = await scrape(s.http + f"/metrics?token={good}")  # JWT on: a token
        assert value(text, "websocket_rate_limited_total") == 1
        assert value(text, "websocket_auth_failures_total", endpoint="http") == 1
        assert value(text, "chefia_storage_up") == 1
        assert value(text, "chefia_bus_up") == 1
        assert "sync_write_queue_depth 0.0" in text
        assert "websocket_outbound_queue_max_depth 0.0" in text


@pytest.mark.parametrize("path", ["/metrics", "/ws/metrics"])
async def test_metrics_disabled_is_404(tmp_path: Path, path: str) -> None:
    async with running_server(tmp_path, ws_enable_metrics=False) as server:
        status, _, _ = await asyncio.to_thread(http_get, server.http + path)
        assert status == 404


async def test_metrics_port_serves_only_metrics(tmp_path: Path) -> None:
    port = free_port()
    async with running_server(tmp_path, metrics_port=port) as server:
        await server.server.start_metrics(port)
        async with server.terminal("pos-1"):
            text = await scrape(f"http://127.0.0.1:{port}/metrics")
            assert value(text, "websocket_active_connections") == 1
        status, _, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/ws/stats")
        assert status == 404


async def test_terminal_status_goes_offline_then_disappears(tmp_path: Path) -> None:
    """The series of a terminal forgotten by the directory (retention) leaves the scrape."""
    async with running_server(
        tmp_path, terminal_report_interval=0.1, terminal_retention=1.0
    ) as server:
        async with server.terminal("pos-9"):
            text = await scrape(server.http + "/metrics")
            assert value(text, "terminal_status", terminal_id="pos-9", type="pos") == 1
        states = []
        for _ in range(300):  # offline at once, forgotten after the retention (liveness: 15 s)
            text = await scrape(server.http + "/metrics")
            series = label_sets(text, "terminal_status")
            state = value(text, "terminal_status", terminal_id="pos-9") if series else None
            if not states or states[-1] != state:
                states.append(state)
            if state is None:
                break
            await asyncio.sleep(0.05)
        assert states == [0.0, None], states


async def test_terminal_status_keeps_stores_apart(tmp_path: Path) -> None:
    """Every restaurant has its own pos-1: one store's offline pos-1 must not hide behind
    another store's online one (the offline alert would never fire)."""
    async with (
        running_server(tmp_path, terminal_report_interval=0.1) as server,
        server.terminal("pos-1", store="s1"),
    ):
        async with server.terminal("pos-1", store="s2"):
            text = await scrape(server.http + "/metrics")
            assert value(text, "terminal_status", terminal_id="pos-1", store_id="s1") == 1
            assert value(text, "terminal_status", terminal_id="pos-1", store_id="s2") == 1
        states: list[float | None] = []
        for _ in range(300):  # liveness: 15 s
            text = await scrape(server.http + "/metrics")
            states = [
                value(text, "terminal_status", terminal_id="pos-1", store_id=store)
                for store in ("s1", "s2")
            ]
            if states == [1.0, 0.0]:
                break
            await asyncio.sleep(0.05)
        assert states == [1.0, 0.0], states


async def test_writes_refused_before_the_commit_are_counted(tmp_path: Path) -> None:
    """A write a lock refuses (4009) never reaches the batch's commit; it is answered, so it
    counts in sync_operations_total like any other answer."""
    async with (
        running_server(tmp_path) as server,
        server.terminal("pos-a") as a,
        server.terminal("pos-b") as b,
    ):
        await a.send(op("c1", "t1", {"n": 1}, operation="CREATE"))
        await a.until("sync_confirmation")
        await b.send({"type": "acquire_lock", "entity_type": "tables", "entity_id": "t1"})
        await b.until("lock_acquired")
        for i in range(3):
            await a.send(op(f"u{i}", "t1", {"n": 2}, version=2))
            assert (await a.until("sync_error"))["code"] == 4009
        text = await scrape(server.http + "/metrics")
        refused = dict(entity_type="tables", operation="UPDATE", status="error")
        assert value(text, "sync_operations_total", **refused) == 3
        # Answers that are no new work have no latency: only the CREATE has one.
        assert value(text, "websocket_message_duration_seconds_count") == 1

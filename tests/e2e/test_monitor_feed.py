"""The monitor feed with real WebSocket terminals (docs/protocol.md §6,
docs/operations.md §7).

A `monitor` terminal of a store gets the store's terminals, their status changes and figures,
every operation, conflict and lock as activity, the terminals' and the server's performance
figures, alerts, and backup events; nothing of other stores, and it may not write. One worker
here; the same across two workers on Redis, and a worker that dies, at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from chefia_rt.backup import BackupError, create_backup, restore_archive
from chefia_rt.config import load_settings
from chefia_rt.errors import Code
from chefia_rt.protocol import messages as m
from chefia_rt.store.sqlite import SQLiteStore
from tests.cluster import running_cluster, signal_pid
from tests.helpers import DEFAULT_TIMEOUT, RunningServer, Terminal, op, running_server

MONITOR_MODELS: dict[str, type[BaseModel]] = {
    "terminal_status_update": m.TerminalStatusUpdate,
    "terminal_list": m.TerminalList,
    "sync_activity": m.SyncActivity,
    "performance_metrics": m.PerformanceMetrics,
    "system_alert": m.SystemAlert,
}
FAST = {
    "terminal_report_interval": 0.2,
    "monitor_alert_offline_after": 1.0,
    "monitor_event_poll_interval": 0.2,
}


class Monitor:
    """A monitor terminal that keeps every message, checked against its model."""

    def __init__(self, terminal: Terminal) -> None:
        self.terminal = terminal
        self.seen: list[dict[str, Any]] = []

    async def wait_for(
        self, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """The first message (seen before or arriving within `timeout`) that passes `check`."""
        for message in self.seen:
            if check(message):
                return message
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await self.terminal.recv(timeout)
                    model = MONITOR_MODELS.get(message["type"])
                    if model is not None:
                        model.model_validate(message)
                    self.seen.append(message)
                    if check(message):
                        return message
        except TimeoutError:
            kinds = sorted({x["type"] for x in self.seen})
            raise AssertionError(f"monitor never saw {what} (saw {kinds})") from None

    def of(self, message_type: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            x
            for x in self.seen
            if x["type"] == message_type and all(x.get(k) == v for k, v in fields.items())
        ]


def status_is(terminal_id: str, status: str, change: str | None = None) -> Callable[..., bool]:
    """A terminal_status_update of the terminal (or, without `change`, a list holding it)."""

    def one(x: dict[str, Any]) -> bool:
        return (
            x["terminal_id"] == terminal_id
            and x["status"] == status
            and change in (None, x["change"])
        )

    def check(x: dict[str, Any]) -> bool:
        if x["type"] == "terminal_list" and change is None:
            return any(one(t) for t in x["terminals"])
        return x["type"] == "terminal_status_update" and one(x)

    return check


def activity(kind: str, **fields: Any) -> Callable[..., bool]:
    def check(x: dict[str, Any]) -> bool:
        return (
            x["type"] == "sync_activity"
            and x["kind"] == kind
            and all(x.get(k) == v for k, v in fields.items())
        )

    return check


async def monitor_of(server: RunningServer, store: str = "s1", name: str = "mon-1") -> Monitor:
    return Monitor(await server.connect(name, store=store, type="monitor"))


async def test_monitor_sees_terminals_activity_figures_and_alerts(tmp_path: Path) -> None:
    started = time.monotonic()
    async with running_server(tmp_path, **FAST) as server, server.terminal("pos-1") as pos:
        mon = await monitor_of(server)
        listing = await mon.wait_for(lambda x: x["type"] == "terminal_list", "the list")
        assert listing["full"] is True
        assert {
            (t["terminal_id"], t["terminal_type"], t["status"]) for t in listing["terminals"]
        } >= {("pos-1", "pos", "online")}
        kds = await server.connect("kds-1", type="kds")
        await mon.wait_for(status_is("kds-1", "online", "connected"), "kds-1 online")

        # Every operation is a line of activity, with what a person looks for.
        await pos.send(op("op-1", "table-7", {"status": "occupied"}))
        confirmation = await pos.until("sync_confirmation")
        line = await mon.wait_for(activity("data_sync", operation_id="op-1"), "op-1")
        assert (line["entity_id"], line["operation"], line["terminal_id"]) == (
            "table-7",
            "UPDATE",
            "pos-1",
        )
        assert (line["seq"], line["status"]) == (confirmation["seq"], "applied")

        # A conflict settled by policy, a manual one, and locks.
        await pos.send(op("op-2", "table-7", {"status": "free"}, version=1))
        await pos.until("sync_confirmation")
        await mon.wait_for(activity("conflict", operation_id="op-2"), "the tables conflict")
        cash = {"entity_type": "cashier_operations", "version": 1}
        await pos.send(op("op-3", "cash-1", {"amount": 10}, operation="CREATE", **cash))
        await pos.until("sync_confirmation")
        await pos.send({"type": "acquire_lock", **cash, "entity_id": "cash-1"})
        await pos.until("lock_acquired")
        await pos.send(op("op-4", "cash-1", {"amount": 12}, **cash))  # stale: manual
        await pos.until("sync_conflict")
        manual = await mon.wait_for(activity("conflict", operation_id="op-4"), "manual")
        assert (manual["status"], manual["detail"]["policy"]) == (
            "pending",
            "manual_resolution",
        )
        await pos.send({"type": "acquire_lock", "entity_type": "orders", "entity_id": "o-1"})
        await pos.until("lock_acquired")
        await mon.wait_for(activity("lock", status="acquired", entity_id="o-1"), "a lock")
        await pos.send({"type": "release_lock", "entity_type": "orders", "entity_id": "o-1"})
        await mon.wait_for(activity("lock", status="released", entity_id="o-1"), "a release")

        # A terminal's own figures are relayed and kept; the server's come every few seconds.
        await pos.send({"type": "performance_metrics", "response_time": 35, "memory_usage": 120})
        relayed = await mon.wait_for(
            lambda x: x["type"] == "performance_metrics" and x["scope"] == "terminal",
            "pos-1's report",
        )
        assert relayed["terminal_id"] == "pos-1"
        assert relayed["metrics"]["memory_usage"] == 120
        alert = await mon.wait_for(
            lambda x: x["type"] == "system_alert" and x["kind"] == "terminal_memory",
            "the memory alert",
        )
        assert (alert["terminal_id"], alert["active"], alert["value"]) == ("pos-1", True, 120)
        figures = await mon.wait_for(
            lambda x: (
                x["type"] == "performance_metrics"
                and x["scope"] == "server"
                and x["metrics"]["operations_per_minute"] >= 3
            ),
            "the server's figures",
        )
        assert figures["metrics"]["online"] >= 3  # pos, kds and the monitor itself
        assert figures["metrics"]["average_latency_ms"] is not None
        rows = await mon.wait_for(
            lambda x: (
                x["type"] == "terminal_list"
                and not x["full"]
                and any(t["terminal_id"] == "pos-1" and t["ops"] >= 2 for t in x["terminals"])
            ),
            "pos-1's figures",
        )
        assert rows["store_id"] == "s1"

        # Offline within seconds, the alert after the (short) threshold, cleared on return.
        await kds.close()
        await mon.wait_for(status_is("kds-1", "offline", "disconnected"), "kds-1 offline")
        raised = await mon.wait_for(
            lambda x: (
                x["type"] == "system_alert" and x["kind"] == "terminal_offline" and x["active"]
            ),
            "the offline alert",
        )
        assert raised["terminal_id"] == "kds-1" and raised["severity"] == "critical"
        kds = await server.connect("kds-1", type="kds")
        await mon.wait_for(
            lambda x: (
                x["type"] == "system_alert"
                and x["alert_id"] == raised["alert_id"]
                and not x["active"]
            ),
            "the offline alert cleared",
        )
        await kds.close()

        # A monitor only reads (docs/protocol.md §7.5: 4008), and a new one gets the recent
        # activity.
        await mon.terminal.send(op("op-m", "table-9", {"status": "x"}))
        refused = await mon.wait_for(lambda x: x["type"] == "sync_error", "a refusal")
        assert refused["code"] == Code.PERMISSION_DENIED
        await mon.terminal.send(
            {"type": "acquire_lock", "entity_type": "orders", "entity_id": "o-2"}
        )
        refused = await mon.wait_for(
            lambda x: x["type"] == "error" and x["code"] == Code.PERMISSION_DENIED,
            "a refused lock",
        )
        late = await monitor_of(server, name="mon-2")
        await late.wait_for(activity("data_sync", operation_id="op-1"), "old activity")
        await late.terminal.close()
        await mon.terminal.close()
    print(f"monitor feed on one worker: {time.monotonic() - started:.2f}s")


async def test_a_takeover_never_shows_offline(tmp_path: Path) -> None:
    async with running_server(tmp_path, **FAST) as server:
        mon = await monitor_of(server)
        first = await server.connect("pos-1")
        await mon.wait_for(status_is("pos-1", "online", "connected"), "pos-1 online")
        second = await server.connect("pos-1")  # the first gets 4004
        update = await mon.wait_for(
            lambda x: status_is("pos-1", "online", "connected")(x) and x["reconnects"] == 1,
            "the reconnect",
        )
        assert update["status"] == "online"
        await asyncio.sleep(1.5)  # past the offline alert threshold and several rounds
        await mon.wait_for(lambda x: x["type"] == "performance_metrics", "a round")
        assert not mon.of("terminal_status_update", terminal_id="pos-1", status="offline")
        assert not mon.of("system_alert", kind="terminal_offline")
        await first.close()
        await second.close()
        await mon.terminal.close()


async def test_stores_are_isolated(tmp_path: Path) -> None:
    async with running_server(tmp_path, **FAST) as server:
        mon1 = await monitor_of(server, "s1")
        mon2 = await monitor_of(server, "s2", name="mon-2")
        async with server.terminal("pos-1", store="s1") as pos:
            await pos.send(op("op-1", "table-1", {"status": "occupied"}))
            await pos.until("sync_confirmation")
            await pos.send({"type": "performance_metrics", "memory_usage": 500})
            await mon1.wait_for(activity("data_sync", operation_id="op-1"), "s1's op")
            await mon1.wait_for(lambda x: x["type"] == "system_alert", "s1's alert")
        await mon1.wait_for(status_is("pos-1", "offline"), "pos-1 offline")
        # Several rounds later, s2's monitor saw only itself and its own store's figures.
        await mon2.wait_for(
            lambda x: x["type"] == "performance_metrics" and x["metrics"]["uptime_seconds"] > 1,
            "s2's rounds",
        )
        assert {x.get("store_id") for x in mon2.seen if x["type"] in MONITOR_MODELS} == {"s2"}
        listed = [t["terminal_id"] for x in mon2.of("terminal_list") for t in x["terminals"]]
        assert set(listed) <= {"mon-2"}
        assert not mon2.of("sync_activity") and not mon2.of("system_alert")
        await mon1.terminal.close()
        await mon2.terminal.close()


async def test_a_backup_appears_in_every_monitors_feed(tmp_path: Path) -> None:
    async with running_server(tmp_path, **FAST) as server:
        mon = await monitor_of(server)
        async with server.terminal("pos-1") as pos:
            await pos.send(op("op-1", "table-1", {"status": "occupied"}))
            await pos.until("sync_confirmation")
        # The backup command is another process in production; here the same code, in process.
        settings = load_settings(
            database_url=server.settings.database_url, backup_dir=str(tmp_path / "backups")
        )
        result = await create_backup(settings)
        line = await mon.wait_for(activity("backup"), "the backup")
        assert line["status"] == "ok"
        assert line["detail"]["archive"] == result.path.name
        assert line["detail"]["watermark"] == 1
        assert line["detail"]["bytes"] == result.path.stat().st_size
        # A backup that cannot write its archive shows as failed.
        (tmp_path / "not-a-dir").write_text("")
        with pytest.raises(BackupError):
            await create_backup(settings, output_dir=tmp_path / "not-a-dir")
        failed = await mon.wait_for(activity("backup", status="failed"), "the failed backup")
        assert "cannot write" in failed["detail"]["error"]
        # A restore says so too; the events stay out of archives and restores.
        target = load_settings(database_url=f"sqlite:///{tmp_path / 'restored.db'}")
        await restore_archive(target, result.path)
        store = SQLiteStore(target.sqlite_path)
        await store.open()
        try:
            events = await store.server_events(None, 10)
        finally:
            await store.close()
        assert [(e.kind, e.payload["archive"]) for e in events] == [("restore", result.path.name)]
        await mon.terminal.close()


async def test_two_workers_and_a_worker_that_dies(tmp_path: Path) -> None:
    env = {
        "TERMINAL_REPORT_INTERVAL": "0.3",
        "MONITOR_ALERT_OFFLINE_AFTER": "1",
        "MONITOR_EVENT_POLL_INTERVAL": "1",
    }
    async with running_cluster(tmp_path, nodes=1, workers=2, env=env) as cluster:
        node = cluster.nodes[0]
        a, b = node.workers
        # Placed before the monitor comes: `on_worker` closes attempts that land elsewhere.
        pos = await cluster.connect(0, "pos-1", "s1", on_worker=b)
        kds = await cluster.connect(0, "kds-1", "s1", type="kds", on_worker=b)
        other = await cluster.connect(0, "pos-9", "s2", on_worker=b)
        mon = Monitor(await cluster.connect(0, "mon-1", "s1", type="monitor", on_worker=a))
        replaced = [pos]
        try:
            await mon.wait_for(status_is("kds-1", "online"), "kds-1 (on the other worker)")
            await pos.send(op("op-1", "table-1", {"status": "occupied"}))
            await pos.until("sync_confirmation")
            await other.send(op("op-s2", "table-1", {"status": "occupied"}))
            await other.until("sync_confirmation")
            await mon.wait_for(activity("data_sync", operation_id="op-1"), "op-1")
            await pos.send({"type": "acquire_lock", "entity_type": "orders", "entity_id": "o-1"})
            await mon.wait_for(activity("lock", entity_id="o-1"), "a lock on the other worker")
            await mon.wait_for(
                lambda x: (
                    x["type"] == "performance_metrics"
                    and x["scope"] == "server"
                    and x["metrics"]["operations_per_minute"] >= 1
                ),
                "the cluster's figures",
            )
            # pos-1 moves to the monitor's worker: a takeover across workers, no offline. (Not
            # `on_worker`: it closes the attempts that land elsewhere, real disconnects.)
            mark = len(mon.seen)
            for _ in range(60):
                moved = await cluster.connect(0, "pos-1", "s1", tries=1)
                if moved.worker == a:
                    break
                replaced.append(moved)  # a takeover on b itself: the newer session stays
            assert moved.worker == a, "pos-1 never landed on the monitor's worker"
            await mon.wait_for(
                lambda x: status_is("pos-1", "online", "connected")(x) and x["worker"] == a,
                "pos-1 moved",
            )
            # Worker b dies: kds-1 turns offline when b's reports stop, then raises the alert.
            killed = time.monotonic()
            signal_pid(kds.pid, signal.SIGKILL)
            await mon.wait_for(status_is("kds-1", "offline"), "kds-1 offline", timeout=30)
            print(f"dead worker: kds-1 offline after {time.monotonic() - killed:.2f}s")
            await mon.wait_for(
                lambda x: x["type"] == "system_alert" and x.get("terminal_id") == "kds-1",
                "kds-1's offline alert",
                timeout=30,
            )
            assert not [
                x
                for x in mon.seen[mark:]
                if status_is("pos-1", "offline")(x) or status_is("pos-1", "error")(x)
            ]
            assert all(x.get("store_id") == "s1" for x in mon.seen if x["type"] in MONITOR_MODELS)
            await moved.close()
        finally:
            for terminal in (mon.terminal, *replaced, kds, other):
                with contextlib.suppress(Exception):
                    await terminal.close()


async def test_delivery_receipts_show_what_each_terminal_received(tmp_path: Path) -> None:
    """A terminal's `sync_confirmation` of a push is its receipt: the monitor shows, per
    terminal, the seq sent to it and the last one it said it received."""
    async with (
        running_server(tmp_path, **FAST) as server,
        server.terminal("pos-1") as pos,
        server.terminal("kds-1", type="kds") as kds,
        server.terminal("waiter-1", type="waiter") as silent,
    ):
        mon = await monitor_of(server)
        for n in (1, 2):
            await pos.send(op(f"op-{n}", f"table-{n}", {"status": "occupied"}))
            await pos.until("sync_confirmation")
        for n in (1, 2):
            push = await kds.expect("data_sync")
            operation = push["operation"]
            await kds.send(
                {
                    "type": "sync_confirmation",
                    "operation_id": operation["id"],
                    "seq": operation["seq"],
                }
            )
            assert (await silent.expect("data_sync"))["operation"]["seq"] == n  # not confirmed

        def receipts(terminal_id: str, sent: int, acked: int) -> Callable[..., bool]:
            def check(x: dict[str, Any]) -> bool:
                return x["type"] == "terminal_list" and any(
                    (t["terminal_id"], t["sent_seq"], t["acked_seq"]) == (terminal_id, sent, acked)
                    for t in x["terminals"]
                )

            return check

        await mon.wait_for(receipts("kds-1", 2, 2), "kds-1 received both")
        await mon.wait_for(receipts("waiter-1", 2, 0), "waiter-1 sent both, acknowledged none")

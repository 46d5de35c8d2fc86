"""The terminal directory (chefia_rt/terminals.py): the rules on signals, then real servers.

The first tests feed signals to a directory with a hand-driven clock; the last ones connect real
WebSocket terminals to one worker (in-process bus) and to two workers joined over Redis, and read
`node.terminals` on every worker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from chefia_rt.terminals import (
    ChangeKind,
    TerminalDirectory,
    TerminalView,
)
from tests.bus.conftest import drop_prefix, redis_reachable
from tests.helpers import DEFAULT_TIMEOUT, RunningServer, eventually, op, running_server
from tests.services import REDIS_URL, drop_pg_schema, new_pg_schema

# ---- the rules, with a hand-driven clock -------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def session(
    terminal_id: str = "pos-1",
    session_id: str = "a",
    opened_at: float = 1_000_000.0,
    store_id: str = "s1",
    **figures: Any,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "store_id": store_id,
        "terminal_id": terminal_id,
        "terminal_type": "pos",
        "session_id": session_id,
        "opened_at": opened_at,
        "last_seen": opened_at,
        "ops": 0,
        "conflicts": 0,
        "bytes_in": 0,
        "bytes_out": 0,
        "response_time_ms": None,
        "memory_mb": None,
        "cache_hit_rate": None,
    }
    entry.update(figures)
    return entry


def connect(s: dict[str, Any], worker: str = "w1") -> dict[str, Any]:
    return {"event": "connect", "worker": worker, "session": s}


def disconnect(s: dict[str, Any], worker: str = "w1", code: int | None = 1000) -> dict[str, Any]:
    return {"event": "disconnect", "worker": worker, "session": s, "close_code": code, "at": 5.0}


def figures(*sessions: dict[str, Any], worker: str = "w1") -> dict[str, Any]:
    return {"event": "figures", "worker": worker, "sessions": list(sessions)}


def recorder(directory: TerminalDirectory) -> list[tuple[ChangeKind, TerminalView]]:
    changes: list[tuple[ChangeKind, TerminalView]] = []
    directory.subscribe(lambda kind, view: changes.append((kind, view)))
    return changes


def test_connect_figures_disconnect() -> None:
    directory = TerminalDirectory(clock=Clock())
    changes = recorder(directory)
    directory.handle(connect(session()))
    view = directory.views("s1")[0]
    assert (view.status, view.connected_since, view.reconnects, view.worker) == (
        "online",
        1_000_000.0,
        0,
        "w1",
    )
    directory.handle(figures(session(ops=3, conflicts=1, bytes_in=10, memory_mb=42.5)))
    view = directory.views()[0]
    assert (view.ops, view.conflicts, view.bytes_in, view.memory_mb) == (3, 1, 10, 42.5)
    directory.handle(figures(session(ops=3, conflicts=1, bytes_in=10)))  # nothing changed
    directory.handle(disconnect(session(ops=4)))
    view = directory.views()[0]
    assert (view.status, view.disconnected_at, view.ops) == ("offline", 5.0, 4)
    assert view.memory_mb == 42.5  # a terminal's last report stays
    assert [kind for kind, _ in changes] == ["connected", "figures", "disconnected"]
    assert directory.views("s2") == []


def test_a_listener_of_some_stores_gets_only_their_changes_and_views() -> None:
    directory = TerminalDirectory(clock=Clock())
    watched = {"s2"}
    changes: list[tuple[ChangeKind, TerminalView]] = []
    directory.subscribe(lambda kind, view: changes.append((kind, view)), watched.__contains__)
    views_built = 0
    build = TerminalView.__init__

    def counting(self: TerminalView, *args: Any, **kwargs: Any) -> None:
        nonlocal views_built
        views_built += 1
        build(self, *args, **kwargs)

    a, b = session("pos-1", store_id="s1"), session("pos-1", store_id="s2")
    directory.handle(connect(a))
    directory.handle(connect(b))
    TerminalView.__init__ = counting  # type: ignore[method-assign]
    try:
        directory.handle(figures(session("pos-1", store_id="s1", ops=5), b | {"ops": 2}))
    finally:
        TerminalView.__init__ = build  # type: ignore[method-assign]
    assert [(kind, v.store_id) for kind, v in changes] == [("connected", "s2"), ("figures", "s2")]
    assert views_built == 1  # none for s1's change, which no listener wants


def test_a_session_closed_for_a_fault_shows_error() -> None:
    directory = TerminalDirectory(clock=Clock())
    directory.handle(connect(session()))
    directory.handle(disconnect(session(), code=1013))  # too slow a reader
    assert directory.views()[0].status == "error"


def test_takeover_never_shows_offline() -> None:
    directory = TerminalDirectory(clock=Clock())
    changes = recorder(directory)
    directory.handle(connect(session(session_id="a", opened_at=10.0), worker="w1"))
    directory.handle(connect(session(session_id="b", opened_at=20.0), worker="w2"))
    # The old session's worker stops listing it, and even a stray disconnect of it comes late.
    directory.handle(figures(worker="w1"))
    directory.handle(disconnect(session(session_id="a", opened_at=10.0), worker="w1"))
    # A connect of the old session arriving after the new one's (two publishers) is stale.
    directory.handle(connect(session(session_id="a", opened_at=10.0), worker="w1"))
    view = directory.views()[0]
    assert (view.status, view.worker, view.reconnects, view.connected_since) == (
        "online",
        "w2",
        1,
        20.0,
    )
    assert [kind for kind, _ in changes] == ["connected", "connected"]


def test_figures_repair_lost_signals() -> None:
    directory = TerminalDirectory(clock=Clock())
    # The connect signal was lost (or this worker started later): the figures bring it in.
    directory.handle(figures(session("pos-1"), session("kds-1", session_id="k")))
    assert [(v.terminal_id, v.status) for v in directory.views()] == [
        ("kds-1", "online"),
        ("pos-1", "online"),
    ]
    # kds-1's disconnect was lost: the next figures of its worker no longer list it.
    directory.handle(figures(session("pos-1")))
    assert [(v.terminal_id, v.status) for v in directory.views()] == [
        ("kds-1", "offline"),
        ("pos-1", "online"),
    ]


def test_silent_worker_goes_offline_comes_back_and_old_terminals_are_forgotten() -> None:
    clock = Clock()
    directory = TerminalDirectory(stale_after=8.0, retention=60.0, clock=clock)
    directory.handle(connect(session("pos-1"), worker="w1"))
    directory.handle(connect(session("pos-2", session_id="b"), worker="w2"))
    clock.now += 5
    directory.handle(figures(session("pos-2", session_id="b"), worker="w2"))
    directory.sweep()
    assert {v.terminal_id: v.status for v in directory.views()} == {
        "pos-1": "online",
        "pos-2": "online",
    }
    clock.now += 5  # w1 silent for 10 s, w2 for 5 s
    directory.sweep()
    statuses = {v.terminal_id: v.status for v in directory.views()}
    assert statuses == {"pos-1": "offline", "pos-2": "online"}
    # w1 was only cut off (Redis down) and still holds the session: it is online again.
    directory.handle(figures(session("pos-1"), worker="w1"))
    assert directory.get("s1", "pos-1") is not None
    assert directory.get("s1", "pos-1").status == "online"  # type: ignore[union-attr]
    directory.handle(disconnect(session("pos-1"), worker="w1"))
    clock.now += 61
    directory.handle(figures(session("pos-2", session_id="b"), worker="w2"))
    directory.sweep()
    assert [v.terminal_id for v in directory.views()] == ["pos-2"]


def test_reported_figures_are_kept_and_only_numbers_count() -> None:
    directory = TerminalDirectory(clock=Clock())
    directory.handle(connect(session()))
    directory.set_reported("s1", "pos-1", {"memory_mb": 90.0, "response_time_ms": "fast"})
    view = directory.views()[0]
    assert (view.memory_mb, view.response_time_ms) == (90.0, None)
    directory.set_reported("s1", "nobody", {"memory_mb": 1.0})  # unknown: ignored
    assert len(directory) == 1


# ---- real servers ------------------------------------------------------------------------------

FAST = {"terminal_report_interval": 0.2}


def never_silent(*servers: RunningServer) -> None:
    """With FAST reports a worker unheard of for 2.6 s counts as silent, and its terminals go
    offline: a loaded machine's stalled event loop can do that to a worker that is fine. Where
    no worker goes silent, only a wrong offline may show, so silence is put out of reach."""
    for server in servers:
        server.worker.terminals.stale_after = 10 * DEFAULT_TIMEOUT


def changes_of(server: RunningServer) -> list[tuple[ChangeKind, TerminalView]]:
    return recorder(server.worker.terminals)


def status(server: RunningServer, terminal_id: str, store: str = "s1") -> str | None:
    view = server.worker.terminals.get(store, terminal_id)
    return None if view is None else view.status


async def test_one_worker_sees_connect_figures_disconnect_and_takeover(tmp_path: Path) -> None:
    async with running_server(tmp_path, **FAST) as server:
        never_silent(server)
        changes = changes_of(server)
        async with server.terminal("pos-1") as pos, server.terminal("kds-1", type="kds") as kds:
            directory = server.worker.terminals
            assert {(v.terminal_id, v.terminal_type, v.status) for v in directory.views("s1")} == {
                ("pos-1", "pos", "online"),
                ("kds-1", "kds", "online"),
            }
            await pos.send(op("op-1", "table-1", {"status": "occupied"}))
            await pos.expect("sync_confirmation")
            await pos.send({"type": "performance_metrics", "response_time": 12, "memory_usage": 50})
            await eventually(
                lambda: (
                    (v := directory.get("s1", "pos-1")) is not None
                    and v.ops == 1
                    and v.memory_mb == 50.0
                    and v.response_time_ms == 12.0
                    and v.bytes_in > 0
                ),
                what="pos-1's figures",
            )
            # Takeover: pos-1 connects again; the old socket gets 4004, pos-1 never goes offline.
            async with server.terminal("pos-1"):
                await eventually(lambda: directory.get("s1", "pos-1").reconnects == 1)  # type: ignore[union-attr]
            await kds.close()
            await eventually(lambda: status(server, "kds-1") == "offline", what="kds-1 offline")
        pos_changes = [kind for kind, view in changes if view.terminal_id == "pos-1"]
        assert pos_changes.count("disconnected") == 1, pos_changes  # only the final close
        assert pos_changes[-1] == "disconnected"


@pytest.fixture
async def two_workers(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Two workers (in this process, each its own node) on one PostgreSQL schema and Redis."""
    await redis_reachable(REDIS_URL)
    dsn = await new_pg_schema()
    prefix = f"test-terminals-{uuid.uuid4().hex[:12]}"
    settings = {"database_url": dsn, "redis_url": REDIS_URL, "redis_prefix": prefix, **FAST}
    try:
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(running_server(tmp_path, **settings))
            b = await stack.enter_async_context(running_server(tmp_path, **settings))
            # One process holds both: tell them apart as separate processes would be (the name
            # is handed to the worker's sessions when it is built).
            for server, name in ((a, "host/1"), (b, "host/2")):
                server.worker.worker_name = server.worker.sessions.worker_name = name
            yield a, b
    finally:
        await drop_pg_schema(dsn)
        await drop_prefix(REDIS_URL, prefix)


def on_both(
    servers: tuple[RunningServer, RunningServer], check: Callable[[RunningServer], bool]
) -> Callable[[], bool]:
    return lambda: all(check(s) for s in servers)


async def test_two_workers_share_one_directory(
    two_workers: tuple[RunningServer, RunningServer],
) -> None:
    a, b = two_workers
    never_silent(a, b)
    changes = {name: changes_of(s) for name, s in (("a", a), ("b", b))}
    started = time.monotonic()
    pos = await a.connect("pos-1")
    kds = await b.connect("kds-1", type="kds")
    other = await b.connect("pos-9", store="s2")
    try:
        await eventually(
            on_both(
                two_workers,
                lambda s: (
                    status(s, "pos-1") == "online"
                    and status(s, "kds-1") == "online"
                    and status(s, "pos-9", "s2") == "online"
                ),
            ),
            what="every terminal online on both workers",
        )
        assert {v.worker for v in b.worker.terminals.views("s1")} == {"host/1", "host/2"}
        assert [v.terminal_id for v in a.worker.terminals.views("s2")] == ["pos-9"]
        await pos.send(op("op-1", "table-1", {"status": "occupied"}))
        await pos.expect("sync_confirmation")
        await eventually(
            on_both(two_workers, lambda s: s.worker.terminals.get("s1", "pos-1").ops == 1),  # type: ignore[union-attr]
            what="pos-1's ops on both workers",
        )
        # pos-1 moves to worker b: a takeover across workers, never a false offline.
        moved = await b.connect("pos-1")
        await eventually(
            on_both(
                two_workers,
                lambda s: (
                    (v := s.worker.terminals.get("s1", "pos-1")) is not None
                    and v.worker == "host/2"
                    and v.reconnects == 1
                ),
            ),
            what="pos-1 on worker b everywhere",
        )
        await kds.close()
        await eventually(
            on_both(two_workers, lambda s: status(s, "kds-1") == "offline"),
            what="kds-1 offline on both workers",
        )
        await moved.close()
        await eventually(on_both(two_workers, lambda s: status(s, "pos-1") == "offline"))
        print(f"two workers: directory converged in {time.monotonic() - started:.2f}s")
    finally:
        for terminal in (pos, kds, other):
            await terminal.close()
    for name, recorded in changes.items():
        pos_changes = [kind for kind, view in recorded if view.terminal_id == "pos-1"]
        assert pos_changes.count("disconnected") == 1, (name, pos_changes)


async def test_a_silent_worker_has_its_terminals_marked_offline(
    two_workers: tuple[RunningServer, RunningServer],
) -> None:
    a, b = two_workers
    pos = await a.connect("pos-1")
    try:
        await eventually(lambda: status(b, "pos-1") == "online", what="pos-1 seen by b")
        # Worker a loses the bus (as a dead worker would): its figures stop reaching b.
        await a.worker.bus.close()
        started = time.monotonic()
        await eventually(lambda: status(b, "pos-1") == "offline", what="stale")
        print(f"silent worker: offline after {time.monotonic() - started:.2f}s")
    finally:
        await pos.close()
        await asyncio.sleep(0)

"""The Presence port: a terminal's current session, its takeover across workers, and the leases
its end releases."""

from __future__ import annotations

import time

from chefia_rt.domain import EntityKey
from tests.bus.conftest import KEY, Worker, heard_everything
from tests.helpers import eventually


async def test_unregister_of_the_current_session_releases_its_leases(worker: Worker) -> None:
    bus = worker.bus
    mine = [EntityKey("s1", "orders", "o1"), EntityKey("s1", "cashier_operations", "c1")]
    other_terminal = EntityKey("s1", "orders", "o2")
    same_id_other_store = EntityKey("s2", "orders", "o1")
    await bus.register("s1", "pos-1", "sess-1", time.time())
    for key in mine:
        assert (await bus.acquire_lease(key, "pos-1", "l", 30))[0]
    assert (await bus.acquire_lease(other_terminal, "pos-2", "l", 30))[0]
    assert (await bus.acquire_lease(same_id_other_store, "pos-1", "l", 30))[0]

    await bus.unregister("s1", "pos-1", "sess-1")
    for key in mine:
        assert await bus.get_lease(key) is None, key
    assert await bus.get_lease(other_terminal) is not None
    assert await bus.get_lease(same_id_other_store) is not None
    # Released means free for anyone.
    assert (await bus.acquire_lease(mine[0], "pos-2", "l", 30))[0]


async def test_unregister_of_a_stale_session_releases_nothing(worker: Worker) -> None:
    """The terminal reconnected (a newer session registered) before the old one's end was
    processed: the locks belong to the terminal, which is still there."""
    bus = worker.bus
    await bus.register("s1", "pos-1", "sess-old", time.time())
    assert (await bus.acquire_lease(KEY, "pos-1", "l", 30))[0]
    await bus.register("s1", "pos-1", "sess-new", time.time())
    await bus.unregister("s1", "pos-1", "sess-old")
    held = await bus.get_lease(KEY)
    assert held is not None
    assert held.owner == "pos-1"
    # The newer session's end releases them.
    await bus.unregister("s1", "pos-1", "sess-new")
    assert await bus.get_lease(KEY) is None


async def test_leases_taken_after_reregistering_are_released(worker: Worker) -> None:
    bus = worker.bus
    await bus.register("s1", "pos-1", "sess-1", time.time())
    await bus.acquire_lease(KEY, "pos-1", "l", 30)
    await bus.unregister("s1", "pos-1", "sess-1")
    assert await bus.get_lease(KEY) is None
    await bus.register("s1", "pos-1", "sess-2", time.time())
    await bus.acquire_lease(KEY, "pos-1", "l2", 30)
    await bus.unregister("s1", "pos-1", "sess-2")
    assert await bus.get_lease(KEY) is None


async def test_stale_unregister_across_workers(workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    await a.bus.register("s1", "pos-1", "sess-a", time.time())
    assert (await a.bus.acquire_lease(KEY, "pos-1", "l", 30))[0]
    await b.bus.register("s1", "pos-1", "sess-b", time.time())
    await a.bus.unregister("s1", "pos-1", "sess-a")
    assert await b.bus.get_lease(KEY) is not None
    await b.bus.unregister("s1", "pos-1", "sess-b")
    assert await a.bus.get_lease(KEY) is None


async def test_takeover_reaches_the_other_worker(workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    opened = time.time()
    await a.bus.register("loja:ção", "pos:1", "sess-1", opened)
    await eventually(lambda: bool(b.takeovers), what="takeover at B")
    assert b.takeovers == [("loja:ção", "pos:1", "sess-1", opened)]
    await b.bus.register("s2", "kds-1", "sess-2", opened + 1)
    await eventually(lambda: bool(a.takeovers), what="takeover at A")
    await heard_everything((a, b), (b, a))
    # Each worker hears of the other's sessions only: its own hub already knows its own.
    assert a.takeovers == [("s2", "kds-1", "sess-2", opened + 1)]
    assert b.takeovers == [("loja:ção", "pos:1", "sess-1", opened)]

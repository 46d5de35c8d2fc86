"""The Leases port: entity lock leases, taken, renewed, refused, expired and released alike on
every backend and across workers."""

from __future__ import annotations

import asyncio
import time

import pytest

from chefia_rt.bus.base import Leases
from chefia_rt.domain import EntityKey
from tests.bus.conftest import KEY, Worker


async def test_lease_acquire_renew_refuse(worker: Worker) -> None:
    bus = worker.bus
    assert await bus.get_lease(KEY) is None
    before = time.time()
    taken, lease = await bus.acquire_lease(KEY, "pos-1", "lock-a", 30)
    assert taken
    assert lease is not None
    assert (lease.key, lease.owner, lease.lock_id) == (KEY, "pos-1", "lock-a")
    assert before + 29 <= lease.expires_at <= time.time() + 30.01
    held = await bus.get_lease(KEY)
    assert held is not None
    assert (held.owner, held.lock_id) == ("pos-1", "lock-a")
    assert held.expires_at == pytest.approx(lease.expires_at, abs=0.002)

    # The owner renews: a new lock_id and a later expiry replace the old ones.
    taken, renewed = await bus.acquire_lease(KEY, "pos-1", "lock-b", 60)
    assert taken
    assert renewed is not None
    assert (renewed.owner, renewed.lock_id) == ("pos-1", "lock-b")
    assert renewed.expires_at > lease.expires_at + 29

    # Another terminal is refused and told who holds it, with which lock, until when.
    taken, holder = await bus.acquire_lease(KEY, "pos-2", "lock-c", 30)
    assert not taken
    assert holder is not None
    assert (holder.key, holder.owner, holder.lock_id) == (KEY, "pos-1", "lock-b")
    assert holder.expires_at == pytest.approx(renewed.expires_at, abs=0.002)
    held = await bus.get_lease(KEY)
    assert held is not None
    assert (held.owner, held.lock_id) == ("pos-1", "lock-b")


async def can_take(bus: Leases, owner: str) -> None:
    """`owner` takes the lease on KEY now."""
    taken, lease = await bus.acquire_lease(KEY, owner, "lock-b", 30)
    assert taken
    assert lease is not None
    assert lease.owner == owner


async def test_lease_expires_by_ttl(worker: Worker) -> None:
    bus = worker.bus
    taken, _ = await bus.acquire_lease(KEY, "pos-1", "lock-a", 1.0)
    assert taken
    assert (await bus.acquire_lease(KEY, "pos-2", "lock-b", 1))[0] is False
    await asyncio.sleep(1.1)
    assert await bus.get_lease(KEY) is None
    assert await bus.release_lease(KEY, "pos-1") is False  # expired: nothing to release
    await can_take(bus, "pos-2")


async def test_lease_release_by_owner_only(worker: Worker) -> None:
    bus = worker.bus
    await bus.acquire_lease(KEY, "pos-1", "lock-a", 30)
    assert await bus.release_lease(KEY, "pos-2") is False
    held = await bus.get_lease(KEY)
    assert held is not None
    assert held.owner == "pos-1"
    assert await bus.release_lease(KEY, "pos-1") is True
    assert await bus.get_lease(KEY) is None
    assert await bus.release_lease(KEY, "pos-1") is False
    await can_take(bus, "pos-2")


async def test_leases_are_per_entity_and_per_store(worker: Worker) -> None:
    bus = worker.bus
    keys = [
        EntityKey("s1", "orders", "o1"),
        EntityKey("s1", "orders", "o2"),
        EntityKey("s1", "tables", "o1"),
        EntityKey("s2", "orders", "o1"),
    ]
    for i, key in enumerate(keys):
        taken, _ = await bus.acquire_lease(key, f"pos-{i}", f"lock-{i}", 30)
        assert taken, key
    for i, key in enumerate(keys):
        lease = await bus.get_lease(key)
        assert lease is not None
        assert (lease.owner, lease.lock_id) == (f"pos-{i}", f"lock-{i}")


async def test_many_leases_read_at_once_in_order(worker: Worker) -> None:
    """The writer reads a batch's leases in one call: each answer at its key's place, None
    where nobody holds one (or it expired), beyond one round trip's keys."""
    a = b = worker
    keys = [EntityKey("s1", "tables", f"t{i}") for i in range(1200)]
    assert await b.bus.get_leases(keys) == [None] * len(keys)
    assert (await a.bus.acquire_lease(keys[3], "pos-1", "l3", 30))[0]
    assert (await a.bus.acquire_lease(keys[1100], "pos-2", "l1100", 30))[0]
    assert (await a.bus.acquire_lease(keys[7], "pos-3", "l7", 0.05))[0]
    await asyncio.sleep(0.1)
    leases = await b.bus.get_leases(keys)
    held = {i: (lease.key, lease.owner) for i, lease in enumerate(leases) if lease is not None}
    assert held == {3: (keys[3], "pos-1"), 1100: (keys[1100], "pos-2")}
    assert await b.bus.get_leases([]) == []


async def test_ids_with_separators_and_unicode_do_not_collide(worker: Worker) -> None:
    bus = worker.bus
    pairs = [
        (EntityKey("a:b", "c", "x"), EntityKey("a", "b:c", "x")),
        (EntityKey("a", "b:c", "x"), EntityKey("a", "b", "c:x")),
        (EntityKey("a", "b", '"x"'), EntityKey("a", "b", "x")),
        (
            EntityKey("loja-ção", "pedidos", "mesa 1 🍧"),
            EntityKey("loja-cao", "pedidos", "mesa 1 🍧"),
        ),
        (EntityKey("a", "b", "x]"), EntityKey("a", 'b", "x', "]")),
    ]
    for first, second in pairs:
        assert (await bus.acquire_lease(first, "t1", "l1", 30))[0]
        assert (await bus.acquire_lease(second, "t2", "l2", 30))[0], (first, second)
        one, two = await bus.get_lease(first), await bus.get_lease(second)
        assert one is not None
        assert two is not None
        assert (one.key, one.owner, two.key, two.owner) == (first, "t1", second, "t2")
        assert await bus.release_lease(first, "t1")
        still = await bus.get_lease(second)
        assert still is not None
        assert still.owner == "t2"
        assert await bus.release_lease(second, "t2")

    # A terminal's leases are found by (store, terminal): "a:b"/"c" is not "a"/"b:c".
    k1, k2 = EntityKey("a:b", "orders", "o"), EntityKey("a", "orders", "o")
    await bus.register("a:b", "c", "sess-1", time.time())
    await bus.register("a", "b:c", "sess-2", time.time())
    assert (await bus.acquire_lease(k1, "c", "l1", 30))[0]
    assert (await bus.acquire_lease(k2, "b:c", "l2", 30))[0]
    await bus.unregister("a:b", "c", "sess-1")
    assert await bus.get_lease(k1) is None
    lease = await bus.get_lease(k2)
    assert lease is not None
    assert lease.owner == "b:c"


async def test_leases_hold_across_workers(workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    taken, lease = await a.bus.acquire_lease(KEY, "pos-1", "lock-a", 30)
    assert taken
    assert lease is not None
    seen = await b.bus.get_lease(KEY)
    assert seen is not None
    assert (seen.owner, seen.lock_id) == ("pos-1", "lock-a")
    taken, holder = await b.bus.acquire_lease(KEY, "pos-2", "lock-b", 30)
    assert not taken
    assert holder is not None
    assert (holder.owner, holder.lock_id) == ("pos-1", "lock-a")
    # The same terminal, now connected to the other worker, renews its own lease there.
    taken, renewed = await b.bus.acquire_lease(KEY, "pos-1", "lock-c", 30)
    assert taken
    assert renewed is not None
    assert renewed.lock_id == "lock-c"
    assert await b.bus.release_lease(KEY, "pos-1")
    assert await a.bus.get_lease(KEY) is None

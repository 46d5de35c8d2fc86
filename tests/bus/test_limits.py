"""What one terminal or one deployment may cost the bus: a cap on the leases a terminal holds
(and so on what releasing them walks), and deployments on one Redis kept apart whatever their
database number."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from chefia_rt.bus.base import Bus
from chefia_rt.bus.memory import MemoryBus
from chefia_rt.bus.redis import RedisBus
from chefia_rt.domain import EntityKey
from chefia_rt.sync.locks import TooManyLocks
from tests.bus.conftest import (
    BACKENDS,
    Worker,
    drop_prefix,
    eventually,
    pushes,
    redis_reachable,
    unique_prefix,
)
from tests.services import REDIS_URL

CAP = 5
SHORT_TTL = 1.0  # seconds: leases that expire during the test


def key(n: int, store: str = "s1") -> EntityKey:
    return EntityKey(store, "orders", f"o{n}")


@pytest.fixture(params=BACKENDS)
async def capped(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Bus, str]]:
    """A started bus of each backend whose terminals hold at most CAP leases."""
    prefix = unique_prefix()
    bus: Bus
    if request.param == "redis":
        await redis_reachable(REDIS_URL)
        bus = RedisBus(REDIS_URL, prefix=prefix, lock_max=CAP)
    else:
        bus = MemoryBus(lock_max=CAP)
    worker = Worker(bus)
    await worker.start()
    try:
        yield bus, prefix
    finally:
        await bus.close()
        if request.param == "redis":
            await drop_prefix(REDIS_URL, prefix)


async def test_a_terminal_holds_at_most_its_cap_of_leases(capped: tuple[Bus, str]) -> None:
    bus, _ = capped
    for n in range(CAP):
        assert (await bus.acquire_lease(key(n), "pos-1", f"l{n}", 30))[0]
    with pytest.raises(TooManyLocks) as refused:
        await bus.acquire_lease(key(CAP), "pos-1", "l-over", 30)
    assert refused.value.limit == CAP
    assert await bus.get_lease(key(CAP)) is None
    # Renewing a lease it holds is no new lease; other terminals and stores have their own cap.
    assert (await bus.acquire_lease(key(0), "pos-1", "l0-again", 30))[0]
    assert (await bus.acquire_lease(key(CAP), "pos-2", "l-other", 30))[0]
    assert (await bus.acquire_lease(key(0, "s2"), "pos-1", "l-s2", 30))[0]
    # Releasing one makes room for one.
    assert await bus.release_lease(key(1), "pos-1")
    assert (await bus.acquire_lease(key(CAP + 1), "pos-1", "l-new", 30))[0]
    with pytest.raises(TooManyLocks):
        await bus.acquire_lease(key(CAP + 2), "pos-1", "l-over", 30)


async def test_expired_leases_make_room(capped: tuple[Bus, str]) -> None:
    bus, _ = capped
    # SHORT_TTL must outlast the CAP acquisitions and the refused one (a loaded machine's
    # round trips); the sleep then outlasts it, which a loaded machine only lengthens.
    for n in range(CAP):
        assert (await bus.acquire_lease(key(n), "pos-1", f"l{n}", SHORT_TTL))[0]
    with pytest.raises(TooManyLocks):
        await bus.acquire_lease(key(CAP), "pos-1", "l-over", 30)
    await asyncio.sleep(SHORT_TTL + 0.1)
    for n in range(CAP, 2 * CAP):
        assert (await bus.acquire_lease(key(n), "pos-1", f"l{n}", 30))[0]


async def test_leases_taken_over_after_expiry_make_room(capped: tuple[Bus, str]) -> None:
    bus, _ = capped
    for n in range(CAP):
        assert (await bus.acquire_lease(key(n), "pos-1", f"l{n}", SHORT_TTL))[0]
    await asyncio.sleep(SHORT_TTL + 0.1)
    assert (await bus.acquire_lease(key(0), "pos-2", "taken", 30))[0]
    assert (await bus.acquire_lease(key(100), "pos-1", "new", 30))[0]
    # pos-1's release of its old entity releases nothing of pos-2's.
    await bus.unregister("s1", "pos-1", "sess-1")
    held = await bus.get_lease(key(0))
    assert held is not None and held.owner == "pos-2"


async def test_unregister_releases_only_that_terminals_leases(capped: tuple[Bus, str]) -> None:
    bus, _ = capped
    await bus.register("s1", "pos-1", "sess-1", 1.0)
    for n in range(CAP):
        assert (await bus.acquire_lease(key(n), "pos-1", f"a{n}", 30))[0]
        assert (await bus.acquire_lease(key(100 + n), "pos-2", f"b{n}", 30))[0]
    await bus.unregister("s1", "pos-1", "sess-1")
    for n in range(CAP):
        assert await bus.get_lease(key(n)) is None
        other = await bus.get_lease(key(100 + n))
        assert other is not None and other.owner == "pos-2"


async def test_redis_owner_set_never_outgrows_the_cap() -> None:
    """What unregister (and a full acquire) walks is the owner's set: at most CAP keys, however
    many locks the terminal asked for and however many expired unreleased."""
    await redis_reachable(REDIS_URL)
    prefix = unique_prefix()
    bus = RedisBus(REDIS_URL, prefix=prefix, lock_max=CAP)
    await Worker(bus).start()
    client = aioredis.from_url(REDIS_URL)
    try:
        refused = 0
        for n in range(200):
            try:
                await bus.acquire_lease(key(n), "pos-1", f"l{n}", 0.05 if n % 2 else 30)
            except TooManyLocks:
                refused += 1
            if n % 20 == 0:
                await asyncio.sleep(0.06)  # the short ones expire, unreleased
            owner_set = bus._owner_key("s1", "pos-1")
            assert await client.scard(owner_set) <= CAP
        assert refused > 0
        lock_keys = [k async for k in client.scan_iter(match=f"{prefix}:lock:*", count=500)]
        assert len(lock_keys) <= CAP
    finally:
        await client.aclose()
        await bus.close()
        await drop_prefix(REDIS_URL, prefix)


# ---- deployments on one Redis ---------------------------------------------------------------


def on_db(db: int) -> str:
    base, _, _ = REDIS_URL.rpartition("/")
    return f"{base}/{db}"


async def test_deployments_on_other_databases_do_not_hear_each_other() -> None:
    """Same prefix (the default), same store ids, databases 1 and 2: no push, signal or
    takeover crosses (Redis pub/sub itself ignores the database number)."""
    await redis_reachable(REDIS_URL)
    prefix = unique_prefix()
    staging = Worker(RedisBus(on_db(1), prefix=prefix))
    production = Worker(RedisBus(on_db(2), prefix=prefix))
    production_peer = Worker(RedisBus(on_db(2), prefix=prefix))
    heard: dict[str, list[object]] = {"staging": [], "production": []}
    staging.bus.on_signal("t", heard["staging"].append)
    production.bus.on_signal("t", heard["production"].append)
    try:
        for worker in (staging, production, production_peer):
            await worker.start()
        await staging.bus.publish("s1", pushes(1, 3))
        await staging.bus.signal("t", {"from": "staging"})
        await staging.bus.register("s1", "pos-1", "sess-staging", 1.0)
        # production's own traffic still flows, and arrives after whatever staging sent.
        await production_peer.bus.publish("s1", pushes(7, 1))
        await production_peer.bus.register("s1", "pos-9", "sess-prod", 2.0)
        await eventually(lambda: production.seqs() == [7] and len(production.takeovers) == 1)
        await asyncio.sleep(0.2)
        assert production.seqs() == [7]
        assert [t[2] for t in production.takeovers] == ["sess-prod"]
        assert heard["production"] == []
        assert heard["staging"] == [{"from": "staging"}]
    finally:
        for worker in (staging, production, production_peer):
            await worker.bus.close()
        for db in (1, 2):
            await drop_prefix(on_db(db), prefix)

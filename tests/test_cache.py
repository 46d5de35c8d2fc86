"""The RequestCache on a real store (SQLite) and both real buses: single flight, and the rule
that a read never returns a version older than one already confirmed, in the races that could
break it (a stale storage read landing after a write, a shared read from before a write, Redis
unreachable or restarted in between)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chefia_rt.bus.base import Bus
from chefia_rt.bus.memory import MemoryBus
from chefia_rt.bus.redis import RedisBus
from chefia_rt.cache import CachedEntity, RequestCache, entity_body, entity_fields
from chefia_rt.domain import BatchWrite, Entity, EntityKey
from chefia_rt.store.base import BatchRequest
from chefia_rt.store.sqlite import SQLiteStore
from tests.bus.conftest import drop_prefix, redis_reachable, unique_prefix
from tests.faults.redis import throwaway_redis
from tests.helpers import eventually
from tests.services import REDIS_URL

KEY = EntityKey("s1", "orders", "order-1")


class GatedStore(SQLiteStore):
    """The real SQLite store, counting entity reads; while `gate` is closed a read has read its
    row but does not return it yet (a storage read that is slow at the worst moment)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.reads = 0
        self.gate: asyncio.Event | None = None

    async def get_entity(self, key: EntityKey) -> Entity | None:
        found = await super().get_entity(key)
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        return found


def state(version: int, key: EntityKey = KEY) -> Entity:
    entity = Entity(key, version, {"status": f"s{version}"}, updated_by="pos-1")
    entity.updated_at = f"2024-01-15T10:30:0{version % 10}.000000Z"
    return entity


async def commit(store: GatedStore, cache: RequestCache, entity: Entity) -> None:
    """What the node does with a batch: commit, then write through, then (would) confirm."""
    await store.commit(BatchRequest(), lambda _: (None, _write(entity)))
    await cache.written([entity])


def _write(entity: Entity) -> BatchWrite:
    return BatchWrite(entities=[entity])


async def started_bus(kind: str, prefix: str, url: str = REDIS_URL) -> Bus:
    bus: Bus = MemoryBus() if kind == "memory" else RedisBus(url, prefix=prefix)
    await bus.start(lambda *_: None, lambda *_: None, lambda: None)
    return bus


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[GatedStore]:
    gated = GatedStore(str(tmp_path / "cache.db"))
    await gated.open()
    try:
        yield gated
    finally:
        if gated.gate is not None:
            gated.gate.set()
        await gated.close()


@pytest.fixture(params=["memory", "redis"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    prefix = unique_prefix()
    if request.param == "redis":
        await redis_reachable(REDIS_URL)
    started = await started_bus(request.param, prefix)
    try:
        yield started
    finally:
        await started.close()
        if request.param == "redis":
            await drop_prefix(REDIS_URL, prefix)


def figures(cache: RequestCache, entity_type: str) -> dict[str, float | int]:
    """One entity type's figures out of RequestCache.stats() (figure -> {type: value})."""
    return {name: per_type.get(entity_type, 0) for name, per_type in cache.stats().items()}


def version(found: CachedEntity | None) -> int:
    assert found is not None
    return found.version


async def test_concurrent_misses_cost_one_storage_read(store: GatedStore, bus: Bus) -> None:
    # Fresh for a minute, not the orders' default half second: the hits below must not
    # depend on how fast a loaded machine gets to them.
    cache = RequestCache(store, bus, {"orders": 60.0})
    await store.commit(BatchRequest(), lambda _: (None, _write(state(1))))  # not cached yet
    store.gate = asyncio.Event()
    readers = [asyncio.create_task(cache.read(KEY)) for _ in range(50)]
    await eventually(lambda: store.reads == 1, what="the first storage read")
    # Every reader counts its miss and joins the read in flight in one step: 50 misses, all
    # joined.
    await eventually(lambda: figures(cache, "orders")["misses"] == 50, what="every reader joined")
    store.gate.set()
    found = await asyncio.gather(*readers)
    assert {version(f) for f in found} == {1}
    assert len({f.body for f in found if f is not None}) == 1
    assert store.reads == 1
    stats = figures(cache, "orders")
    assert (stats["misses"], stats["hits"], stats["storage_reads"]) == (50, 0, 1)

    # Then the cache answers, with no storage read at all.
    again = await asyncio.gather(*(cache.read(KEY) for _ in range(20)))
    assert {version(f) for f in again} == {1}
    assert store.reads == 1
    await cache.refresh_sizes()
    stats = figures(cache, "orders")
    assert (stats["hits"], stats["entries"], stats["hit_rate"]) == (20, 1, round(20 / 70, 4))
    assert figures(cache, "orders")["storage_reads"] == 1
    assert await cache.read(EntityKey("s1", "orders", "nobody")) is None


@pytest.mark.parametrize("ttl", [30.0, 0.05], ids=["write-still-fresh", "write-expired"])
async def test_a_stale_storage_read_never_lands_after_a_write(
    store: GatedStore, bus: Bus, ttl: float
) -> None:
    """The classic race: a reader misses and reads v1, a writer commits v2 and caches it before
    confirming, then the reader tries to cache v1. It must not, even once v2's TTL ran out."""
    cache = RequestCache(store, bus, {"orders": ttl})
    await store.commit(BatchRequest(), lambda _: (None, _write(state(1))))
    store.gate = asyncio.Event()
    stale = asyncio.create_task(cache.read(KEY))
    await eventually(lambda: store.reads == 1, what="the reader's storage read")
    await commit(store, cache, state(2))  # confirmed from here on
    await asyncio.sleep(2 * ttl if ttl < 1 else 0)
    store.gate.set()
    assert version(await stale) == 1  # it began before the confirmation: allowed
    for _ in range(3):
        assert version(await cache.read(KEY)) == 2


async def test_a_read_never_shares_a_storage_read_from_before_a_confirmation(
    store: GatedStore, bus: Bus
) -> None:
    """A read that finds the key stale joins the storage read in flight only when its result
    is no older than what the cache held; here it is older, so the read makes its own."""
    cache = RequestCache(store, bus, {"orders": 0})  # never fresh: every read misses
    await store.commit(BatchRequest(), lambda _: (None, _write(state(1))))
    store.gate = asyncio.Event()
    early = asyncio.create_task(cache.read(KEY))
    await eventually(lambda: store.reads == 1, what="the early storage read")
    await commit(store, cache, state(2))
    late = asyncio.create_task(cache.read(KEY))  # arrives after the confirmation
    await asyncio.sleep(0.2)
    assert store.reads == 1  # it joined the read in flight...
    store.gate.set()
    assert version(await early) == 1
    assert version(await late) == 2  # ...and did not take its older result
    assert store.reads == 2


async def test_disabled_cache_reads_storage_every_time(store: GatedStore) -> None:
    cache = RequestCache(store, MemoryBus(), enabled=False)
    await commit(store, cache, state(3))
    assert [version(await cache.read(KEY)) for _ in range(3)] == [3, 3, 3]
    assert store.reads == 3
    assert figures(cache, "orders")["hits"] == 0


async def test_redis_unreachable_then_restarted_keeps_the_rule(
    store: GatedStore, tmp_path: Path
) -> None:
    """Redis dies between a commit and its write-through: the write-through is retried until the
    old entry and every reader's put window have run out, then the batch is answered; reads go
    to storage meanwhile. Redis comes back empty: a reader's put from before is refused."""
    with throwaway_redis(tmp_path) as redis:
        bus = await started_bus("redis", "t", redis.url)
        # The guard also bounds the reader held at the gate below while Redis restarts: 2 s,
        # not less, for a loaded machine's restart.
        cache = RequestCache(store, bus, {"orders": 0.3}, guard=2.0)
        try:
            await commit(store, cache, state(1))
            assert version(await cache.read(KEY)) == 1
            reads = store.reads

            redis.kill()
            began = time.monotonic()
            await commit(store, cache, state(2))
            waited = time.monotonic() - began
            print(f"write-through with Redis down answered after {waited:.2f}s")
            assert cache.write_through_failures == 1
            assert waited >= 2.0 + 0.3  # the guard and the TTL: nothing older can be served
            assert version(await cache.read(KEY)) == 2  # from storage
            assert store.reads == reads + 1

            # A reader reads v2 from storage while Redis is up again (empty); a writer then
            # caches v3; Redis restarts empty again before the reader's put lands.
            redis.start()
            await eventually(redis.answers, what="redis back")
            store.gate = asyncio.Event()
            stale = asyncio.create_task(cache.read(KEY))
            await eventually(lambda: store.reads == reads + 2, what="the reader's storage read")
            await commit(store, cache, state(3))
            redis.restart()
            store.gate.set()
            assert version(await stale) == 2
            store.gate = None
            for _ in range(3):
                assert version(await cache.read(KEY)) == 3
        finally:
            await cache.close()
            await bus.close()


def test_the_body_around_a_known_state_text_is_the_encoded_body() -> None:
    """entity_body builds the body around the state's own JSON text (the engine's, or the row's
    in SQLite): byte for byte what encoding the whole entity gives."""
    for entity in [
        Entity(KEY, 3, {"status": "pronto", "obs": 'sem "cebola" 🍧\n', "n": [1.5, None]}),
        Entity(EntityKey("s1", "orders", 'id "ç" 🍧'), 9, {}, updated_by="pós-1"),
        Entity(KEY, 4, {"kept": "on a tombstone"}, deleted=True, updated_by="pos-1"),
    ]:
        entity.updated_at = "2024-01-15T10:30:00.000000Z"
        encoded = entity_body(entity)
        assert json.loads(encoded) == entity_fields(entity)
        entity.data_json = json.dumps(entity.data, separators=(",", ":"), ensure_ascii=False)
        assert entity_body(entity) == encoded

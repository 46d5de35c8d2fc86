"""The SharedCache port: the RequestCache's shared state (versions never lowered, floors kept,
a reader's put bound to its epoch and window), alike on every backend and across workers."""

from __future__ import annotations

import asyncio

from chefia_rt.bus.base import CacheEntry
from chefia_rt.domain import EntityKey
from tests.bus.conftest import KEY, UNICODE_DATA, Worker


def entry(
    version: int,
    key: EntityKey = KEY,
    fresh_for: float = 30.0,
    keep_for: float = 60.0,
) -> CacheEntry:
    body = f'{{"v":{version},"k":"{key.entity_id}","t":"{UNICODE_DATA["zh"]}"}}'.encode()
    return CacheEntry(key, version, body, fresh_for, keep_for)


async def test_cache_starts_empty(worker: Worker) -> None:
    slot = await worker.bus.cache_get(KEY, 5.0)
    assert (slot.version, slot.body) == (0, None)
    assert slot.epoch  # a generation exists from the first read on
    assert (await worker.bus.cache_get(KEY, 5.0)).epoch == slot.epoch
    assert await worker.bus.cache_sizes() == {}


async def test_cache_never_lowers_a_version(worker: Worker) -> None:
    bus = worker.bus
    assert await bus.cache_put([entry(3)], None) == 1
    slot = await bus.cache_get(KEY, 5.0)
    assert (slot.version, slot.body) == (3, entry(3).body)
    assert await bus.cache_put([entry(2)], None) == 0  # the writer's puts too
    assert await bus.cache_put([entry(2)], slot) == 0
    assert (await bus.cache_get(KEY, 5.0)).version == 3
    assert await bus.cache_put([entry(3)], slot) == 1  # the same version refreshes
    assert await bus.cache_put([entry(4)], slot) == 1
    assert (await bus.cache_get(KEY, 5.0)).body == entry(4).body
    # Versions beyond a double's exact integers still compare exactly.
    big = 2**60
    assert await bus.cache_put([entry(big + 1)], None) == 1
    assert await bus.cache_put([entry(big)], None) == 0
    assert (await bus.cache_get(KEY, 5.0)).version == big + 1


async def test_cache_batch_put_decides_each_key(worker: Worker) -> None:
    other = EntityKey("s1", "tables", "t:1")
    elsewhere = EntityKey("s2", "orders", "order-1")  # same type and id, another store
    assert await worker.bus.cache_put([entry(5)], None) == 1
    stored = await worker.bus.cache_put([entry(4), entry(1, other), entry(7, elsewhere)], None)
    assert stored == 2
    assert [(await worker.bus.cache_get(k, 5.0)).version for k in (KEY, other, elsewhere)] == [
        5,
        1,
        7,
    ]
    assert await worker.bus.cache_sizes() == {"orders": 2, "tables": 1}


async def test_a_stale_entry_stays_a_floor_until_its_keep_time(worker: Worker) -> None:
    bus = worker.bus
    await bus.cache_put([entry(6, fresh_for=0.05, keep_for=2.0)], None)
    await asyncio.sleep(0.15)
    slot = await bus.cache_get(KEY, 5.0)
    assert (slot.version, slot.body) == (6, None)  # not fresh, but nothing older may go in
    assert await bus.cache_put([entry(5)], slot) == 0
    await asyncio.sleep(2.0)
    assert (await bus.cache_get(KEY, 5.0)).version == 0  # kept no longer
    assert await bus.cache_sizes() == {}


async def test_a_readers_put_needs_its_epoch_and_window(worker: Worker) -> None:
    bus = worker.bus
    slot = await bus.cache_get(KEY, 5.0)
    late = await bus.cache_get(KEY, 0.05)
    await asyncio.sleep(0.15)
    assert await bus.cache_put([entry(1)], late) == 0  # its window has passed
    await bus.cache_clear()
    assert await bus.cache_put([entry(1)], slot) == 0  # read before the clear
    fresh = await bus.cache_get(KEY, 5.0)
    assert fresh.epoch != slot.epoch
    assert await bus.cache_put([entry(1)], fresh) == 1
    await bus.cache_clear()
    assert (await bus.cache_get(KEY, 5.0)).version == 0  # a clear drops everything held
    assert await bus.cache_put([entry(1)], None) == 1  # the writer's put needs no slot


async def test_cache_is_shared_by_the_workers(workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    slot_b = await b.bus.cache_get(KEY, 5.0)
    await a.bus.cache_put([entry(2)], None)
    assert await b.bus.cache_put([entry(1)], slot_b) == 0  # a's newer write is the floor
    got = await b.bus.cache_get(KEY, 5.0)
    assert (got.epoch, got.version, got.body) == (slot_b.epoch, 2, entry(2).body)
    await a.bus.cache_clear()
    assert (await b.bus.cache_get(KEY, 5.0)).version == 0
    assert await b.bus.cache_sizes() == {"orders": 1}  # still kept (stale epoch) until expiry

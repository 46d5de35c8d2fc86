"""A burst of writes must wait for a Redis connection, not fail: every write reads its entity's
lease, and redis-py's default pool refused any command beyond 100 in flight ("Too many
connections"), which the node answered 1013. The Locust run of 1000 terminals found it."""

from __future__ import annotations

import asyncio

from chefia_rt.bus.redis import POOL_SIZE, RedisBus
from chefia_rt.domain import EntityKey
from tests.bus.conftest import Worker, drop_prefix, redis_reachable, unique_prefix
from tests.services import REDIS_URL


async def test_many_concurrent_lease_reads_all_answer() -> None:
    await redis_reachable(REDIS_URL)
    prefix = unique_prefix()
    worker = Worker(RedisBus(REDIS_URL, prefix=prefix))
    await worker.start()
    try:
        keys = [EntityKey("s1", "tables", f"t{i}") for i in range(8 * POOL_SIZE)]
        async with asyncio.timeout(30):
            answers = await asyncio.gather(
                *(worker.bus.get_lease(key) for key in keys), return_exceptions=True
            )
        failed = [a for a in answers if isinstance(a, BaseException)]
        assert failed == [], f"{len(failed)} of {len(keys)} failed, e.g. {failed[0]!r}"
        assert answers == [None] * len(keys)  # nobody holds these locks
    finally:
        await worker.bus.close()
        await drop_prefix(REDIS_URL, prefix)

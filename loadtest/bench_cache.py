"""RequestCache benchmark: entity reads with the cache against the same reads straight from storage.

    python -m loadtest.bench_cache [--dsn DSN] [--redis URL] [--reads N] [--concurrency C]

Prints ONE JSON line. Both phases run the same workload in one invocation, each in a fresh schema
of the DSN's database (dropped afterwards) and, with the cache, under a fresh Redis prefix:

- `C` concurrent readers make `N` reads of `--entities` entities of one store, half orders (TTL
  0.5 s) and half products (5 s), skewed as a restaurant's are (a fifth of the entities get four
  fifths of the reads);
- meanwhile one writer commits an UPDATE of a random entity every `--write-interval` seconds
  through the node's path (PostgreSQL commit, then the cache's write-through, then "confirmed").

Measured per phase: reads/s, storage reads (the cache's own counter in the read path), storage
reads saved against one per read, hit rate, read latency p50/p99, and PostgreSQL's CPU and this
client's CPU per read (from /proc, as loadtest.bench_store measures them). Every read is checked
against the rule: a read that started after a confirmation must return that version or newer
(`stale_reads` must be 0). With the cache the shared state is Redis (the production shape), or
the in-process bus with `--redis none`. The readers call RequestCache.read in this process (what
GET /api/v1/entities/{type}/{id} does), so HTTP parsing is left out of both phases alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from chefia_rt.bus.base import Bus
from chefia_rt.bus.memory import MemoryBus
from chefia_rt.bus.redis import RedisBus
from chefia_rt.cache import RequestCache
from chefia_rt.domain import BatchState, BatchWrite, Entity, EntityKey
from chefia_rt.errors import StorageUnavailable
from chefia_rt.protocol.messages import utc_now_iso
from chefia_rt.store.base import BatchRequest
from chefia_rt.store.postgres import PostgresStore
from loadtest.bench_store import DEFAULT_DSN, Meter, _positive, with_search_path

DEFAULT_REDIS = os.environ.get("CHEFIA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
STORE = "bench"
TYPES = ("orders", "products")


def writes(entities: list[Entity]) -> Callable[[BatchState], tuple[None, BatchWrite]]:
    """A decide callback that writes exactly these states."""
    return lambda _: (None, BatchWrite(entities=entities))


class Phase:
    """One run of the workload against one RequestCache."""

    def __init__(self, cache: RequestCache, store: PostgresStore, keys: list[EntityKey]) -> None:
        self.cache = cache
        self.store = store
        self.keys = keys
        self.hot = keys[: max(1, len(keys) // 5)]
        self.versions = dict.fromkeys(keys, 1)  # confirmed versions
        self.latencies: list[float] = []
        self.stale = 0
        self.writes = 0

    def pick(self, rng: random.Random) -> EntityKey:
        return rng.choice(self.hot) if rng.random() < 0.8 else rng.choice(self.keys)

    async def reader(self, reads: int, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(reads):
            key = self.pick(rng)
            confirmed = self.versions[key]
            began = time.perf_counter()
            found = await self.cache.read(key)
            self.latencies.append(time.perf_counter() - began)
            if found is None or found.version < confirmed:
                self.stale += 1

    async def writer(self, interval: float, seed: int) -> None:
        rng = random.Random(seed)
        while True:
            await asyncio.sleep(interval)
            key = self.pick(rng)
            entity = Entity(
                key, self.versions[key] + 1, {"n": rng.random()}, updated_by="bench-writer"
            )
            entity.updated_at = utc_now_iso()
            # The node's order: commit, write through, and only then is it confirmed.
            await self.store.commit(BatchRequest(), writes([entity]))
            await self.cache.written([entity])
            self.versions[key] = entity.version
            self.writes += 1

    async def run(self, reads: int, concurrency: int, interval: float) -> dict[str, Any]:
        per_reader = [reads // concurrency + (i < reads % concurrency) for i in range(concurrency)]
        writer = asyncio.create_task(self.writer(interval, 1))
        try:
            with Meter(set()) as meter:
                await asyncio.gather(*(self.reader(n, 100 + i) for i, n in enumerate(per_reader)))
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        seconds = meter.seconds
        stats = self.cache.stats()
        storage_reads = int(sum(stats["storage_reads"].values()))
        hits = int(sum(stats["hits"].values()))
        ordered = sorted(self.latencies)
        return {
            "reads": reads,
            "seconds": round(seconds, 3),
            "reads_per_s": round(reads / seconds, 1),
            "storage_reads": storage_reads,
            "storage_reads_saved": reads - storage_reads,
            "hit_rate": round(hits / reads, 4),
            "read_p50_ms": round(1000 * statistics.median(ordered), 3),
            "read_p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 3),
            # PostgreSQL's CPU (every postgres process; the writer's commits included) and
            # this process's, per read: what the saved storage reads are worth.
            "pg_cpu_us_per_read": round(meter.pg_us / reads, 2) if meter.visible else None,
            "client_cpu_us_per_read": round(meter.client_us / reads, 2),
            "writes": self.writes,
            "stale_reads": self.stale,
        }


async def run_phase(args: argparse.Namespace, schema: str, cached: bool) -> dict[str, Any]:
    store = PostgresStore(with_search_path(args.dsn, schema), max_size=args.pool)
    await store.open()
    bus: Bus = MemoryBus()
    prefix = f"bench-cache-{uuid.uuid4().hex[:10]}"
    if cached and args.redis != "none":
        bus = RedisBus(args.redis, prefix=prefix)
    await bus.start(lambda *_: None, lambda *_: None, lambda: None)
    cache = RequestCache(store, bus, enabled=cached)
    try:
        keys = [EntityKey(STORE, TYPES[i % 2], f"e{i}") for i in range(args.entities)]
        first = [Entity(k, 1, {"n": 0}, updated_by="bench") for k in keys]
        await store.commit(BatchRequest(), writes(first))
        return await Phase(cache, store, keys).run(
            args.reads, args.concurrency, args.write_interval
        )
    finally:
        await cache.close()
        if isinstance(bus, RedisBus):
            keys_left = [k async for k in bus.redis.scan_iter(match=f"{prefix}:*", count=500)]
            if keys_left:
                await bus.redis.delete(*keys_left)
        await bus.close()
        await store.close()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    schemas = {"cache": f"bench_{tag}_cache", "no_cache": f"bench_{tag}_direct"}
    admin = await asyncpg.connect(with_search_path(args.dsn, "public"), timeout=10)
    try:
        for schema in schemas.values():
            await admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            cached = await run_phase(args, schemas["cache"], cached=True)
            direct = await run_phase(args, schemas["no_cache"], cached=False)
        finally:
            for schema in schemas.values():
                await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await admin.close()
    return {
        "bench": "request_cache",
        "shared_state": "memory" if args.redis == "none" else "redis",
        "entities": args.entities,
        "concurrency": args.concurrency,
        "write_interval_s": args.write_interval,
        "cache": cached,
        "no_cache": direct,
        "ratio": {
            "reads_per_s": round(cached["reads_per_s"] / direct["reads_per_s"], 2),
            "storage_reads": round(cached["storage_reads"] / direct["storage_reads"], 4),
            "pg_cpu_us_per_read": (
                round(cached["pg_cpu_us_per_read"] / direct["pg_cpu_us_per_read"], 4)
                if cached["pg_cpu_us_per_read"] and direct["pg_cpu_us_per_read"]
                else None
            ),
        },
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_cache",
        description="Entity reads through the RequestCache vs from storage; one JSON line.",
    )
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL DSN (default %(default)s)")
    parser.add_argument(
        "--redis", default=DEFAULT_REDIS, help="Redis URL, or 'none' for the in-process cache"
    )
    parser.add_argument("--reads", type=_positive, default=20_000)
    parser.add_argument("--concurrency", type=_positive, default=50, help="concurrent readers")
    parser.add_argument("--entities", type=_positive, default=200)
    parser.add_argument("--write-interval", type=float, default=0.02, help="seconds per write")
    parser.add_argument("--pool", type=_positive, default=8, help="PostgreSQL connections")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = asyncio.run(bench(args))
    except (OSError, asyncpg.PostgresError, RedisError, StorageUnavailable) as exc:
        print(f"bench_cache: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The RequestCache: current entity state in front of storage (docs/architecture.md §5).

Reads of `GET /api/v1/entities/{type}/{id}` come here. The shared state lives in the bus backend
(Redis with REDIS_URL, this process otherwise), so every worker and node sees one cache. Entries
answer reads for their entity type's TTL; N concurrent misses of a key in a worker cost one
storage read (single flight).

The rule: a read never returns a version older than one already confirmed, on any worker or node.
How it holds:

- Write-through before the confirmation. The node puts every state a batch committed into the
  cache (one round trip per batch) before it answers anyone, so after a confirmation the cache
  holds that version or a newer one. Every put is a compare-and-set that never lowers a key's
  version, so a writer that lost the race to a newer one changes nothing.
- No stale put after a write. The classic race (a reader misses, reads version v from storage,
  a writer commits and caches v+1, the reader then stores v) is refused by that compare-and-set.
  So that the refusal still works when the newer entry's TTL has run out, an entry is kept
  FLOOR_KEEP seconds past its freshness as a version floor (stale: it answers no read, but no
  older version may replace it), and a reader's put is accepted only within READ_GUARD of the
  cache read that preceded its storage read (`CacheSlot.put_until`, in the backend's clock),
  with READ_GUARD < FLOOR_KEEP. A Redis that restarted empty or was flushed has lost its floors:
  the cache then has a new epoch, and every put based on a read of the old one is refused.
- Single flight without going back in time. A read joins a storage read already in flight only
  when that read started after the request arrived, or when it runs in the same epoch and its
  result is at least the version the cache held (even stale) when this read looked: a
  confirmed version is in the cache before its confirmation leaves, so a result at or above the
  held version is at or above every confirmed one. Otherwise the read starts its own.
- Redis unreachable. A read that cannot ask the cache goes to storage (a storage read that
  starts after the request sees every confirmed write). A write-through that fails is retried
  until it succeeds or until the stale state it should have replaced can no longer be served:
  the old entry's freshness (the type's TTL) and every reader's put window (READ_GUARD) have
  run out. Only then are the batch's senders answered, so the confirmation still goes out,
  late, and the rule holds. Redis must not evict keys (`maxmemory-policy noeviction`, as for the
  lock leases) and runs without persistence (a restart comes back empty, never older).
- No in-process copy in Redis mode: another worker's write could not reach it before that
  write's confirmation. The in-process backend (one worker) is the whole cache, and is written
  through synchronously.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chefia_rt.bus.base import CacheEntry, CacheSlot, SharedCache
from chefia_rt.domain import Entity, EntityKey
from chefia_rt.errors import StorageUnavailable
from chefia_rt.store.base import Store
from chefia_rt.sync.engine import compact_json, wire_data

log = logging.getLogger("chefia_rt.cache")

# docs/configuration.md (CACHE_TTLS); "*" is every other entity type.
DEFAULT_TTLS: dict[str, float] = {
    "orders": 0.5,
    "cashier_operations": 0.5,
    "tables": 1.0,
    "products": 5.0,
    "customers": 5.0,
    "config": 30.0,
    "*": 1.0,
}
READ_GUARD = 5.0  # seconds a storage read (and the put after it) may take, else it is not used
FLOOR_KEEP = 60.0  # seconds an entry outlives its freshness as a version floor (> READ_GUARD)
WRITE_RETRY = (0.05, 1.0)  # first and longest wait between retries of a failed write-through
SIZES_INTERVAL = 15.0  # seconds between counts of the entries held, for stats()


@dataclass(frozen=True, slots=True)
class CachedEntity:
    """An entity as the read API answers it: its version (the ETag) and its JSON body."""

    version: int
    body: bytes


def entity_fields(entity: Entity) -> dict[str, Any]:
    """An entity as the read API shows it."""
    return {
        "entity_type": entity.key.entity_type,
        "entity_id": entity.key.entity_id,
        "version": entity.version,
        "data": wire_data(entity),
        "deleted": entity.deleted,
        "updated_at": entity.updated_at,
        "updated_by": entity.updated_by,
    }


def entity_body(entity: Entity) -> bytes:
    """The JSON body of `GET /api/v1/entities/{type}/{id}`, encoded once per version: the
    compact JSON of `entity_fields`, around the state's own text when that is known."""
    data = "{}" if entity.deleted else entity.data_json
    if data is None:
        return compact_json(entity_fields(entity)).encode()
    key = entity.key
    return (
        f'{{"entity_type":{compact_json(key.entity_type)},'
        f'"entity_id":{compact_json(key.entity_id)},"version":{entity.version:d},'
        f'"data":{data},"deleted":{"true" if entity.deleted else "false"},'
        f'"updated_at":{compact_json(entity.updated_at)},'
        f'"updated_by":{compact_json(entity.updated_by)}}}'
    ).encode()


@dataclass(slots=True)
class _Counters:
    hits: int = 0
    misses: int = 0
    storage_reads: int = 0


@dataclass(slots=True)
class _Flight:
    """One storage read of a key that concurrent reads share."""

    task: asyncio.Task[CachedEntity | None]
    epoch: str | None  # the cache epoch it read under (None: the cache was unreachable)
    started: float  # monotonic


class RequestCache:
    """Entity reads through the shared cache; write-through of committed state."""

    def __init__(
        self,
        store: Store,
        bus: SharedCache,
        ttls: Mapping[str, float] | None = None,
        enabled: bool = True,
        guard: float = READ_GUARD,
    ) -> None:
        if not 0 < guard < FLOOR_KEEP:
            raise ValueError("the read guard must be shorter than the floors are kept")
        self.store = store
        self.bus = bus
        self.enabled = enabled
        self.guard = guard
        self._ttls = {**DEFAULT_TTLS, **(ttls or {})}
        self._counters: dict[str, _Counters] = {}
        self._sizes: dict[str, int] = {}
        self._flights: dict[EntityKey, _Flight] = {}
        self._sizer: asyncio.Task[None] | None = None
        self.write_through_failures = 0

    async def start(self) -> None:
        if self.enabled:
            self._sizer = asyncio.create_task(self._count_sizes(), name="cache-sizes")

    async def close(self) -> None:
        tasks = [f.task for f in self._flights.values()]
        if self._sizer is not None:
            tasks.append(self._sizer)
            self._sizer = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self._flights.clear()

    def ttl(self, entity_type: str) -> float:
        """Seconds a cached entity of this type answers reads."""
        return self._ttls.get(entity_type, self._ttls["*"])

    def _count(self, entity_type: str) -> _Counters:
        counters = self._counters.get(entity_type)
        if counters is None:
            counters = self._counters[entity_type] = _Counters()
        return counters

    # ---- reads ------------------------------------------------------------------------------

    async def read(self, key: EntityKey) -> CachedEntity | None:
        """The entity's current state (None when storage has none): from the cache while
        fresh, else from storage. Raises StorageUnavailable when neither answers."""
        counters = self._count(key.entity_type)
        if not self.enabled:
            counters.misses += 1
            return await self._read_storage(key)
        arrived = time.monotonic()
        try:
            slot: CacheSlot | None = await self.bus.cache_get(key, self.guard)
        except StorageUnavailable as exc:
            log.debug("cache unreachable, reading %s from storage: %s", key, exc)
            slot = None
        if slot is not None and slot.body is not None:
            counters.hits += 1
            return CachedEntity(slot.version, slot.body)
        counters.misses += 1
        flight = self._flights.get(key)
        if flight is not None and self._may_join(flight, slot, arrived):
            found = await asyncio.shield(flight.task)
            if flight.started >= arrived or (slot is not None and _version(found) >= slot.version):
                return found
        return await asyncio.shield(self._fly(key, slot).task)

    @staticmethod
    def _may_join(flight: _Flight, slot: CacheSlot | None, arrived: float) -> bool:
        if flight.started >= arrived:
            return True  # it read storage after this request arrived: it saw every confirmation
        return slot is not None and flight.epoch == slot.epoch

    def _fly(self, key: EntityKey, slot: CacheSlot | None) -> _Flight:
        flight = _Flight(
            asyncio.create_task(self._load(key, slot), name=f"cache-read:{key.entity_id}"),
            None if slot is None else slot.epoch,
            time.monotonic(),
        )
        self._flights[key] = flight
        flight.task.add_done_callback(lambda task: self._landed(key, flight))
        return flight

    def _landed(self, key: EntityKey, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.task.cancelled():
            flight.task.exception()  # retrieved: every waiter may have gone (client left)

    async def _load(self, key: EntityKey, slot: CacheSlot | None) -> CachedEntity | None:
        started = time.monotonic()
        found = await self._read_storage(key)
        if found is None or slot is None:
            return found
        if time.monotonic() - started > self.guard:
            # Past the guard a put would be refused anyway; what was read is still no older
            # than any confirmation before the read started, so it may be answered.
            return found
        ttl = self.ttl(key.entity_type)
        entry = CacheEntry(key, found.version, found.body, ttl, ttl + FLOOR_KEEP)
        with contextlib.suppress(StorageUnavailable):
            await self.bus.cache_put([entry], slot)
        return found

    async def _read_storage(self, key: EntityKey) -> CachedEntity | None:
        try:
            async with asyncio.timeout(self.guard):
                entity = await self.store.get_entity(key)
        except TimeoutError:
            raise StorageUnavailable("storage did not answer in time; retry") from None
        finally:
            self._count(key.entity_type).storage_reads += 1
        return None if entity is None else CachedEntity(entity.version, entity_body(entity))

    # ---- writes -----------------------------------------------------------------------------

    async def written(self, entities: Sequence[Entity]) -> None:
        """Put a committed batch's new states before its senders are answered.

        Retried while the cache is unreachable, until it succeeds or until nothing older can
        be served any more (see the module docstring); returns in either case.
        """
        if not self.enabled or not entities:
            return
        entries = []
        for entity in entities:
            ttl = self.ttl(entity.key.entity_type)
            entries.append(
                CacheEntry(entity.key, entity.version, entity_body(entity), ttl, ttl + FLOOR_KEEP)
            )
        deadline = time.monotonic() + self.guard + max(e.fresh_for for e in entries) + 0.5
        delay = WRITE_RETRY[0]
        while True:
            try:
                await self.bus.cache_put(entries, None)
                return
            except StorageUnavailable as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.write_through_failures += 1
                    log.warning(
                        "cache write-through of %d entities failed (%s); answered after the "
                        "old entries ran out",
                        len(entries),
                        exc,
                    )
                    return
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, WRITE_RETRY[1])

    # ---- stats ------------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, float | int]]:
        """Figure → {entity type: value}: hits, misses and storage_reads of this worker
        (cumulative), hit_rate (0..1), and the entries the shared cache held at the last count
        (every SIZES_INTERVAL seconds; the same on every worker when it is Redis)."""
        out: dict[str, dict[str, float | int]] = {
            "hits": {},
            "misses": {},
            "storage_reads": {},
            "hit_rate": {},
            "entries": dict(self._sizes),
        }
        for entity_type, counters in self._counters.items():
            reads = counters.hits + counters.misses
            out["hits"][entity_type] = counters.hits
            out["misses"][entity_type] = counters.misses
            out["storage_reads"][entity_type] = counters.storage_reads
            out["hit_rate"][entity_type] = round(counters.hits / reads, 4) if reads else 0.0
        return out

    async def refresh_sizes(self) -> None:
        """Count the entries the shared cache holds now."""
        self._sizes = await self.bus.cache_sizes()

    async def _count_sizes(self) -> None:
        while True:
            try:
                await self.refresh_sizes()
            except StorageUnavailable as exc:
                log.debug("cache sizes not counted: %s", exc)
            await asyncio.sleep(SIZES_INTERVAL)


def _version(found: CachedEntity | None) -> int:
    return 0 if found is None else found.version

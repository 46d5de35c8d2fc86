"""Locks and the shared RequestCache on Redis: the Leases and SharedCache ports of the bus, over
the connection pool and scripts `RedisBus` sets up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from chefia_rt.bus.base import CacheEntry, CacheSlot
from chefia_rt.domain import EntityKey
from chefia_rt.errors import StorageUnavailable
from chefia_rt.sync.locks import Lease, TooManyLocks

CACHE_TIMEOUT = 1.0  # a cache call waits no longer: a read then goes to storage
SIZES_SCAN_LIMIT = 200_000  # keys a size count looks at, at most
LEASE_READ_TIMEOUT = 1.0
LEASE_READ_BATCH = 512  # lease reads per round trip


class RedisState:
    """Leases and cache entries in Redis keys; `RedisBus` is the one subclass."""

    prefix: str
    lock_max: int
    _redis: aioredis.Redis | None
    _acquire: AsyncScript
    _release: AsyncScript
    _read_leases: AsyncScript
    _cache_get: AsyncScript
    _cache_put: AsyncScript

    # ---- keys -------------------------------------------------------------------------------

    def _lock_key(self, key: EntityKey) -> str:
        # JSON of the parts: ids may contain ':' and must not collide.
        return f"{self.prefix}:lock:" + json_parts(key.store_id, key.entity_type, key.entity_id)

    def _owner_key(self, store_id: str, owner: str) -> str:
        return f"{self.prefix}:locks-of:" + json.dumps([store_id, owner])

    def _presence_key(self, store_id: str) -> str:
        return f"{self.prefix}:presence:{store_id}"

    def _cache_key(self, key: EntityKey) -> str:
        return f"{self.prefix}:cache:" + json.dumps([key.store_id, key.entity_type, key.entity_id])

    @property
    def _cache_epoch_key(self) -> str:
        return cache_epoch_key(self.prefix)

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise StorageUnavailable("the bus is closed")
        return self._redis

    # ---- locks ------------------------------------------------------------------------------

    async def get_lease(self, key: EntityKey) -> Lease | None:
        return (await self.get_leases([key]))[0]

    async def get_leases(self, keys: Sequence[EntityKey]) -> list[Lease | None]:
        """The leases of many entities in one round trip per LEASE_READ_BATCH keys (one script:
        a pipeline of HMGETs would parse and await each reply in Python)."""
        if self._redis is None:
            raise StorageUnavailable("lock service unavailable: the bus is closed")
        lock_keys = [self._lock_key(key) for key in keys]
        replies: list[Any] = []
        try:
            # A frozen Redis must cost a quick 1013, not the full socket timeout.
            async with asyncio.timeout(LEASE_READ_TIMEOUT):
                for start in range(0, len(lock_keys), LEASE_READ_BATCH):
                    chunk = lock_keys[start : start + LEASE_READ_BATCH]
                    replies.extend(await self._read_leases(keys=chunk))
        except (RedisError, OSError, TimeoutError) as exc:
            # A timeout's text is empty: say what it was.
            reason = f"lock service unavailable: {exc or type(exc).__name__}"
            raise StorageUnavailable(reason) from exc
        now = time.time()
        leases: list[Lease | None] = []
        for key, (owner, lock_id, expires) in zip(keys, replies, strict=True):
            lease = None
            if owner is not None and lock_id is not None and expires is not None:
                lease = Lease(key, as_text(owner), as_text(lock_id), int(expires) / 1000)
            leases.append(lease if lease is not None and lease.expires_at > now else None)
        return leases

    async def acquire_lease(
        self, key: EntityKey, owner: str, lock_id: str, ttl: float
    ) -> tuple[bool, Lease | None]:
        ttl_ms = max(1, int(ttl * 1000))
        expires_ms = int(time.time() * 1000) + ttl_ms
        try:
            taken, holder, held_id, expires = await self._acquire(
                keys=[self._lock_key(key), self._owner_key(key.store_id, owner)],
                args=[owner, lock_id, ttl_ms, expires_ms, self.lock_max],
            )
        except (RedisError, OSError) as exc:
            raise StorageUnavailable(f"lock service unavailable: {exc}") from exc
        if taken == 2:
            raise TooManyLocks(self.lock_max)
        lease = Lease(key, as_text(holder), as_text(held_id), int(expires) / 1000)
        return bool(taken), lease

    async def release_lease(self, key: EntityKey, owner: str) -> bool:
        try:
            released = await self._release(
                keys=[self._lock_key(key), self._owner_key(key.store_id, owner)], args=[owner]
            )
        except (RedisError, OSError) as exc:
            raise StorageUnavailable(f"lock service unavailable: {exc}") from exc
        return bool(released)

    # ---- cache ------------------------------------------------------------------------------

    async def cache_get(self, key: EntityKey, put_window: float) -> CacheSlot:
        try:
            async with asyncio.timeout(CACHE_TIMEOUT):
                found = await self._cache_get(
                    keys=[self._cache_key(key), self._cache_epoch_key],
                    args=[uuid.uuid4().hex, int(put_window * 1000)],
                )
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"cache unavailable: {exc}") from exc
        body = found[3] if len(found) > 3 else None
        return CacheSlot(as_text(found[0]), int(found[1]), body, int(found[2]))

    async def cache_put(self, entries: Sequence[CacheEntry], slot: CacheSlot | None) -> int:
        if not entries:
            return 0
        args: list[str | int | bytes] = [
            "" if slot is None else slot.epoch,
            "" if slot is None else slot.put_until,
            uuid.uuid4().hex,
        ]
        for entry in entries:
            args += [
                entry.version,
                int(entry.fresh_for * 1000),
                max(1, int(entry.keep_for * 1000)),
                entry.body,
            ]
        keys = [self._cache_epoch_key, *(self._cache_key(e.key) for e in entries)]
        try:
            async with asyncio.timeout(CACHE_TIMEOUT):
                return int(await self._cache_put(keys=keys, args=args))
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"cache unavailable: {exc}") from exc

    async def cache_clear(self) -> None:
        try:
            async with asyncio.timeout(CACHE_TIMEOUT):
                await self.redis.set(self._cache_epoch_key, uuid.uuid4().hex)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"cache unavailable: {exc}") from exc

    async def cache_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        start = len(self.prefix) + len(":cache:")
        seen = 0
        try:
            async for raw in self.redis.scan_iter(match=f"{self.prefix}:cache:*", count=1000):
                seen += 1
                if seen > SIZES_SCAN_LIMIT:
                    break
                with contextlib.suppress(ValueError, IndexError, TypeError):
                    entity_type = json.loads(as_text(raw)[start:])[1]
                    sizes[entity_type] = sizes.get(entity_type, 0) + 1
        except (RedisError, OSError) as exc:
            raise StorageUnavailable(f"cache unavailable: {exc}") from exc
        return sizes


def cache_epoch_key(prefix: str) -> str:
    return f"{prefix}:cache-epoch"


def plain(part: str) -> bool:
    """A string json.dumps writes as itself between quotes (nothing to escape)."""
    return part.isascii() and part.isprintable() and '"' not in part and "\\" not in part


def json_parts(*parts: str) -> str:
    """`json.dumps(list(parts))`, byte for byte; every write's lease read builds one, and the
    usual ids need no escaping, so the encoder (10% of a worker's CPU at rush hour) is skipped."""
    if all(plain(part) for part in parts):
        return '["' + '", "'.join(parts) + '"]'
    return json.dumps(list(parts))


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

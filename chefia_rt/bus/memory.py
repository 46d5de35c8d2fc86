"""The in-process bus: the embedded default, for one worker without Redis."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from chefia_rt.bus.base import CacheEntry, CacheSlot, Deliver, Push, SignalHandler, Takeover
from chefia_rt.domain import EntityKey
from chefia_rt.sync.locks import DEFAULT_MAX_PER_OWNER, Lease, LockTable

log = logging.getLogger("chefia_rt.bus.memory")

CACHE_ENTRIES = 100_000  # entries the in-process RequestCache holds at most


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass(slots=True)
class _Held:
    version: int
    body: bytes
    fresh_until: int  # monotonic ms
    keep_until: int


class MemoryBus:
    """Delivers pushes straight to this process's hub; keeps leases in a dict."""

    kind = "memory"

    def __init__(
        self, cache_entries: int = CACHE_ENTRIES, lock_max: int = DEFAULT_MAX_PER_OWNER
    ) -> None:
        self._deliver: Deliver | None = None
        self._locks = LockTable(lock_max)
        # (store, terminal) -> its current session, so that the end of a stale session releases
        # nothing, as the Bus protocol says, even for a caller that unregisters a session after
        # its terminal reconnected (the hub's own bookkeeping cannot prevent that call).
        self._current: dict[tuple[str, str], str] = {}
        self._signal_handlers: dict[str, SignalHandler] = {}
        self._cache: dict[EntityKey, _Held] = {}
        self._cache_limit = cache_entries
        self._epoch = uuid.uuid4().hex

    async def start(self, deliver: Deliver, takeover: Takeover, resync: Callable[[], None]) -> None:
        # One worker: the hub itself sees every takeover, and nothing can be missed.
        self._deliver = deliver

    async def close(self) -> None:
        self._deliver = None

    async def publish(self, store_id: str, pushes: Sequence[Push]) -> None:
        if self._deliver is not None:
            self._deliver(store_id, pushes)

    async def get_lease(self, key: EntityKey) -> Lease | None:
        return self._locks.get(key, time.time())

    async def get_leases(self, keys: Sequence[EntityKey]) -> list[Lease | None]:
        if not self._locks:  # nobody holds a lock: nothing to look up
            return [None] * len(keys)
        now = time.time()
        return [self._locks.get(key, now) for key in keys]

    async def acquire_lease(
        self, key: EntityKey, owner: str, lock_id: str, ttl: float
    ) -> tuple[bool, Lease | None]:
        return self._locks.acquire(key, owner, lock_id, ttl, time.time())

    async def release_lease(self, key: EntityKey, owner: str) -> bool:
        return self._locks.release(key, owner, time.time())

    async def register(
        self, store_id: str, terminal_id: str, session_id: str, connected_at: float
    ) -> None:
        self._current[(store_id, terminal_id)] = session_id

    async def unregister(self, store_id: str, terminal_id: str, session_id: str) -> None:
        current = self._current.get((store_id, terminal_id))
        if current is not None and current != session_id:
            return  # the terminal is connected again: its locks stay
        # An unknown session counts as current (as on Redis, whose presence a restart forgets).
        self._current.pop((store_id, terminal_id), None)
        self._locks.release_owner(store_id, terminal_id, time.time())

    def on_signal(self, topic: str, handler: SignalHandler) -> None:
        self._signal_handlers[topic] = handler

    async def signal(self, topic: str, payload: dict[str, Any]) -> None:
        handler = self._signal_handlers.get(topic)
        if handler is None:
            return
        # Through msgpack, as on Redis: a payload that could not cross workers fails here too,
        # and the handler never shares a mutable dict with the sender.
        copy = msgpack.unpackb(msgpack.packb(payload), raw=False)
        try:
            handler(copy)
        except Exception:
            log.exception("signal handler of %r failed", topic)

    # ---- cache ------------------------------------------------------------------------------

    async def cache_get(self, key: EntityKey, put_window: float) -> CacheSlot:
        now = _now_ms()
        held = self._cache.get(key)
        put_until = now + int(put_window * 1000)
        if held is None or held.keep_until <= now:
            return CacheSlot(self._epoch, 0, None, put_until)
        body = held.body if held.fresh_until > now else None
        return CacheSlot(self._epoch, held.version, body, put_until)

    async def cache_put(self, entries: Sequence[CacheEntry], slot: CacheSlot | None) -> int:
        now = _now_ms()
        if slot is not None and (slot.epoch != self._epoch or now > slot.put_until):
            return 0
        if len(self._cache) + len(entries) > self._cache_limit:
            self._make_room(now)
        stored = 0
        for entry in entries:
            held = self._cache.get(entry.key)
            if held is not None and held.keep_until > now and held.version > entry.version:
                continue
            self._cache[entry.key] = _Held(
                entry.version,
                entry.body,
                now + int(entry.fresh_for * 1000),
                now + int(entry.keep_for * 1000),
            )
            stored += 1
        return stored

    def _make_room(self, now: int) -> None:
        """Drop entries past their keep time; when that frees too little, drop everything in a
        new epoch. Evicting a kept entry one by one would drop its version floor while a reader
        may still put an older state; a new epoch refuses every such put instead."""
        for key in [k for k, held in self._cache.items() if held.keep_until <= now]:
            del self._cache[key]
        if len(self._cache) > self._cache_limit * 9 // 10:
            self._cache.clear()
            self._epoch = uuid.uuid4().hex

    async def cache_clear(self) -> None:
        self._cache.clear()
        self._epoch = uuid.uuid4().hex

    async def cache_sizes(self) -> dict[str, int]:
        now = _now_ms()
        sizes: dict[str, int] = {}
        for key, held in self._cache.items():
            if held.keep_until > now:
                sizes[key.entity_type] = sizes.get(key.entity_type, 0) + 1
        return sizes

    async def ping(self) -> bool:
        return True

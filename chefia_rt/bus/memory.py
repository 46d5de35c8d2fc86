"""The in-process bus: the embedded default, for one worker without Redis."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from chefia_rt.bus.base import Deliver, Push, SignalHandler, Takeover
from chefia_rt.domain import EntityKey
from chefia_rt.sync.locks import Lease, LockTable

log = logging.getLogger("chefia_rt.bus.memory")


class MemoryBus:
    """Delivers pushes straight to this process's hub; keeps leases in a dict."""

    kind = "memory"

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        self._locks = LockTable()
        # (store, terminal) -> its current session, so that the end of a stale session releases
        # nothing, as the Bus protocol says; relying on the hub to never ask was not enough for
        # a caller that unregisters a session after its terminal reconnected.
        self._current: dict[tuple[str, str], str] = {}
        self._signal_handlers: dict[str, SignalHandler] = {}

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

    async def ping(self) -> bool:
        return True

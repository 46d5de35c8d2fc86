"""The bus ports: how a worker reaches every other worker and node.

Four narrow ports, each one concern: Broadcast carries committed operations to every hub (in
store seq order per publisher; a receiver that sees a gap fills it from storage) and, as
Signals, small messages on a named topic to every worker; Presence knows each terminal's
current session; Leases holds the entity lock leases; SharedCache the RequestCache's state.
`Bus` is all four over one connection, as a backend implements them: the in-process bus
(`memory.py`) serves the embedded single worker, Redis (`redis.py`) serves many.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from chefia_rt.domain import EntityKey, OpRecord
from chefia_rt.sync.locks import Lease


@dataclass(frozen=True, slots=True)
class Push:
    """A committed operation on its way to the store's terminals; `origin` is the terminal
    that caused it (it already has the confirmation, so it is not sent the push)."""

    record: OpRecord
    origin: str


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """An entity's state for the RequestCache: its version and its encoded body (the HTTP
    read's answer). It answers reads for `fresh_for` seconds and is kept `keep_for` seconds
    (longer) as a version floor that no older put may go below."""

    key: EntityKey
    version: int
    body: bytes
    fresh_for: float
    keep_for: float


@dataclass(frozen=True, slots=True)
class CacheSlot:
    """What the cache holds for a key when read.

    `version` is the version held (0: none), fresh or not: nothing older may be answered after
    this read. `body` is set only while the entry is fresh. `epoch` names the cache's generation
    (a new one after a flush or restart of the shared state) and `put_until` the deadline, in
    the backend's clock, of a put made from a storage read that follows this read.
    """

    epoch: str
    version: int
    body: bytes | None
    put_until: int


Deliver = Callable[[str, Sequence[Push]], None]
# (store_id, terminal_id, session_id, connected_at): a session of a terminal opened somewhere.
Takeover = Callable[[str, str, str, float], None]
# A signal's payload (a msgpack-able dict) handed to a topic's subscriber.
SignalHandler = Callable[[dict[str, Any]], None]


class Signals(Protocol):
    """Small messages on a named topic to every worker, for what other parts share across
    workers (stats, the monitor's feed, the terminal directory)."""

    def on_signal(self, topic: str, handler: SignalHandler) -> None:
        """Hand every signal on `topic`, from any worker of the deployment (this one included),
        to `handler`. Call before `start`; one handler per topic."""

    async def signal(self, topic: str, payload: dict[str, Any]) -> None:
        """Send `payload` (msgpack-able) on `topic` to every worker; this worker's handler runs
        before this returns. Best effort elsewhere: a signal sent while the bus is unreachable is
        lost, so signals carry what is refreshed anyway or can be read again from storage."""


class Broadcast(Signals, Protocol):
    """Fan-out of committed operations to every worker's hub, beside the signals."""

    async def publish(self, store_id: str, pushes: Sequence[Push]) -> None:
        """Send one store's committed operations, in seq order, to every worker."""


class Presence(Protocol):
    """Which session is each terminal's current one, across workers."""

    async def register(
        self, store_id: str, terminal_id: str, session_id: str, connected_at: float
    ) -> None:
        """Make a session its terminal's current one, and tell every worker (takeover, 4004)."""

    async def unregister(self, store_id: str, terminal_id: str, session_id: str) -> None:
        """A session ended: if it was still its terminal's current one, release its locks (work
        in proportion to the locks it holds, never to everyone's)."""


class Leases(Protocol):
    """Entity lock leases shared by every worker."""

    async def get_lease(self, key: EntityKey) -> Lease | None:
        """The live lease on an entity, if any."""

    async def get_leases(self, keys: Sequence[EntityKey]) -> list[Lease | None]:
        """The live lease on each entity (None where there is none), in the order of `keys`,
        read at once: the writer checks a whole batch's leases in one round trip. Raises
        StorageUnavailable when the leases cannot be read."""

    async def acquire_lease(
        self, key: EntityKey, owner: str, lock_id: str, ttl: float
    ) -> tuple[bool, Lease | None]:
        """(True, lease) when taken or renewed; (False, the holder's lease) otherwise.
        Raises TooManyLocks when the owner holds its maximum of live leases (the bus's
        `lock_max`, LOCKS_PER_TERMINAL) and this would be a new one."""

    async def release_lease(self, key: EntityKey, owner: str) -> bool:
        """Release a lease the owner holds; False when it held none."""


class SharedCache(Protocol):
    """The RequestCache's shared state (see cache.py for why it is shaped so)."""

    async def cache_get(self, key: EntityKey, put_window: float) -> CacheSlot:
        """Read a key's slot; a put made from it is accepted for `put_window` seconds.
        Raises StorageUnavailable when the cache cannot be read."""

    async def cache_put(self, entries: Sequence[CacheEntry], slot: CacheSlot | None) -> int:
        """Store entries, each only if no newer version of its key is held (never lower a
        version), atomically for the batch. `slot` None: the writer's committed state, always
        stored. With a slot (a reader's storage read): nothing is stored unless the cache is
        still in the slot's epoch and its put window has not passed. Returns how many were
        stored; raises StorageUnavailable when the cache could not be reached."""

    async def cache_clear(self) -> None:
        """Drop every entry at once (a new epoch): puts based on older reads are refused."""

    async def cache_sizes(self) -> dict[str, int]:
        """Entries held (fresh or kept as floors) per entity type."""


class Bus(Broadcast, Presence, Leases, SharedCache, Protocol):
    """Every port at once, over one connection: what a worker starts, pings and closes. A part
    of the worker that needs one concern takes that port, not the Bus."""

    kind: str

    async def start(self, deliver: Deliver, takeover: Takeover, resync: Callable[[], None]) -> None:
        """Begin delivering every store's pushes (from any worker) to `deliver`, sessions
        opened on other workers to `takeover`, and call `resync` when pushes may have been
        missed (the bus reconnected)."""

    async def close(self) -> None:
        """Stop delivering and release connections."""

    async def ping(self) -> bool:
        """True when the bus answers."""

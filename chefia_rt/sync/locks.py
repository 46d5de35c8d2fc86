"""Entity lock leases (docs/protocol.md §8): the rules, with time passed in.

A lease belongs to a terminal, expires on its own, and may be renewed by its owner. A terminal
holds at most LOCKS_PER_TERMINAL live leases, so releasing its leases when it disconnects costs
at most that many steps. The state lives in the bus backend (in process, or Redis across nodes);
this module only holds the rules, so both backends decide alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from chefia_rt.domain import EntityKey
from chefia_rt.errors import Locked

DEFAULT_MAX_PER_OWNER = 100


class TooManyLocks(Exception):
    """The terminal already holds its maximum of live leases (answered lock_failed)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"this terminal already holds {limit} locks, the most it may; release one")
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Lease:
    """A terminal's hold on one entity until `expires_at` (at that instant it is gone)."""

    key: EntityKey
    owner: str  # terminal_id (the store is part of the key)
    lock_id: str
    expires_at: float  # seconds since the epoch


def may_take(holder: Lease | None, owner: str, now: float) -> bool:
    """A lease can be taken when free, expired, or already held by the same terminal."""
    return holder is None or holder.expires_at <= now or holder.owner == owner


def live(holder: Lease | None, now: float) -> Lease | None:
    """The lease if it is still in force."""
    return holder if holder is not None and holder.expires_at > now else None


def check_write(
    key: EntityKey, holder: Lease | None, writer: str, needs_lock: bool, now: float
) -> None:
    """Raise Locked (4009) when a write by `writer` is not allowed under the entity's lease."""
    lease = live(holder, now)
    if lease is not None and lease.owner != writer:
        raise Locked(f"{key.entity_type}/{key.entity_id} is locked by {lease.owner}")
    if needs_lock and lease is None:
        raise Locked(
            f"writing {key.entity_type}/{key.entity_id} needs its lock; send acquire_lock first"
        )


class LockTable:
    """Leases in one process's memory: the state of the in-process bus."""

    __slots__ = ("_leases", "_owned", "max_per_owner")

    def __init__(self, max_per_owner: int = DEFAULT_MAX_PER_OWNER) -> None:
        self._leases: dict[EntityKey, Lease] = {}
        # (store_id, owner) -> the keys of its leases (live or not yet found expired).
        self._owned: dict[tuple[str, str], set[EntityKey]] = {}
        self.max_per_owner = max_per_owner

    def __len__(self) -> int:
        return len(self._leases)

    def get(self, key: EntityKey, now: float) -> Lease | None:
        """The live lease on an entity, if any (an expired one is dropped)."""
        held = self._leases.get(key)
        lease = live(held, now)
        if lease is None and held is not None:
            self._drop(key, held.owner)
        return lease

    def _drop(self, key: EntityKey, owner: str) -> None:
        del self._leases[key]
        owned = self._owned.get((key.store_id, owner))
        if owned is not None:
            owned.discard(key)
            if not owned:
                del self._owned[(key.store_id, owner)]

    def _room_for(self, key: EntityKey, owner: str, now: float) -> bool:
        """The owner may hold one more lease (expired ones it had are dropped to make room)."""
        owned = self._owned.get((key.store_id, owner), set())
        if len(owned) < self.max_per_owner:
            return True
        for held in list(owned):
            self.get(held, now)
        return len(self._owned.get((key.store_id, owner), ())) < self.max_per_owner

    def acquire(
        self, key: EntityKey, owner: str, lock_id: str, ttl: float, now: float
    ) -> tuple[bool, Lease | None]:
        """(True, new lease) or (False, the other terminal's lease).

        The owner acquiring again renews: a new lease (new lock_id, expiry now + ttl) replaces its
        old one. TooManyLocks when it is a new lease and the owner holds its maximum already.
        """
        holder = self.get(key, now)
        if not may_take(holder, owner, now):
            return False, holder
        if holder is None and not self._room_for(key, owner, now):
            raise TooManyLocks(self.max_per_owner)
        lease = Lease(key, owner, lock_id, now + ttl)
        self._leases[key] = lease
        self._owned.setdefault((key.store_id, owner), set()).add(key)
        return True, lease

    def release(self, key: EntityKey, owner: str, now: float) -> bool:
        """Drop the owner's live lease; False when there is none (expired, or another's)."""
        holder = self.get(key, now)
        if holder is None or holder.owner != owner:
            return False
        self._drop(key, owner)
        return True

    def release_owner(self, store_id: str, owner: str, now: float | None = None) -> list[EntityKey]:
        """Drop every lease a terminal holds (it disconnected).

        Returns the keys it held; given `now`, only those whose lease was still live (an expired
        lease was released already, by time, and needs no second announcement). Costs as many
        steps as the terminal holds leases, whatever the others hold.
        """
        released = []
        for key in self._owned.pop((store_id, owner), ()):
            held = self._leases.get(key)
            if held is None or held.owner != owner:
                continue
            del self._leases[key]
            if now is None or live(held, now) is not None:
                released.append(key)
        return released

"""Entity lock leases (SPEC §3 "Locks"): the rules, with time passed in.

A lease belongs to a terminal, expires on its own, and may be renewed by its owner. The state
lives in the bus backend (in process, or Redis across nodes); this module only holds the rules, so
both backends decide alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from chefia_rt.domain import EntityKey
from chefia_rt.errors import Locked


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

    __slots__ = ("_leases",)

    def __init__(self) -> None:
        self._leases: dict[EntityKey, Lease] = {}

    def get(self, key: EntityKey, now: float) -> Lease | None:
        """The live lease on an entity, if any (an expired one is dropped)."""
        lease = live(self._leases.get(key), now)
        if lease is None:
            self._leases.pop(key, None)
        return lease

    def acquire(
        self, key: EntityKey, owner: str, lock_id: str, ttl: float, now: float
    ) -> tuple[bool, Lease | None]:
        """(True, new lease) or (False, the other terminal's lease).

        The owner acquiring again renews: a new lease (new lock_id, expiry now + ttl) replaces its
        old one.
        """
        holder = self.get(key, now)
        if not may_take(holder, owner, now):
            return False, holder
        lease = Lease(key, owner, lock_id, now + ttl)
        self._leases[key] = lease
        return True, lease

    def release(self, key: EntityKey, owner: str, now: float) -> bool:
        """Drop the owner's live lease; False when there is none (expired, or another's)."""
        holder = self.get(key, now)
        if holder is None or holder.owner != owner:
            return False
        del self._leases[key]
        return True

    def release_owner(self, store_id: str, owner: str, now: float | None = None) -> list[EntityKey]:
        """Drop every lease a terminal holds (it disconnected).

        Returns the keys it held; given `now`, only those whose lease was still live (an expired
        lease was released already, by time, and needs no second announcement).
        """
        keys = [k for k, v in self._leases.items() if k.store_id == store_id and v.owner == owner]
        released = [k for k in keys if now is None or live(self._leases[k], now) is not None]
        for key in keys:
            del self._leases[key]
        return released

"""Plain records shared by the engine (sync/), the stores (store/) and the node.

No behaviour and no I/O lives here: these are the nouns of the restaurant's data, so that the
pure engine and the storage backends can speak about the same things without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

JSON = dict[str, Any]
# Operation ids (and the conflicts named after them) are unique per store, never across stores:
# every restaurant has a "pos-1", and terminals build ids from their own id and a counter.
OpKey = tuple[str, str]  # (store_id, operation id)
ConflictKey = tuple[str, str]  # (store_id, conflict id)


class EntityKey(NamedTuple):
    """One entity of one store: the unit of versioning, locking and conflict resolution.

    A named tuple, so that hashing and comparing one (every dict of the write path is keyed by
    them) runs in C."""

    store_id: str
    entity_type: str
    entity_id: str


@dataclass(slots=True)
class Entity:
    """The server's current state of one entity.

    `field_versions` remembers, per field, the version that last changed it and the client
    timestamp of that change; the merge policies need both to tell what changed since a base.
    `timestamp` is the client timestamp of the operation that last wrote the entity;
    `updated_at` the server time of that write (the batch's, set by the engine). It is
    bookkeeping, not state: two reads of the same version are equal whatever it says.
    """

    key: EntityKey
    version: int
    data: JSON
    deleted: bool = False
    timestamp: str = ""
    updated_by: str = ""
    field_versions: dict[str, list[Any]] = field(default_factory=dict)
    updated_at: str = field(default="", compare=False)
    # `data` as compact JSON text, when known already (the engine measured it, or storage held
    # it): encoded once for the size bound, storage, the audit and the cache. Never changes
    # what the entity is, only what writing it costs.
    data_json: str | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class Operation:
    """A change a terminal sent (`data_sync.operation`), already validated."""

    id: str
    store_id: str
    entity_type: str
    entity_id: str
    operation: str  # CREATE | UPDATE | DELETE | BULK_UPDATE
    data: JSON
    version: int
    timestamp: str
    terminal_id: str
    user_id: str | None = None
    requires_lock: bool = False
    priority: str = "medium"
    # The user id the terminal wrote into the operation when it differs from `user_id` (the
    # connection's identity: the token's when JWT is on). Kept in the audit, never trusted.
    claimed_user_id: str | None = None
    # The terminal may only change what exists: no CREATE, no upsert of a missing entity, no
    # undelete (a field-restricted terminal type such as kds).
    existing_only: bool = False

    @property
    def key(self) -> EntityKey:
        return EntityKey(self.store_id, self.entity_type, self.entity_id)

    @property
    def op_key(self) -> OpKey:
        return (self.store_id, self.id)

    def touched_keys(self) -> list[EntityKey]:
        """Every entity this operation may change (BULK_UPDATE touches many)."""
        if self.operation == "BULK_UPDATE":
            updates = self.data.get("updates", [])
            return [EntityKey(self.store_id, self.entity_type, u["entity_id"]) for u in updates]
        return [self.key]


@dataclass(slots=True)
class Resolution:
    """A `conflict_resolution` a terminal sent for a pending manual conflict."""

    conflict_id: str
    store_id: str
    terminal_id: str
    user_id: str | None
    resolution: str  # accept_remote | accept_local | merge
    resolved_data: JSON | None
    timestamp: str


@dataclass(slots=True)
class Conflict:
    """A pending manual conflict: the operation that could not be applied, kept until resolved."""

    id: str
    operation: Operation
    server_version: int
    server_data: JSON
    created_at: str

    @property
    def key(self) -> ConflictKey:
        return (self.operation.store_id, self.id)


@dataclass(slots=True)
class OpRecord:
    """One row of the operation log: what was decided for an operation id.

    `seq` is None for an operation that changed nothing (a losing last-write-wins write, a
    pending manual conflict); such rows are still kept, so that a retry is recognised.
    """

    id: str
    store_id: str
    entity_type: str
    entity_id: str
    operation: str
    data: JSON
    version: int | None
    seq: int | None
    status: str  # applied | merged | resolved | conflict
    conflict_resolved: bool
    terminal_id: str
    user_id: str | None
    priority: str
    timestamp: str
    server_time: str
    deleted: bool = False
    # `data` as compact JSON text when known already (see Entity.data_json); not part of the
    # record, and not sent over the bus.
    data_json: str | None = field(default=None, compare=False, repr=False)

    @property
    def op_key(self) -> OpKey:
        return (self.store_id, self.id)


@dataclass(slots=True)
class AuditRecord:
    """One audit row: who changed what, with the state before and after."""

    operation_id: str
    store_id: str
    entity_type: str
    entity_id: str
    operation: str
    terminal_id: str
    user_id: str | None
    before: JSON | None
    after: JSON | None
    sync_status: str
    conflict_resolved: bool
    timestamp: str
    claimed_user_id: str | None = None
    # `before` and `after` as compact JSON text when known already (see Entity.data_json).
    before_json: str | None = field(default=None, compare=False, repr=False)
    after_json: str | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class BatchState:
    """What a store read (under lock) for a batch, handed to the engine."""

    known_ops: dict[OpKey, OpRecord]
    entities: dict[EntityKey, Entity]
    conflicts: dict[ConflictKey, Conflict]
    last_seqs: dict[str, int]
    # Of the requested entities, those a lock lease may be in force on (stores that keep lease
    # marks only; see Store.commit).
    leased: frozenset[EntityKey] = frozenset()


@dataclass(slots=True)
class BatchWrite:
    """What the engine decided a batch writes, in one transaction.

    The operation log is append-only: `op_records` are new rows, and one whose (store_id, id)
    is already in the log fails the whole transaction. `settled_records` replace the
    `status='conflict'` row a pending manual conflict left, and nothing else.
    """

    entities: list[Entity] = field(default_factory=list)
    op_records: list[OpRecord] = field(default_factory=list)
    settled_records: list[OpRecord] = field(default_factory=list)
    audit: list[AuditRecord] = field(default_factory=list)
    new_conflicts: list[Conflict] = field(default_factory=list)
    settled_conflicts: list[ConflictKey] = field(default_factory=list)
    last_seqs: dict[str, int] = field(default_factory=dict)

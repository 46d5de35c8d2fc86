"""The pure sync engine: versions, conflicts and idempotency (SPEC §3, §4).

`Engine.decide` takes a batch of operations and conflict resolutions plus what the store read for
them under lock, and returns one outcome per item and everything the batch writes. It does no I/O
and reads no clock: the caller passes `now`. Items of one batch are decided in order, each seeing
the effects of the ones before it, exactly as if they had been committed one by one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chefia_rt.domain import (
    JSON,
    AuditRecord,
    BatchState,
    BatchWrite,
    Conflict,
    ConflictKey,
    Entity,
    EntityKey,
    Operation,
    OpKey,
    OpRecord,
    Resolution,
)
from chefia_rt.errors import (
    ChefiaError,
    Code,
    EntityTooLarge,
    InvalidMessage,
    PermissionDenied,
    ResolutionFailed,
)
from chefia_rt.sync.policies import (
    MANUAL_RESOLUTION,
    EntityPolicy,
    PolicyTable,
    latest_change_since,
)

# How statuses combine in a BULK_UPDATE: the most eventful one is reported.
_STATUS_RANK = {"applied": 0, "merged": 1, "resolved": 2}
_OPERATIONS = frozenset({"CREATE", "UPDATE", "DELETE", "BULK_UPDATE"})
_RESOLUTIONS = frozenset({"accept_remote", "accept_local", "merge"})
# The default ENTITY_MAX_BYTES: an entity's state as compact JSON, well under a message.
ENTITY_MAX_BYTES = 256 * 1024


def conflict_id_for(operation_id: str) -> str:
    """A pending manual conflict is named after the operation that raised it (unique within
    its store, like the operation id: conflicts are keyed by (store_id, conflict id))."""
    return f"conflict:{operation_id}"


def _not_serializable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_make_encoder = getattr(json.encoder, "c_make_encoder", None)
if _make_encoder is not None:
    # The C encoder json.dumps builds anew for every call, built once: half its cost for the
    # small states of a rush hour. No circular-reference check (decoded data has no cycles).
    _encode = _make_encoder(
        None, _not_serializable, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )

    def compact_json(value: Any) -> str:
        """`json.dumps(value, separators=(",", ":"), ensure_ascii=False)`, the text storage
        keeps and ENTITY_MAX_BYTES measures."""
        return "".join(_encode(value, 0))

else:  # pragma: no cover - CPython always has the C encoder
    _fallback = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

    def compact_json(value: Any) -> str:
        return _fallback.encode(value)


def text_bytes(text: str) -> int:
    """UTF-8 bytes of `text` (ASCII text is its own length: no encoding needed to tell)."""
    return len(text) if text.isascii() else len(text.encode())


def state_bytes(data: JSON) -> int:
    """The size ENTITY_MAX_BYTES bounds: the state's compact JSON encoding in UTF-8 bytes."""
    return text_bytes(compact_json(data))


def wire_data(entity: Entity) -> JSON:
    """What terminals see of an entity's state: a tombstone carries no fields."""
    return {} if entity.deleted else entity.data


def _wire_json(entity: Entity) -> str | None:
    """`wire_data(entity)` as compact JSON, when the entity's is known."""
    return "{}" if entity.deleted else entity.data_json


@dataclass(slots=True)
class Outcome:
    """The answer for one item of a batch.

    status: applied | merged | resolved | duplicate (a confirmation, from `record`), conflict
    (a `sync_conflict`, from `conflict`), or error (a `sync_error`, from `error`).
    A record with a `seq` is pushed to the store's other terminals (unless it is a duplicate).
    """

    id: str
    status: str
    record: OpRecord | None = None
    conflict: Conflict | None = None
    error: ChefiaError | None = None
    changed: list[Entity] = field(default_factory=list)


@dataclass(slots=True)
class _Change:
    """A decided change of one entity: its full data after, and how it came about.

    `fields` are the fields this change stamps in `field_versions` (what a later merge treats as
    changed on the server since an older base).
    """

    data: JSON
    deleted: bool
    fields: set[str]
    status: str
    conflict_resolved: bool


_UNCHANGED = "unchanged"
_CONFLICT = "conflict"
_NOT_FOUND = "not_found"


def _apply(current: Entity | None, kind: str, patch: JSON) -> _Change:
    """The change an operation makes when it wins (no conflict, or resolved in its favour).

    A tombstone keeps its last data, so an UPDATE that wins over a DELETE brings the entity back
    as it was plus the patch (an UPDATE is a patch, never a whole state). A CREATE replaces the
    whole state; every field it drops counts as changed too.
    """
    kept = {} if current is None else current.data
    if kind == "DELETE":
        return _Change(dict(kept), True, set(), "applied", False)
    if kind == "CREATE" or current is None:
        return _Change(dict(patch), False, set(patch) | set(kept), "applied", False)
    return _Change({**kept, **patch}, False, set(patch), "applied", False)


def resolve(
    current: Entity | None,
    kind: str,
    patch: JSON,
    version: int,
    timestamp: str,
    policy: EntityPolicy,
    table: PolicyTable,
    entity_type: str,
) -> _Change | str:
    """Decide one entity's change, or say it is unchanged, a manual conflict or not found."""
    if current is None or (current.deleted and kind == "CREATE"):
        if kind == "DELETE":
            return _NOT_FOUND
        return _apply(current, kind, patch)
    if current.deleted and kind == "DELETE":
        return _UNCHANGED
    if not current.deleted and version == current.version + 1:
        return _apply(current, kind, patch)
    # A conflict: a stale version, or an UPDATE of a tombstone.
    if policy.policy == MANUAL_RESOLUTION:
        return _CONFLICT
    base = version - 1
    if kind == "UPDATE" and not current.deleted:
        verdict = table.resolver(entity_type)(current, patch, base, timestamp)
        if verdict.wins_whole:  # even an empty patch: the write wins, a new version
            change = _apply(current, kind, patch)
        elif verdict.accepted:
            change = _apply(current, kind, verdict.accepted)
            change.status = verdict.status
        else:
            return _UNCHANGED
        change.conflict_resolved = True
        return change
    # Whole-entity conflicts (CREATE over a live entity, DELETE, UPDATE of a tombstone) have no
    # fields to merge: every automatic policy settles them by the later client timestamp.
    if timestamp >= latest_change_since(current, base):
        change = _apply(current, kind, patch)
        change.conflict_resolved = True
        return change
    return _UNCHANGED


def _bulk_updates(data: JSON) -> list[tuple[str, JSON, int]] | str:
    """The (entity_id, patch, version) items of a BULK_UPDATE, or why they are malformed."""
    updates: Any = data.get("updates")
    if not isinstance(updates, list) or not updates:
        return "BULK_UPDATE needs a non-empty data.updates list"
    items = []
    for i, item in enumerate(updates):
        if not isinstance(item, Mapping):
            return f"BULK_UPDATE data.updates[{i}] is not an object"
        entity_id, patch, version = item.get("entity_id"), item.get("data", {}), item.get("version")
        if not isinstance(entity_id, str) or not entity_id:
            return f"BULK_UPDATE data.updates[{i}].entity_id must be a non-empty string"
        if not isinstance(patch, Mapping):
            return f"BULK_UPDATE data.updates[{i}].data must be an object"
        if not isinstance(version, int) or isinstance(version, bool):
            return f"BULK_UPDATE data.updates[{i}].version must be an integer"
        items.append((entity_id, dict(patch), version))
    return items


def _creates(op: Operation, current: Entity | None) -> bool:
    """An operation of a terminal that may only change existing entities would create one."""
    if not op.existing_only or op.operation == "DELETE":
        return False
    return op.operation == "CREATE" or current is None or current.deleted


def _not_existing(op: Operation, entity_id: str, current: Entity | None) -> PermissionDenied:
    """A terminal that may only change existing entities tried to create or undelete one."""
    what = "deleted" if current is not None else "missing"
    return PermissionDenied(
        f"{op.terminal_id} may only change existing {op.entity_type}: "
        f"{op.entity_type}/{entity_id} is {what} (no CREATE, upsert or undelete)"
    )


class _Batch:
    """The working state of one batch: entities as changed so far, and what it will write."""

    def __init__(self, state: BatchState, now: str) -> None:
        self.now = now
        self.entities = dict(state.entities)
        self.records = dict(state.known_ops)
        self.conflicts = dict(state.conflicts)
        self.last_seqs = dict(state.last_seqs)
        self.write = BatchWrite()
        self._changed: dict[EntityKey, Entity] = {}
        self._written: dict[OpKey, OpRecord] = {}
        self._settled: dict[OpKey, OpRecord] = {}
        self._new_conflicts: dict[ConflictKey, Conflict] = {}

    def next_seq(self, store_id: str) -> int:
        seq = self.last_seqs.get(store_id, 0) + 1
        self.last_seqs[store_id] = seq
        return seq

    def add_conflict(self, conflict: Conflict) -> None:
        self.conflicts[conflict.key] = conflict
        self._new_conflicts[conflict.key] = conflict

    def settle_conflict(self, key: ConflictKey) -> bool:
        """Settle a pending conflict; True when it was raised in this very batch."""
        del self.conflicts[key]
        self.write.settled_conflicts.append(key)
        # One raised and settled in the same batch is never written as pending at all.
        return self._new_conflicts.pop(key, None) is not None

    def checkpoint(self) -> tuple[dict[EntityKey, Entity], dict[EntityKey, Entity], int]:
        """What `change_entity` touches, to undo a BULK_UPDATE refused half way."""
        return dict(self.entities), dict(self._changed), len(self.write.audit)

    def rollback(self, saved: tuple[dict[EntityKey, Entity], dict[EntityKey, Entity], int]) -> None:
        self.entities, self._changed = saved[0], saved[1]
        del self.write.audit[saved[2] :]

    def change_entity(
        self,
        key: EntityKey,
        change: _Change,
        timestamp: str,
        op: Operation,
        terminal_id: str,
        user_id: str | None,
        claimed_user_id: str | None = None,
        data_json: str | None = None,
    ) -> Entity:
        """The entity after `change`; `data_json` is the change's data as compact JSON."""
        current = self.entities.get(key)
        version = (current.version if current else 0) + 1
        field_versions = dict(current.field_versions) if current else {}
        for name in change.fields:
            field_versions[name] = [version, timestamp]
        entity = Entity(
            key=key,
            version=version,
            data=change.data,
            deleted=change.deleted,
            # The client time of this write (Entity.timestamp), even when older than the last.
            timestamp=timestamp,
            updated_by=terminal_id,
            field_versions=field_versions,
            updated_at=self.now,
            data_json=data_json,
        )
        self.entities[key] = entity
        self._changed[key] = entity
        self.write.audit.append(
            AuditRecord(
                operation_id=op.id,
                store_id=key.store_id,
                entity_type=key.entity_type,
                entity_id=key.entity_id,
                operation=op.operation,
                terminal_id=terminal_id,
                user_id=user_id,
                before=None if current is None or current.deleted else current.data,
                after=None if entity.deleted else entity.data,
                sync_status=change.status,
                conflict_resolved=change.conflict_resolved,
                timestamp=self.now,
                claimed_user_id=claimed_user_id,
                before_json=None if current is None or current.deleted else current.data_json,
                after_json=None if entity.deleted else data_json,
            )
        )
        return entity

    def record(
        self,
        op: Operation,
        *,
        data: JSON,
        version: int | None,
        seq: int | None,
        status: str,
        conflict_resolved: bool,
        deleted: bool = False,
        settles: bool = False,
        data_json: str | None = None,
    ) -> OpRecord:
        """Record what was decided for `op`. A new row, or with `settles` the replacement of
        the row a conflict pending before this batch left in the log."""
        rec = OpRecord(
            id=op.id,
            store_id=op.store_id,
            entity_type=op.entity_type,
            entity_id=op.entity_id,
            operation=op.operation,
            data=data,
            version=version,
            seq=seq,
            status=status,
            conflict_resolved=conflict_resolved,
            terminal_id=op.terminal_id,
            user_id=op.user_id,
            priority=op.priority,
            timestamp=op.timestamp,
            server_time=self.now,
            deleted=deleted,
            data_json=data_json,
        )
        self.records[op.op_key] = rec
        if settles:
            self._settled[op.op_key] = rec
        else:
            self._written[op.op_key] = rec
        return rec

    def finish(self) -> BatchWrite:
        self.write.entities = list(self._changed.values())
        self.write.op_records = list(self._written.values())
        self.write.settled_records = list(self._settled.values())
        self.write.new_conflicts = list(self._new_conflicts.values())
        self.write.last_seqs = self.last_seqs
        return self.write


class Engine:
    """Decides batches of operations against the policy table. Pure; safe to share.

    `entity_max_bytes` bounds every entity's state (see `state_bytes`): a change that would
    pass it is refused (EntityTooLarge, 4006 naming the limit) and changes nothing. As a log
    row holds an entity's full state, it also bounds what one operation adds to the log and
    pushes; a BULK_UPDATE's states together are held to the same bound.
    """

    __slots__ = ("entity_max_bytes", "policies")

    def __init__(
        self, policies: PolicyTable | None = None, entity_max_bytes: int = ENTITY_MAX_BYTES
    ) -> None:
        self.policies = policies if policies is not None else PolicyTable()
        self.entity_max_bytes = entity_max_bytes

    def _state(self, change: _Change, entity_type: str) -> tuple[str | None, EntityTooLarge | None]:
        """The compact JSON of the state `change` leaves (None for a tombstone, which keeps its
        last state and is never refused), and the refusal of a state over ENTITY_MAX_BYTES."""
        if change.deleted:
            return None, None
        text = compact_json(change.data)
        size = text_bytes(text)
        if size <= self.entity_max_bytes:
            return text, None
        return text, EntityTooLarge(
            f"{entity_type} state would be {size} bytes, over ENTITY_MAX_BYTES "
            f"({self.entity_max_bytes}); nothing changed"
        )

    def decide(
        self, items: Sequence[Operation | Resolution], state: BatchState, now: str
    ) -> tuple[list[Outcome], BatchWrite]:
        """Decide every item in order; return their outcomes and the batch's writes.

        `state` is not modified. Errors are outcomes, never exceptions.
        """
        batch = _Batch(state, now)
        outcomes = []
        for item in items:
            if isinstance(item, Resolution):
                outcomes.append(self._resolution(item, batch))
            else:
                outcomes.append(self._operation(item, batch))
        return outcomes, batch.finish()

    def _operation(self, op: Operation, batch: _Batch) -> Outcome:
        known = batch.records.get(op.op_key)
        if known is not None:
            if known.status == "conflict":
                conflict = batch.conflicts.get((op.store_id, conflict_id_for(op.id)))
                return Outcome(op.id, "conflict", known, conflict)
            return Outcome(op.id, "duplicate", known)
        if op.operation not in _OPERATIONS:
            return Outcome(
                op.id, "error", error=InvalidMessage(f"unknown operation {op.operation!r}")
            )
        if op.operation == "BULK_UPDATE":
            return self._bulk(op, batch)
        if not isinstance(op.data, Mapping):
            return Outcome(op.id, "error", error=InvalidMessage("operation data must be an object"))
        policy = self.policies[op.entity_type]
        current = batch.entities.get(op.key)
        if _creates(op, current):
            return Outcome(op.id, "error", error=_not_existing(op, op.entity_id, current))
        change = resolve(
            current,
            op.operation,
            op.data,
            op.version,
            op.timestamp,
            policy,
            self.policies,
            op.entity_type,
        )
        if change == _NOT_FOUND:
            return Outcome(
                op.id,
                "error",
                error=ChefiaError(
                    f"{op.entity_type}/{op.entity_id} does not exist", Code.ENTITY_NOT_FOUND
                ),
            )
        if change == _CONFLICT:
            assert current is not None
            conflict = Conflict(
                id=conflict_id_for(op.id),
                operation=op,
                server_version=current.version,
                server_data=wire_data(current),
                created_at=batch.now,
            )
            batch.add_conflict(conflict)
            rec = batch.record(
                op,
                data={},
                version=current.version,
                seq=None,
                status="conflict",
                conflict_resolved=False,
            )
            return Outcome(op.id, "conflict", rec, conflict)
        if isinstance(change, str):  # unchanged: the server state stands
            assert current is not None
            rec = batch.record(
                op,
                data={},
                version=current.version,
                seq=None,
                status="resolved",
                conflict_resolved=True,
            )
            return Outcome(op.id, "resolved", rec)
        text, too_large = self._state(change, op.entity_type)
        if too_large is not None:
            return Outcome(op.id, "error", error=too_large)
        entity = batch.change_entity(
            op.key, change, op.timestamp, op, op.terminal_id, op.user_id, op.claimed_user_id, text
        )
        rec = batch.record(
            op,
            data=wire_data(entity),
            version=entity.version,
            seq=batch.next_seq(op.store_id),
            status=change.status,
            conflict_resolved=change.conflict_resolved,
            deleted=entity.deleted,
            data_json=_wire_json(entity),
        )
        return Outcome(op.id, change.status, rec, changed=[entity])

    def _bulk(self, op: Operation, batch: _Batch) -> Outcome:
        policy = self.policies[op.entity_type]
        if policy.policy == MANUAL_RESOLUTION:
            return Outcome(
                op.id,
                "error",
                error=InvalidMessage(
                    f"BULK_UPDATE is not allowed for {op.entity_type} (manual resolution)"
                ),
            )
        items = _bulk_updates(op.data)
        if isinstance(items, str):
            return Outcome(op.id, "error", error=InvalidMessage(items))
        changed: list[Entity] = []
        statuses = ["applied"]
        conflict_resolved = False
        saved = batch.checkpoint()
        for entity_id, patch, version in items:
            key = EntityKey(op.store_id, op.entity_type, entity_id)
            current = batch.entities.get(key)
            if op.existing_only and (current is None or current.deleted):
                batch.rollback(saved)
                return Outcome(op.id, "error", error=_not_existing(op, entity_id, current))
            change = resolve(
                current,
                "UPDATE",
                patch,
                version,
                op.timestamp,
                policy,
                self.policies,
                op.entity_type,
            )
            if isinstance(change, str):
                statuses.append("resolved")
                conflict_resolved = True
                continue
            text, too_large = self._state(change, op.entity_type)
            if too_large is not None:
                batch.rollback(saved)  # a BULK_UPDATE is one operation: all of it or nothing
                too_large.reason = f"BULK_UPDATE {entity_id}: {too_large.reason}"
                return Outcome(op.id, "error", error=too_large)
            statuses.append(change.status)
            conflict_resolved = conflict_resolved or change.conflict_resolved
            changed.append(
                batch.change_entity(
                    key,
                    change,
                    op.timestamp,
                    op,
                    op.terminal_id,
                    op.user_id,
                    op.claimed_user_id,
                    text,
                )
            )
        status = max(statuses, key=_STATUS_RANK.__getitem__)
        if not changed:
            rec = batch.record(
                op,
                data={},
                version=None,
                seq=None,
                status=status,
                conflict_resolved=conflict_resolved,
            )
            return Outcome(op.id, status, rec)
        updates = [
            {
                "entity_id": e.key.entity_id,
                "data": wire_data(e),
                "version": e.version,
                "deleted": e.deleted,
            }
            for e in changed
        ]
        logged = {"updates": updates}
        text = compact_json(logged)
        size = text_bytes(text)
        if size > self.entity_max_bytes:
            batch.rollback(saved)  # one log row and one push: it must fit like one entity
            return Outcome(
                op.id,
                "error",
                error=EntityTooLarge(
                    f"BULK_UPDATE would log {size} bytes of state, over ENTITY_MAX_BYTES "
                    f"({self.entity_max_bytes}); split it; nothing changed"
                ),
            )
        rec = batch.record(
            op,
            data=logged,
            version=None,
            seq=batch.next_seq(op.store_id),
            status=status,
            conflict_resolved=conflict_resolved,
            data_json=text,
        )
        return Outcome(op.id, status, rec, changed=changed)

    def _resolution(self, res: Resolution, batch: _Batch) -> Outcome:
        conflict = batch.conflicts.get((res.store_id, res.conflict_id))
        if conflict is None:
            return Outcome(
                res.conflict_id,
                "error",
                error=ResolutionFailed(f"no pending conflict {res.conflict_id!r}"),
            )
        op = conflict.operation
        if res.resolution not in _RESOLUTIONS:
            return Outcome(
                op.id, "error", error=ResolutionFailed(f"unknown resolution {res.resolution!r}")
            )
        current = batch.entities.get(op.key)
        change: _Change | None
        if res.resolution == "merge":
            if not isinstance(res.resolved_data, Mapping):
                return Outcome(op.id, "error", error=ResolutionFailed("merge needs resolved_data"))
            change = _apply(current, "CREATE", res.resolved_data)  # replaces the whole state
        elif res.resolution == "accept_local":
            change = _apply(current, op.operation, op.data)
            if change.deleted and (current is None or current.deleted):
                change = None
        else:  # accept_remote: the server state stands
            change = None
        text, too_large = (None, None) if change is None else self._state(change, op.entity_type)
        if too_large is not None:
            too_large.reason += "; the conflict stays pending"
            return Outcome(op.id, "error", error=too_large)
        # Raised in this batch, its row is not in the log yet: the settled row is a new one.
        settles = not batch.settle_conflict(conflict.key)
        if change is None:
            rec = batch.record(
                op,
                data={},
                version=current.version if current else None,
                seq=None,
                status="resolved",
                conflict_resolved=True,
                settles=settles,
            )
            return Outcome(op.id, "resolved", rec)
        change.status, change.conflict_resolved = "resolved", True
        entity = batch.change_entity(
            op.key, change, res.timestamp, op, res.terminal_id, res.user_id, data_json=text
        )
        rec = batch.record(
            op,
            data=wire_data(entity),
            version=entity.version,
            seq=batch.next_seq(op.store_id),
            status="resolved",
            conflict_resolved=True,
            deleted=entity.deleted,
            settles=settles,
            data_json=_wire_json(entity),
        )
        return Outcome(op.id, "resolved", rec, changed=[entity])

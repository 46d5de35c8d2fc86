"""The working state of one batch while the engine decides it: entities as changed so far,
and everything the batch will write."""

from __future__ import annotations

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
)
from chefia_rt.sync.changes import Change


class Batch:
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
        change: Change,
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

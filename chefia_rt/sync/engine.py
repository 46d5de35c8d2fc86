"""The pure sync engine: versions, conflicts and idempotency (docs/protocol.md §7).

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
    BatchState,
    BatchWrite,
    Conflict,
    Entity,
    EntityKey,
    Operation,
    OpRecord,
    Resolution,
)
from chefia_rt.errors import (
    ChefiaError,
    Code,
    EntityTooLarge,
    InvalidMessage,
    ResolutionFailed,
)
from chefia_rt.sync.batch import Batch
from chefia_rt.sync.changes import (
    CONFLICT,
    NOT_FOUND,
    Change,
    apply_change,
    bulk_updates,
    creates_entity,
    not_existing,
    resolve,
)
from chefia_rt.sync.policies import (
    MANUAL_RESOLUTION,
    PolicyTable,
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

    def _state(self, change: Change, entity_type: str) -> tuple[str | None, EntityTooLarge | None]:
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
        batch = Batch(state, now)
        outcomes = []
        for item in items:
            if isinstance(item, Resolution):
                outcomes.append(self._resolution(item, batch))
            else:
                outcomes.append(self._operation(item, batch))
        return outcomes, batch.finish()

    def _operation(self, op: Operation, batch: Batch) -> Outcome:
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
        if creates_entity(op, current):
            return Outcome(op.id, "error", error=not_existing(op, op.entity_id, current))
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
        if change == NOT_FOUND:
            return Outcome(
                op.id,
                "error",
                error=ChefiaError(
                    f"{op.entity_type}/{op.entity_id} does not exist", Code.ENTITY_NOT_FOUND
                ),
            )
        if change == CONFLICT:
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

    def _bulk(self, op: Operation, batch: Batch) -> Outcome:
        policy = self.policies[op.entity_type]
        if policy.policy == MANUAL_RESOLUTION:
            return Outcome(
                op.id,
                "error",
                error=InvalidMessage(
                    f"BULK_UPDATE is not allowed for {op.entity_type} (manual resolution)"
                ),
            )
        items = bulk_updates(op.data)
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
                return Outcome(op.id, "error", error=not_existing(op, entity_id, current))
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

    def _resolution(self, res: Resolution, batch: Batch) -> Outcome:
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
        change: Change | None
        if res.resolution == "merge":
            if not isinstance(res.resolved_data, Mapping):
                return Outcome(op.id, "error", error=ResolutionFailed("merge needs resolved_data"))
            change = apply_change(current, "CREATE", res.resolved_data)  # replaces the whole state
        elif res.resolution == "accept_local":
            change = apply_change(current, op.operation, op.data)
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

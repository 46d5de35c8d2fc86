"""How one entity changes under an operation: applied, merged by its policy, unchanged, a
manual conflict, or not found (pure, like the engine that calls it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chefia_rt.domain import (
    JSON,
    Entity,
    Operation,
)
from chefia_rt.errors import (
    PermissionDenied,
)
from chefia_rt.sync.policies import (
    MANUAL_RESOLUTION,
    EntityPolicy,
    PolicyTable,
    latest_change_since,
)


@dataclass(slots=True)
class Change:
    """A decided change of one entity: its full data after, and how it came about.

    `fields` are the fields this change stamps in `field_versions` (what a later merge treats as
    changed on the server since an older base).
    """

    data: JSON
    deleted: bool
    fields: set[str]
    status: str
    conflict_resolved: bool


UNCHANGED = "unchanged"
CONFLICT = "conflict"
NOT_FOUND = "not_found"


def apply_change(current: Entity | None, kind: str, patch: JSON) -> Change:
    """The change an operation makes when it wins (no conflict, or resolved in its favour).

    A tombstone keeps its last data, so an UPDATE that wins over a DELETE brings the entity back
    as it was plus the patch (an UPDATE is a patch, never a whole state). A CREATE replaces the
    whole state; every field it drops counts as changed too.
    """
    kept = {} if current is None else current.data
    if kind == "DELETE":
        return Change(dict(kept), True, set(), "applied", False)
    if kind == "CREATE" or current is None:
        return Change(dict(patch), False, set(patch) | set(kept), "applied", False)
    return Change({**kept, **patch}, False, set(patch), "applied", False)


def resolve(
    current: Entity | None,
    kind: str,
    patch: JSON,
    version: int,
    timestamp: str,
    policy: EntityPolicy,
    table: PolicyTable,
    entity_type: str,
) -> Change | str:
    """Decide one entity's change, or say it is unchanged, a manual conflict or not found."""
    if current is None or (current.deleted and kind == "CREATE"):
        if kind == "DELETE":
            return NOT_FOUND
        return apply_change(current, kind, patch)
    if current.deleted and kind == "DELETE":
        return UNCHANGED
    if not current.deleted and version == current.version + 1:
        return apply_change(current, kind, patch)
    # A conflict: a stale version, or an UPDATE of a tombstone.
    if policy.policy == MANUAL_RESOLUTION:
        return CONFLICT
    base = version - 1
    if kind == "UPDATE" and not current.deleted:
        verdict = table.resolver(entity_type)(current, patch, base, timestamp)
        if verdict.wins_whole:  # even an empty patch: the write wins, a new version
            change = apply_change(current, kind, patch)
        elif verdict.accepted:
            change = apply_change(current, kind, verdict.accepted)
            change.status = verdict.status
        else:
            return UNCHANGED
        change.conflict_resolved = True
        return change
    # Whole-entity conflicts (CREATE over a live entity, DELETE, UPDATE of a tombstone) have no
    # fields to merge: every automatic policy settles them by the later client timestamp.
    if timestamp >= latest_change_since(current, base):
        change = apply_change(current, kind, patch)
        change.conflict_resolved = True
        return change
    return UNCHANGED


def bulk_updates(data: JSON) -> list[tuple[str, JSON, int]] | str:
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


def creates_entity(op: Operation, current: Entity | None) -> bool:
    """An operation of a terminal that may only change existing entities would create one."""
    if not op.existing_only or op.operation == "DELETE":
        return False
    return op.operation == "CREATE" or current is None or current.deleted


def not_existing(op: Operation, entity_id: str, current: Entity | None) -> PermissionDenied:
    """A terminal that may only change existing entities tried to create or undelete one."""
    what = "missing" if current is None else "deleted" if current.deleted else "live"
    return PermissionDenied(
        f"{op.terminal_id} may only change existing {op.entity_type}: "
        f"{op.entity_type}/{entity_id} is {what} (no CREATE, upsert or undelete)"
    )

"""Row ↔ record conversions and migration files shared by the storage backends."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from chefia_rt.domain import (
    AuditRecord,
    Conflict,
    ConflictKey,
    Entity,
    EntityKey,
    Operation,
    OpKey,
    OpRecord,
)
from chefia_rt.protocol.messages import format_timestamp
from chefia_rt.store.base import BatchRequest
from chefia_rt.store.schema import AUDIT_LOGS, CONFLICTS, ENTITIES, SYNC_OPERATIONS
from chefia_rt.sync.engine import compact_json, conflict_id_for

# The columns of each record tuple below, in order (store/schema.py).
OP_COLUMNS = SYNC_OPERATIONS.record_list()
AUDIT_COLUMNS = AUDIT_LOGS.record_list()
ENTITY_COLUMNS = ENTITIES.record_list()
CONFLICT_COLUMNS = CONFLICTS.record_list()


def _json(value: Any) -> Any:
    """JSON columns arrive as text from SQLite and decoded from PostgreSQL."""
    return json.loads(value) if isinstance(value, str) else value


def _time_text(value: Any) -> str:
    """A time column as the canonical text (PostgreSQL hands a datetime, SQLite the text)."""
    return value if isinstance(value, str) else format_timestamp(value)


def migrations(prefix: str) -> list[tuple[int, str]]:
    """(version, sql) of the packaged migration files named `<prefix>_NNNN_name.sql`."""
    found = []
    for item in resources.files("chefia_rt.store.migrations").iterdir():
        name = item.name
        if name.startswith(prefix + "_") and name.endswith(".sql"):
            found.append((int(name.split("_")[1]), item.read_text(encoding="utf-8")))
    return sorted(found)


def op_record_from_row(row: Sequence[Any]) -> OpRecord:
    """A row selected with OP_COLUMNS."""
    return OpRecord(
        id=row[0],
        store_id=row[1],
        entity_type=row[2],
        entity_id=row[3],
        operation=row[4],
        data=_json(row[5]),
        version=row[6],
        seq=row[7],
        status=row[8],
        conflict_resolved=bool(row[9]),
        terminal_id=row[10],
        user_id=row[11],
        priority=row[12],
        timestamp=row[13],
        server_time=row[14],
        deleted=bool(row[15]),
    )


def entity_from_row(row: Sequence[Any]) -> Entity:
    """A row selected with ENTITY_COLUMNS (SQLite's text of the data is kept with it)."""
    data = row[4]
    return Entity(
        key=EntityKey(row[0], row[1], row[2]),
        version=row[3],
        data=_json(data),
        deleted=bool(row[5]),
        timestamp=row[6],
        updated_by=row[7],
        field_versions=_json(row[8]),
        updated_at=_time_text(row[9]),
        data_json=data if isinstance(data, str) else None,
    )


def conflict_from_row(row: Sequence[Any]) -> Conflict:
    """Row: id, operation (JSON of the Operation), server_version, server_data, created_at."""
    return Conflict(row[0], Operation(**_json(row[1])), row[2], _json(row[3]), row[4])


def conflicts_to_read(request: BatchRequest, known: dict[OpKey, OpRecord]) -> list[ConflictKey]:
    """The conflicts a batch reads: the ones it names (resolutions) and the pending conflict of
    each of its operations the log holds as one (a retry is answered that conflict again)."""
    keys = list(request.conflict_keys)
    keys += [(r.store_id, conflict_id_for(r.id)) for r in known.values() if r.status == "conflict"]
    return list(dict.fromkeys(keys))


def audit_changes_json(audit: AuditRecord) -> str:
    """The audit row's `changes` as compact JSON text: built from the states' text where it is
    known (as it is for every change the engine decided), encoded otherwise."""
    before, after = audit.before_json, audit.after_json
    if (before is None) != (audit.before is None) or (after is None) != (audit.after is None):
        return compact_json(audit_changes(audit.before, audit.after, audit.claimed_user_id))
    text = f'{{"before":{before or "null"},"after":{after or "null"}'
    if audit.claimed_user_id is not None:
        text += f',"claimed_user_id":{compact_json(audit.claimed_user_id)}'
    return text + "}"


def audit_values(
    a: AuditRecord, changes: Callable[[str], Any], timestamp: Callable[[str], Any]
) -> tuple[Any, ...]:
    """An AuditRecord as the values of AUDIT_COLUMNS, in order; `changes` and `timestamp` turn
    the changes' JSON text and the time text into what the backend's driver takes."""
    return (
        a.operation_id,
        a.store_id,
        a.entity_type,
        a.entity_id,
        a.operation,
        a.terminal_id,
        a.user_id,
        changes(audit_changes_json(a)),
        a.sync_status,
        a.conflict_resolved,
        timestamp(a.timestamp),
    )


def audit_changes(before: Any, after: Any, claimed_user_id: str | None) -> dict[str, Any]:
    """The audit row's `changes`: the state before and after, and the user id the terminal
    claimed in its operation when it differs from the identity recorded in `user_id`."""
    changes = {"before": before, "after": after}
    if claimed_user_id is not None:
        changes["claimed_user_id"] = claimed_user_id
    return changes


def session_upsert(columns: list[str], marks: list[str]) -> str:
    """The upsert of one session log row (`websocket_connections`), in the backend's
    placeholders: a later record of the same session replaces the earlier one."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "session_id")
    return (
        f"INSERT INTO websocket_connections ({', '.join(columns)}) VALUES ({', '.join(marks)}) "
        f"ON CONFLICT (session_id) DO UPDATE SET {updates}"
    )


def op_values(r: OpRecord, encode: Callable[[Any, str | None], Any]) -> tuple[Any, ...]:
    """An OpRecord as the values of OP_COLUMNS, in order; `encode(data, text)` turns its data
    (with its compact JSON text when known) into what the backend's driver takes."""
    return (
        r.id,
        r.store_id,
        r.entity_type,
        r.entity_id,
        r.operation,
        encode(r.data, r.data_json),
        r.version,
        r.seq,
        r.status,
        r.conflict_resolved,
        r.terminal_id,
        r.user_id,
        r.priority,
        r.timestamp,
        r.server_time,
        r.deleted,
    )


def entity_values(
    e: Entity,
    data: Callable[[Any, str | None], Any],
    field_versions: Callable[[dict[str, list[Any]]], Any],
    updated_at: Callable[[str], Any],
) -> tuple[Any, ...]:
    """An Entity as the values of ENTITY_COLUMNS, in order; `data(data, text)`,
    `field_versions` and `updated_at` turn those into what the backend's driver takes."""
    return (
        e.key.store_id,
        e.key.entity_type,
        e.key.entity_id,
        e.version,
        data(e.data, e.data_json),
        e.deleted,
        e.timestamp,
        e.updated_by,
        field_versions(e.field_versions),
        updated_at(e.updated_at),
    )


def conflict_values(
    c: Conflict, operation: Callable[[Operation], Any], data: Callable[[Any], Any]
) -> tuple[Any, ...]:
    """A Conflict as the values of CONFLICT_COLUMNS, in order; `operation` and `data` turn its
    operation and the server's data into what the backend's driver takes."""
    return (
        c.id,
        c.operation.store_id,
        c.operation.id,
        operation(c.operation),
        c.server_version,
        data(c.server_data),
        c.created_at,
    )

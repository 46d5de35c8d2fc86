"""What a batch reads and writes in PostgreSQL: one statement locks the seq rows of its stores
(and reads its entities' lease marks), one reads its log records and locks and reads its
entities, one writes every row."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime
from typing import Any

import asyncpg

from chefia_rt.domain import (
    BatchState,
    BatchWrite,
    Conflict,
    ConflictKey,
    Entity,
    EntityKey,
    OpKey,
    OpRecord,
)
from chefia_rt.errors import StorageUnavailable
from chefia_rt.store.base import BatchRequest
from chefia_rt.store.rows import (
    AUDIT_COLUMNS,
    CONFLICT_COLUMNS,
    ENTITY_COLUMNS,
    OP_COLUMNS,
    audit_values,
    conflict_from_row,
    conflict_values,
    conflicts_to_read,
    entity_from_row,
    entity_values,
    op_record_from_row,
    op_values,
)
from chefia_rt.store.schema import AUDIT_LOGS, CONFLICTS, ENTITIES, SYNC_OPERATIONS
from chefia_rt.sync.engine import compact_json

_SETTLE = (
    "UPDATE sync_operations SET "
    + ", ".join(
        f"{c} = ${i}"
        for i, c in enumerate(SYNC_OPERATIONS.record, 1)
        if c not in ("id", "store_id")
    )
    + " WHERE id = $1 AND store_id = $2 AND status = 'conflict'"
)


class JSONText(str):
    """JSON that is text already (a state the engine encoded): a jsonb value as it is."""

    __slots__ = ()


_OP_TYPES = SYNC_OPERATIONS.postgres_types()
_AUDIT_TYPES = AUDIT_LOGS.postgres_types()
_ENTITY_TYPES = ENTITIES.postgres_types()


def _unnest(first: int, types: list[str]) -> str:
    return ", ".join(f"${first + i}::{kind}[]" for i, kind in enumerate(types))


# The parameters of the entities come first, then the log's, the audit's, the seqs'.
_LOG_FIRST = 1 + len(_ENTITY_TYPES)
_AUDIT_FIRST = _LOG_FIRST + len(_OP_TYPES)
_SEQS_FIRST = _AUDIT_FIRST + len(_AUDIT_TYPES)


# A batch's writes but for the rare ones (settled conflicts): data-modifying CTEs, each its own
# table, run as one statement; an empty array writes nothing.
_WRITE = (
    "WITH entity_rows AS ("
    f"INSERT INTO entities ({ENTITY_COLUMNS}) "
    # The engine's server time of the write (what the cache and the HTTP read show); an
    # entity written without one (tests, tools) gets the database's.
    "SELECT s, t, i, v, d, x, ts, ub, fv, coalesce(ua, now()) "
    f"FROM unnest({_unnest(1, _ENTITY_TYPES)}) AS w(s, t, i, v, d, x, ts, ub, fv, ua) "
    "ON CONFLICT (store_id, entity_type, entity_id) DO UPDATE SET "
    "version = excluded.version, data = excluded.data, deleted = excluded.deleted, "
    "timestamp = excluded.timestamp, updated_by = excluded.updated_by, "
    "field_versions = excluded.field_versions, updated_at = excluded.updated_at), "
    f"log_rows AS (INSERT INTO sync_operations ({OP_COLUMNS}) "
    f"SELECT * FROM unnest({_unnest(_LOG_FIRST, _OP_TYPES)})), "
    f"audit_rows AS (INSERT INTO audit_logs_master ({AUDIT_COLUMNS}) "
    f"SELECT * FROM unnest({_unnest(_AUDIT_FIRST, _AUDIT_TYPES)})) "
    "INSERT INTO store_seqs (store_id, last_seq) "
    f"SELECT * FROM unnest({_unnest(_SEQS_FIRST, ['text', 'bigint'])}) "
    "ON CONFLICT (store_id) DO UPDATE SET last_seq = excluded.last_seq"
)


# The seq rows, locked in code-point order of the ids, and with them the lease marks of the
# batch's entities that may still be in force: rows (store_id, last_seq, NULL, NULL) and
# (store_id, NULL, entity_type, entity_id).
_LOCK_SEQS = (
    "WITH seqs AS (SELECT store_id, last_seq FROM store_seqs WHERE store_id = ANY($1::text[]) "
    'ORDER BY store_id COLLATE "C" FOR UPDATE) '
    "SELECT store_id, last_seq, NULL::text, NULL::text FROM seqs "
    "UNION ALL SELECT m.store_id, NULL, m.entity_type, m.entity_id FROM lease_marks m "
    "JOIN unnest($2::text[], $3::text[], $4::text[]) AS k(s, t, i) "
    "ON m.store_id = k.s AND m.entity_type = k.t AND m.entity_id = k.i WHERE m.until_ms > $5"
)
# A mark counts as in force this long after its lease's expiry: a lease's expiry is computed
# on the clock of the node that granted it, the mark is read on another's.
MARK_CLOCK_SLACK = 60.0


def _same(value: Any) -> Any:
    return value


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as `width` columns (the arrays an unnest takes)."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


def _jsonb(data: Any, text: str | None) -> Any:
    """What the jsonb codec takes for `data`: its text when known, else the object."""
    return data if text is None else JSONText(text)


def jsonb_encode(value: Any) -> bytes:
    text = value if type(value) is JSONText else compact_json(value)
    return b"\x01" + text.encode()


def jsonb_decode(data: bytes) -> Any:
    return json.loads(data[1:])


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def read_batch(conn: asyncpg.Connection, request: BatchRequest) -> BatchState:
    # Seq rows first, in sorted order: this serialises writers per store without deadlocks,
    # and everything read after it (conflicts, entities) cannot change under the batch.
    stores = sorted(set(request.store_ids) | {k.store_id for k in request.entity_keys})
    last_seqs: dict[str, int] = {}
    leased = set()
    for row in await conn.fetch(
        _LOCK_SEQS,
        stores,
        *_key_columns(request.entity_keys),
        int((time.time() - MARK_CLOCK_SLACK) * 1000),
    ):
        if row[2] is None:
            last_seqs[row[0]] = row[1]
        else:
            leased.add(EntityKey(row[0], row[2], row[3]))
    request.laps.lap("lock")
    missing = [store_id for store_id in stores if store_id not in last_seqs]
    if missing:
        # A store's first batch: its row is made, then locked as the others are.
        await conn.execute(
            "INSERT INTO store_seqs (store_id, last_seq) SELECT unnest($1::text[]), 0 "
            "ON CONFLICT (store_id) DO NOTHING",
            missing,
        )
        for row in await conn.fetch(
            "SELECT store_id, last_seq FROM store_seqs WHERE store_id = ANY($1::text[]) "
            'ORDER BY store_id COLLATE "C" FOR UPDATE',
            missing,
        ):
            last_seqs[row[0]] = row[1]
    if request.conflict_keys:
        # Resolutions: their conflicts name entities the request does not, and every entity is
        # locked in one sorted statement, so the log and the conflicts are read first.
        known = await _read_operations(conn, request)
        conflicts = await _read_conflicts(conn, conflicts_to_read(request, known))
        keys = set(request.entity_keys) | {c.operation.key for c in conflicts.values()}
        entities = await _read_entities(conn, keys)
    else:
        # The usual batch: its log records and entities in one round trip. A retry of an
        # operation logged as a conflict reads that conflict, whose entity is the operation's.
        known, entities = await _read_operations_and_entities(conn, request)
        conflicts = await _read_conflicts(conn, conflicts_to_read(request, known))
        more = {c.operation.key for c in conflicts.values()} - set(request.entity_keys)
        entities.update(await _read_entities(conn, more))
    for store_id in {c.operation.store_id for c in conflicts.values()} - set(last_seqs):
        # A conflict of a store the request did not name (the engine refuses to settle it
        # across stores, but its seq row must still be known).
        last_seqs[store_id] = (
            await conn.fetchval(
                "SELECT last_seq FROM store_seqs WHERE store_id = $1 FOR UPDATE", store_id
            )
            or 0
        )
    request.laps.lap("read")
    return BatchState(known, entities, conflicts, last_seqs, frozenset(leased))


def _key_columns(keys: Iterable[EntityKey]) -> tuple[list[str], list[str], list[str]]:
    keys = list(keys)
    return [k.store_id for k in keys], [k.entity_type for k in keys], [k.entity_id for k in keys]


_READ_OPERATIONS = (
    f"SELECT {OP_COLUMNS} FROM sync_operations "
    "WHERE (store_id, id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
)


def _read_entities_sql(first: int) -> str:
    """The entities of the keys in parameters `first` to `first + 2`, locked in code-point
    order of their keys whatever the database's collation: no deadlocks."""
    return (
        f"SELECT {ENTITY_COLUMNS} FROM entities e "
        f"JOIN unnest(${first}::text[], ${first + 1}::text[], ${first + 2}::text[]) AS k(s, t, i) "
        "ON e.store_id = k.s AND e.entity_type = k.t AND e.entity_id = k.i "
        'ORDER BY e.store_id COLLATE "C", e.entity_type COLLATE "C", '
        'e.entity_id COLLATE "C" FOR UPDATE OF e'
    )


_READ_ENTITIES = _read_entities_sql(1)


def _nulls(types: list[str]) -> str:
    return ", ".join(f"NULL::{kind}" for kind in types)


# Both in one statement: the entities' columns then the log's, the other half NULL (an entity
# row's store_id is never NULL, a log row's is).
_READ_OPERATIONS_AND_ENTITIES = (
    f"WITH e AS ({_read_entities_sql(3)}) "
    f"SELECT *, {_nulls(_OP_TYPES)} FROM e "
    f"UNION ALL SELECT {_nulls(_ENTITY_TYPES)}, o.* FROM ({_READ_OPERATIONS}) o"
)


async def _read_operations(
    conn: asyncpg.Connection, request: BatchRequest
) -> dict[OpKey, OpRecord]:
    keys = request.operation_keys
    rows = await conn.fetch(_READ_OPERATIONS, [k[0] for k in keys], [k[1] for k in keys])
    return {r.op_key: r for r in map(op_record_from_row, rows)}


async def _read_entities(conn: asyncpg.Connection, keys: set[EntityKey]) -> dict[EntityKey, Entity]:
    if not keys:
        return {}
    rows = await conn.fetch(_READ_ENTITIES, *_key_columns(keys))
    return {e.key: e for e in map(entity_from_row, rows)}


async def _read_operations_and_entities(
    conn: asyncpg.Connection, request: BatchRequest
) -> tuple[dict[OpKey, OpRecord], dict[EntityKey, Entity]]:
    keys = request.operation_keys
    known: dict[OpKey, OpRecord] = {}
    entities: dict[EntityKey, Entity] = {}
    width = len(_ENTITY_TYPES)
    for row in await conn.fetch(
        _READ_OPERATIONS_AND_ENTITIES,
        [k[0] for k in keys],
        [k[1] for k in keys],
        *_key_columns(dict.fromkeys(request.entity_keys)),
    ):
        if row[0] is not None:
            entity = entity_from_row(row[:width])
            entities[entity.key] = entity
        else:
            record = op_record_from_row(row[width:])
            known[record.op_key] = record
    return known, entities


async def _read_conflicts(
    conn: asyncpg.Connection, keys: list[ConflictKey]
) -> dict[ConflictKey, Conflict]:
    if not keys:
        return {}
    rows = await conn.fetch(
        "SELECT id, operation, server_version, server_data, created_at FROM conflicts "
        "WHERE (store_id, id) IN (SELECT * FROM unnest($1::text[], $2::text[])) "
        "FOR UPDATE",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {c.key: c for c in map(conflict_from_row, rows)}


async def write_batch(conn: asyncpg.Connection, write: BatchWrite) -> None:
    # Entities, the log, the audit and the seqs in one statement (one round trip). The
    # log is append-only: an id the store already logged fails the transaction, never
    # overwrites (the retry then reads it and is answered `duplicate`).
    if write.entities or write.op_records or write.audit or write.last_seqs:
        entities = [
            entity_values(e, _jsonb, _same, lambda t: _parse_time(t) if t else None)
            for e in write.entities
        ]
        ops = [op_values(r, _jsonb) for r in write.op_records]
        audit = [audit_values(a, JSONText, _parse_time) for a in write.audit]
        await conn.execute(
            _WRITE,
            *_columns(entities, len(_ENTITY_TYPES)),
            *_columns(ops, len(_OP_TYPES)),
            *_columns(audit, len(_AUDIT_TYPES)),
            list(write.last_seqs),
            list(write.last_seqs.values()),
        )
    for r in write.settled_records:
        # A resolution replaces the row its pending conflict left, and nothing else.
        status = await conn.execute(_SETTLE, *op_values(r, _jsonb))
        if status != "UPDATE 1":
            raise StorageUnavailable(
                f"operation {r.id!r} of {r.store_id} is no pending conflict any more; retry"
            )
    if write.new_conflicts:
        await conn.executemany(
            f"INSERT INTO conflicts ({CONFLICT_COLUMNS}) VALUES "
            f"({', '.join(f'${i}' for i in range(1, len(CONFLICTS.record) + 1))})",
            [conflict_values(c, asdict, _same) for c in write.new_conflicts],
        )
    if write.settled_conflicts:
        await conn.execute(
            "DELETE FROM conflicts "
            "WHERE (store_id, id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
            [k[0] for k in write.settled_conflicts],
            [k[1] for k in write.settled_conflicts],
        )


# ---- reads ------------------------------------------------------------------------------

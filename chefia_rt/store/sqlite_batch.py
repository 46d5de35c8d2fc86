"""What a batch reads and writes in SQLite, and what the writer remembers of its commits."""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

from chefia_rt.domain import (
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
from chefia_rt.store.schema import AUDIT_LOGS, CONFLICTS, ENTITIES, SYNC_OPERATIONS, Table
from chefia_rt.sync.engine import compact_json

_SETTLE = (
    "UPDATE sync_operations SET "
    + ", ".join(f"{c} = ?" for c in SYNC_OPERATIONS.record if c not in ("id", "store_id"))
    + " WHERE id = ? AND store_id = ? AND status = 'conflict'"
)
# SQLite's default limit of host parameters per statement is 32766; stay well under it.
_CHUNK = 500
# What the writer remembers of the entities it committed (see `Written`): at most this many,
# holding at most this much JSON text.
WRITTEN_MAX_ENTITIES = 50_000
WRITTEN_MAX_BYTES = 32 * 1024 * 1024


def json_text(data: Any, text: str | None) -> str:
    """JSON text of `data`: `text` when it is known already."""
    return text if text is not None else compact_json(data)


def chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def by_keys(
    db: sqlite3.Connection,
    columns: str,
    table: str,
    key_columns: Sequence[str],
    keys: Sequence[Sequence[Any]],
) -> list[Any]:
    """The rows of `table` whose primary key is one of `keys`, a few hundred per statement.

    The keys drive the join (CROSS JOIN keeps them the outer loop), so each costs one search of
    the primary key's index. A `(a, b) IN (VALUES ...)` filter instead made SQLite scan the
    whole table, which grows with the operation log.
    """
    rows: list[Any] = []
    on = " AND ".join(f"t.{c} = k.column{i}" for i, c in enumerate(key_columns, 1))
    width = len(key_columns)
    for chunk in chunks(keys):
        marks = ",".join(["(" + ",".join("?" * width) + ")"] * len(chunk))
        rows += db.execute(
            f"SELECT {columns} FROM (VALUES {marks}) AS k CROSS JOIN {table} AS t ON {on}",
            [part for key in chunk for part in key],
        )
    return rows


class Written:
    """The entities and store seqs the writer's connection committed last, so that a batch reads
    from the file only the ones it did not write itself.

    They are what the file holds for as long as no other connection committed, which SQLite
    tells by `PRAGMA data_version` (asked inside the batch's transaction, under the write lock);
    when it changed, everything remembered is forgotten. The least recently used entities go
    first past `max_entities` or `max_bytes` of their JSON text.
    """

    def __init__(self, max_entities: int, max_bytes: int) -> None:
        self.max_entities = max_entities
        self.max_bytes = max_bytes
        self._entities: OrderedDict[EntityKey, tuple[Entity, int]] = OrderedDict()
        self._seqs: dict[str, int] = {}
        self._bytes = 0
        self._version: int | None = None

    def check(self, db: sqlite3.Connection) -> None:
        """Forget everything when another connection committed since the last batch."""
        version = db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self.clear()
            self._version = version

    def clear(self) -> None:
        self._entities.clear()
        self._seqs.clear()
        self._bytes = 0

    def entities(
        self, keys: Iterable[EntityKey]
    ) -> tuple[dict[EntityKey, Entity], list[EntityKey]]:
        """The remembered entities of `keys`, and the keys that must be read."""
        found: dict[EntityKey, Entity] = {}
        missing: list[EntityKey] = []
        for key in keys:
            held = self._entities.get(key)
            if held is None:
                missing.append(key)
            else:
                self._entities.move_to_end(key)
                found[key] = held[0]
        return found, missing

    def seqs(self, stores: Iterable[str]) -> tuple[dict[str, int], list[str]]:
        """The remembered last seqs of `stores`, and the stores whose seq must be read."""
        found: dict[str, int] = {}
        missing: list[str] = []
        for store in stores:
            seq = self._seqs.get(store)
            if seq is None:
                missing.append(store)
            else:
                found[store] = seq
        return found, missing

    def keep(self, write: BatchWrite) -> None:
        """Remember what a committed batch wrote."""
        for entity in write.entities:
            size = len(entity.data_json) if entity.data_json is not None else self.max_bytes
            old = self._entities.pop(entity.key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes // 64:  # a few huge entities would push out all others
                continue
            self._entities[entity.key] = (entity, size)
            self._bytes += size
        while self._entities and (
            len(self._entities) > self.max_entities or self._bytes > self.max_bytes
        ):
            self._bytes -= self._entities.popitem(last=False)[1][1]
        self._seqs.update(write.last_seqs)


def read_batch(db: sqlite3.Connection, request: BatchRequest, written: Written) -> BatchState:
    known: dict[OpKey, OpRecord] = {}
    for row in by_keys(
        db, OP_COLUMNS, "sync_operations", ("store_id", "id"), request.operation_keys
    ):
        record = op_record_from_row(row)
        known[record.op_key] = record
    conflicts: dict[ConflictKey, Conflict] = {}
    columns = "id, operation, server_version, server_data, created_at"
    conflict_keys = conflicts_to_read(request, known)
    for row in by_keys(db, columns, "conflicts", ("store_id", "id"), conflict_keys):
        conflict = conflict_from_row(row)
        conflicts[conflict.key] = conflict
    keys = set(request.entity_keys) | {c.operation.key for c in conflicts.values()}
    entities, missing = written.entities(keys)
    entity_key_columns = ("store_id", "entity_type", "entity_id")
    triples = [(k.store_id, k.entity_type, k.entity_id) for k in missing]
    for row in by_keys(db, ENTITY_COLUMNS, "entities", entity_key_columns, triples):
        entity = entity_from_row(row)
        entities[entity.key] = entity
    known_seqs, stores = written.seqs(set(request.store_ids) | {k.store_id for k in keys})
    last_seqs = dict.fromkeys(stores, 0)
    last_seqs.update(known_seqs)
    for chunk in chunks(sorted(stores)):
        marks = ",".join("?" * len(chunk))
        last_seqs.update(
            db.execute(
                f"SELECT store_id, last_seq FROM store_seqs WHERE store_id IN ({marks})", chunk
            )
        )
    return BatchState(known, entities, conflicts, last_seqs)


def _marks(table: Table) -> str:
    return ", ".join("?" * len(table.record))


def _same(value: str) -> str:
    return value


def _operation_json(operation: Operation) -> str:
    return compact_json(asdict(operation))


_UPSERT_ENTITY = (
    f"INSERT INTO entities ({ENTITY_COLUMNS}) "
    f"VALUES ({', '.join('?' * (len(ENTITIES.record) - 1))}, "
    # The engine's server time of the write (what the cache and the HTTP read show); an entity
    # written without one (tests, tools) gets the database's clock.
    "coalesce(nullif(?, ''), strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))) "
    "ON CONFLICT (store_id, entity_type, entity_id) DO UPDATE SET "
    "version = excluded.version, data = excluded.data, deleted = excluded.deleted, "
    "timestamp = excluded.timestamp, updated_by = excluded.updated_by, "
    "field_versions = excluded.field_versions, updated_at = excluded.updated_at"
)


_INSERT_OPS = f"INSERT INTO sync_operations ({OP_COLUMNS}) VALUES ({_marks(SYNC_OPERATIONS)})"
_INSERT_AUDIT = f"INSERT INTO audit_logs_master ({AUDIT_COLUMNS}) VALUES ({_marks(AUDIT_LOGS)})"
_INSERT_CONFLICTS = f"INSERT INTO conflicts ({CONFLICT_COLUMNS}) VALUES ({_marks(CONFLICTS)})"
_DELETE_CONFLICTS = "DELETE FROM conflicts WHERE store_id = ? AND id = ?"
_UPSERT_SEQ = (
    "INSERT INTO store_seqs (store_id, last_seq) VALUES (?, ?) "
    "ON CONFLICT (store_id) DO UPDATE SET last_seq = excluded.last_seq"
)


def write_batch(db: sqlite3.Connection, write: BatchWrite) -> None:
    """The batch's rows; a kind of row the batch has none of costs no statement."""
    if write.entities:
        entities = [entity_values(e, json_text, compact_json, _same) for e in write.entities]
        db.executemany(_UPSERT_ENTITY, entities)
    # The log is append-only: an id the store already logged, or a seq another operation
    # holds, fails the transaction (never INSERT OR REPLACE, never an upsert).
    if write.op_records:
        db.executemany(_INSERT_OPS, [op_values(r, json_text) for r in write.op_records])
    for r in write.settled_records:
        # A resolution replaces the row its pending conflict left, and nothing else.
        row = op_values(r, json_text)
        cursor = db.execute(_SETTLE, (*row[2:], r.id, r.store_id))
        if cursor.rowcount != 1:
            raise StorageUnavailable(
                f"operation {r.id!r} of {r.store_id} is no pending conflict any more; retry"
            )
    if write.audit:
        db.executemany(_INSERT_AUDIT, [audit_values(a, str, str) for a in write.audit])
    if write.new_conflicts:
        conflicts = [conflict_values(c, _operation_json, compact_json) for c in write.new_conflicts]
        db.executemany(_INSERT_CONFLICTS, conflicts)
    if write.settled_conflicts:
        db.executemany(_DELETE_CONFLICTS, write.settled_conflicts)
    if write.last_seqs:
        db.executemany(_UPSERT_SEQ, list(write.last_seqs.items()))

"""SQLite storage, the embedded default (`DATABASE_URL=sqlite:///path`): the Store port on one
file. How the connection is shared and how a commit becomes durable: `sqlite_file.py`; what a
batch reads and writes: `sqlite_batch.py`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from chefia_rt.domain import (
    Entity,
    EntityKey,
    OpKey,
    OpRecord,
)
from chefia_rt.errors import StorageUnavailable
from chefia_rt.protocol.messages import format_timestamp
from chefia_rt.store.base import (
    BatchRequest,
    Coalesced,
    Decide,
    LogBounds,
    Screen,
    ServerEvent,
    SessionRecord,
)
from chefia_rt.store.rows import (
    ENTITY_COLUMNS,
    OP_COLUMNS,
    entity_from_row,
    op_record_from_row,
    session_upsert,
)
from chefia_rt.store.sqlite_batch import (
    WRITTEN_MAX_BYTES,
    WRITTEN_MAX_ENTITIES,
    Written,
    by_keys,
    read_batch,
    write_batch,
)
from chefia_rt.store.sqlite_file import CHECKPOINT_INTERVAL, SQLiteFile, rollback
from chefia_rt.sync.engine import compact_json

T = TypeVar("T")
log = logging.getLogger("chefia_rt.store.sqlite")


class SQLiteStore(SQLiteFile):
    """The Store port on one SQLite file."""

    kind = "sqlite"
    marks_leases = False  # the writer reads a batch's leases from the bus before its commit

    def __init__(self, path: str, checkpoint_interval: float = CHECKPOINT_INTERVAL) -> None:
        super().__init__(path, checkpoint_interval)
        self._sessions = Coalesced(self._record_sessions)
        self._written = Written(WRITTEN_MAX_ENTITIES, WRITTEN_MAX_BYTES)

    async def commit(
        self, request: BatchRequest, decide: Decide[T], screen: Screen | None = None
    ) -> T:
        if screen is not None:
            raise ValueError("SQLiteStore keeps no lease marks: its commit takes no screen")

        laps = request.laps

        def transact(db: sqlite3.Connection) -> T:
            # BEGIN IMMEDIATE (by the caller): the write lock is held from the first read, so
            # what the engine decides on cannot change under it, even with another process on
            # the file.
            laps.lap("wait")
            try:
                self._written.check(db)
                state = read_batch(db, request, self._written)
                laps.lap("read")
                result, write = decide(state)
                laps.lap("decide")
                write_batch(db, write)
                laps.lap("write")
                db.execute("COMMIT")
                laps.lap("commit")
            except BaseException:
                self._written.clear()
                rollback(db)
                raise
            self._written.keep(write)
            self._commits += 1
            return result

        def wait_and_transact(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            result = transact(db)
            self._wal.sync_now()
            laps.lap("sync")
            return result

        handed = await self._connection_to_loop()
        try:
            self._wal.check()
            if self._closed or self._db is None:
                raise StorageUnavailable("storage is closed" if self._closed else "not open")
            if not self._begin_at_once(self._db):
                generation = None
            else:
                result = transact(self._db)
                generation = self._wal.committed()
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"storage error: {exc}") from exc
        finally:
            if handed is not None:
                handed.set()
        if generation is None:
            return await self._run(wait_and_transact)
        await self._wal.durable(generation)
        laps.lap("sync")
        return result

    async def mark_lease(self, key: EntityKey, until: float) -> None:
        return None

    async def read_operations(self, store_id: str, after_seq: int, limit: int) -> list[OpRecord]:
        def read(db: sqlite3.Connection) -> list[OpRecord]:
            rows = db.execute(
                f"SELECT {OP_COLUMNS} FROM sync_operations "
                "WHERE store_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (store_id, after_seq, limit),
            ).fetchall()
            return [op_record_from_row(row) for row in rows]

        return await self._run(read)

    async def get_operation(self, store_id: str, operation_id: str) -> OpRecord | None:
        def read(db: sqlite3.Connection) -> OpRecord | None:
            row = db.execute(
                f"SELECT {OP_COLUMNS} FROM sync_operations WHERE store_id = ? AND id = ?",
                (store_id, operation_id),
            ).fetchone()
            return op_record_from_row(row) if row else None

        return await self._run(read)

    async def logged(self, keys: Sequence[OpKey]) -> set[OpKey]:
        def read(db: sqlite3.Connection) -> set[OpKey]:
            rows = by_keys(db, "t.store_id, t.id", "sync_operations", ("store_id", "id"), keys)
            return {(r[0], r[1]) for r in rows}

        return await self._run(read) if keys else set()

    async def log_bounds(self, store_id: str) -> LogBounds:
        def read(db: sqlite3.Connection) -> LogBounds:
            select = "SELECT last_seq, epoch FROM store_seqs WHERE store_id = ?"
            row = db.execute(select, (store_id,)).fetchone()
            if row is None:
                # The stream starts here, with its epoch (the column's default).
                db.execute(
                    "INSERT INTO store_seqs (store_id, last_seq) VALUES (?, 0) "
                    "ON CONFLICT (store_id) DO NOTHING",
                    (store_id,),
                )
                row = db.execute(select, (store_id,)).fetchone()
            last = row[0]
            oldest = db.execute(
                "SELECT min(seq) FROM sync_operations WHERE store_id = ? AND seq IS NOT NULL",
                (store_id,),
            ).fetchone()[0]
            return LogBounds(oldest if oldest is not None else last + 1, last, row[1])

        return await self._run(read)

    async def snapshot(
        self, store_id: str, entity_types: Sequence[str] | None
    ) -> tuple[int, list[Entity]]:
        def read(db: sqlite3.Connection) -> tuple[int, list[Entity]]:
            # One read transaction: another process's commit cannot land between the two reads.
            db.execute("BEGIN")
            try:
                row = db.execute(
                    "SELECT last_seq FROM store_seqs WHERE store_id = ?", (store_id,)
                ).fetchone()
                sql = f"SELECT {ENTITY_COLUMNS} FROM entities WHERE store_id = ?"
                params: list[Any] = [store_id]
                if entity_types:
                    sql += f" AND entity_type IN ({','.join('?' * len(entity_types))})"
                    params += list(entity_types)
                sql += " ORDER BY entity_type, entity_id"  # BINARY collation: code-point order
                entities = [entity_from_row(r) for r in db.execute(sql, params)]
                db.execute("COMMIT")
            except BaseException:
                rollback(db)
                raise
            return (row[0] if row else 0), entities

        return await self._run(read)

    async def get_entity(self, key: EntityKey) -> Entity | None:
        def read(db: sqlite3.Connection) -> Entity | None:
            row = db.execute(
                f"SELECT {ENTITY_COLUMNS} FROM entities "
                "WHERE store_id = ? AND entity_type = ? AND entity_id = ?",
                (key.store_id, key.entity_type, key.entity_id),
            ).fetchone()
            return entity_from_row(row) if row else None

        return await self._run(read)

    async def list_entities(
        self, store_id: str, entity_type: str, after_id: str | None, limit: int
    ) -> list[Entity]:
        def read(db: sqlite3.Connection) -> list[Entity]:
            rows = db.execute(
                f"SELECT {ENTITY_COLUMNS} FROM entities "
                "WHERE store_id = ? AND entity_type = ? AND entity_id > ? "
                "ORDER BY entity_id LIMIT ?",  # BINARY collation: code-point order
                (store_id, entity_type, after_id or "", limit),
            )
            return [entity_from_row(r) for r in rows]

        return await self._run(read)

    async def record_session(self, session: SessionRecord) -> None:
        await self._sessions.add(session)

    async def _record_sessions(self, sessions: list[SessionRecord]) -> None:
        rows = [asdict(session) for session in sessions]
        columns = list(rows[0])
        sql = session_upsert(columns, ["?"] * len(columns))

        def write(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(sql, [list(row.values()) for row in rows])
                db.execute("COMMIT")
            except BaseException:
                rollback(db)
                raise
            self._wal.sync_now()

        await self._run(write)

    async def add_server_event(self, kind: str, payload: dict[str, Any], created_at: float) -> int:
        def write(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "INSERT INTO server_events (kind, created_at, payload) VALUES (?, ?, ?)",
                (kind, created_at, compact_json(payload)),
            )
            assert cursor.lastrowid is not None
            self._wal.sync_now()
            return cursor.lastrowid

        return await self._run(write)

    async def server_events(self, after_id: int | None, limit: int) -> list[ServerEvent]:
        def read(db: sqlite3.Connection) -> list[ServerEvent]:
            if after_id is None:
                sql = "SELECT * FROM (SELECT id, kind, created_at, payload FROM server_events "
                sql += "ORDER BY id DESC LIMIT ?) ORDER BY id"
                rows = db.execute(sql, (limit,)).fetchall()
            else:
                rows = db.execute(
                    "SELECT id, kind, created_at, payload FROM server_events WHERE id > ? "
                    "ORDER BY id LIMIT ?",
                    (after_id, limit),
                ).fetchall()
            return [ServerEvent(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

        return await self._run(read)

    async def maintain(self, retention: timedelta, now: datetime | None = None) -> None:
        """Prune operation-log rows older than the retention (daily). A row stays while an
        older seq of its store stays, so the log never gets a hole."""
        cutoff = format_timestamp((now or datetime.now(UTC)) - retention)
        oldest = ((now or datetime.now(UTC)) - retention).timestamp()

        def prune(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "WITH keep AS (SELECT store_id, min(seq) AS first_kept FROM sync_operations "
                    "  WHERE server_time >= ? AND seq IS NOT NULL GROUP BY store_id) "
                    "DELETE FROM sync_operations WHERE server_time < ? "
                    "AND (seq IS NULL OR NOT EXISTS (SELECT 1 FROM keep "
                    "  WHERE keep.store_id = sync_operations.store_id "
                    "  AND sync_operations.seq > keep.first_kept))",
                    (cutoff, cutoff),
                )
                # cursor.rowcount is -1 for a DELETE behind a WITH clause; changes() is exact.
                deleted = int(db.execute("SELECT changes()").fetchone()[0])
                db.execute("DELETE FROM server_events WHERE created_at < ?", (oldest,))
                db.execute("COMMIT")
            except BaseException:
                rollback(db)
                raise
            self._wal.sync_now()
            return deleted

        count = await self._run(prune)
        log.info("pruned %d operation-log rows older than %s", count, cutoff)

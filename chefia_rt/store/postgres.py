"""PostgreSQL storage on asyncpg (`DATABASE_URL=postgresql://…`).

One batch is one transaction: lock the batch's stores' seq rows (sorted, so concurrent writers
never deadlock) and its entity rows, hand them to the engine, then bulk-load the operation log
and audit rows with COPY, upsert the entities, and commit. Per-store seqs come from the locked
`store_seqs` row, so they never repeat or skip whatever number of workers and nodes write at once.
The pool, migrations and how failures become StorageUnavailable: `postgres_pool.py`; what a batch
reads and writes: `postgres_batch.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg

from chefia_rt.domain import Entity, EntityKey, OpKey, OpRecord
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
from chefia_rt.store.postgres_batch import read_batch, write_batch
from chefia_rt.store.postgres_pool import MIGRATION_LOCK, PostgresPool
from chefia_rt.store.rows import (
    ENTITY_COLUMNS,
    OP_COLUMNS,
    entity_from_row,
    op_record_from_row,
    session_upsert,
)

log = logging.getLogger("chefia_rt.store.postgres")
T = TypeVar("T")


def _month_start(moment: datetime, months_ahead: int = 0) -> datetime:
    index = moment.year * 12 + moment.month - 1 + months_ahead
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


class PostgresStore(PostgresPool):
    """The Store port on PostgreSQL."""

    kind = "postgresql"
    marks_leases = True

    def __init__(
        self, dsn: str, *, min_size: int = 1, max_size: int = 8, command_timeout: float = 10.0
    ) -> None:
        super().__init__(dsn, min_size=min_size, max_size=max_size, command_timeout=command_timeout)
        self._sessions = Coalesced(self._record_sessions)

    # ---- upkeep -----------------------------------------------------------------------------

    async def maintain(self, retention: timedelta, now: datetime | None = None) -> None:
        """Keep the audit partitions of this month and the next, and prune the log (daily)."""
        now = now or datetime.now(UTC)

        async def partitions(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                # Workers starting together would race to create the same partition.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                await create_partitions(conn)

        async def create_partitions(conn: asyncpg.Connection) -> None:
            for ahead in (0, 1):
                start, end = _month_start(now, ahead), _month_start(now, ahead + 1)
                name = f"audit_logs_{start:%Y_%m}"
                if await conn.fetchval("SELECT to_regclass($1)", name) is not None:
                    continue
                try:
                    async with conn.transaction():  # a savepoint: a refusal keeps the lock
                        await conn.execute(
                            f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF audit_logs_master '
                            f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
                        )
                except asyncpg.CheckViolationError:
                    # Rows of that month already sit in the default partition (the server was
                    # down for a month): they stay there, still queryable through the master.
                    log.warning(
                        "audit partition %s not created: default partition holds rows", name
                    )

        await self._with(partitions)
        cutoff = format_timestamp(now - retention)
        # Seq order is commit order, not server_time order, so a row is kept when any older
        # seq of its store is kept: deleting by time alone could punch a hole into the log.
        result = await self._with(
            lambda c: c.execute(
                "WITH keep AS (SELECT store_id, min(seq) AS first_kept FROM sync_operations "
                "  WHERE server_time >= $1 AND seq IS NOT NULL GROUP BY store_id) "
                "DELETE FROM sync_operations o WHERE o.server_time < $1 "
                "AND (o.seq IS NULL OR NOT EXISTS (SELECT 1 FROM keep "
                "  WHERE keep.store_id = o.store_id AND o.seq > keep.first_kept))",
                cutoff,
            )
        )
        log.info("pruned %s operation-log rows older than %s", result.split()[-1], cutoff)
        await self._with(
            lambda c: c.execute("DELETE FROM server_events WHERE created_at < $1", now - retention)
        )
        # A mark an hour past its lease's expiry stops nothing any more (MARK_CLOCK_SLACK).
        marks_past = int((now - timedelta(hours=1)).timestamp() * 1000)
        await self._with(
            lambda c: c.execute("DELETE FROM lease_marks WHERE until_ms < $1", marks_past)
        )

    # ---- the batch --------------------------------------------------------------------------

    async def commit(
        self, request: BatchRequest, decide: Decide[T], screen: Screen | None = None
    ) -> T:
        laps = request.laps

        async def work(conn: asyncpg.Connection) -> T:
            async with conn.transaction():
                laps.lap("begin")
                state = await read_batch(conn, request)
                if screen is not None:
                    await screen(state)
                    laps.lap("screen")
                result, write = decide(state)
                laps.lap("decide")
                await write_batch(conn, write)
                laps.lap("write")
            laps.lap("commit")
            return result

        return await self._with(work)

    async def mark_lease(self, key: EntityKey, until: float) -> None:
        await self._with(
            lambda c: c.execute(
                "INSERT INTO lease_marks (store_id, entity_type, entity_id, until_ms) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (store_id, entity_type, entity_id) "
                "DO UPDATE SET until_ms = greatest(lease_marks.until_ms, excluded.until_ms)",
                key.store_id,
                key.entity_type,
                key.entity_id,
                int(until * 1000) + 1,
            )
        )

    async def read_operations(self, store_id: str, after_seq: int, limit: int) -> list[OpRecord]:
        rows = await self._with(
            lambda c: c.fetch(
                f"SELECT {OP_COLUMNS} FROM sync_operations "
                "WHERE store_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                store_id,
                after_seq,
                limit,
            ),
            read_only=True,
        )
        return [op_record_from_row(r) for r in rows]

    async def get_operation(self, store_id: str, operation_id: str) -> OpRecord | None:
        row = await self._with(
            lambda c: c.fetchrow(
                f"SELECT {OP_COLUMNS} FROM sync_operations WHERE store_id = $1 AND id = $2",
                store_id,
                operation_id,
            ),
            read_only=True,
        )
        return op_record_from_row(row) if row is not None else None

    async def logged(self, keys: Sequence[OpKey]) -> set[OpKey]:
        if not keys:
            return set()
        rows = await self._with(
            lambda c: c.fetch(
                "SELECT o.store_id, o.id FROM sync_operations o "
                "JOIN unnest($1::text[], $2::text[]) AS k(s, i) ON o.store_id = k.s AND o.id = k.i",
                [k[0] for k in keys],
                [k[1] for k in keys],
            ),
            read_only=True,
        )
        return {(r[0], r[1]) for r in rows}

    async def log_bounds(self, store_id: str) -> LogBounds:
        async def read(conn: asyncpg.Connection) -> LogBounds:
            row = await conn.fetchrow(
                "SELECT last_seq, epoch FROM store_seqs WHERE store_id = $1", store_id
            )
            if row is None:
                # The stream starts here: its epoch is made once (a retry finds it made).
                await conn.execute(
                    "INSERT INTO store_seqs (store_id, last_seq) VALUES ($1, 0) "
                    "ON CONFLICT (store_id) DO NOTHING",
                    store_id,
                )
                row = await conn.fetchrow(
                    "SELECT last_seq, epoch FROM store_seqs WHERE store_id = $1", store_id
                )
            oldest = await conn.fetchval(
                "SELECT min(seq) FROM sync_operations WHERE store_id = $1 AND seq IS NOT NULL",
                store_id,
            )
            last = row[0]
            return LogBounds(oldest if oldest is not None else last + 1, last, row[1])

        return await self._with(read, read_only=True)

    async def snapshot(
        self, store_id: str, entity_types: Sequence[str] | None
    ) -> tuple[int, list[Entity]]:
        async def read(conn: asyncpg.Connection) -> tuple[int, list[Entity]]:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                seq = await conn.fetchval(
                    "SELECT last_seq FROM store_seqs WHERE store_id = $1", store_id
                )
                rows = await conn.fetch(
                    f"SELECT {ENTITY_COLUMNS} FROM entities WHERE store_id = $1 "
                    "AND ($2::text[] IS NULL OR entity_type = ANY($2::text[])) "
                    'ORDER BY entity_type COLLATE "C", entity_id COLLATE "C"',
                    store_id,
                    list(entity_types) if entity_types else None,
                )
            return seq or 0, [entity_from_row(r) for r in rows]

        return await self._with(read, read_only=True)

    async def get_entity(self, key: EntityKey) -> Entity | None:
        row = await self._with(
            lambda c: c.fetchrow(
                f"SELECT {ENTITY_COLUMNS} FROM entities "
                "WHERE store_id = $1 AND entity_type = $2 AND entity_id = $3",
                key.store_id,
                key.entity_type,
                key.entity_id,
            ),
            read_only=True,
        )
        return entity_from_row(row) if row is not None else None

    async def list_entities(
        self, store_id: str, entity_type: str, after_id: str | None, limit: int
    ) -> list[Entity]:
        rows = await self._with(
            lambda c: c.fetch(
                f"SELECT {ENTITY_COLUMNS} FROM entities "
                'WHERE store_id = $1 AND entity_type = $2 AND entity_id COLLATE "C" > $3 '
                'ORDER BY entity_id COLLATE "C" LIMIT $4',
                store_id,
                entity_type,
                after_id or "",
                limit,
            ),
            read_only=True,
        )
        return [entity_from_row(r) for r in rows]

    async def add_server_event(self, kind: str, payload: dict[str, Any], created_at: float) -> int:
        event_id = await self._with(
            lambda c: c.fetchval(
                "INSERT INTO server_events (kind, created_at, payload) "
                "VALUES ($1, to_timestamp($2), $3) RETURNING id",
                kind,
                created_at,
                payload,
            )
        )
        return int(event_id)

    async def server_events(self, after_id: int | None, limit: int) -> list[ServerEvent]:
        columns = "id, kind, extract(epoch FROM created_at)::float8 AS at, payload"
        if after_id is None:
            sql = (
                f"SELECT * FROM (SELECT {columns} FROM server_events ORDER BY id DESC LIMIT $1) "
                "AS newest ORDER BY id"
            )
            args: tuple[Any, ...] = (limit,)
        else:
            sql = f"SELECT {columns} FROM server_events WHERE id > $1 ORDER BY id LIMIT $2"
            args = (after_id, limit)
        rows = await self._with(lambda c: c.fetch(sql, *args), read_only=True)
        return [ServerEvent(int(r[0]), r[1], float(r[2]), r[3]) for r in rows]

    async def record_session(self, session: SessionRecord) -> None:
        await self._sessions.add(session)

    async def _record_sessions(self, sessions: list[SessionRecord]) -> None:
        rows = [asdict(session) for session in sessions]
        columns = list(rows[0])
        sql = session_upsert(columns, [f"${i}" for i in range(1, len(columns) + 1)])

        async def write(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.executemany(sql, [list(row.values()) for row in rows])

        await self._with(write)

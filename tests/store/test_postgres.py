"""What only the PostgreSQL backend has: audit partitions, concurrent migration, lost
connections mid-transaction, COPY at batch size, lease marks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from chefia_rt.domain import BatchState, BatchWrite, EntityKey, Operation
from chefia_rt.errors import StorageUnavailable
from chefia_rt.store.base import BatchRequest
from chefia_rt.store.postgres import PostgresStore
from chefia_rt.store.postgres_batch import MARK_CLOCK_SLACK
from chefia_rt.store.rows import migrations
from tests.services import drop_pg_schema, new_pg_schema
from tests.store.test_contract import make_op, sync


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    url = await new_pg_schema()
    try:
        yield url
    finally:
        await drop_pg_schema(url)


async def partitions(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'audit_logs_master' "
            "AND c.relnamespace = current_schema()::regnamespace"
        )
    finally:
        await conn.close()
    return {r[0] for r in rows}


async def test_maintain_creates_this_and_next_months_audit_partitions(dsn: str) -> None:
    store = PostgresStore(dsn)
    await store.open()
    try:
        await store.maintain(timedelta(days=30), now=datetime(2026, 12, 15, tzinfo=UTC))
        assert {"audit_logs_2026_12", "audit_logs_2027_01"} <= await partitions(dsn)
        await store.maintain(timedelta(days=30), now=datetime(2026, 12, 20, tzinfo=UTC))
        assert len(await partitions(dsn)) == 3  # idempotent: the two months plus the default
    finally:
        await store.close()


async def test_audit_rows_land_in_their_month_partition(dsn: str) -> None:
    store = PostgresStore(dsn)
    await store.open()
    try:
        now = datetime.now(UTC)
        await store.maintain(timedelta(days=30), now=now)
        await sync(store, [make_op("op1", "T1", {"n": 1})])
        conn = await asyncpg.connect(dsn)
        try:
            where = await conn.fetchval("SELECT tableoid::regclass::text FROM audit_logs_master")
        finally:
            await conn.close()
        assert where == f"audit_logs_{now:%Y_%m}"
    finally:
        await store.close()


async def test_workers_starting_together_migrate_once(dsn: str) -> None:
    stores = [PostgresStore(dsn) for _ in range(6)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        conn = await asyncpg.connect(dsn)
        try:
            versions = [
                r[0] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
            ]
        finally:
            await conn.close()
        assert versions == [version for version, _ in migrations("postgres")] == [1, 2, 3, 4, 5]
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_connection_cut_mid_transaction_writes_nothing_and_the_pool_recovers(
    dsn: str,
) -> None:
    store = PostgresStore(dsn, max_size=1)
    await store.open()
    try:
        await sync(store, [make_op("op1", "T1", {"n": 1})])

        async def cut(conn: asyncpg.Connection) -> None:
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        with pytest.raises(StorageUnavailable):
            await store._with(lambda c: _in_transaction(c, cut))
        # The only pooled connection died; the next call gets a fresh one.
        outcomes = await sync(store, [make_op("op2", "T1", {"n": 2}, version=2)])
        assert outcomes[0].record is not None and outcomes[0].record.seq == 2
    finally:
        await store.close()


async def _in_transaction(conn: asyncpg.Connection, then: object) -> None:
    async with conn.transaction():
        await conn.execute("INSERT INTO store_seqs VALUES ('ghost', 99)")
        await then(conn)  # type: ignore[operator]


async def test_a_large_batch_goes_through_copy(dsn: str) -> None:
    store = PostgresStore(dsn)
    await store.open()
    try:
        ops: list[Operation] = [
            make_op(f"op{n}", f"T{n}", {"n": n, "name": "Açaí 🍧"}, store_id=f"s{n % 7}")
            for n in range(2000)
        ]
        outcomes = await sync(store, ops)
        assert all(o.status == "applied" for o in outcomes)
        for s in range(7):
            bounds = await store.log_bounds(f"s{s}")
            assert bounds.oldest_seq == 1
            assert bounds.last_seq == len([n for n in range(2000) if n % 7 == s])
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM audit_logs_master") == 2000
            assert (
                await conn.fetchval("SELECT count(*) FROM store_seqs WHERE store_id = 'ghost'") == 0
            )
        finally:
            await conn.close()
    finally:
        await store.close()


async def test_workers_keeping_partitions_together_do_not_collide(dsn: str) -> None:
    stores = [PostgresStore(dsn) for _ in range(6)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        when = datetime(2027, 3, 3, tzinfo=UTC)
        await asyncio.gather(*(s.maintain(timedelta(days=30), now=when) for s in stores))
        assert {"audit_logs_2027_03", "audit_logs_2027_04"} <= await partitions(dsn)
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_the_log_carries_only_the_indexes_its_queries_use(dsn: str) -> None:
    """Each index costs every logged operation an insertion and its WAL: the log keeps its
    primary key (idempotency), its seq (the stream) and a BRIN on its server time (the daily
    prune); the audit a BRIN on its time (rows arrive in time order) and its entity index."""
    store = PostgresStore(dsn)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT c.relname AS index, t.relname AS table, am.amname AS method "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_class t ON t.oid = i.indrelid JOIN pg_am am ON am.oid = c.relam "
            "JOIN pg_namespace n ON n.oid = t.relnamespace "
            "WHERE n.nspname = current_schema() "
            "AND t.relname IN ('sync_operations', 'audit_logs_master')"
        )
    finally:
        await conn.close()
    assert sorted((r["table"], r["index"], r["method"]) for r in rows) == [
        ("audit_logs_master", "audit_logs_entity", "btree"),
        ("audit_logs_master", "audit_logs_timestamp", "brin"),
        ("sync_operations", "sync_operations_pkey", "btree"),
        ("sync_operations", "sync_operations_server_time", "brin"),
        ("sync_operations", "sync_operations_store_seq", "btree"),
    ]


async def leased(store: PostgresStore, *keys: EntityKey) -> frozenset[EntityKey]:
    """The keys a batch over `keys` reads as possibly leased."""

    def decide(state: BatchState) -> tuple[frozenset[EntityKey], BatchWrite]:
        return state.leased, BatchWrite()

    request = BatchRequest(entity_keys=list(keys), store_ids=sorted({k.store_id for k in keys}))
    return await store.commit(request, decide)


async def test_a_batch_reads_the_lease_marks_of_its_entities(dsn: str) -> None:
    """A mark counts while its lease may be in force, with MARK_CLOCK_SLACK for the clocks of
    other nodes; a later mark never moves it earlier; the daily upkeep drops marks an hour past."""
    store = PostgresStore(dsn)
    await store.open()
    try:
        t1, t2, o1 = (EntityKey("s1", "tables", i) for i in ("t1", "t2", "o1"))
        other_store = EntityKey("s2", "tables", "t1")
        assert await leased(store, t1, t2) == frozenset()
        now = time.time()
        await store.mark_lease(t1, now + 30)
        await store.mark_lease(t1, now - 3600)  # an older grant's expiry: no earlier
        await store.mark_lease(o1, now - MARK_CLOCK_SLACK - 5)  # gone, slack included
        await store.mark_lease(t2, now - MARK_CLOCK_SLACK + 30)  # expired, within the slack
        await store.mark_lease(EntityKey("s1", "tables", "old"), now - 7200)
        assert await leased(store, t1, t2, o1, other_store) == {t1, t2}
        assert await leased(store, other_store, o1) == frozenset()
        await store.maintain(timedelta(days=30))
        conn = await asyncpg.connect(dsn)
        try:
            kept = {r[0] for r in await conn.fetch("SELECT entity_id FROM lease_marks")}
        finally:
            await conn.close()
        assert kept == {"t1", "t2", "o1"}  # only "old" is an hour past
        await store.maintain(timedelta(days=30), datetime.now(UTC) + timedelta(hours=2))
        assert await leased(store, t1, t2) == frozenset()
    finally:
        await store.close()


async def test_a_mark_that_cannot_be_written_raises_storage_unavailable(dsn: str) -> None:
    store = PostgresStore(dsn)
    await store.open()
    await store.close()
    with pytest.raises(StorageUnavailable):
        await store.mark_lease(EntityKey("s1", "tables", "t1"), time.time() + 30)


async def test_a_commit_notes_its_stages(dsn: str) -> None:
    store = PostgresStore(dsn)
    await store.open()
    try:
        screened: list[frozenset[EntityKey]] = []

        async def screen(state: BatchState) -> None:
            screened.append(state.leased)

        key = EntityKey("s1", "tables", "t1")
        request = BatchRequest(entity_keys=[key], store_ids=["s1"])
        await store.commit(request, lambda state: (None, BatchWrite()), screen)
        stages = ["begin", "lock", "read", "screen", "decide", "write", "commit"]
        assert list(request.laps) == stages
        assert all(seconds >= 0 for seconds in request.laps.values())
        assert screened == [frozenset()]
    finally:
        await store.close()

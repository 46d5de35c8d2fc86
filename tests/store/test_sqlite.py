"""What only the SQLite backend promises: durability pragmas, migrations, the file itself."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chefia_rt.domain import BatchState, BatchWrite, Entity, EntityKey
from chefia_rt.errors import StorageUnavailable
from chefia_rt.store import sqlite_batch, sqlite_file
from chefia_rt.store.base import BatchRequest
from chefia_rt.store.rows import migrations
from chefia_rt.store.sqlite import SQLiteStore
from chefia_rt.sync.engine import Outcome
from tests.helpers import eventually
from tests.store.test_contract import ENGINE, NOW, make_op, request_for, sync


@pytest.fixture
async def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "chefia.db"  # the directory does not exist yet


@pytest.fixture
async def opened(db_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(str(db_path))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def query(path: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def packaged_versions() -> list[int]:
    return [version for version, _ in migrations("sqlite")]


async def test_durability_pragmas(opened: SQLiteStore, db_path: Path) -> None:
    def pragmas(db: sqlite3.Connection) -> tuple[str, int, int]:
        return (
            db.execute("PRAGMA journal_mode").fetchone()[0],
            db.execute("PRAGMA synchronous").fetchone()[0],
            db.execute("PRAGMA busy_timeout").fetchone()[0],
        )

    journal, synchronous, busy = await opened._run(pragmas)
    assert journal == "wal"
    # NORMAL: COMMIT leaves the WAL to the store's own sync, which every answer waits for
    # (test_nothing_is_answered_before_its_wal_is_synced).
    assert synchronous == 1
    assert busy >= 5000  # other processes on the file are waited for, not failed
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]  # kept in the file


async def test_nothing_is_answered_before_its_wal_is_synced(opened: SQLiteStore) -> None:
    """Commits and reads running together: each commit returns, and each read returns what
    it saw, only once an fsync begun after that commit has finished. Fewer fsyncs than
    commits: the commits made while one runs share the next."""
    wal = opened._wal
    unsynced: list[str] = []

    async def commit(n: int) -> None:
        made: list[int] = []
        items = [make_op(f"op{n}", f"t{n % 7}", {"n": n}, version=0)]

        def decide(state: BatchState) -> tuple[list[Outcome], BatchWrite]:
            made.append(wal.written + 1)  # this transaction's generation, committed next
            return ENGINE.decide(items, state, NOW)

        await opened.commit(request_for(items), decide)
        if wal.synced < made[-1]:
            unsynced.append(f"commit {n}")

    async def read(n: int) -> None:
        await asyncio.sleep(0.01)  # among the commits, while the disk is slow
        seen = wal.written
        await opened.read_operations("s1", 0, 1000)
        if wal.synced < seen:
            unsynced.append(f"read {n}")

    syncs_before = wal.syncs
    # A slow disk for the first moments: the sync thread is busy for 50 ms.
    wal._thread.submit(time.sleep, 0.05)
    await asyncio.gather(*(f(n) for n in range(200) for f in (commit, read)))
    assert unsynced == []
    assert wal.written >= 200 and wal.synced == wal.written
    assert wal.syncs - syncs_before < 200
    assert len(await opened.read_operations("s1", 0, 1000)) == 200


async def test_a_failed_sync_stops_the_store(opened: SQLiteStore, tmp_path: Path) -> None:
    """After an fsync of the WAL fails, nothing written since the last good one is known to
    be on disk: no commit is answered and no read is served any more (health says so)."""
    (done,) = await sync(opened, [make_op("op1", "T1", {"a": 1})])
    assert done.status == "applied"
    wal = opened._wal
    os.close(wal._fd)  # type: ignore[arg-type]
    wal._fd = None
    wal._path = str(tmp_path / "gone" / "chefia.db-wal")  # it can no longer be opened
    with pytest.raises(StorageUnavailable, match="failed to sync"):
        await sync(opened, [make_op("op2", "T1", {"a": 2}, version=1)])
    with pytest.raises(StorageUnavailable, match="failed to sync"):
        await sync(opened, [make_op("op3", "T2", {"a": 3})])
    with pytest.raises(StorageUnavailable, match="failed to sync"):
        await opened.read_operations("s1", 0, 10)
    assert await opened.ping() is False


async def test_migrations_are_recorded_and_idempotent(db_path: Path) -> None:
    for _ in range(3):
        store = SQLiteStore(str(db_path))
        await store.open()
        await store.close()
    recorded = query(db_path, "SELECT version, applied_at FROM schema_migrations ORDER BY version")
    assert [version for version, _ in recorded] == packaged_versions() == [1, 2, 3, 4]
    assert all(applied_at for _, applied_at in recorded)
    tables = {row[0] for row in query(db_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {
        "schema_migrations",
        "store_seqs",
        "entities",
        "sync_operations",
        "audit_logs_master",
        "conflicts",
        "websocket_connections",
        "server_events",
    } <= tables


async def test_only_pending_migrations_run_and_a_failing_one_changes_nothing(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(str(db_path))
    await store.open()
    await store.close()
    packaged = migrations("sqlite")
    latest = packaged[-1][0]
    good_v, bad_v = latest + 1, latest + 2

    # Statements split on semicolons inside a trigger body must still run as one.
    good = (
        "-- a comment first; with a semicolon\n"
        "CREATE TABLE extra (id INTEGER PRIMARY KEY, note TEXT DEFAULT 'a;b');\n"
        "CREATE TRIGGER extra_note AFTER INSERT ON extra BEGIN\n"
        "  UPDATE extra SET note = 'x;\ny' WHERE id = new.id;\n"
        "END;\n"
        "-- trailing comment\n"
    )
    monkeypatch.setattr(sqlite_file, "migrations", lambda prefix: [*packaged, (good_v, good)])
    store = SQLiteStore(str(db_path))
    await store.open()
    await store.close()
    recorded = query(db_path, "SELECT version FROM schema_migrations ORDER BY version")
    assert recorded == [(v,) for v in range(1, good_v + 1)]

    bad = "CREATE TABLE half (id INTEGER);\nCREATE TABLE broken (;\n"
    monkeypatch.setattr(
        sqlite_file, "migrations", lambda prefix: [*packaged, (good_v, good), (bad_v, bad)]
    )
    store = SQLiteStore(str(db_path))
    with pytest.raises(StorageUnavailable):
        await store.open()
    await store.close()
    assert query(db_path, "SELECT max(version) FROM schema_migrations") == [(good_v,)]
    assert query(db_path, "SELECT name FROM sqlite_master WHERE name = 'half'") == []


async def test_concurrent_first_opens_migrate_once(tmp_path: Path) -> None:
    """N workers starting on a new file: switching it to WAL and migrating it both race."""
    for attempt in range(30):
        path = tmp_path / f"race-{attempt}.db"
        stores = [SQLiteStore(str(path)) for _ in range(6)]
        try:
            await asyncio.gather(*(s.open() for s in stores))
        finally:
            for s in stores:
                await s.close()
        assert query(path, "SELECT version FROM schema_migrations ORDER BY version") == [
            (1,),
            (2,),
            (3,),
            (4,),
        ]


async def test_reopening_the_file_keeps_data(db_path: Path) -> None:
    store = SQLiteStore(str(db_path))
    await store.open()
    first = await sync(
        store,
        [
            make_op("op1", "T1", {"nome": "Mesa 1 — varanda"}, operation="CREATE"),
            make_op("op2", "T1", {"status": "open"}, version=2),
        ],
    )
    await store.close()

    store = SQLiteStore(str(db_path))
    await store.open()
    try:
        t1 = await store.get_entity(EntityKey("s1", "tables", "T1"))
        assert t1 is not None and t1.version == 2
        assert t1.data == {"nome": "Mesa 1 — varanda", "status": "open"}
        assert await store.read_operations("s1", 0, 10) == [o.record for o in first]
        (more,) = await sync(store, [make_op("op3", "T1", {"status": "closed"}, version=3)])
        assert more.record is not None and more.record.seq == 3
    finally:
        await store.close()
    assert query(db_path, "SELECT count(*) FROM schema_migrations") == [(4,)]


async def test_two_stores_on_one_file_never_fork(db_path: Path) -> None:
    """Two processes on one file (a `migrate` beside a server, a second worker by mistake)."""
    stores = [SQLiteStore(str(db_path)) for _ in range(2)]
    for s in stores:
        await s.open()
    try:
        commits = [
            sync(stores[n % 2], [make_op(f"op{n}", "T1", {"n": n}, version=n + 1)])
            for n in range(40)
        ]
        outcomes = await asyncio.gather(*commits)
        seqs = sorted(o.record.seq for (o,) in outcomes if o.record and o.record.seq)
        assert seqs == list(range(1, 41))  # every one wins (same timestamp: later arrival)
        t1 = await stores[0].get_entity(EntityKey("s1", "tables", "T1"))
        assert t1 is not None and t1.version == 40
    finally:
        for s in stores:
            await s.close()


async def test_a_locked_database_is_unavailable_not_an_sqlite_error(
    opened: SQLiteStore, db_path: Path
) -> None:
    opened.lock_wait = 0.05
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageUnavailable):
            await sync(opened, [make_op("op1", "T1", {"a": 1})])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    (done,) = await sync(opened, [make_op("op1", "T1", {"a": 1})])
    assert done.status == "applied" and done.record is not None and done.record.seq == 1


async def test_a_full_disk_is_unavailable_and_writes_nothing(opened: SQLiteStore) -> None:
    await sync(opened, [make_op("op0", "T0", {"a": 0})])

    def cap(db: sqlite3.Connection) -> int:
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        db.execute(f"PRAGMA max_page_count={pages}")
        return pages

    pages = await opened._run(cap)
    big = [make_op(f"op{n}", f"T{n}", {"blob": "x" * 5000}) for n in range(1, 40)]
    with pytest.raises(StorageUnavailable):
        await sync(opened, big)
    await opened._run(lambda db: db.execute(f"PRAGMA max_page_count={pages * 1000}"))
    assert (await opened.log_bounds("s1")).last_seq == 1
    assert await opened.get_entity(EntityKey("s1", "tables", "T1")) is None
    outcomes = await sync(opened, big)
    assert [o.record.seq for o in outcomes if o.record] == list(range(2, 41))


async def test_an_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path))  # a directory, not a database file
    with pytest.raises(StorageUnavailable):
        await store.open()
    assert await store.ping() is False
    await store.close()


async def test_decide_runs_inside_an_immediate_transaction(opened: SQLiteStore) -> None:
    """The write lock is taken before the reads the engine decides on (no stale reads)."""
    seen: list[bool] = []

    def decide(state: BatchState) -> tuple[None, BatchWrite]:
        assert opened._db is not None
        seen.append(opened._db.in_transaction)
        return None, BatchWrite()

    await opened.commit(BatchRequest(store_ids=["s1"]), decide)
    assert seen == [True]
    assert opened._db is not None and not opened._db.in_transaction


async def test_hot_queries_use_indexes(opened: SQLiteStore) -> None:
    def plan(db: sqlite3.Connection, sql: str) -> str:
        return " ".join(str(row[-1]) for row in db.execute("EXPLAIN QUERY PLAN " + sql))

    reads = await opened._run(
        lambda db: plan(
            db, "SELECT * FROM sync_operations WHERE store_id = 's1' AND seq > 5 ORDER BY seq"
        )
    )
    assert "sync_operations_store_seq" in reads and "TEMP B-TREE" not in reads
    oldest = await opened._run(
        lambda db: plan(
            db, "SELECT min(seq) FROM sync_operations WHERE store_id = 's1' AND seq IS NOT NULL"
        )
    )
    assert "sync_operations_store_seq" in oldest


async def test_a_batch_reads_by_index_never_by_scanning_a_table(opened: SQLiteStore) -> None:
    """What a commit reads for its batch (known operations, conflicts, entities, seqs) costs
    one index search per key, however long the operation log is: no statement of the commit
    scans a table."""
    await sync(opened, [make_op(f"seed{i}", f"T{i}", {"n": i}) for i in range(5)])
    cash = {"entity_type": "cashier_operations"}
    await sync(opened, [make_op("cash1", "C1", {"a": 1}, operation="CREATE", **cash)])
    stale = make_op("cash2", "C1", {"a": 2}, **cash)  # version 1 again: a manual conflict
    assert [o.status for o in await sync(opened, [stale])] == ["conflict"]
    statements: list[str] = []
    assert opened._db is not None
    opened._db.set_trace_callback(statements.append)
    try:
        batch = [
            make_op("seed1", "T1", {"n": 1}),  # a retry: found in the log
            make_op("new1", "T2", {"n": 9}, version=2),
            make_op("new2", "T9", {"n": 9}, store_id="s2"),
            make_op("new3", "T3", {"n": 9}, entity_type="cashier_operations"),
            stale,  # a retry of the conflict: its conflict is read too
        ]
        outcomes = await sync(opened, batch)
    finally:
        opened._db.set_trace_callback(None)
    statuses = [o.status for o in outcomes]
    assert statuses == ["duplicate", "applied", "applied", "applied", "conflict"]

    def plans(db: sqlite3.Connection) -> dict[str, list[str]]:
        selects = [s for s in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))]
        return {s: [str(row[-1]) for row in db.execute("EXPLAIN QUERY PLAN " + s)] for s in selects}

    read = await opened._run(plans)
    tables = ("sync_operations", "conflicts", "entities", "store_seqs")
    assert {t for t in tables if any(t in s for s in read)} == set(tables)
    # Only the list of keys itself may be scanned ("SCAN k", "SCAN 4 CONSTANT ROWS").
    scans = {
        s: [
            line
            for line in p
            if line.startswith("SCAN ") and line.split()[1] != "k" and "CONSTANT ROW" not in line
        ]
        for s, p in read.items()
    }
    assert {s: p for s, p in scans.items() if p} == {}


async def test_maintain_logs_how_many_rows_it_pruned(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from datetime import UTC, datetime, timedelta

    store = SQLiteStore(str(db_path))
    await store.open()
    try:
        with caplog.at_level("INFO", logger="chefia_rt.store.sqlite"):
            await store.maintain(timedelta(days=30), now=datetime.now(UTC))
        assert "pruned 0 operation-log rows" in caplog.text
    finally:
        await store.close()


async def test_the_log_carries_only_the_indexes_its_queries_use(opened: SQLiteStore) -> None:
    """Each index costs every logged operation an insertion: the log keeps its primary key
    (idempotency), its seq (the stream) and its server time (the daily prune), no more."""
    path = Path(opened.path)
    indexes = query(
        path, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'sync_operations'"
    )
    assert sorted(name for (name,) in indexes) == [
        "sqlite_autoindex_sync_operations_1",
        "sync_operations_store_seq",
        "sync_operations_timestamp",
    ]


async def test_commits_leave_the_wal_checkpoint_to_the_background(db_path: Path) -> None:
    """A commit never copies the WAL into the file at SQLite's default of 1000 pages (that
    held its batch's confirmations back): with the background checkpoint held off, 10 MB of
    commits stay in the WAL."""
    store = SQLiteStore(str(db_path), checkpoint_interval=3600)
    await store.open()
    try:
        await write_big(store, 300)
        wal, file = await asyncio.to_thread(sizes, db_path)
        assert wal > 8 * 2**20
        assert file < 2**20  # nothing copied into the file yet
    finally:
        await store.close()


async def test_the_background_checkpoint_keeps_the_wal_small(db_path: Path) -> None:
    store = SQLiteStore(str(db_path), checkpoint_interval=0.02)
    await store.open()
    try:
        await write_big(store, 300)
        # The background copied the pages over, and the WAL was written again from its start
        # after its checkpoints rather than grown to 10 MB.
        await eventually(lambda: sizes(db_path)[1] > 8 * 2**20, what="a checkpoint")
        wal, _ = await asyncio.to_thread(sizes, db_path)
        assert wal < 6 * 2**20
        assert len((await store.snapshot("s1", None))[1]) == 300
    finally:
        await store.close()


async def write_big(store: SQLiteStore, count: int) -> None:
    big = "x" * 12_000
    for n in range(count):
        await sync(store, [make_op(f"op-{n}", f"T{n}", {"big": big}, operation="CREATE")])


def sizes(db_path: Path) -> tuple[int, int]:
    """(bytes of the WAL, bytes of the database file)."""
    return Path(f"{db_path}-wal").stat().st_size, db_path.stat().st_size


async def test_a_batch_sees_what_another_connection_committed(
    opened: SQLiteStore, db_path: Path
) -> None:
    """The writer remembers what it committed, and forgets it once another connection (a
    restore, a second process) committed anything."""
    await sync(opened, [make_op("op1", "T1", {"a": 1}, operation="CREATE")])
    outside = sqlite3.connect(db_path, isolation_level=None)
    try:
        outside.execute(
            "UPDATE entities SET version = 7, data = '{\"a\":7}' WHERE entity_id = 'T1'"
        )
        outside.execute("UPDATE store_seqs SET last_seq = 40 WHERE store_id = 's1'")
    finally:
        outside.close()
    (done,) = await sync(opened, [make_op("op2", "T1", {"b": 2}, version=7)])
    assert done.status == "applied" and done.record is not None
    assert (done.record.version, done.record.seq) == (8, 41)


async def test_the_writer_remembers_a_bounded_number_of_entities() -> None:
    written = sqlite_batch.Written(max_entities=2, max_bytes=64 * 100)
    keys = [EntityKey("s1", "tables", f"T{n}") for n in range(4)]
    entities = [Entity(k, 1, {"n": 1}, data_json='{"n":1}') for k in keys]
    written.keep(BatchWrite(entities=entities[:3], last_seqs={"s1": 3}))
    found, missing = written.entities(keys)
    assert list(found) == keys[1:3] and missing == [keys[0], keys[3]]
    # Past its share of the bytes an entity is not kept at all, and an older version of it goes.
    written.keep(BatchWrite(entities=[Entity(keys[1], 2, {}, data_json="x" * 101)]))
    assert written.entities(keys[1:3]) == ({keys[2]: entities[2]}, [keys[1]])
    assert written.seqs(["s1", "s2"]) == ({"s1": 3}, ["s2"])

"""SQLite storage, the embedded default (`DATABASE_URL=sqlite:///path`).

One connection serves every call, one call at a time. Reads and the occasional writes run in
one dedicated thread; a batch's commit runs on the event loop itself. That is the hot path, and
in a thread it would hand the interpreter lock back and forth with the event loop at every
statement, each hand-off waiting up to the switch interval while the loop is busy: the commit's
wall time, and so every confirmation's latency, would grow with the load of the loop. On the loop
a batch costs its CPU time and nothing more. A commit that would have to wait for another process
holding the write lock goes to the thread instead, where waiting blocks nothing.

A commit is durable before `commit` returns, so a confirmation sent after it survives `kill -9`
and power loss: the WAL is synced after each commit, in a thread of its own, by one fsync for
every commit made meanwhile (see `wal.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

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
from chefia_rt.protocol.messages import format_timestamp
from chefia_rt.store.base import (
    BatchRequest,
    Coalesced,
    Decide,
    LogBounds,
    ServerEvent,
    SessionRecord,
)
from chefia_rt.store.rows import (
    AUDIT_COLUMNS,
    ENTITY_COLUMNS,
    OP_COLUMNS,
    audit_values,
    conflict_from_row,
    conflicts_to_read,
    entity_from_row,
    migrations,
    op_record_from_row,
    op_values,
    session_upsert,
)
from chefia_rt.store.wal import WalSync
from chefia_rt.sync.engine import compact_json

T = TypeVar("T")
log = logging.getLogger("chefia_rt.store.sqlite")

_OP_FIELDS = [c.strip() for c in OP_COLUMNS.split(",")]
_SETTLE = (
    "UPDATE sync_operations SET "
    + ", ".join(f"{c} = ?" for c in _OP_FIELDS if c not in ("id", "store_id"))
    + " WHERE id = ? AND store_id = ? AND status = 'conflict'"
)
# How long opening waits for other connections (busy_timeout, and the switch to WAL).
_LOCK_WAIT = 10.0
# The writer's connection checkpoints the WAL itself only past this many pages (SQLite's default
# is 1000, ~4 MiB): copying the WAL into the file and syncing it inside a commit held that
# batch's confirmations back. A background connection checkpoints every `checkpoint_interval`
# instead; this stays as a bound should it fall behind.
_WRITER_AUTOCHECKPOINT = 16384
CHECKPOINT_INTERVAL = 1.0
# SQLite's default limit of host parameters per statement is 32766; stay well under it.
_CHUNK = 500
# What the writer remembers of the entities it committed (see `_Written`): at most this many,
# holding at most this much JSON text.
WRITTEN_MAX_ENTITIES = 50_000
WRITTEN_MAX_BYTES = 32 * 1024 * 1024


def _text(data: Any, text: str | None) -> str:
    """JSON text of `data`: `text` when it is known already."""
    return text if text is not None else compact_json(data)


def _statements(sql: str) -> list[str]:
    """The statements of a migration file, split where SQLite's own tokenizer says one ends:
    a semicolon inside a string, a comment or a trigger body does not end a statement."""
    statements, start = [], 0
    for end, char in enumerate(sql, 1):
        if char == ";" and sqlite3.complete_statement(sql[start:end]):
            statements.append(sql[start:end])
            start = end
    if sql[start:].strip():  # a last statement without its semicolon, or comments (a no-op)
        statements.append(sql[start:])
    return statements


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch the file to WAL. On a new file other connections may be switching it at the same
    moment, and SQLite answers that with an immediate SQLITE_BUSY that skips the busy handler,
    so wait here instead."""
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _checkpoint(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _begin_at_once(db: sqlite3.Connection) -> bool:
    """BEGIN IMMEDIATE without waiting: False when another connection holds the write lock."""
    waits = db.execute("PRAGMA busy_timeout").fetchone()[0]
    db.execute("PRAGMA busy_timeout=0")
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return False
        raise
    finally:
        db.execute(f"PRAGMA busy_timeout={int(waits)}")
    return True


def _rollback(db: sqlite3.Connection) -> None:
    """End a failed transaction, keeping the error that failed it (SQLite may have rolled back
    already, after an I/O error or a full disk)."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def conflict_to_json(conflict: Conflict) -> str:
    return compact_json(asdict(conflict.operation))


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def _by_keys(
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
    for chunk in _chunks(keys):
        marks = ",".join(["(" + ",".join("?" * width) + ")"] * len(chunk))
        rows += db.execute(
            f"SELECT {columns} FROM (VALUES {marks}) AS k CROSS JOIN {table} AS t ON {on}",
            [part for key in chunk for part in key],
        )
    return rows


class _Written:
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


class SQLiteStore:
    """The Store port on one SQLite file."""

    kind = "sqlite"

    def __init__(self, path: str, checkpoint_interval: float = CHECKPOINT_INTERVAL) -> None:
        self.path = path
        self.checkpoint_interval = checkpoint_interval
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._in_thread = 0  # calls submitted to the thread and not finished there yet
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._sessions = Coalesced(self._record_sessions)
        self._checkpointer: asyncio.Task[None] | None = None
        self._commits = 0  # commits since the last checkpoint began
        self._written = _Written(WRITTEN_MAX_ENTITIES, WRITTEN_MAX_BYTES)
        self._wal = WalSync(None if path == ":memory:" else f"{path}-wal")

    async def _submit(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the connection's thread; every failure of storage is StorageUnavailable."""
        try:
            return await asyncio.wrap_future(self._start(fn))
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"storage error: {exc}") from exc

    def _start(self, fn: Callable[[], T]) -> Future[T]:
        """Queue `fn` for the thread, counted until it has finished there (a caller that stops
        waiting does not stop the call)."""
        if self._closed:  # the executor is (being) shut down: it would raise RuntimeError
            raise StorageUnavailable("storage is closed")
        loop = asyncio.get_running_loop()
        job = self._executor.submit(fn)
        self._in_thread += 1
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._finished_in_thread))
        return job

    def _finished_in_thread(self) -> None:
        self._in_thread -= 1

    async def _connection_to_loop(self) -> threading.Event | None:
        """Wait until the event loop may use the connection: at once when the thread is idle,
        else when the calls queued before this one are done. The thread then waits, holding
        nothing, until the returned event is set; None when it had nothing to wait for."""
        if not self._in_thread:
            # Still a turn of the loop first: back-to-back commits would otherwise never let
            # the background checkpoint (or anything else) ask for the connection.
            await asyncio.sleep(0)
            if not self._in_thread:
                return None
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        done = threading.Event()

        def give() -> None:
            if not turn.done():
                turn.set_result(None)

        def hand_over() -> None:
            loop.call_soon_threadsafe(give)
            done.wait()

        self._start(hand_over)
        try:
            await turn
        except BaseException:
            done.set()
            raise
        return done

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` on the connection's thread. What it returns may rest on the commits made so
        far, so it is returned once they are on disk."""

        def call() -> T:
            if self._db is None:
                raise StorageUnavailable("storage is not open")
            return fn(self._db)

        self._wal.check()
        seen = self._wal.written
        result = await self._submit(call)
        await self._wal.durable(seen)
        return result

    async def open(self) -> None:
        def connect() -> None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=_LOCK_WAIT
            )
            try:
                _use_wal(db)
                # NORMAL: COMMIT writes the WAL and `WalSync` syncs it (SQLite itself syncs
                # around checkpoints and when the WAL starts over).
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(f"PRAGMA wal_autocheckpoint={_WRITER_AUTOCHECKPOINT}")
                db.execute("PRAGMA foreign_keys=ON")
                self._migrate(db)  # busy_timeout (from `timeout`) lets it wait for the others
                self._wal.sync_now()
            except BaseException:
                db.close()
                raise
            self._db = db

        await self._submit(connect)
        if self.path != ":memory:":
            self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="checkpoint")

    async def _checkpoint_loop(self) -> None:
        """Checkpoint the WAL beside the writer. The bulk of the work (copying the pages into
        the file and syncing it) runs on a connection and thread of its own (PASSIVE: it never
        waits for nor blocks the writer); then the writer's connection copies what was committed
        meanwhile, a few pages, so that the checkpoint is complete and the next commit writes
        the WAL from its start again (a writer that never stops would otherwise always be ahead
        of a checkpoint running beside it, and the WAL would only grow). Durability does not
        depend on checkpoints: every commit is synced in the WAL already."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-checkpoint")
        loop = asyncio.get_running_loop()
        db: sqlite3.Connection | None = None
        try:
            while True:
                await asyncio.sleep(self.checkpoint_interval)
                if not self._commits:
                    continue
                self._commits = 0
                try:
                    if db is None:
                        db = await loop.run_in_executor(executor, self._checkpoint_connection)
                    await loop.run_in_executor(executor, _checkpoint, db)
                    await self._run(_checkpoint)
                except (sqlite3.Error, OSError, StorageUnavailable) as exc:
                    log.warning("background checkpoint failed: %s", exc)
        finally:
            if db is not None:
                executor.submit(db.close)
            # Closed before the store says it is: the file may be replaced right after.
            await asyncio.to_thread(executor.shutdown)

    def _checkpoint_connection(self) -> sqlite3.Connection:
        return sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=_LOCK_WAIT
        )

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
        done = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
        for version, sql in migrations("sqlite"):
            if version in done:
                continue
            db.execute("BEGIN IMMEDIATE")
            try:
                # Asked again under the write lock: another process (a second worker, `migrate`
                # beside `serve`) may have applied it since.
                applied = db.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
                ).fetchone()
                if applied is None:
                    for statement in _statements(sql):
                        db.execute(statement)
                    db.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise

    async def close(self) -> None:
        """Close the connection once the calls already queued have run; closing twice is fine.
        Later calls raise StorageUnavailable (ping says False)."""
        if self._closed:
            return
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        try:
            await self._submit(shut)
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)  # idle by now: `shut` was the last job
            await self._wal.close()

    async def ping(self) -> bool:
        try:
            return await self._run(lambda db: db.execute("SELECT 1").fetchone() == (1,))
        except StorageUnavailable:
            return False

    async def commit(self, request: BatchRequest, decide: Decide[T]) -> T:
        def transact(db: sqlite3.Connection) -> T:
            # BEGIN IMMEDIATE (by the caller): the write lock is held from the first read, so
            # what the engine decides on cannot change under it, even with another process on
            # the file.
            try:
                self._written.check(db)
                state = self._read_batch(db, request, self._written)
                result, write = decide(state)
                self._write_batch(db, write)
                db.execute("COMMIT")
            except BaseException:
                self._written.clear()
                _rollback(db)
                raise
            self._written.keep(write)
            self._commits += 1
            return result

        def wait_and_transact(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            result = transact(db)
            self._wal.sync_now()
            return result

        handed = await self._connection_to_loop()
        try:
            self._wal.check()
            if self._closed or self._db is None:
                raise StorageUnavailable("storage is closed" if self._closed else "not open")
            if not _begin_at_once(self._db):
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
        return result

    @staticmethod
    def _read_batch(db: sqlite3.Connection, request: BatchRequest, written: _Written) -> BatchState:
        known: dict[OpKey, OpRecord] = {}
        for row in _by_keys(
            db, OP_COLUMNS, "sync_operations", ("store_id", "id"), request.operation_keys
        ):
            record = op_record_from_row(row)
            known[record.op_key] = record
        conflicts: dict[ConflictKey, Conflict] = {}
        columns = "id, operation, server_version, server_data, created_at"
        conflict_keys = conflicts_to_read(request, known)
        for row in _by_keys(db, columns, "conflicts", ("store_id", "id"), conflict_keys):
            conflict = conflict_from_row(row)
            conflicts[conflict.key] = conflict
        keys = set(request.entity_keys) | {c.operation.key for c in conflicts.values()}
        entities, missing = written.entities(keys)
        entity_key_columns = ("store_id", "entity_type", "entity_id")
        triples = [(k.store_id, k.entity_type, k.entity_id) for k in missing]
        for row in _by_keys(db, ENTITY_COLUMNS, "entities", entity_key_columns, triples):
            entity = entity_from_row(row)
            entities[entity.key] = entity
        known_seqs, stores = written.seqs(set(request.store_ids) | {k.store_id for k in keys})
        last_seqs = dict.fromkeys(stores, 0)
        last_seqs.update(known_seqs)
        for chunk in _chunks(sorted(stores)):
            marks = ",".join("?" * len(chunk))
            last_seqs.update(
                db.execute(
                    f"SELECT store_id, last_seq FROM store_seqs WHERE store_id IN ({marks})", chunk
                )
            )
        return BatchState(known, entities, conflicts, last_seqs)

    @staticmethod
    def _write_batch(db: sqlite3.Connection, write: BatchWrite) -> None:
        db.executemany(
            f"INSERT INTO entities ({ENTITY_COLUMNS}) "
            # The engine's server time of the write (what the cache and the HTTP read show);
            # an entity written without one (tests, tools) gets the database's clock.
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "coalesce(nullif(?, ''), strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))) "
            "ON CONFLICT (store_id, entity_type, entity_id) DO UPDATE SET "
            "version = excluded.version, data = excluded.data, deleted = excluded.deleted, "
            "timestamp = excluded.timestamp, updated_by = excluded.updated_by, "
            "field_versions = excluded.field_versions, updated_at = excluded.updated_at",
            [
                (
                    e.key.store_id,
                    e.key.entity_type,
                    e.key.entity_id,
                    e.version,
                    _text(e.data, e.data_json),
                    int(e.deleted),
                    e.timestamp,
                    e.updated_by,
                    compact_json(e.field_versions),
                    e.updated_at,
                )
                for e in write.entities
            ],
        )
        # The log is append-only: an id the store already logged, or a seq another operation
        # holds, fails the transaction (never INSERT OR REPLACE, never an upsert).
        db.executemany(
            f"INSERT INTO sync_operations ({OP_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [op_values(r, _text) for r in write.op_records],
        )
        for r in write.settled_records:
            # A resolution replaces the row its pending conflict left, and nothing else.
            row = op_values(r, _text)
            cursor = db.execute(_SETTLE, (*row[2:], r.id, r.store_id))
            if cursor.rowcount != 1:
                raise StorageUnavailable(
                    f"operation {r.id!r} of {r.store_id} is no pending conflict any more; retry"
                )
        db.executemany(
            f"INSERT INTO audit_logs_master ({AUDIT_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [audit_values(a, str, str) for a in write.audit],
        )
        db.executemany(
            "INSERT INTO conflicts (id, store_id, operation_id, operation, server_version, "
            "server_data, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    c.id,
                    c.operation.store_id,
                    c.operation.id,
                    conflict_to_json(c),
                    c.server_version,
                    compact_json(c.server_data),
                    c.created_at,
                )
                for c in write.new_conflicts
            ],
        )
        db.executemany(
            "DELETE FROM conflicts WHERE store_id = ? AND id = ?", write.settled_conflicts
        )
        db.executemany(
            "INSERT INTO store_seqs (store_id, last_seq) VALUES (?, ?) "
            "ON CONFLICT (store_id) DO UPDATE SET last_seq = excluded.last_seq",
            list(write.last_seqs.items()),
        )

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
            rows = _by_keys(db, "t.store_id, t.id", "sync_operations", ("store_id", "id"), keys)
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
                _rollback(db)
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
                _rollback(db)
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
                _rollback(db)
                raise
            self._wal.sync_now()
            return deleted

        count = await self._run(prune)
        log.info("pruned %d operation-log rows older than %s", count, cutoff)

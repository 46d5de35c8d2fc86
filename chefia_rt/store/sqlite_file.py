"""The connection to one SQLite file, shared by the event loop and one thread.

One connection serves every call, one call at a time. Reads and the occasional writes run in
one dedicated thread; a batch's commit runs on the event loop itself. That is the hot path, and
in a thread it would hand the interpreter lock back and forth with the event loop at every
statement, each hand-off waiting up to the switch interval while the loop is busy: the commit's
wall time, and so every confirmation's latency, would grow with the load of the loop. On the loop
a batch costs its CPU time and nothing more. A commit that would have to wait for another process
holding the write lock goes to the thread instead, where waiting blocks nothing.

A commit is durable before `commit` returns, so a confirmation sent after it survives `kill -9`
and power loss: the WAL is synced after each commit, in a thread of its own, by one sync for
every commit made meanwhile (see `wal.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from chefia_rt.errors import StorageUnavailable
from chefia_rt.store.rows import (
    migrations,
)
from chefia_rt.store.wal import WalSync

T = TypeVar("T")
log = logging.getLogger("chefia_rt.store.sqlite")

# How long opening waits for other connections (busy_timeout, and the switch to WAL).
_LOCK_WAIT = 10.0
# The writer's connection checkpoints the WAL itself only past this many pages (SQLite's default
# is 1000, ~4 MiB): copying the WAL into the file and syncing it inside a commit held that
# batch's confirmations back. A background connection checkpoints every `checkpoint_interval`
# instead; this stays as a bound should it fall behind.
_WRITER_AUTOCHECKPOINT = 16384
CHECKPOINT_INTERVAL = 1.0


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


def rollback(db: sqlite3.Connection) -> None:
    """End a failed transaction, keeping the error that failed it (SQLite may have rolled back
    already, after an I/O error or a full disk)."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


class SQLiteFile:
    """The writer's connection to one SQLite file: opened and migrated, checkpointed in the
    background, and lent to the event loop or to its thread one call at a time."""

    def __init__(self, path: str, checkpoint_interval: float = CHECKPOINT_INTERVAL) -> None:
        self.path = path
        self.checkpoint_interval = checkpoint_interval
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._in_thread = 0  # calls submitted to the thread and not finished there yet
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._checkpointer: asyncio.Task[None] | None = None
        self._commits = 0  # commits since the last checkpoint began
        self._wal = WalSync(None if path == ":memory:" else f"{path}-wal")
        # How long a call in the thread waits for another process's write lock (busy_timeout);
        # a commit on the event loop never waits. The connection keeps the setting of whoever
        # used it last, so a run of commits on the loop costs no PRAGMA.
        self.lock_wait = _LOCK_WAIT
        self._waits = True

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

    def _waiting(self, db: sqlite3.Connection, waits: bool) -> None:
        """busy_timeout for the next user of the connection: the thread (True) or the loop."""
        if waits != self._waits:
            db.execute(f"PRAGMA busy_timeout={int(self.lock_wait * 1000) if waits else 0}")
            self._waits = waits

    def _begin_at_once(self, db: sqlite3.Connection) -> bool:
        """BEGIN IMMEDIATE without waiting: False when another connection holds the write lock."""
        self._waiting(db, False)
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return False
            raise
        return True

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` on the connection's thread. What it returns may rest on the commits made so
        far, so it is returned once they are on disk."""

        def call() -> T:
            if self._db is None:
                raise StorageUnavailable("storage is not open")
            self._waiting(self._db, True)
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
                self.path, isolation_level=None, check_same_thread=False, timeout=self.lock_wait
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
                rollback(db)
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

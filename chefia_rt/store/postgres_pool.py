"""The PostgreSQL connection pool under `PostgresStore` (`postgres.py`): opening it and the schema
migrations, running one call on a pooled connection with storage failures turned into
StorageUnavailable (a read repeated once when its connection turns out dead), and closing it only
after the calls in flight have finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from chefia_rt.errors import StorageUnavailable
from chefia_rt.store.postgres_batch import jsonb_decode, jsonb_encode
from chefia_rt.store.rows import migrations

log = logging.getLogger("chefia_rt.store.postgres")
T = TypeVar("T")

MIGRATION_LOCK = 0x636865666961  # "chefia": one advisory lock id for schema changes
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.QueryCanceledError,
    # Any error the server reports means the transaction rolled back: nothing was written.
    asyncpg.PostgresError,
    # A connection cut mid-query can leave asyncpg's protocol in a state it reports with this
    # (not an InterfaceError): "cannot switch to state 15; another operation (2) is in progress".
    asyncpg.InternalClientError,
)
# The connection died under the call (a PostgreSQL restart, pg_terminate_backend, a pooler or
# firewall dropping idle connections), which says nothing about the database itself.
_LOST = (
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary jsonb (version byte + text) so that COPY, which is binary, can carry it too.
    await conn.set_type_codec(
        "jsonb", encoder=jsonb_encode, decoder=jsonb_decode, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Reset a connection given back to the pool: nothing beyond asyncpg's own rollback.

    asyncpg rolls back an open transaction before calling this either way. Its default reset
    adds a round trip per release (unlock advisory locks, close cursors, UNLISTEN, RESET ALL)
    for session state this store never leaves behind: its advisory locks are per transaction,
    it declares no cursors outside one and never LISTENs or SETs. The rush-hour profile put that
    round trip at 3% of a worker's CPU (and PostgreSQL's share on top).
    """


def _unavailable(exc: BaseException) -> StorageUnavailable:
    return StorageUnavailable(f"PostgreSQL unavailable: {type(exc).__name__}")


async def _release(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    """Give a connection back; a connection that cannot be reset is dropped, never reported.

    With `async with pool.acquire()`, an error of the release (asyncpg resets the connection
    there) replaced the call's outcome: a batch already committed was answered 1013 "nothing
    written" and not pushed, and a lost connection surfaced as asyncpg's InternalClientError
    instead of StorageUnavailable. asyncpg terminates such a connection itself, and the next
    acquire opens a new one, so the outcome of the work stands.
    """
    try:
        await pool.release(conn)
    except Exception as exc:
        log.info("dropped a PostgreSQL connection that could not be reset: %r", exc)


class PostgresPool:
    """A pool of connections to one database, migrated when opened; `PostgresStore` runs its
    queries through `_with`."""

    def __init__(
        self, dsn: str, *, min_size: int = 1, max_size: int = 8, command_timeout: float = 10.0
    ) -> None:
        self.dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._in_flight = 0
        self._drained = asyncio.Event()

    async def _with(
        self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, read_only: bool = False
    ) -> T:
        """Run `fn` on a pooled connection; storage failures become StorageUnavailable.

        `read_only` calls are repeated once on a fresh connection when the first one turns out
        to be dead: after a PostgreSQL restart or a pg_terminate_backend the pool still holds
        connections that fail on first use although the database answers again, and a failed
        read costs a terminal its connection (a hub catch-up that fails closes with 1013).
        Writes are never repeated here: the node answers 1013 and the terminal retries the
        same ids, which the operation log makes safe.
        """
        pool = self._pool
        if pool is None:
            raise StorageUnavailable("storage is closed")
        self._in_flight += 1
        try:
            for attempt in (1, 2):
                try:
                    conn = await pool.acquire(timeout=self._command_timeout)
                except _UNAVAILABLE as exc:
                    raise _unavailable(exc) from exc
                try:
                    return await fn(conn)
                except _LOST as exc:
                    if not (read_only and attempt == 1):
                        raise _unavailable(exc) from exc
                    log.info("PostgreSQL connection lost (%s); reading again", type(exc).__name__)
                except _UNAVAILABLE as exc:
                    raise _unavailable(exc) from exc
                finally:
                    await _release(pool, conn)
            raise AssertionError("unreachable: the second attempt returns or raises")
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._drained.set()

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                command_timeout=self._command_timeout,
                init=_init_connection,
                reset=_keep_session,
            )
        except _UNAVAILABLE as exc:
            raise StorageUnavailable(f"cannot reach PostgreSQL: {exc}") from exc
        await self._with(self._migrate)

    @staticmethod
    async def _migrate(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, sql in migrations("postgres"):
                if version not in done:
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version) VALUES ($1)", version
                    )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None  # no new calls from here on
            if self._in_flight:
                # Calls already made finish first (a commit in flight is answered, not lost).
                self._drained.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained.wait(), self._command_timeout)
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:
                pool.terminate()

    async def ping(self) -> bool:
        try:
            return bool(
                await self._with(lambda c: c.fetchval("SELECT 1", timeout=2), read_only=True)
            )
        except StorageUnavailable:
            return False

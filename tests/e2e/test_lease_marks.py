"""End to end on PostgreSQL: locks (docs/protocol.md §8) checked through lease marks
(docs/architecture.md §3.12). Every grant is marked in storage before it is answered, and
a batch asks the bus only for the leases of the entities its transaction read as marked."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
import pytest

from chefia_rt.domain import EntityKey
from chefia_rt.errors import Code, StorageUnavailable
from chefia_rt.sync.locks import Lease
from tests.e2e.test_locks import acquire
from tests.e2e.test_sync_flow import (  # noqa: F401  (wire_checks: autouse fixture)
    confirmed,
    quiet,
    sync,
    wire_checks,
)
from tests.helpers import RunningServer, op, running_server
from tests.services import drop_pg_schema, new_pg_schema


@pytest.fixture
async def pg(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, str]]:
    dsn = await new_pg_schema()
    try:
        async with running_server(tmp_path, database_url=dsn) as server:
            yield server, dsn
    finally:
        await drop_pg_schema(dsn)


def lease_reads(server: RunningServer) -> list[list[EntityKey]]:
    """The keys of every lease read the writer asks the bus for, from now on."""
    bus = server.worker.bus
    reads: list[list[EntityKey]] = []
    get_leases = bus.get_leases

    async def counted(keys: Sequence[EntityKey]) -> list[Lease | None]:
        reads.append(list(keys))
        return await get_leases(keys)

    bus.get_leases = counted  # type: ignore[method-assign]
    return reads


async def test_writes_to_entities_nobody_locked_read_no_lease(
    pg: tuple[RunningServer, str],
) -> None:
    server, _ = pg
    reads = lease_reads(server)
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        await sync(a, [b], op("c1", "t1", {"n": 1}, operation="CREATE"))
        await sync(b, [a], op("c2", "t2", {"n": 1}, operation="CREATE"))
        bulk = {"updates": [{"entity_id": e, "data": {"n": 2}, "version": 2} for e in ("t1", "t2")]}
        await sync(a, [b], op("u1", "tX", bulk, operation="BULK_UPDATE"))
        assert reads == []
        # Once t1 is locked, a write of it reads t1's lease, and only t1's.
        await b.send(acquire("t1", entity_type="tables"))
        await b.expect("lock_acquired")
        bulk = {"updates": [{"entity_id": e, "data": {"n": 3}, "version": 3} for e in ("t1", "t2")]}
        await sync(b, [a], op("u2", "tX", bulk, operation="BULK_UPDATE"))
        await sync(a, [b], op("u3", "t2", {"n": 4}, version=4))
        assert reads == [[EntityKey("s1", "tables", "t1")]]
        await quiet(a, b)


async def test_a_grant_that_cannot_be_marked_is_not_granted(
    pg: tuple[RunningServer, str],
) -> None:
    """Storage refuses the mark: the terminal is answered 1013 (retry), and the lock binds
    nobody, although the bus holds its lease; the retry is granted, marked, and binds."""
    server, dsn = pg
    conn = await asyncpg.connect(dsn)
    try:
        async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
            await sync(a, [b], op("c1", "t1", {"n": 1}, operation="CREATE"))
            await conn.execute("ALTER TABLE lease_marks RENAME TO lease_marks_away")
            await a.send(acquire("t1", "tables"))
            error = await a.expect("error")
            assert error["code"] == Code.TRY_AGAIN_LATER, error
            await conn.execute("ALTER TABLE lease_marks_away RENAME TO lease_marks")
            await sync(b, [a], op("b1", "t1", {"n": 2}, version=2))
            await a.send(acquire("t1", "tables"))
            await a.expect("lock_acquired")
            await b.send(op("b2", "t1", {"n": 3}, version=3))
            refused = await b.expect("sync_error")
            assert (refused["operation_id"], refused["code"]) == ("b2", Code.LOCKED), refused
            await quiet(a, b)
    finally:
        await conn.close()


async def test_leases_that_cannot_be_read_stop_only_writes_to_locked_entities(
    pg: tuple[RunningServer, str],
) -> None:
    """The bus cannot answer lease reads (Redis down): a write to an entity someone locked is
    refused 1013 (retry), never let past the lock; a write to one nobody locked needs no lease
    and is confirmed."""
    server, _ = pg
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        for entity_id in ("t1", "t2"):
            await sync(a, [b], op(f"c-{entity_id}", entity_id, {"n": 1}, operation="CREATE"))
        await b.send(acquire("t1", "tables"))
        await b.expect("lock_acquired")

        async def unreachable(keys: Sequence[EntityKey]) -> list[Lease | None]:
            raise StorageUnavailable("lock service unavailable: test")

        server.worker.bus.get_leases = unreachable  # type: ignore[method-assign]
        await a.send(op("u1", "t1", {"n": 2}, version=2))
        refused = await a.expect("sync_error")
        assert (refused["operation_id"], refused["code"]) == ("u1", Code.TRY_AGAIN_LATER)
        await sync(a, [b], op("u2", "t2", {"n": 2}, version=2))
        await quiet(a, b)

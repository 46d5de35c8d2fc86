"""End to end: a client clock far ahead cannot win conflicts forever (CLOCK_SKEW_MAX).

A timestamp later than server time + the skew is not trusted: the write counts as made when it
arrived, so an honest terminal's later write from a stale base wins again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chefia_rt.domain import EntityKey
from chefia_rt.protocol import messages as m
from tests.e2e.test_conflicts import lock, raise_conflict
from tests.e2e.test_sync_flow import (  # noqa: F401  (wire_checks: autouse fixture)
    confirmed,
    pushed,
    quiet,
    sync,
    wire_checks,
)
from tests.helpers import RunningServer, op, running_server
from tests.services import drop_pg_schema, new_pg_schema

FAR_FUTURE = "9999-12-31T23:59:59.000Z"


@pytest.fixture(params=["sqlite", "postgresql"])
async def no_skew(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A server that trusts no client clock ahead of its own (CLOCK_SKEW_MAX=0): a
    timestamp in the future counts as the moment the server received the write."""
    if request.param == "sqlite":
        async with running_server(tmp_path, clock_skew_max=0) as running:
            yield running
        return
    dsn = await new_pg_schema()
    try:
        async with running_server(tmp_path, database_url=dsn, clock_skew_max=0) as running:
            yield running
    finally:
        await drop_pg_schema(dsn)


def now() -> str:
    """An honest client clock (the test shares the server's)."""
    return m.utc_now_iso()


async def test_far_future_update_does_not_win_over_a_later_stale_delete(
    no_skew: RunningServer,
) -> None:
    async with (
        no_skew.terminal("pos-a") as a,
        no_skew.terminal("pos-b", encoding="msgpack") as b,
    ):
        await sync(a, [b], op("c1", "t1", {"status": "free"}, operation="CREATE", timestamp=now()))
        # a's clock is wrong by millennia; its write is applied as usual, but counts as when
        # the server got it, not as year 9999 ...
        await sync(a, [b], op("a1", "t1", {"status": "busy"}, version=2, timestamp=FAR_FUTURE))
        # ... so b, still at base 1, deleting the table afterwards is the later write and wins.
        conf, push = await sync(
            b, [a], op("b1", "t1", operation="DELETE", version=2, timestamp=now())
        )
        assert (conf["status"], conf["conflict_resolved"], conf["version"]) == ("applied", True, 3)
        assert push["deleted"] is True

        # The same from another stale base: an UPDATE after a far-future UPDATE.
        await sync(a, [b], op("c2", "t2", {"seats": 4}, operation="CREATE", timestamp=now()))
        await sync(a, [b], op("a2", "t2", {"seats": 8}, version=2, timestamp=FAR_FUTURE))
        conf, push = await sync(b, [a], op("b2", "t2", {"seats": 2}, version=2, timestamp=now()))
        assert (conf["status"], conf["version"]) == ("applied", 3)
        assert push["data"] == {"seats": 2}
        await quiet(a, b)


async def test_far_future_product_field_does_not_win_over_a_later_stale_write(
    no_skew: RunningServer,
) -> None:
    """products merge field by field (merge_changes): the later write wins the same field."""
    async with no_skew.terminal("pos-a") as a, no_skew.terminal("pos-b") as b:
        create = op(
            "c1", "p1", {"price": 10, "name": "tea"}, entity_type="products", operation="CREATE"
        )
        await sync(a, [b], create)
        await sync(
            a,
            [b],
            op("a1", "p1", {"price": 99}, entity_type="products", version=2, timestamp=FAR_FUTURE),
        )
        conf, push = await sync(
            b,
            [a],
            op("b1", "p1", {"price": 12}, entity_type="products", version=2, timestamp=now()),
            status="merged",
        )
        assert (conf["version"], conf["conflict_resolved"]) == (3, True)
        assert push["data"] == {"price": 12, "name": "tea"}
        await quiet(a, b)


async def test_a_far_future_timestamp_counts_as_server_time(server: RunningServer) -> None:
    """With the default CLOCK_SKEW_MAX (300 s), a write and a manual conflict's resolution
    stamped year 9999 are stored (and pushed) as stamped at server time; one 60 s ahead, within
    the bound, keeps its own time."""
    assert server.settings.clock_skew_max == 300

    def bound(server_time: str) -> str:
        return server_time  # the answer's server time: after the write arrived

    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        await sync(a, [b], op("c1", "t1", {"status": "free"}, operation="CREATE"))
        _, push = await sync(
            a, [b], op("a1", "t1", {"status": "busy"}, version=2, timestamp=FAR_FUTURE)
        )
        assert push["timestamp"] <= bound(push["server_time"])
        stored = await server.worker.store.get_entity(EntityKey("s1", "tables", "t1"))
        assert stored is not None
        assert stored.timestamp <= bound(push["server_time"])

        # A manual conflict settled by a resolution stamped year 9999.
        await sync(
            a,
            [b],
            op("c2", "co1", {"amount": 1}, entity_type="cashier_operations", operation="CREATE"),
        )
        await lock(a, "cashier_operations", "co1")
        conflict = await raise_conflict(a, "x1", {"amount": 2}, 1, 1)
        await a.send(
            {
                "type": "conflict_resolution",
                "conflict_id": conflict["conflict_id"],
                "resolution": "merge",
                "resolved_data": {"amount": 3},
                "timestamp": FAR_FUTURE,
            }
        )
        conf = await confirmed(a, "x1", "resolved")
        push_of_resolution = await pushed(b, "x1")
        assert push_of_resolution["data"] == {"amount": 3}
        stored = await server.worker.store.get_entity(EntityKey("s1", "cashier_operations", "co1"))
        assert stored is not None and stored.version == conf["version"]
        latest = bound(conf["server_time"])
        assert stored.timestamp <= latest
        assert all(str(when) <= latest for _, when in stored.field_versions.values())

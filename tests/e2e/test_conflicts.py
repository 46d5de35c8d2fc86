"""End to end: every conflict policy of docs/protocol.md §7.3 over the wire, and manual
resolution."""

from __future__ import annotations

from typing import Any

import pytest

from chefia_rt.errors import Code
from tests.e2e.test_sync_flow import (  # noqa: F401  (wire_checks: autouse fixture)
    ENCODINGS,
    confirmed,
    other,
    pushed,
    quiet,
    sync,
    ts,
    wire_checks,
)
from tests.helpers import RunningServer, Terminal, op


async def lock(terminal: Terminal, entity_type: str, entity_id: str) -> None:
    await terminal.send(
        {"type": "acquire_lock", "entity_type": entity_type, "entity_id": entity_id}
    )
    await terminal.expect("lock_acquired")


async def unlock(terminal: Terminal, entity_type: str, entity_id: str) -> None:
    await terminal.send(
        {"type": "release_lock", "entity_type": entity_type, "entity_id": entity_id}
    )
    await terminal.expect("lock_released")


# ---- last_write_wins -----------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_tables_last_write_wins(server: RunningServer, encoding: str) -> None:
    async with (
        server.terminal("pos-a", encoding=encoding) as a,
        server.terminal("pos-b", encoding=other(encoding)) as b,
        server.terminal("kds-c", type="kds") as c,
    ):
        await sync(
            a,
            [b, c],
            op("c1", "t1", {"status": "free", "seats": 4}, operation="CREATE", timestamp=ts(0)),
        )
        await sync(a, [b, c], op("a1", "t1", {"status": "busy"}, version=2, timestamp=ts(5)))

        # b, still at base 1, writes later: it wins whole, a new version, pushed in full.
        conf, push = await sync(
            b, [a, c], op("b1", "t1", {"seats": 6}, version=2, timestamp=ts(10))
        )
        assert (conf["seq"], conf["version"], conf["conflict_resolved"]) == (3, 3, True)
        assert conf["status"] == "applied"
        assert push["data"] == {"status": "busy", "seats": 6}
        assert push["version"] == 3

        # b at a stale base with an earlier timestamp loses: `resolved`, the unchanged server
        # version, seq null, and nobody hears of it.
        await b.send(op("b2", "t1", {"status": "dirty"}, version=2, timestamp=ts(1)))
        lost = await confirmed(b, "b2", "resolved")
        assert (lost["seq"], lost["version"], lost["conflict_resolved"]) == (None, 3, True)
        assert (lost["entity_type"], lost["entity_id"]) == ("tables", "t1")
        await quiet(a, b, c)

        # A tie on the timestamp goes to the later arrival.
        conf, push = await sync(
            a, [b, c], op("a2", "t1", {"status": "closed"}, version=3, timestamp=ts(10))
        )
        assert (conf["seq"], conf["version"], conf["conflict_resolved"]) == (4, 4, True)
        assert push["data"] == {"status": "closed", "seats": 6}

        # The loser's retry is a duplicate of its `resolved` answer.
        await b.send(op("b2", "t1", {"status": "dirty"}, version=2, timestamp=ts(1)))
        again = await confirmed(b, "b2", "duplicate")
        assert (again["seq"], again["version"]) == (None, 3)
        await quiet(a, b, c)


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_orders_last_write_wins_under_locks(server: RunningServer, encoding: str) -> None:
    """Orders need the lock for UPDATE/DELETE; a stale write still goes by timestamp."""
    async with (
        server.terminal("pos-a", encoding=encoding) as a,
        server.terminal("pos-b", encoding=other(encoding)) as b,
    ):
        await sync(
            a,
            [b],
            op(
                "c1",
                "o1",
                {"status": "open", "items": []},
                entity_type="orders",
                operation="CREATE",
                timestamp=ts(0),
            ),
        )
        await lock(a, "orders", "o1")
        await sync(
            a,
            [b],
            op(
                "a1",
                "o1",
                {"status": "preparing"},
                entity_type="orders",
                version=2,
                timestamp=ts(5),
            ),
        )
        await unlock(a, "orders", "o1")

        await lock(b, "orders", "o1")
        # b's write from base 1 (made offline) is older than a's: it loses.
        await b.send(
            op("b1", "o1", {"status": "void"}, entity_type="orders", version=2, timestamp=ts(3))
        )
        lost = await confirmed(b, "b1", "resolved")
        assert (lost["seq"], lost["version"]) == (None, 2)
        await quiet(a, b)
        # b's newer write from base 1 wins whole.
        conf, push = await sync(
            b,
            [a],
            op(
                "b2",
                "o1",
                {"items": [{"sku": "x"}]},
                entity_type="orders",
                version=2,
                timestamp=ts(8),
                requires_lock=True,
                priority="high",
            ),
        )
        assert (conf["seq"], conf["version"], conf["conflict_resolved"]) == (3, 3, True)
        assert push["data"] == {"status": "preparing", "items": [{"sku": "x"}]}
        # A stale DELETE with a later timestamp wins too: a tombstone.
        conf, push = await sync(
            b,
            [a],
            op("b3", "o1", entity_type="orders", operation="DELETE", version=2, timestamp=ts(9)),
        )
        assert conf["version"] == 4 and push["deleted"] is True and push["data"] == {}
        # An UPDATE after a DELETE is a conflict: the older one loses against the tombstone.
        await b.send(
            op("b4", "o1", {"status": "open"}, entity_type="orders", version=4, timestamp=ts(7))
        )
        lost = await confirmed(b, "b4", "resolved")
        assert (lost["seq"], lost["version"]) == (None, 4)
        await quiet(a, b)


# ---- merge policies ------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_products_merge_changes(server: RunningServer, encoding: str) -> None:
    async with (
        server.terminal("pos-a", encoding=encoding) as a,
        server.terminal("pos-b", encoding=other(encoding)) as b,
    ):
        await sync(
            a,
            [b],
            op(
                "c1",
                "p1",
                {"name": "Soup", "price": 10, "stock": 5},
                entity_type="products",
                operation="CREATE",
                timestamp=ts(0),
            ),
        )
        await sync(
            a,
            [b],
            op("a1", "p1", {"price": 12}, entity_type="products", version=2, timestamp=ts(10)),
        )
        # b from base 1: `name` is new to the server since then, merged; `price` was changed
        # on the server later than b's edit, so the server's price stays.
        conf, push = await sync(
            b,
            [a],
            op(
                "b1",
                "p1",
                {"name": "Soup of the day", "price": 11},
                entity_type="products",
                version=2,
                timestamp=ts(5),
            ),
            status="merged",
        )
        assert (conf["version"], conf["conflict_resolved"], conf["seq"]) == (3, True, 3)
        assert push["data"] == {"name": "Soup of the day", "price": 12, "stock": 5}
        assert push["version"] == 3
        # Same field, later timestamp: b wins the field.
        conf, push = await sync(
            b,
            [a],
            op("b2", "p1", {"price": 13}, entity_type="products", version=2, timestamp=ts(20)),
            status="merged",
        )
        assert push["data"] == {"name": "Soup of the day", "price": 13, "stock": 5}
        assert push["version"] == conf["version"] == 4
        # Only fields the server changed later: nothing to write, `resolved`, not pushed.
        await b.send(
            op("b3", "p1", {"price": 1}, entity_type="products", version=2, timestamp=ts(1))
        )
        lost = await confirmed(b, "b3", "resolved")
        assert (lost["seq"], lost["version"]) == (None, 4)
        await quiet(a, b)


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_customers_merge_non_conflicting(server: RunningServer, encoding: str) -> None:
    async with (
        server.terminal("pos-a", encoding=encoding) as a,
        server.terminal("waiter-b", type="waiter", encoding=other(encoding)) as b,
    ):
        await sync(
            a,
            [b],
            op(
                "c1",
                "cu1",
                {"name": "Ana", "phone": "1", "email": "a@x"},
                entity_type="customers",
                operation="CREATE",
            ),
        )
        await sync(
            a,
            [b],
            op("a1", "cu1", {"phone": "2"}, entity_type="customers", version=2, timestamp=ts(0)),
        )
        # Non-overlapping fields from base 1: merged.
        conf, push = await sync(
            b,
            [a],
            op(
                "b1", "cu1", {"email": "ana@x"}, entity_type="customers", version=2, timestamp=ts(1)
            ),
            status="merged",
        )
        assert (conf["version"], conf["conflict_resolved"]) == (3, True)
        assert push["data"] == {"name": "Ana", "phone": "2", "email": "ana@x"}
        # An overlapping field keeps the server value (even with a later timestamp); the
        # rest is merged and the op is reported `resolved`.
        conf, push = await sync(
            b,
            [a],
            op(
                "b2",
                "cu1",
                {"phone": "3", "name": "Ana Maria"},
                entity_type="customers",
                version=2,
                timestamp=ts(59),
            ),
            status="resolved",
        )
        assert (conf["version"], conf["seq"], conf["conflict_resolved"]) == (4, 4, True)
        assert push["data"] == {"name": "Ana Maria", "phone": "2", "email": "ana@x"}
        # Only overlapping fields: nothing changes, nothing is pushed.
        await b.send(
            op("b3", "cu1", {"phone": "9"}, entity_type="customers", version=2, timestamp=ts(59))
        )
        lost = await confirmed(b, "b3", "resolved")
        assert (lost["seq"], lost["version"]) == (None, 4)
        await quiet(a, b)


# ---- manual_resolution ---------------------------------------------------------------------


async def raise_conflict(
    sender: Terminal, op_id: str, data: dict[str, Any], version: int, server_version: int
) -> dict[str, Any]:
    await sender.send(op(op_id, "co1", data, entity_type="cashier_operations", version=version))
    conflict = await sender.expect("sync_conflict")
    assert conflict["operation_id"] == op_id
    assert conflict["conflict_id"]
    assert (conflict["entity_type"], conflict["entity_id"]) == ("cashier_operations", "co1")
    assert conflict["policy"] == "manual_resolution"
    assert conflict["local_data"] == data
    assert conflict["local_version"] == version
    assert conflict["server_version"] == server_version
    return conflict


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_cashier_operations_manual_resolution(server: RunningServer, encoding: str) -> None:
    async with (
        server.terminal("pos-a", encoding=encoding) as a,
        server.terminal("pos-b", encoding=other(encoding)) as b,
    ):
        await sync(
            a,
            [b],
            op(
                "c1",
                "co1",
                {"amount": 100, "kind": "open"},
                entity_type="cashier_operations",
                operation="CREATE",
            ),
        )
        await lock(a, "cashier_operations", "co1")

        # Nothing is applied; only the sender hears of it.
        conflict = await raise_conflict(a, "x1", {"amount": 120}, 1, 1)
        assert conflict["server_data"] == {"amount": 100, "kind": "open"}
        await quiet(a, b)
        # A retry of the same op is the same pending conflict.
        await a.send(op("x1", "co1", {"amount": 120}, entity_type="cashier_operations", version=1))
        again = await a.expect("sync_conflict")
        assert again["conflict_id"] == conflict["conflict_id"]

        # accept_remote: the server state stands, no new version, nothing pushed.
        await a.send(
            {
                "type": "conflict_resolution",
                "conflict_id": conflict["conflict_id"],
                "resolution": "accept_remote",
            }
        )
        conf = await confirmed(a, "x1", "resolved")
        assert (conf["seq"], conf["version"], conf["conflict_resolved"]) == (None, 1, True)
        assert (conf["entity_type"], conf["entity_id"]) == ("cashier_operations", "co1")
        await quiet(a, b)
        # Settled: resolving again fails with 4010, the op retried is a duplicate.
        await a.send(
            {
                "type": "conflict_resolution",
                "conflict_id": conflict["conflict_id"],
                "resolution": "accept_local",
            }
        )
        error = await a.expect("sync_error")
        assert error["code"] == Code.CONFLICT_RESOLUTION_FAILED
        await a.send(op("x1", "co1", {"amount": 120}, entity_type="cashier_operations", version=1))
        await confirmed(a, "x1", "duplicate")

        # accept_local: the op is applied (a patch), a new version, pushed in full.
        conflict = await raise_conflict(a, "x2", {"amount": 130}, 1, 1)
        await a.send(
            {
                "type": "conflict_resolution",
                "conflict_id": conflict["conflict_id"],
                "resolution": "accept_local",
            }
        )
        conf = await confirmed(a, "x2", "resolved")
        assert (conf["seq"], conf["version"], conf["conflict_resolved"]) == (2, 2, True)
        push = await pushed(b, "x2")
        assert push["data"] == {"amount": 130, "kind": "open"}
        assert (push["seq"], push["version"]) == (2, 2)

        # merge: resolved_data becomes the whole state.
        conflict = await raise_conflict(a, "x3", {"amount": 999}, 2, 2)
        assert conflict["server_data"] == {"amount": 130, "kind": "open"}
        merged = {"amount": 140, "kind": "open", "note": "merged by manager"}
        await a.send(
            {
                "type": "conflict_resolution",
                "conflict_id": conflict["conflict_id"],
                "resolution": "merge",
                "resolved_data": merged,
            }
        )
        conf = await confirmed(a, "x3", "resolved")
        assert (conf["seq"], conf["version"]) == (3, 3)
        push = await pushed(b, "x3")
        assert push["data"] == merged and push["version"] == 3

        # An op at the right version is simply applied.
        conf, push = await sync(
            a, [b], op("x4", "co1", {"amount": 150}, entity_type="cashier_operations", version=4)
        )
        assert push["data"] == {**merged, "amount": 150}

        # merge without resolved_data, and unknown conflict ids: 4010.
        conflict = await raise_conflict(a, "x5", {"amount": 1}, 2, 4)
        await a.send(
            {
                "type": "conflict_resolution",
                "conflict_id": conflict["conflict_id"],
                "resolution": "merge",
            }
        )
        error = await a.expect("sync_error")
        assert error["code"] == Code.CONFLICT_RESOLUTION_FAILED
        await a.send(
            {
                "type": "conflict_resolution",
                "conflict_id": "conflict:nope",
                "resolution": "accept_remote",
            }
        )
        error = await a.expect("sync_error")
        assert error["code"] == Code.CONFLICT_RESOLUTION_FAILED
        assert error["operation_id"] == "conflict:nope"
        await quiet(a, b)


async def test_manual_conflict_outlives_the_connection(server: RunningServer) -> None:
    """A pending conflict is stored: another terminal (or a reconnect) can settle it."""
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        await sync(
            a,
            [b],
            op("c1", "co1", {"amount": 100}, entity_type="cashier_operations", operation="CREATE"),
        )
        await lock(a, "cashier_operations", "co1")
        conflict = await raise_conflict(a, "x1", {"amount": 50}, 1, 1)
    async with (
        server.terminal("pos-b") as b,
        server.terminal("pos-c", encoding="msgpack") as c,
    ):
        await b.send(
            {
                "type": "conflict_resolution",
                "conflict_id": conflict["conflict_id"],
                "resolution": "accept_local",
            }
        )
        conf = await confirmed(b, "x1", "resolved")
        assert (conf["seq"], conf["version"]) == (2, 2)
        push = await pushed(c, "x1")
        assert push["data"] == {"amount": 50}
        await quiet(b, c)


async def test_cashier_operations_require_the_lock(server: RunningServer) -> None:
    async with server.terminal("pos-a") as a, server.terminal("kds-b", type="kds") as kds:
        await sync(
            a,
            [kds],
            op("c1", "co1", {"amount": 1}, entity_type="cashier_operations", operation="CREATE"),
        )
        await a.send(op("u1", "co1", {"amount": 2}, entity_type="cashier_operations", version=2))
        error = await a.expect("sync_error")
        assert error["code"] == Code.LOCKED and error["operation_id"] == "u1"
        # A kitchen display may not touch cashier operations at all.
        await kds.send(op("k1", "co1", {"amount": 3}, entity_type="cashier_operations", version=2))
        error = await kds.expect("sync_error")
        assert error["code"] == Code.PERMISSION_DENIED
        await kds.send(
            {
                "type": "conflict_resolution",
                "conflict_id": "conflict:x",
                "resolution": "accept_remote",
            }
        )
        error = await kds.expect("sync_error")
        assert error["code"] == Code.PERMISSION_DENIED
        await quiet(a, kds)

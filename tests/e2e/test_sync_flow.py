"""End to end: the data_sync flow over real WebSocket clients (docs/protocol.md §2-§9).

This module also holds the helpers the other e2e modules share: every message a test terminal
receives is validated against its server-to-client model (tests/helpers.py, `Terminal.recv`), and
every frame against its encoding's rules (`wire_checks`, autouse here and imported there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import lz4.frame
import msgpack
import pytest

from chefia_rt.errors import Code
from chefia_rt.protocol import messages as m
from chefia_rt.protocol.codec import COMPRESSED_PREFIX
from tests.helpers import DEFAULT_TIMEOUT, RunningServer, Terminal, op

ENCODINGS = ("json", "msgpack")


def check_frame(encoding: str, frame: str | bytes) -> None:
    """docs/protocol.md §3.1: a JSON client gets one plain object per text frame, never a batch; a
    msgpack client gets binary frames, maybe lz4 `compressed:`, maybe a well-formed
    message_batch."""
    if encoding == "json":
        assert isinstance(frame, str), "a JSON terminal must only get text frames"
        message = json.loads(frame)
        assert isinstance(message, dict), "every JSON frame is one object"
        assert message.get("type") != "message_batch", "JSON frames are never batched"
        return
    assert isinstance(frame, bytes), "a msgpack terminal must only get binary frames"
    if frame.startswith(COMPRESSED_PREFIX):
        frame = lz4.frame.decompress(frame[len(COMPRESSED_PREFIX) :])
    message = msgpack.unpackb(frame, raw=False)
    assert isinstance(message, dict)
    if message.get("type") == "message_batch":
        batch = m.MessageBatch.model_validate(message)
        assert batch.count == len(batch.messages) >= 1


@pytest.fixture(autouse=True)
def wire_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Validate every frame any test terminal receives (each message is validated against its
    model by `Terminal.recv` itself)."""
    original = Terminal.recv

    async def checked_recv(self: Terminal, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        seen = len(self.frames)
        message = await original(self, timeout)
        for frame in self.frames[seen:]:
            check_frame(self.encoding, frame)
        return message

    monkeypatch.setattr(Terminal, "recv", checked_recv)
    yield


@pytest.fixture(params=ENCODINGS)
def encoding(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def other(encoding: str) -> str:
    return "msgpack" if encoding == "json" else "json"


def ts(minute: int, second: int = 0) -> str:
    """A client timestamp on 2024-01-15 at 10:mm:ss."""
    return f"2024-01-15T10:{minute:02d}:{second:02d}.000Z"


def canonical(timestamp: str) -> str:
    return m.normalize_timestamp(timestamp)


async def receive(terminal: Terminal, count: int) -> list[dict[str, Any]]:
    """The next `count` messages, whatever they are."""
    return [await terminal.recv() for _ in range(count)]


async def confirmed(terminal: Terminal, op_id: str, status: str = "applied") -> dict[str, Any]:
    """The next message, which must be the confirmation of `op_id` with `status`."""
    msg = await terminal.expect("sync_confirmation")
    assert msg["operation_id"] == op_id, msg
    assert msg["status"] == status, msg
    return msg


async def pushed(terminal: Terminal, op_id: str) -> dict[str, Any]:
    """The next message, which must be the push of `op_id`; returns its operation."""
    msg = await terminal.expect("data_sync")
    assert msg["operation"]["id"] == op_id, msg
    return dict(msg["operation"])


async def pushed_to_all(terminals: list[Terminal], op_id: str) -> list[dict[str, Any]]:
    return [await pushed(t, op_id) for t in terminals]


async def sync(
    sender: Terminal,
    receivers: list[Terminal],
    message: dict[str, Any],
    status: str = "applied",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send one op; return its confirmation and the push every receiver got (all equal)."""
    await sender.send(message)
    op_id = message["operation"]["id"]
    confirmation = await confirmed(sender, op_id, status)
    pushes = await pushed_to_all(receivers, op_id)
    for p in pushes[1:]:
        assert p == pushes[0]
    return confirmation, pushes[0] if pushes else {}


async def quiet(*terminals: Terminal) -> None:
    """Assert that nothing is on its way to any of the terminals (`Terminal.nothing`)."""
    await asyncio.gather(*(t.nothing() for t in terminals))


# ---- connection ----------------------------------------------------------------------------


async def test_connection_established(server: RunningServer, encoding: str) -> None:
    async with server.terminal("pos-1", encoding=encoding) as a:
        hello = a.established
        assert hello["terminal_id"] == "pos-1"
        assert hello["terminal_type"] == "pos"
        assert hello["store_id"] == "s1"
        assert hello["encoding"] == encoding
        assert hello["last_seq"] == 0
        assert hello["session_id"]
        m.ConnectionEstablished.model_validate(hello)
        await a.send(op("c1", "t1", {"n": 1}, operation="CREATE"))
        await confirmed(a, "c1")
    async with server.terminal("pos-2", encoding=encoding, type="kds") as b:
        assert b.established["terminal_type"] == "kds"
        assert b.established["last_seq"] == 1


async def test_ping_pong(server: RunningServer, encoding: str) -> None:
    async with server.terminal("pos-1", encoding=encoding) as a, server.terminal("pos-2") as b:
        await a.send({"type": "ping", "timestamp": 1234})
        pong = await a.expect("pong")
        assert pong["server_time"].endswith("Z")
        assert pong["timestamp"] == 1234
        await quiet(a, b)


# ---- data_sync -----------------------------------------------------------------------------


async def test_create_update_delete_flow(server: RunningServer, encoding: str) -> None:
    """One confirmation per op to the sender (no echo), the full state to every other terminal
    of the store, nothing to another store."""
    async with (
        server.terminal("pos-a", encoding=encoding) as a,
        server.terminal("pos-b", encoding="json") as b,
        server.terminal("kds-c", encoding="msgpack", type="kds") as c,
        server.terminal("pos-x", store="s2", encoding=encoding) as x,
    ):
        receivers = [b, c]
        conf, push = await sync(
            a,
            receivers,
            op(
                "op-1",
                "t1",
                {"name": "T1", "seats": 4},
                operation="CREATE",
                timestamp=ts(1),
                user_id="u1",
                priority="high",
            ),
        )
        assert conf == {
            "type": "sync_confirmation",
            "operation_id": "op-1",
            "seq": 1,
            "version": 1,
            "status": "applied",
            "conflict_resolved": False,
            "entity_type": "tables",
            "entity_id": "t1",
            "server_time": conf["server_time"],
        }
        assert push["seq"] == 1 and push["version"] == 1
        assert push["operation"] == "CREATE"
        assert push["data"] == {"name": "T1", "seats": 4}
        assert push["deleted"] is False
        assert (push["entity_type"], push["entity_id"]) == ("tables", "t1")
        assert push["terminal_id"] == "pos-a"
        assert push["user_id"] == "u1"
        assert push["priority"] == "high"
        assert push["timestamp"] == canonical(ts(1))

        # An UPDATE's data is a patch; the push carries the full state.
        conf, push = await sync(a, receivers, op("op-2", "t1", {"seats": 6}, version=2))
        assert (conf["seq"], conf["version"]) == (2, 2)
        assert push["data"] == {"name": "T1", "seats": 6}
        assert (push["seq"], push["version"], push["operation"]) == (2, 2, "UPDATE")

        # An UPDATE of an unknown entity is an upsert.
        conf, push = await sync(a, receivers, op("op-3", "t2", {"name": "T2"}, version=1))
        assert (conf["seq"], conf["version"], conf["entity_id"]) == (3, 1, "t2")
        assert push["data"] == {"name": "T2"} and push["version"] == 1

        # A DELETE is a tombstone with a version.
        conf, push = await sync(a, receivers, op("op-4", "t1", operation="DELETE", version=3))
        assert (conf["seq"], conf["version"]) == (4, 3)
        assert push["deleted"] is True and push["data"] == {}
        assert (push["operation"], push["version"]) == ("DELETE", 3)

        # A DELETE of an unknown entity: 4007 to the sender, nothing to anyone.
        await a.send(op("op-5", "nope", operation="DELETE", version=1))
        error = await a.expect("sync_error")
        assert error["operation_id"] == "op-5"
        assert error["code"] == Code.ENTITY_NOT_FOUND
        assert (error["entity_type"], error["entity_id"]) == ("tables", "nope")
        assert error["error"]

        # Another store's seqs are its own, and it sees nothing of s1.
        await quiet(a, b, c, x)
        conf, _ = await sync(x, [], op("x-1", "t1", {"name": "X"}, operation="CREATE"))
        assert conf["seq"] == 1
        await quiet(a, b, c)
        conf, push = await sync(a, receivers, op("op-6", "t3", {"n": 1}, operation="CREATE"))
        assert conf["seq"] == push["seq"] == 5  # the failed op-5 took no seq
        await quiet(a, b, c, x)


async def test_bulk_update(server: RunningServer, encoding: str) -> None:
    """BULK_UPDATE: one seq, one confirmation, data.updates with every entity's full state."""
    async with (
        server.terminal("pos-a", encoding=encoding) as a,
        server.terminal("pos-b", encoding=other(encoding)) as b,
    ):
        await sync(a, [b], op("c1", "t1", {"name": "T1", "seats": 2}, operation="CREATE"))
        await sync(a, [b], op("c2", "t2", {"name": "T2", "seats": 4}, operation="CREATE"))
        bulk = op(
            "bulk-1",
            "t1",
            {
                "updates": [
                    {"entity_id": "t1", "data": {"seats": 3}, "version": 2},
                    {"entity_id": "t2", "data": {"status": "busy"}, "version": 2},
                    {"entity_id": "t3", "data": {"name": "T3"}, "version": 1},
                ]
            },
            operation="BULK_UPDATE",
        )
        conf, push = await sync(a, [b], bulk)
        assert conf["seq"] == push["seq"] == 3
        assert conf["conflict_resolved"] is False
        assert push["operation"] == "BULK_UPDATE"
        updates = {u["entity_id"]: u for u in push["data"]["updates"]}
        assert updates["t1"]["data"] == {"name": "T1", "seats": 3}
        assert updates["t1"]["version"] == 2
        assert updates["t2"]["data"] == {"name": "T2", "seats": 4, "status": "busy"}
        assert updates["t2"]["version"] == 2
        assert updates["t3"]["data"] == {"name": "T3"} and updates["t3"]["version"] == 1
        # The next op gets the next seq: the bulk took exactly one.
        conf, _ = await sync(a, [b], op("u1", "t1", {"seats": 5}, version=3))
        assert conf["seq"] == 4
        await quiet(a, b)


async def test_bulk_update_push_matches_its_model(server: RunningServer) -> None:
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        updates = [{"entity_id": "t1", "data": {"n": 1}, "version": 1}]
        await sync(a, [b], op("bulk-1", "t1", {"updates": updates}, operation="BULK_UPDATE"))


async def test_seqs_are_gapless_and_independent_per_store(
    server: RunningServer, encoding: str
) -> None:
    async with (
        server.terminal("a1", store="s1", encoding=encoding) as a1,
        server.terminal("a2", store="s1") as a2,
        server.terminal("b1", store="s2", encoding=encoding) as b1,
        server.terminal("b2", store="s2") as b2,
    ):
        for i in range(1, 6):
            conf_a, push_a = await sync(a1, [a2], op(f"a-{i}", f"t{i}", operation="CREATE"))
            conf_b, push_b = await sync(b1, [b2], op(f"b-{i}", f"t{i}", operation="CREATE"))
            assert conf_a["seq"] == push_a["seq"] == i
            assert conf_b["seq"] == push_b["seq"] == i
        await quiet(a1, a2, b1, b2)


async def test_concurrent_senders_see_every_op_once_in_seq_order(
    server: RunningServer, encoding: str
) -> None:
    """5 terminals x 40 ops fired without waiting: every terminal gets its 40 confirmations and
    the 160 ops of the others exactly once, in seq order, and the store's seqs are 1..200."""
    terminals, ops_each = 5, 40
    async with asyncio.TaskGroup() as tg:
        connects = [
            tg.create_task(server.connect(f"pos-{i}", encoding=encoding)) for i in range(terminals)
        ]
    clients = [c.result() for c in connects]
    try:

        async def fire(i: int, t: Terminal) -> None:
            for n in range(ops_each):
                kind = "CREATE" if n == 0 else "UPDATE"
                await t.send(op(f"p{i}-{n}", f"t{i}", {"n": n}, operation=kind, version=n + 1))

        async def take(t: Terminal) -> list[dict[str, Any]]:
            return await receive(t, ops_each * terminals)

        async with asyncio.TaskGroup() as tg:
            for i, t in enumerate(clients):
                tg.create_task(fire(i, t))
            receiving = [tg.create_task(take(t)) for t in clients]
        all_seqs: set[int] = set()
        for i, task in enumerate(receiving):
            messages = task.result()
            confirmations = [x for x in messages if x["type"] == "sync_confirmation"]
            pushes = [x["operation"] for x in messages if x["type"] == "data_sync"]
            assert len(confirmations) + len(pushes) == len(messages)
            assert [c["operation_id"] for c in confirmations] == [
                f"p{i}-{n}" for n in range(ops_each)
            ]
            assert all(c["status"] == "applied" for c in confirmations)
            assert [c["version"] for c in confirmations] == list(range(1, ops_each + 1))
            own = [c["seq"] for c in confirmations]
            assert own == sorted(own)
            seen = [p["seq"] for p in pushes]
            assert seen == sorted(seen) and len(set(seen)) == len(seen), "push order"
            assert {p["terminal_id"] for p in pushes} == {
                f"pos-{j}" for j in range(terminals) if j != i
            }
            assert sorted(own + seen) == list(range(1, terminals * ops_each + 1))
            for p in pushes:  # each pushed state is the sender's own sequence of versions
                assert p["data"] == {"n": p["version"] - 1}
            all_seqs.update(own)
        assert all_seqs == set(range(1, terminals * ops_each + 1))
        await quiet(*clients)
    finally:
        for c in clients:
            await c.close()


# ---- duplicates ----------------------------------------------------------------------------


async def test_duplicate_is_confirmed_again_not_pushed(
    server: RunningServer, encoding: str
) -> None:
    async with (
        server.terminal("pos-a", encoding=encoding) as a,
        server.terminal("pos-b", encoding=other(encoding)) as b,
    ):
        first, _ = await sync(a, [b], op("c1", "t1", {"n": 1}, operation="CREATE"))
        second, _ = await sync(a, [b], op("u1", "t1", {"n": 2}, version=2))
        # The same id again, even with other content: the original answer, `duplicate`.
        await a.send(op("u1", "t1", {"n": 99}, version=7))
        again = await confirmed(a, "u1", "duplicate")
        assert (again["seq"], again["version"]) == (second["seq"], second["version"])
        assert again["conflict_resolved"] is False
        await a.send(op("c1", "t1", {"n": 1}, operation="CREATE"))
        again = await confirmed(a, "c1", "duplicate")
        assert (again["seq"], again["version"]) == (first["seq"], first["version"])
        await quiet(a, b)
        # Another terminal reusing the id gets the same answer.
        await b.send(op("u1", "t1", {"n": 3}, version=3))
        again = await confirmed(b, "u1", "duplicate")
        assert again["seq"] == second["seq"]
        await quiet(a, b)
    # After a reconnect (the confirmation may have been lost with the connection).
    async with (
        server.terminal("pos-a", encoding=encoding) as a,
        server.terminal("pos-b") as b,
    ):
        await a.send(op("u1", "t1", {"n": 2}, version=2))
        again = await confirmed(a, "u1", "duplicate")
        assert (again["seq"], again["version"]) == (second["seq"], second["version"])
        await quiet(a, b)
        conf, push = await sync(a, [b], op("u2", "t1", {"n": 3}, version=3))
        assert conf["seq"] == 3 and push["data"] == {"n": 3}


async def test_duplicates_in_one_frame_are_applied_once(server: RunningServer) -> None:
    """The same op twice in one msgpack batch frame: applied once, then `duplicate`."""
    async with (
        server.terminal("pos-a", encoding="msgpack") as a,
        server.terminal("pos-b") as b,
    ):
        message = op("c1", "t1", {"n": 1}, operation="CREATE")
        await a.ws.send(
            msgpack.packb({"type": "message_batch", "messages": [message, message], "count": 2})
        )
        first = await confirmed(a, "c1")
        again = await confirmed(a, "c1", "duplicate")
        assert again["seq"] == first["seq"] == 1
        await pushed(b, "c1")
        await quiet(a, b)


async def test_locked_op_retried_after_reconnect_is_duplicate(server: RunningServer) -> None:
    """An order UPDATE needs its lock; its lock goes when the terminal disconnects. A retry of
    the applied op after the reconnect must still be answered `duplicate`, not 4009: a terminal
    retries exactly when it lost the confirmation with the connection (docs/protocol.md §7.4)."""
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        await sync(
            a, [b], op("c1", "o1", {"status": "open"}, entity_type="orders", operation="CREATE")
        )
        await a.send({"type": "acquire_lock", "entity_type": "orders", "entity_id": "o1"})
        await a.expect("lock_acquired")
        update = op("u1", "o1", {"status": "paid"}, entity_type="orders", version=2)
        original, _ = await sync(a, [b], update)
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        await a.send(update)
        again = await confirmed(a, "u1", "duplicate")
        assert (again["seq"], again["version"]) == (original["seq"], original["version"])
        # ...also while another terminal holds the lock now.
        await b.send({"type": "acquire_lock", "entity_type": "orders", "entity_id": "o1"})
        await b.expect("lock_acquired")
        await a.send(update)
        await confirmed(a, "u1", "duplicate")
        # A new op without the lock is still refused.
        await a.send(op("u2", "o1", {"status": "void"}, entity_type="orders", version=3))
        error = await a.expect("sync_error")
        assert error["code"] == Code.LOCKED and error["operation_id"] == "u2"
        await quiet(a, b)


# ---- receipts, metrics, wire forms --------------------------------------------------------


async def test_receipts_are_accepted_silently(server: RunningServer, encoding: str) -> None:
    async with (
        server.terminal("pos-a") as a,
        server.terminal("pos-b", encoding=encoding) as b,
    ):
        _, push = await sync(a, [b], op("c1", "t1", {"n": 1}, operation="CREATE"))
        await b.send({"type": "sync_confirmation", "operation_id": "c1", "seq": push["seq"]})
        await b.send({"type": "sync_confirmation", "operation_id": "c1"})
        await quiet(a, b)
        # The connection is still fine.
        await b.send({"type": "ping"})
        await b.expect("pong")


async def test_performance_metrics_reach_the_store_monitors(
    server: RunningServer, encoding: str
) -> None:
    async with (
        server.terminal("pos-a", encoding=encoding) as a,
        server.terminal("mon-1", type="monitor", encoding=encoding) as mon,
        server.terminal("mon-2", type="monitor", store="s2") as mon_other,
        server.terminal("pos-b") as b,
    ):
        await a.send(
            {
                "type": "performance_metrics",
                "response_time": 12.5,
                "memory_usage": 40,
                "cache_hit_rate": 0.9,
            }
        )
        report = await mon.until("performance_metrics")
        while report["scope"] != "terminal":  # the server's own figures come too
            report = await mon.until("performance_metrics")
        assert report["terminal_id"] == "pos-a"
        assert report["terminal_type"] == "pos"
        assert report["metrics"]["response_time"] == 12.5
        assert report["metrics"]["memory_usage"] == 40
        assert report["metrics"]["cache_hit_rate"] == 0.9
        await quiet(a, b)
        # The other store's monitor gets its own store's feed only (docs/protocol.md §6).
        with contextlib.suppress(TimeoutError):
            while True:
                message = await mon_other.recv(0.3)
                assert message.get("store_id", "s2") == "s2", message


async def test_large_push_is_lz4_compressed_for_msgpack(server: RunningServer) -> None:
    """A msgpack frame over the compression threshold travels as `compressed:` + lz4; the same
    push is plain JSON text for a JSON terminal."""
    big = {"notes": "x" * 5000, "items": [{"sku": f"sku-{i}", "qty": i} for i in range(100)]}
    async with (
        server.terminal("pos-a", encoding="msgpack") as a,
        server.terminal("pos-b", encoding="msgpack") as b,
        server.terminal("pos-c", encoding="json") as c,
    ):
        _, push = await sync(a, [b, c], op("c1", "t1", big, operation="CREATE"))
        assert push["data"] == big
        assert any(f.startswith(COMPRESSED_PREFIX) for f in b.frames if isinstance(f, bytes))
        assert all(isinstance(f, str) for f in c.frames)
        # A client may send the same form.
        payload = msgpack.packb(op("u1", "t1", {"notes": "y" * 5000}, version=2))
        await a.ws.send(COMPRESSED_PREFIX + lz4.frame.compress(payload))
        await confirmed(a, "u1")
        for t in (b, c):
            assert (await pushed(t, "u1"))["data"]["notes"] == "y" * 5000
        await quiet(a, b, c)


async def test_msgpack_pushes_may_arrive_batched(server: RunningServer) -> None:
    """Ops committed together reach a msgpack terminal in message_batch frames, in seq order;
    a JSON terminal gets the same ops one per frame."""
    count = 50
    async with (
        server.terminal("pos-a", encoding="msgpack") as a,
        server.terminal("pos-b", encoding="msgpack") as b,
        server.terminal("pos-c", encoding="json") as c,
    ):
        messages = [op(f"c{i}", f"t{i}", {"i": i}, operation="CREATE") for i in range(count)]
        await a.ws.send(
            msgpack.packb({"type": "message_batch", "messages": messages, "count": count})
        )
        confirmations = await receive(a, count)
        assert [x["operation_id"] for x in confirmations] == [f"c{i}" for i in range(count)]
        for t in (b, c):
            pushes = [x["operation"] for x in await receive(t, count)]
            assert [p["seq"] for p in pushes] == list(range(1, count + 1))
            assert [p["id"] for p in pushes] == [f"c{i}" for i in range(count)]
        # One message per JSON frame: each push's data_sync and nothing else.
        kinds = [json.loads(f)["type"] for f in c.frames[1:]]
        assert kinds == ["data_sync"] * count
        bodies = [f for f in b.frames if isinstance(f, bytes)]
        bodies = [
            lz4.frame.decompress(f[len(COMPRESSED_PREFIX) :])
            if f.startswith(COMPRESSED_PREFIX)
            else f
            for f in bodies
        ]
        assert any(msgpack.unpackb(f)["type"] == "message_batch" for f in bodies)
        await quiet(a, b, c)


# ---- takeover ------------------------------------------------------------------------------


async def test_takeover_closes_the_older_connection_with_4004(
    server: RunningServer, encoding: str
) -> None:
    async with server.terminal("pos-b") as b:
        first = await server.connect("pos-a", encoding=encoding)
        try:
            await sync(first, [b], op("c1", "t1", {"n": 1}, operation="CREATE"))
            async with server.terminal("pos-a", encoding=encoding) as second:
                await first.ws.wait_closed()
                assert first.ws.close_code == Code.REPLACED
                # The new connection works both ways.
                await sync(second, [b], op("u1", "t1", {"n": 2}, version=2))
                await sync(b, [second], op("u2", "t1", {"n": 3}, version=3))
                # ...and another store's terminal of the same id is no takeover.
                async with server.terminal("pos-a", store="s2") as elsewhere:
                    await sync(second, [b], op("u3", "t1", {"n": 4}, version=4))
                    await quiet(elsewhere, second, b)
                    assert second.ws.close_code is None
        finally:
            await first.close()

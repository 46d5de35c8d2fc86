"""End to end: resume with `since`, resync_required, snapshots and catch-up (docs/protocol.md
§9)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.e2e.test_sync_flow import (  # noqa: F401  (wire_checks: autouse fixture)
    ENCODINGS,
    confirmed,
    other,
    pushed,
    quiet,
    receive,
    sync,
    ts,
    wire_checks,
)
from tests.helpers import RunningServer, Terminal, op, running_server


async def build_log(sender: Terminal, receiver: Terminal) -> list[str]:
    """A store log of creates, updates, upserts, deletes, merges and a losing write (no seq).
    Returns the op ids by seq (index 0 is seq 1)."""
    steps: list[tuple[dict[str, Any], str]] = [
        (op("c1", "t1", {"n": 1}, operation="CREATE", timestamp=ts(1)), "applied"),
        (op("c2", "t2", {"n": 2}, operation="CREATE", timestamp=ts(1)), "applied"),
        (op("u1", "t1", {"m": 1}, version=2, timestamp=ts(2)), "applied"),
        (op("lose", "t1", {"n": 0}, version=2, timestamp=ts(0)), "resolved"),  # no seq
        (op("up1", "t3", {"n": 3}, timestamp=ts(3)), "applied"),
        (op("d1", "t2", operation="DELETE", version=2, timestamp=ts(4)), "applied"),
        (
            op("p1", "p1", {"name": "x", "price": 1}, entity_type="products", operation="CREATE"),
            "applied",
        ),
        (op("p2", "p1", {"price": 2}, entity_type="products", version=2), "applied"),
        (op("p3", "p1", {"name": "y"}, entity_type="products", version=2), "merged"),
        (op("c3", "t2", {"n": 22}, operation="CREATE", timestamp=ts(5)), "applied"),
        (op("u2", "t3", {"k": 1}, version=2, timestamp=ts(6)), "applied"),
    ]
    by_seq: list[str] = []
    for message, status in steps:
        op_id = message["operation"]["id"]
        await sender.send(message)
        conf = await confirmed(sender, op_id, status)
        if conf["seq"] is not None:
            assert conf["seq"] == len(by_seq) + 1
            by_seq.append(op_id)
            await pushed(receiver, op_id)
    return by_seq


async def fill(sender: Terminal, prefix: str, count: int, chunk: int = 100) -> None:
    """`count` CREATEs from a msgpack sender, `chunk` per message_batch frame, all confirmed."""
    for start in range(0, count, chunk):
        messages = [
            op(f"{prefix}-{i}", f"{prefix}-{i}", {"i": i}, operation="CREATE")
            for i in range(start, min(count, start + chunk))
        ]
        await sender.ws.send(
            msgpack.packb({"type": "message_batch", "messages": messages, "count": len(messages)})
        )
        for answer in await receive(sender, len(messages)):
            assert answer["type"] == "sync_confirmation", answer


async def seqs(terminal: Terminal, count: int) -> list[int]:
    """The seqs of the next `count` messages, which must all be pushes."""
    out = []
    for message in await receive(terminal, count):
        assert message["type"] == "data_sync", message
        out.append(message["operation"]["seq"])
    return out


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_since_every_n_replays_exactly_what_follows(
    server: RunningServer, encoding: str
) -> None:
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        by_seq = await build_log(a, b)
        states: dict[int, dict[str, Any]] = {}
        for n in range(len(by_seq) + 1):
            last = len(by_seq)
            async with server.terminal("late", encoding=encoding, since=n) as late:
                assert late.established["last_seq"] == last
                replay = [await late.expect("data_sync") for _ in range(last - n)]
                ops = [r["operation"] for r in replay]
                assert [o["seq"] for o in ops] == list(range(n + 1, last + 1))
                assert [o["id"] for o in ops] == by_seq[n:]
                for o in ops:  # the same op always replays the same way
                    assert states.setdefault(o["seq"], o) == o
                # Then live ops, no gap, no duplicate.
                live = f"live-{n}"
                conf, push = await sync(
                    a, [b, late], op(live, f"live-{n}", {"n": n}, operation="CREATE")
                )
                assert push["seq"] == conf["seq"] == last + 1
                by_seq.append(live)
                await quiet(late, b)
        # The replayed states are the full states after each op.
        assert states[3]["data"] == {"n": 1, "m": 1}
        assert states[5]["deleted"] is True and states[5]["data"] == {}
        assert states[8]["data"] == {"name": "y", "price": 2}


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_resume_message_mid_connection(server: RunningServer, encoding: str) -> None:
    async with (
        server.terminal("pos-a") as a,
        server.terminal("pos-b", encoding=encoding) as b,
    ):
        by_seq = await build_log(a, b)
        last = len(by_seq)
        for n in (0, 3, last - 1, last):
            await b.send({"type": "resume", "since": n})
            replay = [(await b.expect("data_sync"))["operation"] for _ in range(last - n)]
            assert [o["seq"] for o in replay] == list(range(n + 1, last + 1))
            assert [o["id"] for o in replay] == by_seq[n:]
            await quiet(b)
            last += 1
            conf, push = await sync(a, [b], op(f"live-{n}", f"l{n}", operation="CREATE"))
            assert push["seq"] == conf["seq"] == last
            by_seq.append(f"live-{n}")


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_a_resume_replays_the_terminals_own_ops_too(
    server: RunningServer, encoding: str
) -> None:
    """The stream a resume replays is the store's, the terminal's own operations included (it
    may have lost what it sent with its storage): only live pushes skip them."""
    async with server.terminal("pos-a", encoding=encoding) as a:
        for n in (1, 2):
            await a.send(op(f"own-{n}", f"t{n}", operation="CREATE"))
            assert (await confirmed(a, f"own-{n}", "applied"))["seq"] == n
        await quiet(a)  # live: no echo
        await a.send({"type": "resume", "since": 0})
        replay = [(await a.expect("data_sync"))["operation"] for _ in range(2)]
        assert [(o["id"], o["seq"]) for o in replay] == [("own-1", 1), ("own-2", 2)]
        await quiet(a)
    async with server.terminal("pos-a", encoding=encoding, since=1) as again:
        assert (await again.expect("data_sync"))["operation"]["id"] == "own-2"
        await quiet(again)


async def test_a_resume_replays_an_own_op_the_catch_up_had_not_reached(tmp_path: Path) -> None:
    """An own op committed while the terminal still catches up is not echoed by that catch-up,
    but a resume from before it replays it like any other op of the store. The server's small
    outbound queue and send buffer keep the first catch-up far behind while the test does not
    read."""
    stored = 600
    async with (
        running_server(tmp_path, ws_message_queue_size=20, ws_send_buffer=4096) as server,
        server.terminal("pos-a", encoding="msgpack") as a,
    ):
        await fill(a, "old", stored)
        async with server.terminal("late", encoding="msgpack", since=0) as late:
            await late.send(op("mine", "m", operation="CREATE"))
            seen = []
            while (message := await late.recv())["type"] != "sync_confirmation":
                seen.append(message["operation"]["seq"])
            assert message["seq"] == stored + 1 and len(seen) < stored
            await late.send({"type": "resume", "since": stored - 10})
            want = list(range(stored - 9, stored + 2))  # the last ten stored ops, then its own
            got = await seqs(late, len(want))
            while got[-len(want) :] != want:
                got += await seqs(late, 1)
            await quiet(late)


async def test_a_catch_up_replays_its_own_stores_ops_only(server: RunningServer) -> None:
    """Seqs are per store: a resume from 0 in one store never replays another store's ops,
    although both logs hold seqs 1, 2, ..."""
    async with server.terminal("pos-a") as a, server.terminal("pos-x", store="s2") as x:
        for n in (1, 2, 3):
            await a.send(op(f"a{n}", f"t{n}", operation="CREATE"))
            await confirmed(a, f"a{n}")
        await x.send(op("x1", "t1", operation="CREATE"))
        await confirmed(x, "x1")
    async with server.terminal("late-x", store="s2", since=0) as late:
        assert (await late.expect("data_sync"))["operation"]["id"] == "x1"
        await quiet(late)
    async with server.terminal("late-a", since=0) as late:
        replay = [(await late.expect("data_sync"))["operation"] for _ in range(3)]
        assert [(o["id"], o["seq"]) for o in replay] == [("a1", 1), ("a2", 2), ("a3", 3)]
        await quiet(late)


async def test_since_older_than_the_pruned_log_requires_resync(tmp_path: Path) -> None:
    """Past the log's retention the oldest ops are pruned (at start-up and daily): a terminal
    whose watermark the log no longer reaches is told to resync, one it still reaches resumes."""
    path = tmp_path / "chefia.db"
    async with running_server(tmp_path) as server, server.terminal("pos-a") as a:
        for n in range(1, 6):
            await a.send(op(f"o{n}", f"t{n}", operation="CREATE"))
            await confirmed(a, f"o{n}", "applied")
    # The first three were written 40 days ago (the default retention is 30).
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "UPDATE sync_operations SET server_time = '2020-01-01T00:00:00.000Z' WHERE seq <= 3"
        )
    async with running_server(tmp_path) as server:  # its start-up maintenance prunes them
        async with server.terminal("pos-b", since=1) as late:
            resync = await late.expect("resync_required")
            assert (resync["since"], resync["oldest_seq"], resync["last_seq"]) == (1, 4, 5)
            await quiet(late)
        async with server.terminal("pos-c", since=3) as reached:
            replay = [(await reached.expect("data_sync"))["operation"] for _ in range(2)]
            assert [o["seq"] for o in replay] == [4, 5]
            await quiet(reached)


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_since_beyond_the_log_requires_resync(server: RunningServer, encoding: str) -> None:
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        by_seq = await build_log(a, b)
        last = len(by_seq)
        async with server.terminal("late", encoding=encoding, since=last + 5) as late:
            resync = await late.expect("resync_required")
            assert (resync["since"], resync["last_seq"]) == (last + 5, last)
            assert resync["oldest_seq"] == 1
            assert resync["reason"]
            await quiet(late)
            # It still gets live ops, from last + 1 on.
            _, push = await sync(a, [b, late], op("l1", "l1", operation="CREATE"))
            assert push["seq"] == last + 1
            # The same as a message mid-connection.
            await late.send({"type": "resume", "since": last + 2})
            resync = await late.expect("resync_required")
            assert (resync["since"], resync["last_seq"]) == (last + 2, last + 1)
            await quiet(late)
            _, push = await sync(a, [b, late], op("l2", "l2", operation="CREATE"))
            assert push["seq"] == last + 2
            # Then it rebuilds from a snapshot.
            await late.send({"type": "snapshot_request"})
            snapshot = await late.expect("snapshot")
            assert snapshot["seq"] == last + 2
            await quiet(late)


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_snapshot_then_live_ops_after_the_watermark(
    server: RunningServer, encoding: str
) -> None:
    async with (
        server.terminal("pos-a") as a,
        server.terminal("pos-b", encoding=encoding) as b,
        server.terminal("pos-x", store="s2") as x,
    ):
        by_seq = await build_log(a, b)
        await sync(x, [], op("x1", "other-store", operation="CREATE"))
        await b.send({"type": "snapshot_request"})
        snapshot = await b.expect("snapshot")
        assert snapshot["store_id"] == "s1"
        assert snapshot["seq"] == len(by_seq)
        entities = {(e["entity_type"], e["entity_id"]): e for e in snapshot["entities"]}
        assert set(entities) == {
            ("tables", "t1"),
            ("tables", "t2"),
            ("tables", "t3"),
            ("products", "p1"),
        }
        assert entities["tables", "t1"] == {
            "entity_type": "tables",
            "entity_id": "t1",
            "version": 2,
            "data": {"n": 1, "m": 1},
            "deleted": False,
        }
        # t2 was deleted, then created again.
        assert entities["tables", "t2"]["data"] == {"n": 22}
        assert entities["tables", "t2"]["version"] == 3
        assert entities["products", "p1"]["data"] == {"name": "y", "price": 2}
        await quiet(b)
        _, push = await sync(a, [b], op("l1", "l1", operation="CREATE"))
        assert push["seq"] == snapshot["seq"] + 1

        # Only some entity types, and a tombstone.
        await sync(a, [b], op("d", "p1", entity_type="products", operation="DELETE", version=4))
        await b.send({"type": "snapshot_request", "entity_types": ["products"]})
        snapshot = await b.expect("snapshot")
        assert snapshot["seq"] == len(by_seq) + 2
        assert snapshot["entities"] == [
            {
                "entity_type": "products",
                "entity_id": "p1",
                "version": 4,
                "data": {},
                "deleted": True,
            }
        ]
        await quiet(a, b)


async def test_snapshot_amid_concurrent_writes(server: RunningServer) -> None:
    """While another terminal writes, a snapshot is followed by exactly the ops after it."""
    async with (
        server.terminal("pos-a", encoding="msgpack") as a,
        server.terminal("pos-b") as b,
    ):
        writer = asyncio.create_task(fill(a, "w", 400, chunk=20))
        await b.send({"type": "snapshot_request"})
        before: list[int] = []
        while True:
            message = await b.recv()
            if message["type"] == "snapshot":
                break
            before.append(message["operation"]["seq"])
        await writer
        watermark = message["seq"]
        assert before == list(range(1, len(before) + 1))
        assert len(before) <= watermark
        assert len(message["entities"]) == watermark  # one CREATE per seq
        assert await seqs(b, 400 - watermark) == list(range(watermark + 1, 401))
        await quiet(b)


async def test_offline_terminal_catches_up_exactly(server: RunningServer) -> None:
    async with server.terminal("pos-a") as a:
        async with server.terminal("pos-b", encoding="msgpack") as b:
            by_seq = await build_log(a, b)
        seen = len(by_seq)
        # While b is away: updates, a delete and a resurrection.
        missed = [
            op("m1", "t1", {"n": 5}, version=3, timestamp=ts(10)),
            op("m2", "t3", operation="DELETE", version=3, timestamp=ts(10)),
            op("m3", "t3", {"n": 33}, operation="CREATE", timestamp=ts(11)),
            op("m4", "p1", {"price": 9}, entity_type="products", version=4),
        ]
        for message in missed:
            await sync(a, [], message)
        async with server.terminal("pos-b", encoding="msgpack", since=seen) as b:
            replay = [(await b.expect("data_sync"))["operation"] for _ in missed]
            assert [o["id"] for o in replay] == ["m1", "m2", "m3", "m4"]
            assert [o["seq"] for o in replay] == list(range(seen + 1, seen + 5))
            assert replay[0]["data"] == {"n": 5, "m": 1}
            assert replay[1]["deleted"] is True
            assert replay[2]["data"] == {"n": 33} and replay[2]["version"] == 4
            assert replay[3]["data"] == {"name": "y", "price": 9}
            await quiet(a, b)
            _, push = await sync(a, [b], op("live", "t9", operation="CREATE"))
            assert push["seq"] == seen + 5


@pytest.mark.parametrize("queue_size", [1000, 64])
async def test_live_ops_flow_during_a_long_catch_up(tmp_path: Path, queue_size: int) -> None:
    """1500 stored ops replayed to a reconnecting terminal while 300 more are written: it sees
    every seq once, in order, then it is live. A small outbound queue must not stall it."""
    stored, live = 1500, 300
    async with (
        running_server(tmp_path, ws_message_queue_size=queue_size) as server,
        server.terminal("pos-a", encoding="msgpack") as a,
    ):
        await fill(a, "old", stored, chunk=25)
        for encoding in ENCODINGS:
            async with server.terminal(f"late-{encoding}", encoding=encoding, since=0) as late:
                writer = asyncio.create_task(fill(a, f"new-{encoding}", live, chunk=10))
                got = await seqs(late, stored + live)
                await writer
                assert got == list(range(1, stored + live + 1))
                await quiet(late)
                _, push = await sync(a, [late], op(f"end-{encoding}", "e", {"e": encoding}))
                assert push["seq"] == stored + live + 1
            stored += live + 1


async def test_writing_while_catching_up(server: RunningServer) -> None:
    """A terminal that writes while it catches up gets one confirmation for its own op, and
    the store's ops in seq order, with no gap and no duplicate.

    Its own op may come back as a push too: if it commits before the catch-up reaches it, the
    catch-up reads it from storage (resume sends every op after `since`); once live, the
    sender is skipped. The test accepts both (see the report).
    """
    async with server.terminal("pos-a", encoding="msgpack") as a:
        await fill(a, "old", 1000)
    async with server.terminal("pos-a", encoding="msgpack", since=0) as a:
        await a.send(op("mine", "mine", operation="CREATE"))
        messages = await receive(a, 1001)
        # Whether its own op comes back as a push too is settled by order, not by waiting: a
        # later op of the store is pushed after it (pushes go in seq order).
        async with server.terminal("pos-b") as b:
            await b.send(op("marker", "marker", operation="CREATE"))
            await confirmed(b, "marker")
        while (message := await a.recv())["type"] != "data_sync" or message["operation"][
            "id"
        ] != "marker":
            messages.append(message)
        confirmations = [x for x in messages if x["type"] == "sync_confirmation"]
        assert [c["operation_id"] for c in confirmations] == ["mine"]
        assert confirmations[0]["seq"] == 1001
        pushes = [x["operation"]["seq"] for x in messages if x["type"] == "data_sync"]
        assert pushes in (list(range(1, 1001)), list(range(1, 1002)))
        await quiet(a)


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_snapshot_requested_during_a_catch_up(server: RunningServer, encoding: str) -> None:
    """A snapshot_request while stored ops are still being replayed: what came before the
    snapshot is a prefix up to its watermark at most, and after it exactly the ops after the
    watermark follow (the running catch-up must not leak ops past it, nor repeat any)."""
    stored = 1500
    async with server.terminal("pos-a", encoding="msgpack") as a:
        await fill(a, "old", stored)
        for attempt in range(3):
            async with server.terminal("late", encoding=encoding, since=0) as late:
                await late.send({"type": "snapshot_request"})
                before: list[int] = []
                while (message := await late.recv())["type"] != "snapshot":
                    assert message["type"] == "data_sync", message
                    before.append(message["operation"]["seq"])
                watermark = message["seq"]
                assert watermark == stored
                assert before == list(range(1, len(before) + 1))
                await quiet(late)
                _, push = await sync(a, [late], op(f"live-{attempt}", "l", {"n": attempt}))
                assert push["seq"] == watermark + 1
                stored += 1
                await quiet(late)


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_resume_requested_during_a_catch_up(server: RunningServer, encoding: str) -> None:
    """A resume while stored ops are still being replayed restarts the stream at its `since`:
    the ops after it follow in order and the stream then goes live, nothing repeated after."""
    stored = 1500
    async with server.terminal("pos-a", encoding="msgpack") as a:
        await fill(a, "old", stored)
        async with server.terminal("late", encoding=encoding, since=0) as late:
            await late.send({"type": "resume", "since": stored - 10})
            got = await seqs(late, 10)
            # Whatever of the first replay was already on its way comes first; the resumed
            # stream then ends the replay with exactly the last ten ops.
            while got[-10:] != list(range(stored - 9, stored + 1)):
                got += await seqs(late, 1)
            await quiet(late)
            _, push = await sync(a, [late], op("live", "l", {"n": 1}))
            assert push["seq"] == stored + 1
            await quiet(late)


async def test_snapshot_answer_delayed_while_a_catch_up_runs(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage that answers the snapshot late (as a pooled backend may, while other reads and
    commits go ahead): the catch-up that was running must stop, or it goes live, pushes ops past
    the watermark before the snapshot, and they come again after it."""
    stored, extra = 1200, 20
    read, writes_done = asyncio.Event(), asyncio.Event()
    original = server.worker.store.snapshot

    async def slow_snapshot(*args: Any) -> Any:
        result = await original(*args)
        read.set()
        await writes_done.wait()
        return result

    monkeypatch.setattr(server.worker.store, "snapshot", slow_snapshot)
    async with server.terminal("pos-a", encoding="msgpack") as a:
        await fill(a, "old", stored)
        async with server.terminal("late", since=0) as late:
            await late.send({"type": "snapshot_request"})

            async def until_snapshot() -> tuple[list[int], dict[str, Any]]:
                before = []
                while (message := await late.recv())["type"] != "snapshot":
                    assert message["type"] == "data_sync", message
                    before.append(message["operation"]["seq"])
                return before, message

            reader = asyncio.create_task(until_snapshot())
            await read.wait()
            await fill(a, "new", extra, chunk=1)
            writes_done.set()
            before, snapshot = await reader
            watermark = snapshot["seq"]
            assert watermark == stored
            assert before == list(range(1, len(before) + 1))
            assert before[-1:] <= [watermark], "ops past the watermark came before the snapshot"
            assert await seqs(late, extra) == list(range(watermark + 1, watermark + extra + 1))
            await quiet(late)


async def test_resume_answer_delayed_while_a_catch_up_runs(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above for `resume`: ops written while the resume position is read arrive once."""
    stored, extra = 1200, 20
    async with server.terminal("pos-a", encoding="msgpack") as a:
        await fill(a, "old", stored)
        async with server.terminal("late", since=0) as late:
            read, writes_done = asyncio.Event(), asyncio.Event()
            original = server.worker.store.log_bounds

            async def slow_log_bounds(*args: Any) -> Any:
                result = await original(*args)
                read.set()
                await writes_done.wait()
                return result

            monkeypatch.setattr(server.worker.store, "log_bounds", slow_log_bounds)
            await late.send({"type": "resume", "since": stored - 10})

            async def until_live() -> list[int]:
                got: list[int] = []
                while got[-extra:] != list(range(stored + 1, stored + extra + 1)):
                    got += await seqs(late, 1)
                return got

            reader = asyncio.create_task(until_live())
            await read.wait()
            await fill(a, "new", extra, chunk=1)
            writes_done.set()
            got = await reader
            assert got[-extra - 10 :] == list(range(stored - 9, stored + extra + 1))
            for seq in range(stored + 1, stored + extra + 1):
                assert got.count(seq) == 1, f"seq {seq} arrived {got.count(seq)} times"
            await quiet(late)


async def test_reconcile_delivers_an_op_whose_publish_was_lost(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        real_publish = server.worker.bus.publish

        async def lost(store_id: str, pushes: Any) -> None:
            return None  # committed, confirmed, but never published (a Redis hiccup)

        monkeypatch.setattr(server.worker.bus, "publish", lost)
        await a.send(op("lost-1", "t1", {"n": 1}))
        confirmation = await a.expect("sync_confirmation")
        await b.nothing()
        monkeypatch.setattr(server.worker.bus, "publish", real_publish)
        await server.worker.chores.reconcile()  # sees the log's head
        await server.worker.chores.reconcile()  # b is still behind it: caught up from storage
        pushed = await b.expect("data_sync")
        assert pushed["operation"]["id"] == "lost-1"
        assert pushed["operation"]["seq"] == confirmation["seq"]
        await a.nothing()  # never echoed to its sender

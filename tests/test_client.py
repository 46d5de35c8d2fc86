"""chefia_rt.client against a real server (in-process, SQLite): sending, ordered delivery once,
reconnect and resend, duplicates, takeover, resync, backoff; and its seq bookkeeping fed by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from chefia_rt.client import Backoff, Client, ClientStopped, Event, Snapshot, StoreOp
from chefia_rt.client.model import Reconnects
from chefia_rt.protocol import messages as m
from tests.helpers import RunningServer, free_port, op, running_server

BOUND = 60.0  # liveness bound for anything to arrive: a hang guard, never a speed claim


class Seen:
    """Every event a client handed over, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._more = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._more.set()

    @property
    def seqs(self) -> list[int]:
        return [e.seq for e in self.events]

    async def until(self, count: int) -> None:
        async with asyncio.timeout(BOUND):
            while len(self.events) < count:
                self._more.clear()
                await self._more.wait()


def client(running: RunningServer, terminal_id: str, **kwargs: Any) -> Client:
    kwargs.setdefault("store_id", "s1")
    kwargs.setdefault("backoff", Backoff(initial=0.05, maximum=0.5))
    return Client(running.url, terminal_id, **kwargs)


def session_of(running: RunningServer, terminal_id: str) -> Any:
    session = running.worker.hub.get("s1", terminal_id)
    assert session is not None
    return session


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_ops_reach_every_terminal_once_in_seq_order(tmp_path: Path, encoding: Any) -> None:
    seen_a, seen_b = Seen(), Seen()
    async with (
        running_server(tmp_path) as running,
        client(running, "pos-a", encoding=encoding, since=0, on_event=seen_a) as a,
        client(running, "pos-b", encoding=encoding, since=0, on_event=seen_b) as b,
    ):
        await a.wait_connected(BOUND)
        await b.wait_connected(BOUND)
        # A large op: msgpack pushes of it travel lz4-compressed, and together they batch.
        big = {"note": os.urandom(1500).hex()}
        answers = [
            await sender.send(
                "tables", f"{sender.terminal_id}-t{i}", {"n": i, **(big if i == 3 else {})}
            )
            for i in range(20)
            for sender in (a, b)
        ]
        async with asyncio.timeout(BOUND):
            results = await asyncio.gather(*answers)
        assert {r.kind for r in results} == {"confirmed"}
        assert sorted(r.seq for r in results if r.seq is not None) == list(range(1, 41))
        await seen_a.until(40)
        await seen_b.until(40)
        for seen, me in ((seen_a, "pos-a"), (seen_b, "pos-b")):
            assert seen.seqs == list(range(1, 41))
            for event in seen.events:
                assert isinstance(event, StoreOp)
                assert event.own == (event.operation["terminal_id"] == me)
        assert a.watermark == b.watermark == 40
        assert a.stats.connects == 1 and a.stats.confirmed == 20 and not a.unanswered()


async def test_events_iterator_hands_over_in_order(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path) as running,
        client(running, "kds-1", terminal_type="kds", since=0) as reader,
        client(running, "pos-a") as writer,
    ):
        await reader.wait_connected(BOUND)
        for i in range(5):
            await writer.send("tables", f"t{i}", {"n": i})
        got: list[int] = []
        async with asyncio.timeout(BOUND):
            async for event in reader.events():
                got.append(event.seq)
                if len(got) == 5:
                    break
        assert got == [1, 2, 3, 4, 5]


async def test_a_cut_connection_resumes_and_resends_with_the_same_ids(tmp_path: Path) -> None:
    seen_a, seen_b = Seen(), Seen()
    async with (
        running_server(tmp_path) as running,
        client(running, "pos-a", since=0, on_event=seen_a) as a,
        client(running, "pos-b", since=0, on_event=seen_b) as b,
    ):
        await a.wait_connected(BOUND)
        await b.wait_connected(BOUND)
        await (await a.send("tables", "t0", {"n": 0}))
        await seen_b.until(1)
        # Cut b's TCP connection from the server's side, and keep writing meanwhile: both
        # terminals' writes while b is away, b's waiting in its outbox.
        session_of(running, "pos-b").transport._ws.transport.abort()
        pending = [await a.send("tables", f"ta{i}", {"n": i}) for i in range(10)]
        pending += [await b.send("tables", f"tb{i}", {"n": i}) for i in range(10)]
        async with asyncio.timeout(BOUND):
            answers = await asyncio.gather(*pending)
        assert {x.kind for x in answers} == {"confirmed"}
        await seen_a.until(21)
        await seen_b.until(21)
        assert seen_a.seqs == seen_b.seqs == list(range(1, 22))
        assert b.stats.connects == 2 and b.stats.reconnects == 1
        log = await running.worker.store.read_operations("s1", 0, 100)
        assert len(log) == 21 and len({r.id for r in log}) == 21


async def test_a_duplicate_answer_confirms_and_is_handed_over_once(tmp_path: Path) -> None:
    seen = Seen()
    async with (
        running_server(tmp_path) as running,
        running.terminal("pos-raw") as raw,
        client(running, "pos-a", since=0, on_event=seen) as a,
    ):
        await a.wait_connected(BOUND)
        # The op was committed already (its first answer lost with a connection).
        await raw.send(op("op-1", "t1", {"n": 1}))
        await raw.expect("sync_confirmation")
        await seen.until(1)
        answer = await (await a.send("tables", "t1", {"n": 1}, op_id="op-1"))
        assert answer.kind == "confirmed" and answer.message["status"] == "duplicate"
        assert answer.seq == 1
        await (await a.send("tables", "t2", {"n": 2}))
        await seen.until(2)
        assert seen.seqs == [1, 2]
        assert a.stats.duplicates == 1


async def test_an_answer_the_application_gave_up_on_breaks_nothing(tmp_path: Path) -> None:
    """The application cancels the future it was handed: the confirmation still arrives, is
    counted and handed over in order, and the connection goes on (answering a cancelled future
    raises InvalidStateError, which must not end it)."""
    seen = Seen()
    async with (
        running_server(tmp_path) as running,
        client(running, "pos-a", since=0, on_event=seen) as a,
    ):
        await a.wait_connected(BOUND)
        given_up = await a.send("tables", "t1", {"n": 1})
        given_up.cancel()
        async with asyncio.timeout(BOUND):
            later = await (await a.send("tables", "t2", {"n": 2}))
        assert later.kind == "confirmed"
        await seen.until(2)
        assert seen.seqs == [1, 2]
        assert a.stats.confirmed == 2
        assert a.stats.reconnects == 0


async def test_a_takeover_stops_the_client_without_fighting(tmp_path: Path) -> None:
    async with running_server(tmp_path) as running, client(running, "pos-a") as a:
        await a.wait_connected(BOUND)
        async with running.terminal("pos-a"):
            await a.wait_stopped(BOUND)
            assert a.stopped is not None and a.stopped.code == 4004
            await asyncio.sleep(0.5)
            assert a.stats.connects == 1  # no reconnect that would take the terminal back
            with pytest.raises(ClientStopped):
                await a.send("tables", "t1", {})


async def test_resync_required_brings_a_snapshot_then_the_stream(tmp_path: Path) -> None:
    seen = Seen()
    async with running_server(tmp_path) as running, running.terminal("pos-raw") as raw:
        for i in range(3):
            await raw.send(op(f"op-{i}", f"t{i}", {"n": i}))
            await raw.expect("sync_confirmation")
        # A since the server's log never reached (a restored database, say).
        async with client(running, "pos-a", since=50, on_event=seen) as a:
            await seen.until(1)
            first = seen.events[0]
            assert isinstance(first, Snapshot) and first.seq == 3
            assert {e["entity_id"] for e in first.entities} == {"t0", "t1", "t2"}
            await raw.send(op("op-9", "t9", {"n": 9}))
            await seen.until(2)
            assert seen.seqs == [3, 4] and a.watermark == 4 and a.stats.resyncs == 1


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_a_snapshot_in_pages_arrives_as_one(tmp_path: Path, encoding: Any) -> None:
    """A store larger than a frame comes in snapshot pages; the client hands over one Snapshot
    holding every entity, then the stream after it."""
    seen = Seen()
    big = "x" * 3000
    async with (
        running_server(tmp_path, max_ws_message_size=65_536) as running,
        running.terminal("pos-raw") as raw,
    ):
        for i in range(60):  # about 180 KB of state: three pages or more
            await raw.send(op(f"op-{i}", f"t{i}", {"n": i, "pad": big}))
            await raw.expect("sync_confirmation")
        async with client(running, "pos-a", encoding=encoding, since=500, on_event=seen) as a:
            await seen.until(1)
            first = seen.events[0]
            assert isinstance(first, Snapshot) and first.seq == 60
            assert sorted(e["entity_id"] for e in first.entities) == sorted(
                f"t{i}" for i in range(60)
            )
            await raw.send(op("op-x", "tx", {"n": -1}))
            await seen.until(2)
            assert seen.seqs == [60, 61] and a.watermark == 61


async def test_a_state_file_keeps_the_outbox_of_a_client_dropped_mid_send(tmp_path: Path) -> None:
    """A client with `state_path` is dropped while its operations are on the wire (its socket
    cut, its tasks gone, nothing of close() run, as in a crash); a new client on the same file
    sends every unanswered one again with its id: the log holds each once, none is lost."""
    state = tmp_path / "pos-a.sqlite"
    async with running_server(tmp_path) as running:
        a = client(running, "pos-a", state_path=state)
        a.start()
        await a.wait_connected(BOUND)
        answers: list[asyncio.Future[Any]] = []
        async with asyncio.timeout(BOUND):
            # Sending goes on while answers come back, up to the twentieth; the last ten are
            # in the file but not on the wire yet when the client is dropped.
            while sum(answer.done() for answer in answers) < 20 and len(answers) < 190:
                i = len(answers)
                answers.append(await a.send("tables", f"t{i}", {"n": i}, op_id=f"op-{i}"))
                await asyncio.sleep(0)
        total = len(answers) + 10
        for i in range(len(answers), total):
            answers.append(await a.send("tables", f"t{i}", {"n": i}, op_id=f"op-{i}"))
        ws = a._connection.ws if a._connection is not None else None
        assert ws is not None and a._runner is not None
        ws.transport.abort()
        a._runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await a._runner
        assert 10 <= len(a.unanswered()) < total - 20  # dropped mid-send

        seen = Seen()
        b = client(running, "pos-a", state_path=state, on_event=seen)
        left = [o["id"] for o in b.unanswered()]
        assert set(left) >= {o["id"] for o in a.unanswered()}  # answered ones may be left too
        async with b:
            async with asyncio.timeout(BOUND):
                while b.unanswered():  # noqa: ASYNC110  # no event tells an emptied outbox
                    await asyncio.sleep(0.01)
            assert b.stats.confirmed == len(left) and b.stats.resent == len(left)
            log = await running.worker.store.read_operations("s1", 0, 1000)
            assert sorted(r.id for r in log) == sorted(f"op-{i}" for i in range(total))
            watermark = b.watermark
        # Closed cleanly: nothing is left to send, and the stream resumes where it was.
        c = client(running, "pos-a", state_path=state)
        assert c.unanswered() == [] and c.watermark == watermark == total
        assert c.state is not None
        c.state.close()


def feed(client: Client, message: dict[str, Any]) -> None:
    """One server message, handed to the client's bookkeeping (chefia_rt/client/core.py) as its
    connection hands it over."""
    client._core.handle(message, time.monotonic())


def page(seq: int, index: int, complete: bool, entity_id: str) -> dict[str, Any]:
    """A snapshot page of one entity, as the server builds it."""
    entity = m.snapshot_entity("tables", entity_id, 1, {}, False)
    return m.snapshot_msg("s1", seq, "e1", index, complete, [entity])


def test_snapshot_pages_are_joined_until_the_complete_one() -> None:
    seen = Seen()
    c = Client("ws://127.0.0.1:1/ws", "pos-a", since=0, on_event=seen)
    c.request_snapshot()
    feed(c, page(9, 0, False, "a"))
    feed(c, page(9, 1, False, "b"))
    assert seen.events == []  # nothing before the complete page
    feed(c, page(9, 2, True, "c"))
    (snapshot,) = seen.events
    assert isinstance(snapshot, Snapshot) and snapshot.seq == 9 and c.epoch == "e1"
    assert [e["entity_id"] for e in snapshot.entities] == ["a", "b", "c"]
    # A snapshot started anew (page 0 again) forgets the pages of one cut short.
    c.request_snapshot()
    feed(c, page(9, 0, False, "old"))
    feed(c, page(10, 0, True, "d"))
    assert [e["entity_id"] for e in seen.events[-1].entities] == ["d"]  # type: ignore[union-attr]


async def test_backoff_gives_up_after_its_attempts() -> None:
    port = free_port()  # nothing listens there
    c = Client(
        f"ws://127.0.0.1:{port}/ws",
        "pos-a",
        backoff=Backoff(initial=0.01, maximum=0.05, max_attempts=4),
    )
    async with c:
        pending = await c.send("tables", "t1", {})
        with pytest.raises(ClientStopped, match="4 failed attempts"):
            async with asyncio.timeout(BOUND):
                await pending
    assert c.unanswered()[0]["entity_id"] == "t1"  # still there for the application to keep


def test_reconnects_count_failed_attempts_in_a_row_and_give_up_by_their_limits() -> None:
    backoff = Backoff(max_attempts=3, max_elapsed=60.0, stable_after=2.0)
    tries = Reconnects(backoff, down_since=0.0)
    urls = ["ws://a/ws", "ws://b/ws"]
    assert tries.url(urls) == "ws://a/ws"
    assert tries.ended(None, None, 1.0) is None and tries.url(urls) == "ws://b/ws"
    assert tries.ended(None, 1006, 2.0) is None
    # A connection that lived long enough starts the count again, from the first URL.
    assert tries.ended(10.0, 1001, 13.0) is None and tries.attempt == 0
    assert tries.url(urls) == "ws://a/ws"
    # A short one does not: it counts as failed, and three failed in a row give up.
    assert tries.ended(13.5, 1013, 14.0) is None
    assert tries.ended(None, None, 15.0) is None
    assert tries.ended(None, None, 16.0) == "gave up after 3 failed attempts"
    # Without a connection for longer than max_elapsed, whatever the count.
    patient = Reconnects(Backoff(max_elapsed=60.0), down_since=0.0)
    assert patient.ended(None, None, 30.0) is None
    assert patient.ended(None, None, 61.0) == "no connection for 61s"
    # A close retrying cannot fix stops at once.
    assert patient.ended(5.0, 4004, 62.0) == "closed by the server with 4004"


def test_backoff_grows_to_its_maximum_with_jitter_below_it() -> None:
    backoff = Backoff(initial=0.1, maximum=2.0, factor=2.0, jitter=0.5)
    assert [backoff.delay(n, lambda: 0.0) for n in range(7)] == [
        0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0
    ]  # fmt: skip
    assert backoff.delay(3, lambda: 1.0) == pytest.approx(0.4)


# ---- the seq bookkeeping, fed by hand (no connection) ----------------------------------------


STAMP = "2024-01-15T10:30:00.000000Z"


def push(seq: int, terminal: str = "pos-b") -> dict[str, Any]:
    return m.data_sync_msg(
        id=f"p{seq}",
        seq=seq,
        entity_type="tables",
        entity_id="t9",
        operation="UPDATE",
        data={},
        version=seq,
        deleted=False,
        timestamp=STAMP,
        terminal_id=terminal,
        user_id=None,
        priority="medium",
        server_time=STAMP,
    )


def confirmation(op_id: str, seq: int) -> dict[str, Any]:
    return m.sync_confirmation_msg(
        operation_id=op_id,
        seq=seq,
        version=1,
        status="applied",
        conflict_resolved=False,
        entity_type="tables",
        entity_id="t1",
        server_time=STAMP,
    )


async def test_a_confirmation_ahead_of_pushes_waits_for_the_gap() -> None:
    seen = Seen()
    c = Client("ws://127.0.0.1:1/ws", "pos-a", since=0, on_event=seen)
    answer = await c.send("tables", "t1", {"n": 1}, op_id="mine")
    feed(c, push(1))
    feed(c, confirmation("mine", 3))
    assert seen.seqs == [1] and c.watermark == 1  # 3 is held until 2 arrives
    feed(c, push(3))  # the same seq again (a replay): dropped
    feed(c, push(2))
    assert seen.seqs == [1, 2, 3] and c.watermark == 3
    assert answer.done() and answer.result().seq == 3
    feed(c, push(2))
    assert seen.seqs == [1, 2, 3]


async def test_retryable_errors_keep_the_op_and_final_ones_answer_it() -> None:
    c = Client("ws://127.0.0.1:1/ws", "pos-a", since=0)
    retried = await c.send("tables", "t1", {}, op_id="a")
    refused = await c.send("tables", "t2", {}, op_id="b")
    feed(c, m.sync_error_msg("a", 1013, "retry"))
    feed(c, m.sync_error_msg("a", 4005, "rate"))
    feed(c, m.sync_error_msg("b", 4008, "no"))
    assert not retried.done() and [o["id"] for o in c.unanswered()] == ["a"]
    assert refused.result().kind == "rejected"
    assert c.stats.retries == 2 and c.stats.rejected == 1


async def test_a_message_off_its_model_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    seen = Seen()
    c = Client("ws://127.0.0.1:1/ws", "pos-a", since=0, on_event=seen)
    answer = await c.send("tables", "t1", {"n": 1}, op_id="mine")
    feed(c, push(1) | {"operation": {"seq": "2"}})  # a seq as text: not a push
    feed(c, confirmation("mine", 1) | {"status": "maybe"})
    assert seen.seqs == [] and not answer.done()
    assert "ignoring a malformed data_sync" in caplog.text
    # Fields a newer server adds are no reason to ignore a message.
    feed(c, confirmation("mine", 1) | {"added_later": 1})
    assert seen.seqs == [1] and answer.result().seq == 1


async def test_a_close_retrying_cannot_fix_stops_the_client(tmp_path: Path) -> None:
    async with running_server(tmp_path) as running:
        c = client(running, "pos-a", store_id="no spaces allowed")
        async with c:
            with pytest.raises(ClientStopped) as stopped:
                await c.wait_connected(BOUND)
        assert stopped.value.code == 4006 and c.stats.connects == 0


async def test_answered_ids_are_not_kept_without_a_state_file() -> None:
    c = Client("ws://127.0.0.1:1/ws", "pos-a", since=0)
    await c.send("tables", "t1", {}, op_id="mine")
    feed(c, confirmation("mine", 1))
    c._save_state()  # what every tick of a connection does
    assert c._core.unsaved() is None  # nothing left to write, and nothing piling up

"""The hub's ordered delivery with a fake transport: gaps, own ops, catch-up hand-off."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from chefia_rt.bus.base import Push
from chefia_rt.domain import OpRecord
from chefia_rt.hub import Hub, Outbound, ReadOps, Session
from tests.helpers import decode_server_frame


def parse_frames(data: bytes) -> list[str | bytes]:
    """Server frames as websockets' own parser reads them (a client's view of the wire)."""
    reader = StreamReader()
    reader.feed_data(data)
    payloads: list[str | bytes] = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=False, max_size=None, extensions=[])
        try:
            next(parser)
        except StopIteration as done:
            frame = done.value
        assert frame.fin
        payloads.append(frame.data.decode() if frame.opcode is Opcode.TEXT else bytes(frame.data))
    return payloads


class FakeTransport:
    """Keeps what the session writes; `full` makes the send buffer full until `drained` is set."""

    def __init__(self) -> None:
        self.frames: list[str | bytes] = []
        self.writes = 0
        self.full = False
        self.drained = asyncio.Event()

    def write(self, frames: bytes) -> None:
        self.writes += 1
        self.frames.extend(parse_frames(frames))

    def writable(self) -> bool:
        return not self.full

    async def drain(self) -> None:
        await self.drained.wait()
        self.full = False

    async def close(self, code: int, reason: str) -> None:
        return None

    def messages(self) -> list[dict[str, Any]]:
        return [m for f in self.frames for m in decode_server_frame(f)]


def record(seq: int, terminal: str) -> OpRecord:
    return OpRecord(
        id=f"op{seq}",
        store_id="s1",
        entity_type="tables",
        entity_id=f"t{seq}",
        operation="UPDATE",
        data={"n": seq},
        version=1,
        seq=seq,
        status="applied",
        conflict_resolved=False,
        terminal_id=terminal,
        user_id=None,
        priority="medium",
        timestamp="2024-01-15T10:30:00.000000Z",
        server_time="2024-01-15T10:30:00.000000Z",
    )


LOG = [record(1, "other"), record(2, "other"), record(3, "me"), record(4, "other")]
COMMITTED: list[OpRecord] = []  # what storage holds so far


async def read_ops(store_id: str, after: int, limit: int) -> list[OpRecord]:
    return [r for r in COMMITTED if r.seq is not None and r.seq > after][:limit]


def session(transport: FakeTransport) -> Session:
    limits = Outbound(
        queue_size=100, urgent_size=100, batch_max=10, batch_window=0, compression_threshold=None
    )
    return Session("me", "pos", "s1", "sid", "json", None, transport, limits)


def started(read: ReadOps, gap_wait: float) -> tuple[FakeTransport, Hub, Session]:
    """A session attached to a new hub, started, with storage holding op 1."""
    transport = FakeTransport()
    hub = Hub(read, gap_wait=gap_wait)
    s = session(transport)
    hub.attach(s)
    s.start()
    COMMITTED[:] = LOG[:1]
    return transport, hub, s


async def settle(s: Session) -> None:
    """Until the session is live with nothing queued; failing, never giving up silently."""
    for _ in range(1000):
        if s.live and not s.queued:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the session never went live with an empty queue")


async def test_a_gap_fill_never_echoes_the_sessions_own_op() -> None:
    # Live at seq 1; our own op 3 is committed, and its local publish overtakes another
    # worker's op 2, which does not come in time: the gap is filled from storage, which
    # holds 2, 3 and 4.
    transport, hub, s = started(read_ops, gap_wait=0.01)
    hub.deliver("s1", [Push(LOG[0], "other")])  # head 1
    hub.resume(s, 1)
    await settle(s)
    COMMITTED[:] = LOG[:3]
    s.own_ops.add("op3")  # submitted by this session (node.submit)
    hub.deliver("s1", [Push(LOG[2], "me")])  # seq 3 before 2: a gap
    await asyncio.sleep(0.02)  # 2 did not come within the wait
    await settle(s)
    COMMITTED[:] = LOG
    hub.deliver("s1", [Push(LOG[1], "other"), Push(LOG[3], "other")])
    await settle(s)
    seqs = [m["operation"]["seq"] for m in transport.messages() if m["type"] == "data_sync"]
    assert seqs == [2, 4]
    assert s.next_seq == 5
    assert not s.own_ops
    await s.stop()


async def test_a_push_that_overtook_the_one_before_it_waits_for_it() -> None:
    """Another worker's op 2 comes after this worker's op 3 (each publishes after its own
    commit): 3 waits for 2 instead of sending the session to storage, and both go in order."""
    reads: list[int] = []

    async def counted(store_id: str, after: int, limit: int) -> list[OpRecord]:
        reads.append(after)
        return await read_ops(store_id, after, limit)

    transport, hub, s = started(counted, gap_wait=30)
    hub.resume(s, 0)
    await settle(s)
    reads.clear()
    COMMITTED[:] = LOG
    s.own_ops.add("op3")
    hub.deliver("s1", [Push(LOG[2], "me")])
    hub.deliver("s1", [Push(LOG[3], "other")])
    await settle(s)
    assert [m for m in transport.messages() if m["type"] == "data_sync"][1:] == []
    hub.deliver("s1", [Push(LOG[1], "other")])
    await settle(s)
    seqs = [m["operation"]["seq"] for m in transport.messages() if m["type"] == "data_sync"]
    assert seqs == [1, 2, 4]  # 3 is the session's own
    assert (s.next_seq, s.own_ops, reads) == (5, set(), [])
    assert not hub._early  # nothing left waiting, no timer
    await s.stop()


async def test_a_resume_replays_the_terminals_own_ops() -> None:
    transport = FakeTransport()
    hub = Hub(read_ops)
    s = session(transport)
    hub.attach(s)
    s.start()
    COMMITTED[:] = LOG
    s.own_ops.add("op3")  # sent in an earlier life of the stream ...
    s.own_ops.clear()  # ... which a resume forgets (node.position)
    hub.resume(s, 0)
    await settle(s)
    seqs = [m["operation"]["seq"] for m in transport.messages() if m["type"] == "data_sync"]
    assert seqs == [1, 2, 3, 4]
    await s.stop()


class KeepingTransport(FakeTransport):
    """Also keeps the bytes objects written, to tell shared frames from copies."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[bytes] = []

    def write(self, frames: bytes) -> None:
        self.raw.append(frames)
        super().write(frames)


def receiver(name: str, transport: FakeTransport, encoding: str, **limits: Any) -> Session:
    outbound = Outbound(
        queue_size=100,
        urgent_size=100,
        batch_max=limits.get("batch_max", 10),
        batch_window=limits.get("batch_window", 0),
        compression_threshold=None,
    )
    return Session(name, "kds", "s1", f"sid-{name}", encoding, None, transport, outbound)


async def live_hub(*sessions: Session) -> Hub:
    COMMITTED[:] = []
    hub = Hub(read_ops)
    for s in sessions:
        hub.attach(s)
        s.start()
        hub.resume(s, 0)
    for s in sessions:
        await settle(s)
    return hub


async def test_a_push_is_framed_once_and_the_same_bytes_go_to_every_receiver() -> None:
    for encoding in ("json", "msgpack"):
        transports = [KeepingTransport() for _ in range(3)]
        sessions = [receiver(f"kds-{i}", t, encoding) for i, t in enumerate(transports)]
        hub = await live_hub(*sessions)
        hub.deliver("s1", [Push(record(1, "pos"), "pos")])
        for s in sessions:
            await settle(s)
        first = transports[0].raw[0]
        assert all(t.raw == [first] for t in transports)
        assert all(t.raw[0] is first for t in transports), "one frame object, not copies"
        assert [m["operation"]["seq"] for m in transports[0].messages()] == [1]
        assert all(s.messages_out == 1 for s in sessions)
        for s in sessions:
            await s.stop()


async def test_a_batch_is_framed_once_for_the_sessions_that_send_it_together() -> None:
    transports = [KeepingTransport() for _ in range(3)]
    sessions = [
        receiver(f"kds-{i}", t, "msgpack", batch_window=0.01) for i, t in enumerate(transports)
    ]
    hub = await live_hub(*sessions)
    hub.deliver("s1", [Push(record(seq, "pos"), "pos") for seq in (1, 2, 3)])
    for s in sessions:
        await settle(s)
    batch = transports[0].raw[0]
    assert all(t.raw == [batch] and t.raw[0] is batch for t in transports)
    messages = transports[0].messages()
    assert [m["operation"]["seq"] for m in messages] == [1, 2, 3]
    assert all(s.messages_out == 3 for s in sessions)
    for s in sessions:
        await s.stop()


async def test_a_full_send_buffer_holds_the_lanes_until_it_drains() -> None:
    transport = FakeTransport()
    s = receiver("kds-1", transport, "json")
    hub = await live_hub(s)
    transport.full = True
    hub.deliver("s1", [Push(record(seq, "pos"), "pos") for seq in (1, 2, 3)])
    await asyncio.sleep(0.02)
    assert transport.frames == [] and s.queued == 3
    transport.drained.set()
    await settle(s)
    assert [m["operation"]["seq"] for m in transport.messages()] == [1, 2, 3]
    assert s.bytes_out == sum(len(f) for f in transport.frames)  # payload bytes, ASCII JSON
    await s.stop()


async def test_an_idle_session_holds_no_queue_task_or_timer() -> None:
    """What keeps idle connections cheap: once its lanes drain and its catch-up is done, a
    session holds no deque, task, timer or future of its own."""
    tasks = len(asyncio.all_tasks())
    transport = FakeTransport()
    s = receiver("kds-1", transport, "msgpack", batch_window=0.002)
    hub = await live_hub(s)
    s.send({"type": "pong", "timestamp": 1})
    hub.deliver("s1", [Push(record(1, "pos"), "pos")])
    await settle(s)
    await asyncio.sleep(0.01)
    assert len(transport.messages()) == 2
    assert len(asyncio.all_tasks()) == tasks
    assert (s._urgent, s._pushes, s._flush_at, s._drain, s._room, s._catch_up) == (None,) * 6
    await s.stop()

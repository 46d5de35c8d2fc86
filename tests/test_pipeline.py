"""The write pipeline on its own: a real SQLite store and the in-process bus, sessions on the
hub's test transport, and a sink that keeps every answer it is told about."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from chefia_rt.answers import Answer
from chefia_rt.bus.base import Push
from chefia_rt.bus.memory import MemoryBus
from chefia_rt.cache import RequestCache
from chefia_rt.domain import EntityKey, Operation, Resolution
from chefia_rt.errors import Overloaded, StorageUnavailable
from chefia_rt.hub import Outbound, Session
from chefia_rt.pipeline import Limits, WritePipeline, batch_request
from chefia_rt.store.base import Laps
from chefia_rt.store.sqlite import SQLiteStore
from chefia_rt.sync.engine import Engine
from tests.test_hub import FakeTransport

STAMP = "2024-01-15T10:30:00.000000Z"


class Kept:
    """An AnswerSink that keeps what it hears."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.commits: list[int] = []
        self.laps: list[dict[str, float]] = []
        self.flushes = 0

    def answered(self, answer: Answer) -> None:
        self.answers.append(answer)

    def committed(self, operations: int, seconds: float, laps: Mapping[str, float]) -> None:
        self.commits.append(operations)
        self.laps.append(dict(laps))

    async def flush(self) -> None:
        self.flushes += 1


class Rig:
    def __init__(self, store: SQLiteStore, bus: MemoryBus, queue_size: int = 1000) -> None:
        self.store, self.bus = store, bus
        self.sink = Kept()
        self.published: list[tuple[str, list[Push]]] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        cache = RequestCache(store, bus, {}, False)
        self.pipeline = WritePipeline(
            Limits(batch_max_ops=500, queue_size=queue_size, commit_timeout=5.0),
            store,
            bus,
            Engine(),
            cache,
            self.sink,
            self.spawn,
        )

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)

    def deliver(self, store_id: str, pushes: Sequence[Push]) -> None:
        self.published.append((store_id, list(pushes)))

    def session(self, terminal_id: str) -> tuple[Session, FakeTransport]:
        transport = FakeTransport()
        limits = Outbound(1000, 1000, 100, 0.002, None)
        session = Session(
            terminal_id, "pos", "s1", uuid.uuid4().hex, "msgpack", None, transport, limits
        )
        session.start()
        return session, transport

    async def run(self, *items: tuple[Operation | Resolution, Session]) -> None:
        for item, session in items:
            self.pipeline.submit(item, session, time.monotonic())
        await self.pipeline.answered_so_far()
        await asyncio.sleep(0.01)  # the sessions' lanes flush on the next loop turns


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = SQLiteStore(str(tmp_path / "chefia.db"))
    bus = MemoryBus(lock_max=10)
    await store.open()
    rig = Rig(store, bus)
    await bus.start(rig.deliver, lambda *a: None, lambda: None)
    rig.pipeline.start()
    try:
        yield rig
    finally:
        await rig.pipeline.stop()
        await bus.close()
        await store.close()


def op(op_id: str, entity_id: str, data: dict[str, Any], version: int = 0, **kw: Any) -> Operation:
    kind = kw.pop("entity_type", "tables")
    operation = kw.pop("operation", "UPDATE" if version else "CREATE")
    return Operation(op_id, "s1", kind, entity_id, operation, data, version, STAMP, "pos-1", **kw)


def answered(transport: FakeTransport) -> list[dict[str, Any]]:
    return [m for m in transport.messages() if m["type"] != "connection_established"]


async def test_a_committed_batch_reports_where_its_time_went(rig: Rig) -> None:
    pos, _ = rig.session("pos-1")
    await rig.run((op("a", "t1", {"n": 1}), pos))
    (laps,) = rig.sink.laps
    stages = ["leases", "wait", "read", "decide", "write", "commit", "sync", "cache", "answer"]
    assert list(laps) == stages
    assert all(seconds >= 0 for seconds in laps.values())


def test_the_store_notes_its_stages_where_the_writer_does() -> None:
    laps = Laps()  # empty, as on PostgreSQL, which has no lease check before the commit
    assert batch_request([op("a", "t1", {"n": 1})], laps).laps is laps


async def test_one_batch_one_commit_one_answer_each(rig: Rig) -> None:
    pos, wire = rig.session("pos-1")
    await rig.run((op("a", "t1", {"n": 1}), pos), (op("b", "t2", {"n": 2}), pos))
    assert rig.sink.commits == [2] and rig.sink.flushes == 1
    assert [(a.status, a.entity_type, a.operation) for a in rig.sink.answers] == [
        ("applied", "tables", "CREATE"),
        ("applied", "tables", "CREATE"),
    ]
    assert all(a.latency is not None and a.latency >= 0 for a in rig.sink.answers)
    assert not any(a.conflicted or a.policy or a.noted for a in rig.sink.answers)
    messages = answered(wire)
    assert [(m["type"], m["operation_id"], m["seq"]) for m in messages] == [
        ("sync_confirmation", "a", 1),
        ("sync_confirmation", "b", 2),
    ]
    # Published once, in seq order, with the sender as origin (so it is not echoed to it).
    assert [(s, [p.record.seq for p in ps], ps[0].origin) for s, ps in rig.published] == [
        ("s1", [1, 2], "pos-1")
    ]
    # Still its own until its stream passes them, so neither is pushed back to it.
    assert pos.own_ops == {"a", "b"}


async def test_a_retry_is_a_duplicate_counted_as_no_new_work(rig: Rig) -> None:
    pos, wire = rig.session("pos-1")
    await rig.run((op("a", "t1", {"n": 1}), pos))
    await rig.run((op("a", "t1", {"n": 1}), pos))
    assert [a.status for a in rig.sink.answers] == ["applied", "duplicate"]
    assert rig.sink.answers[1].latency is None
    assert [m["status"] for m in answered(wire)] == ["applied", "duplicate"]


async def test_a_conflict_is_answered_with_its_policy_and_noted_for_the_monitors(rig: Rig) -> None:
    pos, wire = rig.session("pos-1")
    kind = {"entity_type": "cashier_operations"}  # manual resolution, under a lock
    key = EntityKey("s1", "cashier_operations", "c1")
    taken, _ = await rig.bus.acquire_lease(key, "pos-1", "lock-1", 60)
    assert taken
    await rig.run((op("a", "c1", {"amount": 1}, **kind), pos))
    await rig.run((op("b", "c1", {"amount": 2}, version=2, **kind), pos))
    await rig.run((op("c", "c1", {"amount": 3}, version=2, **kind), pos))  # a stale base
    last = rig.sink.answers[-1]
    assert (last.status, last.policy, last.conflicted) == ("conflict", "manual_resolution", True)
    assert isinstance(last.noted, Operation) and last.noted.id == "c"
    assert last.latency is not None  # new work: a conflict to resolve
    message = answered(wire)[-1]
    assert (message["type"], message["operation_id"]) == ("sync_conflict", "c")
    assert message["policy"] == "manual_resolution"
    assert [p.record.id for _, ps in rig.published for p in ps] == ["a", "b"]


async def test_an_operation_the_lease_forbids_is_refused_and_not_committed(rig: Rig) -> None:
    pos, wire = rig.session("pos-1")
    key = EntityKey("s1", "tables", "t1")
    taken, _ = await rig.bus.acquire_lease(key, "pos-2", "lock-1", 60)
    assert taken
    await rig.run((op("a", "t1", {"n": 1}), pos))
    (refusal,) = answered(wire)
    assert (refusal["type"], refusal["code"], refusal["operation_id"]) == ("sync_error", 4009, "a")
    assert [(a.status, a.latency) for a in rig.sink.answers] == [("error", None)]
    assert rig.sink.commits == [] and rig.published == []
    assert await rig.store.logged([("s1", "a")]) == set()
    assert pos.own_ops == set()


async def test_a_failed_commit_answers_every_item_retry(rig: Rig) -> None:
    pos, wire = rig.session("pos-1")
    await rig.store.close()  # storage gone under the pipeline
    await rig.run((op("a", "t1", {"n": 1}), pos), (op("b", "t2", {"n": 2}), pos))
    assert [(m["type"], m["code"]) for m in answered(wire)] == [("sync_error", 1013)] * 2
    assert [a.status for a in rig.sink.answers] == ["retry", "retry"]
    assert rig.sink.commits == [] and rig.published == []
    assert pos.own_ops == set()


async def test_a_full_queue_and_a_draining_pipeline_refuse_at_once(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "chefia.db"))
    bus = MemoryBus(lock_max=10)
    await store.open()
    rig = Rig(store, bus, queue_size=2)  # the writer is not started: nothing leaves the queue
    pos, _ = rig.session("pos-1")
    try:
        rig.pipeline.submit(op("a", "t1", {}), pos, 0.0)
        rig.pipeline.submit(op("b", "t2", {}), pos, 0.0)
        with pytest.raises(Overloaded):
            rig.pipeline.submit(op("c", "t3", {}), pos, 0.0)
        assert pos.own_ops == {"a", "b"}  # hidden from its own stream from the moment queued
        assert not rig.pipeline.idle.is_set()
        rig.pipeline.start()
        await rig.pipeline.drain(timeout=10)
        assert rig.pipeline.idle.is_set() and rig.sink.commits == [2]
        with pytest.raises(StorageUnavailable):
            rig.pipeline.submit(op("d", "t4", {}), pos, 0.0)
    finally:
        await rig.pipeline.stop()
        await store.close()

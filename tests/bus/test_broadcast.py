"""The Broadcast port (and its Signals): committed operations and signals reach every
worker, each publisher's in order, once; the bus's own lifecycle (kind, ping, resync).

Tests taking `worker` run on every backend (the in-process bus and Redis); tests taking `workers`
need a second worker of the same deployment, and so run on Redis only.
"""

from __future__ import annotations

import asyncio
from typing import Any

from chefia_rt.bus.base import Push
from chefia_rt.bus.redis import RedisBus
from tests.bus.conftest import (
    UNICODE_DATA,
    Worker,
    drop_prefix,
    eventually,
    heard_everything,
    pushes,
    record,
    redis_reachable,
    unique_prefix,
)
from tests.services import REDIS_URL

# ---- pushes ---------------------------------------------------------------------------------


async def test_publish_delivers_locally_in_order(worker: Worker) -> None:
    for first in range(1, 60, 3):
        await worker.bus.publish("s1", pushes(first, 3))
        # Delivered to this worker's own hub by the time publish returns, Redis or not.
        assert worker.seqs()[-1] == first + 2
    await worker.bus.publish("s2", pushes(1, 2, "s2"))
    await asyncio.sleep(0.2)  # an echo through Redis would arrive by now
    assert worker.seqs("s1") == list(range(1, 61))
    assert worker.seqs("s2") == [1, 2]
    assert [s for s, _ in worker.delivered] == ["s1"] * 20 + ["s2"]


async def test_publish_keeps_records_and_origin_intact(worker: Worker) -> None:
    sent = [
        Push(record(7, data=UNICODE_DATA, user_id="u-ü", deleted=True, priority="high"), "kds-9"),
        Push(record(8, version=None, conflict_resolved=True, status="resolved"), "pos-2"),
    ]
    await worker.bus.publish("s1", sent)
    assert worker.delivered == [("s1", sent)]


async def test_publish_reaches_the_other_worker_once_in_order(
    workers: tuple[Worker, Worker],
) -> None:
    a, b = workers
    for first in range(1, 200, 4):
        await a.bus.publish("s1", pushes(first, 4))
    await b.bus.publish("s2", pushes(1, 5, "s2"))
    await eventually(lambda: len(b.seqs("s1")) >= 200, what="A's pushes at B")
    await eventually(lambda: len(a.seqs("s2")) >= 5, what="B's pushes at A")
    await heard_everything((a, b), (b, a))  # anything delivered twice is here by now
    # Exactly once, in order, at both workers; no echo to the publisher's own deliver.
    assert a.seqs("s1") == list(range(1, 201))
    assert b.seqs("s1") == list(range(1, 201))
    assert a.seqs("s2") == [1, 2, 3, 4, 5]
    assert b.seqs("s2") == [1, 2, 3, 4, 5]
    # Batches stay batches, and the other worker gets the records as they were published.
    assert [len(ps) for s, ps in b.delivered if s == "s1"] == [4] * 50
    assert [ps for s, ps in b.delivered if s == "s1"] == [ps for s, ps in a.delivered if s == "s1"]


async def test_records_cross_workers_intact(workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    sent = [
        Push(record(7, data=UNICODE_DATA, user_id="u-ü", deleted=True, priority="high"), "kds-9"),
        Push(record(8, version=None, conflict_resolved=True, status="resolved"), "pos-2"),
        Push(record(9, store_id="loja:ção", entity_id="mesa:1/ü"), "pos:1"),
    ]
    await a.bus.publish("loja:ção", sent)
    await eventually(lambda: len(b.delivered) == 1)
    assert b.delivered == [("loja:ção", sent)]


async def test_concurrent_publishers_each_stay_in_order(workers: tuple[Worker, Worker]) -> None:
    """Two workers publishing to one store at once: each publisher's order is kept everywhere."""
    a, b = workers

    async def publish(w: Worker, origin: str) -> None:
        for i in range(100):
            await w.bus.publish("s1", [Push(record(i, id=f"{origin}-{i}"), origin)])

    await asyncio.gather(publish(a, "A"), publish(b, "B"))
    await eventually(lambda: len(a.delivered) == 200 and len(b.delivered) == 200)
    await heard_everything((a, b), (b, a))
    for w in (a, b):
        ids = [p.record.id for _, ps in w.delivered for p in ps]
        assert len(ids) == 200
        for origin in ("A", "B"):
            assert [i for i in ids if i.startswith(origin)] == [f"{origin}-{i}" for i in range(100)]


async def test_no_resync_without_a_reconnect(workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    await a.bus.publish("s1", pushes(1, 1))
    await eventually(lambda: bool(b.delivered))
    assert (a.resyncs, b.resyncs) == (0, 0)


async def test_workers_whose_ids_share_a_prefix_hear_each_other_once() -> None:
    """A worker drops its own messages without unpacking them, by their start (its id): a
    worker whose id begins with another's is still heard, once, pushes and signals alike."""
    await redis_reachable(REDIS_URL)
    prefix = unique_prefix()
    buses = [RedisBus(REDIS_URL, prefix=prefix, worker_id=w) for w in ("w1", "w10")]
    short, long = Worker(buses[0]), Worker(buses[1])
    heard: dict[str, list[Any]] = {"w1": [], "w10": []}
    try:
        for bus, one in zip(buses, (short, long), strict=True):
            bus.on_signal("t", heard[bus.worker_id].append)
            await one.start()
        await short.bus.publish("s1", pushes(1, 2))
        await long.bus.publish("s1", pushes(3, 2))
        await short.bus.signal("t", {"from": "w1"})
        await long.bus.signal("t", {"from": "w10"})
        await eventually(lambda: len(short.seqs()) == 4 and len(long.seqs()) == 4)
        await eventually(lambda: len(heard["w1"]) == 2 and len(heard["w10"]) == 2)
        await heard_everything((short, long), (long, short))  # anything heard twice is here
        assert short.seqs() == [1, 2, 3, 4]  # its own at once, the other's from Redis
        assert long.seqs() == [3, 4, 1, 2]
        for signals in heard.values():
            assert sorted(s["from"] for s in signals) == ["w1", "w10"]
    finally:
        await short.bus.close()
        await long.bus.close()
        await drop_prefix(REDIS_URL, prefix)


# ---- signals --------------------------------------------------------------------------------


async def test_signal_reaches_this_worker_before_returning(worker: Worker) -> None:
    got: list[dict[str, Any]] = []
    worker.bus.on_signal("stats", got.append)
    sent = {"worker": "w1", "n": 3, "nested": {"x": [1, 2]}, "text": UNICODE_DATA["nome"]}
    await worker.bus.signal("stats", sent)
    assert got == [sent]
    assert got[0] is not sent  # a copy, as another worker would get
    await worker.bus.signal("nobody-listens", {"a": 1})  # no handler: ignored
    await asyncio.sleep(0.2)  # an echo through Redis would arrive by now
    assert got == [sent]


async def test_a_failing_signal_handler_harms_nothing(worker: Worker) -> None:
    got: list[dict[str, Any]] = []

    def broken(payload: dict[str, Any]) -> None:
        raise RuntimeError("handler bug")

    worker.bus.on_signal("broken", broken)
    worker.bus.on_signal("fine", got.append)
    await worker.bus.signal("broken", {"a": 1})
    await worker.bus.signal("fine", {"b": 2})
    await worker.bus.publish("s1", pushes(1, 1))
    assert got == [{"b": 2}]
    assert worker.seqs() == [1]


async def test_signals_reach_the_other_worker_once_in_order(
    workers: tuple[Worker, Worker],
) -> None:
    a, b = workers
    at_a: list[dict[str, Any]] = []
    at_b: list[dict[str, Any]] = []
    a.bus.on_signal("feed", at_a.append)
    b.bus.on_signal("feed", at_b.append)
    for i in range(50):
        await a.bus.signal("feed", {"from": "a", "i": i})
    await b.bus.signal("feed", {"from": "b", "i": 0})
    await eventually(lambda: len(at_b) == 51 and len(at_a) == 51, what="signals at both")
    await heard_everything((a, b), (b, a))
    for got in (at_a, at_b):
        assert [s["i"] for s in got if s["from"] == "a"] == list(range(50))
        assert [s for s in got if s["from"] == "b"] == [{"from": "b", "i": 0}]
    # Ordered with the pushes of the same worker: a signal sent after a publish arrives after it.
    order: list[str] = []
    b.bus.on_signal("after", lambda _: order.append("signal"))
    seen = len(b.delivered)
    await a.bus.publish("s9", pushes(1, 1, "s9"))
    await a.bus.signal("after", {})
    await eventually(lambda: bool(order))
    assert len(b.delivered) == seen + 1


# ---- health ---------------------------------------------------------------------------------


async def test_ping(worker: Worker) -> None:
    assert await worker.bus.ping() is True


async def test_kind(worker: Worker) -> None:
    assert worker.bus.kind in ("memory", "redis")

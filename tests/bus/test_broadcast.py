"""The bus contract: what every bus backend does, written against the Bus protocol only.

Tests taking `worker` run on every backend (the in-process bus and Redis); tests taking `workers`
need a second worker of the same deployment, and so run on Redis only.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from chefia_rt.bus.base import CacheEntry, Push
from chefia_rt.bus.redis import RedisBus
from chefia_rt.domain import EntityKey, OpRecord
from tests.bus.conftest import (
    Worker,
    drop_prefix,
    eventually,
    redis_reachable,
    unique_prefix,
)
from tests.services import REDIS_URL

UNICODE_DATA = {"nome": "Açaí com paçoca 🍧", "obs": 'sem cebola — "já"', "zh": "牛肉面"}


def record(seq: int | None, store_id: str = "s1", **fields: Any) -> OpRecord:
    values: dict[str, Any] = {
        "id": f"op-{store_id}-{seq}",
        "store_id": store_id,
        "entity_type": "tables",
        "entity_id": f"t{seq}",
        "operation": "UPDATE",
        "data": {"seats": 4, "n": seq},
        "version": 1,
        "seq": seq,
        "status": "applied",
        "conflict_resolved": False,
        "terminal_id": "pos-1",
        "user_id": None,
        "priority": "medium",
        "timestamp": "2024-01-15T10:30:00.000Z",
        "server_time": "2024-01-15T10:30:00.123Z",
    }
    values.update(fields)
    return OpRecord(**values)


def pushes(first: int, count: int, store_id: str = "s1", origin: str = "pos-1") -> list[Push]:
    return [Push(record(seq, store_id), origin) for seq in range(first, first + count)]


KEY = EntityKey("s1", "orders", "order-1")


async def heard_everything(*pairs: tuple[Worker, Worker]) -> None:
    """Prove by order, not by waiting, that whatever the senders sent before has reached the
    receivers it would reach (a duplicate, an echo, a late signal): each sender publishes a
    marker push, and Redis hands a subscriber its messages in the order it took them, so once
    a receiver holds its sender's marker, everything sent earlier is there too. The markers
    are then dropped from what the workers delivered."""
    for n, (sender, _) in enumerate(pairs):
        await sender.bus.publish(f"marker-{n}", [Push(record(1, f"marker-{n}"), "marker")])
    for n, (_, receiver) in enumerate(pairs):
        await eventually(
            lambda r=receiver, store=f"marker-{n}": any(s == store for s, _ in r.delivered),
            what=f"marker {n}",
        )
    for pair in pairs:
        for w in pair:
            w.delivered[:] = [(s, ps) for s, ps in w.delivered if not s.startswith("marker-")]


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


# ---- leases ---------------------------------------------------------------------------------


async def test_lease_acquire_renew_refuse(worker: Worker) -> None:
    bus = worker.bus
    assert await bus.get_lease(KEY) is None
    before = time.time()
    taken, lease = await bus.acquire_lease(KEY, "pos-1", "lock-a", 30)
    assert taken
    assert lease is not None
    assert (lease.key, lease.owner, lease.lock_id) == (KEY, "pos-1", "lock-a")
    assert before + 29 <= lease.expires_at <= time.time() + 30.01
    held = await bus.get_lease(KEY)
    assert held is not None
    assert (held.owner, held.lock_id) == ("pos-1", "lock-a")
    assert held.expires_at == pytest.approx(lease.expires_at, abs=0.002)

    # The owner renews: a new lock_id and a later expiry replace the old ones.
    taken, renewed = await bus.acquire_lease(KEY, "pos-1", "lock-b", 60)
    assert taken
    assert renewed is not None
    assert (renewed.owner, renewed.lock_id) == ("pos-1", "lock-b")
    assert renewed.expires_at > lease.expires_at + 29

    # Another terminal is refused and told who holds it, with which lock, until when.
    taken, holder = await bus.acquire_lease(KEY, "pos-2", "lock-c", 30)
    assert not taken
    assert holder is not None
    assert (holder.key, holder.owner, holder.lock_id) == (KEY, "pos-1", "lock-b")
    assert holder.expires_at == pytest.approx(renewed.expires_at, abs=0.002)
    held = await bus.get_lease(KEY)
    assert held is not None
    assert (held.owner, held.lock_id) == ("pos-1", "lock-b")


async def test_lease_expires_by_ttl(worker: Worker) -> None:
    bus = worker.bus
    taken, _ = await bus.acquire_lease(KEY, "pos-1", "lock-a", 1.0)
    assert taken
    assert (await bus.acquire_lease(KEY, "pos-2", "lock-b", 1))[0] is False
    await asyncio.sleep(1.1)
    assert await bus.get_lease(KEY) is None
    assert await bus.release_lease(KEY, "pos-1") is False  # expired: nothing to release
    taken, lease = await bus.acquire_lease(KEY, "pos-2", "lock-b", 30)
    assert taken
    assert lease is not None
    assert lease.owner == "pos-2"


async def test_lease_release_by_owner_only(worker: Worker) -> None:
    bus = worker.bus
    await bus.acquire_lease(KEY, "pos-1", "lock-a", 30)
    assert await bus.release_lease(KEY, "pos-2") is False
    held = await bus.get_lease(KEY)
    assert held is not None
    assert held.owner == "pos-1"
    assert await bus.release_lease(KEY, "pos-1") is True
    assert await bus.get_lease(KEY) is None
    assert await bus.release_lease(KEY, "pos-1") is False
    taken, lease = await bus.acquire_lease(KEY, "pos-2", "lock-b", 30)
    assert taken
    assert lease is not None
    assert lease.owner == "pos-2"


async def test_leases_are_per_entity_and_per_store(worker: Worker) -> None:
    bus = worker.bus
    keys = [
        EntityKey("s1", "orders", "o1"),
        EntityKey("s1", "orders", "o2"),
        EntityKey("s1", "tables", "o1"),
        EntityKey("s2", "orders", "o1"),
    ]
    for i, key in enumerate(keys):
        taken, _ = await bus.acquire_lease(key, f"pos-{i}", f"lock-{i}", 30)
        assert taken, key
    for i, key in enumerate(keys):
        lease = await bus.get_lease(key)
        assert lease is not None
        assert (lease.owner, lease.lock_id) == (f"pos-{i}", f"lock-{i}")


async def test_many_leases_read_at_once_in_order(worker: Worker) -> None:
    """The writer reads a batch's leases in one call: each answer at its key's place, None
    where nobody holds one (or it expired), beyond one round trip's keys."""
    a = b = worker
    keys = [EntityKey("s1", "tables", f"t{i}") for i in range(1200)]
    assert await b.bus.get_leases(keys) == [None] * len(keys)
    assert (await a.bus.acquire_lease(keys[3], "pos-1", "l3", 30))[0]
    assert (await a.bus.acquire_lease(keys[1100], "pos-2", "l1100", 30))[0]
    assert (await a.bus.acquire_lease(keys[7], "pos-3", "l7", 0.05))[0]
    await asyncio.sleep(0.1)
    leases = await b.bus.get_leases(keys)
    held = {i: (lease.key, lease.owner) for i, lease in enumerate(leases) if lease is not None}
    assert held == {3: (keys[3], "pos-1"), 1100: (keys[1100], "pos-2")}
    assert await b.bus.get_leases([]) == []


async def test_ids_with_separators_and_unicode_do_not_collide(worker: Worker) -> None:
    bus = worker.bus
    pairs = [
        (EntityKey("a:b", "c", "x"), EntityKey("a", "b:c", "x")),
        (EntityKey("a", "b:c", "x"), EntityKey("a", "b", "c:x")),
        (EntityKey("a", "b", '"x"'), EntityKey("a", "b", "x")),
        (
            EntityKey("loja-ção", "pedidos", "mesa 1 🍧"),
            EntityKey("loja-cao", "pedidos", "mesa 1 🍧"),
        ),
        (EntityKey("a", "b", "x]"), EntityKey("a", 'b", "x', "]")),
    ]
    for first, second in pairs:
        assert (await bus.acquire_lease(first, "t1", "l1", 30))[0]
        assert (await bus.acquire_lease(second, "t2", "l2", 30))[0], (first, second)
        one, two = await bus.get_lease(first), await bus.get_lease(second)
        assert one is not None
        assert two is not None
        assert (one.key, one.owner, two.key, two.owner) == (first, "t1", second, "t2")
        assert await bus.release_lease(first, "t1")
        still = await bus.get_lease(second)
        assert still is not None
        assert still.owner == "t2"
        assert await bus.release_lease(second, "t2")

    # A terminal's leases are found by (store, terminal): "a:b"/"c" is not "a"/"b:c".
    k1, k2 = EntityKey("a:b", "orders", "o"), EntityKey("a", "orders", "o")
    await bus.register("a:b", "c", "sess-1", time.time())
    await bus.register("a", "b:c", "sess-2", time.time())
    assert (await bus.acquire_lease(k1, "c", "l1", 30))[0]
    assert (await bus.acquire_lease(k2, "b:c", "l2", 30))[0]
    await bus.unregister("a:b", "c", "sess-1")
    assert await bus.get_lease(k1) is None
    lease = await bus.get_lease(k2)
    assert lease is not None
    assert lease.owner == "b:c"


async def test_leases_hold_across_workers(workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    taken, lease = await a.bus.acquire_lease(KEY, "pos-1", "lock-a", 30)
    assert taken
    assert lease is not None
    seen = await b.bus.get_lease(KEY)
    assert seen is not None
    assert (seen.owner, seen.lock_id) == ("pos-1", "lock-a")
    taken, holder = await b.bus.acquire_lease(KEY, "pos-2", "lock-b", 30)
    assert not taken
    assert holder is not None
    assert (holder.owner, holder.lock_id) == ("pos-1", "lock-a")
    # The same terminal, now connected to the other worker, renews its own lease there.
    taken, renewed = await b.bus.acquire_lease(KEY, "pos-1", "lock-c", 30)
    assert taken
    assert renewed is not None
    assert renewed.lock_id == "lock-c"
    assert await b.bus.release_lease(KEY, "pos-1")
    assert await a.bus.get_lease(KEY) is None


# ---- presence -------------------------------------------------------------------------------


async def test_unregister_of_the_current_session_releases_its_leases(worker: Worker) -> None:
    bus = worker.bus
    mine = [EntityKey("s1", "orders", "o1"), EntityKey("s1", "cashier_operations", "c1")]
    other_terminal = EntityKey("s1", "orders", "o2")
    same_id_other_store = EntityKey("s2", "orders", "o1")
    await bus.register("s1", "pos-1", "sess-1", time.time())
    for key in mine:
        assert (await bus.acquire_lease(key, "pos-1", "l", 30))[0]
    assert (await bus.acquire_lease(other_terminal, "pos-2", "l", 30))[0]
    assert (await bus.acquire_lease(same_id_other_store, "pos-1", "l", 30))[0]

    await bus.unregister("s1", "pos-1", "sess-1")
    for key in mine:
        assert await bus.get_lease(key) is None, key
    assert await bus.get_lease(other_terminal) is not None
    assert await bus.get_lease(same_id_other_store) is not None
    # Released means free for anyone.
    assert (await bus.acquire_lease(mine[0], "pos-2", "l", 30))[0]


async def test_unregister_of_a_stale_session_releases_nothing(worker: Worker) -> None:
    """The terminal reconnected (a newer session registered) before the old one's end was
    processed: the locks belong to the terminal, which is still there."""
    bus = worker.bus
    await bus.register("s1", "pos-1", "sess-old", time.time())
    assert (await bus.acquire_lease(KEY, "pos-1", "l", 30))[0]
    await bus.register("s1", "pos-1", "sess-new", time.time())
    await bus.unregister("s1", "pos-1", "sess-old")
    held = await bus.get_lease(KEY)
    assert held is not None
    assert held.owner == "pos-1"
    # The newer session's end releases them.
    await bus.unregister("s1", "pos-1", "sess-new")
    assert await bus.get_lease(KEY) is None


async def test_leases_taken_after_reregistering_are_released(worker: Worker) -> None:
    bus = worker.bus
    await bus.register("s1", "pos-1", "sess-1", time.time())
    await bus.acquire_lease(KEY, "pos-1", "l", 30)
    await bus.unregister("s1", "pos-1", "sess-1")
    assert await bus.get_lease(KEY) is None
    await bus.register("s1", "pos-1", "sess-2", time.time())
    await bus.acquire_lease(KEY, "pos-1", "l2", 30)
    await bus.unregister("s1", "pos-1", "sess-2")
    assert await bus.get_lease(KEY) is None


async def test_stale_unregister_across_workers(workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    await a.bus.register("s1", "pos-1", "sess-a", time.time())
    assert (await a.bus.acquire_lease(KEY, "pos-1", "l", 30))[0]
    await b.bus.register("s1", "pos-1", "sess-b", time.time())
    await a.bus.unregister("s1", "pos-1", "sess-a")
    assert await b.bus.get_lease(KEY) is not None
    await b.bus.unregister("s1", "pos-1", "sess-b")
    assert await a.bus.get_lease(KEY) is None


async def test_takeover_reaches_the_other_worker(workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    opened = time.time()
    await a.bus.register("loja:ção", "pos:1", "sess-1", opened)
    await eventually(lambda: bool(b.takeovers), what="takeover at B")
    assert b.takeovers == [("loja:ção", "pos:1", "sess-1", opened)]
    await b.bus.register("s2", "kds-1", "sess-2", opened + 1)
    await eventually(lambda: bool(a.takeovers), what="takeover at A")
    await heard_everything((a, b), (b, a))
    # Each worker hears of the other's sessions only: its own hub already knows its own.
    assert a.takeovers == [("s2", "kds-1", "sess-2", opened + 1)]
    assert b.takeovers == [("loja:ção", "pos:1", "sess-1", opened)]


async def test_no_resync_without_a_reconnect(workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    await a.bus.publish("s1", pushes(1, 1))
    await eventually(lambda: bool(b.delivered))
    assert (a.resyncs, b.resyncs) == (0, 0)


# ---- health ---------------------------------------------------------------------------------


async def test_ping(worker: Worker) -> None:
    assert await worker.bus.ping() is True


async def test_kind(worker: Worker) -> None:
    assert worker.bus.kind in ("memory", "redis")


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


# ---- the RequestCache's shared state --------------------------------------------------------


def entry(
    version: int,
    key: EntityKey = KEY,
    fresh_for: float = 30.0,
    keep_for: float = 60.0,
) -> CacheEntry:
    body = f'{{"v":{version},"k":"{key.entity_id}","t":"{UNICODE_DATA["zh"]}"}}'.encode()
    return CacheEntry(key, version, body, fresh_for, keep_for)


async def test_cache_starts_empty(worker: Worker) -> None:
    slot = await worker.bus.cache_get(KEY, 5.0)
    assert (slot.version, slot.body) == (0, None)
    assert slot.epoch  # a generation exists from the first read on
    assert (await worker.bus.cache_get(KEY, 5.0)).epoch == slot.epoch
    assert await worker.bus.cache_sizes() == {}


async def test_cache_never_lowers_a_version(worker: Worker) -> None:
    bus = worker.bus
    assert await bus.cache_put([entry(3)], None) == 1
    slot = await bus.cache_get(KEY, 5.0)
    assert (slot.version, slot.body) == (3, entry(3).body)
    assert await bus.cache_put([entry(2)], None) == 0  # the writer's puts too
    assert await bus.cache_put([entry(2)], slot) == 0
    assert (await bus.cache_get(KEY, 5.0)).version == 3
    assert await bus.cache_put([entry(3)], slot) == 1  # the same version refreshes
    assert await bus.cache_put([entry(4)], slot) == 1
    assert (await bus.cache_get(KEY, 5.0)).body == entry(4).body
    # Versions beyond a double's exact integers still compare exactly.
    big = 2**60
    assert await bus.cache_put([entry(big + 1)], None) == 1
    assert await bus.cache_put([entry(big)], None) == 0
    assert (await bus.cache_get(KEY, 5.0)).version == big + 1


async def test_cache_batch_put_decides_each_key(worker: Worker) -> None:
    other = EntityKey("s1", "tables", "t:1")
    elsewhere = EntityKey("s2", "orders", "order-1")  # same type and id, another store
    assert await worker.bus.cache_put([entry(5)], None) == 1
    stored = await worker.bus.cache_put([entry(4), entry(1, other), entry(7, elsewhere)], None)
    assert stored == 2
    assert [(await worker.bus.cache_get(k, 5.0)).version for k in (KEY, other, elsewhere)] == [
        5,
        1,
        7,
    ]
    assert await worker.bus.cache_sizes() == {"orders": 2, "tables": 1}


async def test_a_stale_entry_stays_a_floor_until_its_keep_time(worker: Worker) -> None:
    bus = worker.bus
    await bus.cache_put([entry(6, fresh_for=0.05, keep_for=2.0)], None)
    await asyncio.sleep(0.15)
    slot = await bus.cache_get(KEY, 5.0)
    assert (slot.version, slot.body) == (6, None)  # not fresh, but nothing older may go in
    assert await bus.cache_put([entry(5)], slot) == 0
    await asyncio.sleep(2.0)
    assert (await bus.cache_get(KEY, 5.0)).version == 0  # kept no longer
    assert await bus.cache_sizes() == {}


async def test_a_readers_put_needs_its_epoch_and_window(worker: Worker) -> None:
    bus = worker.bus
    slot = await bus.cache_get(KEY, 5.0)
    late = await bus.cache_get(KEY, 0.05)
    await asyncio.sleep(0.15)
    assert await bus.cache_put([entry(1)], late) == 0  # its window has passed
    await bus.cache_clear()
    assert await bus.cache_put([entry(1)], slot) == 0  # read before the clear
    fresh = await bus.cache_get(KEY, 5.0)
    assert fresh.epoch != slot.epoch
    assert await bus.cache_put([entry(1)], fresh) == 1
    await bus.cache_clear()
    assert (await bus.cache_get(KEY, 5.0)).version == 0  # a clear drops everything held
    assert await bus.cache_put([entry(1)], None) == 1  # the writer's put needs no slot


async def test_cache_is_shared_by_the_workers(workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    slot_b = await b.bus.cache_get(KEY, 5.0)
    await a.bus.cache_put([entry(2)], None)
    assert await b.bus.cache_put([entry(1)], slot_b) == 0  # a's newer write is the floor
    got = await b.bus.cache_get(KEY, 5.0)
    assert (got.epoch, got.version, got.body) == (slot_b.epoch, 2, entry(2).body)
    await a.bus.cache_clear()
    assert (await b.bus.cache_get(KEY, 5.0)).version == 0
    assert await b.bus.cache_sizes() == {"orders": 1}  # still kept (stale epoch) until expiry


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

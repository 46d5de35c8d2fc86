"""Fixtures of the bus contract suite: every bus backend passes the contract of each port
(test_broadcast.py, test_presence.py, test_leases.py, test_shared_cache.py).

`worker` is a started bus of each backend with a recorder behind its callbacks. `workers` stands
for two workers of one deployment: two RedisBus instances on the shared Redis with one unique
prefix (a second worker makes no sense for the in-process bus, so it is Redis only). Every Redis
key and channel a test touches is under that prefix, and the keys are deleted afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chefia_rt.bus.base import Bus, Push
from chefia_rt.bus.memory import MemoryBus
from chefia_rt.bus.redis import RedisBus
from chefia_rt.domain import EntityKey, OpRecord
from tests.helpers import eventually
from tests.services import REDIS_URL, service_missing

BACKENDS = ["memory", "redis"]


@dataclass(eq=False)
class Worker:
    """A bus as one worker's node sees it: what reached its deliver, takeover and resync."""

    bus: Bus
    delivered: list[tuple[str, list[Push]]] = field(default_factory=list)
    takeovers: list[tuple[str, str, str, float]] = field(default_factory=list)
    resyncs: int = 0
    on_resync: list[Callable[[], None]] = field(default_factory=list)  # run at each resync

    async def start(self) -> None:
        await self.bus.start(self._deliver, self._takeover, self._resync)

    def _deliver(self, store_id: str, pushes: Sequence[Push]) -> None:
        self.delivered.append((store_id, list(pushes)))

    def _takeover(self, store_id: str, terminal_id: str, session_id: str, at: float) -> None:
        self.takeovers.append((store_id, terminal_id, session_id, at))

    def _resync(self) -> None:
        self.resyncs += 1
        for hook in self.on_resync:
            hook()

    def seqs(self, store_id: str | None = None) -> list[int | None]:
        """Seqs delivered, in delivery order (of one store, or all)."""
        return [p.record.seq for s, ps in self.delivered for p in ps if store_id in (None, s)]


async def redis_reachable(url: str) -> None:
    """Skip (or fail in CI) when the shared Redis does not answer."""
    client = aioredis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        service_missing("Redis", f"{url}: {exc}")
    finally:
        await client.aclose()


async def drop_prefix(url: str, prefix: str) -> None:
    """Delete this test's keys (and only them) from the shared Redis."""
    client = aioredis.from_url(url, socket_timeout=5)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def unique_prefix() -> str:
    return f"test-bus-{uuid.uuid4().hex[:12]}"


async def new_bus(backend: str, prefix: str) -> Bus:
    if backend == "memory":
        return MemoryBus()
    if backend == "redis":
        return RedisBus(REDIS_URL, prefix=prefix)
    raise AssertionError(f"no such backend {backend!r}")


@pytest.fixture(params=BACKENDS)
async def worker(request: pytest.FixtureRequest) -> AsyncIterator[Worker]:
    """A started bus of each backend."""
    prefix = unique_prefix()
    if request.param == "redis":
        await redis_reachable(REDIS_URL)
    one = Worker(await new_bus(request.param, prefix))
    await one.start()
    try:
        yield one
    finally:
        await one.bus.close()
        if request.param == "redis":
            await drop_prefix(REDIS_URL, prefix)


@pytest.fixture
async def workers() -> AsyncIterator[tuple[Worker, Worker]]:
    """Two workers of one deployment: two RedisBus on the shared Redis, one unique prefix."""
    await redis_reachable(REDIS_URL)
    prefix = unique_prefix()
    try:
        async with two_workers(REDIS_URL, prefix) as pair:
            yield pair
    finally:
        await drop_prefix(REDIS_URL, prefix)


@asynccontextmanager
async def two_workers(url: str, prefix: str) -> AsyncIterator[tuple[Worker, Worker]]:
    """Two started RedisBus workers of one deployment (`prefix`) on the Redis at `url`."""
    a = Worker(RedisBus(url, prefix=prefix))
    b = Worker(RedisBus(url, prefix=prefix))
    try:
        await a.start()
        await b.start()
        yield a, b
    finally:
        await a.bus.close()
        await b.bus.close()


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

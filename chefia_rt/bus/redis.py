"""The Redis bus: every worker and node of a deployment joined through one Redis.

- Committed operations are delivered to this worker's hub directly and published for the others
  (`<prefix>:db<N>:ops`). Pub/sub is fast but not complete: a subscriber that reconnects asks
  the node to catch every session up from storage, and the hub fills any seq gap from storage
  too, so nothing is lost or reordered when Redis restarts, is flushed, or drops a slow
  subscriber.
- Channels name the database number N of REDIS_URL as well as the prefix: Redis pub/sub ignores
  the database, and deployments kept apart by it (staging on /1, production on /2) must not
  hear each other. Keys are per database already.
- Signals (`<prefix>:db<N>:signal`): small messages on a topic for every worker (stats, the
  monitor's feed, cache invalidations), sent in order with the pushes by the same publisher.
- Presence: which session of a terminal is current, so that a newer connection on any node
  replaces the older one (4004), and a disconnect releases locks only when it was current.
- Locks: leases in Redis hashes with a Redis expiry, taken and released by Lua scripts so that
  check-and-set is atomic across nodes.
- Leases and presence live only in Redis (it runs without persistence): a Redis that restarts
  empty forgets them, so a lock is lost early (never held late) and the terminal locks again.
  While Redis is unreachable, lock calls raise StorageUnavailable (1013, retry): a write is never
  let past a lock that cannot be checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from chefia_rt.bus.base import Deliver, Push, SignalHandler, Takeover
from chefia_rt.bus.redis_scripts import (
    ACQUIRE,
    CACHE_GET,
    CACHE_PUT,
    READ_LEASES,
    RELEASE,
    UNREGISTER,
)
from chefia_rt.bus.redis_state import CACHE_TIMEOUT, RedisState, cache_epoch_key
from chefia_rt.domain import OpRecord
from chefia_rt.errors import StorageUnavailable
from chefia_rt.sync.locks import DEFAULT_MAX_PER_OWNER

log = logging.getLogger("chefia_rt.bus.redis")


RECONNECT_DELAY = (0.1, 2.0)  # first and longest wait between subscriber reconnects
OUTBOX_SIZE = 10_000  # publish payloads waiting for Redis
PUBLISH_BATCH = 256  # payloads per pipelined round trip
# Connections to Redis per worker, and how long a command waits for one when all are busy.
POOL_SIZE = 64
POOL_WAIT = 5.0
# A subscriber that has heard nothing for this long pings; with no answer as long again, it
# counts as lost and resubscribes (and has its node catch up). A blocking read alone would wait
# forever on a connection whose peer vanished without closing it (a frozen Redis, a dead host,
# a cut network).
LIVENESS = 5.0

# What a record is (its data's JSON text, a writing aid, stays home).
_RECORD_FIELDS = tuple(f.name for f in fields(OpRecord) if f.name != "data_json")


def _record_to_wire(record: OpRecord) -> dict[str, Any]:
    # Shallow: msgpack packs it at once. asdict deep-copied every operation's data first.
    return {name: getattr(record, name) for name in _RECORD_FIELDS}


class RedisBus(RedisState):
    """The bus port on Redis (pub/sub for pushes and control, hashes for presence and locks)."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        prefix: str = "chefia",
        worker_id: str | None = None,
        lock_max: int = DEFAULT_MAX_PER_OWNER,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.lock_max = lock_max
        self.worker_id = worker_id or uuid.uuid4().hex
        # What every message this worker publishes starts with, after the map's one-byte
        # header: its "w" entry (the first key of each).
        self._own_mark = msgpack.packb("w") + msgpack.packb(self.worker_id)
        self._redis: aioredis.Redis | None = None
        self._subscriber: aioredis.Redis | None = None
        self._deliver: Deliver | None = None
        self._takeover: Takeover | None = None
        self._resync: Callable[[], None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        # (channel, payload) in publishing order.
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=OUTBOX_SIZE)
        channels = channel_scope(url, prefix)
        self._ops_channel = f"{channels}:ops"
        self._control_channel = f"{channels}:control"
        self._signal_channel = f"{channels}:signal"
        self._signal_handlers: dict[str, SignalHandler] = {}

    # ---- life cycle -------------------------------------------------------------------------

    async def start(self, deliver: Deliver, takeover: Takeover, resync: Callable[[], None]) -> None:
        self._deliver, self._takeover, self._resync = deliver, takeover, resync
        # A pool that waits for a free connection: lock calls and cache reads come in bursts,
        # and redis-py's default pool refuses a command outright once 100 are in flight ("Too
        # many connections"), which would answer a burst of writes from many terminals 1013.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=POOL_SIZE,
            timeout=POOL_WAIT,
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=10,
            # After Redis restarts, every pooled connection fails its next command: retry that
            # once on a new connection, or the first unregister (locks never released), register
            # (no takeover) or lock after a restart fails for nothing. A command Redis ran before
            # the connection broke is harmless to run again: a lease taken, released or freed
            # twice ends the same, and hubs drop a push or takeover they have seen.
            # Never on a timeout: a frozen Redis must not double the wait.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._redis = aioredis.Redis.from_pool(pool)
        # The subscriber's own connection, without that retry: redis-py would resubscribe behind
        # our back after a reconnect, and the node would never be told to catch up.
        self._subscriber = aioredis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)
        self._acquire = self._redis.register_script(ACQUIRE)
        self._release = self._redis.register_script(RELEASE)
        self._read_leases = self._redis.register_script(READ_LEASES)
        self._unregister = self._redis.register_script(UNREGISTER)
        self._cache_get = self._redis.register_script(CACHE_GET)
        self._cache_put = self._redis.register_script(CACHE_PUT)
        subscribed = asyncio.Event()
        self._listener = asyncio.create_task(self._listen(subscribed), name="redis-listener")
        self._publisher = asyncio.create_task(self._publish_loop(), name="redis-publisher")
        with contextlib.suppress(TimeoutError):
            # Start serving even when Redis is down: pushes reach this worker's own terminals,
            # and the others catch up from storage once it is back.
            async with asyncio.timeout(5):
                await subscribed.wait()

    async def close(self) -> None:
        if self._publisher is not None:
            # What is queued goes out first (bounded): other workers get this worker's last ops
            # at once rather than from their next reconcile.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._outbox.join()
            self._publisher.cancel()
            await asyncio.wait({self._publisher}, timeout=5)
            self._publisher = None
        if self._listener is not None:
            self._listener.cancel()
            # Bounded, like every wait: a listener stuck in a client call must not hold up the
            # worker's shutdown (the connections are closed below either way).
            _, stuck = await asyncio.wait({self._listener}, timeout=5)
            if stuck:
                log.warning("the redis listener did not stop within 5s")
            self._listener = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._subscriber is not None:
            await self._subscriber.aclose()
            self._subscriber = None

    async def _listen(self, subscribed: asyncio.Event) -> None:
        assert self._subscriber is not None
        delay = RECONNECT_DELAY[0]
        first = True
        while True:
            pubsub = self._subscriber.pubsub()
            try:
                await pubsub.subscribe(*self._channels)
                await self._confirmed(pubsub)
                subscribed.set()
                if not first and self._resync is not None:
                    # Whatever was published while we were away is in storage: catch up.
                    self._resync()
                delay = RECONNECT_DELAY[0]
                await self._receive(pubsub)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise
            except (RedisError, OSError) as exc:
                log.warning("redis subscriber lost (%s); reconnecting in %.1fs", exc, delay)
            # Any later subscription follows a gap, including the first one to succeed after
            # start() gave up waiting for Redis: pushes may have been missed in between.
            first = False
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_DELAY[1])

    async def _confirmed(self, pubsub: PubSub) -> None:
        """Wait until Redis confirms both subscriptions.

        SUBSCRIBE only sends the command: a catch-up started before the subscriptions are in
        force could miss an operation committed after its read and published before them.
        """
        waiting = {channel.encode() for channel in self._channels}
        async with asyncio.timeout(2 * LIVENESS):
            while waiting:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    waiting.discard(message["channel"])
                elif message["type"] == "message":
                    self._on_message(message["channel"], message["data"])

    @property
    def _channels(self) -> tuple[str, str, str]:
        return self._ops_channel, self._control_channel, self._signal_channel

    async def _receive(self, pubsub: PubSub) -> None:
        """Hand messages on until the connection fails or stays silent past LIVENESS."""
        heard = time.monotonic()
        pinged: float | None = None
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=LIVENESS / 2)
            now = time.monotonic()
            if message is not None:
                heard, pinged = now, None
                if message["type"] == "message":
                    self._on_message(message["channel"], message["data"])
            elif pinged is not None:
                if now - pinged > LIVENESS:
                    raise RedisConnectionError(f"no answer from redis for {now - heard:.1f}s")
            elif now - heard > LIVENESS:
                await pubsub.ping()  # its answer (a "pong" message) is heard like any other
                pinged = now

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if data.startswith(self._own_mark, 1):
            return  # our own (a map whose first entry is "w": this worker): not even unpacked
        try:
            message = msgpack.unpackb(data, raw=False)
            if message.get("w") == self.worker_id:
                return  # our own: already delivered locally
            name = channel.decode()
            if name == self._ops_channel and self._deliver is not None:
                pushes = [Push(OpRecord(**r), o) for r, o in message["p"]]
                self._deliver(message["s"], pushes)
            elif name == self._signal_channel:
                self._handle_signal(message["k"], message["d"])
            elif self._takeover is not None:
                self._takeover(message["s"], message["t"], message["sid"], message["at"])
        except Exception:
            log.exception("dropping an undecodable bus message")

    # ---- pushes -----------------------------------------------------------------------------

    async def publish(self, store_id: str, pushes: Sequence[Push]) -> None:
        if self._deliver is not None:
            self._deliver(store_id, pushes)
        payload = msgpack.packb(
            {
                "w": self.worker_id,
                "s": store_id,
                "p": [(_record_to_wire(p.record), p.origin) for p in pushes],
            }
        )
        # The writer does not wait for Redis: one publisher task sends the payloads in order,
        # many per round trip. A full outbox (Redis frozen) drops: the ops are committed, and
        # the other workers find them in storage (gap or reconcile).
        try:
            self._outbox.put_nowait((self._ops_channel, payload))
        except asyncio.QueueFull:
            log.warning("redis outbox full; other workers will catch up from storage")

    async def _publish_loop(self) -> None:
        while True:
            payloads = [await self._outbox.get()]
            while not self._outbox.empty() and len(payloads) < PUBLISH_BATCH:
                payloads.append(self._outbox.get_nowait())
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for channel, payload in payloads:
                        pipe.publish(channel, payload)
                    await pipe.execute()
            except (RedisError, OSError, StorageUnavailable) as exc:
                log.warning("publishing %d payloads to redis failed: %s", len(payloads), exc)
            finally:
                for _ in payloads:
                    self._outbox.task_done()

    # ---- signals ----------------------------------------------------------------------------

    def on_signal(self, topic: str, handler: SignalHandler) -> None:
        self._signal_handlers[topic] = handler

    async def signal(self, topic: str, payload: dict[str, Any]) -> None:
        wire = msgpack.packb({"w": self.worker_id, "k": topic, "d": payload})
        # Decoded from the wire form here too: the local handler sees what the others see.
        self._handle_signal(topic, msgpack.unpackb(wire, raw=False)["d"])
        try:
            self._outbox.put_nowait((self._signal_channel, wire))
        except asyncio.QueueFull:
            log.warning("redis outbox full; signal %r not sent to other workers", topic)

    def _handle_signal(self, topic: str, payload: dict[str, Any]) -> None:
        handler = self._signal_handlers.get(topic)
        if handler is None:
            return
        try:
            handler(payload)
        except Exception:
            log.exception("signal handler of %r failed", topic)

    # ---- presence ---------------------------------------------------------------------------

    async def register(
        self, store_id: str, terminal_id: str, session_id: str, connected_at: float
    ) -> None:
        """Make this session the terminal's current one and tell every node (takeover)."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._presence_key(store_id), terminal_id, session_id)
                pipe.publish(
                    self._control_channel,
                    msgpack.packb(
                        {
                            "w": self.worker_id,
                            "s": store_id,
                            "t": terminal_id,
                            "sid": session_id,
                            "at": connected_at,
                        }
                    ),
                )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("presence of %s/%s not registered: %s", store_id, terminal_id, exc)

    async def unregister(self, store_id: str, terminal_id: str, session_id: str) -> None:
        """The session ended: if still current, forget it and release the terminal's locks."""
        await self._unregister(
            keys=[self._presence_key(store_id), self._owner_key(store_id, terminal_id)],
            args=[terminal_id, session_id],
        )

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError, StorageUnavailable):
            return False


def channel_scope(url: str, prefix: str) -> str:
    """What every channel name of a deployment starts with: its prefix and database number."""
    return f"{prefix}:db{int(parse_url(url).get('db') or 0)}"


async def new_cache_epoch(url: str, prefix: str) -> None:
    """Drop a deployment's whole RequestCache from outside a server (after `chefia-rt restore`):
    what the workers hold, newer versions of the replaced data included, is ignored from now
    on, and no put based on a read made before it lands. Raises StorageUnavailable."""
    client = aioredis.from_url(url, socket_timeout=CACHE_TIMEOUT, socket_connect_timeout=5)
    try:
        await client.set(cache_epoch_key(prefix), uuid.uuid4().hex)
    except (RedisError, OSError) as exc:
        raise StorageUnavailable(f"cache unavailable: {exc}") from exc
    finally:
        await client.aclose()

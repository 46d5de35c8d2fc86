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
import json
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

from chefia_rt.bus.base import CacheEntry, CacheSlot, Deliver, Push, SignalHandler, Takeover
from chefia_rt.domain import EntityKey, OpRecord
from chefia_rt.errors import StorageUnavailable
from chefia_rt.sync.locks import DEFAULT_MAX_PER_OWNER, Lease, TooManyLocks

log = logging.getLogger("chefia_rt.bus.redis")

# KEYS[2], the owner's set of lock keys, never holds more than ARGV[5] (LOCKS_PER_TERMINAL)
# members: a new lease is refused (2) when it is full of live ones, after dropping the members
# that expired or were taken over. So no script ever walks more than that many keys.
_ACQUIRE = """
local holder = redis.call('HGET', KEYS[1], 'owner')
if holder and holder ~= ARGV[1] then
  return {0, holder, redis.call('HGET', KEYS[1], 'lock_id'), redis.call('HGET', KEYS[1], 'expires')}
end
local limit = tonumber(ARGV[5])
if not holder and redis.call('SISMEMBER', KEYS[2], KEYS[1]) == 0
    and redis.call('SCARD', KEYS[2]) >= limit then
  for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if redis.call('HGET', key, 'owner') ~= ARGV[1] then redis.call('SREM', KEYS[2], key) end
  end
  if redis.call('SCARD', KEYS[2]) >= limit then return {2, '', '', '0'} end
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lock_id', ARGV[2], 'expires', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], KEYS[1])
local keep = math.max(600000, tonumber(ARGV[3]))
if redis.call('PTTL', KEYS[2]) < keep then redis.call('PEXPIRE', KEYS[2], keep) end
return {1, ARGV[1], ARGV[2], ARGV[4]}
"""
# Many leases in one command: a pipeline of HMGETs still parses (and awaits) each reply in
# Python, which the rush-hour profile showed; one script reply is parsed at once by hiredis.
_READ_LEASES = """
local leases = {}
for i, key in ipairs(KEYS) do
  leases[i] = redis.call('HMGET', key, 'owner', 'lock_id', 'expires')
end
return leases
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], KEYS[1])
  return 1
end
return 0
"""
# Forget a terminal's presence and release its locks (at most LOCKS_PER_TERMINAL keys, see
# _ACQUIRE), but only if `session` is still current:
# a terminal that already reconnected elsewhere keeps its locks. No presence at all counts as
# current: a Redis restart forgets every session's presence, and the terminals connected then
# would otherwise never release the locks they take afterwards (only their expiry would).
_UNREGISTER = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and current ~= ARGV[2] then return -1 end
redis.call('HDEL', KEYS[1], ARGV[1])
local released = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('HGET', key, 'owner') == ARGV[1] then
    redis.call('DEL', key)
    released = released + 1
  end
end
redis.call('DEL', KEYS[2])
return released
"""

# The RequestCache (cache.py says why): an entry is a hash {e: epoch, v: version, f: fresh until
# (ms, Redis clock), d: body} that expires `keep` ms after its put. The epoch key names the
# cache's generation; a Redis that restarted empty or was flushed has none, so the first caller
# makes a new one, and puts based on reads of the old generation are refused.
_REDIS_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
_CACHE_GET = (
    """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
end
"""
    + _REDIS_NOW
    + """
local put_until = string.format('%.0f', now + tonumber(ARGV[2]))
local held = redis.call('HMGET', KEYS[1], 'e', 'v', 'f', 'd')
if held[1] ~= epoch then return {epoch, '0', put_until} end
if tonumber(held[3]) > now then return {epoch, held[2], put_until, held[4]} end
return {epoch, held[2], put_until}
"""
)
# Versions compare as decimal text (shorter is smaller): Lua numbers are doubles, exact only up
# to 2^53, and a version may go beyond that.
_CACHE_PUT = (
    """
local function older(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local epoch = redis.call('GET', KEYS[1])
"""
    + _REDIS_NOW
    + """
if ARGV[1] ~= '' then
  if epoch ~= ARGV[1] or now > tonumber(ARGV[2]) then return 0 end
elseif not epoch then
  epoch = ARGV[3]
  redis.call('SET', KEYS[1], epoch)
end
local stored = 0
for i = 2, #KEYS do
  local a = 4 * (i - 2) + 4
  local held = redis.call('HMGET', KEYS[i], 'e', 'v')
  if held[1] ~= epoch or not older(ARGV[a], held[2]) then
    local fresh = string.format('%.0f', now + tonumber(ARGV[a + 1]))
    redis.call('HSET', KEYS[i], 'e', epoch, 'v', ARGV[a], 'f', fresh, 'd', ARGV[a + 3])
    redis.call('PEXPIRE', KEYS[i], ARGV[a + 2])
    stored = stored + 1
  end
end
return stored
"""
)
CACHE_TIMEOUT = 1.0  # a cache call waits no longer: a read then goes to storage
SIZES_SCAN_LIMIT = 200_000  # keys a size count looks at, at most

RECONNECT_DELAY = (0.1, 2.0)  # first and longest wait between subscriber reconnects
OUTBOX_SIZE = 10_000  # publish payloads waiting for Redis
PUBLISH_BATCH = 256  # payloads per pipelined round trip
LEASE_READ_TIMEOUT = 1.0
LEASE_READ_BATCH = 512  # lease reads per round trip
# Connections to Redis per worker, and how long a command waits for one when all are busy.
POOL_SIZE = 64
POOL_WAIT = 5.0
# A subscriber that has heard nothing for this long pings; with no answer as long again, it
# counts as lost and resubscribes (and has its node catch up). A blocking read alone would wait
# forever on a connection whose peer vanished without closing it (a frozen Redis, a dead host,
# a cut network).
LIVENESS = 5.0


def _plain(part: str) -> bool:
    """A string json.dumps writes as itself between quotes (nothing to escape)."""
    return part.isascii() and part.isprintable() and '"' not in part and "\\" not in part


def _json_parts(*parts: str) -> str:
    """`json.dumps(list(parts))`, byte for byte; every write's lease read builds one, and the
    usual ids need no escaping, so the encoder (10% of a worker's CPU at rush hour) is skipped."""
    if all(_plain(part) for part in parts):
        return '["' + '", "'.join(parts) + '"]'
    return json.dumps(list(parts))


# What a record is (its data's JSON text, a writing aid, stays home).
_RECORD_FIELDS = tuple(f.name for f in fields(OpRecord) if f.name != "data_json")


def _record_to_wire(record: OpRecord) -> dict[str, Any]:
    # Shallow: msgpack packs it at once. asdict deep-copied every operation's data first.
    return {name: getattr(record, name) for name in _RECORD_FIELDS}


class RedisBus:
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

    # ---- keys -------------------------------------------------------------------------------

    def _lock_key(self, key: EntityKey) -> str:
        # JSON of the parts: ids may contain ':' and must not collide.
        return f"{self.prefix}:lock:" + _json_parts(key.store_id, key.entity_type, key.entity_id)

    def _owner_key(self, store_id: str, owner: str) -> str:
        return f"{self.prefix}:locks-of:" + json.dumps([store_id, owner])

    def _presence_key(self, store_id: str) -> str:
        return f"{self.prefix}:presence:{store_id}"

    def _cache_key(self, key: EntityKey) -> str:
        return f"{self.prefix}:cache:" + json.dumps([key.store_id, key.entity_type, key.entity_id])

    @property
    def _cache_epoch_key(self) -> str:
        return cache_epoch_key(self.prefix)

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise StorageUnavailable("the bus is closed")
        return self._redis

    # ---- life cycle -------------------------------------------------------------------------

    async def start(self, deliver: Deliver, takeover: Takeover, resync: Callable[[], None]) -> None:
        self._deliver, self._takeover, self._resync = deliver, takeover, resync
        # A pool that waits for a free connection: lock calls and cache reads come in bursts,
        # and redis-py's default pool refuses a command outright once 100 are in flight ("Too
        # many connections"), so a burst of writes from many terminals was answered 1013.
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
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._release = self._redis.register_script(_RELEASE)
        self._read_leases = self._redis.register_script(_READ_LEASES)
        self._unregister = self._redis.register_script(_UNREGISTER)
        self._cache_get = self._redis.register_script(_CACHE_GET)
        self._cache_put = self._redis.register_script(_CACHE_PUT)
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

    # ---- locks ------------------------------------------------------------------------------

    async def get_lease(self, key: EntityKey) -> Lease | None:
        return (await self.get_leases([key]))[0]

    async def get_leases(self, keys: Sequence[EntityKey]) -> list[Lease | None]:
        """The leases of many entities in one round trip per LEASE_READ_BATCH keys (one script:
        a pipeline of HMGETs would parse and await each reply in Python)."""
        if self._redis is None:
            raise StorageUnavailable("lock service unavailable: the bus is closed")
        lock_keys = [self._lock_key(key) for key in keys]
        replies: list[Any] = []
        try:
            # A frozen Redis must cost a quick 1013, not the full socket timeout.
            async with asyncio.timeout(LEASE_READ_TIMEOUT):
                for start in range(0, len(lock_keys), LEASE_READ_BATCH):
                    chunk = lock_keys[start : start + LEASE_READ_BATCH]
                    replies.extend(await self._read_leases(keys=chunk))
        except (RedisError, OSError, TimeoutError) as exc:
            # A timeout's text is empty: say what it was.
            reason = f"lock service unavailable: {exc or type(exc).__name__}"
            raise StorageUnavailable(reason) from exc
        now = time.time()
        leases: list[Lease | None] = []
        for key, (owner, lock_id, expires) in zip(keys, replies, strict=True):
            lease = None
            if owner is not None and lock_id is not None and expires is not None:
                lease = Lease(key, _text(owner), _text(lock_id), int(expires) / 1000)
            leases.append(lease if lease is not None and lease.expires_at > now else None)
        return leases

    async def acquire_lease(
        self, key: EntityKey, owner: str, lock_id: str, ttl: float
    ) -> tuple[bool, Lease | None]:
        ttl_ms = max(1, int(ttl * 1000))
        expires_ms = int(time.time() * 1000) + ttl_ms
        try:
            taken, holder, held_id, expires = await self._acquire(
                keys=[self._lock_key(key), self._owner_key(key.store_id, owner)],
                args=[owner, lock_id, ttl_ms, expires_ms, self.lock_max],
            )
        except (RedisError, OSError) as exc:
            raise StorageUnavailable(f"lock service unavailable: {exc}") from exc
        if taken == 2:
            raise TooManyLocks(self.lock_max)
        lease = Lease(key, _text(holder), _text(held_id), int(expires) / 1000)
        return bool(taken), lease

    async def release_lease(self, key: EntityKey, owner: str) -> bool:
        try:
            released = await self._release(
                keys=[self._lock_key(key), self._owner_key(key.store_id, owner)], args=[owner]
            )
        except (RedisError, OSError) as exc:
            raise StorageUnavailable(f"lock service unavailable: {exc}") from exc
        return bool(released)

    # ---- cache ------------------------------------------------------------------------------

    async def cache_get(self, key: EntityKey, put_window: float) -> CacheSlot:
        try:
            async with asyncio.timeout(CACHE_TIMEOUT):
                found = await self._cache_get(
                    keys=[self._cache_key(key), self._cache_epoch_key],
                    args=[uuid.uuid4().hex, int(put_window * 1000)],
                )
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"cache unavailable: {exc}") from exc
        body = found[3] if len(found) > 3 else None
        return CacheSlot(_text(found[0]), int(found[1]), body, int(found[2]))

    async def cache_put(self, entries: Sequence[CacheEntry], slot: CacheSlot | None) -> int:
        if not entries:
            return 0
        args: list[str | int | bytes] = [
            "" if slot is None else slot.epoch,
            "" if slot is None else slot.put_until,
            uuid.uuid4().hex,
        ]
        for entry in entries:
            args += [
                entry.version,
                int(entry.fresh_for * 1000),
                max(1, int(entry.keep_for * 1000)),
                entry.body,
            ]
        keys = [self._cache_epoch_key, *(self._cache_key(e.key) for e in entries)]
        try:
            async with asyncio.timeout(CACHE_TIMEOUT):
                return int(await self._cache_put(keys=keys, args=args))
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"cache unavailable: {exc}") from exc

    async def cache_clear(self) -> None:
        try:
            async with asyncio.timeout(CACHE_TIMEOUT):
                await self.redis.set(self._cache_epoch_key, uuid.uuid4().hex)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"cache unavailable: {exc}") from exc

    async def cache_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        start = len(self.prefix) + len(":cache:")
        seen = 0
        try:
            async for raw in self.redis.scan_iter(match=f"{self.prefix}:cache:*", count=1000):
                seen += 1
                if seen > SIZES_SCAN_LIMIT:
                    break
                with contextlib.suppress(ValueError, IndexError, TypeError):
                    entity_type = json.loads(_text(raw)[start:])[1]
                    sizes[entity_type] = sizes.get(entity_type, 0) + 1
        except (RedisError, OSError) as exc:
            raise StorageUnavailable(f"cache unavailable: {exc}") from exc
        return sizes

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError, StorageUnavailable):
            return False


def channel_scope(url: str, prefix: str) -> str:
    """What every channel name of a deployment starts with: its prefix and database number."""
    return f"{prefix}:db{int(parse_url(url).get('db') or 0)}"


def cache_epoch_key(prefix: str) -> str:
    return f"{prefix}:cache-epoch"


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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

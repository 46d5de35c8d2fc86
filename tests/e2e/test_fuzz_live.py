"""Live fuzzing (docs/protocol.md §3.2, §10): a few thousand hostile frames from several connections
at a running server, then proof that it still serves a clean pair of terminals.

The codec and the engine have their own property tests (tests/protocol, tests/sync); this one
throws the whole stack at once: random bytes and text, mutated valid JSON and msgpack frames (bit
flips, truncation, wrong types in every field, huge nesting and numbers, compressed garbage,
message_batch abuse) and odd handshakes. The server may answer 4006, close with 1007, 1009, 1013,
4005 or 4006, but never with 1011, never log an error, never leak a session, and its memory must
stay bounded. Set CHEFIA_FUZZ_SEED to replay a run; the seed is in the failure message.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lz4.frame
import msgpack
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from tests.helpers import RunningServer, decode_server_frame, eventually, op, running_server

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("CHEFIA_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
WORKERS = 6
# Every worker sends all its frames, however long a loaded machine takes: a count, not a rate.
FRAMES_PER_WORKER = 250
HANG_GUARD = 300.0  # seconds: only a fuzzing run that stopped making progress gets this far
MAX_FRAME = 64 * 1024
# Close codes a fuzzing client may get. 1007: invalid UTF-8 in a text frame (websockets itself).
ALLOWED_CLOSES = {1000, 1007, 1009, 1013, 4005, 4006}
MEMORY_BOUND = 50 * 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- what to send -----------------------------------------------------------------------------


def valid_messages(rng: random.Random) -> list[dict[str, Any]]:
    """One of each message a terminal may send, with plausible values."""
    n = rng.randrange(1000)
    updates = [
        {"entity_id": f"t{n}-{i}", "data": {"seats": i, "name": f"T{i}"}, "version": 1}
        for i in range(rng.randrange(1, 6))
    ]
    return [
        op(f"op-{n}", f"t{n}", {"seats": n % 12, "status": "free"}, version=rng.randrange(1, 4)),
        op(
            f"op-c{n}",
            f"order-{n}",
            {"status": "open", "items": [{"sku": "soup", "qty": 2}], "total": 12.5},
            entity_type="orders",
            operation="CREATE",
            priority="high",
            requires_lock=True,
            user_id="u1",
        ),
        op(f"op-d{n}", f"t{n}", operation="DELETE", version=2),
        op(f"op-b{n}", f"t{n}-0", {"updates": updates}, operation="BULK_UPDATE"),
        op(f"op-p{n}", f"p{n}", {"price": 9.9}, entity_type="products"),
        op(f"op-k{n}", f"k{n}", {"amount": 10}, entity_type="cashier_operations", version=2),
        {
            "type": "conflict_resolution",
            "conflict_id": f"conflict-op-k{n}",
            "resolution": rng.choice(["accept_remote", "accept_local", "merge"]),
            "resolved_data": {"amount": 11},
            "timestamp": "2024-01-15T10:30:00.000Z",
        },
        {
            "type": "acquire_lock",
            "entity_type": "orders",
            "entity_id": f"order-{n}",
            "timeout": 500,
        },
        {"type": "release_lock", "entity_type": "orders", "entity_id": f"order-{n}"},
        {"type": "ping", "timestamp": n},
        {"type": "resume", "since": rng.randrange(0, 50)},
        {"type": "snapshot_request", "entity_types": ["tables"]},
        {"type": "sync_confirmation", "operation_id": f"op-{n}", "seq": n},
        {"type": "performance_metrics", "response_time": 12.5, "memory_usage": 30.0},
    ]


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"n": value}
    return value


def wrong_values(rng: random.Random) -> list[Any]:
    return [
        None,
        True,
        0,
        -1,
        2**63,
        -(2**63) - 1,
        2**64 + 1,
        10**40,
        1.5,
        -0.0,
        float("inf"),
        float("nan"),
        "",
        "x" * rng.choice([65, 129, 4097, 20_000]),
        "\x00",
        "\ud800",
        "🍕" * 50,
        "' OR 1=1 --",
        "../../etc/passwd",
        "%s%n%x",
        "2024-13-45T99:99:99Z",
        [],
        [1, "a", None],
        {},
        {"$gt": ""},
        {"type": "data_sync"},
        nested(rng.choice([20, 40, 200])),
        b"\x00\xffbytes",
        {1: "int key"},
    ]


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a message a value could be replaced."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*prefix, index)
            yield from paths(item, (*prefix, index))


def replace(message: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(message)
    target: Any = changed
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return changed


def encode(message: Any, encoding: str) -> str | bytes:
    """As a client would, falling back to the other encoding for what one cannot carry."""
    if encoding == "msgpack":
        try:
            return bytes(msgpack.packb(message, use_bin_type=True))
        except (OverflowError, TypeError, ValueError, UnicodeEncodeError):
            pass
    try:
        return json.dumps(message, allow_nan=True)
    except (TypeError, ValueError):
        return bytes(msgpack.packb(message, use_bin_type=True, strict_types=False))


def flip_bits(rng: random.Random, data: bytes) -> bytes:
    raw = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if raw:
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    return bytes(raw)


@dataclass
class Frame:
    payload: str | bytes
    as_text: bool = False  # send bytes in a text frame (websockets does not check them)


def special_frames(rng: random.Random) -> list[Frame]:
    ping = {"type": "ping", "timestamp": 1}
    ping_mp = msgpack.packb(ping)
    data_sync = valid_messages(rng)[0]
    return [
        Frame("[" * 100_000),
        Frame('{"a":' * 30_000),
        Frame(b"\x91" * 60_000 + b"\xc0"),
        Frame(b"\x81\xa1a" * 20_000 + b"\xc0"),
        Frame(b"\xdd\xff\xff\xff\xff"),  # an array claiming 4 billion items
        Frame(b"\xdb\xff\xff\xff\xf0abc"),  # a string claiming 4 GB
        Frame(b"\xdf\x7f\xff\xff\xff"),  # a map claiming 2 billion entries
        Frame('{"type":"resume","since":' + "9" * 5000 + "}"),
        Frame('{"type":"resume","since":1e999999}'),
        Frame('{"type":"ping","timestamp":-Infinity}'),
        Frame('{"type":"ping","type":"data_sync"}'),
        Frame('{"type":"ping"}' + " " * 1000 + "trailing"),
        Frame("\ufeff" + json.dumps(ping)),
        Frame(b'{"type":"ping"}'),  # JSON in a binary frame
        Frame(ping_mp, as_text=True),  # msgpack in a text frame (invalid UTF-8): 1007
        Frame(b"\xff\xfe\xfd", as_text=True),
        Frame(b"compressed:"),
        Frame(b"compressed:" + os.urandom(rng.randint(1, 200))),
        Frame(b"compressed:" + lz4.frame.compress(os.urandom(300))),
        Frame(b"compressed:" + lz4.frame.compress(ping_mp)[:-3]),
        Frame(b"compressed:" + lz4.frame.compress(ping_mp) + b"tail"),
        Frame(b"compressed:" + lz4.frame.compress(b"compressed:" + lz4.frame.compress(ping_mp))),
        Frame(b"compressed:" + lz4.frame.compress(json.dumps(ping).encode())),
        Frame(b"compressed:" + lz4.frame.compress(msgpack.packb(data_sync))),
        Frame(b"COMPRESSED:" + lz4.frame.compress(ping_mp)),
        Frame(msgpack.packb({"type": "message_batch", "messages": [ping] * 3, "count": 7})),
        Frame(msgpack.packb({"type": "message_batch", "messages": ping})),
        Frame(msgpack.packb({"type": "message_batch"})),
        Frame(msgpack.packb({"type": "message_batch", "messages": [], "count": 0})),
        Frame(
            msgpack.packb(
                {
                    "type": "message_batch",
                    "messages": [{"type": "message_batch", "messages": [ping], "count": 1}],
                    "count": 1,
                }
            )
        ),
        Frame(
            msgpack.packb(
                {"type": "message_batch", "messages": [ping, 7, "x", None, [], data_sync]}
            )
        ),
        Frame(
            json.dumps(
                {"type": "message_batch", "messages": [ping, data_sync], "count": 2}
            )  # batches are msgpack's, but the decoder takes them in JSON too
        ),
        Frame(
            msgpack.packb(
                {
                    "type": "message_batch",
                    "messages": [
                        replace(data_sync, ("operation", "id"), f"batch-{rng.random()}-{i}")
                        for i in range(rng.choice([10, 200]))
                    ],
                }
            )
        ),
        Frame(msgpack.packb({"type": "message_batch", "messages": [ping] * 1500})),
        Frame(os.urandom(MAX_FRAME + 1)),  # over the limit: 1009
        Frame(b"compressed:" + lz4.frame.compress(b"\x00" * (MAX_FRAME * 4))),  # a bomb: 1009
        Frame(""),
        Frame(b""),
    ]


def make_frame(rng: random.Random, encoding: str) -> Frame:
    roll = rng.random()
    if roll < 0.08:
        return Frame(os.urandom(rng.randint(1, 300)))
    if roll < 0.14:
        alphabet = '{}[]":,0123456789.eE+-truefalsnl \\u"type' + "".join(
            chr(rng.randint(0x20, 0xD7FF)) for _ in range(10)
        )
        return Frame("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))))
    if roll < 0.24:
        return rng.choice(special_frames(rng))
    message = rng.choice(valid_messages(rng))
    if roll < 0.34:
        return Frame(encode(message, encoding))  # valid (mostly: versions, locks, ...)
    if roll < 0.70:
        where = rng.choice(list(paths(message)))
        value = rng.choice(wrong_values(rng))
        return Frame(encode(replace(message, where, value), encoding))
    if roll < 0.78:
        return Frame(encode({k: v for k, v in message.items() if rng.random() < 0.6}, encoding))
    raw = encode(message, encoding)
    data = raw.encode() if isinstance(raw, str) else raw
    if roll < 0.88:
        data = flip_bits(rng, data)
    elif roll < 0.94:
        data = data[: rng.randrange(len(data))]
    else:
        at = rng.randrange(len(data) + 1)
        data = data[:at] + os.urandom(rng.randint(1, 8)) + data[at:]
    if isinstance(raw, str):
        try:
            return Frame(data.decode())
        except UnicodeDecodeError:
            return Frame(data, as_text=rng.random() < 0.2)
    return Frame(data)


# ---- the clients ------------------------------------------------------------------------------


@dataclass
class Findings:
    closes: Counter[int | None] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)
    internal_errors: list[dict[str, Any]] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)
    frames_sent: int = 0
    connections: int = 0
    refused_handshakes: Counter[str] = field(default_factory=Counter)
    raw_statuses: Counter[str] = field(default_factory=Counter)


async def read_all(ws: ClientConnection, found: Findings) -> None:
    """Read and check every server frame until the connection ends."""
    with contextlib.suppress(ConnectionClosed):
        async for frame in ws:
            try:
                messages = decode_server_frame(frame)
            except Exception as exc:  # the server must always send what clients can parse
                found.undecodable.append(f"{exc!r}: {frame[:80]!r}")
                continue
            for message in messages:
                found.answers[str(message.get("type"))] += 1
                if message.get("code") == 1011:
                    found.internal_errors.append(message)


async def fuzz_terminal(
    server: RunningServer, rng: random.Random, index: int, found: Findings
) -> None:
    sent = 0
    while sent < FRAMES_PER_WORKER:
        encoding = rng.choice(["json", "msgpack"])
        kind = rng.choice(["pos", "pos", "pos", "kds", "waiter", "monitor"])
        url = f"{server.url}/fuzz-{index}?store_id=fuzz&type={kind}&encoding={encoding}"
        if rng.random() < 0.3:
            url += f"&since={rng.randrange(0, 100)}"
        ws = await websockets.connect(url)
        found.connections += 1
        reader = asyncio.create_task(read_all(ws, found))
        try:
            while sent < FRAMES_PER_WORKER:
                frame = make_frame(rng, encoding)
                sent += 1
                found.frames_sent += 1
                if frame.as_text and isinstance(frame.payload, bytes):
                    await ws.send(frame.payload, text=True)
                else:
                    await ws.send(frame.payload)
                if rng.random() < 0.05:
                    await asyncio.sleep(0.005)  # let answers and closes happen mid-stream
        except ConnectionClosed:
            pass
        finally:
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait_for(ws.close(), 10)
            await asyncio.wait_for(reader, 10)
        rcvd = ws.protocol.close_rcvd
        found.closes[rcvd.code if rcvd is not None else None] += 1


HANDSHAKES = [
    "fuzz-h?type=",
    "fuzz-h?type=pos&type=kds",
    "fuzz-h?since=99999999999999999999999999",
    "fuzz-h?since=1e3",
    "fuzz-h?encoding=msgpack&encoding=xml",
    "fuzz-h?store_id=" + "s" * 65,
    "fuzz-h?store_id=%00",
    "fuzz-h?user_id=" + "u" * 5000,
    "fuzz-h?token=eyJhbGciOiJub25lIn0.e30.",
    "fuzz-h/../../etc",
    "%ff%fe",
    "fuzz-h%00",
    "fuzz-h?%zz=1",
    "fuzz-h?" + "&".join(f"k{i}=v" for i in range(500)),
]


async def fuzz_handshakes(server: RunningServer, rng: random.Random, found: Findings) -> None:
    paths_ = [*HANDSHAKES]
    for _ in range(20):
        paths_.append("".join(rng.choice("ab-_.:%/?&=0123456789") for _ in range(30)))
    for path in paths_:
        try:
            ws = await websockets.connect(f"{server.url}/{path}")
        except (InvalidStatus, InvalidHandshake, OSError) as exc:
            found.refused_handshakes[type(exc).__name__] += 1
            continue
        reader = asyncio.create_task(read_all(ws, found))
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps({"type": "ping"}))
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait_for(ws.close(), 10)
        await asyncio.wait_for(reader, 10)
        rcvd = ws.protocol.close_rcvd
        code = rcvd.code if rcvd is not None else None
        # A bad handshake gets its own code; 1000 is a connection that was fine.
        if code not in (1000, 4001, 4002, 4006):
            found.closes[code] += 1


def raw_requests() -> list[bytes]:
    """HTTP requests no client library would send: repeated headers, odd paths and values."""
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    upgrade = (
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
    )
    requests = [
        f"GET /ws/raw-1 HTTP/1.1\r\nHost: x\r\n{upgrade}Upgrade: websocket\r\n\r\n",
        f"GET /ws/raw-1 HTTP/1.1\r\nHost: x\r\n{upgrade}Authorization: a\r\n"
        "Authorization: b\r\n\r\n",
        f"GET /ws/raw-1 HTTP/1.1\r\nHost: x\r\n{upgrade}Sec-WebSocket-Protocol: a\r\n"
        "Sec-WebSocket-Protocol: chefia.v1.msgpack\r\n\r\n",
        f"GET /ws/raw-1 HTTP/1.1\r\nHost: x\r\n{upgrade}Origin: a\r\nOrigin: b\r\n\r\n",
        "GET /health HTTP/1.1\r\nHost: x\r\nUpgrade: a\r\nUpgrade: b\r\n\r\n",
        "GET /ws/stats HTTP/1.1\r\nHost: x\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n",
        "GET /ws/stats?token=%ff%00&token=x HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /%00%ff/../../health HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /health?" + "a=1&" * 1500 + " HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /ws/ HTTP/1.1\r\nHost: x\r\n{upgrade}\r\n",
        f"GET /wsx/raw HTTP/1.1\r\nHost: x\r\n{upgrade}\r\n",
        f"GET /ws/raw-2 HTTP/1.1\r\nHost: x\r\n{upgrade}Authorization: Bearer\r\n\r\n",
        "POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        "GET /health HTTP/1.0\r\n\r\n",
        "BREW /pot HTCPCP/1.0\r\n\r\n",
        "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the plain port
    ]
    return [r.encode("latin-1") for r in requests]


async def fuzz_raw_requests(server: RunningServer, found: Findings) -> None:
    for request in raw_requests():
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(request)
            await writer.drain()
            try:
                async with asyncio.timeout(2):
                    head = await reader.readuntil(b"\r\n")
            except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                found.raw_statuses["no answer"] += 1
            else:
                status = head.split(b" ")[1:2]
                found.raw_statuses[status[0].decode() if status else "?"] += 1
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


# ---- the test ---------------------------------------------------------------------------------


async def clean_pair_works(server: RunningServer) -> None:
    """A new store: a POS writes, a KDS receives; both encodings."""
    async with (
        server.terminal("pos-clean", store="clean", encoding="msgpack") as pos,
        server.terminal("kds-clean", store="clean", type="kds") as kds,
    ):
        await pos.send(
            op("clean-1", "order-1", {"status": "open"}, entity_type="orders", operation="CREATE")
        )
        confirmation = await pos.expect("sync_confirmation")
        assert confirmation["status"] == "applied"
        assert confirmation["seq"] == 1
        pushed = await kds.expect("data_sync")
        assert pushed["operation"]["id"] == "clean-1"
        assert pushed["operation"]["data"] == {"status": "open"}
        await kds.send({"type": "ping", "timestamp": 5})
        assert (await kds.expect("pong"))["timestamp"] == 5


async def test_live_fuzz(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    rng = random.Random(SEED)
    context = f"CHEFIA_FUZZ_SEED={SEED}"
    async with running_server(
        tmp_path,
        max_ws_message_size=MAX_FRAME,
        ws_invalid_frame_limit=200,  # deeper into each connection before the abuse close
        sync_commit_timeout=20,
    ) as server:
        await clean_pair_works(server)  # warm up: imports, caches, the first connections
        gc.collect()
        rss_before = rss_bytes()
        found = Findings()
        started = time.monotonic()
        try:
            async with asyncio.timeout(HANG_GUARD):
                await asyncio.gather(
                    fuzz_handshakes(server, random.Random(rng.random()), found),
                    fuzz_raw_requests(server, found),
                    *(
                        fuzz_terminal(server, random.Random(rng.random()), i, found)
                        for i in range(WORKERS)
                    ),
                )
        except TimeoutError:
            raise AssertionError(
                f"{context}: hang guard: the fuzzing clients stopped after "
                f"{found.frames_sent} frames"
            ) from None
        elapsed = time.monotonic() - started

        # Every fuzzing connection is gone from the server, and nothing is stuck in the queue.
        # (The closing handshakes are over, so this needs no time to pass, only the loop to run
        # the sessions' ends; the wait is a hang guard.)
        await eventually(
            lambda: not len(server.worker.hub) and not server.server.connections(),
            what=f"{context}: sessions left behind",
        )
        await eventually(server.worker.pipeline.idle.is_set, what=f"{context}: pipeline idle")

        # It still does its job, for a new store.
        await clean_pair_works_again(server)
        gc.collect()
        growth = rss_bytes() - rss_before

    summary = (
        f"{context}: {found.frames_sent} frames, {found.connections} connections in "
        f"{elapsed:.1f}s; closes {dict(found.closes)}; answers {dict(found.answers)}; "
        f"raw requests {dict(found.raw_statuses)}"
    )
    print(summary)
    assert found.frames_sent == WORKERS * FRAMES_PER_WORKER, summary
    assert not found.internal_errors, f"{summary}; 1011 answers: {found.internal_errors[:3]}"
    assert not found.undecodable, f"{summary}; unreadable server frames: {found.undecodable[:3]}"
    assert 1011 not in found.closes, summary
    assert "500" not in found.raw_statuses, f"{summary}; raw requests: {found.raw_statuses}"
    assert set(found.closes) <= ALLOWED_CLOSES, summary
    assert found.answers["error"] + found.answers["sync_error"] > 100, summary
    errors = [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(("chefia_rt", "websockets"))
    ]
    assert not errors, f"{summary}; logged: {[r.getMessage() for r in errors[:5]]}"
    assert growth < MEMORY_BOUND, f"{summary}; RSS grew {growth / 2**20:.1f} MiB"


async def clean_pair_works_again(server: RunningServer) -> None:
    async with (
        server.terminal("pos-after", store="clean-after") as pos,
        server.terminal(
            "waiter-after", store="clean-after", type="waiter", encoding="msgpack"
        ) as waiter,
    ):
        await pos.send(op("after-1", "t1", {"seats": 4}, operation="CREATE"))
        confirmation = await pos.expect("sync_confirmation")
        assert confirmation["status"] == "applied" and confirmation["seq"] == 1
        pushed = await waiter.expect("data_sync")
        assert pushed["operation"]["id"] == "after-1"
        assert pushed["operation"]["version"] == 1

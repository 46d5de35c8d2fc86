"""End to end: what one connection may cost a worker.

A terminal that never reads holds at most WS_QUEUE_MAX_BYTES of queued messages however many
snapshots it asks for; snapshot_request, resume and locks are charged to its rate limit; it holds
at most LOCKS_PER_TERMINAL locks; and no frame the server sends is larger than
MAX_WS_MESSAGE_SIZE (snapshots come in pages, msgpack batches are cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import msgpack
import redis.asyncio as aioredis
import websockets
from websockets.exceptions import ConnectionClosed

from chefia_rt.errors import Code
from tests.cluster import Cluster, running_cluster, worker_pid
from tests.helpers import (
    DEFAULT_TIMEOUT,
    Terminal,
    closed_with,
    decode_server_frame,
    op,
    running_server,
)

FRAME_LIMIT = 65_536
NOTE = "x" * 1500  # about 1.6 KB an entity


def vm_rss(pid: int) -> int:
    """Resident memory of a process, in bytes (psutil-free)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def fill(terminal: Terminal, count: int, chunk: int = 250) -> None:
    """`count` tables of about 1.6 KB each, created in chunks (confirmed before the next)."""
    for start in range(0, count, chunk):
        for n in range(start, min(count, start + chunk)):
            await terminal.send(
                op(f"fill-{n}", f"t{n}", {"seats": n, "note": NOTE}, operation="CREATE")
            )
        confirmed = 0
        while confirmed < min(chunk, count - start):
            message = await terminal.recv()
            assert message["type"] != "sync_error", message
            confirmed += message["type"] == "sync_confirmation"


async def snapshot_pages(terminal: Terminal) -> list[dict[str, Any]]:
    """The pages of one snapshot, up to the complete one."""
    pages = []
    while True:
        page = await terminal.until("snapshot")
        pages.append(page)
        if page.get("complete", True):
            return pages


# ---- frames within MAX_WS_MESSAGE_SIZE ----------------------------------------------------


async def test_snapshot_larger_than_a_frame_comes_in_pages_within_the_limit(
    tmp_path: Path,
) -> None:
    count = 200  # ~320 KB of entities: 5+ frames of 64 KiB
    async with running_server(tmp_path, max_ws_message_size=FRAME_LIMIT) as server:
        async with server.terminal("pos-fill", encoding="msgpack") as filler:
            await fill(filler, count)
        for encoding in ("json", "msgpack"):
            async with server.terminal(f"pos-{encoding}", encoding=encoding) as pos:
                await pos.send({"type": "snapshot_request"})
                pages = await snapshot_pages(pos)
                sizes = [len(f.encode()) if isinstance(f, str) else len(f) for f in pos.frames[1:]]
                # Every frame within the limit, uncompressed too.
                for frame in pos.frames:
                    body = frame.encode() if isinstance(frame, str) else frame
                    assert len(body) <= FRAME_LIMIT
                    inflated = sum(len(msgpack.packb(m)) for m in decode_server_frame(frame))
                    assert isinstance(frame, str) or inflated <= FRAME_LIMIT
                assert len(pages) >= 5, sizes
                assert [p["page"] for p in pages] == list(range(len(pages)))
                assert [p["complete"] for p in pages] == [False] * (len(pages) - 1) + [True]
                assert {p["seq"] for p in pages} == {count}
                ids = [e["entity_id"] for p in pages for e in p["entities"]]
                assert sorted(ids) == sorted(f"t{n}" for n in range(count))


async def test_msgpack_catch_up_batches_stay_within_the_limit(tmp_path: Path) -> None:
    count = 200
    async with running_server(tmp_path, max_ws_message_size=FRAME_LIMIT) as server:
        async with server.terminal("pos-fill", encoding="msgpack") as filler:
            await fill(filler, count)
        async with server.terminal("pos-late", encoding="msgpack", since=0) as late:
            seqs = []
            while len(seqs) < count:
                seqs.append((await late.until("data_sync"))["operation"]["seq"])
            assert seqs == list(range(1, count + 1))
            for frame in late.frames:
                assert isinstance(frame, bytes)
                inflated = sum(len(msgpack.packb(m)) for m in decode_server_frame(frame))
                assert len(frame) <= FRAME_LIMIT and inflated <= FRAME_LIMIT


# ---- rate limits --------------------------------------------------------------------------


async def test_snapshot_requests_and_resumes_are_charged(tmp_path: Path) -> None:
    async with (
        running_server(
            tmp_path,
            ws_rate_limit=1,
            ws_rate_burst=100,
            ws_rate_cost_snapshot=60,
            ws_rate_cost_resume=30,
            ws_rate_limit_strikes=3,
        ) as server,
        server.terminal("pos-1") as pos,
    ):
        await pos.send({"type": "snapshot_request"})
        assert (await pos.until("snapshot"))["complete"] is True
        await pos.send({"type": "resume", "since": 0})
        await pos.send({"type": "snapshot_request"})  # 60 + 30 + 60 > 100
        refused = await pos.until("error")
        assert refused["code"] == Code.RATE_LIMITED
        assert "snapshot_request costs 60" in refused["error"]
        await pos.send({"type": "resume", "since": 0})
        assert (await pos.until("error"))["code"] == Code.RATE_LIMITED
        await pos.send({"type": "snapshot_request"})
        assert await closed_with(pos) == Code.RATE_LIMITED  # the third refusal: sustained


# ---- the snapshot flood -------------------------------------------------------------------


async def never_reading(cluster: Cluster, store: str, terminal_id: str) -> Any:
    """A raw connection that reads nothing: tiny receive buffer, one frame of client queue."""
    node = cluster.nodes[0]
    ws = await websockets.connect(
        f"{node.url}/{terminal_id}?store_id={store}&type=pos&encoding=json",
        max_queue=1,
    )
    ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return ws


async def test_snapshot_flood_from_a_terminal_that_never_reads(tmp_path: Path) -> None:
    """Snapshots free of charge (cost 0), so only the byte budget stands between the flood and
    the worker's memory: RSS stays within a bound from the settings, and a terminal of another
    store is still answered."""
    queue_max = 2 * 1_048_576
    entities, requests = 2000, 150
    env = {
        "WS_QUEUE_MAX_BYTES": str(queue_max),
        "WS_RATE_COST_SNAPSHOT": "0",
        "WS_STALL_TIMEOUT": "5",
        "WS_SEND_BUFFER": "65536",
    }
    async with running_cluster(tmp_path, nodes=1, workers=1, env=env) as cluster:
        filler = await cluster.connect(0, "pos-fill", "big", encoding="msgpack")
        await fill(filler, entities)
        await filler.close()
        pid = worker_pid(cluster.nodes[0].workers[0])
        other = await cluster.connect(0, "pos-other", "small")
        await other.send({"type": "snapshot_request"})  # warm the snapshot path up once
        await other.until("snapshot")
        probe = await cluster.connect(0, "pos-probe", "big")
        await probe.send({"type": "snapshot_request"})
        started = time.monotonic()
        pages = await snapshot_pages(probe)
        snapshot_bytes = sum(len(f) for f in probe.frames if isinstance(f, str))
        took = time.monotonic() - started
        print(f"snapshot: {len(pages)} pages, {snapshot_bytes} bytes, {took:.2f}s")
        await probe.close()
        await asyncio.sleep(0.5)
        baseline = vm_rss(pid)
        # Held at once, at most: the flooder's queue, one snapshot being paged (its entities and
        # their encoding), and one more read from storage.
        bound = baseline + 2 * queue_max + 8 * snapshot_bytes + 48 * 1_048_576

        flooder = await never_reading(cluster, "big", "pos-flood")
        peak = baseline
        latencies: list[float] = []
        sent = 0

        async def flood() -> None:
            nonlocal sent
            for _ in range(requests):
                await flooder.send('{"type": "snapshot_request"}')
                sent += 1

        flooding = asyncio.create_task(flood())
        n = 0
        try:
            while not flooding.done() or n < 20:
                peak = max(peak, vm_rss(pid))
                assert peak <= bound, f"RSS {peak >> 20} MiB over the bound {bound >> 20} MiB"
                n += 1
                begun = time.monotonic()
                await other.send(op(f"o-{n}", "t-1", {"seats": n}))
                answer = await other.until("sync_confirmation")
                assert answer["operation_id"] == f"o-{n}"
                latencies.append(time.monotonic() - begun)
                await asyncio.sleep(0.05)
        finally:
            flooding.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await flooding
        await flooder.close()
        peak = max(peak, vm_rss(pid))
        assert peak <= bound
        await asyncio.sleep(1)
        print(
            f"flood: {sent} snapshot_requests; RSS baseline {baseline >> 20} MiB, peak "
            f"{peak >> 20} MiB, after {vm_rss(pid) >> 20} MiB (bound {bound >> 20} MiB); "
            f"other store's ack p50 {1000 * statistics.median(latencies):.1f} ms, max "
            f"{1000 * max(latencies):.1f} ms over {len(latencies)}"
        )
        await other.close()


# ---- lock spam ----------------------------------------------------------------------------


async def test_lock_spam_is_capped_and_a_disconnect_releases_only_its_own(tmp_path: Path) -> None:
    cap, asked = 50, 1000
    env = {"LOCKS_PER_TERMINAL": str(cap)}
    async with running_cluster(tmp_path, nodes=1, workers=2, env=env) as cluster:
        keeper = await cluster.connect(0, "pos-keeper", "s1")
        for n in range(3):
            await keeper.send(
                {"type": "acquire_lock", "entity_type": "orders", "entity_id": f"k{n}"}
            )
            assert (await keeper.until("lock_acquired"))["entity_id"] == f"k{n}"
        other = await cluster.connect(0, "pos-other", "s2")
        pid = worker_pid(cluster.nodes[0].workers[0])
        before = vm_rss(pid)
        spammer = await cluster.connect(0, "pos-spam", "s1", encoding="msgpack")
        for n in range(asked):
            await spammer.send(
                {"type": "acquire_lock", "entity_type": "orders", "entity_id": f"o{n}"}
            )
        answers: dict[str, int] = {}
        reasons = set()
        while sum(answers.values()) < asked:
            message = await spammer.recv()
            if message["type"] in ("lock_acquired", "lock_failed"):
                answers[message["type"]] = answers.get(message["type"], 0) + 1
                if message["type"] == "lock_failed":
                    reasons.add(message["reason"])
        assert answers == {"lock_acquired": cap, "lock_failed": asked - cap}
        assert reasons == {f"this terminal already holds {cap} locks, the most it may; release one"}
        client = aioredis.from_url(cluster.redis_url)
        try:
            held = [k async for k in client.scan_iter(match=f"{cluster.prefix}:lock:*", count=500)]
            assert len(held) == cap + 3
            await other.send(op("o-1", "t-1", {"seats": 1}))
            assert (await other.until("sync_confirmation"))["operation_id"] == "o-1"
            await spammer.close()
            deadline = time.monotonic() + DEFAULT_TIMEOUT  # a hang guard
            while len(held) != 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                held = [
                    k async for k in client.scan_iter(match=f"{cluster.prefix}:lock:*", count=500)
                ]
            assert len(held) == 3  # the keeper's, and only them
        finally:
            await client.aclose()
        await keeper.send({"type": "acquire_lock", "entity_type": "orders", "entity_id": "o0"})
        assert (await keeper.until("lock_acquired"))["entity_id"] == "o0"
        grown = vm_rss(pid) - before
        print(f"lock spam: RSS of one worker grew {grown >> 10} KiB")
        await keeper.close()
        await other.close()

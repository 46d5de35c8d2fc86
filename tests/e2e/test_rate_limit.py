"""The per-terminal rate limit (docs/protocol.md §11), against a running server: 4005 answers, a
4005 close for sustained abuse, other terminals untouched, and no reset by reconnecting."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.exceptions import ConnectionClosed

import chefia_rt.picows_link
import chefia_rt.server
from chefia_rt.auth import issue_token
from tests.helpers import (
    DEFAULT_TIMEOUT,
    Terminal,
    closed_with,
    eventually,
    op,
    running_server,
    still_usable,
)

KEY = "rate-limit-test-key-0123456789abcdef0123"
# Operations per second where a test needs the bucket not to refill while it runs: one token
# per 100 s, however slowly a loaded machine gets through the test (a rate of 0.1 gave a token
# back after 10 s).
NO_REFILL = 0.01
LONG_CLOSE_TIMEOUT = 4 * DEFAULT_TIMEOUT


async def answers(terminal: Terminal, count: int) -> list[dict[str, Any]]:
    """The next `count` answers to operations (confirmations and errors), in arrival order."""
    got: list[dict[str, Any]] = []
    while len(got) < count:
        message = await terminal.recv()
        if message["type"] in ("sync_confirmation", "sync_error"):
            got.append(message)
    return got


async def test_burst_passes_then_4005(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, ws_rate_limit=2, ws_rate_burst=10) as server,
        server.terminal("pos-1", encoding="msgpack") as pos,
    ):
        # One frame: every op is charged at the frame's arrival, so however slowly a loaded
        # machine sends, nothing refills between them.
        burst = [op(f"op-{i}", f"t{i}", {"seats": i}) for i in range(15)]
        await pos.send({"type": "message_batch", "messages": burst, "count": len(burst)})
        got = await answers(pos, 15)
        by_id = {m["operation_id"]: m for m in got}
        assert [by_id[f"op-{i}"]["type"] for i in range(10)] == ["sync_confirmation"] * 10
        refused = [by_id[f"op-{i}"] for i in range(10, 15)]
        assert all(m["type"] == "sync_error" and m["code"] == 4005 for m in refused), refused
        assert all(m["entity_type"] == "tables" for m in refused)
        assert "rate limit" in refused[0]["error"]
        await still_usable(pos)  # refusals keep the connection
        # Nothing refused was applied.
        assert (await server.worker.store.log_bounds("s1")).last_seq == 10
        # The bucket refills at the rate: one more op after half a second.
        await asyncio.sleep(0.6)
        await pos.send(op("op-later", "t-later", {"seats": 1}))
        assert (await answers(pos, 1))[0]["type"] == "sync_confirmation"


async def test_a_bulk_update_counts_its_updates(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, ws_rate_limit=NO_REFILL, ws_rate_burst=10) as server,
        server.terminal("pos-1", encoding="msgpack") as pos,
    ):
        updates = [{"entity_id": f"t{i}", "data": {"seats": i}, "version": 1} for i in range(8)]
        await pos.send(op("bulk-1", "t0", {"updates": updates}, operation="BULK_UPDATE"))
        assert (await answers(pos, 1))[0]["type"] == "sync_confirmation"
        for i in range(3):
            await pos.send(op(f"op-{i}", f"x{i}", {"seats": 1}))
        # A refusal is answered at once, a confirmation after the commit: match them by id.
        got = {m["operation_id"]: m for m in await answers(pos, 3)}
        assert [got[f"op-{i}"]["type"] for i in range(3)] == ["sync_confirmation"] * 2 + [
            "sync_error"
        ]
        assert got["op-2"]["code"] == 4005
        # A bulk bigger than what is left is refused whole, not cut.
        await pos.send(op("bulk-2", "t0", {"updates": updates[:2]}, operation="BULK_UPDATE"))
        error = (await answers(pos, 1))[0]
        assert error["code"] == 4005 and error["operation_id"] == "bulk-2"


async def test_sustained_abuse_closes_4005_and_spares_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for front_end in (chefia_rt.server, chefia_rt.picows_link):
        monkeypatch.setattr(front_end, "CLOSE_TIMEOUT", LONG_CLOSE_TIMEOUT)
    async with (
        running_server(
            tmp_path, ws_rate_limit=5, ws_rate_burst=5, ws_rate_limit_strikes=20
        ) as server,
        server.terminal("pos-1") as abuser,
        server.terminal("pos-2") as neighbour,
        server.terminal("kds-1", store="s2", type="kds") as elsewhere,
    ):
        sent = 0
        with contextlib.suppress(ConnectionClosed):
            for i in range(200):
                await abuser.send(op(f"op-{i}", f"t{i}", {"seats": 1}))
                sent += 1
        # Though the abuser pipelined far more than the server's unread-frame queue, the closing
        # handshake must not wait for its timeout behind those frames: that timeout is raised to
        # far past the wait here, so a close that waited for it cannot come in time.
        try:
            assert await closed_with(abuser, timeout=DEFAULT_TIMEOUT) == 4005
        except TimeoutError:
            raise AssertionError(
                f"no close in {DEFAULT_TIMEOUT:g} s: the closing handshake waited for its "
                f"timeout ({LONG_CLOSE_TIMEOUT:g} s here)"
            ) from None
        await eventually(lambda: server.worker.hub.get("s1", "pos-1") is None, what="gone")
        # The burst was applied, and nothing after the close was.
        assert 5 <= (await server.worker.store.log_bounds("s1")).last_seq < 10
        # The neighbour (same store) and a terminal of another store write as usual.
        for i in range(5):
            await neighbour.send(op(f"n-{i}", f"n{i}", {"seats": 2}))
        assert all(m["type"] == "sync_confirmation" for m in await answers(neighbour, 5))
        await still_usable(elsewhere)


async def test_reconnecting_does_not_reset_the_bucket(tmp_path: Path) -> None:
    async with running_server(tmp_path, ws_rate_limit=NO_REFILL, ws_rate_burst=5) as server:
        first = await server.connect("pos-1")
        for i in range(5):
            await first.send(op(f"op-{i}", f"t{i}", {"seats": 1}))
        assert all(m["type"] == "sync_confirmation" for m in await answers(first, 5))
        await first.close()
        again = await server.connect("pos-1")
        try:
            await again.send(op("op-again", "t-again", {"seats": 1}))
            error = (await answers(again, 1))[0]
            assert error["type"] == "sync_error" and error["code"] == 4005
            # A takeover (the old socket still open) does not reset it either.
            third = await server.connect("pos-1")
            await third.send(op("op-third", "t-third", {"seats": 1}))
            assert (await answers(third, 1))[0]["code"] == 4005
            await third.close()
        finally:
            await again.close()
        # Another terminal of the same store starts with a full bucket.
        async with server.terminal("pos-2") as other:
            await other.send(op("op-other", "t-other", {"seats": 1}))
            assert (await answers(other, 1))[0]["type"] == "sync_confirmation"


async def test_reconnecting_after_the_abuse_close_is_closed_again(tmp_path: Path) -> None:
    async with running_server(
        tmp_path, ws_rate_limit=NO_REFILL, ws_rate_burst=2, ws_rate_limit_strikes=5
    ) as server:
        first = await server.connect("pos-1")
        with contextlib.suppress(ConnectionClosed):
            for i in range(50):
                await first.send(op(f"op-{i}", f"t{i}", {"seats": 1}))
        assert await closed_with(first) == 4005
        again = await server.connect("pos-1")
        await again.send(op("op-x", "t-x", {"seats": 1}))
        assert await closed_with(again) == 4005


async def test_the_bucket_belongs_to_the_tokens_terminal(tmp_path: Path) -> None:
    """With auth on the store is the token's, so asking for another store_id is no way out."""
    async with running_server(
        tmp_path, jwt_secret_key=KEY, ws_rate_limit=NO_REFILL, ws_rate_burst=3
    ) as server:
        token = issue_token(KEY, "pos-1", "store-a", "pos", 600)
        first = await server.connect("pos-1", store="store-a", token=token)
        for i in range(3):
            await first.send(op(f"op-{i}", f"t{i}", {"seats": 1}))
        assert all(m["type"] == "sync_confirmation" for m in await answers(first, 3))
        await first.close()
        again = await server.connect("pos-1", store="store-z", token=token)
        try:
            assert again.established["store_id"] == "store-a"
            await again.send(op("op-x", "t-x", {"seats": 1}))
            assert (await answers(again, 1))[0]["code"] == 4005
        finally:
            await again.close()


async def test_pings_are_not_charged(tmp_path: Path) -> None:
    # (snapshot_request, resume and locks are: tests/e2e/test_connection_limits.py)
    async with (
        running_server(tmp_path, ws_rate_limit=NO_REFILL, ws_rate_burst=1) as server,
        server.terminal("pos-1") as pos,
    ):
        for _ in range(5):
            await pos.send({"type": "ping"})
        for _ in range(5):
            await pos.until("pong")
        await pos.send(op("op-1", "t1", {"seats": 1}))
        assert (await answers(pos, 1))[0]["type"] == "sync_confirmation"


async def test_the_abuse_close_comes_after_the_answers_to_what_was_let_in(
    tmp_path: Path,
) -> None:
    """A burst in one frame: what the bucket let in is committed and answered before the 4005
    close, not dropped with it; a client that sends its unanswered operations again on every
    reconnect would otherwise be closed again before any answer, forever."""
    async with running_server(
        tmp_path, ws_rate_limit=NO_REFILL, ws_rate_burst=5, ws_rate_limit_strikes=3
    ) as server:
        pos = await server.connect("pos-1", encoding="msgpack")
        ops = [op(f"op-{i}", f"t{i}", {"seats": 1}) for i in range(10)]
        await pos.ws.send(msgpack.packb({"type": "message_batch", "count": 10, "messages": ops}))
        got: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await pos.recv()
                if message["type"] in ("sync_confirmation", "sync_error"):
                    got[message["operation_id"]] = message
        assert pos.ws.protocol.close_rcvd is not None
        assert pos.ws.protocol.close_rcvd.code == 4005
        assert [got[f"op-{i}"]["type"] for i in range(5)] == ["sync_confirmation"] * 5, got
        assert [got[f"op-{i}"]["code"] for i in range(5, 8)] == [4005] * 3, got
        assert not {f"op-{i}" for i in (8, 9)} & got.keys()  # not read after the third strike
        assert (await server.worker.store.log_bounds("s1")).last_seq == 5

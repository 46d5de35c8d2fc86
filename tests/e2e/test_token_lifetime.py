"""A token's lifetime on a live connection (JWT_SECRET_KEY): closed 4003 when it runs out,
unless the terminal sent a new one with `refresh_token` (answered `token_refreshed`).

The handshake accepts a token up to CLOCK_SKEW seconds after its `exp` (servers' clocks may
differ); a live connection is closed at the same moment. The tests mint tokens whose `exp` is
already a little past, so that moment is about two seconds after they connect.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path

from chefia_rt.auth import CLOCK_SKEW, issue_token
from chefia_rt.client import Client
from chefia_rt.errors import Code
from chefia_rt.protocol import messages as m
from tests.e2e.test_auth import (
    KEY,
    OTHER_KEY,
    auth_server,
    closed_with,
    greeted,
    token,
)
from tests.e2e.test_sync_flow import wire_checks  # noqa: F401  (autouse fixture)
from tests.helpers import Terminal, eventually, op, running_server, still_usable

LEFT = 2  # seconds a short token still has when a test connects with it


def short_token(
    terminal: str = "pos-1", store: str = "store-a", type: str = "pos"
) -> tuple[str, float]:
    """A token accepted now that runs out in about LEFT seconds; (token, when it runs out)."""
    issued = time.time() - 20
    ttl = 20 - CLOCK_SKEW + LEFT
    expires = int(issued) + int(ttl) + CLOCK_SKEW
    return issue_token(KEY, terminal, store, type, ttl, now=issued), expires


async def past(moment: float) -> None:
    """Wait until wall-clock `moment` has passed (and a little more)."""
    await asyncio.sleep(max(0.0, moment - time.time()) + 0.5)


async def refused(terminal: Terminal, new_token: str) -> str:
    await terminal.send({"type": "refresh_token", "token": new_token})
    error = await terminal.expect("error")
    assert error["code"] == Code.AUTH_FAILED, error
    assert new_token not in error["error"]
    return str(error["error"])


async def test_a_live_connection_is_closed_4003_when_its_token_expires(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        short, _ = short_token()
        pos = await greeted(server, "pos-1", token=short)
        try:
            await pos.send(op("op-1", "t1", {"seats": 4}, operation="CREATE"))
            assert (await pos.expect("sync_confirmation"))["status"] == "applied"
            code, reason = await closed_with(pos, timeout=LEFT + 10)
            assert code == Code.AUTH_FAILED, (code, reason)
            assert "expired" in reason
        finally:
            await pos.close()
        await eventually(lambda: len(server.worker.hub) == 0)


async def test_refresh_token_keeps_the_connection_past_the_old_expiry(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        short, expires = short_token()
        pos = await greeted(server, "pos-1", token=short)
        kds = await greeted(server, "kds-1", token=token("kds-1", type="kds"))
        try:
            fresh = token(ttl=3600, user_id="cashier-2")
            await pos.send({"type": "refresh_token", "token": fresh})
            answer = await pos.expect("token_refreshed")
            m.TokenRefreshed.model_validate(answer)
            exp = datetime.fromisoformat(answer["expires_at"].replace("Z", "+00:00"))
            assert exp.timestamp() > time.time() + 3000
            await past(expires)
            # Still connected, still writing, now as the new token's user.
            await pos.send(op("op-1", "t1", {"seats": 4}, operation="CREATE"))
            assert (await pos.expect("sync_confirmation"))["status"] == "applied"
            pushed = await kds.expect("data_sync")
            assert pushed["operation"]["user_id"] == "cashier-2"
        finally:
            await pos.close()
            await kds.close()


async def test_a_refused_refresh_keeps_the_old_expiry(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        short, _ = short_token()
        pos = await greeted(server, "pos-1", token=short)
        try:
            assert "bad signature" in await refused(pos, token(key=OTHER_KEY))
            assert "not a JWT" in await refused(pos, "garbage")
            expired = issue_token(KEY, "pos-1", "store-a", "pos", 60, now=time.time() - 3600)
            assert "expired" in await refused(pos, expired)
            assert "another terminal" in await refused(pos, token("pos-2"))
            assert "another terminal" in await refused(pos, token(store="store-b"))
            assert "waiter" in await refused(pos, token(type="waiter"))
            await still_usable(pos)  # a refusal is an answer, not a close
            code, reason = await closed_with(pos, timeout=LEFT + 10)
            assert code == Code.AUTH_FAILED and "expired" in reason
        finally:
            await pos.close()


async def test_refresh_token_in_open_mode_says_it_never_expires(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server, server.terminal("pos-1") as pos:
        await pos.send({"type": "refresh_token", "token": "anything"})
        answer = await pos.expect("token_refreshed")
        assert m.TokenRefreshed.model_validate(answer).expires_at is None
        await pos.send({"type": "refresh_token", "token": ""})
        assert (await pos.expect("error"))["code"] == Code.INVALID_MESSAGE


async def test_the_client_renews_its_token_without_reconnecting(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        short, expires = short_token()
        async with Client(server.url, "pos-1", token=short, encoding="json") as client:
            await client.wait_connected(5)
            client.refresh_token(token(ttl=3600))
            await past(expires)
            answer = await (await client.send("tables", "t1", {"seats": 2}, operation="CREATE"))
            assert (answer.kind, answer.message["status"]) == ("confirmed", "applied")
            assert client.stats.connects == 1
            assert not client.stats.closes

"""Tokens (docs/protocol.md §2.3) and 4003 (§10), against a running server with JWT_SECRET_KEY set.

Every refusal is an accepted WebSocket closed with 4003 and a reason (never the token); the store
always comes from the token; stats need a token, /health does not; logs never hold a token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chefia_rt.auth import issue_token
from chefia_rt.config import load_settings
from chefia_rt.errors import ConfigError
from tests.helpers import DEFAULT_TIMEOUT, RunningServer, Terminal, op, running_server

KEY = "chefia-test-key-0123456789abcdef-0123456789"
OLD_KEY = "chefia-old-key-fedcba9876543210-fedcba9876543210"
OTHER_KEY = "somebody-else-key-0123456789abcdef-0123456789"


def token(
    terminal: str = "pos-1",
    store: str = "store-a",
    type: str = "pos",
    *,
    key: str = KEY,
    ttl: float = 3600,
    user_id: str | None = None,
) -> str:
    return issue_token(key, terminal, store, type, ttl, user_id)


def forged(claims: dict[str, Any], header: dict[str, Any], signature: bytes = b"sig") -> str:
    """A token with any header (alg none, RS256, ...) and a made-up signature."""

    def part(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return ".".join(
        (part(json.dumps(header).encode()), part(json.dumps(claims).encode()), part(signature))
    )


def claims(**changes: Any) -> dict[str, Any]:
    base = {
        "sub": "pos-1",
        "store_id": "store-a",
        "terminal_type": "pos",
        "iat": int(time.time()),
        "exp": int(time.time()) + 3600,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


@asynccontextmanager
async def auth_server(tmp_path: Path, **overrides: Any) -> AsyncIterator[RunningServer]:
    overrides.setdefault("jwt_secret_key", KEY)
    async with running_server(tmp_path, **overrides) as server:
        yield server


async def connect(
    server: RunningServer,
    terminal_id: str,
    bearer: str | None = None,
    *,
    encoding: str = "json",
    **query: str,
) -> Terminal:
    """Connect with the given query (a token goes in as `token=`) and/or Authorization header."""
    if encoding != "json":
        query["encoding"] = encoding
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else None
    ws = await websockets.connect(f"{server.url}/{terminal_id}?{qs}", additional_headers=headers)
    return Terminal(ws, encoding)


async def greeted(server: RunningServer, terminal_id: str, **kwargs: Any) -> Terminal:
    terminal = await connect(server, terminal_id, **kwargs)
    terminal.established = await terminal.expect("connection_established")
    return terminal


async def closed_with(
    terminal: Terminal, timeout: float = DEFAULT_TIMEOUT
) -> tuple[int | None, str]:
    """Read until the server closes; (code, reason) of its close frame."""
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                message = await terminal.recv(timeout)
                assert message["type"] != "connection_established", "let in without a token"
    rcvd = terminal.ws.protocol.close_rcvd
    return (rcvd.code, rcvd.reason) if rcvd is not None else (None, "")


async def refused(server: RunningServer, terminal_id: str, **kwargs: Any) -> str:
    """Assert the connection is closed with 4003 before any greeting; return the reason."""
    terminal = await connect(server, terminal_id, **kwargs)
    try:
        code, reason = await closed_with(terminal)
    finally:
        await terminal.close()
    assert code == 4003, (code, reason)
    assert reason
    for value in kwargs.values():
        if isinstance(value, str) and len(value) > 20:
            assert value not in reason  # the token is never echoed
    return reason


# ---- accepted tokens --------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_valid_token_in_the_query(tmp_path: Path, encoding: str) -> None:
    async with auth_server(tmp_path) as server:
        pos = await greeted(server, "pos-1", token=token(), type="pos", encoding=encoding)
        try:
            hello = pos.established
            assert hello["terminal_id"] == "pos-1"
            assert hello["store_id"] == "store-a"
            assert hello["terminal_type"] == "pos"
            assert hello["encoding"] == encoding
            await pos.send(op("op-1", "t1", {"seats": 4}))
            assert (await pos.expect("sync_confirmation"))["status"] == "applied"
        finally:
            await pos.close()


async def test_valid_token_in_the_authorization_header(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        kds = await greeted(server, "kds-1", bearer=token("kds-1", type="kds"))
        try:
            # `type` omitted: the token's type.
            assert kds.established["terminal_type"] == "kds"
            assert kds.established["store_id"] == "store-a"
            await kds.send({"type": "ping", "timestamp": 1})
            assert (await kds.expect("pong"))["timestamp"] == 1
        finally:
            await kds.close()


async def test_header_wins_over_a_query_token(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        good, bad = token(), token(key=OTHER_KEY)
        pos = await greeted(server, "pos-1", bearer=good, token=bad)
        await pos.close()


# ---- refused tokens ---------------------------------------------------------------------------


async def test_missing_token_is_closed_4003(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        reason = await refused(server, "pos-1", type="pos", store_id="store-a")
        assert "token" in reason
        reason = await refused(server, "pos-1", bearer="")  # "Bearer " with nothing after it
        assert len(server.worker.hub) == 0


BAD_TOKENS: list[tuple[str, Any]] = [
    ("bad-signature", lambda: token(key=OTHER_KEY)),
    ("tampered-claims", lambda: _swap_payload(token(), claims(store_id="store-b"))),
    ("expired", lambda: issue_token(KEY, "pos-1", "store-a", "pos", 60, now=time.time() - 3600)),
    ("alg-none", lambda: jwt.encode(claims(), key="", algorithm="none")),
    ("alg-none-forged", lambda: forged(claims(), {"alg": "none", "typ": "JWT"}, b"")),
    ("alg-hs512", lambda: jwt.encode(claims(), KEY + KEY, algorithm="HS512")),
    ("alg-rs256-forged", lambda: forged(claims(), {"alg": "RS256", "typ": "JWT"})),
    ("alg-missing", lambda: forged(claims(), {"typ": "JWT"})),
    ("missing-store", lambda: jwt.encode(claims(store_id=None), KEY, algorithm="HS256")),
    ("missing-type", lambda: jwt.encode(claims(terminal_type=None), KEY, algorithm="HS256")),
    ("missing-exp", lambda: jwt.encode(claims(exp=None), KEY, algorithm="HS256")),
    ("missing-sub", lambda: jwt.encode(claims(sub=None), KEY, algorithm="HS256")),
    ("unknown-type", lambda: jwt.encode(claims(terminal_type="root"), KEY, algorithm="HS256")),
    ("bad-store", lambda: jwt.encode(claims(store_id="a b"), KEY, algorithm="HS256")),
    ("exp-text", lambda: jwt.encode(claims(exp="9999999999"), KEY, algorithm="HS256")),
    ("issued-in-the-future", lambda: jwt.encode(claims(iat=2**40), KEY, algorithm="HS256")),
    ("garbage", lambda: "not-a-token"),
    ("three-dots", lambda: "a.b.c"),
    ("base64-garbage", lambda: "eyJhbGciOi.eyJzdWIiOi.AAAA"),
    ("huge", lambda: "eyJ" + "A" * 6000),  # over MAX_TOKEN_CHARS, under the line limit
]


def _swap_payload(signed: str, new_claims: dict[str, Any]) -> str:
    head, _, sig = signed.split(".")
    body = base64.urlsafe_b64encode(json.dumps(new_claims).encode()).rstrip(b"=").decode()
    return f"{head}.{body}.{sig}"


@pytest.mark.parametrize("make", [m for _, m in BAD_TOKENS], ids=[name for name, _ in BAD_TOKENS])
@pytest.mark.parametrize("where", ["query", "header"])
async def test_bad_token_is_closed_4003(tmp_path: Path, make: Any, where: str) -> None:
    bad = make()
    async with auth_server(tmp_path) as server:
        kwargs: dict[str, Any] = {"token": bad} if where == "query" else {"bearer": bad}
        reason = await refused(server, "pos-1", **kwargs)
        assert bad not in reason
        assert len(server.worker.hub) == 0
        # The server is fine afterwards.
        pos = await greeted(server, "pos-1", token=token())
        await pos.close()


async def test_expired_token_says_so(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        old = issue_token(KEY, "pos-1", "store-a", "pos", 60, now=time.time() - 3600)
        assert "expired" in await refused(server, "pos-1", token=old)


async def test_token_of_another_terminal_is_closed_4003(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        reason = await refused(server, "pos-2", token=token("pos-1"))
        assert "another terminal" in reason
        assert len(server.worker.hub) == 0


@pytest.mark.parametrize("asked", ["kds", "monitor", "waiter"])
async def test_type_not_matching_the_token_is_closed_4003(tmp_path: Path, asked: str) -> None:
    async with auth_server(tmp_path) as server:
        reason = await refused(server, "pos-1", token=token(type="pos"), type=asked)
        assert "pos" in reason


async def test_a_monitor_token_cannot_become_a_pos(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        await refused(server, "mon-1", token=token("mon-1", type="monitor"), type="pos")
        monitor = await greeted(server, "mon-1", token=token("mon-1", type="monitor"))
        try:
            assert monitor.established["terminal_type"] == "monitor"
            await monitor.send(op("op-m", "t1", {"seats": 1}))
            assert (await monitor.until("sync_error"))["code"] == 4008
        finally:
            await monitor.close()


async def test_invalid_terminal_id_and_type_keep_their_own_codes(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        t = await connect(server, "bad%20id", token=token())
        assert (await closed_with(t))[0] == 4001
        t = await connect(server, "pos-1", token=token(), type="toaster")
        assert (await closed_with(t))[0] == 4002


async def raw_request(server: RunningServer, request: str) -> bytes:
    """Send a hand-made request; the server's answer up to the end of its head, and for a 101
    the close frame's first four bytes too (header and code: the server then waits for the
    closing handshake, which this client never does). Read by content, not by waiting."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request.encode())
        await writer.drain()
        async with asyncio.timeout(DEFAULT_TIMEOUT):  # a hang guard
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 101"):
                head += await reader.readexactly(4)
    finally:
        writer.close()
    return head


async def test_repeated_authorization_headers_are_refused_not_crashed_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: websockets' Headers.get raises on a repeated header; that was a 1011 close
    (and an ERROR in the log) for the WebSocket, a 500 for /ws/stats."""
    good = token()
    twice = f"Authorization: Bearer {good}\r\nAuthorization: Bearer {good}\r\n"
    upgrade = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    async with auth_server(tmp_path) as server:
        answer = await raw_request(
            server, f"GET /ws/pos-1 HTTP/1.1\r\nHost: x\r\n{upgrade}{twice}\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 101")
        close = answer[answer.index(b"\r\n\r\n") + 4 :]
        assert close[0] == 0x88  # a close frame...
        assert int.from_bytes(close[2:4], "big") == 4003  # ...with 4003
        answer = await raw_request(server, f"GET /ws/stats HTTP/1.1\r\nHost: x\r\n{twice}\r\n")
        assert answer.startswith(b"HTTP/1.1 401")
        # A repeated Upgrade header (any mode) is websockets' to refuse, not a 500.
        answer = await raw_request(
            server, f"GET /ws/pos-1 HTTP/1.1\r\nHost: x\r\n{upgrade}Upgrade: websocket\r\n\r\n"
        )
        assert not answer.startswith(b"HTTP/1.1 500"), answer[:60]
        assert len(server.worker.hub) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---- the store is the token's -----------------------------------------------------------------


async def test_store_comes_from_the_token_not_the_query(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        # A store-a terminal asking for store-b gets store-a.
        spy = await greeted(server, "pos-1", token=token("pos-1", "store-a"), store_id="store-b")
        b_writer = await greeted(server, "pos-b", token=token("pos-b", "store-b"))
        a_writer = await greeted(
            server, "pos-a", token=token("pos-a", "store-a"), store_id="store-b"
        )
        try:
            assert spy.established["store_id"] == "store-a"
            assert b_writer.established["store_id"] == "store-b"
            assert server.worker.hub.get("store-a", "pos-1") is not None
            assert server.worker.hub.get("store-b", "pos-1") is None
            # Store B's operations never reach it...
            await b_writer.send(op("op-b1", "secret-table", {"bill": 120}))
            assert (await b_writer.expect("sync_confirmation"))["seq"] == 1
            await spy.nothing()
            # ...store A's do, and land in store A whatever the writer's query said.
            await a_writer.send(op("op-a1", "t1", {"seats": 2}))
            confirmation = await a_writer.expect("sync_confirmation")
            assert confirmation["seq"] == 1
            pushed = await spy.expect("data_sync")
            assert pushed["operation"]["id"] == "op-a1"
            assert (await server.worker.store.log_bounds("store-a")).last_seq == 1
            # Resume and snapshot are the token's store too.
            await spy.send({"type": "snapshot_request"})
            snapshot = await spy.until("snapshot")
            assert snapshot["store_id"] == "store-a"
            assert {e["entity_id"] for e in snapshot["entities"]} == {"t1"}
            await spy.send({"type": "resume", "since": 0})
            again = await spy.until("data_sync")
            assert again["operation"]["id"] == "op-a1"
            await spy.nothing()
        finally:
            for t in (spy, b_writer, a_writer):
                await t.close()


async def test_user_id_comes_from_the_token_when_it_has_one(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        writer = await greeted(
            server, "pos-1", token=token("pos-1", user_id="maria"), user_id="mallory"
        )
        reader = await greeted(server, "pos-2", token=token("pos-2"))
        try:
            await writer.send(op("op-1", "t1", {"seats": 2}))
            await writer.expect("sync_confirmation")
            pushed = await reader.expect("data_sync")
            assert pushed["operation"]["user_id"] == "maria"
        finally:
            await writer.close()
            await reader.close()


async def test_same_terminal_id_in_two_stores_are_two_terminals(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        a = await greeted(server, "pos-1", token=token("pos-1", "store-a"))
        b = await greeted(server, "pos-1", token=token("pos-1", "store-b"))
        try:
            await a.send({"type": "ping"})
            await a.expect("pong")  # not replaced (4004) by store-b's pos-1
            assert len(server.worker.hub) == 2
        finally:
            await a.close()
            await b.close()


async def test_takeover_at_capacity_uses_the_tokens_store(tmp_path: Path) -> None:
    async with auth_server(tmp_path, max_ws_connections=1) as server:
        first = await greeted(server, "pos-1", token=token("pos-1", "store-a"))
        # The same terminal (its store only in the token) is let in and replaces the old one.
        second = await greeted(server, "pos-1", bearer=token("pos-1", "store-a"))
        await asyncio.wait_for(first.ws.wait_closed(), 5)
        assert first.ws.close_code == 4004
        # Another terminal, or a bad token naming this one, is refused at capacity.
        attempts: list[tuple[str, dict[str, str]]] = [
            ("pos-2", {"token": token("pos-2", "store-a")}),
            ("pos-1", {"token": token("pos-1", "store-b")}),
            ("pos-1", {"token": token("pos-1", "store-a", key=OTHER_KEY)}),
            ("pos-1", {"token": token("pos-2", "store-a")}),
            ("pos-1", {"store_id": "store-a"}),
        ]
        for terminal_id, query in attempts:
            with pytest.raises(InvalidStatus) as exc:
                await connect(server, terminal_id, **query)
            assert exc.value.response.status_code == 503
        await second.close()


# ---- key rotation -----------------------------------------------------------------------------


async def test_key_rotation_accepts_tokens_of_every_listed_key(tmp_path: Path) -> None:
    async with auth_server(tmp_path, jwt_secret_key=f"{KEY},{OLD_KEY}") as server:
        old = await greeted(server, "pos-old", token=token("pos-old", key=OLD_KEY))
        new = await greeted(server, "pos-new", token=token("pos-new", key=KEY))
        # What the server (and `chefia-rt token`) issues is signed with the first key.
        issued = issue_token(server.settings.jwt_keys, "pos-3", "store-a", "pos", 60)
        jwt.decode(issued, KEY, algorithms=["HS256"])
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(issued, OLD_KEY, algorithms=["HS256"])
        try:
            await refused(server, "pos-x", token=token("pos-x", key=OTHER_KEY))
        finally:
            await old.close()
            await new.close()


async def test_a_dropped_key_no_longer_works(tmp_path: Path) -> None:
    async with auth_server(tmp_path, jwt_secret_key=KEY) as server:
        await refused(server, "pos-1", token=token(key=OLD_KEY))


# ---- HTTP -------------------------------------------------------------------------------------


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def get(
    server: RunningServer, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, head, body = await asyncio.to_thread(_get, server.http + path, headers)
    assert head["Content-Type"] == "application/json"
    return status, head, json.loads(body)


@pytest.mark.parametrize("path", ["/ws/stats", "/api/v1/websocket/stats"])
async def test_stats_need_a_monitor_or_pos_token(tmp_path: Path, path: str) -> None:
    async with auth_server(tmp_path) as server:
        status, head, body = await get(server, path)
        assert status == 401
        assert head["WWW-Authenticate"] == "Bearer"
        assert "token" in body["error"]
        status, _, _ = await get(server, path, {"Authorization": f"Bearer {token(key=OTHER_KEY)}"})
        assert status == 401
        expired = issue_token(KEY, "mon-1", "store-a", "monitor", 60, now=time.time() - 3600)
        status, _, body = await get(server, f"{path}?token={expired}")
        assert status == 401 and "expired" in body["error"]
        # A valid token of a type that may not read stats: 403.
        status, _, _ = await get(server, path, {"Authorization": f"Bearer {token(type='kds')}"})
        assert status == 403
        for kind in ("monitor", "pos"):
            good = token("mon-1", type=kind)
            status, _, body = await get(server, path, {"Authorization": f"Bearer {good}"})
            assert status == 200
            assert "total_connections" in body
            status, _, body = await get(server, f"{path}?token={good}")
            assert status == 200


async def test_health_is_public_and_says_jwt(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        for path in ("/health", "/api/v1/health"):
            status, _, body = await get(server, path)
            assert status == 200
            assert body["auth"] == "jwt"
            assert "warning" not in body


async def test_open_mode_stats_stay_public(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        status, _, body = await get(server, "/ws/stats")
        assert status == 200
        status, _, body = await get(server, "/health")
        assert body["auth"] == "open"


# ---- tokens never logged ----------------------------------------------------------------------


async def test_tokens_never_reach_the_logs_even_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("websockets", "websockets.server", "websockets.client", "chefia_rt"):
        caplog.set_level(logging.DEBUG, logger=name)
    secrets: list[str] = []
    async with auth_server(tmp_path) as server:
        good = token()
        in_header = token("pos-2")
        wrong = token("pos-3", key=OTHER_KEY)
        expired = issue_token(KEY, "pos-4", "store-a", "pos", 60, now=time.time() - 3600)
        secrets += [good, in_header, wrong, expired]
        a = await greeted(server, "pos-1", token=good)
        b = await greeted(server, "pos-2", bearer=in_header)
        await refused(server, "pos-3", token=wrong)
        await refused(server, "pos-4", bearer=expired)
        await get(server, f"/ws/stats?token={good}")
        await get(server, "/ws/stats", {"Authorization": f"Bearer {good}"})
        await a.send(op("op-1", "t1", {"seats": 1}))
        await a.expect("sync_confirmation")
        await a.close()
        await b.close()
    records = caplog.records
    assert any("[REDACTED]" in r.getMessage() for r in records), "request lines not logged?"
    for record in records:
        text = record.getMessage() + (record.exc_text or "")
        for secret in secrets:
            # Any of the three parts would do to replay or brute-force it.
            for part in secret.split("."):
                if len(part) > 16:
                    assert part not in text, f"token in log: {record.name}: {text[:200]}"
    assert not any(secret in caplog.text for secret in secrets)


# ---- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("short", "the key is 5 bytes"),
        (f"{KEY},short-old-key", "key 2 of 2 is 13 bytes"),
        (f"{KEY},,{OLD_KEY}", "key 2 of 3 is empty"),
        ("x" * 31, "31 bytes"),
    ],
)
def test_short_keys_are_refused(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(jwt_secret_key=value)
    message = str(exc.value)
    assert "JWT_SECRET_KEY" in message and why in message
    assert value not in message


def test_a_32_byte_key_and_a_list_are_fine() -> None:
    assert load_settings(jwt_secret_key="x" * 32).jwt_keys == ("x" * 32,)
    settings = load_settings(jwt_secret_key=f" {KEY} , {OLD_KEY} ")
    assert settings.jwt_keys == (KEY, OLD_KEY)
    assert load_settings(jwt_secret_key="").auth_enabled is False


def test_server_refuses_to_start_with_a_short_key(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WS_", "MAX_WS_", "DATABASE_URL", "REDIS_URL", "JWT_", "SYNC_"))
    }
    env.update(JWT_SECRET_KEY="tiny-secret", WS_PORT="0")
    result = subprocess.run(
        [sys.executable, "-m", "chefia_rt", "serve"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chefia-rt: ")
    assert "JWT_SECRET_KEY" in lines[0] and "32 bytes" in lines[0]
    assert "tiny-secret" not in result.stderr + result.stdout
    assert not (tmp_path / "chefia-rt.db").exists()

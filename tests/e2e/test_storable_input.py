"""End to end: input storage cannot hold, and numbers that are not numbers, are client errors.

PostgreSQL text and jsonb cannot hold U+0000 (nor UTF-8 cannot hold a lone surrogate, which a
JSON `\\ud800` escape decodes to): such a string anywhere it would be stored is refused 4006 at
validation, on every backend, instead of failing the commit as if storage were down (503/1013).
`since` and `limit` are ASCII digits only (`str.isdigit` also accepts "²").
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import websockets

from chefia_rt.errors import Code
from tests.e2e.test_conflicts import lock, raise_conflict
from tests.e2e.test_sync_flow import sync, wire_checks  # noqa: F401  (autouse fixture)
from tests.helpers import RunningServer, Terminal, closed_with, http_get, op, still_usable

NUL = "\x00"
SURROGATE = "\ud800"


async def refused_4006(terminal: Terminal, message: dict[str, Any]) -> dict[str, Any]:
    """Send `message` as JSON text (a lone surrogate goes as its `\\ud800` escape) and expect
    its 4006 answer; the connection stays usable."""
    await terminal.ws.send(json.dumps(message))
    answer = await terminal.recv()
    assert answer["type"] in ("sync_error", "error"), answer
    assert answer["code"] == Code.INVALID_MESSAGE, answer
    await still_usable(terminal)
    return answer


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
async def test_unstorable_strings_are_refused_4006(server: RunningServer, bad: str) -> None:
    async with server.terminal("pos-a") as a, server.terminal("pos-b") as b:
        await sync(a, [b], op("c0", "t0", {"seats": 4}, operation="CREATE"))
        for message in (
            op("c1", f"t{bad}1", {"seats": 4}, operation="CREATE"),
            op(f"c{bad}2", "t2", {"seats": 4}, operation="CREATE"),
            op("c3", "t3", {"note": f"a{bad}b"}, operation="CREATE"),
            op("c4", "t4", {"items": [{"name": ["x", f"{bad}"]}]}, operation="CREATE"),
            op("c5", "t5", {f"k{bad}": 1}, operation="CREATE"),
            op("c6", "t6", {"seats": 4}, operation="CREATE", user_id=f"u{bad}"),
            op(
                "c7",
                "t0",
                {"updates": [{"entity_id": "t0", "data": {"n": bad}, "version": 2}]},
                operation="BULK_UPDATE",
            ),
            op(
                "c8",
                "t0",
                {"updates": [{"entity_id": f"t{bad}", "data": {}, "version": 1}]},
                operation="BULK_UPDATE",
            ),
            {"type": "acquire_lock", "entity_type": "tables", "entity_id": f"t{bad}"},
            {"type": "acquire_lock", "entity_type": "tables", "entity_id": "t0", "lock_id": bad},
            {"type": "conflict_resolution", "conflict_id": f"c{bad}", "resolution": "merge"},
        ):
            await refused_4006(a, message)

        # A manual conflict cannot be settled with resolved_data storage cannot hold.
        await sync(
            a,
            [b],
            op("k1", "co1", {"amount": 1}, entity_type="cashier_operations", operation="CREATE"),
        )
        await lock(a, "cashier_operations", "co1")
        conflict = await raise_conflict(a, "x1", {"amount": 2}, 1, 1)
        resolution = {
            "type": "conflict_resolution",
            "conflict_id": conflict["conflict_id"],
            "resolution": "merge",
            "resolved_data": {"amount": 3, "note": bad},
        }
        await refused_4006(a, resolution)
        # Nothing was refused for storage's sake: the same resolution, storable, is applied.
        resolution["resolved_data"] = {"amount": 3}
        await a.send(resolution)
        assert (await a.expect("sync_confirmation"))["status"] == "resolved"


async def test_a_user_id_storage_cannot_hold_is_refused_at_the_handshake(
    server: RunningServer,
) -> None:
    terminal = await server.connect("pos-a", user_id="u%00", greet=False)
    try:
        assert await closed_with(terminal) == Code.INVALID_MESSAGE
    finally:
        await terminal.close()


@pytest.mark.parametrize("since", ["%C2%B2", "%D9%A3", "99999999999999999999", "-1", "1.0"])
async def test_a_since_that_is_no_seq_is_closed_4006(server: RunningServer, since: str) -> None:
    ws = await websockets.connect(f"{server.url}/pos-a?store_id=s1&since={since}")
    terminal = Terminal(ws, "json")
    try:
        assert await closed_with(terminal) == Code.INVALID_MESSAGE
    finally:
        await terminal.close()


async def test_a_resume_beyond_any_seq_is_refused_4006(server: RunningServer) -> None:
    async with server.terminal("pos-a") as a:
        await refused_4006(a, {"type": "resume", "since": 2**63})


@pytest.mark.parametrize("limit", ["%C2%B2", "%D9%A3", "1e2", "-1", "0", "501"])
async def test_a_limit_that_is_no_number_is_400(server: RunningServer, limit: str) -> None:
    status, _, body = await http_get(f"{server.http}/api/v1/entities/tables?limit={limit}")
    assert status == 400, body
    assert json.loads(body)["code"] == "invalid_limit"


@pytest.mark.parametrize("entity_id", ["t%00", "%00", "t%ED%A0%80"])
async def test_an_entity_id_storage_cannot_hold_is_400(
    server: RunningServer, entity_id: str
) -> None:
    status, _, body = await http_get(f"{server.http}/api/v1/entities/tables/{entity_id}")
    assert status == 400, body
    assert json.loads(body)["code"] == "invalid_entity_id"


async def test_a_cursor_storage_cannot_hold_is_400(server: RunningServer) -> None:
    cursor = base64.urlsafe_b64encode(json.dumps(["t\x00"]).encode()).decode().rstrip("=")
    status, _, body = await http_get(f"{server.http}/api/v1/entities/tables?cursor={cursor}")
    assert status == 400, body
    assert json.loads(body)["code"] == "invalid_cursor"

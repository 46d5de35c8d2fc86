"""docs/protocol.md §12 over a running server: GET /api/v1/entities (one, through the RequestCache,
with ETag and 304; a paginated list), its authorization and errors, and the pushed operation that is
also the receivers' cache invalidation."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
import pytest

from chefia_rt.auth import issue_token
from chefia_rt.entity_api import LIST_LIMIT
from chefia_rt.pipeline import ANSWER_SLICE
from tests.helpers import RunningServer, http_get, op, running_server

pytestmark = pytest.mark.asyncio

KEY = "chefia-test-key-0123456789abcdef-0123456789"


async def get(
    server: RunningServer, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    status, got, body = await http_get(server.http + path, headers)
    if status == 304:
        assert body == b""
        return status, got, None
    assert got["Content-Type"] == "application/json"
    decoded = json.loads(body)
    if status >= 400:
        assert decoded["status"] == status and decoded["code"] and decoded["error"], decoded
    return status, got, decoded


async def write(server: RunningServer, *ops: dict[str, Any], store: str = "s1") -> list[int]:
    """Send operations from a POS of the store; the confirmed versions."""
    versions = []
    async with server.terminal("writer", store=store) as pos:
        for message in ops:
            await pos.send(message)
            versions.append((await pos.until("sync_confirmation"))["version"])
    return versions


async def test_read_one_entity_with_etag_and_304(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        entity_id = "mesa/7 ç"  # a '/' and non-ASCII, percent-encoded in the path
        await write(server, op("o1", entity_id, {"status": "occupied", "guests": 4}))
        path = f"/api/v1/entities/tables/{quote(entity_id, safe='')}?store_id=s1"
        status, headers, body = await get(server, path)
        assert status == 200
        assert body["entity_type"] == "tables" and body["entity_id"] == entity_id
        assert (body["version"], body["data"], body["deleted"]) == (
            1,
            {"status": "occupied", "guests": 4},
            False,
        )
        assert body["updated_by"] == "writer" and body["updated_at"].endswith("Z")
        assert headers["ETag"] == '"1"'
        assert "no-cache" in headers["Cache-Control"] and "private" in headers["Cache-Control"]
        # A hit answers the same bytes as the miss did.
        assert (await get(server, path))[2] == body

        status, headers, _ = await get(server, path, {"If-None-Match": '"1"'})
        assert (status, headers["ETag"]) == (304, '"1"')
        assert (await get(server, path, {"If-None-Match": 'W/"0", "1"'}))[0] == 304
        assert (await get(server, path, {"If-None-Match": "*"}))[0] == 304

        await write(server, op("o2", entity_id, {"guests": 5}, version=2))
        status, headers, body = await get(server, path, {"If-None-Match": '"1"'})
        assert (status, headers["ETag"], body["version"]) == (200, '"2"', 2)
        assert body["data"] == {"status": "occupied", "guests": 5}

        await write(server, op("o3", entity_id, operation="DELETE", version=3))
        status, _, body = await get(server, path)
        assert (status, body["version"], body["deleted"], body["data"]) == (200, 3, True, {})
        stats = server.worker.cache.stats()
        # Written through before each confirmation: reads rarely need storage at all.
        hits, misses = stats["hits"]["tables"], stats["misses"]["tables"]
        assert hits + misses == 7 and hits >= 1
        # The metrics work reads the same figures (cache_requests_total{entity_type, result}).
        await server.worker.chores.report()
        _, _, text = await http_get(server.http + "/metrics")
        assert f'cache_requests_total{{entity_type="tables",result="hit"}} {float(hits)}' in (
            text.decode()
        ), text.decode()


async def test_bad_requests_get_clear_errors(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        await write(server, op("o1", "t1"))
        cases = {
            "/api/v1/entities/tables/nobody?store_id=s1": (404, "not_found"),
            "/api/v1/entities/tables/t1?store_id=s2": (404, "not_found"),  # another store's
            "/api/v1/entities/ta%20bles/t1": (400, "invalid_entity_type"),
            "/api/v1/entities//t1": (400, "invalid_entity_type"),
            "/api/v1/entities/tables/": (400, "invalid_entity_id"),
            f"/api/v1/entities/tables/{'x' * 129}": (400, "invalid_entity_id"),
            "/api/v1/entities/tables/%FF": (400, "invalid_entity_id"),
            "/api/v1/entities/tables/t1?store_id=a%20b": (400, "invalid_store_id"),
            "/api/v1/entities/tables/t1?type=admin": (400, "invalid_terminal_type"),
            "/api/v1/entities/tables/t1?store_id=s1&store_id=s2": (400, "invalid_query"),
            "/api/v1/entities/tables?limit=0": (400, "invalid_limit"),
            f"/api/v1/entities/tables?limit={LIST_LIMIT[1] + 1}": (400, "invalid_limit"),
            "/api/v1/entities/tables?limit=ten": (400, "invalid_limit"),
            "/api/v1/entities/tables?cursor=%%%": (400, "invalid_cursor"),
            "/api/v1/entities/tables?cursor=bnVsbA": (400, "invalid_cursor"),  # "null"
            "/api/v1/entities/cashier_operations/c1?type=kds": (403, "forbidden"),
            "/api/v1/entities/cashier_operations?type=waiter": (403, "forbidden"),
        }
        for path, (status, code) in cases.items():
            got, _, body = await get(server, path)
            assert (got, body["code"]) == (status, code), (path, body)
        assert (await get(server, "/api/v1/entities/tables/t1?store_id=s1&type=kds"))[0] == 403
        assert (await get(server, "/api/v1/entities/orders/o1?store_id=s1&type=kds"))[0] == 404
        assert (await get(server, "/api/v1/entities/tables/t1?store_id=s1&type=monitor"))[0] == 200


async def test_tokens_decide_the_store_and_the_type(tmp_path: Path) -> None:
    async with running_server(tmp_path, jwt_secret_key=KEY) as server:
        pos_a = issue_token(KEY, "writer", "store-a", "pos", 3600)
        async with server.terminal("writer", store="ignored", token=pos_a) as pos:
            await pos.send(op("o1", "t1", {"n": 1}))
            await pos.until("sync_confirmation")
            await pos.send(
                op("c1", "c1", {"total": 10}, entity_type="cashier_operations", operation="CREATE")
            )
            await pos.until("sync_confirmation")

        path = "/api/v1/entities/tables/t1"
        status, headers, body = await get(server, path)
        assert (status, body["code"], headers["WWW-Authenticate"]) == (
            401,
            "unauthorized",
            "Bearer",
        )
        bad = issue_token("another-key-0123456789abcdef-0123456789", "x", "store-a", "pos", 60)
        assert (await get(server, path, {"Authorization": f"Bearer {bad}"}))[0] == 401
        claims = {"sub": "x", "store_id": "store-a", "terminal_type": "pos", "exp": 1}
        expired = jwt.encode(claims, KEY, algorithm="HS256")
        assert (await get(server, f"{path}?token={expired}"))[0] == 401

        waiter_a = issue_token(KEY, "w1", "store-a", "waiter", 3600)
        status, _, body = await get(server, path, {"Authorization": f"Bearer {waiter_a}"})
        assert (status, body["data"]) == (200, {"n": 1})
        # The query's store means nothing with a token: store-b's token never sees store-a.
        pos_b = issue_token(KEY, "p9", "store-b", "pos", 3600)
        status, _, body = await get(server, f"{path}?store_id=store-a&token={pos_b}")
        assert (status, body["code"]) == (404, "not_found")
        cash = "/api/v1/entities/cashier_operations/c1"
        assert (await get(server, cash, {"Authorization": f"Bearer {waiter_a}"}))[0] == 403
        kds_a = issue_token(KEY, "k1", "store-a", "kds", 3600)
        assert (await get(server, cash, {"Authorization": f"Bearer {kds_a}"}))[0] == 403
        monitor_a = issue_token(KEY, "m1", "store-a", "monitor", 3600)
        status, _, body = await get(server, cash, {"Authorization": f"Bearer {monitor_a}"})
        assert (status, body["data"]) == (200, {"total": 10})


async def test_list_pages_through_a_type(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        ids = [f"t{i:02d}" for i in range(7)]
        await write(server, *(op(f"o-{i}", i, {"i": i}, operation="CREATE") for i in ids))
        await write(server, op("o-other", "t99", operation="CREATE"), store="s2")
        await write(server, op("o-del", "t03", operation="DELETE", version=2))
        seen: list[dict[str, Any]] = []
        cursor: str | None = None
        pages = 0
        while True:
            query = "store_id=s1&limit=3" + (f"&cursor={cursor}" if cursor else "")
            status, headers, body = await get(server, f"/api/v1/entities/tables?{query}")
            assert status == 200 and body["entity_type"] == "tables"
            assert body["count"] == len(body["entities"]) <= 3
            assert headers["Cache-Control"] == "no-store"
            seen.extend(body["entities"])
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert pages == 3
        assert [e["entity_id"] for e in seen] == ids
        assert [e["entity_id"] for e in seen if e["deleted"]] == ["t03"]
        assert seen[0] == (await get(server, "/api/v1/entities/tables/t00?store_id=s1"))[2]
        _, _, everything = await get(server, "/api/v1/entities/tables?store_id=s1")
        assert everything["count"] == 7 and everything["next_cursor"] is None
        _, _, none = await get(server, "/api/v1/entities/products?store_id=s1")
        assert (none["entities"], none["next_cursor"]) == ([], None)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_a_push_is_the_cache_invalidation(tmp_path: Path, encoding: str) -> None:
    """A terminal that receives an entity version's data_sync gets nothing else for it: the
    push carries the entity and version a terminal's cache drops (no cache_invalidate)."""
    async with (
        running_server(tmp_path) as server,
        server.terminal("pos-a") as sender,
        server.terminal("kds-1", type="kds", encoding=encoding) as kds,
    ):
        await sender.send(op("o1", "table-1", {"status": "new"}))
        await sender.expect("sync_confirmation")
        await sender.send(op("o2", "table-1", {"status": "cooking"}, version=2))
        await sender.expect("sync_confirmation")
        for version in (1, 2):
            push = await kds.expect("data_sync")
            assert push["operation"]["entity_type"] == "tables"
            assert push["operation"]["entity_id"] == "table-1"
            assert push["operation"]["version"] == version
        # connection_established, then the two pushes (in one or two frames), nothing more.
        assert 2 <= len(kds.frames) <= 3
        await kds.nothing()
        await sender.nothing()  # the sender has its confirmation: no push


async def test_the_confirmed_version_is_read_at_once_even_from_a_large_batch(
    tmp_path: Path,
) -> None:
    """Read-your-writes as a terminal sees it: the moment a confirmation arrives, a read on an
    HTTP connection opened before returns the confirmed version, not the one the cache held.
    The confirmation is the first of a batch many answer slices long, whose later slices are
    still being answered when the read arrives (the cache is written before any of them)."""
    size = 32 * ANSWER_SLICE  # one frame, one batch: the loop runs between its 32 slices
    async with (
        running_server(
            tmp_path,
            cache_ttls={"tables": 3600.0},
            sync_batch_max_ops=size,
            ws_rate_burst=2 * size,
        ) as server,
        server.terminal("pos-a", encoding="msgpack") as pos,
    ):
        await pos.send(op("o1", "t-read", {"n": 1}))
        assert (await pos.expect("sync_confirmation"))["version"] == 1
        path = "/api/v1/entities/tables/t-read?store_id=s1"
        assert (await get(server, path))[2]["version"] == 1  # held, fresh for an hour
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            fillers = [op(f"f{i}", f"t-fill-{i}") for i in range(size - 1)]
            update = op("o2", "t-read", {"n": 2}, version=2)
            await pos.send({"type": "message_batch", "messages": [update, *fillers]})
            confirmation = await pos.expect("sync_confirmation")  # a 2048-op commit
            assert (confirmation["operation_id"], confirmation["version"]) == ("o2", 2)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            assert head.startswith(b"HTTP/1.1 200") and length is not None, head
            read = json.loads(await reader.readexactly(int(length[1])))
        finally:
            writer.close()
        assert (read["version"], read["data"]) == (2, {"n": 2})

"""The small HTTP side on the WebSocket port: health and stats (SPEC §6).

websockets hands every request to `process_request` before the upgrade; a request without
`Upgrade: websocket` is answered here and never becomes a connection.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

if TYPE_CHECKING:
    from chefia_rt.node import Node


def json_response(status: int, body: Any, extra: dict[str, str] | None = None) -> Response:
    payload = json.dumps(body, separators=(",", ":")).encode()
    headers = Headers(
        {
            "Content-Type": "application/json",
            "Content-Length": str(len(payload)),
            "Cache-Control": "no-store",
            **(extra or {}),
        }
    )
    return Response(status, HTTPStatus(status).phrase, headers, payload)


async def _health(node: Node) -> Response:
    ok, body = await node.health()
    return json_response(200 if ok else 503, body)


async def _stats(node: Node) -> Response:
    return json_response(200, node.websocket_stats())


Route = Callable[["Node"], Awaitable[Response]]

ROUTES: dict[str, Route] = {
    "/health": _health,
    "/api/v1/health": _health,
    "/ws/stats": _stats,
    "/api/v1/websocket/stats": _stats,
}


def is_upgrade(request: Request) -> bool:
    return "websocket" in request.headers.get("Upgrade", "").lower()


async def handle_http(node: Node, request: Request) -> Response:
    """Answer a plain HTTP request."""
    path = urlsplit(request.path).path
    route = ROUTES.get(path)
    if route is None:
        return json_response(404, {"error": "not found", "path": path})
    return await route(node)

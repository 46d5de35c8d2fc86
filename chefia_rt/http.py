"""The small HTTP side on the WebSocket port: health and stats (SPEC §6).

websockets hands every request to `process_request` before the upgrade; a request without
`Upgrade: websocket` is answered here and never becomes a connection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chefia_rt import __version__

if TYPE_CHECKING:
    from chefia_rt.node import Node

log = logging.getLogger("chefia_rt.http")


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
    try:
        ok, body = await node.health()
    except Exception as exc:
        # A health check that cannot even ask storage is a "down", not a 500: load balancers
        # and deploy.sh act on 503.
        log.warning("health check failed: %s", exc)
        return json_response(503, {"status": "down", "version": __version__, "error": str(exc)})
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
    try:
        return await route(node)
    except Exception:
        log.exception("HTTP %s failed", path)
        return json_response(500, {"error": "internal error", "path": path})

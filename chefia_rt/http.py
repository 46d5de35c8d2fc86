"""The small HTTP side on the WebSocket port: health, stats and the monitor page (docs/protocol.md
§13, docs/operations.md §3).

Both WebSocket front ends hand every request here before an upgrade (websockets through
`process_request`, picows through the gate of chefia_rt/picows_server.py); a request without
`Upgrade: websocket` is answered here and never becomes a connection.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from functools import cache
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chefia_rt import __version__, entity_api
from chefia_rt.auth import authenticate
from chefia_rt.errors import AuthFailed
from chefia_rt.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from chefia_rt.worker import Worker

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


async def _health(worker: Worker) -> Response:
    try:
        ok, body = await worker.health()
    except Exception as exc:
        # A health check that cannot even ask storage is a "down", not a 500: load balancers
        # and deploy.sh act on 503.
        log.warning("health check failed: %s", exc)
        return json_response(503, {"status": "down", "version": __version__, "error": str(exc)})
    return json_response(200 if ok else 503, body)


async def _stats(worker: Worker) -> Response:
    return json_response(200, worker.cluster_websocket_stats())


async def _metrics(worker: Worker) -> Response:
    payload = worker.metrics.exposition()
    headers = Headers(
        {
            "Content-Type": METRICS_CONTENT_TYPE,
            "Content-Length": str(len(payload)),
            "Cache-Control": "no-store",
        }
    )
    return Response(200, "OK", headers, payload)


Route = Callable[["Worker"], Awaitable[Response]]

ROUTES: dict[str, Route] = {
    "/health": _health,
    "/api/v1/health": _health,
    "/ws/stats": _stats,
    "/api/v1/websocket/stats": _stats,
    "/metrics": _metrics,
    "/ws/metrics": _metrics,
}
# Gone (404) with WS_ENABLE_METRICS=false.
METRICS_PATHS = frozenset({"/metrics", "/ws/metrics"})


# Routes that need a token when authentication is on, and the terminal types that may read them.
# /health stays public: load balancers and deploy scripts poll it without credentials. The
# metrics name every store and terminal: on the WebSocket port they need a token like the stats;
# Prometheus scrapes METRICS_PORT (a private listener) without one.
_READERS = frozenset({"monitor", "pos"})
PROTECTED: dict[str, frozenset[str]] = {
    "/ws/stats": _READERS,
    "/api/v1/websocket/stats": _READERS,
    "/metrics": _READERS,
    "/ws/metrics": _READERS,
}


def _denied(worker: Worker, request: Request, allowed: frozenset[str]) -> Response | None:
    """401 without a valid token, 403 for a terminal type that may not read this; else None."""
    try:
        claims = authenticate(
            worker.settings.jwt_keys, urlsplit(request.path).query, request.headers
        )
    except AuthFailed as exc:
        worker.metrics.refused_auth("http")
        return json_response(401, {"error": exc.reason}, {"WWW-Authenticate": "Bearer"})
    if claims.terminal_type not in allowed:
        worker.metrics.refused_auth("http")
        kinds = " or ".join(sorted(allowed))
        return json_response(403, {"error": f"needs a {kinds} token"})
    return None


# The Terminal Monitor's files (chefia_rt/monitor/), by URL path. Only these names are served: a
# path is looked up here, never joined onto a directory, so no path can reach another file.
MONITOR_FILES: dict[str, tuple[str, str]] = {
    "/monitor": ("index.html", "text/html; charset=utf-8"),
    "/monitor/": ("index.html", "text/html; charset=utf-8"),
    "/monitor/index.html": ("index.html", "text/html; charset=utf-8"),
    "/monitor/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/monitor/style.css": ("style.css", "text/css; charset=utf-8"),
}
# The page loads only its own files and talks only to this server's WebSocket; its URL may hold
# a token, which no referrer may carry away.
MONITOR_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@cache
def _monitor_file(name: str, ws_path: str) -> tuple[bytes, str]:
    """A packaged monitor file (the page learns WS_PATH from its markup) and its ETag."""
    body = resources.files("chefia_rt").joinpath("monitor", name).read_bytes()
    if name == "index.html":
        body = body.replace(b'data-ws-path="/ws"', f'data-ws-path="{ws_path}"'.encode())
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def monitor_response(request: Request, path: str, ws_path: str) -> Response | None:
    """The monitor page and its assets; None for any other path. Revalidated on every load
    (no-cache + ETag, 304 when unchanged), so an upgraded server never serves a stale page."""
    found = MONITOR_FILES.get(path)
    if found is None:
        return None
    name, content_type = found
    body, etag = _monitor_file(name, ws_path)
    headers = {"ETag": etag, "Cache-Control": "no-cache", **MONITOR_HEADERS}
    if any(etag in value for value in request.headers.get_all("If-None-Match")):
        return Response(304, "Not Modified", Headers(headers), b"")
    headers.update({"Content-Type": content_type, "Content-Length": str(len(body))})
    return Response(200, "OK", Headers(headers), body)


def is_upgrade(request: Request) -> bool:
    # get_all: a request repeating a header makes websockets' Headers.get raise (a 500 and an
    # error in the log for one odd request); websockets' own handshake then refuses it cleanly.
    return any("websocket" in value.lower() for value in request.headers.get_all("Upgrade"))


# CORS for the HTTP API (/api/v1/...): a page of an origin in WS_ALLOWED_ORIGINS (any origin with
# `*`) may call it from a browser, with a token in the Authorization header (hence the
# preflight); a page of any other origin gets answers without CORS headers, which the browser
# keeps from it. Credentials are tokens, never cookies: no Allow-Credentials.
API_PREFIX = "/api/v1/"
CORS_METHODS = "GET, OPTIONS"
CORS_REQUEST_HEADERS = "Authorization, If-None-Match"
CORS_EXPOSED = "ETag, Retry-After, WWW-Authenticate"
CORS_MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer


def cors_origin(allowed: list[str] | None, request: Request) -> str | None:
    """The request's Origin when it may read the API's answers; None otherwise."""
    origins = request.headers.get_all("Origin")
    if len(origins) != 1 or origins[0] == "null":
        return None
    origin = origins[0]
    return origin if allowed is None or origin in allowed else None


def _preflight(origin: str | None, request: Request) -> Response:
    if request.headers.get_all("Access-Control-Request-Method") and origin is None:
        return json_response(403, {"error": "origin not allowed (WS_ALLOWED_ORIGINS)"})
    headers = {"Allow": CORS_METHODS, "Vary": "Origin", "Cache-Control": "no-store"}
    if origin is not None:
        headers |= {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": CORS_METHODS,
            "Access-Control-Allow-Headers": CORS_REQUEST_HEADERS,
            "Access-Control-Max-Age": CORS_MAX_AGE,
        }
    return Response(204, "No Content", Headers(headers), b"")


async def handle_http(worker: Worker, request: Request) -> Response:
    """Answer a plain HTTP request (with CORS headers for the API, see above)."""
    path = urlsplit(request.path).path
    if not path.startswith(API_PREFIX):
        return await _handle_http(worker, request, path)
    origin = cors_origin(worker.settings.allowed_origins, request)
    if request.method == "OPTIONS":
        return _preflight(origin, request)
    response = await _handle_http(worker, request, path)
    response.headers["Vary"] = "Origin"
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
    return response


async def _handle_http(worker: Worker, request: Request, path: str) -> Response:
    if entity_api.is_entity_path(path):
        return await entity_api.handle(worker, request)
    route = ROUTES.get(path)
    if route is None and path.startswith("/monitor"):
        page = monitor_response(request, path, worker.settings.ws_path)
        if page is not None:
            return page
    if route is None or (path in METRICS_PATHS and not worker.settings.ws_enable_metrics):
        return json_response(404, {"error": "not found", "path": path})
    allowed = PROTECTED.get(path)
    if allowed is not None and worker.settings.auth_enabled:
        denied = _denied(worker, request, allowed)
        if denied is not None:
            return denied
    return await _answer(worker, path, route)


async def _answer(worker: Worker, path: str, route: Route) -> Response:
    try:
        return await route(worker)
    except Exception:
        log.exception("HTTP %s failed", path)
        return json_response(500, {"error": "internal error", "path": path})


async def handle_metrics_port(worker: Worker, request: Request) -> Response:
    """METRICS_PORT: only the metrics (and health, for the scraper's own checks), without a
    token: the port is for the scraper, on a private interface."""
    path = urlsplit(request.path).path
    if path in METRICS_PATHS or path in ("/health", "/api/v1/health"):
        return await _answer(worker, path, ROUTES[path])
    return json_response(404, {"error": "not found", "path": path})

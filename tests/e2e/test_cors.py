"""CORS on the HTTP API (/api/v1/...) for the origins of WS_ALLOWED_ORIGINS: a back-office page
of another origin reads it from real headless Chromium (preflight and all, with a token in the
Authorization header); a page of an origin not listed cannot. Then the headers themselves."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chefia_rt.auth import issue_token, parse_keys
from tests.e2e.test_http import raw_http
from tests.e2e.test_monitor_page import parse_http
from tests.helpers import RunningServer, running_server
from tests.services import chromium

KEY = "chefia-test-key-0123456789abcdef-0123456789"
FETCH = """async ([url, token]) => {
  try {
    const answer = await fetch(url, {headers: {Authorization: "Bearer " + token}});
    return {status: answer.status, etag: answer.headers.get("ETag"), body: await answer.text()};
  } catch (error) {
    return {error: String(error)};
  }
}"""


@contextlib.contextmanager
def static_site(directory: Path) -> Iterator[int]:
    """The back office: plain files over HTTP on a port of its own (another origin)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield site.server_address[1]
    finally:
        site.shutdown()
        site.server_close()


async def test_a_page_of_an_allowed_origin_calls_the_api_from_chromium(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "index.html").write_text("<!doctype html><title>back office</title>")
    token = issue_token(parse_keys(KEY), "office-1", "store-1", "monitor", 600, None)
    with static_site(site_dir) as site_port:
        allowed = f"http://127.0.0.1:{site_port}"
        # The same files from http://localhost:PORT are another origin, not listed.
        settings = {"jwt_secret_key": KEY, "ws_allowed_origins": f"https://pos.example, {allowed}"}
        async with running_server(tmp_path, **settings) as server, chromium() as browser:
            page = await browser.new_page()
            await page.goto(f"{allowed}/index.html")
            entity = f"{server.http}/api/v1/entities/orders/order-1"
            answer = await page.evaluate(FETCH, [entity, token])
            assert answer.get("status") == 404, answer  # read across origins: no such order
            assert '"code": "not_found"' in answer["body"], answer
            health = await page.evaluate(FETCH, [f"{server.http}/api/v1/health", token])
            assert health.get("status") == 200 and '"status":"ok"' in health["body"], health

            other = await browser.new_page()
            await other.goto(f"http://localhost:{site_port}/index.html")
            refused = await other.evaluate(FETCH, [entity, token])
            assert "Failed to fetch" in refused.get("error", ""), refused


async def answer(server: RunningServer, method: str, path: str, **headers: str) -> Any:
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    request = f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
    return parse_http(await raw_http(server, request.encode("latin-1")))


async def test_cors_headers_only_for_listed_origins_and_only_on_the_api(tmp_path: Path) -> None:
    origin = "https://office.example"
    async with running_server(tmp_path, ws_allowed_origins=origin) as server:
        status, headers, _ = await answer(
            server,
            "OPTIONS",
            "/api/v1/entities/orders/o-1",
            Origin=origin,
            Access_Control_Request_Method="GET",
            Access_Control_Request_Headers="authorization",
        )
        assert status == 204
        assert headers["access-control-allow-origin"] == origin
        assert "GET" in headers["access-control-allow-methods"]
        assert "Authorization" in headers["access-control-allow-headers"]
        assert headers["vary"] == "Origin"
        status, headers, _ = await answer(
            server, "OPTIONS", "/api/v1/health", Origin="https://evil.example",
            Access_Control_Request_Method="GET",
        )  # fmt: skip
        assert status == 403 and "access-control-allow-origin" not in headers
        status, headers, _ = await answer(server, "GET", "/api/v1/health", Origin=origin)
        assert status == 200 and headers["access-control-allow-origin"] == origin
        assert "ETag" in headers["access-control-expose-headers"]
        status, headers, _ = await answer(
            server, "GET", "/api/v1/health", Origin="https://evil.example"
        )
        assert status == 200 and "access-control-allow-origin" not in headers
        assert headers["vary"] == "Origin"
        # Outside the API nothing changes.
        status, headers, _ = await answer(server, "GET", "/health", Origin=origin)
        assert status == 200 and "access-control-allow-origin" not in headers
    async with running_server(tmp_path, ws_allowed_origins="*") as server:
        status, headers, _ = await answer(server, "GET", "/api/v1/health", Origin=origin)
        assert headers["access-control-allow-origin"] == origin

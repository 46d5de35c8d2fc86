"""/metrics names every store and terminal: with JWT_SECRET_KEY it needs a monitor or pos token
on the WebSocket port, like /ws/stats; METRICS_PORT (the scraper's private listener) needs none.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from chefia_rt.auth import issue_token
from tests.e2e.test_auth import KEY, OTHER_KEY, auth_server, greeted, token
from tests.helpers import free_port, http_get, running_server


@pytest.mark.parametrize("path", ["/metrics", "/ws/metrics"])
async def test_metrics_on_the_websocket_port_need_a_monitor_or_pos_token(
    tmp_path: Path, path: str
) -> None:
    async with auth_server(tmp_path) as server:
        pos = await greeted(server, "pos-secret-7", token=token("pos-secret-7"))
        try:
            status, head, body = await http_get(server.http + path)
            assert status == 401, body[:200]
            assert head["WWW-Authenticate"] == "Bearer"
            assert b"pos-secret-7" not in body and b"store-a" not in body
            bad = token(key=OTHER_KEY)
            status, _, _ = await http_get(server.http + path, {"Authorization": f"Bearer {bad}"})
            assert status == 401
            kds = token("kds-1", type="kds")
            status, _, _ = await http_get(server.http + path, {"Authorization": f"Bearer {kds}"})
            assert status == 403
            for kind in ("monitor", "pos"):
                good = token("reader-1", type=kind)
                headers = {"Authorization": f"Bearer {good}"}
                status, head, body = await http_get(server.http + path, headers)
                assert status == 200
                assert head["Content-Type"].startswith("text/plain")
                assert b"websocket_active_connections" in body
                status, _, _ = await http_get(server.http + f"{path}?token={good}")
                assert status == 200
        finally:
            await pos.close()


async def test_metrics_port_needs_no_token(tmp_path: Path) -> None:
    port = free_port()
    async with auth_server(tmp_path, metrics_port=port) as server:
        await server.server.start_metrics(port)
        for path in ("/metrics", "/ws/metrics"):
            status, _, body = await http_get(f"http://127.0.0.1:{port}{path}")
            assert status == 200, body[:200]
            assert b"websocket_active_connections" in body
        status, _, _ = await http_get(f"http://127.0.0.1:{port}/health")
        assert status == 200
        status, _, _ = await http_get(f"http://127.0.0.1:{port}/ws/stats")
        assert status == 404  # the stats stay on the WebSocket port, behind a token


async def test_open_mode_metrics_stay_public(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        status, _, body = await http_get(server.http + "/metrics")
        assert status == 200 and b"websocket_active_connections" in body


async def test_an_expired_token_reads_no_metrics(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as server:
        expired = issue_token(KEY, "mon-1", "store-a", "monitor", 60, now=time.time() - 3600)
        status, _, body = await http_get(server.http + f"/metrics?token={expired}")
        assert status == 401 and b"expired" in body

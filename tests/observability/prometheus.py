"""A real Prometheus server (the Debian package's binary) for end-to-end tests.

It runs on a free loopback port with a temporary config and storage directory, scrapes the
given targets every second, loads config/alerts.yml, and is killed when the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.helpers import free_port
from tests.observability.promtext import http_get
from tests.services import service_missing

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
READY_TIMEOUT = 120.0  # a hang guard: a loaded machine starts Prometheus slowly


class Prometheus:
    """A running Prometheus and its HTTP API."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port = port
        self.proc = proc
        self.log = log
        self.url = f"http://127.0.0.1:{port}"

    async def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET an API path; its `data` (failing on an error answer)."""
        query = urllib.parse.urlencode(params)
        status, _, body = await asyncio.to_thread(http_get, f"{self.url}{path}?{query}")
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (path, params, answer)
        return dict(answer["data"])

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant PromQL query's vector."""
        data = await self.api("/api/v1/query", query=expr)
        return list(data["result"])

    async def scalar(self, expr: str) -> float | None:
        """The single value of a query, None while it has no result."""
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.asynccontextmanager
async def running_prometheus(
    tmp_path: Path, targets: list[str], *, admin_api: bool = False
) -> AsyncIterator[Prometheus]:
    """Start Prometheus scraping `targets` (host:port) every second; stop it after. `admin_api`:
    with --web.enable-admin-api, as docker-compose.yml runs it (deleting series)."""
    binary = shutil.which("prometheus")
    if binary is None:
        service_missing("prometheus", "not installed (apt install prometheus)")
    assert binary is not None
    home = tmp_path / "prometheus"
    (home / "data").mkdir(parents=True)
    shutil.copy(CONFIG_DIR / "alerts.yml", home / "alerts.yml")
    config = {  # JSON is YAML too
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {
                "job_name": "chefia-rt",
                "metrics_path": "/metrics",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": targets}],
            }
        ],
    }
    (home / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    log = home / "prometheus.log"
    proc = _spawn(
        [
            binary,
            f"--config.file={home / 'prometheus.yml'}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            *(["--web.enable-admin-api"] if admin_api else []),
        ],
        log,
    )
    prometheus = Prometheus(port, proc, log)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while (await asyncio.to_thread(_status, prometheus.url + "/-/ready")) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("prometheus did not become ready:\n" + prometheus.output())
            await asyncio.sleep(0.1)
        yield prometheus
    finally:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def _status(url: str) -> int | None:
    try:
        return http_get(url, timeout=2)[0]
    except OSError:
        return None


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a process with its output going to `log` (killed by the caller)."""
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

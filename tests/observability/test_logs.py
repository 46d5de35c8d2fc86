"""Structured logs of a real `chefia-rt serve`: JSON off a TTY, text on one, ids, no tokens."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pty
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import websockets

from chefia_rt.auth import issue_token
from chefia_rt.logs import bind, operation_bound, setup_logging
from tests.cluster import _SERVER_ENV_PREFIXES, STOP_TIMEOUT
from tests.helpers import Terminal, free_port, op
from tests.observability.promtext import http_get, scrape, value

KEY = "log-test-key-of-at-least-32-bytes!"


@asynccontextmanager
async def serving(tmp_path: Path, **env: str) -> AsyncIterator[tuple[int, Path]]:
    """`python -m chefia_rt serve` (one worker, SQLite, JWT) with stderr to a file (no TTY)."""
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(_SERVER_ENV_PREFIXES)}
    environ.update(
        WS_HOST="127.0.0.1",
        WS_PORT=str(port),
        WS_WORKERS="1",
        DATABASE_URL=f"sqlite:///{tmp_path / 'logs.db'}",
        JWT_SECRET_KEY=KEY,
        PYTHONUNBUFFERED="1",
        **env,
    )
    proc = _spawn([sys.executable, "-m", "chefia_rt", "serve"], tmp_path, environ, log)
    try:
        deadline = time.monotonic() + 120  # a hang guard: a loaded machine starts slowly
        while True:
            try:
                if (await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/health"))[0]:
                    break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not start:\n" + log.read_text()
            await asyncio.sleep(0.05)
        yield port, log
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT * 2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _spawn(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


async def traffic(port: int, token: str) -> None:
    """A terminal with a token sends one op; a bad token is refused (4003)."""
    url = f"ws://127.0.0.1:{port}/ws/pos-1?encoding=json&token={token}"
    async with websockets.connect(url) as ws:
        pos = Terminal(ws, "json")
        await pos.expect("connection_established")
        await pos.send(op("op-logged-1", "table-9", {"status": "occupied"}))
        await pos.until("sync_confirmation")
    bad = f"ws://127.0.0.1:{port}/ws/pos-2?token={token[:-4]}AAAA"
    async with websockets.connect(bad) as ws:
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 4003
    # A stats request carrying the token in its query (403 or 200, never logged).
    await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/ws/stats?token={token}")


def lines(log: Path) -> list[dict[str, Any]]:
    """Every line must be one JSON object."""
    records = []
    for line in log.read_text().splitlines():
        assert line.startswith("{"), f"not a JSON line: {line!r}"
        records.append(json.loads(line))
    return records


@pytest.mark.asyncio
async def test_json_lines_with_ids_and_messages_and_never_a_token(tmp_path: Path) -> None:
    token = issue_token((KEY,), "pos-1", "s1", "pos", 600)
    async with serving(tmp_path, WS_LOG_LEVEL="debug", WS_LOG_MESSAGES="true") as (port, log):
        await traffic(port, token)
    text = log.read_text()
    assert token not in text and token.split(".")[2] not in text
    records = lines(log)
    assert {r["level"] for r in records} >= {"INFO"}
    connected = [r for r in records if "terminal connected" in r["message"]]
    assert connected and connected[0]["terminal_id"] == "pos-1"
    assert connected[0]["store_id"] == "s1" and len(connected[0]["session_id"]) == 32
    messages = [r for r in records if r["logger"] == "chefia_rt.messages"]
    incoming = [r for r in messages if r["direction"] == "in"]
    outgoing = [r for r in messages if r["direction"] == "out"]
    sync_in = [r for r in incoming if r["message_type"] == "data_sync"]
    assert sync_in and sync_in[0]["operation_id"] == "op-logged-1"
    assert sync_in[0]["terminal_id"] == "pos-1" and sync_in[0]["store_id"] == "s1"
    assert "occupied" not in text  # summaries, never entity data
    confirmed = [r for r in outgoing if r["message_type"] == "sync_confirmation"]
    assert confirmed and confirmed[0]["operation_id"] == "op-logged-1"
    assert confirmed[0]["session_id"] == sync_in[0]["session_id"]
    refused = [r for r in records if "handshake refused" in r["message"]]
    assert refused and "4003" in refused[0]["message"]


@pytest.mark.asyncio
async def test_no_message_lines_without_ws_log_messages_and_one_worker_metrics(
    tmp_path: Path,
) -> None:
    """Also: `serve` with one worker (no supervisor) serves its metrics, on METRICS_PORT too."""
    token = issue_token((KEY,), "pos-1", "s1", "pos", 600)
    metrics_port = free_port()
    env = {"WS_LOG_LEVEL": "INFO", "METRICS_PORT": str(metrics_port)}
    async with serving(tmp_path, **env) as (port, log):
        await traffic(port, token)
        # JWT on: the WebSocket port's /metrics needs a token, METRICS_PORT's does not.
        for url in (
            f"http://127.0.0.1:{port}/metrics?token={token}",
            f"http://127.0.0.1:{metrics_port}/metrics",
        ):
            text = await scrape(url)
            assert value(text, "sync_operations_total", status="applied") == 1
            assert value(text, "websocket_auth_failures_total", endpoint="websocket") == 1
    records = lines(log)
    assert any("terminal connected" in r["message"] for r in records)
    assert not [r for r in records if r["logger"] == "chefia_rt.messages"]
    assert token not in log.read_text()


def test_plain_text_on_a_tty() -> None:
    """stderr on a real pseudo-terminal: the readable line, with the bound ids appended."""
    leader, follower = pty.openpty()
    code = (
        "import logging; from chefia_rt.logs import setup_logging, bind; "
        "setup_logging('INFO'); bind(terminal_id='pos-7', store_id='s9'); "
        "logging.getLogger('chefia_rt.test').info('hello token=secret123'); "
        # websockets' own request lines go through the same redaction
        "logging.getLogger('websockets.server').warning('GET /ws/p?store_id=s&token=secret456')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], stderr=follower, stdout=follower, timeout=30, check=True
    )
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the follower side is closed and drained
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    line = output.decode().replace("\r", "").strip()
    assert proc.returncode == 0
    assert not line.startswith("{"), line
    assert "INFO chefia_rt.test hello" in line and "[terminal_id=pos-7 store_id=s9]" in line
    assert "secret123" not in line and "secret456" not in line
    assert "GET /ws/p?store_id=s&token=[REDACTED]" in line


def test_an_operation_id_is_on_the_lines_of_its_block_only() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging("INFO", stream, json_lines=True)
    try:
        logger = logging.getLogger("chefia_rt.test")

        async def handle() -> None:  # a connection's task: its own context
            bind(terminal_id="pos-1", operation_id="from-bind")
            with operation_bound("op-7"):
                logger.info("inside")
                logger.info("own", extra={"operation_id": "passed"})
            logger.info("after")

        asyncio.run(handle())
    finally:
        root.handlers[:], root.level = handlers, level
    inside, own, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (inside["operation_id"], inside["terminal_id"]) == ("op-7", "pos-1")
    assert own["operation_id"] == "passed" and after["operation_id"] == "from-bind"

"""The JavaScript client (clients/js) in real headless Chromium, through its browser bundle.

A page takes operations while the server is down (kept in IndexedDB), is reloaded, and delivers
them once the server is up; it receives what another terminal sends, in seq order after its own;
reloaded again, it resumes after the watermark it kept. The bundle is built by scripts/test.sh
(`npm ci` + `npm run build` in clients/js); without it, and without npm to build it, the test
skips (fails under CHEFIA_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import websockets

from chefia_rt.config import load_settings
from chefia_rt.process import make_server
from chefia_rt.worker import Worker
from tests.helpers import free_port, op
from tests.services import chromium, service_missing

JS = Path(__file__).resolve().parent.parent / "clients" / "js"
BUNDLE = JS / "dist" / "chefia-rt-client.browser.js"
WAIT_MS = 20_000

PAGE = b"""<!doctype html>
<meta charset="utf-8">
<title>chefia-rt client</title>
<script type="module">
import { Client, IndexedDbStorage } from "/client.js";
const params = new URLSearchParams(location.search);
const client = new Client({
  urls: params.get("ws"),
  terminalId: params.get("terminal"),
  storeId: params.get("store"),
  storage: new IndexedDbStorage(`chefia-rt:${params.get("store")}:${params.get("terminal")}`),
  backoff: { initial: 0.05, maximum: 0.3 },
});
window.seen = [];
window.answers = [];
client.on("op", (event) =>
  window.seen.push({ seq: event.seq, own: event.own, id: event.operation.id }));
client.on("answer", (result) =>
  window.answers.push({ id: result.operationId, status: result.answer?.status }));
window.client = client;
await client.start();
window.ready = true;
</script>
"""


def bundle() -> bytes:
    """The browser bundle, built here if it is missing and npm is at hand."""
    if not BUNDLE.exists():
        npm = shutil.which("npm")
        if npm is None or shutil.which("node") is None:
            service_missing("node", f"{BUNDLE} is not built and npm is not installed")
        assert npm is not None
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, check=True)
        subprocess.run([npm, "run", "build"], cwd=JS, check=True)
    return BUNDLE.read_bytes()


@contextmanager
def static_site(script: bytes) -> Iterator[str]:
    """The test page and the bundle over HTTP; yields the page's address."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/":
                body, kind = PAGE, "text/html"
            elif path == "/client.js":
                body, kind = script, "text/javascript"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


@asynccontextmanager
async def server_on(port: int, tmp_path: Path) -> AsyncIterator[Worker]:
    """A server on `port` (chosen before it starts: the page knows it while it is down)."""
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'chefia.db'}", ws_host="127.0.0.1", ws_port=port
    )
    worker = Worker.create(settings)
    await worker.start()
    server = make_server(settings, worker)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    await server.start(sock)
    try:
        yield worker
    finally:
        await server.shutdown(timeout=5)


async def loaded(page: Any) -> None:
    await page.wait_for_function("window.ready === true", timeout=WAIT_MS)


async def test_a_page_keeps_operations_taken_offline_across_a_reload(tmp_path: Path) -> None:
    script = bundle()
    port = free_port()  # nothing listens there yet: the server is down
    query = f"?ws=ws://127.0.0.1:{port}/ws&terminal=pos-web&store=s1"
    errors: list[str] = []
    with static_site(script) as site:
        async with chromium() as browser:
            page = await (await browser.new_context()).new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(site + query)
            await loaded(page)
            ids = await page.evaluate(
                """async () => {
                    const ids = [];
                    for (const n of [1, 2, 3]) {
                        const queued = await window.client.enqueue("tables", `t${n}`, { n });
                        ids.push(queued.id);
                    }
                    return ids;
                }"""
            )
            assert await page.evaluate("window.client.isConnected") is False
            await page.reload()
            await loaded(page)
            kept = await page.evaluate("window.client.unanswered().map((op) => op.id)")
            assert kept == ids  # from IndexedDB, in order

            async with server_on(port, tmp_path) as worker:
                await page.wait_for_function("window.answers.length === 3", timeout=WAIT_MS)
                answers = await page.evaluate("window.answers")
                assert [a["id"] for a in answers] == ids
                assert {a["status"] for a in answers} == {"applied"}
                log = await worker.store.read_operations("s1", 0, 100)
                assert [r.id for r in log] == ids  # each once

                # Another terminal's operation reaches the page after its own, in seq order.
                await push_from_another_terminal(port, "op-other-1", "t9")
                await page.wait_for_function("window.seen.length === 4", timeout=WAIT_MS)
                seen = await page.evaluate("window.seen")
                assert [(s["seq"], s["own"], s["id"]) for s in seen] == [
                    (1, True, ids[0]),
                    (2, True, ids[1]),
                    (3, True, ids[2]),
                    (4, False, "op-other-1"),
                ]

                # Reloaded, the page resumes after the watermark it kept: only what is new.
                await page.evaluate("window.client.persisted()")
                await page.reload()
                await loaded(page)
                assert await page.evaluate("window.client.watermark") == 4
                await page.wait_for_function("window.client.isConnected", timeout=WAIT_MS)
                await push_from_another_terminal(port, "op-other-2", "t10")
                await page.wait_for_function("window.seen.length === 1", timeout=WAIT_MS)
                assert await page.evaluate("window.seen.map((s) => s.seq)") == [5]
                assert await page.evaluate("window.client.unanswered().length") == 0
    assert errors == []


async def push_from_another_terminal(port: int, op_id: str, entity_id: str) -> None:
    """One operation from a plain WebSocket terminal, once the server confirmed it."""
    url = f"ws://127.0.0.1:{port}/ws/pos-other?store_id=s1"
    async with websockets.connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "connection_established"
        await ws.send(json.dumps(op(op_id, entity_id, {"n": 9})))
        async with asyncio.timeout(WAIT_MS / 1000):
            while json.loads(await ws.recv())["type"] != "sync_confirmation":
                pass

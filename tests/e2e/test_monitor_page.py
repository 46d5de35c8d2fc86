"""The Terminal Monitor page at /monitor, in real headless Chromium (docs/operations.md §7).

The page connects as a monitor terminal; real WebSocket terminals connect and send operations,
and the tests assert what a person sees: the terminals with their types and status, activity
lines, an offline terminal, an alert and its acknowledgement, filters and search, a CSV
download. Screenshots go to the test's tmp_path (set CHEFIA_MONITOR_SCREENSHOT=path to write
docs/monitor.png). First, the files themselves over plain HTTP.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from chefia_rt.auth import issue_token
from tests.e2e.test_http import raw_http
from tests.helpers import RunningServer, Terminal, op, running_server
from tests.services import chromium

FAST = {
    "terminal_report_interval": 0.2,
    "monitor_alert_offline_after": 1.0,
    "monitor_event_poll_interval": 0.5,
}
HOSTILE_ID = '<img src=x onerror="window.__xss=1">'
KEY = "chefia-test-key-0123456789abcdef-0123456789"
# One event loop for the module, so that one browser serves every test (a launch costs seconds).
pytestmark = pytest.mark.asyncio(loop_scope="module")


def parse_http(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


async def http_get(server: RunningServer, path: str, **headers: str) -> tuple[int, Any, bytes]:
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
    return parse_http(await raw_http(server, request.encode("latin-1")))


# ---- the files ----------------------------------------------------------------------------------


async def test_the_page_and_its_assets_are_served_safely(tmp_path: Path) -> None:
    async with running_server(tmp_path, ws_path="/sync") as server:
        for path, kind in [
            ("/monitor", "text/html"),
            ("/monitor/", "text/html"),
            ("/monitor/app.js", "text/javascript"),
            ("/monitor/style.css", "text/css"),
        ]:
            status, headers, body = await http_get(server, path)
            assert status == 200, path
            assert headers["content-type"].startswith(kind), path
            assert int(headers["content-length"]) == len(body) > 100
            assert headers["cache-control"] == "no-cache"
            assert "script-src 'self'" in headers["content-security-policy"]
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["referrer-policy"] == "no-referrer"
            # Revalidation: the same ETag answers 304 without a body.
            again, cached, empty = await http_get(server, path, If_None_Match=headers["etag"])
            assert (again, empty) == (304, b"")
            assert cached["etag"] == headers["etag"]
        _, _, page = await http_get(server, "/monitor")
        assert b'data-ws-path="/sync"' in page  # the page learns WS_PATH
        for path in [
            "/monitor/../chefia.db",
            "/monitor/%2e%2e/chefia.db",
            "/monitor/..%2fchefia.db",
            "/monitor/app.js/../../chefia.db",
            "/monitor//etc/passwd",
            "/monitor/README.md",
            "/monitor/index.html%00.js",
            "/monitorx",
        ]:
            status, headers, body = await http_get(server, path)
            assert status == 404, path
            assert b"SQLite" not in body and b"root:" not in body


# ---- the browser --------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Any]:
    async with chromium() as launched:
        yield launched


class Pages:
    """Browser tabs of one test, each in its own context, closed when the test ends."""

    def __init__(self, browser: Any) -> None:
        self.browser = browser
        self.contexts: list[Any] = []

    async def new_page(self) -> Any:
        # bypass_csp: Playwright's waits evaluate strings, which the page's CSP forbids. It
        # also means the XSS checks test the page's escaping itself, not the CSP's backstop.
        context = await self.browser.new_context(
            accept_downloads=True, bypass_csp=True, viewport={"width": 1400, "height": 1000}
        )
        self.contexts.append(context)
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.errors = errors
        return page

    async def open(self, url: str) -> Any:
        """The monitor page at `url`, once it says it is connected."""
        page = await self.new_page()
        await page.goto(url)
        await page.wait_for_selector('#connection[data-state="connected"]', timeout=15_000)
        return page


@pytest_asyncio.fixture(loop_scope="module")
async def pages(browser: Any) -> AsyncIterator[Pages]:
    opened = Pages(browser)
    try:
        yield opened
    finally:
        for context in opened.contexts:
            await context.close()


def row(page: Any, terminal_id: str) -> Any:
    return page.locator(f'#terminals tr[data-terminal="{terminal_id}"]')


async def cells(locator: Any) -> list[str]:
    return [text.strip() for text in await locator.locator("td").all_inner_texts()]


async def test_a_person_watches_terminals_activity_alerts_and_exports(
    tmp_path: Path, pages: Pages
) -> None:
    started = time.monotonic()
    async with running_server(tmp_path, **FAST) as server:
        page = await pages.open(f"{server.http}/monitor?store=s1")
        pos = await server.connect("pos-1")
        kds = await server.connect("kds-1", type="kds")
        waiter = await server.connect("waiter-1", type="waiter")
        other = await server.connect("pos-9", store="s2")  # another store: never on this page

        # The terminals, with their types and status (each row appears when its update lands).
        for terminal_id in ("pos-1", "kds-1", "waiter-1"):
            await row(page, terminal_id).wait_for()
        pos_cells = await cells(row(page, "pos-1"))
        assert pos_cells[:3] == ["pos-1", "pos", "online"]
        assert (await cells(row(page, "kds-1")))[:3] == ["kds-1", "kds", "online"]
        assert (await cells(row(page, "waiter-1")))[:3] == ["waiter-1", "waiter", "online"]

        # Operations, a conflict, a hostile entity id: activity lines, shown as text.
        await send_ops(pos, other)
        await page.wait_for_function(
            "document.querySelectorAll('#activity tbody tr').length >= 5", timeout=15_000
        )
        feed = await page.locator("#activity tbody").inner_text()
        assert "tables/table-7" in feed and "orders/order-1" in feed and "conflict" in feed
        assert HOSTILE_ID in feed  # the id itself, as text ...
        assert await page.evaluate("window.__xss") is None  # ... never run as markup
        assert await page.locator("#activity img").count() == 0
        assert "pos-9" not in await page.locator("body").inner_text()
        await page.wait_for_function(
            "document.getElementById('card-opm').textContent !== '0'", timeout=15_000
        )
        await pos.send({"type": "performance_metrics", "response_time": 42, "memory_usage": 95.5})
        await page.wait_for_function(
            """(() => { const r = document.querySelector('#terminals tr[data-terminal="pos-1"]');
                return r && r.cells[10].textContent === '96 MB'; })()""",
            timeout=15_000,
        )

        # A terminal goes away: offline in seconds, then the alert; a person acknowledges it.
        await kds.close()
        await page.locator('#terminals tr[data-terminal="kds-1"][data-status="offline"]').wait_for()
        alert = page.locator('#alerts li[data-kind="terminal_offline"]')
        await alert.wait_for(timeout=15_000)
        assert "kds-1" in await alert.inner_text()
        memory = page.locator('#alerts li[data-kind="terminal_memory"]')
        await memory.wait_for(timeout=15_000)
        await page.screenshot(path=str(tmp_path / "monitor-alerts.png"), full_page=True)
        count_before = int(await page.locator("#alert-count").inner_text())
        await alert.get_by_role("button", name="Acknowledge").click()
        await page.locator('#alerts li.acked[data-kind="terminal_offline"]').wait_for()
        assert int(await page.locator("#alert-count").inner_text()) == count_before - 1

        # Filters and search.
        await page.select_option("#filter-kind", "conflict")
        kinds = await page.locator("#activity tbody tr td:nth-child(2)").all_inner_texts()
        assert kinds and set(kinds) == {"conflict"}
        await page.select_option("#filter-kind", "")
        await page.fill("#search-entity", "table-7")
        entities = await page.locator("#activity tbody tr td:nth-child(4)").all_inner_texts()
        assert entities and all("table-7" in e for e in entities)
        await page.fill("#search-entity", "")
        await page.select_option("#filter-kind", "data_sync")
        await page.select_option("#filter-terminal", "pos-1")
        terminals = await page.locator("#activity tbody tr td:nth-child(3)").all_inner_texts()
        assert len(terminals) == 4 and set(terminals) == {"pos-1"}
        await page.select_option("#filter-kind", "")
        await page.select_option("#filter-terminal", "")

        # CSV of what is shown (the hostile id cannot turn into a formula either).
        async with page.expect_download() as download_info:
            await page.click("#export-csv")
        download = await download_info.value
        saved = tmp_path / "activity.csv"
        await download.save_as(saved)
        rows = list(csv.DictReader(io.StringIO(saved.read_text(encoding="utf-8"))))
        assert {r["entity_id"] for r in rows} >= {"table-7", "order-1", HOSTILE_ID}
        assert all(r["terminal_id"] != "pos-9" for r in rows)
        assert any(r["kind"] == "conflict" for r in rows)

        # The charts have points, and the page never threw.
        await page.wait_for_function(
            "window.chefiaMonitor.state.series.ops.length >= 2", timeout=15_000
        )
        shot = tmp_path / "monitor.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if target := os.environ.get("CHEFIA_MONITOR_SCREENSHOT"):
            shutil.copy(shot, target)
        assert page.errors == []
        for terminal in (pos, waiter, other):
            await terminal.close()
    print(f"monitor page: {time.monotonic() - started:.2f}s")


async def send_ops(pos: Terminal, other: Terminal) -> None:
    await pos.send(op("op-1", "table-7", {"status": "occupied"}))
    await pos.until("sync_confirmation")
    await pos.send(op("op-2", "table-7", {"status": "free"}, version=1))  # stale: a conflict
    await pos.until("sync_confirmation")
    await pos.send(op("op-3", "order-1", {"total": 12}, entity_type="orders", operation="CREATE"))
    await pos.until("sync_confirmation")
    await pos.send(op("op-4", HOSTILE_ID, {"status": "x"}, operation="CREATE"))
    await pos.until("sync_confirmation")
    await other.send(op("op-s2", "table-7", {"status": "occupied"}))
    await other.until("sync_confirmation")


async def test_waiter_activity_and_reconnect_after_a_restart_of_the_feed(
    tmp_path: Path, pages: Pages
) -> None:
    """The page keeps its terminals when its connection drops, and reconnects by itself."""
    async with running_server(tmp_path, **FAST) as server:
        page = await pages.open(f"{server.http}/monitor?store=s1")
        waiter = await server.connect("waiter-1", type="waiter")
        await waiter.send(op("w-1", "table-3", {"status": "occupied"}))
        await waiter.until("sync_confirmation")
        await page.locator("#activity tbody tr", has_text="table-3").wait_for()
        # The server drops the monitor (as a restart would): the page comes back within seconds.
        monitor = next(s for s in server.worker.hub.sessions() if s.terminal_type == "monitor")
        monitor.close(1012, "restart")
        await page.wait_for_selector('#connection[data-state="connected"]', timeout=15_000)
        await waiter.send(op("w-2", "table-4", {"status": "occupied"}))
        await waiter.until("sync_confirmation")
        await page.locator("#activity tbody tr", has_text="table-4").wait_for()
        assert await page.locator("#activity tbody tr", has_text="table-3").count() == 1
        await waiter.close()


async def test_with_auth_the_token_connects_and_leaves_the_address_bar(
    tmp_path: Path, pages: Pages
) -> None:
    async with running_server(tmp_path, jwt_secret_key=KEY, **FAST) as server:
        token = issue_token(KEY, "manager-1", "loja-1", "monitor", 600)
        page = await pages.open(f"{server.http}/monitor?token={token}")
        assert "token" not in page.url
        assert "loja-1" in await page.locator("#connection").inner_text()
        pos_token = issue_token(KEY, "pos-1", "loja-1", "pos", 600)
        await server.connect("pos-1", store="ignored", token=pos_token)
        await row(page, "pos-1").wait_for()
        assert (await cells(row(page, "pos-1")))[:3] == ["pos-1", "pos", "online"]
        # A bad token: the page says so and does not pretend to be connected.
        bad = await pages.new_page()
        await bad.goto(f"{server.http}/monitor?token={token[:-4]}AAAA")
        await bad.wait_for_function(
            "document.getElementById('connection').textContent.includes('authentication failed')",
            timeout=15_000,
        )


async def test_the_page_stays_responsive_with_1000_terminals_and_100_ops_per_second(
    tmp_path: Path, pages: Pages
) -> None:
    """Drives the page's own message handler at that load (no server can be that big on this
    machine next to the tests) and prints what rendering costs; a liveness bound only."""
    async with running_server(tmp_path, **FAST) as server:
        page = await pages.open(f"{server.http}/monitor?store=s1")
        result = await page.evaluate(
            """async () => {
                const m = window.chefiaMonitor;
                const now = new Date().toISOString();
                const list = [];
                for (let i = 0; i < 1000; i++) list.push({
                    type: "terminal_status_update", store_id: "s1", terminal_id: "t-" + i,
                    terminal_type: i % 10 ? "pos" : "kds", status: i % 50 ? "online" : "offline",
                    change: "listed", connected_since: now, last_seen: now, disconnected_at: null,
                    ops: i, conflicts: 0, bytes_in: 10 * i, bytes_out: 20 * i, reconnects: 0,
                    response_time_ms: null, memory_mb: null, cache_hit_rate: null, worker: "w",
                    server_time: now});
                m.handle({type: "terminal_list", store_id: "s1", full: false, terminals: list,
                          server_time: now});
                m.state.renders = 0; m.state.renderMsTotal = 0; m.state.renderMsMax = 0;
                const started = performance.now();
                let n = 0, lag = 0;
                for (let tick = 0; tick < 20; tick++) {   // 2 s, 10 ops every 100 ms
                    const before = performance.now();
                    for (let k = 0; k < 10; k++, n++) m.handle({type: "sync_activity",
                        activity_id: "load-" + n, kind: "data_sync", store_id: "s1",
                        terminal_id: "t-" + (n % 1000), entity_type: "orders",
                        entity_id: "order-" + n, operation_id: "op-" + n, operation: "UPDATE",
                        seq: n, status: "applied", detail: {}, server_time: now});
                    for (let k = 0; k < 20; k++) list[(n * 7 + k) % 1000].ops += 1;
                    m.handle({type: "terminal_list", store_id: "s1", full: false,
                              terminals: list.slice(0, 200), server_time: now});
                    await new Promise(r => setTimeout(r, 100));
                    lag = Math.max(lag, performance.now() - before - 100);
                }
                return {seconds: (performance.now() - started) / 1000, ops: n,
                        renders: m.state.renders, avg: m.state.renderMsTotal / m.state.renders,
                        max: m.state.renderMsMax, lag: lag, parts: m.state.partsMs,
                        rows: document.querySelectorAll('#terminals tbody tr').length,
                        feed: document.querySelectorAll('#activity tbody tr').length};
            }"""
        )
        print(
            f"\n1000 terminals, {result['ops'] / result['seconds']:.0f} ops/s for "
            f"{result['seconds']:.1f}s: {result['renders']} renders, "
            f"avg {result['avg']:.1f} ms, max {result['max']:.1f} ms, "
            f"worst timer lag {result['lag']:.0f} ms; longest parts (ms): "
            + ", ".join(f"{k} {v:.1f}" for k, v in result["parts"].items())
        )
        assert result["rows"] >= 1000
        assert 0 < result["feed"] <= 500  # capped
        await page.screenshot(path=str(tmp_path / "monitor-1000.png"))
        await asyncio.sleep(0)

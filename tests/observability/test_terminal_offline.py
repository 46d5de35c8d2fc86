"""ChefiaTerminalOffline's memory in a real Prometheus (config/alerts.yml): a terminal seen online
stays in chefia:terminal_known after it disconnects, and leaves it when an operator retires it as
docs/operations.md §5 says (delete_series through the admin API, up to now), to come back if it
connects again. promtool's unit tests (config/alerts_test.yml) cover the alert itself over hours."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import running_server
from tests.observability.prometheus import Prometheus, running_prometheus

KNOWN = 'chefia:terminal_known{store_id="s9", terminal_id="pos-9"}'
# Prometheus scrapes every second and evaluates the rules every second, but on a loaded machine
# a scrape or an evaluation may be late or time out and be done again: the queries wait for the
# result, and give up only after HANG_GUARD seconds, as a guard against a hang (not a time limit
# under test).
HANG_GUARD = 180.0


async def until(prometheus: Prometheus, expr: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + HANG_GUARD
    while True:
        result = await prometheus.query(expr)
        if len(result) == count:
            return result
        assert time.monotonic() < deadline, (
            f"hang guard: {expr} never had {count} series: {result}\n{prometheus.output()}"
        )
        await asyncio.sleep(0.2)


def delete_series(prometheus: Prometheus, match: str) -> int:
    # Up to now only: without `end` the deletion would also hide the terminal's future samples.
    # A form body, as docs/operations.md §5's `curl --data-urlencode` sends it.
    form = urllib.parse.urlencode({"match[]": match, "end": f"{time.time():.3f}"}).encode()
    url = f"{prometheus.url}/api/v1/admin/tsdb/delete_series"
    with urllib.request.urlopen(urllib.request.Request(url, data=form), timeout=10) as r:
        return int(r.status)


async def test_a_terminal_is_remembered_until_it_is_retired(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, terminal_report_interval=0.2) as server,
        running_prometheus(tmp_path, [f"127.0.0.1:{server.port}"], admin_api=True) as prom,
    ):
        async with server.terminal("pos-9", store="s9"):
            await until(prom, KNOWN, 1)
        # Disconnected: reported offline, still known (the alert's condition holds).
        await until(prom, 'terminal_status{terminal_id="pos-9"} == 0', 1)
        offline = "chefia:terminal_known unless on (store_id, terminal_id, type) "
        offline += "max by (store_id, terminal_id, type) (terminal_status == 1)"
        (gone,) = await until(prom, offline, 1)
        assert gone["metric"]["terminal_id"] == "pos-9"
        # Retired: its memory deleted, it is no longer known.
        assert await asyncio.to_thread(delete_series, prom, KNOWN) == 204
        await until(prom, KNOWN, 0)
        assert await prom.query(offline) == []
        # Put back into service later, it is watched again.
        async with server.terminal("pos-9", store="s9"):
            await until(prom, KNOWN, 1)

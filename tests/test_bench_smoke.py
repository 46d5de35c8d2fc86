"""`python -m loadtest.bench` runs end to end and prints its one JSON line: its shape, and that
nothing was lost, on a tiny embedded run (2 stores x 3 terminals). Never its speed."""

from __future__ import annotations

import time

from loadtest.bench import RATIO_KEYS
from tests.helpers import run_bench

FIGURES = {
    "connections",
    "rate_per_terminal",
    "ops_sent",
    "ops_confirmed",
    "offered_ops_s",
    "achieved_ops_s",
    "ack_p50_ms",
    "ack_p99_ms",
    "propagation_p50_ms",
    "propagation_p99_ms",
    "deliveries_expected",
    "deliveries_received",
    "duplicates",
    "errors",
    "error_samples",
    "server_cpu_us_per_op",
    "pg_cpu_us_per_op",
    "client_cpu_us_per_op",
    "server_processes",
    "rss_per_connection_kib",
    "load_average",
}


async def test_bench_prints_one_json_line_and_loses_nothing() -> None:
    started = time.monotonic()
    result = await run_bench(
        "loadtest.bench",
        *("--stores", "2", "--terminals", "3", "--rate", "4", "--duration", "2"),
        timeout=120,
    )
    print(f"bench smoke run took {time.monotonic() - started:.1f}s")
    assert result["bench"] == "rush_hour" and result["mode"] == "embedded"
    assert set(result["ratio"]) == set(RATIO_KEYS)
    for kind in ("ours", "baseline"):
        figures = result[kind]
        assert set(figures) == FIGURES, kind
        assert figures["connections"] == 6
        assert figures["ops_sent"] == 6 * 4 * 2, kind
        # Nothing lost: every op confirmed and pushed to the 2 other terminals of its store.
        assert figures["errors"] == 0, figures["error_samples"]
        assert figures["ops_confirmed"] == figures["ops_sent"], kind
        assert figures["deliveries_expected"] == 2 * figures["ops_sent"], kind
        assert figures["deliveries_received"] == figures["deliveries_expected"], kind
        assert figures["duplicates"] == 0, kind
        assert figures["ack_p99_ms"] is not None and figures["propagation_p99_ms"] is not None

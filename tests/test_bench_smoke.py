"""`python -m loadtest.bench` runs end to end and prints its one JSON line: its shape, and that
nothing was lost, on a tiny embedded run (2 stores x 3 terminals). Never its speed.

The latency-over-time arithmetic (p99 per 250 ms window) is checked on made-up figures."""

from __future__ import annotations

import time

import pytest

from loadtest.bench import RATIO_KEYS, window_figures, window_p99s, worst_lag_ms
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
    "ack_window_p99_ms",
    "ack_worst_window_p99_ms",
    "ack_worst_window_at_s",
    "ack_worst_window_ratio",
    "propagation_window_p99_ms",
    "propagation_worst_window_p99_ms",
    "propagation_worst_window_at_s",
    "propagation_worst_window_ratio",
    "loop_lag_max_ms_by_worker",
    "loop_lag_max_ms",
    "loop_lag_ms_by_second",
    "batch_stages_ms",
}


async def test_bench_prints_one_json_line_and_loses_nothing() -> None:
    started = time.monotonic()
    result = await run_bench(
        "loadtest.bench",
        *("--stores", "2", "--terminals", "3", "--rate", "4", "--duration", "2"),
        *("--transport", "both", "--durable-baseline"),
    )
    print(f"bench smoke run took {time.monotonic() - started:.1f}s")
    assert result["bench"] == "rush_hour" and result["mode"] == "embedded"
    # Ours on each WebSocket front end, then the relay and the durable relay; each of ours with
    # its ratios to both.
    assert result["transport"] == "both"
    for name in ("ratio_websockets", "ratio_picows"):
        assert set(result[name]) == set(result[f"{name}_durable"]) == set(RATIO_KEYS)
    for kind in ("ours_websockets", "ours_picows", "baseline", "baseline_durable"):
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
        # 2 s of sends: 8 windows of 250 ms, each with its p99, the worst one named.
        assert len(figures["ack_window_p99_ms"]) == 8, figures["ack_window_p99_ms"]
        assert None not in figures["ack_window_p99_ms"]
        assert figures["ack_worst_window_p99_ms"] == max(figures["ack_window_p99_ms"])
        assert figures["propagation_worst_window_ratio"] is not None
    # The worst event-loop lag of our one worker during the run, read from /ws/stats.
    for kind in ("ours_websockets", "ours_picows"):
        lags = result[kind]["loop_lag_max_ms_by_worker"]
        assert len(lags) == 1 and all(isinstance(ms, float) for ms in lags.values()), lags
        assert result[kind]["loop_lag_max_ms"] == max(lags.values())
        assert set(result[kind]["loop_lag_ms_by_second"]) == set(lags)
    assert result["baseline"]["loop_lag_max_ms_by_worker"] is None
    assert result["baseline_durable"]["loop_lag_max_ms_by_worker"] is None
    # Where the run's batches spent their time, stage by stage, from our server's /metrics.
    sqlite = ["leases", "wait", "read", "decide", "write", "commit", "sync", "cache", "answer"]
    for kind in ("ours_websockets", "ours_picows"):
        stages = result[kind]["batch_stages_ms"]
        assert set(stages) == {*sqlite, "batches"}, stages
        assert 1 <= stages["batches"] <= 48 and all(ms >= 0 for ms in stages.values()), stages
    assert result["baseline"]["batch_stages_ms"] is None


def test_p99_per_window_of_send_times() -> None:
    started = 100.0
    # Window 0: 100 sends at 1 ms; window 1: nothing; window 2: 99 at 2 ms and one at 500 ms.
    sent = [started + 0.001 * i for i in range(100)] + [
        started + 0.5 + 0.001 * i for i in range(100)
    ]
    latencies = [0.001] * 100 + [0.002] * 99 + [0.5]
    assert window_p99s(sent, latencies, started) == [1.0, None, 500.0]
    figures = window_figures("ack", sent, latencies, started)
    assert figures["ack_window_p99_ms"] == [1.0, None, 500.0]
    assert figures["ack_worst_window_p99_ms"] == 500.0
    assert figures["ack_worst_window_at_s"] == 0.5
    # The whole run's p99 (of 200) is 2 ms: the worst window is 250 times that.
    assert figures["ack_worst_window_ratio"] == 250.0
    assert window_figures("ack", [], [], started)["ack_worst_window_ratio"] is None


@pytest.mark.parametrize(
    ("since", "until", "worst"), [(1000.2, 1001.5, 7.0), (1002.0, 1003.0, 2.0), (990, 995, None)]
)
def test_worst_lag_of_the_seconds_a_run_covers(
    since: float, until: float, worst: float | None
) -> None:
    by_second = [[999, 90.0], [1000, 3.0], [1001, 7.0], [1002, 1.0], [1003, 2.0]]
    assert worst_lag_ms(by_second, since, until) == worst

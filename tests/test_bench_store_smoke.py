"""`python -m loadtest.bench_store` runs and prints its one JSON line (its shape, not its speed)."""

from __future__ import annotations

from tests.helpers import run_bench
from tests.services import PG_DSN, require_postgres

FIGURES = {
    "ops",
    "transactions",
    "seconds",
    "ops_per_s",
    "pg_cpu_us_per_op",
    "backend_cpu_us_per_op",
    "client_cpu_us_per_op",
}


async def test_bench_store_prints_one_json_line_comparing_both_designs() -> None:
    await require_postgres()
    result = await run_bench(
        "loadtest.bench_store",
        "--dsn",
        PG_DSN,
        "--ops",
        "30",
        "--batch",
        "10",
        "--baseline-ops",
        "12",
        "--stores",
        "3",
        "--entities",
        "4",
    )
    assert {"bench", "postgres", "batch", "ours", "baseline", "ratio"} <= result.keys()
    assert set(result["ours"]) == FIGURES and set(result["baseline"]) == FIGURES
    assert result["ours"]["ops"] == 30 and result["ours"]["transactions"] == 3
    assert result["baseline"]["ops"] == 12 and result["baseline"]["transactions"] == 12
    assert set(result["ratio"]) == {
        "ops_per_s",
        "pg_cpu_us_per_op",
        "backend_cpu_us_per_op",
        "client_cpu_us_per_op",
    }
    assert result["ratio"]["ops_per_s"] > 0

"""`python -m loadtest.bench_cache` runs and prints its one JSON line (its shape, not its speed),
and no read of either phase went back behind a confirmation."""

from __future__ import annotations

from tests.bus.conftest import redis_reachable
from tests.helpers import run_bench
from tests.services import PG_DSN, REDIS_URL, require_postgres

FIGURES = {
    "reads",
    "seconds",
    "reads_per_s",
    "storage_reads",
    "storage_reads_saved",
    "hit_rate",
    "read_p50_ms",
    "read_p99_ms",
    "pg_cpu_us_per_read",
    "client_cpu_us_per_read",
    "writes",
    "stale_reads",
}


async def test_bench_cache_prints_one_json_line_comparing_with_and_without() -> None:
    await require_postgres()
    await redis_reachable(REDIS_URL)
    result = await run_bench(
        "loadtest.bench_cache",
        "--dsn",
        PG_DSN,
        "--redis",
        REDIS_URL,
        "--reads",
        "300",
        "--concurrency",
        "6",
        "--entities",
        "20",
        "--write-interval",
        "0.01",
    )
    assert result["bench"] == "request_cache" and result["shared_state"] == "redis"
    cache, direct = result["cache"], result["no_cache"]
    assert set(cache) == FIGURES and set(direct) == FIGURES
    assert cache["reads"] == direct["reads"] == 300
    assert cache["stale_reads"] == direct["stale_reads"] == 0
    assert direct["storage_reads"] == 300 and direct["hit_rate"] == 0
    assert cache["storage_reads"] + cache["storage_reads_saved"] == 300
    assert 0 < cache["storage_reads"] < 300  # 20 entities read 300 times: most from the cache
    assert set(result["ratio"]) == {"reads_per_s", "storage_reads", "pg_cpu_us_per_read"}

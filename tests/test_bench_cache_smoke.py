"""`python -m loadtest.bench_cache` runs and prints its one JSON line (its shape, not its speed),
and no read of either phase went back behind a confirmation."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import asyncpg

from tests.bus.conftest import redis_reachable
from tests.services import PG_DSN, REDIS_URL, service_missing

ROOT = Path(__file__).resolve().parent.parent
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
    try:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        service_missing("PostgreSQL", f"{PG_DSN}: {exc}")
    await conn.close()
    await redis_reachable(REDIS_URL)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
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
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 1, lines
    result = json.loads(lines[0])
    assert result["bench"] == "request_cache" and result["shared_state"] == "redis"
    cache, direct = result["cache"], result["no_cache"]
    assert set(cache) == FIGURES and set(direct) == FIGURES
    assert cache["reads"] == direct["reads"] == 300
    assert cache["stale_reads"] == direct["stale_reads"] == 0
    assert direct["storage_reads"] == 300 and direct["hit_rate"] == 0
    assert cache["storage_reads"] + cache["storage_reads_saved"] == 300
    assert 0 < cache["storage_reads"] < 300  # 20 entities read 300 times: most from the cache
    assert set(result["ratio"]) == {"reads_per_s", "storage_reads", "pg_cpu_us_per_read"}

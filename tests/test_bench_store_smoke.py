"""`python -m loadtest.bench_store` runs and prints its one JSON line (its shape, not its speed)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import asyncpg

from tests.services import PG_DSN, service_missing

ROOT = Path(__file__).resolve().parent.parent
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
    try:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        service_missing("PostgreSQL", f"{PG_DSN}: {exc}")
    await conn.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
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
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 1, lines
    result = json.loads(lines[0])
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

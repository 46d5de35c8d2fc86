"""The shared services tests may use: PostgreSQL (a fresh schema per test) and Redis.

Unreachable services skip the test with a reason, or fail it under CHEFIA_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

REQUIRE_SERVICES = os.environ.get("CHEFIA_REQUIRE_SERVICES") == "1"
PG_DSN = os.environ.get("CHEFIA_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CHEFIA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def service_missing(name: str, reason: str) -> None:
    """Skip (or fail in CI) a test whose service is not reachable."""
    message = f"{name} not reachable: {reason}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (CHEFIA_REQUIRE_SERVICES=1)")
    pytest.skip(message)


async def require_postgres() -> None:
    """Skip (or fail in CI) a test when PostgreSQL does not answer."""
    try:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        service_missing("PostgreSQL", f"{PG_DSN}: {exc}")
    await conn.close()


async def new_pg_schema() -> str:
    """A DSN whose search_path is a fresh, empty schema: each test gets its own database."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        service_missing("PostgreSQL", f"{PG_DSN}: {exc}")
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    return f"{PG_DSN}?search_path={schema}"


async def drop_pg_schema(dsn: str) -> None:
    schema = dsn.rsplit("search_path=", 1)[1]
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


CHROMIUM = "/usr/bin/chromium"


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A headless Chromium driven by Playwright, closed on leaving (Debian's chromium)."""
    if shutil.which(CHROMIUM) is None:
        service_missing("chromium", f"{CHROMIUM} is not installed (apt install chromium)")
    try:
        from playwright.async_api import async_playwright
    except ImportError as exc:
        service_missing("playwright", f"the Python package is not installed: {exc}")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser
        finally:
            await browser.close()

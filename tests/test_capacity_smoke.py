"""`python -m loadtest.capacity` runs end to end and prints its one JSON line, on tiny runs: the
bus on its private Redis (every subscriber got every operation), and the rush-hour bench's
services (PostgreSQL backends found by their application_name, a private Redis that saw the
server's commands). Its figures are printed, never asserted beyond being there."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import run_bench
from tests.services import require_postgres, service_missing


@pytest.fixture(autouse=True)
def _redis_server() -> None:
    """Both measure a private redis-server of their own."""
    if shutil.which("redis-server") is None:
        service_missing("redis-server", "not installed (apt-get install redis-server)")


async def test_capacity_bus_delivers_every_operation_to_every_subscriber() -> None:
    result = await run_bench(
        "loadtest.capacity",
        *("bus", "--subscribers", "1,2", "--rate", "300", "--duration", "1", "--stores", "5"),
    )
    print(result)
    assert result["bench"] == "capacity_bus"
    assert [run["subscribers"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert run["published"] == 300
        assert run["received_min"] == 300, run
        for key in ("redis_cpu_us_per_op", "subscriber_cpu_us_per_op", "publisher_cpu_us_per_op"):
            assert isinstance(run[key], float), (key, run)


async def test_capacity_services_measures_postgres_and_redis_apart() -> None:
    await require_postgres()
    result = await run_bench(
        "loadtest.capacity",
        *("services", "--stores", "2", "--terminals", "3", "--rate", "4", "--duration", "2"),
    )
    print(result)
    assert result["bench"] == "capacity_services" and result["errors"] == 0
    # 6 terminals x 4 ops/s x (2 s measured + 1 s warm-up).
    assert result["operations"] == 6 * 4 * 3 and result["connections"] == 6
    assert result["pg_backends"] >= 1  # the server's pool, by its application_name
    assert result["redis_commands_per_op"] > 1  # at least the lease read and the publish
    for key in ("pg_backends_cpu_us_per_op", "redis_cpu_us_per_op", "server_cpu_us_per_op"):
        assert isinstance(result[key], float), (key, result)

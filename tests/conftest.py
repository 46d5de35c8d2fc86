"""Shared fixtures. Services: tests that need PostgreSQL or Redis skip with a reason on a machine
without them, and fail instead when CHEFIA_REQUIRE_SERVICES=1 (as in CI). The Hypothesis profile
of the mutation run (docs/testing.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.helpers import RunningServer, running_server
from tests.services import drop_pg_schema, new_pg_schema


@pytest.fixture(params=["sqlite", "postgresql"])
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A running server on each storage backend: the embedded default (SQLite file) and
    PostgreSQL (a fresh schema), both with the in-process bus."""
    if request.param == "sqlite":
        async with running_server(tmp_path) as running:
            yield running
        return
    dsn = await new_pg_schema()
    try:
        async with running_server(tmp_path, database_url=dsn) as running:
            yield running
    finally:
        await drop_pg_schema(dsn)


# The mutation run (scripts/mutation.sh, docs/testing.md) passes --hypothesis-profile=mutation:
# each mutant runs every property test that reaches it, so they get a small fixed budget there.
# derandomize: the same examples for every mutant and every rerun, so a score can be repeated (it
# also means no example database). Only explicit and generated examples: the first failure kills
# the mutant, and shrinking it took minutes. No health checks: a mutant is killed by an assertion,
# not by a slow draw on a loaded machine.
settings.register_profile(
    "mutation",
    max_examples=20,
    derandomize=True,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under the mutation profile, cap the examples of the tests that ask for more: a count given
    in @settings overrides any profile. Hypothesis keeps a test's settings in the attribute it
    reads when the test runs; it has no public setter."""
    if settings.get_current_profile_name() != "mutation":
        return
    budget = settings.get_profile("mutation")
    for item in items:
        test = getattr(item, "obj", None)
        chosen = getattr(test, "_hypothesis_internal_use_settings", None)
        if isinstance(chosen, settings) and chosen.max_examples > budget.max_examples:
            test._hypothesis_internal_use_settings = settings(  # type: ignore[union-attr]
                chosen,
                max_examples=budget.max_examples,
                suppress_health_check=budget.suppress_health_check,
            )

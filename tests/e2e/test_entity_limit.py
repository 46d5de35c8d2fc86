"""ENTITY_MAX_BYTES end to end on PostgreSQL (docs/protocol.md §11): merged UPDATE patches cannot
grow an entity past it, and what one operation adds to the log stays bounded by it."""

from __future__ import annotations

from pathlib import Path

from chefia_rt.errors import Code
from tests.cluster import running_cluster
from tests.helpers import op

LIMIT = 64 * 1024


async def test_an_entity_cannot_grow_past_the_limit_and_log_rows_stay_bounded(
    tmp_path: Path,
) -> None:
    env = {"ENTITY_MAX_BYTES": str(LIMIT)}
    async with running_cluster(tmp_path, nodes=1, workers=1, env=env) as cluster:
        pos = await cluster.connect(0, "pos-1", "s1")
        await pos.send(
            op("o0", "O1", {"notes": "a" * 30_000}, entity_type="tables", operation="CREATE")
        )
        assert (await pos.expect("sync_confirmation"))["status"] == "applied"
        await pos.send(op("o1", "O1", {"more": "b" * 20_000}, entity_type="tables", version=2))
        assert (await pos.expect("sync_confirmation"))["version"] == 2
        # A third patch of 20 KB would make the merged state ~70 KB: refused, nothing changes.
        await pos.send(op("o2", "O1", {"most": "c" * 20_000}, entity_type="tables", version=3))
        refused = await pos.expect("sync_error")
        assert refused["code"] == Code.INVALID_MESSAGE and refused["operation_id"] == "o2"
        # Small patches still apply; each one logs the full state, which is bounded.
        for n in range(5):
            small = {"status": f"step-{n}", "pad": "p" * 40}
            await pos.send(op(f"s{n}", "O1", small, entity_type="tables", version=3 + n))
            assert (await pos.expect("sync_confirmation"))["status"] == "applied"

        (entity,) = await cluster.rows(
            "SELECT version, octet_length(data::text) AS text_bytes, pg_column_size(data) AS "
            "stored FROM entities WHERE store_id = 's1' AND entity_id = 'O1'"
        )
        assert entity["version"] == 7
        assert entity["text_bytes"] <= LIMIT + 1024  # jsonb's text adds a space per key
        rows = await cluster.rows(
            "SELECT id, octet_length(data::text) AS text_bytes, pg_column_size(data) AS stored, "
            "pg_column_size(o.*) AS row_bytes FROM sync_operations o WHERE store_id = 's1' "
            "ORDER BY seq"
        )
        assert [r["id"] for r in rows] == ["o0", "o1", "s0", "s1", "s2", "s3", "s4"]
        for row in rows:
            assert row["text_bytes"] <= LIMIT + 1024, row
            assert row["row_bytes"] <= LIMIT + 2048, row
        assert await cluster.rows("SELECT 1 FROM sync_operations WHERE id = 'o2'") == []
        await pos.close()

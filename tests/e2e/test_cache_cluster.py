"""The RequestCache across a real cluster (2 nodes, one PostgreSQL, one Redis): a read on any
node after a confirmation never returns an older version (read your writes under concurrent
writers on both nodes), and a write reaches the other node's readers and terminals at once,
before the entity type's TTL would have. (One worker per node: workers of one node share the
cache exactly as nodes do, and each cluster worker costs seconds of start-up.)"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tests.cluster import Cluster, ClusterTerminal, running_cluster
from tests.helpers import http_get, op

STORE = "s1"
ROUNDS = 15  # confirmations per writer, each followed by a read on another connection


async def read_version(cluster: Cluster, node: int, entity_type: str, entity_id: str) -> int:
    """GET the entity on a new connection to a node (SO_REUSEPORT picks the worker)."""
    url = f"http://127.0.0.1:{cluster.nodes[node].port}/api/v1/entities/{entity_type}/{entity_id}"
    status, _, body = await http_get(f"{url}?store_id={STORE}")
    assert status == 200, body
    return int(json.loads(body)["version"])


async def writer(
    cluster: Cluster, terminal: ClusterTerminal, own: str, stale: list[str]
) -> list[tuple[str, int, int]]:
    """Update `own` and the shared table in turns; after each confirmation read the entity on a
    node (alternating) and record (entity, confirmed, read)."""
    seen: list[tuple[str, int, int]] = []
    versions = {own: 0, "shared": 0}
    for i in range(ROUNDS):
        for entity_id in (own, "shared"):
            op_id = f"{terminal.established['terminal_id']}-{entity_id}-{i}"
            await terminal.send(op(op_id, entity_id, {"n": i}, version=versions[entity_id] + 1))
            answer = await terminal.until("sync_confirmation")
            confirmed = int(answer["version"])
            versions[entity_id] = confirmed
            got = await read_version(cluster, (i + len(seen)) % 2, "tables", entity_id)
            if got < confirmed:
                stale.append(f"{entity_id}: confirmed v{confirmed}, read v{got}")
            versions[entity_id] = max(versions[entity_id], got)
            seen.append((entity_id, confirmed, got))
    return seen


async def test_reads_never_go_back_behind_a_confirmation_across_nodes(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, nodes=2, workers=1) as cluster:
        began = time.monotonic()
        # Writers on both nodes; every read goes to a new connection on node 0 or 1.
        writers = [await cluster.connect(i % 2, f"pos-{i}", STORE) for i in range(3)]
        stale: list[str] = []
        results = await asyncio.gather(
            *(writer(cluster, w, f"own-{i}", stale) for i, w in enumerate(writers))
        )
        reads = sum(len(r) for r in results)
        print(f"{reads} confirmations each followed by a read, in {time.monotonic() - began:.1f}s")
        assert reads == 3 * ROUNDS * 2
        assert stale == []
        for w in writers:
            await w.close()

        # A terminal on node 1 and a read cached on node 1 (products live 5 s in the cache);
        # a write on node 0 reaches both at once.
        watcher = await cluster.connect(1, "kds-1", STORE, type="kds")
        pos = await cluster.connect(0, "pos-9", STORE)
        await pos.send(op("p-1", "burger", {"price": 10}, entity_type="products"))
        await pos.until("sync_confirmation")
        assert await read_version(cluster, 1, "products", "burger") == 1
        assert await read_version(cluster, 1, "products", "burger") == 1  # cached
        await pos.send(op("p-2", "burger", {"price": 12}, entity_type="products", version=2))
        assert (await pos.until("sync_confirmation"))["version"] == 2
        assert await read_version(cluster, 1, "products", "burger") == 2  # well within 5 s
        got = [await watcher.recv() for _ in range(2)]
        assert [m["type"] for m in got] == ["data_sync"] * 2
        assert [(m["operation"]["entity_id"], m["operation"]["version"]) for m in got] == [
            ("burger", 1),
            ("burger", 2),
        ]
        await watcher.nothing()  # the push is the invalidation: nothing follows it
        await pos.close()
        await watcher.close()


pytestmark = pytest.mark.asyncio

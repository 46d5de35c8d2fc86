"""Operation ids are scoped by store (docs/protocol.md §7.4), on real PostgreSQL with two workers.

Every restaurant has a "pos-1", and a terminal that builds its op ids from its terminal id and
a counter sends the same ids as the "pos-1" of every other store. Two such terminals of two
stores, on two workers, send the same op id at the same moment, 60 times: every operation is
confirmed `applied`, each store's log keeps all of its own operations under contiguous seqs,
and a resume from 0 gives each store back all of its own operations (none of the other's).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.cluster import ClusterTerminal, running_cluster
from tests.helpers import op

PAIRS = 60


async def confirmation(terminal: ClusterTerminal, op_id: str) -> dict[str, Any]:
    message = await terminal.recv(10)
    while message["type"] == "data_sync":  # the other terminal of its store: none here
        message = await terminal.recv(10)
    assert message.get("operation_id") == op_id, message
    return message


async def replay(terminal: ClusterTerminal, count: int) -> list[dict[str, Any]]:
    ops = []
    while len(ops) < count:
        message = await terminal.recv(10)
        if message["type"] == "data_sync":
            ops.append(message["operation"])
    await terminal.nothing()
    return ops


async def test_the_same_op_id_in_two_stores_at_once_is_applied_in_each(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, nodes=1, workers=2) as cluster:
        workers = cluster.nodes[0].workers
        a = await cluster.connect(0, "pos-1", "store-a", on_worker=workers[0])
        b = await cluster.connect(0, "pos-1", "store-b", on_worker=workers[1])
        assert a.worker != b.worker
        answers = []
        for n in range(PAIRS):
            op_id = f"pos-1-{n}"
            await asyncio.gather(
                a.send(op(op_id, f"T{n}", {"store": "a", "n": n}, operation="CREATE")),
                b.send(op(op_id, f"T{n}", {"store": "b", "n": n}, operation="CREATE")),
            )
            answers += await asyncio.gather(confirmation(a, op_id), confirmation(b, op_id))
        assert [m["type"] for m in answers] == ["sync_confirmation"] * (2 * PAIRS)
        assert {m["status"] for m in answers} == {"applied"}

        for store, terminal in (("store-a", a), ("store-b", b)):
            log = await cluster.log(store)
            assert log == [(n + 1, f"pos-1-{n}") for n in range(PAIRS)], store
            rows = await cluster.rows(
                "SELECT data FROM sync_operations WHERE store_id = $1 ORDER BY seq", store
            )
            assert {r["data"] for r in rows} == {
                f'{{"n": {n}, "store": "{store[-1]}"}}' for n in range(PAIRS)
            }
            await terminal.close()
            again = await cluster.connect(0, "pos-1", store, since=0)
            ops = await replay(again, PAIRS)
            assert [(o["seq"], o["id"]) for o in ops] == log
            assert {o["data"]["store"] for o in ops} == {store[-1]}
            await again.close()

"""Who wrote what, and what a kitchen display may write (docs/security.md §5,
docs/protocol.md §7.5).

With JWT on, the audit records the token's identity; a user_id the terminal writes into an
operation is kept beside it as a claim only. A kds may only move the status of orders that
exist: it cannot create one by UPDATE (an upsert) nor bring a deleted one back."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from chefia_rt.domain import EntityKey
from chefia_rt.errors import Code
from tests.e2e.test_auth import auth_server, connect, token
from tests.helpers import RunningServer, Terminal, op, running_server


def audit_rows(server: RunningServer) -> list[dict[str, Any]]:
    db = sqlite3.connect(server.settings.sqlite_path)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute("SELECT * FROM audit_logs_master ORDER BY id").fetchall()
    finally:
        db.close()
    return [{**dict(r), "changes": json.loads(r["changes"])} for r in rows]


async def test_the_audit_records_the_token_identity_and_keeps_the_claim_apart(
    tmp_path: Path,
) -> None:
    async with auth_server(tmp_path) as server:
        pos = await connect(server, "pos-1", token(user_id="ana"))
        await pos.send(op("o1", "T1", {"a": 1}, operation="CREATE", user_id="mallory"))
        assert (await pos.until("sync_confirmation"))["status"] == "applied"
        await pos.send(op("o2", "T1", {"a": 2}, version=2, user_id="ana"))
        assert (await pos.until("sync_confirmation"))["status"] == "applied"
        await pos.close()
        first, second = audit_rows(server)
        assert first["user_id"] == "ana"
        assert first["changes"]["claimed_user_id"] == "mallory"
        assert second["user_id"] == "ana" and "claimed_user_id" not in second["changes"]


async def lock(terminal: Terminal, entity_id: str) -> None:
    await terminal.send(
        {"type": "acquire_lock", "entity_type": "orders", "entity_id": entity_id, "timeout": 5000}
    )
    await terminal.until("lock_acquired")


async def release(terminal: Terminal, entity_id: str) -> None:
    await terminal.send({"type": "release_lock", "entity_type": "orders", "entity_id": entity_id})
    await terminal.until("lock_released")


async def test_a_kds_cannot_create_upsert_or_undelete_an_order(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        pos = await server.connect("pos-1")
        kds = await server.connect("kds-1", type="kds")
        for n, order in enumerate(("O1", "O2")):
            await pos.send(
                op(f"p{n}", order, {"status": "new"}, entity_type="orders", operation="CREATE")
            )
            assert (await pos.until("sync_confirmation"))["status"] == "applied"
        await lock(pos, "O1")
        await pos.send(op("p-del", "O1", {}, entity_type="orders", operation="DELETE", version=2))
        assert (await pos.until("sync_confirmation"))["status"] == "applied"
        await release(pos, "O1")

        for attempt, (order, version) in enumerate((("O9", 1), ("O1", 3), ("O1", 1))):
            await lock(kds, order)
            await kds.send(
                op(f"k{attempt}", order, {"status": "ready"}, entity_type="orders", version=version)
            )
            refused = await kds.until("sync_error")
            assert refused["code"] == Code.PERMISSION_DENIED, refused
            await release(kds, order)
        await kds.send(
            op("k-create", "O8", {"status": "new"}, entity_type="orders", operation="CREATE")
        )
        assert (await kds.until("sync_error"))["code"] == Code.PERMISSION_DENIED

        await lock(kds, "O2")
        await kds.send(op("k-ok", "O2", {"status": "ready"}, entity_type="orders", version=2))
        assert (await kds.until("sync_confirmation"))["status"] == "applied"

        store = server.worker.store
        assert await store.get_entity(EntityKey("s1", "orders", "O9")) is None
        o1 = await store.get_entity(EntityKey("s1", "orders", "O1"))
        assert o1 is not None and o1.deleted and o1.version == 2
        o2 = await store.get_entity(EntityKey("s1", "orders", "O2"))
        assert o2 is not None and o2.data == {"status": "ready"}
        await pos.close()
        await kds.close()

"""The store contract: what every storage backend does, written against the Store protocol only.

The real Engine is the `decide` callback wherever the point is "what the node gets" (built the way
pipeline.py builds its batches); hand-written callbacks write exact BatchWrites where the point is
what the store keeps of them.
"""

from __future__ import annotations

import asyncio
import copy
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from chefia_rt.domain import (
    AuditRecord,
    BatchState,
    BatchWrite,
    Conflict,
    Entity,
    EntityKey,
    Operation,
    OpRecord,
    Resolution,
)
from chefia_rt.errors import ChefiaError, StorageUnavailable
from chefia_rt.pipeline import batch_request
from chefia_rt.protocol.messages import format_timestamp
from chefia_rt.store.base import BatchRequest, SessionRecord, Store
from chefia_rt.sync.engine import Engine, Outcome, conflict_id_for
from tests.store.conftest import Peek, reopen_store

T = TypeVar("T")
Item = Operation | Resolution

ENGINE = Engine()
STARTED = datetime.now(UTC)
NOW = format_timestamp(STARTED)  # server time, in the server's one format
STAMPS = [f"2024-01-15T10:00:0{i}.000Z" for i in range(6)]  # client times


def later(seconds: int) -> str:
    """A server time `seconds` after NOW."""
    return format_timestamp(STARTED + timedelta(seconds=seconds))


UNICODE = {"nome": "Açaí com paçoca 🍧", "obs": "sem cebola — 'bem passado' \"já\"", "zh": "牛肉面"}


def make_op(
    op_id: str,
    entity_id: str,
    data: dict[str, Any] | None = None,
    *,
    store_id: str = "s1",
    entity_type: str = "tables",
    operation: str = "UPDATE",
    version: int = 1,
    timestamp: str = STAMPS[0],
    terminal_id: str = "t1",
    user_id: str | None = "u1",
    requires_lock: bool = False,
    priority: str = "medium",
) -> Operation:
    return Operation(
        id=op_id,
        store_id=store_id,
        entity_type=entity_type,
        entity_id=entity_id,
        operation=operation,
        data=data or {},
        version=version,
        timestamp=timestamp,
        terminal_id=terminal_id,
        user_id=user_id,
        requires_lock=requires_lock,
        priority=priority,
    )


def request_for(items: Sequence[Item]) -> BatchRequest:
    """The BatchRequest pipeline.py builds for a batch."""
    return batch_request(items)


async def sync(store: Store, items: Sequence[Item], now: str = NOW) -> list[Outcome]:
    """Commit a batch the way the node does: the engine decides inside the store's transaction."""

    def decide(state: BatchState) -> tuple[list[Outcome], BatchWrite]:
        return ENGINE.decide(items, state, now)

    return await store.commit(request_for(items), decide)


def writes(write: BatchWrite) -> Callable[[BatchState], tuple[None, BatchWrite]]:
    """A decide callback that writes exactly `write`."""
    return lambda state: (None, write)


async def read_state(store: Store, request: BatchRequest) -> BatchState:
    """What `commit` hands the engine for `request` (the commit itself writes nothing)."""
    seen: list[BatchState] = []

    def capture(state: BatchState) -> tuple[None, BatchWrite]:
        seen.append(copy.deepcopy(state))
        return None, BatchWrite()

    await store.commit(request, capture)
    return seen[0]


def record(
    op_id: str,
    seq: int | None,
    *,
    store_id: str = "s1",
    entity_id: str = "e1",
    data: dict[str, Any] | None = None,
    status: str = "applied",
    **fields: Any,
) -> OpRecord:
    values: dict[str, Any] = {
        "id": op_id,
        "store_id": store_id,
        "entity_type": "tables",
        "entity_id": entity_id,
        "operation": "UPDATE",
        "data": data if data is not None else {"n": seq},
        "version": seq,
        "seq": seq,
        "status": status,
        "conflict_resolved": False,
        "terminal_id": "t1",
        "user_id": "u1",
        "priority": "medium",
        "timestamp": STAMPS[0],
        "server_time": NOW,
        "deleted": False,
    }
    values.update(fields)
    return OpRecord(**values)


def entity(
    entity_id: str,
    version: int = 1,
    *,
    store_id: str = "s1",
    entity_type: str = "tables",
    data: dict[str, Any] | None = None,
    deleted: bool = False,
) -> Entity:
    return Entity(
        key=EntityKey(store_id, entity_type, entity_id),
        version=version,
        data=data if data is not None else {"v": version},
        deleted=deleted,
        timestamp=STAMPS[1],
        updated_by="t1",
        field_versions={"v": [version, STAMPS[1]]},
    )


async def all_operations(store: Store, store_id: str) -> list[OpRecord]:
    return await store.read_operations(store_id, 0, 1_000_000)


# ---- commit ---------------------------------------------------------------------------------


async def test_commit_writes_entities_log_audit_and_conflicts(store: Store, peek: Peek) -> None:
    created = make_op(
        "op1", "T1", {"status": "open", **UNICODE}, operation="CREATE", timestamp=STAMPS[2]
    )
    losing = make_op("op2", "T1", {"status": "closed"}, timestamp=STAMPS[1])  # stale and older
    cash = make_op(
        "op3", "C1", {"amount": 10}, entity_type="cashier_operations", operation="CREATE"
    )
    stale_cash = make_op("op4", "C1", {"amount": 20}, entity_type="cashier_operations")
    outcomes = await sync(store, [created, losing, cash, stale_cash])
    assert [o.status for o in outcomes] == ["applied", "resolved", "applied", "conflict"]

    t1 = await store.get_entity(EntityKey("s1", "tables", "T1"))
    assert t1 is not None and t1.version == 1 and t1.data == {"status": "open", **UNICODE}
    assert t1 == outcomes[0].changed[0]

    logged = {row["id"]: row for row in await peek.rows("sync_operations", store_id="s1")}
    assert {op_id: row["seq"] for op_id, row in logged.items()} == {
        "op1": 1,
        "op2": None,
        "op3": 2,
        "op4": None,
    }
    assert logged["op2"]["status"] == "resolved" and logged["op4"]["status"] == "conflict"
    assert await all_operations(store, "s1") == [outcomes[0].record, outcomes[2].record]

    audit = sorted(
        await peek.rows("audit_logs_master", store_id="s1"), key=lambda a: a["operation_id"]
    )
    assert [(a["operation_id"], a["entity_id"]) for a in audit] == [("op1", "T1"), ("op3", "C1")]
    assert audit[0]["changes"] == {"before": None, "after": {"status": "open", **UNICODE}}
    assert audit[0]["operation"] == "CREATE" and audit[0]["sync_status"] == "applied"
    assert audit[0]["terminal_id"] == "t1" and audit[0]["user_id"] == "u1"
    assert audit[0]["conflict_resolved"] is False and audit[0]["timestamp"] == NOW

    conflicts = await peek.rows("conflicts")
    assert [c["id"] for c in conflicts] == [conflict_id_for("op4")]
    assert conflicts[0]["operation"] == asdict(stale_cash)
    assert conflicts[0]["server_version"] == 1 and conflicts[0]["server_data"] == {"amount": 10}
    bounds = await store.log_bounds("s1")
    assert (bounds.oldest_seq, bounds.last_seq) == (1, 2)


async def test_audit_rows_keep_before_after_and_who(store: Store, peek: Peek) -> None:
    await sync(store, [make_op("a1", "T1", {"x": 1, "y": "ç"}, operation="CREATE")], now=later(1))
    await sync(store, [make_op("a2", "T1", {"x": 2}, version=2, user_id=None)], now=later(2))
    await sync(store, [make_op("a3", "T1", operation="DELETE", version=3)], now=later(3))
    audit = sorted(
        await peek.rows("audit_logs_master", entity_id="T1"), key=lambda a: a["timestamp"]
    )
    assert [a["changes"] for a in audit] == [
        {"before": None, "after": {"x": 1, "y": "ç"}},
        {"before": {"x": 1, "y": "ç"}, "after": {"x": 2, "y": "ç"}},
        {"before": {"x": 2, "y": "ç"}, "after": None},
    ]
    assert [a["operation"] for a in audit] == ["CREATE", "UPDATE", "DELETE"]
    assert [a["user_id"] for a in audit] == ["u1", None, "u1"]


async def test_audit_record_fields_round_trip(store: Store, peek: Peek) -> None:
    audit = AuditRecord(
        operation_id="op-a",
        store_id="s1",
        entity_type="orders",
        entity_id="O1",
        operation="BULK_UPDATE",
        terminal_id="pos-7",
        user_id=None,
        before={"items": [["pão", 2], {"q": None}]},
        after={"items": []},
        sync_status="merged",
        conflict_resolved=True,
        timestamp=NOW,
        claimed_user_id="someone-else",
    )
    await store.commit(BatchRequest(), writes(BatchWrite(audit=[audit])))
    (row,) = await peek.rows("audit_logs_master", operation_id="op-a")
    expected = asdict(audit)
    del expected["before_json"], expected["after_json"]  # writing aids, not columns
    expected["changes"] = {
        "before": expected.pop("before"),
        "after": expected.pop("after"),
        "claimed_user_id": expected.pop("claimed_user_id"),
    }
    assert {k: row[k] for k in expected} == expected


async def test_an_audit_time_far_from_now_still_commits(store: Store, peek: Peek) -> None:
    """Server clock skew, a month boundary before housekeeping ran, a restored old log: the
    audit trail never refuses a commit (a partitioned audit table needs a default partition)."""
    for n, now in enumerate(["2019-03-31T23:59:59.999999Z", "2099-12-01T00:00:00.000000Z"]):
        (done,) = await sync(store, [make_op(f"old{n}", "T1", {"n": n}, version=n + 1)], now=now)
        assert done.status == "applied"
        (row,) = await peek.rows("audit_logs_master", operation_id=f"old{n}")
        assert row["timestamp"] == now


class Boom(Exception):
    pass


async def test_decide_that_raises_writes_nothing(store: Store, peek: Peek) -> None:
    await sync(store, [make_op("op1", "T1", {"a": 1}, operation="CREATE")])
    before = {t: await peek.rows(t) for t in ("entities", "sync_operations", "audit_logs_master")}
    items = [
        make_op("op2", "T1", {"a": 2}, version=2),
        make_op("op3", "T2", {"b": 1}, store_id="s2"),
        make_op("op4", "C1", entity_type="cashier_operations", operation="CREATE"),
    ]
    request = request_for(items)

    def explode(state: BatchState) -> tuple[None, BatchWrite]:
        ENGINE.decide(items, state, NOW)
        raise Boom("the engine blew up")

    with pytest.raises(Boom):
        await store.commit(request, explode)
    after = {t: await peek.rows(t) for t in ("entities", "sync_operations", "audit_logs_master")}
    assert after == before
    s2, nowhere = await store.log_bounds("s2"), await store.log_bounds("nowhere")
    assert (s2.oldest_seq, s2.last_seq) == (nowhere.oldest_seq, nowhere.last_seq) == (1, 0)

    outcomes = await sync(store, items)  # the store is usable and nothing was half-written
    assert [o.status for o in outcomes] == ["applied", "applied", "applied"]
    assert [o.record.seq for o in outcomes if o.record] == [2, 1, 3]
    assert [r.seq for r in await all_operations(store, "s1")] == [1, 2, 3]


async def test_decide_raising_a_chefia_error_propagates_it(store: Store) -> None:
    def refuse(state: BatchState) -> tuple[None, BatchWrite]:
        raise ChefiaError("no")

    with pytest.raises(ChefiaError, match="no"):
        await store.commit(BatchRequest(store_ids=["s1"]), refuse)
    assert await store.ping()


async def test_failed_write_rolls_back_the_whole_batch(store: Store, peek: Peek) -> None:
    cash = make_op("c1", "C1", {"amount": 1}, entity_type="cashier_operations", operation="CREATE")
    stale = make_op("c2", "C1", {"amount": 2}, entity_type="cashier_operations")
    outcomes = await sync(store, [cash, stale])
    pending = outcomes[1].conflict
    assert pending is not None
    tables = ("entities", "sync_operations", "audit_logs_master", "conflicts")
    before = {t: await peek.rows(t) for t in tables}

    # Everything of this batch is valid but its last part: a conflict id that already exists.
    bad = BatchWrite(
        entities=[entity("T9")],
        op_records=[record("op-bad", 2)],
        audit=[
            AuditRecord(
                operation_id="op-bad",
                store_id="s1",
                entity_type="tables",
                entity_id="T9",
                operation="UPDATE",
                terminal_id="t1",
                user_id=None,
                before=None,
                after={},
                sync_status="applied",
                conflict_resolved=False,
                timestamp=NOW,
            )
        ],
        new_conflicts=[pending],
        last_seqs={"s1": 2},
    )
    with pytest.raises(StorageUnavailable):
        await store.commit(BatchRequest(store_ids=["s1"]), writes(bad))
    assert {t: await peek.rows(t) for t in tables} == before
    assert await store.get_entity(EntityKey("s1", "tables", "T9")) is None
    assert (await store.log_bounds("s1")).last_seq == 1

    again = await sync(store, [make_op("op-next", "T9", {"v": 1})])
    assert again[0].record is not None and again[0].record.seq == 2


async def test_a_used_seq_is_refused_never_overwritten(store: Store) -> None:
    first = record("op-a", 1)
    await store.commit(BatchRequest(), writes(BatchWrite(op_records=[first], last_seqs={"s1": 1})))
    clash = BatchWrite(op_records=[record("op-b", 1)], last_seqs={"s1": 1})
    with pytest.raises(StorageUnavailable):
        await store.commit(BatchRequest(), writes(clash))
    assert await all_operations(store, "s1") == [first]
    state = await read_state(store, BatchRequest(operation_keys=[("s1", "op-a"), ("s1", "op-b")]))
    assert state.known_ops == {("s1", "op-a"): first}


async def test_a_pending_conflict_record_is_settled_in_place(store: Store) -> None:
    """A resolution rewrites its operation's record: from `conflict` (no seq) to `resolved`."""
    pending = record("op-x", None, status="conflict", data={}, version=3)
    await store.commit(BatchRequest(), writes(BatchWrite(op_records=[pending])))
    settled = record("op-x", 1, status="resolved", conflict_resolved=True, user_id=None)
    await store.commit(BatchRequest(), writes(BatchWrite(settled_records=[settled])))
    state = await read_state(store, BatchRequest(operation_keys=[("s1", "op-x")]))
    assert state.known_ops == {("s1", "op-x"): settled}
    assert await all_operations(store, "s1") == [settled]


async def test_the_log_is_append_only(store: Store) -> None:
    """A new record whose (store_id, id) is logged fails the transaction, never overwrites;
    a settlement touches only a pending conflict's row of its own store."""
    first = record("op-a", 1)
    await store.commit(BatchRequest(), writes(BatchWrite(op_records=[first], last_seqs={"s1": 1})))
    again = BatchWrite(op_records=[record("op-a", 2, data={"x": 9})], last_seqs={"s1": 2})
    with pytest.raises(StorageUnavailable):
        await store.commit(BatchRequest(), writes(again))
    settle = record("op-a", 2, status="resolved", conflict_resolved=True)
    with pytest.raises(StorageUnavailable):  # not a pending conflict
        await store.commit(BatchRequest(), writes(BatchWrite(settled_records=[settle])))
    other_store = record("op-a", None, status="conflict", data={}, store_id="s2")
    await store.commit(BatchRequest(), writes(BatchWrite(op_records=[other_store])))
    assert await all_operations(store, "s1") == [first]
    assert await store.get_operation("s1", "op-a") == first
    assert await store.get_operation("s2", "op-a") == other_store
    assert (await store.log_bounds("s1")).last_seq == 1


async def test_seqs_are_gapless_per_store_across_commits(store: Store) -> None:
    rng = random.Random(3)
    expected: Counter[str] = Counter()
    for b in range(30):
        batch = []
        for j in range(rng.randint(1, 5)):
            store_id = rng.choice(["s1", "s2", "s3"])
            entity_id = rng.choice(["T1", "T2"])
            # Fresh ids and ever later timestamps: every one is applied (a new seq).
            stamp = f"2024-01-15T11:{b:02d}:{j:02d}.000Z"
            batch.append(
                make_op(f"op-{b}-{j}", entity_id, {"b": b}, store_id=store_id, timestamp=stamp)
            )
            expected[store_id] += 1
        outcomes = await sync(store, batch)
        assert all(o.status == "applied" for o in outcomes)
    for store_id in ("s1", "s2", "s3"):
        seqs = [r.seq for r in await all_operations(store, store_id)]
        assert seqs == list(range(1, expected[store_id] + 1))
        assert all(r.store_id == store_id for r in await all_operations(store, store_id))
        bounds = await store.log_bounds(store_id)
        assert (bounds.oldest_seq, bounds.last_seq) == (1, expected[store_id])
    state = await read_state(store, BatchRequest(store_ids=["s1", "s2", "s3", "s4"]))
    assert state.last_seqs == {**expected, "s4": 0}


async def test_reopened_storage_keeps_everything(store: Store) -> None:
    first = await sync(
        store,
        [
            make_op("op1", "T1", {"a": 1}, operation="CREATE"),
            make_op("op2", "C1", entity_type="cashier_operations", operation="CREATE"),
            make_op("op3", "C1", entity_type="cashier_operations"),  # a pending conflict
        ],
    )
    snapshot = await store.snapshot("s1", None)
    await store.close()
    again = await reopen_store(store)
    try:
        assert await again.snapshot("s1", None) == snapshot
        assert await again.read_operations("s1", 0, 100) == [first[0].record, first[1].record]
        state = await read_state(again, request_for([make_op("op3", "C1")]))
        assert state.conflicts == {("s1", conflict_id_for("op3")): first[2].conflict}
        more = await sync(again, [make_op("op4", "T1", {"a": 2}, version=2)])
        assert more[0].record is not None and more[0].record.seq == 3
    finally:
        await again.close()


async def test_the_same_operation_twice_is_a_duplicate(store: Store) -> None:
    applied = make_op("op1", "T1", {"a": 1}, operation="CREATE", timestamp=STAMPS[3])
    losing = make_op("op2", "T1", {"a": 2}, timestamp=STAMPS[0])  # resolved, no seq
    cash = make_op("op3", "C1", entity_type="cashier_operations", operation="CREATE")
    stale = make_op("op4", "C1", {"x": 1}, entity_type="cashier_operations")  # a conflict
    first = await sync(store, [applied, losing, cash, stale])
    assert [o.status for o in first] == ["applied", "resolved", "applied", "conflict"]

    state = await read_state(store, request_for([applied, losing, stale]))
    assert state.known_ops == {
        ("s1", "op1"): first[0].record,
        ("s1", "op2"): first[1].record,
        ("s1", "op4"): first[3].record,
    }

    retry = await sync(store, [applied, losing, stale])
    assert [o.status for o in retry] == ["duplicate", "duplicate", "conflict"]
    assert [o.record for o in retry] == [first[0].record, first[1].record, first[3].record]
    assert retry[2].conflict == first[3].conflict
    t1 = await store.get_entity(EntityKey("s1", "tables", "T1"))
    assert t1 is not None and t1.version == 1
    assert [r.id for r in await all_operations(store, "s1")] == ["op1", "op3"]


async def test_conflicts_round_trip_and_settled_ones_are_deleted(store: Store, peek: Peek) -> None:
    op = make_op(
        "op-c",
        "C1",
        {"amount": 12.5, "items": [[1, "troco 💵"], {"x": None}], "ok": True, **UNICODE},
        entity_type="cashier_operations",
        version=3,
        user_id="u-9",
        requires_lock=True,
        priority="high",
        terminal_id="caixa-1",
    )
    conflict = Conflict(conflict_id_for("op-c"), op, 2, {"amount": 10, "nested": [[]]}, NOW)
    anonymous = Conflict(
        "conflict:op-d",
        make_op("op-d", "C2", entity_type="cashier_operations", user_id=None, priority="low"),
        1,
        {},
        STAMPS[4],
    )
    base = entity("C1", 2, entity_type="cashier_operations")
    write = BatchWrite(entities=[base], new_conflicts=[conflict, anonymous])
    await store.commit(BatchRequest(), writes(write))

    keys = [conflict.key, anonymous.key, ("s1", "conflict:nothing"), ("s2", conflict.id)]
    state = await read_state(store, BatchRequest(conflict_keys=keys))
    assert state.conflicts == {conflict.key: conflict, anonymous.key: anonymous}
    assert state.conflicts[conflict.key].operation.requires_lock is True

    await store.commit(BatchRequest(), writes(BatchWrite(settled_conflicts=[conflict.key])))
    state = await read_state(store, BatchRequest(conflict_keys=keys))
    assert state.conflicts == {anonymous.key: anonymous}
    assert [c["id"] for c in await peek.rows("conflicts")] == [anonymous.id]


async def test_a_resolution_settles_its_conflict_through_the_engine(
    store: Store, peek: Peek
) -> None:
    cash = make_op("c1", "C1", {"amount": 1}, entity_type="cashier_operations", operation="CREATE")
    stale = make_op("c2", "C1", {"amount": 2}, entity_type="cashier_operations")
    first = await sync(store, [cash, stale])
    assert first[1].status == "conflict"
    resolution = Resolution(conflict_id_for("c2"), "s1", "t2", None, "accept_local", None, NOW)
    (settled,) = await sync(store, [resolution])
    assert settled.status == "resolved" and settled.record is not None
    assert settled.record.seq == 2 and settled.record.data == {"amount": 2}
    assert await peek.rows("conflicts") == []
    assert (await read_state(store, request_for([stale]))).known_ops == {
        ("s1", "c2"): settled.record
    }
    (again,) = await sync(store, [resolution])
    assert again.status == "error"  # no pending conflict any more


async def test_batch_state_holds_requested_and_conflict_entities(store: Store) -> None:
    t1, t2 = entity("T1", 4), entity("T2", 1, store_id="s2")
    c1 = entity("C1", 2, entity_type="cashier_operations", store_id="s3")
    conflict = Conflict(
        "conflict:op-c",
        make_op("op-c", "C1", entity_type="cashier_operations", store_id="s3"),
        2,
        {"v": 2},
        NOW,
    )
    write = BatchWrite(
        entities=[t1, t2, c1], new_conflicts=[conflict], last_seqs={"s1": 7, "s3": 2}
    )
    await store.commit(BatchRequest(), writes(write))

    missing = EntityKey("s1", "tables", "nope")
    state = await read_state(
        store,
        BatchRequest(
            entity_keys=[t1.key, missing, t1.key],
            conflict_keys=[conflict.key],
            store_ids=["s1", "s9"],
        ),
    )
    assert state.entities == {t1.key: t1, c1.key: c1}  # not T2: nobody asked for it
    assert state.conflicts == {conflict.key: conflict}
    assert state.known_ops == {}
    # The requested stores and those of every loaded key, unknown ones at 0.
    assert state.last_seqs == {"s1": 7, "s3": 2, "s9": 0}


# ---- read_operations and log_bounds ---------------------------------------------------------


async def test_read_operations_in_seq_order_of_one_store(store: Store) -> None:
    s1 = [record(f"a{n}", n) for n in range(1, 11)]
    s2 = [record(f"b{n}", n, store_id="s2") for n in range(1, 4)]
    unlogged = [record("x1", None, status="resolved"), record("x2", None, status="conflict")]
    mixed = [*reversed(s1[5:]), *s2, *unlogged, *reversed(s1[:5])]
    await store.commit(BatchRequest(), writes(BatchWrite(op_records=mixed)))

    assert await all_operations(store, "s1") == s1
    assert await all_operations(store, "s2") == s2
    assert await store.read_operations("s1", 3, 4) == s1[3:7]
    assert await store.read_operations("s1", 8, 100) == s1[8:]
    assert await store.read_operations("s1", 10, 100) == []
    assert await store.read_operations("s1", 0, 1) == s1[:1]
    assert await store.read_operations("s1", 0, 0) == []
    assert await store.read_operations("s3", 0, 100) == []


async def test_op_record_fields_round_trip(store: Store) -> None:
    records = [
        record(
            "r1",
            1,
            data={**UNICODE, "items": [[1, ["a", {"b": [None, True, 2.5]}]], []], "empty": {}},
            user_id=None,
            priority="high",
            conflict_resolved=True,
            status="merged",
            terminal_id="pos-ção",
        ),
        record("r2", 2, data={}, deleted=True, operation="DELETE", version=7),
        record(
            "r3",
            3,
            data={"updates": [{"entity_id": "e1", "data": {}, "version": 2, "deleted": False}]},
            operation="BULK_UPDATE",
            version=None,
            status="resolved",
        ),
    ]
    await store.commit(BatchRequest(), writes(BatchWrite(op_records=records)))
    assert await all_operations(store, "s1") == records
    keys = [("s1", f"r{n}") for n in range(1, 5)]
    state = await read_state(store, BatchRequest(operation_keys=keys))
    assert state.known_ops == {r.op_key: r for r in records}


async def test_log_bounds(store: Store) -> None:
    empty = await store.log_bounds("s1")
    assert (empty.oldest_seq, empty.last_seq) == (1, 0)
    await sync(store, [make_op("c1", "C1", entity_type="cashier_operations", operation="CREATE")])
    await sync(store, [make_op("c2", "C1", entity_type="cashier_operations", store_id="s2")])
    await sync(store, [make_op("c3", "C1", entity_type="cashier_operations", store_id="s2")])
    s1 = await store.log_bounds("s1")
    assert (s1.oldest_seq, s1.last_seq) == (1, 1)
    # s2 has only an applied upsert (c2) and a conflict (c3): one seq.
    s2 = await store.log_bounds("s2")
    assert (s2.oldest_seq, s2.last_seq) == (1, 1)
    for n in range(2, 6):
        await sync(store, [make_op(f"t{n}", "T1", {"n": n}, version=n)])
    s1 = await store.log_bounds("s1")
    assert (s1.oldest_seq, s1.last_seq) == (1, 5)
    other = await store.log_bounds("s3")
    assert (other.oldest_seq, other.last_seq) == (1, 0)


async def test_log_bounds_when_only_unlogged_operations(store: Store) -> None:
    await store.commit(
        BatchRequest(), writes(BatchWrite(op_records=[record("x", None, status="conflict")]))
    )
    bounds = await store.log_bounds("s1")
    assert (bounds.oldest_seq, bounds.last_seq) == (1, 0)


# ---- snapshot and get_entity ----------------------------------------------------------------


async def test_snapshot_is_the_state_at_its_seq(store: Store) -> None:
    ids = ["b", "B", "a", "_x", "Z", "é", "10", "9"]
    items: list[Item] = [
        make_op(f"op-{t}-{i}", i, {"i": i}, entity_type=t, operation="CREATE")
        for t in ("tables", "customers", "products")
        for i in ids
    ]
    elsewhere = make_op("op-other", "b", {"x": 1}, store_id="s2", operation="CREATE")
    await sync(store, [*items, elsewhere])
    await sync(
        store, [make_op("op-del", "a", operation="DELETE", entity_type="products", version=2)]
    )

    seq, entities = await store.snapshot("s1", None)
    assert seq == (await store.log_bounds("s1")).last_seq == 3 * len(ids) + 1
    # Ordered by (entity_type, entity_id) in code-point order, whatever the database collation.
    assert [(e.key.entity_type, e.key.entity_id) for e in entities] == sorted(
        (t, i) for t in ("tables", "customers", "products") for i in ids
    )
    for found in entities:
        assert found == await store.get_entity(found.key)
    tombstones = [e for e in entities if e.deleted]
    assert [(t.key.entity_type, t.key.entity_id, t.version) for t in tombstones] == [
        ("products", "a", 2)
    ]
    assert tombstones[0].data == {"i": "a"}  # a tombstone keeps its last data

    seq2, only = await store.snapshot("s1", ["products", "customers", "nothing"])
    assert seq2 == seq
    assert only == [e for e in entities if e.key.entity_type in ("products", "customers")]
    assert await store.snapshot("s1", []) == (seq, entities)  # no filter, like None
    assert await store.snapshot("s1", None) == (seq, entities)  # stable
    assert await store.snapshot("s2", None) == (1, [await store.get_entity(elsewhere.key)])
    assert await store.snapshot("s3", None) == (0, [])


async def test_get_entity(store: Store) -> None:
    live = Entity(
        key=EntityKey("s1", "products", "P1"),
        version=5,
        data={**UNICODE, "price": 12.5, "tags": [["a"], []], "meta": {"x": None}},
        deleted=False,
        timestamp=STAMPS[3],
        updated_by="pos-2",
        field_versions={"price": [5, STAMPS[3]], "nome": [2, STAMPS[1]]},
    )
    gone = Entity(
        key=EntityKey("s1", "products", "P2"),
        version=2,
        data={"price": 1},
        deleted=True,
        timestamp=STAMPS[2],
        updated_by="pos-3",
        field_versions={},
    )
    await store.commit(BatchRequest(), writes(BatchWrite(entities=[live, gone])))
    assert await store.get_entity(live.key) == live
    assert await store.get_entity(gone.key) == gone
    assert await store.get_entity(EntityKey("s1", "products", "P3")) is None
    assert await store.get_entity(EntityKey("s1", "tables", "P1")) is None
    assert await store.get_entity(EntityKey("s2", "products", "P1")) is None

    newer = Entity(live.key, 6, {"price": 13}, False, STAMPS[4], "pos-9", {"price": [6, STAMPS[4]]})
    await store.commit(BatchRequest(), writes(BatchWrite(entities=[newer])))
    assert await store.get_entity(live.key) == newer


async def test_updated_at_is_the_writers_server_time(store: Store) -> None:
    """The engine's time of a write reads back exactly (the HTTP read and the cache show it, and
    both must agree for one version); an entity written without one gets the database's."""
    stamped = Entity(EntityKey("s1", "tables", "T1"), 1, {"a": 1}, updated_by="pos-1")
    stamped.updated_at = "2024-01-15T10:30:00.123456Z"
    bare = Entity(EntityKey("s1", "tables", "T2"), 1, {"a": 2}, updated_by="pos-1")
    await store.commit(BatchRequest(), writes(BatchWrite(entities=[stamped, bare])))
    got = await store.get_entity(stamped.key)
    assert got is not None and got.updated_at == stamped.updated_at
    got = await store.get_entity(bare.key)
    assert got is not None and got.updated_at.startswith(NOW[:4]), got.updated_at
    (listed,) = await store.list_entities("s1", "tables", None, 1)
    assert listed.updated_at == stamped.updated_at


async def test_list_entities_pages_in_code_point_order(store: Store) -> None:
    ids = ["b", "B", "a", "_x", "Z", "é", "10", "9", "a:b", "a b"]
    await sync(
        store,
        [
            *(make_op(f"op-t-{i}", i, {"i": i}, operation="CREATE") for i in ids),
            make_op("op-p", "a", {"p": 1}, entity_type="products", operation="CREATE"),
            make_op("op-s2", "a", {"s": 2}, store_id="s2", operation="CREATE"),
        ],
    )
    await sync(store, [make_op("op-del", "b", operation="DELETE", version=2)])
    seen: list[Entity] = []
    after: str | None = None
    while page := await store.list_entities("s1", "tables", after, 3):
        assert len(page) <= 3
        seen.extend(page)
        after = page[-1].key.entity_id
    assert [e.key.entity_id for e in seen] == sorted(ids)
    for found in seen:
        assert found == await store.get_entity(found.key)
    assert [e.key.entity_id for e in seen if e.deleted] == ["b"]  # tombstones included
    assert await store.list_entities("s1", "tables", "é", 10) == []
    assert [e.key for e in await store.list_entities("s2", "tables", None, 10)] == [
        EntityKey("s2", "tables", "a")
    ]
    assert await store.list_entities("s1", "nothing", None, 10) == []


# ---- sessions, health, close ----------------------------------------------------------------


async def test_record_session_inserts_then_updates(store: Store, peek: Peek) -> None:
    opened = SessionRecord("sess-1", "pos-1", "pos", "s1", "u1", NOW)
    other = SessionRecord("sess-2", "kds-1", "kds", "s1", None, NOW)
    await store.record_session(opened)
    await store.record_session(other)
    closed = SessionRecord(
        "sess-1", "pos-1", "pos", "s1", "u1", NOW, STAMPS[5], 1200, 34000, 12, 80, 1001
    )
    await store.record_session(closed)
    rows = await peek.rows("websocket_connections", session_id="sess-1")
    assert len(rows) == 1
    assert {k: rows[0][k] for k in asdict(closed)} == asdict(closed)
    (row,) = await peek.rows("websocket_connections", session_id="sess-2")
    assert {k: row[k] for k in asdict(other)} == asdict(other)


async def test_session_records_arriving_together_share_a_transaction(
    store: Store, peek: Peek
) -> None:
    """A storm of connects and disconnects costs a few transactions, not one each (each was a
    durable flush in front of the writer's commits); every record lands, the last of a
    session winning."""
    opened = [SessionRecord(f"sess-{n}", f"pos-{n}", "pos", "s1", None, NOW) for n in range(300)]
    closed = [
        SessionRecord(f"sess-{n}", f"pos-{n}", "pos", "s1", None, NOW, STAMPS[5], n, 0, 1, 0, 1000)
        for n in range(0, 300, 2)
    ]
    await asyncio.gather(*(store.record_session(r) for r in [*opened, *closed]))
    assert store._sessions.writes <= 2  # type: ignore[attr-defined]
    rows = {r["session_id"]: r for r in await peek.rows("websocket_connections")}
    assert len(rows) == 300
    assert all(
        rows[f"sess-{n}"]["close_code"] == (1000 if n % 2 == 0 else None) for n in range(300)
    )
    assert rows["sess-8"]["bytes_in"] == 8


async def test_closed_store_is_unavailable(store: Store) -> None:
    assert await store.ping() is True
    await store.close()
    assert await store.ping() is False

    called = []

    def decide(state: BatchState) -> tuple[None, BatchWrite]:
        called.append(state)
        return None, BatchWrite()

    with pytest.raises(StorageUnavailable):
        await store.commit(request_for([make_op("op1", "T1")]), decide)
    assert called == []
    with pytest.raises(StorageUnavailable):
        await store.read_operations("s1", 0, 10)
    with pytest.raises(StorageUnavailable):
        await store.log_bounds("s1")
    with pytest.raises(StorageUnavailable):
        await store.snapshot("s1", None)
    with pytest.raises(StorageUnavailable):
        await store.get_entity(EntityKey("s1", "tables", "T1"))
    with pytest.raises(StorageUnavailable):
        await store.record_session(SessionRecord("x", "t", "pos", "s1", None, NOW))
    await store.close()  # twice is fine


async def test_close_lets_pending_calls_finish(store: Store) -> None:
    commits = [
        asyncio.ensure_future(sync(store, [make_op(f"op{n}", "T1", {"n": n}, version=n + 1)]))
        for n in range(10)
    ]
    await asyncio.sleep(0)
    await store.close()
    outcomes = await asyncio.gather(*commits)  # queued before close: they finish first
    assert [o[0].status for o in outcomes] == ["applied"] * 10
    again = await reopen_store(store)
    try:
        assert (await again.log_bounds("s1")).last_seq == 10
    finally:
        await again.close()


# ---- concurrency ----------------------------------------------------------------------------


async def test_concurrent_commits_never_fork(store: Store) -> None:
    rng = random.Random(11)
    keys = [
        ("s1", "tables", "T1"),
        ("s1", "tables", "T2"),
        ("s1", "products", "P1"),
        ("s2", "tables", "T1"),
        ("s2", "customers", "K1"),
    ]
    batches = []
    for b in range(50):
        batch = []
        for j in range(rng.randint(1, 4)):
            store_id, entity_type, entity_id = rng.choice(keys)
            field_name = rng.choice(["a", "b", "c"])
            batch.append(
                make_op(
                    f"op-{b}-{j}",
                    entity_id,
                    {field_name: b},
                    store_id=store_id,
                    entity_type=entity_type,
                    version=rng.randint(1, 3),  # mostly stale: the policies decide
                    timestamp=rng.choice(STAMPS),
                )
            )
        batches.append(batch)

    commits = [sync(store, batch) for batch in batches]
    snapshots = [store.snapshot("s1", None) for _ in range(10)]
    calls: list[Any] = []
    for n, commit in enumerate(commits):
        calls.append(commit)
        if n % 5 == 0:
            calls.append(snapshots[n // 5])
    results = await asyncio.gather(*calls)

    versions: dict[EntityKey, list[int]] = {}
    seqs: dict[str, list[int]] = {"s1": [], "s2": []}
    for result in results:
        if isinstance(result, tuple):
            continue
        for outcome in result:
            for changed in outcome.changed:
                versions.setdefault(changed.key, []).append(changed.version)
            if outcome.record is not None and outcome.record.seq is not None:
                seqs[outcome.record.store_id].append(outcome.record.seq)
    assert sum(len(v) for v in versions.values()) > 20  # the test did exercise something
    for key, seen in versions.items():
        assert sorted(seen) == list(range(1, len(seen) + 1)), key
        stored = await store.get_entity(key)
        assert stored is not None and stored.version == len(seen)
    for store_id, assigned in seqs.items():
        assert sorted(assigned) == list(range(1, len(assigned) + 1))
        assert [r.seq for r in await all_operations(store, store_id)] == sorted(assigned)
        assert (await store.log_bounds(store_id)).last_seq == len(assigned)

    # Every applied op changed one entity by one version and took one seq: a snapshot taken
    # in the middle of the writes is consistent exactly when its versions add up to its seq.
    for result in results:
        if isinstance(result, tuple):
            seq, entities = result
            assert sum(e.version for e in entities) == seq


async def test_concurrent_resolutions_of_one_conflict_settle_it_once(store: Store) -> None:
    cash = make_op("c1", "C1", {"amount": 1}, entity_type="cashier_operations", operation="CREATE")
    stale = make_op("c2", "C1", {"amount": 2}, entity_type="cashier_operations")
    await sync(store, [cash, stale])
    resolutions = [
        Resolution(conflict_id_for("c2"), "s1", f"t{n}", None, "merge", {"amount": n}, NOW)
        for n in range(20)
    ]
    results = await asyncio.gather(*(sync(store, [r]) for r in resolutions))
    statuses = Counter(o.status for (o,) in results)
    assert statuses == {"resolved": 1, "error": 19}
    c1 = await store.get_entity(EntityKey("s1", "cashier_operations", "C1"))
    assert c1 is not None and c1.version == 2
    assert [r.seq for r in await all_operations(store, "s1")] == [1, 2]


async def test_concurrent_retries_of_one_operation_apply_it_once(store: Store) -> None:
    op = make_op("op1", "T1", {"a": 1})
    results = await asyncio.gather(*(sync(store, [op]) for _ in range(20)))
    assert Counter(o.status for (o,) in results) == {"applied": 1, "duplicate": 19}
    assert len({o.record.seq for (o,) in results if o.record}) == 1
    t1 = await store.get_entity(op.key)
    assert t1 is not None and t1.version == 1


# ---- the store against the engine in memory -------------------------------------------------


class MemoryStore:
    """The engine over plain dicts holding everything: what every store must be equivalent to."""

    def __init__(self) -> None:
        self.known: dict[tuple[str, str], OpRecord] = {}
        self.entities: dict[EntityKey, Entity] = {}
        self.conflicts: dict[tuple[str, str], Conflict] = {}
        self.last_seqs: dict[str, int] = {}
        self.audit = 0

    def sync(self, items: Sequence[Item], now: str) -> list[Outcome]:
        state = BatchState(
            copy.deepcopy(self.known),
            copy.deepcopy(self.entities),
            copy.deepcopy(self.conflicts),
            dict(self.last_seqs),
        )
        outcomes, write = ENGINE.decide(items, state, now)
        self.entities.update((e.key, e) for e in write.entities)
        assert not {r.op_key for r in write.op_records} & set(self.known)
        self.known.update((r.op_key, r) for r in [*write.op_records, *write.settled_records])
        self.conflicts.update((c.key, c) for c in write.new_conflicts)
        for conflict_key in write.settled_conflicts:
            self.conflicts.pop(conflict_key, None)
        self.last_seqs.update(write.last_seqs)
        self.audit += len(write.audit)
        return outcomes


def random_items(rng: random.Random, count: int, tag: str) -> list[Item]:
    stores, names = ["s1", "s2"], ["e1", "e2"]
    types = ["tables", "products", "customers", "cashier_operations"]
    values: list[Any] = ["open", 12.5, 0, "Açaí 🍧", ["x", [1, 2]], {"n": None}, True, None]

    def patch() -> dict[str, Any]:
        fields = rng.sample(["status", "total", "nome", "items"], rng.randint(1, 2))
        return {f: rng.choice(values) for f in fields}

    items: list[Item] = []
    ops: list[Operation] = []
    for n in range(count):
        roll = rng.random()
        if ops and roll < 0.1:
            items.append(rng.choice(ops))  # a retry of an earlier operation
            continue
        if ops and roll < 0.2:
            target = rng.choice(ops)
            kind = rng.choice(["accept_remote", "accept_local", "merge"])
            items.append(
                Resolution(
                    conflict_id_for(target.id),
                    target.store_id,
                    "t-res",
                    rng.choice([None, "u-res"]),
                    kind,
                    patch() if kind == "merge" or rng.random() < 0.3 else None,
                    rng.choice(STAMPS),
                )
            )
            continue
        entity_type = rng.choice(types)
        operation = rng.choices(["CREATE", "UPDATE", "DELETE", "BULK_UPDATE"], [3, 5, 2, 1])[0]
        data = patch()
        if operation == "BULK_UPDATE":
            data = {
                "updates": [
                    {"entity_id": name, "data": patch(), "version": rng.randint(1, 5)}
                    for name in rng.sample(names, rng.randint(1, 2))
                ]
            }
        op = make_op(
            f"{tag}-{n}",
            rng.choice(names),
            data,
            store_id=rng.choice(stores),
            entity_type=entity_type,
            operation=operation,
            version=rng.randint(1, 5),
            timestamp=rng.choice(STAMPS),
            terminal_id=rng.choice(["t1", "t2"]),
            user_id=rng.choice(["u1", None]),
            requires_lock=rng.random() < 0.2,
            priority=rng.choice(["low", "medium", "high"]),
        )
        ops.append(op)
        items.append(op)
    return items


def summary(outcome: Outcome) -> tuple[Any, ...]:
    error = outcome.error
    return (
        outcome.id,
        outcome.status,
        outcome.record,
        outcome.conflict,
        None if error is None else (type(error), error.code, error.reason),
        outcome.changed,
    )


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_store_is_equivalent_to_the_engine_in_memory(
    store: Store, peek: Peek, seed: int
) -> None:
    rng = random.Random(seed)
    items = random_items(rng, 80, f"op{seed}")
    model = MemoryStore()
    expected = [summary(o) for item in items for o in model.sync([item], NOW)]  # one by one

    got: list[tuple[Any, ...]] = []
    start = 0
    while start < len(items):
        size = rng.randint(1, 8)
        got += [summary(o) for o in await sync(store, items[start : start + size])]
        start += size
    assert got == expected
    statuses = Counter(s[1] for s in got)
    assert statuses["applied"] and statuses["conflict"] and statuses["duplicate"]

    everything = BatchRequest(
        operation_keys=[i.op_key for i in items if isinstance(i, Operation)],
        entity_keys=sorted(
            {k for i in items if isinstance(i, Operation) for k in i.touched_keys()}
        ),
        conflict_keys=[
            (i.store_id, conflict_id_for(i.id)) for i in items if isinstance(i, Operation)
        ],
        store_ids=["s1", "s2"],
    )
    state = await read_state(store, everything)
    assert state.known_ops == model.known
    assert state.entities == model.entities
    assert state.conflicts == model.conflicts
    assert state.last_seqs == {"s1": 0, "s2": 0, **model.last_seqs}
    for store_id in ("s1", "s2"):
        logged = sorted(
            (r for r in model.known.values() if r.store_id == store_id and r.seq is not None),
            key=lambda r: r.seq or 0,
        )
        assert await all_operations(store, store_id) == logged
        seq, entities = await store.snapshot(store_id, None)
        assert seq == model.last_seqs.get(store_id, 0)
        assert entities == [
            model.entities[k] for k in sorted(model.entities) if k.store_id == store_id
        ]
    assert len(await peek.rows("audit_logs_master")) == model.audit


# ---- upkeep ---------------------------------------------------------------------------------


async def test_maintain_prunes_old_log_rows_without_leaving_a_hole(store: Store) -> None:
    # seqs 1..3 logged 40 days ago, 4 logged now; s2 only old; a NULL-seq (losing) row old.
    old = format_timestamp(STARTED - timedelta(days=40))
    await sync(store, [make_op(f"a{n}", f"T{n}", {"n": n}) for n in range(3)], now=old)
    await sync(store, [make_op("b0", "X", {"n": 0}, store_id="s2")], now=old)
    await sync(store, [make_op("a3", "T9", {"n": 3})], now=NOW)
    await store.maintain(timedelta(days=30), now=STARTED)
    s1, s2 = await store.log_bounds("s1"), await store.log_bounds("s2")
    assert (s1.oldest_seq, s1.last_seq) == (4, 4)
    assert (s2.oldest_seq, s2.last_seq) == (2, 1)
    assert [r.seq for r in await store.read_operations("s1", 0, 10)] == [4]
    # A retry of a pruned op is no longer known: the retention is the idempotency horizon.
    await store.maintain(timedelta(days=30), now=STARTED)  # idempotent


async def test_maintain_keeps_a_newer_seq_logged_earlier_than_an_older_one(store: Store) -> None:
    # seq 1 logged now, seq 2 logged "long ago" (clock order and seq order differ): nothing may go,
    # or the log would skip seq 2 while replaying from 0.
    await sync(store, [make_op("n1", "T1", {"n": 1})], now=NOW)
    await sync(
        store, [make_op("n2", "T2", {"n": 2})], now=format_timestamp(STARTED - timedelta(days=90))
    )
    await store.maintain(timedelta(days=30), now=STARTED)
    assert [r.seq for r in await store.read_operations("s1", 0, 10)] == [1, 2]


async def test_get_operation_finds_applied_and_unapplied_records(store: Store) -> None:
    await sync(store, [make_op("w1", "T1", {"n": 1}, timestamp=STAMPS[2])])
    await sync(store, [make_op("l1", "T1", {"n": 0}, version=1, timestamp=STAMPS[0])])
    applied, lost = await store.get_operation("s1", "w1"), await store.get_operation("s1", "l1")
    assert applied is not None and applied.seq == 1 and applied.status == "applied"
    assert lost is not None and lost.seq is None and lost.status == "resolved"
    assert await store.get_operation("s1", "nope") is None
    assert await store.get_operation("s2", "w1") is None  # ids are per store


async def test_logged_names_the_logged_keys_among_many(store: Store) -> None:
    await sync(store, [make_op("w1", "T1", {"n": 1}, timestamp=STAMPS[2])])
    await sync(store, [make_op("l1", "T1", {"n": 0}, version=1, timestamp=STAMPS[0])])
    await sync(store, [make_op("w1", "T9", {"n": 1}, store_id="s2")])
    keys = [("s1", "w1"), ("s1", "l1"), ("s1", "nope"), ("s2", "l1"), ("s2", "w1"), ("s1", "w1")]
    assert await store.logged(keys) == {("s1", "w1"), ("s1", "l1"), ("s2", "w1")}
    assert await store.logged([("s3", "w1")]) == set()
    assert await store.logged([]) == set()
    many = [("s1", f"x{i}") for i in range(1200)] + [("s1", "l1")]  # past one statement's keys
    assert await store.logged(many) == {("s1", "l1")}


# ---- server events (the monitor's backups and restores) ---------------------------------------


async def test_server_events_round_trip_in_id_order(store: Store) -> None:
    assert await store.server_events(None, 5) == []
    at = STARTED.timestamp()
    payloads = [{"status": "ok", "stores": {"s1": n}, "archive": f"a{n}.tar"} for n in range(3)]
    ids = [await store.add_server_event("backup", p, at + n) for n, p in enumerate(payloads)]
    assert ids == sorted(set(ids))
    events = await store.server_events(0, 10)
    assert [(e.id, e.kind, e.payload) for e in events] == [
        (i, "backup", p) for i, p in zip(ids, payloads, strict=True)
    ]
    assert [round(e.created_at - at, 3) for e in events] == [0, 1, 2]
    assert [e.id for e in await store.server_events(ids[0], 10)] == ids[1:]
    assert [e.id for e in await store.server_events(ids[0], 1)] == ids[1:2]
    assert [e.id for e in await store.server_events(None, 2)] == ids[1:]  # newest, oldest first
    assert await store.server_events(ids[-1], 10) == []


async def test_maintain_prunes_old_server_events(store: Store) -> None:
    old = (STARTED - timedelta(days=40)).timestamp()
    await store.add_server_event("backup", {"status": "ok"}, old)
    kept = await store.add_server_event("restore", {"status": "ok"}, STARTED.timestamp())
    await store.maintain(timedelta(days=30), now=STARTED)
    assert [e.id for e in await store.server_events(0, 10)] == [kept]

"""The pure sync engine (docs/protocol.md §7): versions, tombstones, conflict policies, manual
resolution, idempotency, BULK_UPDATE and store sequence numbers.

No event loop and no I/O: every test builds a BatchState by hand, calls `Engine.decide` and looks
at the outcomes and the BatchWrite. `carry` plays the store's part between batches.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from chefia_rt.errors import Code, InvalidMessage, ResolutionFailed
from chefia_rt.sync.engine import Engine, Outcome, conflict_id_for, wire_data
from chefia_rt.sync.policies import PolicyTable

NOW = "2024-01-15T12:00:00.000000Z"
STORE = "s1"

# ---- helpers -------------------------------------------------------------------------------


def ts(second: int) -> str:
    """A canonical client timestamp, `second` seconds after 10:00."""
    return f"2024-01-15T10:{second // 60:02d}:{second % 60:02d}.000000Z"


def key(entity_type: str = "orders", entity_id: str = "e1", store: str = STORE) -> EntityKey:
    return EntityKey(store, entity_type, entity_id)


def op(
    op_id: str,
    kind: str = "UPDATE",
    data: dict[str, Any] | None = None,
    version: int = 1,
    *,
    entity_type: str = "orders",
    entity_id: str = "e1",
    t: int = 0,
    store: str = STORE,
    terminal: str = "pos-1",
    user: str | None = None,
) -> Operation:
    return Operation(
        id=op_id,
        store_id=store,
        entity_type=entity_type,
        entity_id=entity_id,
        operation=kind,
        data={} if data is None else data,
        version=version,
        timestamp=ts(t),
        terminal_id=terminal,
        user_id=user,
    )


def bulk(
    op_id: str,
    updates: list[tuple[str, dict[str, Any], int]],
    *,
    entity_type: str = "orders",
    t: int = 0,
    store: str = STORE,
) -> Operation:
    items = [{"entity_id": e, "data": d, "version": v} for e, d, v in updates]
    return op(
        op_id,
        "BULK_UPDATE",
        {"updates": items},
        1,
        entity_type=entity_type,
        entity_id=updates[0][0] if updates else "bulk",
        t=t,
        store=store,
    )


def ent(
    version: int,
    data: dict[str, Any],
    *,
    entity_type: str = "orders",
    entity_id: str = "e1",
    store: str = STORE,
    t: int = 0,
    deleted: bool = False,
    fields: dict[str, tuple[int, int]] | None = None,
) -> Entity:
    """An entity; `fields` maps a field to (version that changed it, second of that change)."""
    return Entity(
        key=key(entity_type, entity_id, store),
        version=version,
        data=data,
        deleted=deleted,
        timestamp=ts(t),
        updated_by="pos-0",
        field_versions={f: [v, ts(s)] for f, (v, s) in (fields or {}).items()},
    )


def state(
    *entities: Entity,
    known: Sequence[OpRecord] = (),
    conflicts: Sequence[Conflict] = (),
    seqs: dict[str, int] | None = None,
) -> BatchState:
    return BatchState(
        known_ops={r.op_key: r for r in known},
        entities={e.key: e for e in entities},
        conflicts={c.key: c for c in conflicts},
        last_seqs=dict(seqs or {}),
    )


def resolution(
    conflict_id: str,
    kind: str,
    resolved_data: dict[str, Any] | None = None,
    *,
    store: str = STORE,
    terminal: str = "pos-9",
    t: int = 50,
) -> Resolution:
    return Resolution(
        conflict_id=conflict_id,
        store_id=store,
        terminal_id=terminal,
        user_id="manager",
        resolution=kind,
        resolved_data=resolved_data,
        timestamp=ts(t),
    )


def run(
    items: Sequence[Operation | Resolution],
    st_: BatchState | None = None,
    policies: PolicyTable | None = None,
) -> tuple[list[Outcome], BatchWrite]:
    outcomes, write = Engine(policies).decide(items, st_ if st_ is not None else state(), NOW)
    assert_answers_name_their_items(items, outcomes)
    return outcomes, write


def assert_answers_name_their_items(
    items: Sequence[Operation | Resolution], outcomes: Sequence[Outcome]
) -> None:
    """One outcome per item, in order, each under the id its answer is sent with: an operation's
    own id; for a resolution, the id of the operation whose conflict it settles (or the conflict
    id it named, when there is no such conflict)."""
    assert len(outcomes) == len(items)
    for item, out in zip(items, outcomes, strict=True):
        if isinstance(item, Resolution):
            assert item.conflict_id in (out.id, conflict_id_for(out.id)), (item, out)
        else:
            assert out.id == item.id, (item, out)


def carry(before: BatchState, write: BatchWrite, *, copy_write: bool = True) -> BatchState:
    """What the store holds after committing `write` (and reads back for the next batch)."""
    if copy_write:
        write = copy.deepcopy(write)  # a round trip through storage shares nothing
    entities = dict(before.entities)
    entities.update({e.key: e for e in write.entities})
    known = dict(before.known_ops)
    assert not set(known) & {r.op_key for r in write.op_records}, "the log is append-only"
    for r in write.settled_records:
        assert known[r.op_key].status == "conflict", "only a pending conflict's row is settled"
    known.update({r.op_key: r for r in [*write.op_records, *write.settled_records]})
    conflicts = dict(before.conflicts)
    conflicts.update({c.key: c for c in write.new_conflicts})
    for conflict_key in write.settled_conflicts:
        conflicts.pop(conflict_key, None)
    return BatchState(known, entities, conflicts, {**before.last_seqs, **write.last_seqs})


def assert_no_change(write: BatchWrite, before: BatchState) -> None:
    assert write.entities == []
    assert write.audit == []
    assert write.new_conflicts == []
    assert write.last_seqs == before.last_seqs


def only(outcomes: list[Outcome]) -> Outcome:
    assert len(outcomes) == 1
    return outcomes[0]


# ---- applying in order ---------------------------------------------------------------------


def test_create_of_unknown_entity_is_applied_as_version_1() -> None:
    o, w = run([op("op1", "CREATE", {"status": "open"}, 1, t=5, user="u1")])
    out = only(o)
    assert out.status == "applied"
    assert out.record == OpRecord(
        id="op1",
        store_id=STORE,
        entity_type="orders",
        entity_id="e1",
        operation="CREATE",
        data={"status": "open"},
        version=1,
        seq=1,
        status="applied",
        conflict_resolved=False,
        terminal_id="pos-1",
        user_id="u1",
        priority="medium",
        timestamp=ts(5),
        server_time=NOW,
        deleted=False,
    )
    created = Entity(key(), 1, {"status": "open"}, False, ts(5), "pos-1", {"status": [1, ts(5)]})
    assert out.changed == [created]
    assert w.entities == [created]
    assert w.op_records == [out.record]
    assert w.last_seqs == {STORE: 1}
    assert w.audit == [
        AuditRecord(
            operation_id="op1",
            store_id=STORE,
            entity_type="orders",
            entity_id="e1",
            operation="CREATE",
            terminal_id="pos-1",
            user_id="u1",
            before=None,
            after={"status": "open"},
            sync_status="applied",
            conflict_resolved=False,
            timestamp=NOW,
        )
    ]
    assert w.new_conflicts == [] and w.settled_conflicts == []


@pytest.mark.parametrize("kind", ["CREATE", "UPDATE"])
@pytest.mark.parametrize("version", [1, 2, 7])
def test_create_or_update_of_unknown_entity_starts_at_version_1(kind: str, version: int) -> None:
    out = only(run([op("op1", kind, {"a": 1}, version)])[0])
    assert out.status == "applied"
    assert out.record is not None
    assert (out.record.version, out.record.seq, out.record.data) == (1, 1, {"a": 1})
    assert out.record.conflict_resolved is False


@pytest.mark.parametrize(
    "entity_type", ["orders", "tables", "products", "customers", "cashier_operations", "misc"]
)
def test_update_with_next_version_patches_the_entity(entity_type: str) -> None:
    before = state(ent(1, {"a": 1, "b": 2}, entity_type=entity_type, t=50))
    o, w = run([op("op1", "UPDATE", {"b": 3, "c": 4}, 2, entity_type=entity_type, t=1)], before)
    out = only(o)
    # In order, the timestamp does not matter (t=1 is older than the entity's t=50).
    assert out.status == "applied"
    assert out.record is not None
    assert out.record.version == 2 and out.record.seq == 1
    assert out.record.data == {"a": 1, "b": 3, "c": 4}
    assert out.record.conflict_resolved is False
    (after,) = w.entities
    assert after.data == {"a": 1, "b": 3, "c": 4}
    assert after.field_versions == {"b": [2, ts(1)], "c": [2, ts(1)]}
    assert after.timestamp == ts(1)  # the client time of the write that last wrote it
    assert w.audit[0].before == {"a": 1, "b": 2}
    assert w.audit[0].after == {"a": 1, "b": 3, "c": 4}


def test_create_with_next_version_replaces_the_whole_state() -> None:
    before = state(ent(1, {"a": 1, "b": 2}, fields={"a": (1, 0), "b": (1, 0)}))
    out = only(run([op("op1", "CREATE", {"x": 1}, 2, t=3)], before)[0])
    assert out.status == "applied"
    (after,) = out.changed
    assert after.data == {"x": 1} and after.version == 2
    # Dropped fields changed too: a later merge from an older base must not bring them back.
    assert after.field_versions == {"a": [2, ts(3)], "b": [2, ts(3)], "x": [2, ts(3)]}


def test_decide_does_not_modify_the_state_it_is_given() -> None:
    before = state(
        ent(2, {"a": [1, 2]}, fields={"a": (2, 0)}),
        ent(1, {"x": 1}, entity_type="cashier_operations"),
        seqs={STORE: 4},
    )
    snapshot = copy.deepcopy(before)
    run(
        [
            op("op1", "UPDATE", {"b": 1}, 3),
            op("op2", "UPDATE", {"x": 2}, 1, entity_type="cashier_operations"),
            resolution(conflict_id_for("op2"), "accept_local"),
            op("op3", "DELETE", {}, 4),
        ],
        before,
    )
    assert before == snapshot


# ---- tombstones ----------------------------------------------------------------------------


def test_delete_of_unknown_entity_is_error_4007_and_writes_nothing() -> None:
    before = state(seqs={STORE: 3})
    o, w = run([op("op1", "DELETE", {}, 1)], before)
    out = only(o)
    assert out.status == "error"
    assert (
        out.error is not None
        and out.error.code == Code.ENTITY_NOT_FOUND
        and int(out.error.code) == 4007
    )
    assert out.record is None
    assert_no_change(w, before)
    assert w.op_records == []


def test_delete_makes_a_tombstone_that_keeps_its_data_but_shows_none() -> None:
    before = state(ent(2, {"status": "open", "total": 10}, t=0))
    o, w = run([op("op1", "DELETE", {"ignored": True}, 3, t=5)], before)
    out = only(o)
    assert out.status == "applied"
    assert out.record is not None
    assert out.record.deleted is True
    assert out.record.data == {}
    assert (out.record.version, out.record.seq) == (3, 1)
    assert out.record.conflict_resolved is False  # no conflict: the version was the next one
    (tomb,) = w.entities
    assert tomb.deleted and tomb.version == 3
    assert tomb.data == {"status": "open", "total": 10}
    assert wire_data(tomb) == {}
    assert w.audit[0].before == {"status": "open", "total": 10}
    assert w.audit[0].after is None


def test_wire_data_of_a_live_entity_is_its_data() -> None:
    live = ent(1, {"a": 1})
    assert wire_data(live) == {"a": 1}
    assert wire_data(ent(1, {"a": 1}, deleted=True)) == {}


@pytest.mark.parametrize("version", [4, 2, 9])
@pytest.mark.parametrize("entity_type", ["orders", "products", "cashier_operations"])
def test_delete_of_a_tombstone_is_resolved_and_changes_nothing(
    version: int, entity_type: str
) -> None:
    before = state(ent(3, {"a": 1}, entity_type=entity_type, deleted=True), seqs={STORE: 7})
    o, w = run([op("op1", "DELETE", {}, version, entity_type=entity_type, t=59)], before)
    out = only(o)
    assert out.status == "resolved"
    assert out.record is not None
    assert (out.record.version, out.record.seq) == (3, None)
    assert out.changed == []
    assert_no_change(w, before)
    assert w.op_records == [out.record]


@pytest.mark.parametrize(
    "entity_type", ["orders", "tables", "products", "customers", "cashier_operations"]
)
@pytest.mark.parametrize("version", [1, 4])
def test_create_over_a_tombstone_recreates(entity_type: str, version: int) -> None:
    tomb = ent(
        3, {"a": 1, "b": 2}, entity_type=entity_type, deleted=True, t=30, fields={"a": (1, 0)}
    )
    o, w = run([op("op1", "CREATE", {"c": 1}, version, entity_type=entity_type, t=1)], state(tomb))
    out = only(o)
    assert out.status == "applied"
    assert out.record is not None
    assert (out.record.version, out.record.seq, out.record.data) == (4, 1, {"c": 1})
    assert out.record.deleted is False
    (after,) = w.entities
    assert after.data == {"c": 1} and not after.deleted and after.version == 4
    # A CREATE replaces the whole state: the fields it drops changed too.
    assert after.field_versions == {f: [4, ts(1)] for f in ("a", "b", "c")}


@pytest.mark.parametrize("entity_type", ["orders", "tables", "products", "customers", "misc"])
@pytest.mark.parametrize("version", [4, 2])
def test_update_after_delete_with_later_or_equal_timestamp_resurrects(
    entity_type: str, version: int
) -> None:
    tomb = ent(3, {"a": 1, "b": 2}, entity_type=entity_type, deleted=True, t=10)
    for t in (10, 20):
        o, w = run(
            [op("op1", "UPDATE", {"b": 9}, version, entity_type=entity_type, t=t)], state(tomb)
        )
        out = only(o)
        assert out.status == "applied"
        assert out.record is not None
        assert out.record.conflict_resolved is True
        assert (out.record.version, out.record.seq) == (4, 1)
        # The tombstone kept its data; the UPDATE is a patch over it.
        assert out.record.data == {"a": 1, "b": 9}
        (after,) = w.entities
        assert not after.deleted and after.data == {"a": 1, "b": 9}


@pytest.mark.parametrize("entity_type", ["orders", "products", "customers"])
def test_update_after_delete_with_earlier_timestamp_is_resolved(entity_type: str) -> None:
    tomb = ent(3, {"a": 1}, entity_type=entity_type, deleted=True, t=10)
    before = state(tomb, seqs={STORE: 2})
    o, w = run([op("op1", "UPDATE", {"a": 9}, 4, entity_type=entity_type, t=9)], before)
    out = only(o)
    assert out.status == "resolved"
    assert out.record is not None
    assert (out.record.version, out.record.seq) == (3, None)
    assert_no_change(w, before)


def test_update_after_delete_is_a_manual_conflict_for_cashier_operations() -> None:
    tomb = ent(3, {"a": 1}, entity_type="cashier_operations", deleted=True, t=10)
    before = state(tomb)
    o, w = run([op("op1", "UPDATE", {"a": 9}, 4, entity_type="cashier_operations", t=99)], before)
    out = only(o)
    assert out.status == "conflict"
    assert out.conflict is not None
    assert out.conflict.server_version == 3 and out.conflict.server_data == {}
    assert w.entities == [] and w.new_conflicts == [out.conflict]


# ---- last_write_wins -----------------------------------------------------------------------


def lww_entity(**kw: Any) -> Entity:
    # v3 written at t=10; its base-1 history: "a" changed by v3, "b" by v2.
    return ent(3, {"a": 1, "b": 2}, t=10, fields={"a": (3, 10), "b": (2, 5)}, **kw)


@pytest.mark.parametrize("t", [10, 11, 30])
@pytest.mark.parametrize("entity_type", ["orders", "tables", "anything_else"])
def test_lww_stale_update_with_later_or_equal_timestamp_wins_whole(
    t: int, entity_type: str
) -> None:
    before = state(lww_entity(entity_type=entity_type), seqs={STORE: 41})
    o, w = run([op("op1", "UPDATE", {"b": 7}, 2, entity_type=entity_type, t=t)], before)
    out = only(o)
    assert out.status == "applied"
    assert out.record is not None
    assert out.record.conflict_resolved is True
    assert (out.record.version, out.record.seq) == (4, 42)
    assert out.record.data == {"a": 1, "b": 7}
    assert [e.version for e in out.changed] == [4]
    assert w.last_seqs == {STORE: 42}


@pytest.mark.parametrize("version", [2, 1, 3, 5])
def test_lww_stale_update_with_earlier_timestamp_loses(version: int) -> None:
    before = state(lww_entity(), seqs={STORE: 41})
    o, w = run([op("op1", "UPDATE", {"b": 7}, version, t=9)], before)
    out = only(o)
    assert out.status == "resolved"
    assert out.record is not None
    assert out.record.conflict_resolved is True
    assert (out.record.version, out.record.seq, out.record.data) == (3, None, {})
    assert out.changed == []  # not pushed
    assert_no_change(w, before)
    assert w.op_records == [out.record]  # kept, so that a retry is recognised


def test_lww_winning_update_with_empty_patch_still_makes_a_version() -> None:
    out = only(run([op("op1", "UPDATE", {}, 2, t=30)], state(lww_entity()))[0])
    assert out.status == "applied"
    assert out.record is not None
    assert (out.record.version, out.record.seq) == (4, 1)
    assert out.changed[0].timestamp == ts(30)


def test_lww_compares_with_writes_since_the_base_not_with_older_ones() -> None:
    # v1 was written with a late clock (t=30); v2 in order at t=5. A stale op from base v1 at
    # t=10 only conflicts with v2 (t=5), so it wins: v1's late clock is history it had seen.
    _first, w1 = run([op("op1", "CREATE", {"a": 1}, 1, t=30)])
    s1 = carry(state(), w1)
    _, w2 = run([op("op2", "UPDATE", {"b": 1}, 2, t=5)], s1)
    s2 = carry(s1, w2)
    assert s2.entities[key()].timestamp == ts(5)
    out = only(run([op("op3", "UPDATE", {"b": 2}, 2, t=10)], s2)[0])
    assert out.status == "applied"
    assert out.record is not None and out.record.version == 3


def test_lww_stale_op_loses_to_any_later_write_since_its_base() -> None:
    # Since base v1: v2 changed "a" at t=30, v3 changed "b" at t=5. An op at t=10 is older than
    # one of the writes it conflicts with, so it loses even though the last write is older.
    before = state(ent(3, {"a": 2, "b": 2}, t=5, fields={"a": (2, 30), "b": (3, 5)}))
    out = only(run([op("op1", "UPDATE", {"c": 1}, 2, t=10)], before)[0])
    assert out.status == "resolved"
    # From base v2 it only conflicts with v3 (t=5): it wins.
    out = only(run([op("op1", "UPDATE", {"c": 1}, 3, t=10)], before)[0])
    assert out.status == "applied"


@pytest.mark.parametrize(("t", "wins"), [(10, True), (20, True), (9, False)])
def test_lww_stale_delete_is_settled_by_timestamp(t: int, wins: bool) -> None:
    o, w = run([op("op1", "DELETE", {}, 2, t=t)], state(lww_entity()))
    out = only(o)
    assert out.record is not None
    if wins:
        assert out.status == "applied" and out.record.conflict_resolved
        assert out.record.deleted and out.record.version == 4 and out.record.seq == 1
        assert w.entities[0].deleted
    else:
        assert out.status == "resolved" and out.record.seq is None and out.record.version == 3
        assert w.entities == []


@pytest.mark.parametrize(
    ("entity_type", "t", "wins"),
    [("orders", 10, True), ("orders", 9, False), ("products", 11, True), ("customers", 9, False)],
)
def test_stale_create_over_a_live_entity_is_settled_by_timestamp(
    entity_type: str, t: int, wins: bool
) -> None:
    before = state(lww_entity(entity_type=entity_type))
    out = only(run([op("op1", "CREATE", {"x": 1}, 1, entity_type=entity_type, t=t)], before)[0])
    assert out.record is not None
    if wins:
        assert out.status == "applied" and out.record.conflict_resolved
        assert out.record.data == {"x": 1} and out.record.version == 4  # replaced whole
    else:
        assert out.status == "resolved" and out.record.seq is None


# ---- merge_changes (products) --------------------------------------------------------------


def product(**kw: Any) -> Entity:
    return ent(
        3,
        {"name": "Tea", "price": 5, "stock": 10},
        entity_type="products",
        t=20,
        fields={"name": (1, 0), "price": (3, 20), "stock": (2, 10)},
        **kw,
    )


def product_op(data: dict[str, Any], version: int, t: int) -> Operation:
    return op("op1", "UPDATE", data, version, entity_type="products", t=t)


def test_merge_changes_merges_a_field_the_server_did_not_change() -> None:
    o, w = run([product_op({"name": "Green tea"}, 2, t=15)], state(product()))
    out = only(o)
    assert out.status == "merged"
    assert out.record is not None
    assert out.record.conflict_resolved is True
    assert (out.record.version, out.record.seq) == (4, 1)
    assert out.record.data == {"name": "Green tea", "price": 5, "stock": 10}
    (after,) = w.entities
    assert after.field_versions == {
        "name": [4, ts(15)],
        "price": [3, ts(20)],
        "stock": [2, ts(10)],
    }
    assert w.audit[0].sync_status == "merged"


@pytest.mark.parametrize("t", [20, 25])
def test_merge_changes_same_field_later_or_equal_timestamp_wins(t: int) -> None:
    out = only(run([product_op({"price": 6}, 2, t=t)], state(product()))[0])
    assert out.status == "merged"
    assert out.record is not None and out.record.data["price"] == 6


def test_merge_changes_same_field_earlier_timestamp_keeps_the_server_value() -> None:
    before = state(product(), seqs={STORE: 5})
    o, w = run([product_op({"price": 6}, 2, t=19)], before)
    out = only(o)
    assert out.status == "resolved"
    assert out.record is not None
    assert (out.record.version, out.record.seq) == (3, None)
    assert_no_change(w, before)


def test_merge_changes_takes_what_it_can() -> None:
    out = only(run([product_op({"price": 6, "name": "X"}, 2, t=15)], state(product()))[0])
    assert out.status == "merged"
    assert out.record is not None
    assert out.record.data == {"name": "X", "price": 5, "stock": 10}
    assert out.changed[0].field_versions["price"] == [3, ts(20)]


def test_merge_changes_only_counts_changes_after_the_base() -> None:
    # From base v2, "stock" (changed by v2) was seen by the client: no conflict on it.
    out = only(run([product_op({"stock": 1}, 3, t=0)], state(product()))[0])
    assert out.status == "merged"
    assert out.record is not None and out.record.data["stock"] == 1


def test_merge_changes_with_nothing_to_merge_is_resolved() -> None:
    out = only(run([product_op({}, 2, t=30)], state(product()))[0])
    assert out.status == "resolved"
    assert out.record is not None and out.record.seq is None


# ---- merge_non_conflicting (customers) -----------------------------------------------------


def customer() -> Entity:
    return ent(
        3,
        {"name": "Ana", "phone": "1", "email": "a@x"},
        entity_type="customers",
        t=20,
        fields={"name": (1, 0), "phone": (3, 20), "email": (2, 10)},
    )


def customer_op(data: dict[str, Any], version: int, t: int = 30) -> Operation:
    return op("op1", "UPDATE", data, version, entity_type="customers", t=t)


def test_merge_non_conflicting_merges_untouched_fields() -> None:
    out = only(run([customer_op({"name": "Ana B"}, 2, t=1)], state(customer()))[0])
    assert out.status == "merged"
    assert out.record is not None
    assert out.record.conflict_resolved is True
    assert (out.record.version, out.record.seq) == (4, 1)
    assert out.record.data == {"name": "Ana B", "phone": "1", "email": "a@x"}


@pytest.mark.parametrize("t", [1, 30])
def test_merge_non_conflicting_overlap_keeps_the_server_value_whatever_the_time(t: int) -> None:
    before = state(customer())
    o, w = run([customer_op({"phone": "2"}, 2, t=t)], before)
    out = only(o)
    assert out.status == "resolved"
    assert out.record is not None
    assert (out.record.version, out.record.seq) == (3, None)
    assert_no_change(w, before)


def test_merge_non_conflicting_partial_is_resolved_with_a_new_version() -> None:
    o, w = run([customer_op({"phone": "2", "name": "Ana B"}, 2)], state(customer()))
    out = only(o)
    assert out.status == "resolved"
    assert out.record is not None
    assert out.record.conflict_resolved is True
    assert (out.record.version, out.record.seq) == (4, 1)
    assert out.record.data == {"name": "Ana B", "phone": "1", "email": "a@x"}
    assert out.changed == w.entities and len(w.entities) == 1


def test_merge_non_conflicting_only_counts_changes_after_the_base() -> None:
    out = only(run([customer_op({"email": "b@x"}, 3)], state(customer()))[0])
    assert out.status == "merged"


# ---- manual_resolution (cashier_operations) ------------------------------------------------


def cash(version: int = 2, **kw: Any) -> Entity:
    return ent(version, {"amount": 10, "note": "x"}, entity_type="cashier_operations", **kw)


def cash_op(
    op_id: str = "op1", kind: str = "UPDATE", data: dict[str, Any] | None = None, version: int = 2
) -> Operation:
    patch = {"amount": 20} if data is None else data
    return op(op_id, kind, patch, version, entity_type="cashier_operations", t=99)


@pytest.mark.parametrize(
    ("kind", "version"), [("UPDATE", 2), ("UPDATE", 1), ("UPDATE", 5), ("DELETE", 2), ("CREATE", 1)]
)
def test_manual_resolution_raises_a_conflict_and_changes_nothing(kind: str, version: int) -> None:
    before = state(cash(), seqs={STORE: 3})
    the_op = cash_op(kind=kind, version=version)
    o, w = run([the_op], before)
    out = only(o)
    assert out.status == "conflict"
    assert out.conflict == Conflict(
        id="conflict:op1",
        operation=the_op,
        server_version=2,
        server_data={"amount": 10, "note": "x"},
        created_at=NOW,
    )
    assert out.record is not None
    assert (out.record.status, out.record.seq, out.record.version) == ("conflict", None, 2)
    assert out.record.conflict_resolved is False
    assert w.new_conflicts == [out.conflict]
    assert w.op_records == [out.record]
    assert w.entities == [] and w.audit == [] and w.last_seqs == {STORE: 3}


def test_manual_resolution_in_order_is_applied() -> None:
    out = only(run([cash_op(version=3)], state(cash()))[0])
    assert out.status == "applied"
    assert out.record is not None and out.record.data == {"amount": 20, "note": "x"}


def test_conflict_id_is_named_after_the_operation() -> None:
    assert conflict_id_for("op-123") == "conflict:op-123"


def conflicted(kind: str = "UPDATE", data: dict[str, Any] | None = None) -> BatchState:
    """A store with cashier op e1 at v2 and op1 pending as a manual conflict."""
    before = state(cash(), seqs={STORE: 3})
    _, w = run([cash_op(kind=kind, data=data)], before)
    return carry(before, w)


def test_accept_remote_keeps_the_server_state() -> None:
    before = conflicted()
    o, w = run([resolution("conflict:op1", "accept_remote")], before)
    out = only(o)
    assert out.id == "op1"
    assert out.status == "resolved"
    assert out.record is not None
    assert (out.record.status, out.record.seq, out.record.version) == ("resolved", None, 2)
    assert out.record.conflict_resolved is True
    assert w.settled_conflicts == [(STORE, "conflict:op1")]
    assert w.op_records == [] and w.settled_records == [out.record]  # the row of op1
    assert w.entities == [] and w.last_seqs == {STORE: 3}


def test_accept_local_applies_the_original_operation() -> None:
    before = conflicted()
    o, w = run([resolution("conflict:op1", "accept_local", terminal="pos-9", t=50)], before)
    out = only(o)
    assert out.status == "resolved"
    assert out.record is not None
    assert (out.record.version, out.record.seq) == (3, 4)
    assert out.record.data == {"amount": 20, "note": "x"}
    assert out.record.operation == "UPDATE" and out.record.terminal_id == "pos-1"
    (after,) = w.entities
    assert after.updated_by == "pos-9" and after.timestamp == ts(50)
    assert w.settled_conflicts == [(STORE, "conflict:op1")]
    assert w.audit[0].terminal_id == "pos-9" and w.audit[0].user_id == "manager"


def test_accept_local_of_a_delete_makes_a_tombstone() -> None:
    out = only(run([resolution("conflict:op1", "accept_local")], conflicted("DELETE"))[0])
    assert out.status == "resolved"
    assert out.record is not None
    assert out.record.deleted and out.record.data == {} and out.record.seq == 4


def test_accept_local_of_a_delete_of_what_is_now_a_tombstone_changes_nothing() -> None:
    before = conflicted("DELETE")
    _, w = run([cash_op("op2", "DELETE", {}, 3)], before)
    before = carry(before, w)
    out = only(run([resolution("conflict:op1", "accept_local")], before)[0])
    assert out.status == "resolved"
    assert out.record is not None and out.record.seq is None and out.record.version == 3


def test_merge_resolution_replaces_the_state() -> None:
    before = conflicted()
    o, w = run([resolution("conflict:op1", "merge", {"amount": 15})], before)
    out = only(o)
    assert out.status == "resolved"
    assert out.record is not None
    assert (out.record.version, out.record.seq) == (3, 4)
    assert out.record.data == {"amount": 15}
    assert w.entities[0].data == {"amount": 15}


def test_merge_resolution_without_data_fails_and_keeps_the_conflict() -> None:
    before = conflicted()
    o, w = run(
        [
            resolution("conflict:op1", "merge", None),
            resolution("conflict:op1", "accept_remote"),
        ],
        before,
    )
    assert o[0].status == "error"
    assert isinstance(o[0].error, ResolutionFailed) and o[0].error.code == 4010
    assert o[1].status == "resolved"  # still pending after the failed attempt
    assert w.settled_conflicts == [(STORE, "conflict:op1")]


@pytest.mark.parametrize(
    "res",
    [
        resolution("conflict:nope", "accept_remote"),
        resolution("conflict:op1", "accept_remote", store="s2"),
        resolution("op1", "accept_remote"),
    ],
)
def test_resolution_of_an_unknown_conflict_is_error_4010(res: Resolution) -> None:
    before = conflicted()
    o, w = run([res], before)
    out = only(o)
    assert out.status == "error" and out.id == res.conflict_id
    assert out.error is not None and out.error.code == Code.CONFLICT_RESOLUTION_FAILED
    assert w.settled_conflicts == [] and w.op_records == []


def test_a_conflict_is_settled_once() -> None:
    o, w = run(
        [
            resolution("conflict:op1", "accept_local"),
            resolution("conflict:op1", "accept_remote"),
        ],
        conflicted(),
    )
    assert [x.status for x in o] == ["resolved", "error"]
    assert w.settled_conflicts == [(STORE, "conflict:op1")]


def test_an_unknown_resolution_kind_fails_and_keeps_the_conflict() -> None:
    o, w = run([resolution("conflict:op1", "flip_a_coin")], conflicted())
    assert only(o).status == "error"
    assert o[0].error is not None and o[0].error.code == 4010
    assert w.settled_conflicts == [] and w.op_records == []


def test_conflict_raised_and_settled_in_one_batch_is_never_written_as_pending() -> None:
    before = state(cash(), seqs={STORE: 3})
    o, w = run([cash_op(), resolution("conflict:op1", "accept_local")], before)
    assert [x.status for x in o] == ["conflict", "resolved"]
    assert w.new_conflicts == []
    assert w.settled_conflicts == [(STORE, "conflict:op1")]
    assert len(w.op_records) == 1 and w.op_records[0].status == "resolved"
    assert carry(before, w).conflicts == {}


# ---- idempotency ---------------------------------------------------------------------------


def test_a_known_operation_is_a_duplicate_and_writes_nothing() -> None:
    first_state = state(ent(1, {"a": 1}), seqs={STORE: 1})
    _, w = run([op("op1", "UPDATE", {"a": 2}, 2)], first_state)
    before = carry(first_state, w)
    o, w2 = run([op("op1", "UPDATE", {"a": 3}, 3)], before)  # same id, even another body
    out = only(o)
    assert out.status == "duplicate"
    assert out.record == before.known_ops[(STORE, "op1")]
    assert out.record is not None and out.record.seq == 2
    assert out.changed == []
    assert_no_change(w2, before)
    assert w2.op_records == []


def test_the_same_operation_twice_in_a_batch_is_applied_once() -> None:
    o, w = run([op("op1", "CREATE", {"a": 1}), op("op1", "CREATE", {"a": 1})])
    assert [x.status for x in o] == ["applied", "duplicate"]
    assert o[1].record is o[0].record
    assert w.last_seqs == {STORE: 1} and len(w.op_records) == 1 and len(w.entities) == 1


def test_a_repeated_losing_operation_repeats_its_answer() -> None:
    before = state(lww_entity())
    o, _w = run([op("op1", "UPDATE", {"b": 7}, 2, t=0)] * 2, before)
    assert [x.status for x in o] == ["resolved", "duplicate"]
    assert o[1].record is not None and o[1].record.status == "resolved"


def test_a_repeated_pending_conflict_repeats_the_conflict() -> None:
    before = conflicted()
    o, w = run([cash_op()], before)
    out = only(o)
    assert out.status == "conflict"
    assert out.conflict == before.conflicts[(STORE, "conflict:op1")]
    assert out.record == before.known_ops[(STORE, "op1")]
    assert_no_change(w, before)
    assert w.op_records == []


def test_a_settled_conflict_repeats_as_duplicate() -> None:
    before = conflicted()
    _, w = run([resolution("conflict:op1", "accept_local")], before)
    after = carry(before, w)
    out = only(run([cash_op()], after)[0])
    assert out.status == "duplicate"
    assert out.record is not None and out.record.status == "resolved" and out.record.seq == 4


def test_operation_ids_are_per_store_another_store_may_use_the_same_id() -> None:
    first = state()
    _, w = run([op("op1", "CREATE", {"a": 1}, store="s2")], first)
    before = carry(first, w)
    o, w2 = run([op("op1", "CREATE", {"a": 2}, store="s1")], before)
    out = only(o)
    assert out.status == "applied" and out.record is not None
    assert (out.record.store_id, out.record.seq, out.record.data) == ("s1", 1, {"a": 2})
    after = carry(before, w2)
    assert after.known_ops[("s2", "op1")].data == {"a": 1}  # store s2's row stands
    assert after.known_ops[("s1", "op1")].data == {"a": 2}
    # ...in one batch too; and each store's retry is its own duplicate.
    both = [op("op1", "CREATE", {"a": 1}, store="s2"), op("op1", "CREATE", {"a": 1})]
    o, w3 = run(both)
    assert [x.status for x in o] == ["applied", "applied"]
    assert {r.op_key for r in w3.op_records} == {("s1", "op1"), ("s2", "op1")}
    o, _ = run(both, carry(state(), w3))
    assert [x.status for x in o] == ["duplicate", "duplicate"]
    assert [x.record.store_id for x in o if x.record] == ["s2", "s1"]


def test_an_operation_that_failed_is_not_remembered() -> None:
    # Errors are answers, not log rows: the same id may be sent again and decided afresh.
    o, _w = run([op("op1", "DELETE", {}, 1), op("op2", "CREATE", {"a": 1}), op("op1", "DELETE")])
    assert [x.status for x in o] == ["error", "applied", "applied"]


# ---- BULK_UPDATE ---------------------------------------------------------------------------


def test_bulk_update_applies_every_item_under_one_seq() -> None:
    before = state(ent(1, {"s": "open", "n": 1}), seqs={STORE: 9})
    o, w = run([bulk("b1", [("e1", {"s": "paid"}, 2), ("e2", {"s": "new"}, 1)], t=3)], before)
    out = only(o)
    assert (out.id, out.status) == ("b1", "applied")
    assert out.record is not None
    assert out.record.seq == 10 and out.record.version is None
    assert (out.record.status, out.record.conflict_resolved) == ("applied", False)
    assert out.record.operation == "BULK_UPDATE"
    assert out.record.data == {
        "updates": [
            {"entity_id": "e1", "data": {"s": "paid", "n": 1}, "version": 2, "deleted": False},
            {"entity_id": "e2", "data": {"s": "new"}, "version": 1, "deleted": False},
        ]
    }
    assert [(e.key.entity_id, e.version) for e in w.entities] == [("e1", 2), ("e2", 1)]
    assert out.changed == w.entities
    assert w.last_seqs == {STORE: 10}
    assert [a.entity_id for a in w.audit] == ["e1", "e2"]
    assert {a.operation for a in w.audit} == {"BULK_UPDATE"}
    # The log row is written from the text the engine measured against ENTITY_MAX_BYTES.
    assert out.record.data_json == (
        '{"updates":[{"entity_id":"e1","data":{"s":"paid","n":1},"version":2,"deleted":false},'
        '{"entity_id":"e2","data":{"s":"new"},"version":1,"deleted":false}]}'
    )


def test_bulk_update_items_are_each_resolved_like_an_update() -> None:
    before = state(
        lww_entity(entity_id="e1"),  # v3 at t=10: the stale item at t=9 loses
        lww_entity(entity_id="e2"),
        ent(1, {"x": 1}, entity_id="e3"),
    )
    o, _w = run(
        [bulk("b1", [("e1", {"b": 0}, 2), ("e2", {"b": 0}, 4), ("e3", {"x": 2}, 2)], t=9)], before
    )
    out = only(o)
    assert out.status == "resolved"  # the most eventful item status
    assert out.record is not None
    assert out.record.conflict_resolved is True
    assert out.record.seq == 1
    assert [u["entity_id"] for u in out.record.data["updates"]] == ["e2", "e3"]


def test_bulk_update_reports_a_conflict_resolved_in_its_favour() -> None:
    before = state(lww_entity(entity_id="e1"), ent(1, {}, entity_id="e2"))
    out = only(run([bulk("b1", [("e1", {"b": 0}, 2), ("e2", {"x": 2}, 2)], t=30)], before)[0])
    assert out.status == "applied"
    assert out.record is not None and out.record.conflict_resolved is True


def test_bulk_update_that_changes_nothing_takes_no_seq() -> None:
    before = state(lww_entity(), seqs={STORE: 2})
    o, w = run([bulk("b1", [("e1", {"b": 0}, 2)], t=0)], before)
    out = only(o)
    assert (out.id, out.status) == ("b1", "resolved")
    assert out.record is not None
    assert (out.record.seq, out.record.version, out.record.data) == (None, None, {})
    assert (out.record.status, out.record.conflict_resolved) == ("resolved", True)
    assert_no_change(w, before)


def test_bulk_update_merges_products() -> None:
    out = only(
        run(
            [bulk("b1", [("e1", {"name": "X"}, 2)], entity_type="products", t=0)], state(product())
        )[0]
    )
    assert out.status == "merged"
    assert out.record is not None and out.record.data["updates"][0]["version"] == 4


def test_bulk_update_resurrects_a_tombstone_with_a_later_timestamp() -> None:
    before = state(ent(2, {"a": 1}, deleted=True, t=5))
    out = only(run([bulk("b1", [("e1", {"b": 1}, 3)], t=6)], before)[0])
    assert out.record is not None
    assert out.record.data["updates"] == [
        {"entity_id": "e1", "data": {"a": 1, "b": 1}, "version": 3, "deleted": False}
    ]


def test_bulk_update_is_not_allowed_on_manual_resolution_types() -> None:
    before = state(cash())
    o, w = run([bulk("b1", [("e1", {"amount": 1}, 3)], entity_type="cashier_operations")], before)
    out = only(o)
    assert out.status == "error" and out.id == "b1"
    assert isinstance(out.error, InvalidMessage) and out.error.code == 4006
    assert (
        out.error.reason == "BULK_UPDATE is not allowed for cashier_operations (manual resolution)"
    )
    assert_no_change(w, before)
    assert w.op_records == []


EMPTY_BULK = "BULK_UPDATE needs a non-empty data.updates list"
ITEM = "BULK_UPDATE data.updates[0]"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({}, EMPTY_BULK),
        ({"updates": []}, EMPTY_BULK),
        ({"updates": "e1"}, EMPTY_BULK),
        ({"updates": [{"entity_id": "e1", "data": {}}]}, f"{ITEM}.version must be an integer"),
        (
            {"updates": [{"entity_id": "e1", "data": [], "version": 1}]},
            f"{ITEM}.data must be an object",
        ),
        (
            {"updates": [{"data": {}, "version": 1}]},
            f"{ITEM}.entity_id must be a non-empty string",
        ),
        (
            {"updates": [{"entity_id": 5, "version": 1}]},
            f"{ITEM}.entity_id must be a non-empty string",
        ),
        ({"updates": [{"entity_id": "e1", "version": True}]}, f"{ITEM}.version must be an integer"),
        ({"updates": [None]}, f"{ITEM} is not an object"),
    ],
)
def test_malformed_bulk_update_is_error_4006(data: dict[str, Any], reason: str) -> None:
    o, w = run([op("b1", "BULK_UPDATE", data, 1)])
    out = only(o)
    assert out.status == "error" and out.error is not None and out.error.code == 4006
    assert (out.id, out.error.reason) == ("b1", reason)
    assert w.entities == [] and w.op_records == []


def test_bulk_update_item_without_data_is_an_empty_patch() -> None:
    out = only(run([op("b1", "BULK_UPDATE", {"updates": [{"entity_id": "e1", "version": 1}]})])[0])
    assert out.status == "applied"


@pytest.mark.parametrize("kind", ["CREATE", "UPDATE", "DELETE"])
def test_operation_data_that_is_not_an_object_is_error_4006(kind: str) -> None:
    bad = op("op1", kind)
    bad.data = ["not", "an", "object"]  # type: ignore[assignment]
    out = only(run([bad], state(ent(1, {"a": 1})))[0])
    assert out.status == "error" and out.error is not None and out.error.code == 4006


def test_unknown_operation_kind_is_error_4006() -> None:
    out = only(run([op("op1", "UPSERT", {"a": 1})])[0])
    assert out.status == "error" and out.error is not None and out.error.code == 4006


# ---- sequence numbers and batches ----------------------------------------------------------


def test_seqs_continue_per_store_and_only_for_changes() -> None:
    before = state(
        lww_entity(),
        cash(),
        seqs={"s1": 10, "s2": 0},
    )
    o, w = run(
        [
            op("a", "UPDATE", {"x": 1}, 4),  # s1 applied → 11
            op("b", "CREATE", {"y": 1}, store="s2"),  # s2 → 1
            op("c", "UPDATE", {"x": 2}, 2, t=0),  # s1 stale, loses: no seq
            op("a", "UPDATE", {"x": 1}, 4),  # duplicate: no seq
            op("d", "DELETE", {}, entity_id="nope"),  # error: no seq
            cash_op("e", version=1, data={"amount": 1}),  # conflict: no seq
            op("f", "UPDATE", {"x": 3}, 5),  # s1 → 12
            op("g", "CREATE", {"y": 2}, store="s3"),  # unknown store → 1
        ],
        before,
    )
    seqs = [x.record.seq if x.record else None for x in o]
    assert seqs == [11, 1, None, 11, None, None, 12, 1]
    assert [x.status for x in o] == [
        "applied",
        "applied",
        "resolved",
        "duplicate",
        "error",
        "conflict",
        "applied",
        "applied",
    ]
    assert w.last_seqs == {"s1": 12, "s2": 1, "s3": 1}


def test_items_of_a_batch_see_each_other() -> None:
    o, w = run(
        [
            op("op1", "CREATE", {"s": "open"}, 1, t=1),
            op("op2", "UPDATE", {"s": "prep"}, 2, t=2),
            op("op3", "UPDATE", {"s": "late"}, 2, t=1),  # same base as op2, older: loses
            op("op4", "UPDATE", {"s": "later"}, 2, t=3),  # same base as op2, newer: wins
            op("op5", "DELETE", {}, 4, t=4),
            op("op6", "UPDATE", {"x": 1}, 5, t=3),  # after the delete, older: resolved
            op("op7", "CREATE", {"s": "again"}, 1, t=5),
        ]
    )
    assert [x.status for x in o] == [
        "applied",
        "applied",
        "resolved",
        "applied",
        "applied",
        "resolved",
        "applied",
    ]
    assert [x.record.version if x.record else None for x in o] == [1, 2, 2, 3, 4, 4, 5]
    assert [x.record.seq if x.record else None for x in o] == [1, 2, None, 3, 4, None, 5]
    (final,) = w.entities  # one row per entity: its state after the batch
    assert final.version == 5 and final.data == {"s": "again"}
    assert len(w.audit) == 5 and len(w.op_records) == 7


def test_the_policy_table_is_configuration() -> None:
    tables = ent(3, {"a": 1, "b": 2}, entity_type="tables", t=10, fields={"a": (3, 10)})
    stale = op("op1", "UPDATE", {"b": 9}, 2, entity_type="tables", t=0)
    assert only(run([stale], state(tables))[0]).status == "resolved"  # default: lww, older loses
    merged = only(
        run([stale], state(tables), PolicyTable({"tables": {"policy": "merge_changes"}}))[0]
    )
    assert merged.status == "merged"
    assert merged.record is not None and merged.record.data == {"a": 1, "b": 9}
    manual = PolicyTable({"tables": {"policy": "manual_resolution"}})
    assert only(run([stale], state(tables), manual)[0]).status == "conflict"


def test_engine_defaults_to_the_spec_policy_table() -> None:
    assert Engine().policies["cashier_operations"] == PolicyTable()["cashier_operations"]


# ---- properties ----------------------------------------------------------------------------

STORES = ["s1", "s2"]
TYPES = ["orders", "products", "customers", "cashier_operations"]
IDS = ["e1", "e2"]
FIELDS = ["a", "b", "c"]

patches = st.dictionaries(st.sampled_from(FIELDS), st.integers(0, 3), max_size=3)


@st.composite
def operations(draw: st.DrawFn, n: int) -> Operation:
    kind = draw(st.sampled_from(["CREATE", "UPDATE", "UPDATE", "UPDATE", "DELETE", "BULK_UPDATE"]))
    store = draw(st.sampled_from([*STORES, STORES[0]]))
    entity_type = draw(st.sampled_from([*TYPES, "cashier_operations"]))
    entity_id = draw(st.sampled_from(IDS))
    data: dict[str, Any] = draw(patches)
    if kind == "BULK_UPDATE":
        ids = draw(st.lists(st.sampled_from(IDS), min_size=1, max_size=2, unique=True))
        data = {
            "updates": [
                {"entity_id": i, "data": draw(patches), "version": draw(st.integers(1, 5))}
                for i in ids
            ]
        }
    return Operation(
        id=f"op{n}",
        store_id=store,
        entity_type=entity_type,
        entity_id=entity_id,
        operation=kind,
        data=data,
        version=draw(st.integers(1, 5)),
        timestamp=ts(draw(st.integers(0, 4))),
        terminal_id=draw(st.sampled_from(["t1", "t2"])),
    )


@st.composite
def item_lists(draw: st.DrawFn, max_size: int = 25) -> list[Operation | Resolution]:
    """Operations with unique ids, and now and then a resolution of an earlier one's conflict.

    The engine itself is run along (from an empty store) only to aim resolutions at conflicts
    that are likely pending; the properties check the results independently.
    """
    items: list[Operation | Resolution] = []
    sim = state()
    for n in range(draw(st.integers(0, max_size))):
        item: Operation | Resolution
        pending = {cid: store for store, cid in sim.conflicts}
        if n and draw(st.integers(0, 4 if pending else 20)) == 0:
            ids = sorted(pending) or [conflict_id_for(f"op{m}") for m in range(n)]
            target = draw(st.sampled_from(ids))
            item = Resolution(
                conflict_id=target,
                store_id=pending[target] if target in pending else draw(st.sampled_from(STORES)),
                terminal_id="t3",
                user_id=None,
                resolution=draw(st.sampled_from(["accept_remote", "accept_local", "merge"])),
                resolved_data=draw(st.none() | patches | patches),
                timestamp=ts(draw(st.integers(0, 4))),
            )
        else:
            item = draw(operations(n))
        items.append(item)
        sim = carry(sim, Engine().decide([item], sim, NOW)[1], copy_write=False)
    return items


def split(data: st.DataObject, items: list[Any]) -> list[list[Any]]:
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(items) - 1)), max_size=len(items))))
    bounds = [0, *[c for c in cuts if c < len(items)], len(items)]
    return [items[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def decide_in_batches(
    batches: list[list[Operation | Resolution]], start: BatchState
) -> tuple[list[Outcome], BatchState]:
    outcomes: list[Outcome] = []
    current = start
    for batch in batches:
        o, w = Engine().decide(batch, current, NOW)
        outcomes.extend(o)
        current = carry(current, w)
    return outcomes, current


def comparable(out: Outcome) -> tuple[Any, ...]:
    err = (type(out.error).__name__, int(out.error.code), out.error.reason) if out.error else None
    return (out.id, out.status, out.record, out.conflict, err, out.changed)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_seqs_are_gapless_versions_count_changes_and_replays_are_duplicates(
    data: st.DataObject,
) -> None:
    items = data.draw(item_lists())
    outcomes, final = decide_in_batches(split(data, items), state())

    seqs: dict[str, list[int]] = defaultdict(list)
    versions: dict[EntityKey, list[int]] = defaultdict(list)
    for item, out in zip(items, outcomes, strict=True):
        assert out.status != "duplicate"  # every id is new in the first pass
        if out.status == "error":
            assert out.record is None and out.changed == []
            continue
        rec = out.record
        assert rec is not None
        assert (rec.seq is not None) == bool(out.changed)  # a seq exactly when state changed
        if rec.seq is not None:
            seqs[rec.store_id].append(rec.seq)
        for entity in out.changed:
            versions[entity.key].append(entity.version)
        if isinstance(item, Operation) and item.operation != "BULK_UPDATE" and out.changed:
            assert rec.version == out.changed[0].version
            assert rec.data == wire_data(out.changed[0])
            assert rec.deleted == out.changed[0].deleted
        if out.status == "conflict":
            assert out.conflict is not None and out.conflict.id == conflict_id_for(out.id)

    for store, got in seqs.items():
        assert got == list(range(1, len(got) + 1))
        assert final.last_seqs[store] == len(got)
    for entity_key, got in versions.items():
        assert got == list(range(1, len(got) + 1))
        assert final.entities[entity_key].version == len(got)
    assert set(final.entities) == set(versions)

    # Replay everything that was answered with a confirmation or a conflict.
    replay = [
        i
        for i, o in zip(items, outcomes, strict=True)
        if isinstance(i, Operation) and o.status != "error"
    ]
    again, after = decide_in_batches(split(data, replay), final)
    for item, out in zip(replay, again, strict=True):
        assert out.record == final.known_ops[item.op_key]
        if out.status == "conflict":
            assert out.conflict == final.conflicts[(item.store_id, conflict_id_for(item.id))]
        else:
            assert out.status == "duplicate"
    assert after == final
    # Resolutions replayed find nothing pending (or still the same pending conflict).
    resolutions = [i for i in items if isinstance(i, Resolution)]
    for out in Engine().decide(resolutions, final, NOW)[0]:
        assert out.status in {"error", "resolved"}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_batching_is_invisible(data: st.DataObject) -> None:
    items = data.draw(item_lists())
    start = data.draw(initial_states())
    for conflict_id in data.draw(st.lists(st.sampled_from(sorted(start.conflicts) or ["none"]))):
        pending = start.conflicts.get(conflict_id)
        settle = Resolution(
            conflict_id=conflict_id,
            store_id=pending.operation.store_id if pending else STORE,
            terminal_id="t3",
            user_id=None,
            resolution=data.draw(st.sampled_from(["accept_remote", "accept_local", "merge"])),
            resolved_data=data.draw(st.none() | patches),
            timestamp=ts(data.draw(st.integers(0, 4))),
        )
        items.insert(data.draw(st.integers(0, len(items))), settle)
    one_o, one_w = Engine().decide(items, start, NOW)
    one_final = carry(start, one_w)
    each_o, each_final = decide_in_batches([[i] for i in items], start)
    some_o, some_final = decide_in_batches(split(data, items), start)
    assert [comparable(o) for o in one_o] == [comparable(o) for o in each_o]
    assert [comparable(o) for o in one_o] == [comparable(o) for o in some_o]
    assert one_final == each_final == some_final


# ---- the engine never raises ---------------------------------------------------------------


@st.composite
def entities(draw: st.DrawFn, entity_key: EntityKey) -> Entity:
    version = draw(st.integers(1, 6))
    return Entity(
        key=entity_key,
        version=version,
        data=draw(patches),
        deleted=draw(st.booleans()),
        timestamp=ts(draw(st.integers(0, 4))),
        updated_by="t0",
        field_versions={
            f: [draw(st.integers(1, version)), ts(draw(st.integers(0, 4)))]
            for f in draw(st.sets(st.sampled_from(FIELDS)))
        },
    )


@st.composite
def initial_states(draw: st.DrawFn) -> BatchState:
    keys = [EntityKey(s, t, i) for s in STORES for t in TYPES for i in IDS]
    chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=6))
    ents = [draw(entities(k)) for k in chosen]
    # Pending conflicts of old operations (ids that item_lists never uses).
    pending: list[Conflict] = []
    known: list[OpRecord] = []
    for n, e in enumerate(e for e in ents if e.key.entity_type == "cashier_operations"):
        old = Operation(
            id=f"old{n}",
            store_id=e.key.store_id,
            entity_type=e.key.entity_type,
            entity_id=e.key.entity_id,
            operation=draw(st.sampled_from(["CREATE", "UPDATE", "DELETE"])),
            data=draw(patches),
            version=1,
            timestamp=ts(0),
            terminal_id="t9",
        )
        pending.append(Conflict(conflict_id_for(old.id), old, e.version, wire_data(e), NOW))
        known.append(
            OpRecord(
                old.id, old.store_id, old.entity_type, old.entity_id, old.operation, {},
                e.version, None, "conflict", False, "t9", None, "medium", ts(0), NOW,
            )
        )  # fmt: skip
    seqs = {s: draw(st.integers(0, 100)) for s in STORES}
    return state(*ents, known=known, conflicts=pending, seqs=seqs)


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)


@st.composite
def any_items(draw: st.DrawFn) -> list[Operation | Resolution]:
    items = draw(item_lists(max_size=15))
    extra: list[Operation | Resolution] = []
    for n in range(draw(st.integers(0, 4))):
        extra.append(
            Resolution(
                conflict_id=draw(st.sampled_from(["conflict:old0", "conflict:old1", "nope"])),
                store_id=draw(st.sampled_from(STORES)),
                terminal_id="t3",
                user_id=None,
                resolution=draw(st.sampled_from(["accept_remote", "accept_local", "merge"])),
                resolved_data=draw(st.none() | patches),
                timestamp=ts(draw(st.integers(0, 4))),
            )
        )
        extra.append(
            Operation(
                id=draw(st.sampled_from(["old0", "op0", f"x{n}"])),
                store_id=draw(st.sampled_from(STORES)),
                entity_type=draw(st.sampled_from([*TYPES, "tables", "misc"])),
                entity_id=draw(st.sampled_from(IDS)),
                operation=draw(st.sampled_from(["CREATE", "UPDATE", "DELETE", "BULK_UPDATE"])),
                data=draw(st.dictionaries(st.sampled_from([*FIELDS, "updates"]), junk)),
                version=draw(st.integers(1, 2**62)),
                timestamp=ts(draw(st.integers(0, 4))),
                terminal_id="t4",
            )
        )
    return draw(st.permutations(items + extra))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial_states(), any_items())
def test_the_engine_never_raises(start: BatchState, items: list[Operation | Resolution]) -> None:
    snapshot = copy.deepcopy(start)
    outcomes, write = Engine().decide(items, start, NOW)
    assert start == snapshot
    assert len(outcomes) == len(items)
    for out in outcomes:
        assert out.status in {"applied", "merged", "resolved", "duplicate", "conflict", "error"}
        if out.status == "error":
            assert out.error is not None and out.error.code in {4006, 4007, 4010}
        else:
            assert out.record is not None
    final = carry(start, write)
    for store, last in final.last_seqs.items():
        assert last >= start.last_seqs.get(store, 0)


@pytest.mark.parametrize(("missing", "what"), [(None, "missing"), (True, "deleted")])
def test_a_restricted_bulk_update_of_an_entity_not_there_changes_nothing(
    missing: bool | None, what: str
) -> None:
    """A terminal that may only change existing entities (a kitchen display) sends a
    BULK_UPDATE whose second item is missing or deleted: 4008 naming it, none of it written,
    and the next operation of the batch still sees every entity as it was."""
    entities = [ent(1, {"s": "new"}), ent(3, {"s": "new"}, entity_id="e3")]
    if missing:
        entities.append(ent(2, {}, entity_id="e2", deleted=True))
    before = state(*entities)
    restricted = dataclasses.replace(
        bulk("b1", [("e1", {"s": "cooking"}, 2), ("e2", {"s": "cooking"}, 2)]),
        terminal_id="kds-1",
        existing_only=True,
    )
    o, w = run([restricted, op("u1", data={"s": "ready"}, version=4, entity_id="e3")], before)
    assert o[0].status == "error" and o[0].error is not None and o[0].id == "b1"
    assert o[0].error.code == Code.PERMISSION_DENIED
    assert o[0].error.reason == (
        f"kds-1 may only change existing orders: orders/e2 is {what} "
        "(no CREATE, upsert or undelete)"
    )
    assert o[1].status == "applied" and o[1].record is not None
    assert [(e.key.entity_id, e.version, e.data) for e in w.entities] == [("e3", 4, {"s": "ready"})]
    assert [a.operation_id for a in w.audit] == ["u1"]


# ---- the reasons a terminal reads ----------------------------------------------------------


def test_refused_operations_say_why_exactly() -> None:
    before = state(ent(1, {"a": 1}), seqs={STORE: 1})
    listed: Any = [1]  # what a decoded message may hold where an object belongs
    not_an_object = dataclasses.replace(op("x2", "UPDATE", {}, 2), data=listed)
    o, w = run(
        [
            op("x1", "MERGE", {"a": 2}, 2),
            not_an_object,
            op("x3", "DELETE", {}, 1, entity_id="gone"),
        ],
        before,
    )
    assert [(out.status, out.error.reason if out.error else None) for out in o] == [
        ("error", "unknown operation 'MERGE'"),
        ("error", "operation data must be an object"),
        ("error", "orders/gone does not exist"),
    ]
    assert_no_change(w, before)


def test_refused_resolutions_say_why_exactly() -> None:
    o, _ = run(
        [
            resolution("conflict:nope", "accept_remote"),
            resolution("conflict:op1", "ignore"),
            resolution("conflict:op1", "merge", None),
        ],
        conflicted(),
    )
    assert [(out.id, out.error.reason if out.error else None) for out in o] == [
        ("conflict:nope", "no pending conflict 'conflict:nope'"),
        ("op1", "unknown resolution 'ignore'"),
        ("op1", "merge needs resolved_data"),
    ]


def test_what_is_left_unchanged_is_logged_with_no_data() -> None:
    """A conflict and a lost last-write-wins write change nothing: their log rows hold no data
    (the confirmation carries none), and a resolution is audited as one."""
    conflict = only(run([cash_op()], state(cash(version=3)))[0])
    assert conflict.status == "conflict" and conflict.record is not None
    assert (conflict.record.data, conflict.record.conflict_resolved) == ({}, False)
    assert conflict.record.deleted is False
    stale = only(run([op("op1", "UPDATE", {"b": 0}, 2, t=0)], state(lww_entity()))[0])
    assert stale.status == "resolved" and stale.record is not None
    assert (stale.record.data, stale.record.conflict_resolved) == ({}, True)
    kept = only(run([resolution("conflict:op1", "accept_remote")], conflicted())[0])
    assert kept.record is not None
    assert (kept.record.data, kept.record.conflict_resolved) == ({}, True)
    outcomes, w = run([resolution("conflict:op1", "merge", {"amount": 7})], conflicted())
    merged = only(outcomes)
    assert merged.record is not None and merged.record.conflict_resolved is True
    assert [(a.sync_status, a.conflict_resolved) for a in w.audit] == [("resolved", True)]
    # A merge is a whole new state: the field it leaves out ("note") changed too.
    assert set(w.entities[0].field_versions) == {"amount", "note"}

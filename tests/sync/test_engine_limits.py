"""The engine's bounds on what one operation may do (docs/protocol.md §7.5, §11): an entity's
state never passes ENTITY_MAX_BYTES, a terminal that may only change existing entities cannot
create, upsert or undelete one, and the audit records the connection's identity with what the
terminal claimed beside it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chefia_rt.config import load_settings
from chefia_rt.domain import BatchState, BatchWrite, Operation, Resolution
from chefia_rt.errors import Code, ConfigError
from chefia_rt.store.rows import audit_changes, audit_changes_json
from chefia_rt.sync.engine import Engine, Outcome, compact_json, state_bytes
from tests.sync.test_engine import (
    NOW,
    STORE,
    assert_answers_name_their_items,
    bulk,
    carry,
    conflicted,
    ent,
    op,
    resolution,
    state,
)

LIMIT = 2_000
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def run(
    items: list[Operation | Resolution], before: BatchState, limit: int = LIMIT
) -> tuple[list[Outcome], BatchWrite]:
    outcomes, write = Engine(None, limit).decide(items, before, NOW)
    assert_answers_name_their_items(items, outcomes)
    return outcomes, write


def filler(size: int) -> dict[str, Any]:
    """A patch of about `size` bytes of compact JSON."""
    return {"notes": "x" * size}


def assert_nothing_written(write: BatchWrite, before: BatchState) -> None:
    assert write.entities == [] and write.audit == [] and write.op_records == []
    assert write.new_conflicts == [] and write.settled_records == []
    assert write.last_seqs == before.last_seqs


def test_state_bytes_is_the_compact_utf8_json() -> None:
    assert state_bytes({"a": 1}) == len(b'{"a":1}')
    assert state_bytes({"n": "ç"}) == len('{"n":"ç"}'.encode())


def test_a_create_past_the_limit_is_refused_and_changes_nothing() -> None:
    before = state()
    (out,), w = run([op("op1", "CREATE", filler(LIMIT))], before)
    assert out.status == "error" and out.error is not None
    assert out.error.code == Code.INVALID_MESSAGE
    assert "ENTITY_MAX_BYTES" in out.error.reason
    assert_nothing_written(w, before)
    (ok,), _ = run([op("op1", "CREATE", filler(LIMIT - 20))], before)
    assert ok.status == "applied"


def test_small_update_patches_cannot_grow_an_entity_past_the_limit() -> None:
    """The issue's case: patches merge, so each small UPDATE adds to the whole state."""
    current = state(seqs={STORE: 0})
    applied = 0
    for n in range(20):
        patch = {f"f{n}": "y" * 300}
        (out,), w = run([op(f"op{n}", "UPDATE", patch, applied + 1)], current)
        if out.status == "error":
            assert out.error is not None and out.error.code == Code.INVALID_MESSAGE
            assert_nothing_written(w, current)
            break
        applied += 1
        current = carry(current, w)
        (entity,) = w.entities
        assert state_bytes(entity.data) <= LIMIT
        (record,) = w.op_records
        assert state_bytes(record.data) <= LIMIT  # the log row holds the state: bounded too
    else:
        pytest.fail("the entity grew without bound")
    assert applied == 6  # 6 fields of ~310 bytes fit in 2000, the 7th does not


def test_a_bulk_update_with_one_item_past_the_limit_changes_nothing() -> None:
    before = state(ent(1, {"a": 1}, entity_id="e1"), ent(1, {"b": 1}, entity_id="e2"))
    items = [("e1", {"a": 2}, 2), ("e2", filler(LIMIT), 2)]
    (out,), w = run([bulk("b1", items)], before)
    assert out.status == "error" and out.error is not None and out.id == "b1"
    assert out.error.code == Code.INVALID_MESSAGE and "e2" in out.error.reason
    assert_nothing_written(w, before)
    # The batch goes on as if the bulk had never been there.
    (refused, later), w2 = run([bulk("b1", items), op("op2", "UPDATE", {"a": 3}, 2)], before)
    assert (refused.status, later.status) == ("error", "applied")
    assert [e.data for e in w2.entities] == [{"a": 3}] and len(w2.audit) == 1


def test_a_bulk_update_logs_no_more_than_one_entity_may_hold() -> None:
    """Each item fits, but together they would make one log row (and one push) past the
    limit: refused whole, so an operation's log row is bounded whatever its item count."""
    before = state(*(ent(1, {"a": 1}, entity_id=f"e{i}") for i in range(4)))
    items = [(f"e{i}", filler(LIMIT // 3), 2) for i in range(4)]
    (out,), w = run([bulk("b1", items)], before)
    assert out.status == "error" and out.error is not None and out.id == "b1"
    assert out.error.code == Code.INVALID_MESSAGE and "split it" in out.error.reason
    assert_nothing_written(w, before)
    (fits,), _ = run([bulk("b2", items[:2])], before)
    assert fits.status == "applied" and fits.record is not None
    assert state_bytes(fits.record.data) <= LIMIT
    # A log row of exactly ENTITY_MAX_BYTES is allowed, one byte more is not.
    size = state_bytes(fits.record.data)
    (exact,), _ = run([bulk("b2", items[:2])], before, size)
    (over,), _ = run([bulk("b2", items[:2])], before, size - 1)
    assert (exact.status, over.status) == ("applied", "error")


def test_a_merge_resolution_past_the_limit_keeps_the_conflict_pending() -> None:
    before = conflicted()
    res = resolution("conflict:op1", "merge", filler(LIMIT))
    (out,), w = run([res], before)
    assert out.status == "error" and out.error is not None
    assert out.error.code == Code.INVALID_MESSAGE and "pending" in out.error.reason
    assert w.settled_conflicts == [] and w.entities == []
    (ok,), w2 = run([resolution("conflict:op1", "merge", {"amount": 1})], before)
    assert ok.status == "resolved" and w2.settled_records == [ok.record]


def test_a_delete_of_an_entity_over_a_lowered_limit_is_allowed() -> None:
    before = state(ent(1, filler(LIMIT * 2)), seqs={STORE: 1})
    (out,), w = run([op("op1", "DELETE", {}, 2)], before)
    assert out.status == "applied" and w.entities[0].deleted


# ---- terminals that may only change existing entities (kds) ---------------------------------


def existing_only(operation: Operation) -> Operation:
    return dataclasses.replace(operation, existing_only=True)


@pytest.mark.parametrize(
    ("entities", "item"),
    [
        ((), op("k1", "CREATE", {"status": "ready"})),
        ((ent(1, {"status": "new"}),), op("k1", "CREATE", {"status": "ready"}, 2)),
        ((), op("k1", "UPDATE", {"status": "ready"})),  # an upsert
        ((ent(2, {"status": "new"}, deleted=True),), op("k1", "UPDATE", {"status": "ready"}, 3)),
        ((ent(2, {"status": "new"}, deleted=True),), op("k1", "UPDATE", {"status": "x"}, 1, t=99)),
    ],
    ids=["create", "create-over-live", "upsert", "undelete", "undelete-stale-later"],
)
def test_an_existing_only_terminal_cannot_create_upsert_or_undelete(
    entities: tuple[Any, ...], item: Operation
) -> None:
    before = state(*entities, seqs={STORE: 2})
    (out,), w = run([existing_only(item)], before)
    assert out.status == "error" and out.error is not None
    assert out.error.code == Code.PERMISSION_DENIED
    assert_nothing_written(w, before)


@pytest.mark.parametrize(
    ("entities", "item", "what"),
    [
        ((), op("k1", "CREATE", {"status": "ready"}), "missing"),
        ((ent(1, {"status": "new"}),), op("k1", "CREATE", {"status": "ready"}, 2), "live"),
        ((ent(2, {}, deleted=True),), op("k1", "UPDATE", {"status": "ready"}, 3), "deleted"),
    ],
    ids=["missing", "live", "deleted"],
)
def test_an_existing_only_refusal_says_what_the_entity_is(
    entities: tuple[Any, ...], item: Operation, what: str
) -> None:
    (out,), _ = run(
        [dataclasses.replace(existing_only(item), terminal_id="kds-1")], state(*entities)
    )
    assert out.error is not None and out.error.reason == (
        f"kds-1 may only change existing orders: orders/e1 is {what} "
        "(no CREATE, upsert or undelete)"
    )


def test_an_existing_only_terminal_deletes_like_any_other() -> None:
    """A DELETE never creates: of a missing entity it is not found (4007), not refused (4008)."""
    (out,), _ = run([existing_only(op("k1", "DELETE", {}, 1))], state())
    assert out.error is not None and out.error.code == Code.ENTITY_NOT_FOUND
    tomb = state(ent(2, {"status": "new"}, deleted=True))
    (again,), _ = run([existing_only(op("k1", "DELETE", {}, 3))], tomb)
    assert again.status == "resolved"


def test_an_existing_only_terminal_updates_what_exists() -> None:
    before = state(ent(1, {"status": "new", "total": 5}), seqs={STORE: 1})
    (out,), w = run([existing_only(op("k1", "UPDATE", {"status": "ready"}, 2))], before)
    assert out.status == "applied"
    assert w.entities[0].data == {"status": "ready", "total": 5}


def test_an_existing_only_bulk_update_with_a_missing_item_changes_nothing() -> None:
    before = state(ent(1, {"status": "new"}, entity_id="e1"), seqs={STORE: 1})
    item = existing_only(bulk("b1", [("e1", {"status": "x"}, 2), ("e9", {"status": "x"}, 1)]))
    (out,), w = run([item], before)
    assert out.status == "error" and out.error is not None
    assert out.error.code == Code.PERMISSION_DENIED and "e9" in out.error.reason
    assert_nothing_written(w, before)


# ---- who the audit names ----------------------------------------------------------------------


def test_the_audit_keeps_the_identity_and_the_claim_apart() -> None:
    item = dataclasses.replace(
        op("op1", "CREATE", {"a": 1}, user="token-user"), claimed_user_id="boss"
    )
    (out,), w = run([item], state())
    (audit,) = w.audit
    assert (audit.user_id, audit.claimed_user_id) == ("token-user", "boss")
    assert out.record is not None and out.record.user_id == "token-user"


def test_a_bulk_update_audits_every_item_as_the_connection_that_sent_it() -> None:
    """Each item of a BULK_UPDATE is a change of its own entity: its audit row names the
    operation, the terminal and the token's user beside the claimed one, and carries the text
    storage writes (as one UPDATE's would)."""
    before = state(ent(1, {"a": 1}, entity_id="e1"))
    item = dataclasses.replace(
        bulk("b1", [("e1", {"a": 2}, 2), ("e2", {"nome": "Açaí"}, 1)]),
        terminal_id="pos-7",
        user_id="token-user",
        claimed_user_id="boss",
    )
    (out,), w = run([item], before)
    assert out.status == "applied"
    assert [
        (a.entity_id, a.operation_id, a.terminal_id, a.user_id, a.claimed_user_id) for a in w.audit
    ] == [
        ("e1", "b1", "pos-7", "token-user", "boss"),
        ("e2", "b1", "pos-7", "token-user", "boss"),
    ]
    assert [(e.updated_by, e.updated_at, e.data_json) for e in w.entities] == [
        ("pos-7", NOW, '{"a":2}'),
        ("pos-7", NOW, '{"nome":"Açaí"}'),
    ]
    assert [(a.before, a.after_json) for a in w.audit] == [
        ({"a": 1}, '{"a":2}'),
        (None, '{"nome":"Açaí"}'),
    ]


def test_entity_max_bytes_must_leave_room_in_a_message() -> None:
    assert load_settings(entity_max_bytes=262_144).entity_max_bytes == 262_144
    with pytest.raises(ConfigError, match="ENTITY_MAX_BYTES"):
        load_settings(entity_max_bytes=600_000)  # over half of MAX_WS_MESSAGE_SIZE (1 MiB)
    assert load_settings(entity_max_bytes=600_000, max_ws_message_size=2_000_000)
    # Lowering only MAX_WS_MESSAGE_SIZE lowers the default with it.
    assert load_settings(max_ws_message_size=4096).entity_max_bytes == 2048


# ---- the text measured is the text written --------------------------------------------------


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES)
def test_compact_json_is_json_dumps_compact(value: Any) -> None:
    assert compact_json(value) == dumps(value)
    assert state_bytes({"v": value}) == len(dumps({"v": value}).encode())


def assert_texts_are_the_encodings(write: BatchWrite) -> int:
    """Every JSON text the engine hands storage is exactly the encoding of what it stands for
    (storage writes the text instead of encoding again); returns how many texts there were."""
    texts = 0
    for entity in write.entities:
        if entity.data_json is not None:
            assert entity.data_json == dumps(entity.data)
            texts += 1
    for record in [*write.op_records, *write.settled_records]:
        if record.data_json is not None:
            assert record.data_json == dumps(record.data)
            texts += 1
    for audit in write.audit:
        for text, value in ((audit.before_json, audit.before), (audit.after_json, audit.after)):
            if text is not None:
                assert text == dumps(value)
                texts += 1
        assert audit_changes_json(audit) == dumps(
            audit_changes(audit.before, audit.after, audit.claimed_user_id)
        )
    return texts


def test_every_change_carries_the_text_of_its_state() -> None:
    unicode = {"nome": "Açaí 🍧", "obs": 'sem "cebola"\n', "n": 1.5, "l": [None, True]}
    before = state(seqs={STORE: 0})
    batches: list[list[Operation | Resolution]] = [
        [op("c1", "CREATE", unicode), op("c2", "CREATE", {"a": 1}, entity_id="e2")],
        [op("u1", "UPDATE", {"nome": "Pão"}, 2), op("u2", "UPDATE", {"b": [1]}, 2, entity_id="e2")],
        [bulk("b1", [("e1", {"x": "ç"}, 3), ("e2", {"y": {}}, 3)])],
        [op("d1", "DELETE", {}, 4, entity_id="e2")],
        [op("r1", "UPDATE", {"back": True}, 5, entity_id="e2", user="someone")],
    ]
    texts = 0
    for items in batches:
        outcomes, write = run(items, before, 100_000)
        assert all(o.status != "error" for o in outcomes), outcomes
        texts += assert_texts_are_the_encodings(write)
        before = carry(before, write)
    # Every state above has its text, not only checked when present: 7 entities (a tombstone has
    # none), 7 log rows (a delete's is "{}"), 12 audit sides (none before a create or after a
    # delete).
    assert texts == 26


def test_a_resolution_carries_the_text_of_its_state() -> None:
    for kind, resolved in (("merge", {"amount": 7, "nota": "ç"}), ("accept_local", None)):
        before = conflicted()
        (out,), write = run([resolution("conflict:op1", kind, resolved)], before)
        assert out.status == "resolved"
        assert assert_texts_are_the_encodings(write) == 3  # the entity, its log row, its audit


# ---- the reasons a terminal reads ----------------------------------------------------------


def test_a_state_at_the_limit_is_allowed_and_one_byte_more_is_not() -> None:
    assert state_bytes(filler(LIMIT - 12)) == LIMIT  # {"notes":""} is 12 bytes
    (at,), _ = run([op("op1", "CREATE", filler(LIMIT - 12))], state())
    (over,), _ = run([op("op1", "CREATE", filler(LIMIT - 11))], state())
    assert (at.status, over.status) == ("applied", "error")
    assert over.error is not None and over.error.reason == (
        f"orders state would be {LIMIT + 1} bytes, over ENTITY_MAX_BYTES ({LIMIT}); nothing changed"
    )


def test_a_state_past_the_limit_is_named_by_what_refused_it() -> None:
    """The same refusal, prefixed by the BULK_UPDATE item it came from, or followed by what
    becomes of the conflict a resolution was to settle."""
    big = filler(LIMIT)
    before = state(ent(1, {"a": 1}, entity_id="e1"), ent(1, {"b": 1}, entity_id="e2"))
    (item,), _ = run([bulk("b1", [("e1", {"a": 2}, 2), ("e2", big, 2)])], before)
    size = state_bytes({"b": 1, **big})
    assert item.error is not None and item.error.reason == (
        f"BULK_UPDATE e2: orders state would be {size} bytes, over ENTITY_MAX_BYTES ({LIMIT}); "
        "nothing changed"
    )
    (res,), _ = run([resolution("conflict:op1", "merge", big)], conflicted())
    assert res.error is not None and res.error.reason == (
        f"cashier_operations state would be {state_bytes(big)} bytes, over ENTITY_MAX_BYTES "
        f"({LIMIT}); nothing changed; the conflict stays pending"
    )

"""Message models and validation (docs/protocol.md §4, §8 locks, §10 bad input), without an event
loop."""

from __future__ import annotations

import contextlib
import json
import re
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chefia_rt.errors import Code, InvalidMessage
from chefia_rt.protocol.codec import decode_frame, encode_json, encode_msgpack
from chefia_rt.protocol.messages import (
    INCOMING_TYPES,
    MAX_BULK_UPDATES,
    MAX_LOCK_TIMEOUT_MS,
    TERMINAL_ID_RE,
    AcquireLockIn,
    BulkItem,
    ConflictResolutionIn,
    DataSyncIn,
    ErrorMessage,
    OpKind,
    PerformanceMetricsIn,
    PingIn,
    Pong,
    Priority,
    RefreshTokenIn,
    ReleaseLockIn,
    ResolutionKind,
    ResumeIn,
    SnapshotRequestIn,
    SyncConfirmationIn,
    SyncError,
    TokenRefreshed,
    client_time,
    error_msg,
    format_timestamp,
    normalize_timestamp,
    parse_incoming,
    pong_msg,
    sync_error_msg,
    token_refreshed_msg,
    utc_now_iso,
)

CANONICAL = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z\Z")

# docs/protocol.md §4.1, verbatim.
DOC_DATA_SYNC = """{"type": "data_sync",
 "operation": {"id": "op-123456", "entity_type": "orders", "entity_id": "order-789",
   "operation": "UPDATE", "data": {"status": "preparing", "items": []}, "version": 2,
   "timestamp": "2024-01-15T10:30:00.000Z", "terminal_id": "pos-001", "user_id": "u1",
   "requires_lock": true, "priority": "high"}}"""


def operation(**fields: Any) -> dict[str, Any]:
    op: dict[str, Any] = {
        "id": "op-1",
        "entity_type": "orders",
        "entity_id": "order-1",
        "operation": "UPDATE",
        "data": {"status": "ready"},
        "version": 2,
        "timestamp": "2024-01-15T10:30:00.000Z",
    }
    op.update(fields)
    return {key: value for key, value in op.items() if value is not DROP}


DROP: Any = object()


def data_sync(**fields: Any) -> dict[str, Any]:
    return {"type": "data_sync", "operation": operation(**fields)}


def rejected(raw: Any) -> str:
    with pytest.raises(InvalidMessage) as info:
        parse_incoming(raw)
    assert info.value.code == Code.INVALID_MESSAGE
    assert int(info.value.code) == 4006
    return info.value.reason


# ---- every client message of docs/protocol.md §4 -------------------------------------------


def test_incoming_types_are_the_client_messages_of_the_spec() -> None:
    spec = {
        "data_sync",
        "sync_confirmation",
        "conflict_resolution",
        "acquire_lock",
        "release_lock",
        "ping",
        "resume",
        "snapshot_request",
        "performance_metrics",
        "refresh_token",
    }
    assert spec == INCOMING_TYPES


@pytest.mark.parametrize("frame", [DOC_DATA_SYNC, msgpack.packb(json.loads(DOC_DATA_SYNC))])
def test_spec_data_sync_example_parses(frame: str | bytes) -> None:
    (raw,) = decode_frame(frame, 1 << 20)
    message = parse_incoming(raw)
    assert isinstance(message, DataSyncIn)
    op = message.operation
    assert op.id == "op-123456"
    assert op.entity_type == "orders"
    assert op.entity_id == "order-789"
    assert op.operation is OpKind.UPDATE
    assert op.data == {"status": "preparing", "items": []}
    assert op.version == 2
    assert op.timestamp == "2024-01-15T10:30:00.000000Z"
    assert op.terminal_id == "pos-001"
    assert op.user_id == "u1"
    assert op.requires_lock is True
    assert op.priority is Priority.HIGH


@pytest.mark.parametrize("kind", list(OpKind))
@pytest.mark.parametrize("priority", list(Priority))
def test_every_operation_kind_and_priority(kind: OpKind, priority: Priority) -> None:
    message = parse_incoming(data_sync(operation=kind.value, priority=priority.value))
    assert isinstance(message, DataSyncIn)
    assert message.operation.operation is kind
    assert message.operation.priority is priority


def test_operation_defaults() -> None:
    raw = data_sync(data=DROP, timestamp=DROP)
    op = parse_incoming(raw).operation  # type: ignore[union-attr]
    assert op.data == {}
    assert op.timestamp is None
    assert op.requires_lock is False
    assert op.priority is Priority.MEDIUM
    assert op.user_id is None


def test_unknown_fields_are_ignored() -> None:
    raw = data_sync(client_build="7.2.1")
    raw["trace"] = {"span": 1}
    message = parse_incoming(raw)
    assert isinstance(message, DataSyncIn)
    assert not hasattr(message.operation, "client_build")


CLIENT_MESSAGES: list[tuple[dict[str, Any], type, dict[str, Any]]] = [
    (
        {"type": "sync_confirmation", "operation_id": "op-9", "seq": 41},
        SyncConfirmationIn,
        {"operation_id": "op-9", "seq": 41},
    ),
    ({"type": "sync_confirmation", "operation_id": "op-9"}, SyncConfirmationIn, {"seq": None}),
    (
        {
            "type": "conflict_resolution",
            "conflict_id": "c-17",
            "resolution": "merge",
            "resolved_data": {"amount": 120.5, "note": "recounted"},
            "timestamp": "2024-01-15T10:31:00+01:00",
        },
        ConflictResolutionIn,
        {
            "resolution": ResolutionKind.MERGE,
            "resolved_data": {"amount": 120.5, "note": "recounted"},
            "timestamp": "2024-01-15T09:31:00.000000Z",
        },
    ),
    (
        {"type": "conflict_resolution", "conflict_id": "c-1", "resolution": "accept_remote"},
        ConflictResolutionIn,
        {"resolution": ResolutionKind.ACCEPT_REMOTE, "resolved_data": None},
    ),
    (
        {"type": "conflict_resolution", "conflict_id": "c-1", "resolution": "accept_local"},
        ConflictResolutionIn,
        {"resolution": ResolutionKind.ACCEPT_LOCAL},
    ),
    (
        {
            "type": "acquire_lock",
            "entity_type": "orders",
            "entity_id": "order-789",
            "timeout": 15000,
            "lock_id": "lk-1",
        },
        AcquireLockIn,
        {"entity_id": "order-789", "timeout": 15000, "lock_id": "lk-1"},
    ),
    (
        {"type": "acquire_lock", "entity_type": "cashier_operations", "entity_id": "drawer-2"},
        AcquireLockIn,
        {"timeout": 30_000, "lock_id": None},
    ),
    (
        {"type": "release_lock", "entity_type": "orders", "entity_id": "o-1", "lock_id": "lk-1"},
        ReleaseLockIn,
        {"lock_id": "lk-1"},
    ),
    (
        {"type": "ping", "timestamp": "2024-01-15T10:30:00.000Z"},
        PingIn,
        {"timestamp": "2024-01-15T10:30:00.000Z"},  # echoed as sent, not normalised
    ),
    ({"type": "ping", "timestamp": 1705314600000}, PingIn, {"timestamp": 1705314600000}),
    ({"type": "ping"}, PingIn, {"timestamp": None}),
    ({"type": "resume", "since": 0}, ResumeIn, {"since": 0}),
    ({"type": "resume", "since": 123456}, ResumeIn, {"since": 123456}),
    ({"type": "snapshot_request"}, SnapshotRequestIn, {"entity_types": None}),
    (
        {"type": "snapshot_request", "entity_types": ["orders", "tables"]},
        SnapshotRequestIn,
        {"entity_types": ["orders", "tables"]},
    ),
    (
        {
            "type": "performance_metrics",
            "response_time": 42.5,
            "memory_usage": 61,
            "cache_hit_rate": 0.93,
            "app_version": "3.1.0",
        },
        PerformanceMetricsIn,
        {"response_time": 42.5, "memory_usage": 61.0, "cache_hit_rate": 0.93},
    ),
    ({"type": "performance_metrics"}, PerformanceMetricsIn, {"response_time": None}),
    ({"type": "refresh_token", "token": "eyJ.x.y"}, RefreshTokenIn, {"token": "eyJ.x.y"}),
]


@pytest.mark.parametrize(("raw", "model", "expected"), CLIENT_MESSAGES)
def test_client_messages_parse(raw: dict[str, Any], model: type, expected: dict[str, Any]) -> None:
    # Through both wire encodings, as the server would see them.
    for frame in (encode_json(raw), encode_msgpack(raw)):
        (decoded,) = decode_frame(frame, 1 << 20)
        message = parse_incoming(decoded)
        assert type(message) is model
        assert message.type == raw["type"]
        for name, value in expected.items():
            assert getattr(message, name) == value


def test_every_client_type_is_covered_here() -> None:
    covered = {raw["type"] for raw, _, _ in CLIENT_MESSAGES} | {"data_sync"}
    assert covered == INCOMING_TYPES


def test_performance_metrics_keeps_extra_fields_for_the_monitor() -> None:
    message = parse_incoming({"type": "performance_metrics", "fps": 60, "response_time": 3})
    assert isinstance(message, PerformanceMetricsIn)
    assert message.model_extra == {"fps": 60}


def test_parsed_messages_are_frozen() -> None:
    message = parse_incoming(data_sync())
    with pytest.raises(ValueError):
        message.type = "ping"


# ---- rejections ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"type": None},
        {"type": "launch_missiles"},
        {"type": "DATA_SYNC"},
        {"type": "data_sync "},
        {"type": ["data_sync"]},
        {"type": {"name": "data_sync"}},
        {"type": 1},
        {"type": True},
        {"type": b"data_sync"},
        # server -> client types are not accepted from a client
        {"type": "pong", "server_time": "x"},
        {"type": "sync_error"},
        {"type": "connection_established"},
        {"type": "message_batch", "messages": []},
        {"type": "lock_acquired"},
    ],
)
def test_unknown_types_are_rejected(raw: dict[str, Any]) -> None:
    assert "unknown message type" in rejected(raw)


def test_unknown_type_reason_is_clipped() -> None:
    assert len(rejected({"type": "x" * 100_000})) < 120


@pytest.mark.parametrize("raw", [None, [], "data_sync", 1, [("type", "ping")]])
def test_non_objects_are_rejected(raw: Any) -> None:
    assert "object" in rejected(raw)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"type": "data_sync"}, "operation"),
        ({"type": "data_sync", "operation": None}, "operation"),
        ({"type": "data_sync", "operation": []}, "operation"),
        (data_sync(id=DROP), "operation.id"),
        (data_sync(id=""), "operation.id"),
        (data_sync(id="x" * 129), "operation.id"),
        (data_sync(id=7), "operation.id"),
        (data_sync(entity_type=DROP), "operation.entity_type"),
        (data_sync(entity_type="orders; drop table"), "operation.entity_type"),
        (data_sync(entity_type="orders\n"), "operation.entity_type"),
        (data_sync(entity_type="o" * 65), "operation.entity_type"),
        (data_sync(entity_type=""), "operation.entity_type"),
        (data_sync(entity_id=""), "operation.entity_id"),
        (data_sync(entity_id="e" * 129), "operation.entity_id"),
        (data_sync(entity_id=None), "operation.entity_id"),
        (data_sync(operation="PATCH"), "operation.operation"),
        (data_sync(operation="update"), "operation.operation"),
        (data_sync(operation=DROP), "operation.operation"),
        (data_sync(version=DROP), "operation.version"),
        (data_sync(version=0), "operation.version"),
        (data_sync(version=-1), "operation.version"),
        (data_sync(version=2**62), "operation.version"),
        (data_sync(version=2.5), "operation.version"),
        (data_sync(version=2.0), "operation.version"),
        (data_sync(version="2"), "operation.version"),
        (data_sync(version=True), "operation.version"),
        (data_sync(version=None), "operation.version"),
        (data_sync(data=["not", "a", "map"]), "operation.data"),
        (data_sync(data="x"), "operation.data"),
        (data_sync(timestamp="yesterday"), "operation.timestamp"),
        (data_sync(timestamp=""), "operation.timestamp"),
        (data_sync(timestamp="2024-13-01T00:00:00Z"), "operation.timestamp"),
        (data_sync(timestamp="0001-01-01T00:00:00+01:00"), "operation.timestamp"),
        (data_sync(timestamp="9999-12-31T23:59:59-01:00"), "operation.timestamp"),
        (data_sync(timestamp=1705314600), "operation.timestamp"),
        (data_sync(timestamp="2024-01-15T10:30:00Z" + " " * 60), "operation.timestamp"),
        (data_sync(user_id="u" * 129), "operation.user_id"),
        (data_sync(terminal_id="t" * 5000), "operation.terminal_id"),
        (data_sync(requires_lock="yes"), "operation.requires_lock"),
        (data_sync(requires_lock="false"), "operation.requires_lock"),
        (data_sync(requires_lock=1), "operation.requires_lock"),
        (data_sync(priority="urgent"), "operation.priority"),
        (data_sync(priority="HIGH"), "operation.priority"),
        ({"type": "sync_confirmation"}, "operation_id"),
        ({"type": "sync_confirmation", "operation_id": ""}, "operation_id"),
        ({"type": "sync_confirmation", "operation_id": "o", "seq": "4"}, "seq"),
        ({"type": "conflict_resolution", "resolution": "merge"}, "conflict_id"),
        ({"type": "conflict_resolution", "conflict_id": "c", "resolution": "ignore"}, "resolution"),
        ({"type": "conflict_resolution", "conflict_id": "c"}, "resolution"),
        (
            {
                "type": "conflict_resolution",
                "conflict_id": "c",
                "resolution": "merge",
                "resolved_data": [1],
            },
            "resolved_data",
        ),
        ({"type": "acquire_lock", "entity_id": "o-1"}, "entity_type"),
        ({"type": "acquire_lock", "entity_type": "orders"}, "entity_id"),
        ({"type": "release_lock", "entity_type": "orders"}, "entity_id"),
        ({"type": "release_lock", "entity_type": "bad type", "entity_id": "x"}, "entity_type"),
        ({"type": "resume"}, "since"),
        ({"type": "resume", "since": -1}, "since"),
        ({"type": "resume", "since": "5"}, "since"),
        ({"type": "resume", "since": 5.0}, "since"),
        ({"type": "snapshot_request", "entity_types": "orders"}, "entity_types"),
        ({"type": "snapshot_request", "entity_types": ["ok", "not ok"]}, "entity_types.1"),
        ({"type": "performance_metrics", "response_time": -1}, "response_time"),
        ({"type": "performance_metrics", "response_time": "fast"}, "response_time"),
        ({"type": "performance_metrics", "response_time": True}, "response_time"),
        ({"type": "performance_metrics", "response_time": float("inf")}, "response_time"),
        ({"type": "performance_metrics", "memory_usage": float("nan")}, "memory_usage"),
        ({"type": "performance_metrics", "cache_hit_rate": 1.5}, "cache_hit_rate"),
        ({"type": "performance_metrics", "cache_hit_rate": -0.1}, "cache_hit_rate"),
    ],
)
def test_schema_violations_name_the_field(raw: dict[str, Any], field: str) -> None:
    reason = rejected(raw)
    assert reason.startswith(f"invalid {raw['type']}: ")
    assert f"{raw['type']}.{field}" in reason


# ---- timestamps ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_", "canonical"),
    [
        ("2024-01-15T10:30:00.000Z", "2024-01-15T10:30:00.000000Z"),
        ("2024-01-15T10:30:00Z", "2024-01-15T10:30:00.000000Z"),
        ("2024-01-15T10:30:00.123456Z", "2024-01-15T10:30:00.123456Z"),
        ("2024-01-15T10:30:00.5+00:00", "2024-01-15T10:30:00.500000Z"),
        ("2024-01-15T10:30:00", "2024-01-15T10:30:00.000000Z"),  # naive is UTC
        ("2024-01-15T10:30:00.250", "2024-01-15T10:30:00.250000Z"),
        ("2024-01-15 10:30:00", "2024-01-15T10:30:00.000000Z"),
        ("2024-01-15T12:30:00+02:00", "2024-01-15T10:30:00.000000Z"),
        ("2024-01-15T05:30:00-05:00", "2024-01-15T10:30:00.000000Z"),
        ("2024-01-15T16:00:00+05:30", "2024-01-15T10:30:00.000000Z"),
        ("2024-01-01T01:00:00+02:00", "2023-12-31T23:00:00.000000Z"),
        ("2024-12-31T23:30:00-01:00", "2025-01-01T00:30:00.000000Z"),
        ("2024-02-29T12:00:00Z", "2024-02-29T12:00:00.000000Z"),
        ("2024-01-15", "2024-01-15T00:00:00.000000Z"),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000000Z"),  # zero-padded, still sortable
        ("0999-06-01T05:00:00+01:00", "0999-06-01T04:00:00.000000Z"),
        ("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999999Z"),
    ],
)
def test_timestamps_normalise(given_: str, canonical: str) -> None:
    assert normalize_timestamp(given_) == canonical
    assert CANONICAL.match(canonical)
    assert parse_incoming(data_sync(timestamp=given_)).operation.timestamp == canonical  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "now",
        "15/01/2024 10:30",
        "2024-02-30T00:00:00Z",
        "2024-01-15T25:00:00Z",
        "2024-01-15T10:30:00+24:00",
        "0001-01-01T00:00:00+00:01",  # before year 1 in UTC
        "9999-12-31T23:59:59-00:01",  # after year 9999 in UTC
        "2024-01-15T10:30:00Z\x00",
        "2024-01-15T10:30:00\x00+05:00",
        "2024-01-15T10:30:00\n",
        "٢٠٢٤-01-15T10:30:00Z",
        "2024-01-15T10:30:00Z" + " " * 60,
    ],
)
def test_bad_timestamps_raise_value_error_only(bad: str) -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        normalize_timestamp(bad)


def test_format_timestamp_treats_naive_as_utc() -> None:
    moment = datetime(2024, 1, 15, 10, 30, 0, 7)
    assert format_timestamp(moment) == "2024-01-15T10:30:00.000007Z"
    assert format_timestamp(moment.replace(tzinfo=UTC)) == "2024-01-15T10:30:00.000007Z"
    eastern = timezone(timedelta(hours=-5))
    assert format_timestamp(moment.replace(tzinfo=eastern)) == "2024-01-15T15:30:00.000007Z"


def test_utc_now_iso_is_canonical_and_now() -> None:
    before = datetime.now(UTC)
    now = utc_now_iso()
    after = datetime.now(UTC)
    assert CANONICAL.match(now)
    assert format_timestamp(before) <= now <= format_timestamp(after)


AWARE = st.builds(
    lambda moment, minutes: moment.replace(tzinfo=timezone(timedelta(minutes=minutes))),
    st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31)),
    st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1),
)


@settings(max_examples=200, deadline=None)
@given(AWARE, AWARE)
def test_canonical_text_order_is_time_order(first: datetime, second: datetime) -> None:
    a, b = normalize_timestamp(first.isoformat()), normalize_timestamp(second.isoformat())
    assert CANONICAL.match(a) and CANONICAL.match(b)
    assert datetime.fromisoformat(a) == first  # the same instant
    assert (a < b) == (first < second)
    assert (a == b) == (first == second)
    assert normalize_timestamp(a) == a  # idempotent


# ---- BULK_UPDATE ---------------------------------------------------------------------------


def bulk(updates: Any) -> DataSyncIn:
    raw = data_sync(operation="BULK_UPDATE", entity_id="bulk-1", data={"updates": updates})
    message = parse_incoming(raw)
    assert isinstance(message, DataSyncIn)
    return message


def bulk_rejected(updates: Any) -> str:
    op = bulk(updates).operation
    with pytest.raises(InvalidMessage) as info:
        op.bulk_items()
    assert info.value.code == 4006
    return info.value.reason


def test_bulk_items_validate() -> None:
    updates = [
        {"entity_id": "table-1", "data": {"status": "free"}, "version": 4},
        {"entity_id": "table-2", "data": {"status": "occupied", "guests": 3}, "version": 1},
        {"entity_id": "table-3", "version": 9},
    ]
    items = bulk(updates).operation.bulk_items()
    assert items == [
        BulkItem(entity_id="table-1", data={"status": "free"}, version=4),
        BulkItem(entity_id="table-2", data={"status": "occupied", "guests": 3}, version=1),
        BulkItem(entity_id="table-3", data={}, version=9),
    ]


def test_bulk_items_bounds() -> None:
    most = [{"entity_id": f"e{i}", "version": 1} for i in range(MAX_BULK_UPDATES)]
    assert len(bulk(most).operation.bulk_items()) == MAX_BULK_UPDATES
    too_many = [*most, {"entity_id": "one-more", "version": 1}]
    assert f"1 to {MAX_BULK_UPDATES}" in bulk_rejected(too_many)
    assert f"1 to {MAX_BULK_UPDATES}" in bulk_rejected([])
    assert bulk([{"entity_id": "only", "version": 1}]).operation.bulk_items()[0].entity_id == "only"
    twice = [{"entity_id": "e1", "version": 1}, {"entity_id": "e1", "version": 2}]
    assert bulk_rejected(twice) == "BULK_UPDATE names an entity twice"


@pytest.mark.parametrize(
    ("updates", "reason"),
    [
        (None, "data.updates"),
        ({"entity_id": "e", "version": 1}, "data.updates"),
        ("e1,e2", "data.updates"),
        ([{"entity_id": "e", "version": 1}, {"entity_id": "e", "version": 2}], "twice"),
        ([{"entity_id": "a", "version": 1}, "b"], "data.updates: 1"),
        ([{"version": 1}], "0.entity_id"),
        ([{"entity_id": "", "version": 1}], "0.entity_id"),
        ([{"entity_id": "e" * 129, "version": 1}], "0.entity_id"),
        ([{"entity_id": "e"}], "0.version"),
        ([{"entity_id": "e", "version": 0}], "0.version"),
        ([{"entity_id": "e", "version": "2"}], "0.version"),
        ([{"entity_id": "e", "version": True}], "0.version"),
        ([{"entity_id": "e", "version": 2**62}], "0.version"),
        (
            [{"entity_id": "a", "version": 1}, {"entity_id": "b", "version": 1, "data": []}],
            "1.data",
        ),
    ],
)
def test_bulk_items_rejections(updates: Any, reason: str) -> None:
    assert reason in bulk_rejected(updates)


def test_bulk_items_missing_updates_names_the_field() -> None:
    message = parse_incoming(data_sync(operation="BULK_UPDATE", data={}))
    with pytest.raises(InvalidMessage, match=r"data\.updates"):
        message.operation.bulk_items()  # type: ignore[union-attr]


# ---- locks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [1, 2, 30_000, MAX_LOCK_TIMEOUT_MS - 1, MAX_LOCK_TIMEOUT_MS])
def test_lock_timeout_within_bounds(timeout: int) -> None:
    raw = {"type": "acquire_lock", "entity_type": "orders", "entity_id": "o", "timeout": timeout}
    message = parse_incoming(raw)
    assert isinstance(message, AcquireLockIn)
    assert message.timeout == timeout


@pytest.mark.parametrize(
    "timeout", [0, -1, MAX_LOCK_TIMEOUT_MS + 1, 2**40, 1.5, 30_000.0, "30000", True, None]
)
def test_lock_timeout_out_of_bounds(timeout: Any) -> None:
    raw = {"type": "acquire_lock", "entity_type": "orders", "entity_id": "o", "timeout": timeout}
    assert "acquire_lock.timeout" in rejected(raw)


def test_lock_timeout_bound_is_five_minutes() -> None:
    assert MAX_LOCK_TIMEOUT_MS == 300_000


# ---- terminal ids --------------------------------------------------------------------------


@pytest.mark.parametrize("terminal_id", ["pos-001", "a", "K", "kds.kitchen:2_b-1", "t" * 64])
def test_valid_terminal_ids(terminal_id: str) -> None:
    assert TERMINAL_ID_RE.match(terminal_id)
    assert TERMINAL_ID_RE.fullmatch(terminal_id)


@pytest.mark.parametrize(
    "terminal_id",
    ["", "t" * 65, "pos 1", "pos/1", "pos%2F1", "café", "pos-1\n", "\npos-1", "pos\x00", "../x"],
)
def test_invalid_terminal_ids(terminal_id: str) -> None:
    assert not TERMINAL_ID_RE.match(terminal_id)
    assert not TERMINAL_ID_RE.fullmatch(terminal_id)


# ---- builders of outgoing messages -----------------------------------------------------------


def test_pong_msg_matches_its_model() -> None:
    message = pong_msg("2024-01-15T10:30:00.000Z")
    pong = Pong.model_validate(message)
    assert pong.timestamp == "2024-01-15T10:30:00.000Z"
    assert CANONICAL.match(message["server_time"])
    assert set(message) == set(Pong.model_fields)


def test_error_msg_matches_its_model() -> None:
    message = error_msg(Code.INVALID_MESSAGE, "unknown message type 'x'")
    assert message == {"type": "error", "code": 4006, "error": "unknown message type 'x'"}
    ErrorMessage.model_validate(message)
    assert set(message) == set(ErrorMessage.model_fields)


def test_sync_error_msg_matches_its_model() -> None:
    message = sync_error_msg("op-1", Code.LOCKED, "locked by pos-002", "orders", "order-1")
    assert message == {
        "type": "sync_error",
        "operation_id": "op-1",
        "code": 4009,
        "error": "locked by pos-002",
        "entity_type": "orders",
        "entity_id": "order-1",
    }
    SyncError.model_validate(message)
    assert set(message) == set(SyncError.model_fields)
    assert SyncError.model_validate(sync_error_msg(None, 4006, "bad")).operation_id is None


def test_builders_encode_codes_as_plain_integers() -> None:
    message = sync_error_msg("op-1", Code.RATE_LIMITED, "slow down")
    assert encode_json(message) == (
        '{"type":"sync_error","operation_id":"op-1","code":4005,"error":"slow down",'
        '"entity_type":null,"entity_id":null}'
    )
    assert encode_msgpack(message) == msgpack.packb({**message, "code": 4005})
    (decoded,) = decode_frame(encode_msgpack(message), 1 << 20)
    assert type(decoded["code"]) is int


# ---- property: only InvalidMessage, whatever comes in ----------------------------------------

FIELD_NAMES = [
    "type",
    "operation",
    "id",
    "entity_type",
    "entity_id",
    "data",
    "version",
    "timestamp",
    "terminal_id",
    "user_id",
    "requires_lock",
    "priority",
    "updates",
    "operation_id",
    "seq",
    "conflict_id",
    "resolution",
    "resolved_data",
    "timeout",
    "lock_id",
    "since",
    "entity_types",
    "response_time",
    "memory_usage",
    "cache_hit_rate",
]
INTERESTING = st.sampled_from(
    [
        *sorted(INCOMING_TYPES),
        *[kind.value for kind in OpKind],
        *[priority.value for priority in Priority],
        *[kind.value for kind in ResolutionKind],
        "orders",
        "2024-01-15T10:30:00.000Z",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "2024-01-15",
        0,
        1,
        -1,
        2**62,
        MAX_LOCK_TIMEOUT_MS + 1,
        0.5,
        float("nan"),
        float("inf"),
    ]
)
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=4)
    | INTERESTING,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=10,
)


@st.composite
def client_like(draw: st.DrawFn) -> dict[str, Any]:
    keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=6)
    raw = draw(st.dictionaries(keys, VALUES, max_size=6))
    if draw(st.booleans()):
        raw["type"] = draw(st.sampled_from(sorted(INCOMING_TYPES)))
    if raw.get("type") == "data_sync" and draw(st.booleans()):
        op = operation()
        op.update(draw(st.dictionaries(st.sampled_from(FIELD_NAMES), VALUES, max_size=3)))
        raw["operation"] = op
    return raw


@settings(max_examples=250, deadline=None)
@given(client_like())
def test_parse_incoming_only_raises_invalid_message(raw: dict[str, Any]) -> None:
    try:
        message = parse_incoming(raw)
    except InvalidMessage as exc:
        assert exc.code == 4006
        assert exc.reason
        return
    assert message.type == raw["type"]
    if isinstance(message, DataSyncIn):
        if message.operation.timestamp is not None:
            assert CANONICAL.match(message.operation.timestamp)
        with contextlib.suppress(InvalidMessage):
            message.operation.bulk_items()


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["status", "items", "total", "notes", "table"]),
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=20),
    ),
    st.integers(min_value=1, max_value=2**62 - 1),
    st.sampled_from(list(OpKind)),
    st.sampled_from(list(Priority)),
)
def test_valid_operations_always_parse(
    data: dict[str, Any], version: int, kind: OpKind, priority: Priority
) -> None:
    raw = data_sync(data=data, version=version, operation=kind.value, priority=priority.value)
    (decoded,) = decode_frame(encode_msgpack(raw), 1 << 20)
    message = parse_incoming(decoded)
    assert isinstance(message, DataSyncIn)
    assert message.operation.data == data
    assert message.operation.version == version
    assert message.operation.operation is kind
    assert message.operation.priority is priority


def test_token_refreshed_msg_names_the_expiry_in_canonical_time() -> None:
    message = token_refreshed_msg(1_700_000_000)
    assert TokenRefreshed.model_validate(message).expires_at == "2023-11-14T22:13:20.000000Z"
    assert message["type"] == "token_refreshed" and set(message) == set(TokenRefreshed.model_fields)
    assert CANONICAL.match(message["server_time"])
    assert token_refreshed_msg(None)["expires_at"] is None  # a token that never expires
    # Past what a timestamp can name: the last moment it can.
    assert token_refreshed_msg(10**15)["expires_at"] == "9999-12-31T23:59:59.000000Z"


def test_server_time_is_utc_whatever_the_machines_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server whose machine runs on local time (a restaurant in Sao Paulo) still stamps UTC."""
    monkeypatch.setenv("TZ", "America/Sao_Paulo")
    time.tzset()
    try:
        before = format_timestamp(datetime.now(UTC))
        stamped = [utc_now_iso(), client_time(None, 5.0), client_time("9999-01-01T00:00:00Z", 5.0)]
        after = format_timestamp(datetime.now(UTC))
        expiry = token_refreshed_msg(1_700_000_000)["expires_at"]
    finally:
        monkeypatch.undo()
        time.tzset()
    assert all(before <= moment <= after for moment in stamped), (before, stamped, after)
    assert expiry == "2023-11-14T22:13:20.000000Z"  # an epoch, not a wall-clock time


def test_no_timestamp_is_server_time_right_after_a_bound_was_kept() -> None:
    """client_time keeps the last bound it computed for a skew; a write without a timestamp
    must not take the shortcut meant for one within that bound."""
    before = utc_now_iso()
    assert client_time("2024-01-15T10:30:00.000000Z", 5.0) == "2024-01-15T10:30:00.000000Z"
    stamped = client_time(None, 5.0)
    assert before <= stamped <= utc_now_iso()


def test_reasons_name_what_is_wrong_exactly() -> None:
    assert rejected([1]) == "a message must be an object (map)"
    # The type is repeated up to 60 characters of its repr.
    assert rejected({"type": "x" * 58}) == f"unknown message type '{'x' * 58}'"
    assert rejected({"type": "x" * 59}) == f"unknown message type '{'x' * 56}..."
    reason = rejected(data_sync(timestamp="yesterday"))
    assert reason == (
        "invalid data_sync: data_sync.operation.timestamp: Value error, "
        "timestamp must be ISO 8601, e.g. 2024-01-15T10:30:00.000Z"
    )


def test_offsets_become_utc_whatever_the_machines_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        normalized = normalize_timestamp("2024-01-15T07:30:00-03:00")
        formatted = format_timestamp(
            datetime(2024, 1, 15, 7, 30, tzinfo=timezone(timedelta(hours=-3)))
        )
    finally:
        monkeypatch.undo()
        time.tzset()
    assert normalized == formatted == "2024-01-15T10:30:00.000000Z"

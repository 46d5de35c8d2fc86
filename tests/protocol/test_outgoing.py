"""The server-to-client contract (docs/protocol.md): a model and a builder for every message the
server sends, each builder's output valid against its model with extra fields forbidden."""

from __future__ import annotations

import ast
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from pydantic import ValidationError

from chefia_rt.protocol import builders as b
from chefia_rt.protocol import outgoing
from chefia_rt.protocol.codec import encode_msgpack, msgpack_frame
from chefia_rt.protocol.outgoing import (
    ConnectionEstablished,
    DataSyncPush,
    Outgoing,
    SyncConfirmation,
    message_type,
    parse_outgoing,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = time.time()
STAMP = "2024-01-15T10:30:00.000000Z"


def _monitor_terminal(
    connected_since: float | None = NOW - 60, disconnected_at: float | None = None
) -> dict[str, Any]:
    return b.terminal_status_update_msg(
        store_id="s1",
        terminal_id="pos-1",
        terminal_type="pos",
        status="online",
        change="listed",
        connected_since=connected_since,
        last_seen=NOW,
        disconnected_at=disconnected_at,
        ops=3,
        conflicts=1,
        bytes_in=100,
        bytes_out=200,
        reconnects=0,
        response_time_ms=12.5,
        memory_mb=None,
        cache_hit_rate=0.9,
        sent_seq=7,
        acked_seq=6,
        worker="host/123",
        server_time=STAMP,
    )


def _alert() -> dict[str, Any]:
    return b.system_alert_msg(
        alert_id="latency:s1:*:1",
        kind="latency",
        severity="warning",
        message="average latency 900 ms",
        value=900.0,
        threshold=500.0,
        terminal_id=None,
        store_id="s1",
        active=True,
        since=NOW - 5,
        server_time=STAMP,
    )


# Every builder called as the server calls it: (message type, its output), variants included.
EXAMPLES: list[tuple[str, Callable[[], dict[str, Any]]]] = [
    (
        "connection_established",
        lambda: b.connection_established_msg(
            terminal_id="pos-1",
            terminal_type="pos",
            store_id="s1",
            session_id="sess-1",
            last_seq=0,
            epoch="e-1",
            heartbeat_interval=30.0,
            encoding="msgpack",
            worker="host/123",
        ),
    ),
    ("token_refreshed", lambda: b.token_refreshed_msg(None)),
    ("token_refreshed", lambda: b.token_refreshed_msg(2**62)),
    ("pong", lambda: b.pong_msg(None)),
    ("pong", lambda: b.pong_msg({"any": ["thing"]})),
    (
        "sync_confirmation",
        lambda: b.sync_confirmation_msg(
            operation_id="op-1",
            seq=4,
            version=2,
            status="applied",
            conflict_resolved=False,
            entity_type="orders",
            entity_id="o-1",
            server_time=STAMP,
        ),
    ),
    (
        "sync_confirmation",
        lambda: b.sync_confirmation_msg(
            operation_id="op-1",
            seq=None,
            version=None,
            status="duplicate",
            conflict_resolved=True,
            entity_type="orders",
            entity_id="o-1",
            server_time=STAMP,
        ),
    ),
    ("sync_error", lambda: b.sync_error_msg("op-1", 4008, "version conflict", "orders", "o-1")),
    ("sync_error", lambda: b.sync_error_msg(None, 4006, "invalid data_sync")),
    (
        "sync_conflict",
        lambda: b.sync_conflict_msg(
            operation_id="op-1",
            conflict_id="c-1",
            entity_type="orders",
            entity_id="o-1",
            policy="manual",
            local_data={"status": "ready"},
            local_version=2,
            server_data={"status": "paid"},
            server_version=3,
        ),
    ),
    (
        "data_sync",
        lambda: b.data_sync_msg(
            id="op-1",
            seq=5,
            entity_type="orders",
            entity_id="o-1",
            operation="BULK_UPDATE",
            data={"updates": [{"entity_id": "o-1", "data": {}, "version": 2}]},
            version=None,
            deleted=False,
            timestamp=STAMP,
            terminal_id="pos-1",
            user_id=None,
            priority="high",
            server_time=STAMP,
        ),
    ),
    ("lock_acquired", lambda: b.lock_acquired_msg("l-1", "tables", "t-1", NOW + 30)),
    ("lock_failed", lambda: b.lock_failed_msg("l-1", "tables", "t-1", "too many locks")),
    (
        "lock_failed",
        lambda: b.lock_failed_msg("l-1", "tables", "t-1", "locked", "pos-2", NOW + 10),
    ),
    ("lock_released", lambda: b.lock_released_msg(None, "tables", "t-1", False)),
    (
        "snapshot",
        lambda: b.snapshot_msg(
            "s1", 9, "e-1", 0, True, [b.snapshot_entity("tables", "t-1", 3, {"n": 1}, False)]
        ),
    ),
    ("resync_required", lambda: b.resync_required_msg(3, 10, 20, "e-1", "gone")),
    ("error", lambda: b.error_msg(4005, "rate limited")),
    ("message_batch", lambda: b.message_batch_msg([b.pong_msg(1), b.error_msg(4006, "x")])),
    ("terminal_status_update", _monitor_terminal),
    ("terminal_list", lambda: b.terminal_list_msg("s1", True, [_monitor_terminal()], STAMP)),
    ("terminal_list", lambda: b.terminal_list_msg("s1", False, [], STAMP)),
    (
        "sync_activity",
        lambda: b.sync_activity_msg(
            "op:op-1",
            "data_sync",
            "s1",
            "applied",
            terminal_id="pos-1",
            entity_type="orders",
            entity_id="o-1",
            operation_id="op-1",
            operation="UPDATE",
            seq=3,
            detail={"version": 2},
            server_time=STAMP,
        ),
    ),
    ("sync_activity", lambda: b.sync_activity_msg("event:1", "backup", "s1", "ok")),
    (
        "performance_metrics",
        lambda: b.performance_metrics_msg("terminal", "s1", "pos-1", "pos", {"memory_usage": 9}),
    ),
    ("performance_metrics", lambda: b.performance_metrics_msg("server", "s1", None, None, {})),
    ("system_alert", _alert),
    ("system_alert", lambda: b.alert_cleared_msg(_alert(), STAMP)),
]


def example(kind: str) -> dict[str, Any]:
    """The first example of `kind`, freshly built."""
    return next(build for k, build in EXAMPLES if k == kind)()


def _message_models() -> set[type[Outgoing]]:
    """Every model of outgoing.py with a `type` field: a message of its own."""
    return {
        value
        for value in vars(outgoing).values()
        if isinstance(value, type) and issubclass(value, Outgoing) and "type" in value.model_fields
    }


def test_every_message_model_is_registered_under_its_type() -> None:
    assert {model for model, _ in b.OUTGOING.values()} == _message_models()
    for kind, (model, _) in b.OUTGOING.items():
        assert message_type(model) == kind


def test_every_builder_is_exercised_here() -> None:
    assert {kind for kind, _ in EXAMPLES} == b.OUTGOING_TYPES


@pytest.mark.parametrize(("kind", "build"), EXAMPLES, ids=[kind for kind, _ in EXAMPLES])
def test_builder_output_validates_against_its_model(
    kind: str, build: Callable[[], dict[str, Any]]
) -> None:
    message = build()
    assert message["type"] == kind
    model = b.OUTGOING[kind][0]
    model.model_validate(message)
    # Both encodings carry it unchanged.
    assert model.model_validate(msgpack.unpackb(encode_msgpack(message))) is not None
    # Every field the builder writes is one the model names (extra fields are forbidden) and
    # every field the model names is written.
    assert set(message) == set(model.model_fields)


@pytest.mark.parametrize("kind", sorted(b.OUTGOING_TYPES))
def test_an_extra_field_is_refused(kind: str) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        b.OUTGOING[kind][0].model_validate({**example(kind), "surplus": 1})


def test_builders_write_the_moments_and_flags_they_are_given() -> None:
    """A moment given in epoch seconds arrives as that moment's canonical timestamp; a cleared
    alert is the raised one, inactive."""
    at, moment = 1_700_000_000.0, "2023-11-14T22:13:20.000000Z"
    assert b.lock_acquired_msg("l-1", "tables", "t-1", at)["expires_at"] == moment
    failed = b.lock_failed_msg("l-1", "tables", "t-1", "locked", "pos-2", at)
    assert (failed["locked_by"], failed["locked_until"]) == ("pos-2", moment)
    terminal = _monitor_terminal(connected_since=at, disconnected_at=at + 60)
    assert (terminal["connected_since"], terminal["disconnected_at"]) == (
        moment,
        "2023-11-14T22:14:20.000000Z",
    )
    raised = _alert()
    assert raised["active"] is True
    assert b.alert_cleared_msg(raised, STAMP) == {**raised, "active": False, "server_time": STAMP}


def test_a_missing_field_is_refused() -> None:
    message = example("connection_established")
    del message["worker"]
    with pytest.raises(ValidationError, match="worker"):
        ConnectionEstablished.model_validate(message)


def test_a_nested_extra_field_is_refused() -> None:
    message = example("data_sync")
    message["operation"]["surplus"] = 1
    with pytest.raises(ValidationError, match=r"operation\.surplus"):
        DataSyncPush.model_validate(message)


def test_the_batch_frame_is_what_its_builder_describes() -> None:
    messages = [b.pong_msg(1), b.error_msg(4006, "bad")]
    frame = msgpack_frame([encode_msgpack(msg) for msg in messages], None)
    assert frame == msgpack.packb(b.message_batch_msg(messages))


def test_a_client_ignores_fields_a_newer_server_adds() -> None:
    message = example("sync_confirmation")
    parsed = parse_outgoing(SyncConfirmation, {**message, "added_later": True})
    assert parsed.operation_id == "op-1"
    assert parsed.seq == 4
    with pytest.raises(ValidationError, match="seq"):
        parse_outgoing(SyncConfirmation, {**message, "seq": "4"})


# ---- no message written by hand ------------------------------------------------------------

# The modules that send server messages; client/ writes client messages (some share a type
# name) and protocol/ holds the builders. No server module is exempt.
HAND_WRITTEN_ALLOWED: set[str] = set()


def _hand_written(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Dict):
            continue
        for key, value in zip(node.keys, node.values, strict=True):
            if (
                isinstance(key, ast.Constant)
                and key.value == "type"
                and isinstance(value, ast.Constant)
                and value.value in b.OUTGOING_TYPES
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {value.value}")
    return found


def test_server_modules_build_messages_with_the_builders() -> None:
    package = ROOT / "chefia_rt"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        if relative.startswith(("chefia_rt/protocol/", "chefia_rt/client/")):
            continue
        if relative in HAND_WRITTEN_ALLOWED:
            continue
        offenders += _hand_written(path)
    assert not offenders, "message dicts written by hand:\n" + "\n".join(offenders)

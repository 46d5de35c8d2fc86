"""The builders of server-to-client messages, one per type (`OUTGOING` lists them with their
models from `outgoing`).

They return plain dicts in the order the wire has always had: one is called for every
confirmation and push, so no model is constructed on the server's hot path. Moments the server
keeps in epoch seconds (leases, a terminal's last sight) are formatted here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chefia_rt.protocol.common import format_epoch, utc_now_iso
from chefia_rt.protocol.outgoing import (
    ConnectionEstablished,
    DataSyncPush,
    ErrorMessage,
    LockAcquired,
    LockFailed,
    LockReleased,
    MessageBatch,
    Outgoing,
    PerformanceMetrics,
    Pong,
    ResyncRequired,
    Snapshot,
    SyncActivity,
    SyncConfirmation,
    SyncConflict,
    SyncError,
    SystemAlert,
    TerminalList,
    TerminalStatusUpdate,
    TokenRefreshed,
)


def connection_established_msg(
    *,
    terminal_id: str,
    terminal_type: str,
    store_id: str,
    session_id: str,
    last_seq: int,
    epoch: str,
    heartbeat_interval: float,
    encoding: str,
    worker: str,
) -> dict[str, Any]:
    return {
        "type": "connection_established",
        "terminal_id": terminal_id,
        "terminal_type": terminal_type,
        "store_id": store_id,
        "session_id": session_id,
        "server_time": utc_now_iso(),
        "last_seq": last_seq,
        "epoch": epoch,
        "heartbeat_interval": heartbeat_interval,
        "encoding": encoding,
        "worker": worker,
    }


def token_refreshed_msg(expires_at: int | None) -> dict[str, Any]:
    latest = 253_402_300_799  # 9999-12-31T23:59:59Z, the last moment a timestamp can name
    return {
        "type": "token_refreshed",
        "expires_at": format_epoch(None if expires_at is None else min(expires_at, latest)),
        "server_time": utc_now_iso(),
    }


def pong_msg(timestamp: Any) -> dict[str, Any]:
    return {"type": "pong", "server_time": utc_now_iso(), "timestamp": timestamp}


def sync_confirmation_msg(
    *,
    operation_id: str,
    seq: int | None,
    version: int | None,
    status: str,
    conflict_resolved: bool,
    entity_type: str,
    entity_id: str,
    server_time: str,
) -> dict[str, Any]:
    return {
        "type": "sync_confirmation",
        "operation_id": operation_id,
        "seq": seq,
        "version": version,
        "status": status,
        "conflict_resolved": conflict_resolved,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "server_time": server_time,
    }


def sync_error_msg(
    operation_id: str | None,
    code: int,
    reason: str,
    entity_type: str | None = None,
    entity_id: str | None = None,
) -> dict[str, Any]:
    return {
        "type": "sync_error",
        "operation_id": operation_id,
        "code": code,
        "error": reason,
        "entity_type": entity_type,
        "entity_id": entity_id,
    }


def sync_conflict_msg(
    *,
    operation_id: str,
    conflict_id: str,
    entity_type: str,
    entity_id: str,
    policy: str,
    local_data: dict[str, Any],
    local_version: int,
    server_data: dict[str, Any],
    server_version: int,
) -> dict[str, Any]:
    return {
        "type": "sync_conflict",
        "operation_id": operation_id,
        "conflict_id": conflict_id,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "policy": policy,
        "local_data": local_data,
        "local_version": local_version,
        "server_data": server_data,
        "server_version": server_version,
    }


def data_sync_msg(
    *,
    id: str,
    seq: int | None,
    entity_type: str,
    entity_id: str,
    operation: str,
    data: dict[str, Any],
    version: int | None,
    deleted: bool,
    timestamp: str,
    terminal_id: str,
    user_id: str | None,
    priority: str,
    server_time: str,
) -> dict[str, Any]:
    """`data_sync` as other terminals receive it: the full state after the operation."""
    return {
        "type": "data_sync",
        "operation": {
            "id": id,
            "seq": seq,
            "entity_type": entity_type,
            "entity_id": entity_id,
            "operation": operation,
            "data": data,
            "version": version,
            "deleted": deleted,
            "timestamp": timestamp,
            "terminal_id": terminal_id,
            "user_id": user_id,
            "priority": priority,
            "server_time": server_time,
        },
    }


def lock_acquired_msg(
    lock_id: str, entity_type: str, entity_id: str, expires_at: float
) -> dict[str, Any]:
    """`expires_at` in epoch seconds (the lease's)."""
    return {
        "type": "lock_acquired",
        "lock_id": lock_id,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "expires_at": format_epoch(expires_at),
    }


def lock_failed_msg(
    lock_id: str | None,
    entity_type: str,
    entity_id: str,
    reason: str,
    locked_by: str | None = None,
    locked_until: float | None = None,
) -> dict[str, Any]:
    """`locked_until` in epoch seconds (the holder's lease), None when no one holds it."""
    return {
        "type": "lock_failed",
        "lock_id": lock_id,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "reason": reason,
        "locked_by": locked_by,
        "locked_until": format_epoch(locked_until),
    }


def lock_released_msg(
    lock_id: str | None, entity_type: str, entity_id: str, released: bool
) -> dict[str, Any]:
    return {
        "type": "lock_released",
        "lock_id": lock_id,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "released": released,
    }


def snapshot_entity(
    entity_type: str, entity_id: str, version: int, data: dict[str, Any], deleted: bool
) -> dict[str, Any]:
    """One entity of a `snapshot` page."""
    return {
        "entity_type": entity_type,
        "entity_id": entity_id,
        "version": version,
        "data": data,
        "deleted": deleted,
    }


def snapshot_msg(
    store_id: str,
    seq: int,
    epoch: str,
    page: int,
    complete: bool,
    entities: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "type": "snapshot",
        "store_id": store_id,
        "seq": seq,
        "epoch": epoch,
        "page": page,
        "complete": complete,
        "entities": entities,
    }


def resync_required_msg(
    since: int, oldest_seq: int, last_seq: int, epoch: str, reason: str
) -> dict[str, Any]:
    return {
        "type": "resync_required",
        "since": since,
        "oldest_seq": oldest_seq,
        "last_seq": last_seq,
        "epoch": epoch,
        "reason": reason,
    }


def error_msg(code: int, reason: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "error": reason}


def message_batch_msg(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """What a batch frame decodes to (the server assembles it from encoded bodies instead:
    codec.msgpack_frame)."""
    return {"type": "message_batch", "messages": messages, "count": len(messages)}


def terminal_status_update_msg(
    *,
    store_id: str,
    terminal_id: str,
    terminal_type: str,
    status: str,
    change: str,
    connected_since: float | None,
    last_seen: float,
    disconnected_at: float | None,
    ops: int,
    conflicts: int,
    bytes_in: int,
    bytes_out: int,
    reconnects: int,
    response_time_ms: float | None,
    memory_mb: float | None,
    cache_hit_rate: float | None,
    sent_seq: int,
    acked_seq: int,
    worker: str,
    server_time: str,
) -> dict[str, Any]:
    """The moments (`connected_since`, `last_seen`, `disconnected_at`) in epoch seconds."""
    return {
        "type": "terminal_status_update",
        "store_id": store_id,
        "terminal_id": terminal_id,
        "terminal_type": terminal_type,
        "status": status,
        "change": change,
        "connected_since": format_epoch(connected_since),
        "last_seen": format_epoch(last_seen),
        "disconnected_at": format_epoch(disconnected_at),
        "ops": ops,
        "conflicts": conflicts,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "reconnects": reconnects,
        "response_time_ms": response_time_ms,
        "memory_mb": memory_mb,
        "cache_hit_rate": cache_hit_rate,
        "sent_seq": sent_seq,
        "acked_seq": acked_seq,
        "worker": worker,
        "server_time": server_time,
    }


def terminal_list_msg(
    store_id: str, full: bool, terminals: list[dict[str, Any]], server_time: str
) -> dict[str, Any]:
    return {
        "type": "terminal_list",
        "store_id": store_id,
        "full": full,
        "terminals": terminals,
        "server_time": server_time,
    }


def sync_activity_msg(
    activity_id: str,
    kind: str,
    store_id: str,
    status: str,
    *,
    terminal_id: str | None = None,
    entity_type: str | None = None,
    entity_id: str | None = None,
    operation_id: str | None = None,
    operation: str | None = None,
    seq: int | None = None,
    detail: dict[str, Any] | None = None,
    server_time: str | None = None,
) -> dict[str, Any]:
    """One `sync_activity` line (`server_time` now unless given)."""
    return {
        "type": "sync_activity",
        "activity_id": activity_id,
        "kind": kind,
        "store_id": store_id,
        "terminal_id": terminal_id,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "operation_id": operation_id,
        "operation": operation,
        "seq": seq,
        "status": status,
        "detail": detail or {},
        "server_time": server_time or utc_now_iso(),
    }


def performance_metrics_msg(
    scope: str,
    store_id: str,
    terminal_id: str | None,
    terminal_type: str | None,
    metrics: dict[str, Any],
) -> dict[str, Any]:
    return {
        "type": "performance_metrics",
        "scope": scope,
        "store_id": store_id,
        "terminal_id": terminal_id,
        "terminal_type": terminal_type,
        "metrics": metrics,
        "server_time": utc_now_iso(),
    }


def system_alert_msg(
    *,
    alert_id: str,
    kind: str,
    severity: str,
    message: str,
    value: float,
    threshold: float,
    terminal_id: str | None,
    store_id: str,
    active: bool,
    since: float,
    server_time: str,
) -> dict[str, Any]:
    """`since` in epoch seconds (when the condition began)."""
    return {
        "type": "system_alert",
        "alert_id": alert_id,
        "kind": kind,
        "severity": severity,
        "message": message,
        "value": value,
        "threshold": threshold,
        "terminal_id": terminal_id,
        "store_id": store_id,
        "active": active,
        "since": format_epoch(since),
        "server_time": server_time,
    }


def alert_cleared_msg(alert: dict[str, Any], server_time: str) -> dict[str, Any]:
    """A raised `system_alert` again, its condition over: the same id, `active` false."""
    return {**alert, "active": False, "server_time": server_time}


# ---- the registry --------------------------------------------------------------------------

# Every server-to-client message type: its model and its builder.
OUTGOING: dict[str, tuple[type[Outgoing], Callable[..., dict[str, Any]]]] = {
    "connection_established": (ConnectionEstablished, connection_established_msg),
    "token_refreshed": (TokenRefreshed, token_refreshed_msg),
    "pong": (Pong, pong_msg),
    "sync_confirmation": (SyncConfirmation, sync_confirmation_msg),
    "sync_error": (SyncError, sync_error_msg),
    "sync_conflict": (SyncConflict, sync_conflict_msg),
    "data_sync": (DataSyncPush, data_sync_msg),
    "lock_acquired": (LockAcquired, lock_acquired_msg),
    "lock_failed": (LockFailed, lock_failed_msg),
    "lock_released": (LockReleased, lock_released_msg),
    "snapshot": (Snapshot, snapshot_msg),
    "resync_required": (ResyncRequired, resync_required_msg),
    "error": (ErrorMessage, error_msg),
    "message_batch": (MessageBatch, message_batch_msg),
    "terminal_status_update": (TerminalStatusUpdate, terminal_status_update_msg),
    "terminal_list": (TerminalList, terminal_list_msg),
    "sync_activity": (SyncActivity, sync_activity_msg),
    "performance_metrics": (PerformanceMetrics, performance_metrics_msg),
    "system_alert": (SystemAlert, system_alert_msg),
}
OUTGOING_TYPES = frozenset(OUTGOING)

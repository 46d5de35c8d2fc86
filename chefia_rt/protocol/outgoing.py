"""Server-to-client messages as pydantic models: exactly the fields the server sends.

Extra fields are forbidden: the tests validate every builder's output (`builders`) and every
message a test terminal receives against these models, so a field added on one side only fails
the suite. The Python client parses what it acts on with them through `parse_outgoing`, which
ignores fields a newer server may add. docs/protocol.md describes the messages.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict

from chefia_rt.protocol.common import (
    Bool,
    ConfirmStatus,
    Int,
    Number,
    OpKind,
    Priority,
    TerminalType,
)


class Outgoing(BaseModel):
    # The server sends these fields and no others: a field the model lacks is a drift between
    # the server and its documentation.
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- to every terminal -------------------------------------------------------------------


class ConnectionEstablished(Outgoing):
    type: Literal["connection_established"]
    terminal_id: str
    terminal_type: TerminalType
    store_id: str
    session_id: str
    server_time: str
    last_seq: Int
    epoch: str  # names the store's seq stream; a restore starts another one
    heartbeat_interval: Number
    encoding: Literal["json", "msgpack"]
    worker: str  # the server process that holds the connection (for operators' logs)


class TokenRefreshed(Outgoing):
    """The answer to refresh_token: the connection is now closed 4003 only after `expires_at`
    (the new token's `exp`; null in open mode, where connections never expire)."""

    type: Literal["token_refreshed"]
    expires_at: str | None
    server_time: str


class Pong(Outgoing):
    type: Literal["pong"]
    server_time: str
    timestamp: Any = None


class SyncConfirmation(Outgoing):
    type: Literal["sync_confirmation"]
    operation_id: str
    seq: Int | None
    version: Int | None
    status: ConfirmStatus
    conflict_resolved: Bool
    entity_type: str
    entity_id: str
    server_time: str


class SyncError(Outgoing):
    type: Literal["sync_error"]
    operation_id: str | None
    code: Int
    error: str
    entity_type: str | None
    entity_id: str | None


class SyncConflict(Outgoing):
    type: Literal["sync_conflict"]
    operation_id: str
    conflict_id: str
    entity_type: str
    entity_id: str
    policy: str
    local_data: dict[str, Any]
    local_version: Int
    server_data: dict[str, Any]
    server_version: Int


class PushedOperation(Outgoing):
    id: str
    seq: Int
    entity_type: str
    entity_id: str
    operation: OpKind
    data: dict[str, Any]
    # None for BULK_UPDATE: each item of data.updates carries its own version.
    version: Int | None
    deleted: Bool
    timestamp: str
    terminal_id: str
    user_id: str | None
    priority: Priority
    server_time: str


class DataSyncPush(Outgoing):
    """An operation of the store, pushed to every other terminal of it in seq order.

    A push is also the invalidation: a terminal that keeps its own cache of entities drops (or
    replaces with `data`) whatever it holds of (entity_type, entity_id) older than `version`
    (each of a BULK_UPDATE's `data.updates` names its own entity and version). No separate
    invalidation message is sent. The terminal that sent the operation gets its
    sync_confirmation instead, with the version it now holds; a catch-up (resume, gap, snapshot)
    sends the same pushes, so a terminal that was away invalidates from them too.
    """

    type: Literal["data_sync"]
    operation: PushedOperation


class LockAcquired(Outgoing):
    type: Literal["lock_acquired"]
    lock_id: str
    entity_type: str
    entity_id: str
    expires_at: str


class LockFailed(Outgoing):
    type: Literal["lock_failed"]
    lock_id: str | None
    entity_type: str
    entity_id: str
    reason: str
    locked_by: str | None
    locked_until: str | None


class LockReleased(Outgoing):
    type: Literal["lock_released"]
    lock_id: str | None
    entity_type: str
    entity_id: str
    released: Bool  # false when this terminal held no lock on the entity


class SnapshotEntity(Outgoing):
    entity_type: str
    entity_id: str
    version: Int
    data: dict[str, Any]
    deleted: Bool


class Snapshot(Outgoing):
    """One page of the store's state at `seq`: pages 0.. up to the one with `complete`, each
    within MAX_WS_MESSAGE_SIZE, one after the other with no push between them."""

    type: Literal["snapshot"]
    store_id: str
    seq: Int
    epoch: str
    page: Int
    complete: Bool
    entities: list[SnapshotEntity]


class ResyncRequired(Outgoing):
    type: Literal["resync_required"]
    since: Int
    oldest_seq: Int
    last_seq: Int
    epoch: str
    reason: str


class ErrorMessage(Outgoing):
    type: Literal["error"]
    code: Int
    error: str


class MessageBatch(Outgoing):
    """Several messages in one msgpack frame (never JSON); codec.msgpack_frame builds it from
    already-encoded messages, byte for byte what `message_batch_msg` describes."""

    type: Literal["message_batch"]
    messages: list[dict[str, Any]]
    count: Int


# ---- to monitors (docs/protocol.md, the monitor feed) ------------------------------------


class TerminalStatusUpdate(Outgoing):
    """One terminal of the monitor's store: sent when it connects, disconnects or is forgotten
    (`change`), and inside `terminal_list` with its figures."""

    type: Literal["terminal_status_update"]
    store_id: str
    terminal_id: str
    terminal_type: TerminalType
    status: Literal["online", "offline", "error"]
    change: Literal["connected", "disconnected", "figures", "forgotten", "listed"]
    connected_since: str | None
    last_seen: str
    disconnected_at: str | None
    ops: Int
    conflicts: Int
    bytes_in: Int
    bytes_out: Int
    reconnects: Int
    response_time_ms: Number | None
    memory_mb: Number | None
    cache_hit_rate: Number | None
    # The seq the server has sent the terminal up to, and the last one it acknowledged having
    # received (`sync_confirmation` from the terminal): the gap is what has not arrived.
    sent_seq: Int
    acked_seq: Int
    worker: str
    server_time: str


class TerminalList(Outgoing):
    """The store's terminals: all of them when a monitor connects (`full`), then every few
    seconds those whose figures changed."""

    type: Literal["terminal_list"]
    store_id: str
    full: Bool
    terminals: list[TerminalStatusUpdate]
    server_time: str


class SyncActivity(Outgoing):
    """One line of the activity feed. `kind`: data_sync (an applied operation), conflict, lock,
    backup, restore. `status`: the operation's (applied, merged, resolved), a conflict's
    (resolved, pending), a lock's (acquired, released, failed), a backup's (ok, failed)."""

    type: Literal["sync_activity"]
    activity_id: str
    kind: Literal["data_sync", "conflict", "lock", "backup", "restore"]
    store_id: str
    terminal_id: str | None
    entity_type: str | None
    entity_id: str | None
    operation_id: str | None
    operation: str | None
    seq: Int | None
    status: str
    detail: dict[str, Any]
    server_time: str


class PerformanceMetrics(Outgoing):
    """A terminal's own report (`scope` terminal, relayed as sent, extra fields included), or
    the server's figures for the monitor's store every few seconds (`scope` server)."""

    type: Literal["performance_metrics"]
    scope: Literal["terminal", "server"]
    store_id: str
    terminal_id: str | None
    terminal_type: TerminalType | None
    metrics: dict[str, Any]
    server_time: str


class SystemAlert(Outgoing):
    """An alert of the monitor's store; the same `alert_id` comes again with `active: false`
    when its condition is over. Thresholds: the MONITOR_ALERT_* settings."""

    type: Literal["system_alert"]
    alert_id: str
    kind: Literal["latency", "terminal_offline", "conflict_rate", "terminal_memory"]
    severity: Literal["info", "warning", "critical"]
    message: str
    value: Number
    threshold: Number
    terminal_id: str | None
    store_id: str
    active: Bool
    since: str
    server_time: str


M = TypeVar("M", bound=Outgoing)


def parse_outgoing(model: type[M], message: dict[str, Any]) -> M:
    """A server message as `model`, for a client: fields a newer server added are ignored.
    Raises pydantic's ValidationError when a field the model knows is missing or mistyped."""
    return model.model_validate(message, extra="ignore")


def message_type(model: type[Outgoing]) -> str:
    """The `type` literal of a message model."""
    kind: str = get_args(model.model_fields["type"].annotation)[0]
    return kind

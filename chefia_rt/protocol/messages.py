"""Every message of docs/protocol.md §4-§6 as a pydantic model, and the validation of incoming
messages.

Incoming messages are validated here (a schema violation is InvalidMessage, 4006). Outgoing
messages are built as plain dicts by the `*_msg` helpers below, which the tests check against the
server-to-client models, so the wire stays what the models document.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args, overload

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from chefia_rt.errors import InvalidMessage

# \A...\Z, not ^...$: "$" also matches before a trailing newline, so "pos-1\n" would pass.
TERMINAL_ID_RE = re.compile(r"\A[A-Za-z0-9._:-]{1,64}\Z")
NAME_PATTERN = r"^[A-Za-z0-9._:-]+$"
MAX_BULK_UPDATES = 500
MAX_LOCK_TIMEOUT_MS = 300_000
MAX_VERSION = 2**62  # exclusive; far beyond any real entity, and safe in a signed 64-bit column


class TerminalType(StrEnum):
    POS = "pos"
    KDS = "kds"
    WAITER = "waiter"
    MONITOR = "monitor"


# The terminal types, in the enum's order: the one list that tokens, the metrics' labels and the
# HTTP API check against.
TERMINAL_TYPES = tuple(t.value for t in TerminalType)


class OpKind(StrEnum):
    CREATE = "CREATE"
    UPDATE = "UPDATE"
    DELETE = "DELETE"
    BULK_UPDATE = "BULK_UPDATE"


class Priority(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class ConfirmStatus(StrEnum):
    APPLIED = "applied"
    MERGED = "merged"
    RESOLVED = "resolved"
    DUPLICATE = "duplicate"


class ResolutionKind(StrEnum):
    ACCEPT_REMOTE = "accept_remote"
    ACCEPT_LOCAL = "accept_local"
    MERGE = "merge"


def utc_now_iso() -> str:
    """Server time in the one canonical form used everywhere (sortable as text)."""
    return format_timestamp(datetime.now(UTC))


# The latest upper bound client_time computed: (max_skew, wall clock then, the bound's text).
_latest_bound: tuple[float, float, str] = (-1.0, 0.0, "")


def client_time(timestamp: str | None, max_skew: float) -> str:
    """The time a client's write counts as in conflict decisions: its own canonical timestamp,
    or server time when it sent none or one later than server time + `max_skew` seconds.

    A clock far ahead would otherwise win last-write-wins against every later write: a time
    beyond the bound is not trusted at all, so the write counts as made when it arrived (it is
    still applied). Canonical timestamps compare as text.
    """
    global _latest_bound
    skew, computed_at, bound = _latest_bound
    # A bound computed earlier is lower than now's (unless the clock stepped back since): a
    # timestamp within it is within now's too, without formatting the time again.
    if (
        timestamp is not None
        and skew == max_skew
        and timestamp <= bound
        and time.time() >= computed_at
    ):
        return timestamp
    moment = time.time()
    now = datetime.fromtimestamp(moment, UTC)
    bound = format_timestamp(now + timedelta(seconds=max_skew))
    _latest_bound = (max_skew, moment, bound)
    if timestamp is None or timestamp > bound:
        return format_timestamp(now)
    return timestamp


def format_timestamp(moment: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SS.ffffffZ` in UTC: fixed width, so text order is time order.

    A naive `moment` is taken as UTC. (strftime's %Y does not zero-pad years below 1000.)
    """
    if moment.tzinfo is None:
        text = moment.isoformat()
    else:
        moment = moment.astimezone(UTC)
        text = moment.isoformat()[:-6]  # "+00:00"
    # isoformat() leaves out a zero fraction (and is much cheaper than with `timespec`).
    return text + "Z" if moment.microsecond else text + ".000000Z"


@overload
def format_epoch(epoch: float) -> str: ...
@overload
def format_epoch(epoch: None) -> None: ...
@overload
def format_epoch(epoch: float | None) -> str | None: ...


def format_epoch(epoch: float | None) -> str | None:
    """Epoch seconds (time.time(), a lease's expiry) as the canonical timestamp; None stays None
    (a moment that has not happened)."""
    return None if epoch is None else format_timestamp(datetime.fromtimestamp(epoch, UTC))


def normalize_timestamp(value: str) -> str:
    """Parse an ISO 8601 client timestamp (naive means UTC) into the canonical sortable form.

    Raises ValueError (never anything else) for text that is not a representable moment.
    """
    try:
        # CPython's parser tolerates a NUL ("...10:30:00\x00+05:00" parses): printable ASCII only.
        if not isinstance(value, str) or not (value.isascii() and value.isprintable()):
            raise ValueError(value)
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is not None:
            # An offset can push year 1 or 9999 out of datetime's range: OverflowError.
            moment = moment.astimezone(UTC)
    except (TypeError, ValueError, OverflowError):
        raise ValueError("timestamp must be ISO 8601, e.g. 2024-01-15T10:30:00.000Z") from None
    return format_timestamp(moment)


class _Strict(BaseModel):
    # Unknown fields are ignored (newer clients), but the known ones are typed strictly:
    # integers, booleans and numbers are never coerced from text or from each other
    # (`"version": "2"` or `"requires_lock": "no"` is a schema violation, not a guess).
    model_config = ConfigDict(extra="ignore", str_max_length=4096, frozen=True, allow_inf_nan=False)


Int = Annotated[int, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
Number = Annotated[float, Field(strict=True)]  # an int is accepted, a bool or text is not
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=NAME_PATTERN)]
EntityId = Annotated[str, Field(min_length=1, max_length=128)]
OperationId = Annotated[str, Field(min_length=1, max_length=128)]
Timestamp = Annotated[str, Field(min_length=1, max_length=64)]


class BulkItem(_Strict):
    entity_id: EntityId
    data: dict[str, Any] = Field(default_factory=dict)
    version: Int = Field(ge=1, lt=MAX_VERSION)


class OperationModel(_Strict):
    id: OperationId
    entity_type: Name
    entity_id: EntityId
    operation: OpKind
    data: dict[str, Any] = Field(default_factory=dict)
    version: Int = Field(ge=1, lt=MAX_VERSION)
    timestamp: Timestamp | None = None
    terminal_id: str | None = None
    user_id: str | None = Field(None, max_length=128)
    requires_lock: Bool = False
    priority: Priority = Priority.MEDIUM

    @field_validator("timestamp")
    @classmethod
    def _canonical_time(cls, value: str | None) -> str | None:
        return None if value is None else normalize_timestamp(value)

    def bulk_items(self) -> list[BulkItem]:
        """The validated `data.updates` of a BULK_UPDATE."""
        try:
            items = _bulk_adapter.validate_python(self.data.get("updates"))
        except ValidationError as exc:
            raise InvalidMessage(f"BULK_UPDATE data.updates: {_first_error(exc)}") from None
        if not 1 <= len(items) <= MAX_BULK_UPDATES:
            raise InvalidMessage(f"BULK_UPDATE needs 1 to {MAX_BULK_UPDATES} updates")
        if len({item.entity_id for item in items}) != len(items):
            raise InvalidMessage("BULK_UPDATE names an entity twice")
        return items


_bulk_adapter = TypeAdapter(list[BulkItem])


# ---- client -> server ---------------------------------------------------------------------


class DataSyncIn(_Strict):
    type: Literal["data_sync"]
    operation: OperationModel


class SyncConfirmationIn(_Strict):
    type: Literal["sync_confirmation"]
    operation_id: OperationId
    seq: Int | None = None


class ConflictResolutionIn(_Strict):
    type: Literal["conflict_resolution"]
    conflict_id: Annotated[str, Field(min_length=1, max_length=128)]
    resolution: ResolutionKind
    resolved_data: dict[str, Any] | None = None
    timestamp: Timestamp | None = None

    @field_validator("timestamp")
    @classmethod
    def _canonical_time(cls, value: str | None) -> str | None:
        return None if value is None else normalize_timestamp(value)


class AcquireLockIn(_Strict):
    type: Literal["acquire_lock"]
    entity_type: Name
    entity_id: EntityId
    timeout: Int = Field(30_000, ge=1, le=MAX_LOCK_TIMEOUT_MS)
    lock_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None


class ReleaseLockIn(_Strict):
    type: Literal["release_lock"]
    entity_type: Name
    entity_id: EntityId
    lock_id: str | None = None


class PingIn(_Strict):
    type: Literal["ping"]
    timestamp: Any = None


EpochText = Annotated[str, Field(min_length=1, max_length=64)]


class ResumeIn(_Strict):
    type: Literal["resume"]
    since: Int = Field(ge=0)
    # The epoch `since` was read in (connection_established, snapshot); another one than the
    # store's current epoch gets resync_required. Without it, seqs alone decide.
    epoch: EpochText | None = None


class SnapshotRequestIn(_Strict):
    type: Literal["snapshot_request"]
    entity_types: list[Name] | None = None


class RefreshTokenIn(_Strict):
    """A new token for the live connection (JWT_SECRET_KEY): it must name the same store,
    terminal and terminal type. Answered token_refreshed, or error 4003 (the old one stays)."""

    type: Literal["refresh_token"]
    token: Annotated[str, Field(min_length=1, max_length=4096)]


class PerformanceMetricsIn(_Strict):
    model_config = ConfigDict(extra="allow", frozen=True)
    type: Literal["performance_metrics"]
    response_time: Number | None = Field(None, ge=0)
    memory_usage: Number | None = Field(None, ge=0)
    cache_hit_rate: Number | None = Field(None, ge=0, le=1)


IncomingMessage = Annotated[
    DataSyncIn
    | SyncConfirmationIn
    | ConflictResolutionIn
    | AcquireLockIn
    | ReleaseLockIn
    | PingIn
    | ResumeIn
    | SnapshotRequestIn
    | PerformanceMetricsIn
    | RefreshTokenIn,
    Field(discriminator="type"),
]
_incoming = TypeAdapter(IncomingMessage)
# The `type` literal of every model of the union: one list of client messages, not two.
INCOMING_TYPES = frozenset(
    get_args(model.model_fields["type"].annotation)[0]
    for model in get_args(get_args(IncomingMessage)[0])
)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(_clip(str(p), 40) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def parse_incoming(raw: dict[str, Any]) -> IncomingMessage:
    """Validate one decoded client message; InvalidMessage (4006) names what is wrong.

    The reason starts with the message type and the path of the offending field, e.g.
    ``invalid data_sync: data_sync.operation.version: Input should be greater than or equal
    to 1``; nothing but InvalidMessage is raised, whatever `raw` holds.
    """
    if not isinstance(raw, dict):
        raise InvalidMessage("a message must be an object (map)")
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in INCOMING_TYPES:
        raise InvalidMessage(f"unknown message type {_clip(repr(kind), 60)}")
    try:
        return _incoming.validate_python(raw)
    except ValidationError as exc:
        raise InvalidMessage(f"invalid {kind}: {_first_error(exc)}") from None


# ---- server -> client (documentation of the wire; built as dicts below) ---------------------


class ConnectionEstablished(_Strict):
    type: Literal["connection_established"]
    terminal_id: str
    terminal_type: TerminalType
    store_id: str
    session_id: str
    server_time: str
    last_seq: int
    epoch: str  # names the store's seq stream; a restore starts another one
    heartbeat_interval: float
    encoding: Literal["json", "msgpack"]


class TokenRefreshed(_Strict):
    """The answer to refresh_token: the connection is now closed 4003 only after `expires_at`
    (the new token's `exp`; null in open mode, where connections never expire)."""

    type: Literal["token_refreshed"]
    expires_at: str | None
    server_time: str


class Pong(_Strict):
    type: Literal["pong"]
    server_time: str
    timestamp: Any = None


class SyncConfirmation(_Strict):
    type: Literal["sync_confirmation"]
    operation_id: str
    seq: int | None
    version: int | None
    status: ConfirmStatus
    conflict_resolved: bool
    entity_type: str
    entity_id: str
    server_time: str


class SyncError(_Strict):
    type: Literal["sync_error"]
    operation_id: str | None
    code: int
    error: str
    entity_type: str | None
    entity_id: str | None


class SyncConflict(_Strict):
    type: Literal["sync_conflict"]
    operation_id: str
    conflict_id: str
    entity_type: str
    entity_id: str
    policy: str
    local_data: dict[str, Any]
    local_version: int
    server_data: dict[str, Any]
    server_version: int


class PushedOperation(_Strict):
    id: str
    seq: int
    entity_type: str
    entity_id: str
    operation: OpKind
    data: dict[str, Any]
    # None for BULK_UPDATE: each item of data.updates carries its own version.
    version: int | None
    deleted: bool
    timestamp: str
    terminal_id: str
    user_id: str | None
    priority: Priority
    server_time: str


class DataSyncPush(_Strict):
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


class LockAcquired(_Strict):
    type: Literal["lock_acquired"]
    lock_id: str
    entity_type: str
    entity_id: str
    expires_at: str


class LockFailed(_Strict):
    type: Literal["lock_failed"]
    lock_id: str | None
    entity_type: str
    entity_id: str
    reason: str
    locked_by: str | None
    locked_until: str | None


class LockReleased(_Strict):
    type: Literal["lock_released"]
    lock_id: str | None
    entity_type: str
    entity_id: str
    released: bool  # false when this terminal held no lock on the entity


class SnapshotEntity(_Strict):
    entity_type: str
    entity_id: str
    version: int
    data: dict[str, Any]
    deleted: bool


class Snapshot(_Strict):
    """One page of the store's state at `seq`: pages 0.. up to the one with `complete`, each
    within MAX_WS_MESSAGE_SIZE, one after the other with no push between them."""

    type: Literal["snapshot"]
    store_id: str
    seq: int
    epoch: str
    page: int = 0
    complete: bool = True
    entities: list[SnapshotEntity]


class ResyncRequired(_Strict):
    type: Literal["resync_required"]
    since: int
    oldest_seq: int
    last_seq: int
    epoch: str
    reason: str


class ErrorMessage(_Strict):
    type: Literal["error"]
    code: int
    error: str


class MessageBatch(_Strict):
    type: Literal["message_batch"]
    messages: list[dict[str, Any]]
    count: int


# ---- to monitors (docs/protocol.md §6) ------------------------------------------------------


class _ToMonitor(_Strict):
    # What the server sends monitors is checked field by field: a field the page does not know
    # about is a drift between the server and this documentation.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TerminalStatusUpdate(_ToMonitor):
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
    ops: int
    conflicts: int
    bytes_in: int
    bytes_out: int
    reconnects: int
    response_time_ms: float | None
    memory_mb: float | None
    cache_hit_rate: float | None
    # The seq the server has sent the terminal up to, and the last one it acknowledged having
    # received (`sync_confirmation` from the terminal): the gap is what has not arrived.
    sent_seq: int
    acked_seq: int
    worker: str
    server_time: str


class TerminalList(_ToMonitor):
    """The store's terminals: all of them when a monitor connects (`full`), then every few
    seconds those whose figures changed."""

    type: Literal["terminal_list"]
    store_id: str
    full: bool
    terminals: list[TerminalStatusUpdate]
    server_time: str


class SyncActivity(_ToMonitor):
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
    seq: int | None
    status: str
    detail: dict[str, Any]
    server_time: str


class PerformanceMetrics(_ToMonitor):
    """A terminal's own report (`scope` terminal, relayed as sent, extra fields included), or
    the server's figures for the monitor's store every few seconds (`scope` server)."""

    type: Literal["performance_metrics"]
    scope: Literal["terminal", "server"]
    store_id: str
    terminal_id: str | None
    terminal_type: TerminalType | None
    metrics: dict[str, Any]
    server_time: str


class SystemAlert(_ToMonitor):
    """An alert of the monitor's store; the same `alert_id` comes again with `active: false`
    when its condition is over. Thresholds: docs/configuration.md (MONITOR_ALERT_*)."""

    type: Literal["system_alert"]
    alert_id: str
    kind: Literal["latency", "terminal_offline", "conflict_rate", "terminal_memory"]
    severity: Literal["info", "warning", "critical"]
    store_id: str
    terminal_id: str | None
    message: str
    value: float
    threshold: float
    active: bool
    since: str
    server_time: str


# ---- builders of outgoing messages ---------------------------------------------------------


def pong_msg(timestamp: Any) -> dict[str, Any]:
    return {"type": "pong", "server_time": utc_now_iso(), "timestamp": timestamp}


def token_refreshed_msg(expires_at: int | None) -> dict[str, Any]:
    latest = 253_402_300_799  # 9999-12-31T23:59:59Z, the last moment a timestamp can name
    return {
        "type": "token_refreshed",
        "expires_at": format_epoch(None if expires_at is None else min(expires_at, latest)),
        "server_time": utc_now_iso(),
    }


def error_msg(code: int, reason: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "error": reason}


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

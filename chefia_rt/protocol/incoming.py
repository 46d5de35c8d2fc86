"""Client-to-server messages as pydantic models, and their validation (docs/protocol.md).

Unknown fields are ignored (newer clients); a schema violation is InvalidMessage (4006).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from chefia_rt.errors import InvalidMessage
from chefia_rt.protocol.common import (
    MAX_BULK_UPDATES,
    MAX_LOCK_TIMEOUT_MS,
    MAX_VERSION,
    Bool,
    EntityId,
    Int,
    Name,
    Number,
    OperationId,
    OpKind,
    Priority,
    ResolutionKind,
    StrictModel,
    Timestamp,
    normalize_timestamp,
)


class BulkItem(StrictModel):
    entity_id: EntityId
    data: dict[str, Any] = Field(default_factory=dict)
    version: Int = Field(ge=1, lt=MAX_VERSION)


class OperationModel(StrictModel):
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


class DataSyncIn(StrictModel):
    type: Literal["data_sync"]
    operation: OperationModel


class SyncConfirmationIn(StrictModel):
    type: Literal["sync_confirmation"]
    operation_id: OperationId
    seq: Int | None = None


class ConflictResolutionIn(StrictModel):
    type: Literal["conflict_resolution"]
    conflict_id: Annotated[str, Field(min_length=1, max_length=128)]
    resolution: ResolutionKind
    resolved_data: dict[str, Any] | None = None
    timestamp: Timestamp | None = None

    @field_validator("timestamp")
    @classmethod
    def _canonical_time(cls, value: str | None) -> str | None:
        return None if value is None else normalize_timestamp(value)


class AcquireLockIn(StrictModel):
    type: Literal["acquire_lock"]
    entity_type: Name
    entity_id: EntityId
    timeout: Int = Field(30_000, ge=1, le=MAX_LOCK_TIMEOUT_MS)
    lock_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None


class ReleaseLockIn(StrictModel):
    type: Literal["release_lock"]
    entity_type: Name
    entity_id: EntityId
    lock_id: str | None = None


class PingIn(StrictModel):
    type: Literal["ping"]
    timestamp: Any = None


EpochText = Annotated[str, Field(min_length=1, max_length=64)]


class ResumeIn(StrictModel):
    type: Literal["resume"]
    since: Int = Field(ge=0)
    # The epoch `since` was read in (connection_established, snapshot); another one than the
    # store's current epoch gets resync_required. Without it, seqs alone decide.
    epoch: EpochText | None = None


class SnapshotRequestIn(StrictModel):
    type: Literal["snapshot_request"]
    entity_types: list[Name] | None = None


class RefreshTokenIn(StrictModel):
    """A new token for the live connection (JWT_SECRET_KEY): it must name the same store,
    terminal and terminal type. Answered token_refreshed, or error 4003 (the old one stays)."""

    type: Literal["refresh_token"]
    token: Annotated[str, Field(min_length=1, max_length=4096)]


class PerformanceMetricsIn(StrictModel):
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

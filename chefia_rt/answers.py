"""What the write pipeline answers each operation or resolution, and how it reports it.

The sender gets one message (a confirmation, a conflict or an error: docs/protocol.md §7); the
`AnswerSink` gets one `Answer`, from which the metrics, the worker's stats, the session's counts
and the monitors' feed all take their figures, so an answer is counted in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from chefia_rt.domain import Operation, OpRecord, Resolution
from chefia_rt.hub import Session
from chefia_rt.protocol.messages import (
    sync_confirmation_msg,
    sync_conflict_msg,
    sync_error_msg,
)
from chefia_rt.sync.engine import Outcome, conflict_id_for
from chefia_rt.sync.policies import PolicyTable

Item = Operation | Resolution


@dataclass(slots=True, frozen=True)
class Answer:
    """What one operation or resolution was answered, for whoever counts answers."""

    session: Session
    entity_type: str | None
    operation: str  # CREATE, UPDATE, ..., RESOLUTION
    status: str  # the confirmation's status, "conflict", "error" or "retry"
    # Seconds from arrival to answer, for new work only (not duplicates, errors or refusals).
    latency: float | None
    policy: str | None  # the entity type's conflict policy, when a conflict was raised or settled
    conflicted: bool  # a conflict raised (pending) or settled by this answer
    noted: Operation | OpRecord | None  # what the monitors' conflict feed shows, if anything


class AnswerSink(Protocol):
    """Where the pipeline reports its answers and commits."""

    def answered(self, answer: Answer) -> None: ...

    def committed(self, operations: int, seconds: float, laps: Mapping[str, float]) -> None:
        """A batch of `operations` committed in `seconds` and was answered; `laps`: seconds by
        stage, from the lease check to the last answer (`Laps`)."""

    async def flush(self) -> None:
        """After each batch's answers: send what was gathered from them (the conflicts)."""


def reply(item: Item, outcome: Outcome, server_time: str, policies: PolicyTable) -> dict[str, Any]:
    """The message that answers an item the batch decided."""
    if outcome.status == "error":
        assert outcome.error is not None
        return sync_error_msg(
            outcome.id, outcome.error.code, outcome.error.reason, *item_entity(item)
        )
    if outcome.status == "conflict":
        assert outcome.conflict is not None
        return conflict_msg(outcome, policies[outcome.conflict.operation.entity_type].policy)
    return confirmation_msg(outcome, server_time)


def confirmation_msg(outcome: Outcome, server_time: str) -> dict[str, Any]:
    record = outcome.record
    assert record is not None
    return sync_confirmation_msg(
        operation_id=record.id,
        seq=record.seq,
        version=record.version,
        status=outcome.status,
        conflict_resolved=record.conflict_resolved,
        entity_type=record.entity_type,
        entity_id=record.entity_id,
        server_time=server_time,
    )


def conflict_msg(outcome: Outcome, policy: str) -> dict[str, Any]:
    conflict = outcome.conflict
    assert conflict is not None
    op = conflict.operation
    return sync_conflict_msg(
        operation_id=op.id,
        conflict_id=conflict.id,
        entity_type=op.entity_type,
        entity_id=op.entity_id,
        policy=policy,
        local_data=op.data,
        local_version=op.version,
        server_data=conflict.server_data,
        server_version=conflict.server_version,
    )


def counted(
    session: Session,
    item: Item,
    received: float,
    outcome: Outcome,
    done: float,
    policies: PolicyTable,
) -> Answer:
    """The answer to an item the batch decided, as the sink sees it."""
    record = outcome.record
    labels: tuple[str | None, str]
    if record is not None:
        labels = (record.entity_type, record.operation)
    elif outcome.conflict is not None:
        labels = (outcome.conflict.operation.entity_type, outcome.conflict.operation.operation)
    else:
        labels = item_labels(item)
    fresh = outcome.status not in ("duplicate", "error")
    raised = outcome.status == "conflict"
    settled = fresh and record is not None and record.conflict_resolved
    policy = None
    if raised or settled:
        policy = policies[labels[0] or ""].policy
    noted: Operation | OpRecord | None = None
    if raised:
        assert outcome.conflict is not None
        noted = outcome.conflict.operation
    elif settled:
        noted = record
    return Answer(
        session,
        labels[0],
        labels[1],
        outcome.status,
        done - received if fresh else None,
        policy,
        raised or settled,
        noted,
    )


def refused(session: Session, item: Item, retry: bool) -> Answer:
    """The answer to an item that did not join its batch or whose batch failed (`refusal`)."""
    entity_type, operation = item_labels(item)
    status = "retry" if retry else "error"
    return Answer(session, entity_type, operation, status, None, None, False, None)


def refusal(item: Item, code: int, reason: str) -> dict[str, Any]:
    return sync_error_msg(item_id(item), code, reason, *item_entity(item))


def own_op_id(item: Item) -> str:
    """The operation an item writes: a resolution writes its conflict's operation."""
    if isinstance(item, Operation):
        return item.id
    return item.conflict_id.removeprefix(conflict_id_for(""))


def item_labels(item: Item) -> tuple[str | None, str]:
    """(entity_type, operation) of an item with no outcome record to name them."""
    if isinstance(item, Operation):
        return item.entity_type, item.operation
    return None, "RESOLUTION"


def item_id(item: Item) -> str:
    return item.id if isinstance(item, Operation) else item.conflict_id


def item_entity(item: Item) -> tuple[str | None, str | None]:
    if isinstance(item, Operation):
        return item.entity_type, item.entity_id
    return None, None

"""What both directions of the wire share: limits, enums, the canonical timestamp, the strict
field types. The messages themselves are in `incoming` (client to server) and `outgoing` (server
to client); docs/protocol.md describes them for terminal developers.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, overload

from pydantic import BaseModel, ConfigDict, Field

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


class StrictModel(BaseModel):
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

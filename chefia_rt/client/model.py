"""What the terminal client hands the application: the events of the store's stream, the answers
to its operations, its counters, how it spaces reconnects and why it stopped (`chefia_rt.client`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from chefia_rt.errors import Code


class ClientStopped(Exception):
    """The client gave up or was told to stop; `code` is the close code that stopped it."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class OutboxFull(Exception):
    """`send` found no room in the outbox within its timeout."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """How reconnects are spaced: initial * factor**n, at most `maximum`, each shortened by a
    random part of up to `jitter` of itself so that terminals cut together do not return
    together. `max_attempts` failed attempts in a row, or `max_elapsed` seconds without a
    connection, stop the client (None: never)."""

    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.5
    max_attempts: int | None = None
    max_elapsed: float | None = None
    # A connection that lived this long resets the backoff; shorter ones (closed again at once,
    # e.g. for the rate limit) keep growing it.
    stable_after: float = 2.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before reconnect attempt number `attempt` (0 for the first)."""
        base = min(self.maximum, self.initial * self.factor**attempt)
        return base * (1 - self.jitter * rand())


# Closes that retrying cannot fix: the client stops and says why.
FATAL_CLOSES = frozenset(
    {
        Code.MESSAGE_TOO_BIG,
        Code.INVALID_TERMINAL_ID,
        Code.INVALID_TERMINAL_TYPE,
        Code.AUTH_FAILED,
        Code.REPLACED,
        Code.INVALID_MESSAGE,
    }
)


@dataclass(slots=True)
class Reconnects:
    """A client's attempts to connect under its Backoff: which URL is next, how long to wait
    before it, and when to give up. Times are monotonic seconds."""

    backoff: Backoff
    down_since: float  # since when the client has had no established connection
    attempt: int = 0  # failed attempts in a row: picks the URL and grows the delay

    def url(self, urls: Sequence[str]) -> str:
        return urls[self.attempt % len(urls)]

    def ended(self, started: float | None, code: int | None, now: float) -> str | None:
        """An attempt ended (`started`: when its connection was established, None if it never
        was; `code`: the server's close code): why to stop, or None to try again after `delay`."""
        if code in FATAL_CLOSES:
            return f"closed by the server with {code}"
        backoff = self.backoff
        if started is not None:
            self.down_since = now
            if now - started >= backoff.stable_after:
                self.attempt = -1
        self.attempt += 1
        if backoff.max_attempts is not None and self.attempt >= backoff.max_attempts:
            return f"gave up after {self.attempt} failed attempts"
        if backoff.max_elapsed is not None and now - self.down_since > backoff.max_elapsed:
            return f"no connection for {now - self.down_since:.0f}s"
        return None

    def delay(self, rand: Callable[[], float]) -> float:
        return self.backoff.delay(self.attempt, rand)


@dataclass(frozen=True, slots=True)
class StoreOp:
    """One operation of the store, handed over in seq order. A pushed one carries the entity's
    full state in `operation["data"]`; the terminal's own carries what it sent (a patch for an
    UPDATE) plus the server's `seq`, `version` and `status`."""

    seq: int
    operation: dict[str, Any]
    own: bool


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The store's whole state at `seq` (after resync_required); the stream goes on after it."""

    seq: int
    entities: list[dict[str, Any]]
    epoch: str | None = None  # the epoch of the stream that goes on after it


Event = StoreOp | Snapshot


@dataclass(frozen=True, slots=True)
class Answer:
    """The server's final word on one operation: `confirmed` (sync_confirmation, also for a
    `duplicate`), `conflict` (sync_conflict: needs a person) or `rejected` (sync_error that a
    retry cannot fix, e.g. 4008)."""

    operation_id: str
    kind: Literal["confirmed", "conflict", "rejected"]
    message: dict[str, Any]

    @property
    def seq(self) -> int | None:
        seq = self.message.get("seq")
        return seq if isinstance(seq, int) else None


@dataclass(slots=True)
class ClientStats:
    """Counters for the application's monitoring (and the fault suite's report)."""

    connects: int = 0
    sent: int = 0
    resent: int = 0
    confirmed: int = 0
    duplicates: int = 0
    retries: int = 0  # answers 1013/4005/1011 that sent an operation again later
    rejected: int = 0
    resyncs: int = 0
    closes: Counter[int] = field(default_factory=Counter)

    @property
    def reconnects(self) -> int:
        return max(0, self.connects - 1)


def utc_timestamp(moment: datetime | None = None) -> str:
    """An operation timestamp as the server compares them: ISO 8601, milliseconds, UTC."""
    moment = moment or datetime.now(UTC)
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )

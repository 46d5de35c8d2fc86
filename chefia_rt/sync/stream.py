"""One connection's ordered push stream, as a state machine: no I/O, no clock, no tasks.

The stream hands a terminal its store's operations in seq order, each once, and never the
terminal's own. It takes seq `next_seq` only: an older push is a duplicate, a newer one a gap,
which the stream fills from storage (a catch-up) before it goes live again. Resume, snapshot and
the start of every connection use the same catch-up, so the hand-off from stored to live
operations never skips or repeats one.

`StreamCursor` holds that state and answers each event with a decision; the asyncio code that
reads storage and writes frames (hub.Session) does what the decision says. `Reorder` holds a
store's pushes that came before one they follow (each worker publishes after its own commit, so
a later seq may arrive first) until that one comes or the caller gives up waiting.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar


class Mode(enum.Enum):
    PAUSED = "paused"  # nothing flows until the next resume (a snapshot or resume is being read)
    CATCHING_UP = "catching up"  # rows come from storage; live pushes are left to it
    LIVE = "live"  # live pushes are taken in seq order


# ---- decisions ------------------------------------------------------------------------------


class Verdict(enum.Enum):
    """What to do with the push or stored row the event brought (a plain value: the live path
    meets one per session and push)."""

    DELIVER = "deliver"  # send it; a stored row is passed once queued (`delivered`)
    DUPLICATE = "duplicate"  # drop: the stream has passed it already
    OWN_OP = "own op"  # drop: the terminal sent it itself; the stream passes it without echo
    NOT_LIVE = "not live"  # drop: catching up or paused, storage gives it in turn
    SKIP = "skip"  # drop: a stored row that is not the next one the stream takes


DELIVER = Verdict.DELIVER
DUPLICATE = Verdict.DUPLICATE
OWN_OP = Verdict.OWN_OP
NOT_LIVE = Verdict.NOT_LIVE
SKIP = Verdict.SKIP


@dataclass(slots=True)
class CatchUp:
    """Read stored operations after `after` (the stream catches up from `after + 1`); any
    catch-up already running is superseded."""

    after: int


@dataclass(slots=True)
class StopCatchUp:
    """Stop a running catch-up: the stream waits for a resume."""


@dataclass(slots=True)
class GoLive:
    """The catch-up reached the head: live pushes flow from now on, with nothing between."""


_LIVE, _CATCHING_UP = Mode.LIVE, Mode.CATCHING_UP


class StreamError(Exception):
    """The driver fed an event the stream's mode does not allow (a bug in the driver)."""


# ---- the cursor -----------------------------------------------------------------------------


@dataclass(slots=True)
class StreamCursor:
    """Where one connection's stream stands.

    `own_ops` holds ids of operations this terminal sent whose place in the stream is still
    ahead: the stream skips them (no echo), from storage too. Each leaves when the stream passes
    it, or when it is answered without a place ahead, so the set stays as small as the writes in
    flight.
    """

    next_seq: int = 1
    mode: Mode = Mode.PAUSED
    own_ops: set[str] = field(default_factory=set)

    @property
    def live(self) -> bool:
        return self.mode is _LIVE

    # ---- live pushes ------------------------------------------------------------------------

    def push(self, seq: int, op_id: str, own: bool) -> Verdict | CatchUp:
        """A live push of the store arrived; `own` when this terminal sent it."""
        if self.mode is not _LIVE:
            return NOT_LIVE
        if seq < self.next_seq:
            return DUPLICATE
        if seq > self.next_seq:
            return self.resume(self.next_seq - 1)  # a gap: storage has what is missing
        self.next_seq = seq + 1
        if own:
            self.own_ops.discard(op_id)
            return OWN_OP
        return DELIVER

    # ---- pause, resume and the catch-up -----------------------------------------------------

    def pause(self) -> StopCatchUp:
        """Stop the stream until the next resume: no live pushes, no catch-up either (one left
        running while a snapshot or resume position is read would push past the position the
        stream restarts from)."""
        self.mode = Mode.PAUSED
        return StopCatchUp()

    def resume(self, since: int) -> CatchUp:
        """Restart the stream after `since` (a resume's `since`, a snapshot's watermark, or
        where the stream stood), from storage."""
        self.next_seq = since + 1
        self.mode = Mode.CATCHING_UP
        return CatchUp(since)

    def row(self, seq: int, op_id: str) -> Verdict:
        """A row read from storage by the catch-up: DELIVER (then `delivered` once it is
        queued: a pause meanwhile reads it again), OWN_OP or SKIP."""
        self._catching_up()
        if seq != self.next_seq:
            return SKIP
        if op_id in self.own_ops:
            self.own_ops.discard(op_id)
            self.next_seq = seq + 1
            return OWN_OP
        return DELIVER

    def delivered(self, seq: int) -> None:
        """Stored row `seq` (DELIVER by `row`) is queued to the terminal."""
        self._catching_up()
        if seq != self.next_seq:
            raise StreamError(f"row {seq} delivered while the stream expects {self.next_seq}")
        self.next_seq = seq + 1

    def page_end(self, rows: int, limit: int, head: int) -> GoLive | CatchUp:
        """A catch-up page of `rows` rows (of at most `limit`) is through, and the store's head
        is `head` now. Going live happens in the same step as this check, so no push slips
        between."""
        self._catching_up()
        if rows < limit and self.next_seq - 1 >= head:
            self.mode = Mode.LIVE
            return GoLive()
        return CatchUp(self.next_seq - 1)

    # ---- own operations ---------------------------------------------------------------------

    def own_op_queued(self, op_id: str) -> None:
        """This terminal sent operation `op_id`: hidden from its stream from now on."""
        self.own_ops.add(op_id)

    def own_op_answered(self, op_id: str, seq: int | None) -> None:
        """`op_id` was answered with its place `seq` (None: it got none): it stays hidden only
        while that place is still ahead."""
        if seq is None or seq < self.next_seq:
            self.own_ops.discard(op_id)

    def stop(self) -> None:
        """The connection ended."""
        self.mode = Mode.PAUSED
        self.own_ops.clear()

    def _catching_up(self) -> None:
        if self.mode is not _CATCHING_UP:
            raise StreamError(f"a catch-up event while the stream is {self.mode.value}")


# ---- a store's early pushes -----------------------------------------------------------------

T = TypeVar("T")


@dataclass(slots=True)
class Reorder(Generic[T]):
    """Pushes of one store that came before one they follow, held back by seq until it comes."""

    held: dict[int, T] = field(default_factory=dict)

    def arrive(self, pushes: Iterable[tuple[int | None, T]], expected: int) -> list[T]:
        """What goes on now, in order, of `pushes` (with their seqs; None: no place in the
        stream) and of those held before them. `expected` is the seq the live streams want next
        (0: none is live, so everything goes on as it comes and nothing is held). A push older
        than `expected` is dropped; one ahead of it is held."""
        if not expected:
            return [push for seq, push in pushes if seq is not None]
        ready: list[T] = []
        held = self.held
        for seq, push in pushes:
            if seq is None or seq < expected:
                continue  # every live stream has it already
            if seq > expected:
                held[seq] = push
                continue
            ready.append(push)
            expected += 1
            while expected in held:
                ready.append(held.pop(expected))
                expected += 1
        return ready

    def give_up(self) -> list[T]:
        """The pushes before the held ones did not come: the held ones go on, in order (the
        streams see the gap and fill it from storage)."""
        held, self.held = self.held, {}
        return [held[seq] for seq in sorted(held)]

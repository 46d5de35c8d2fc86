"""The terminal client's view of its store's seq stream, without I/O: every seq handed to the
application once, in order, whichever way it came (a push, the terminal's own confirmation, a
snapshot).

Confirmations travel in the server's urgent lane and may overtake pushes of lower seqs, so what
comes early is held until the gap before it fills, and the watermark is the highest seq up to
which the application has everything. The position the application took (`delivered`) is what
the state file keeps: a restart resumes after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chefia_rt.client.model import Event, Snapshot


class ClientStream:
    """The watermark, its epoch, the seqs held ahead of a gap and a snapshot being paged in.
    Times are monotonic seconds, passed in by the caller."""

    def __init__(
        self,
        since: int | None,
        epoch: str | None,
        events_size: int,
        on_event: Callable[[Event], None],
    ) -> None:
        self.events_size = events_size  # seqs held ahead of a gap, at most
        self._on_event = on_event
        # The highest seq up to which the application has every operation (None: not yet
        # connected without a `since`; the first connection then starts at the store's head).
        self.watermark = since
        # The epoch of the store's seq stream the watermark belongs to (None: not known yet).
        self.epoch = epoch
        self.awaiting_snapshot = False  # nothing is handed over until the snapshot is complete
        self.stalled_since: float | None = None  # when a gap opened
        self._ahead: dict[int, Event] = {}  # seqs above watermark + 1, waiting for the gap
        self._snapshot_entities: list[dict[str, Any]] = []  # the pages of a snapshot so far
        # The watermark of what the application took (kept in the state file), and its epoch (a
        # Snapshot not taken yet may have moved `epoch` on).
        self.delivered = since
        self.delivered_epoch = epoch
        self.dirty = False  # `delivered` changed since the state file was last written

    @property
    def next_seq(self) -> int:
        return (self.watermark or 0) + 1

    def resume_params(self) -> dict[str, str]:
        """Where a connection asks the stream to resume (none: at the store's head)."""
        if self.watermark is None:
            return {}
        if self.epoch is None:
            return {"since": str(self.watermark)}
        return {"since": str(self.watermark), "epoch": self.epoch}

    def resume_at(self, watermark: int | None, epoch: str | None) -> None:
        """The position a state file kept: the stream goes on after what the application took."""
        self.watermark = self.delivered = watermark
        self.epoch = self.delivered_epoch = epoch

    def greeted(self, last_seq: int, server_epoch: str | None, now: float) -> None:
        """A connection was established; the server's stream is at `last_seq`."""
        if self.watermark is None:
            self.watermark = last_seq
            self.epoch = server_epoch
            if self.delivered is None:
                self.delivered = self.watermark
                self.delivered_epoch = server_epoch
                self.dirty = True
        elif self.epoch is None:
            self.epoch = server_epoch  # resumed by seqs alone: the stream is this one from now
            if self.delivered_epoch is None:
                self.delivered_epoch = server_epoch
        # The stream restarts after the watermark; what is held ahead of a gap may come again
        # (dropped then as a repeat) and the gap gets a fresh timeout.
        self.stalled_since = now if self._ahead else None
        self.awaiting_snapshot = False
        self._snapshot_entities = []

    def took(self, event: Event) -> None:
        """The application has `event`: a restart resumes after it."""
        self.delivered = event.seq
        if isinstance(event, Snapshot):
            self.delivered_epoch = event.epoch
        self.dirty = True

    def snapshot_page(
        self,
        seq: int,
        epoch: str | None,
        index: int,
        complete: bool,
        entities: list[Any],
        now: float,
    ) -> None:
        """One page of a snapshot; the one marked complete hands the whole state over."""
        if index == 0:
            self._snapshot_entities = []
        self._snapshot_entities.extend(entities)  # as the server sent them
        if not complete:
            return
        entities, self._snapshot_entities = self._snapshot_entities, []
        self.awaiting_snapshot = False
        self.watermark = seq
        self.epoch = epoch
        self._ahead = {s: e for s, e in self._ahead.items() if s > seq}
        self._on_event(Snapshot(seq, entities, self.epoch))
        self.advance(now)

    def arrive(self, seq: int, event: Event, now: float) -> None:
        """Take one seq of the stream: hand over everything that is now contiguous."""
        if self.watermark is None or seq <= self.watermark or seq in self._ahead:
            return  # had it already (a replay after a resume, or a duplicate's confirmation)
        if len(self._ahead) >= self.events_size and seq != self.next_seq:
            # The gap-timeout resume sends it again; the seq that fills the gap is always
            # taken, or a full hold would refuse it on every resume.
            return
        self._ahead[seq] = event
        if not self.awaiting_snapshot:  # else held: the snapshot says where the stream is
            self.advance(now)

    def advance(self, now: float) -> None:
        advanced = False
        while (event := self._ahead.pop(self.next_seq, None)) is not None:
            self.watermark = self.next_seq
            advanced = True
            self._on_event(event)
        # A gap times out only when the stream stands still: under load, confirmations often
        # run ahead of pushes, and the gap moves on all the time.
        if not self._ahead:
            self.stalled_since = None
        elif advanced or self.stalled_since is None:
            self.stalled_since = now

"""The cluster-wide terminal directory: every terminal of the deployment, as every worker sees it.

Each worker tells all workers (bus signals on the "terminal" topic) when one of its sessions opens
or ends, and every few seconds sends the figures of all its sessions in one signal. Every worker
folds those signals into its own `TerminalDirectory`, so the monitor feed, /metrics and anything
else can read the whole deployment's terminals locally, without asking anyone.

Rules that keep the picture right:
- A terminal's current session is the one opened last (`opened_at`, as takeovers order them). An
  event about an older session is ignored: a takeover (4004) sends no "disconnect" at all, and a
  late one could not turn the newer session offline anyway. So the monitor never sees a false
  "disconnected" when a terminal reconnects on another worker.
- Signals are best effort across workers, so the periodic figures are also the truth about what a
  worker holds: a session they list that the directory missed is taken as connected, and a session
  of that worker they no longer list is taken as gone (its disconnect signal was lost).
- A worker whose figures stop (it died, or its bus link did) has its terminals marked offline
  after `stale_after` seconds. A terminal offline for `retention` seconds is forgotten.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

log = logging.getLogger("chefia_rt.terminals")

TOPIC = "terminal"
Status = Literal["online", "offline", "error"]
# Close codes of a session that ended because something went wrong on the terminal's side or in
# between (too slow, too big, abusive, rate limited, server error): "error", not a plain "offline".
ERROR_CLOSE_CODES = frozenset({1009, 1011, 1013, 4005, 4006})
# What a terminal may report about itself (performance_metrics) that the directory keeps.
REPORTED = ("response_time_ms", "memory_mb", "cache_hit_rate")


@dataclass(frozen=True, slots=True)
class TerminalView:
    """One terminal as the directory knows it (times are epoch seconds)."""

    store_id: str
    terminal_id: str
    terminal_type: str
    status: Status
    connected_since: float | None
    last_seen: float
    disconnected_at: float | None
    ops: int
    conflicts: int
    bytes_in: int
    bytes_out: int
    reconnects: int
    response_time_ms: float | None
    memory_mb: float | None
    cache_hit_rate: float | None
    worker: str
    # The seq of the store's stream the server has sent the terminal up to, and the last one the
    # terminal said it received (its `sync_confirmation` receipts): a terminal that stays
    # behind is one whose pushes do not arrive.
    sent_seq: int = 0
    acked_seq: int = 0


class SessionLike(Protocol):
    """What the directory's signals read of a hub session (hub.Session)."""

    terminal_id: str
    terminal_type: str
    store_id: str
    session_id: str
    opened_at: float
    last_seen: float  # monotonic
    bytes_in: int
    bytes_out: int
    ops: int
    conflicts: int
    metrics: dict[str, Any] | None
    acked_seq: int

    @property
    def next_seq(self) -> int: ...


# A change the directory made, for listeners (the monitor feed): what happened and the result.
ChangeKind = Literal["connected", "disconnected", "figures", "forgotten"]
Listener = Callable[[ChangeKind, TerminalView], None]


# ---- the signals a worker sends -----------------------------------------------------------------


_NOTHING_REPORTED: dict[str, float | None] = dict.fromkeys(REPORTED)


def reported_figures(metrics: dict[str, Any] | None) -> dict[str, float | None]:
    """The figures a terminal reported (performance_metrics) under the directory's names.

    `response_time` is in milliseconds and `memory_usage` in megabytes (docs/protocol.md §4.9);
    `cache_hit_rate` is a fraction 0..1.
    """
    if not metrics:
        return dict(_NOTHING_REPORTED)
    return {
        "response_time_ms": _number(metrics.get("response_time")),
        "memory_mb": _number(metrics.get("memory_usage")),
        "cache_hit_rate": _number(metrics.get("cache_hit_rate")),
    }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def session_entry(session: SessionLike, now: float | None = None) -> dict[str, Any]:
    """One session's figures as a signal carries them."""
    wall = time.time() if now is None else now
    idle = max(0.0, time.monotonic() - session.last_seen)
    return {
        "store_id": session.store_id,
        "terminal_id": session.terminal_id,
        "terminal_type": session.terminal_type,
        "session_id": session.session_id,
        "opened_at": session.opened_at,
        "last_seen": wall - idle,
        "ops": session.ops,
        "conflicts": session.conflicts,
        "bytes_in": session.bytes_in,
        "bytes_out": session.bytes_out,
        "sent_seq": session.next_seq - 1,
        "acked_seq": session.acked_seq,
        **reported_figures(session.metrics),
    }


def connect_signal(session: SessionLike, worker: str) -> dict[str, Any]:
    """A session of this worker opened."""
    return {"event": "connect", "worker": worker, "session": session_entry(session)}


def disconnect_signal(session: SessionLike, worker: str, close_code: int | None) -> dict[str, Any]:
    """A session of this worker ended and no newer session of its terminal replaced it."""
    return {
        "event": "disconnect",
        "worker": worker,
        "session": session_entry(session),
        "close_code": close_code,
        "at": time.time(),
    }


def figures_signal(sessions: Iterable[SessionLike], worker: str) -> dict[str, Any]:
    """Every session this worker holds, with its figures: sent every few seconds."""
    now = time.time()
    return {
        "event": "figures",
        "worker": worker,
        "sessions": [session_entry(s, now) for s in sessions],
    }


# ---- the directory ------------------------------------------------------------------------------


class _Entry:
    """A terminal's mutable record; views are frozen copies."""

    __slots__ = (
        "acked_seq",
        "bytes_in",
        "bytes_out",
        "cache_hit_rate",
        "conflicts",
        "connected_since",
        "disconnected_at",
        "ended",
        "last_seen",
        "memory_mb",
        "opened_at",
        "ops",
        "reconnects",
        "response_time_ms",
        "sent_seq",
        "session_id",
        "status",
        "store_id",
        "terminal_id",
        "terminal_type",
        "worker",
    )

    def __init__(self, store_id: str, terminal_id: str) -> None:
        self.store_id = store_id
        self.terminal_id = terminal_id
        self.terminal_type = "pos"
        self.status: Status = "offline"
        self.session_id = ""
        self.opened_at = 0.0
        self.connected_since: float | None = None
        self.last_seen = 0.0
        self.disconnected_at: float | None = None
        # The current session ended for sure (its worker said so), rather than its worker
        # falling silent: only a silent worker's figures may bring the terminal back online.
        self.ended = False
        self.ops = 0
        self.conflicts = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.reconnects = -1  # the first connect makes it 0
        self.response_time_ms: float | None = None
        self.memory_mb: float | None = None
        self.cache_hit_rate: float | None = None
        self.sent_seq = 0
        self.acked_seq = 0
        self.worker = ""

    def figures(self) -> tuple[Any, ...]:
        return (
            self.ops,
            self.conflicts,
            self.bytes_in,
            self.bytes_out,
            self.response_time_ms,
            self.memory_mb,
            self.cache_hit_rate,
            self.sent_seq,
            self.acked_seq,
        )

    def take(self, session: dict[str, Any]) -> None:
        """Copy a session entry's figures (the session is this entry's current one)."""
        self.terminal_type = str(session["terminal_type"])
        self.last_seen = max(self.last_seen, float(session["last_seen"]))
        self.ops = int(session["ops"])
        self.conflicts = int(session["conflicts"])
        self.bytes_in = int(session["bytes_in"])
        self.bytes_out = int(session["bytes_out"])
        self.sent_seq = int(session.get("sent_seq", 0))
        self.acked_seq = int(session.get("acked_seq", 0))
        # A terminal that stopped reporting keeps its last figures.
        if (value := session.get("response_time_ms")) is not None:
            self.response_time_ms = float(value)
        if (value := session.get("memory_mb")) is not None:
            self.memory_mb = float(value)
        if (value := session.get("cache_hit_rate")) is not None:
            self.cache_hit_rate = float(value)

    def view(self) -> TerminalView:
        return TerminalView(
            store_id=self.store_id,
            terminal_id=self.terminal_id,
            terminal_type=self.terminal_type,
            status=self.status,
            connected_since=self.connected_since,
            last_seen=self.last_seen,
            disconnected_at=self.disconnected_at,
            ops=self.ops,
            conflicts=self.conflicts,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            reconnects=max(0, self.reconnects),
            response_time_ms=self.response_time_ms,
            memory_mb=self.memory_mb,
            cache_hit_rate=self.cache_hit_rate,
            worker=self.worker,
            sent_seq=self.sent_seq,
            acked_seq=self.acked_seq,
        )


class TerminalDirectory:
    """Every terminal of the deployment, folded from "terminal" signals (see the module doc)."""

    def __init__(
        self,
        *,
        stale_after: float = 10.0,
        retention: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stale_after = stale_after
        self.retention = retention
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._workers: dict[str, float] = {}  # worker -> when we last heard from it
        self._listeners: list[tuple[Listener, Callable[[str], bool] | None]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def subscribe(self, listener: Listener, stores: Callable[[str], bool] | None = None) -> None:
        """Call `listener(kind, view)` after every change (status, figures, forgotten), only of
        the stores for which `stores(store_id)` is true when given: a figures round changes
        every busy terminal, and a view nobody reads is not worth building."""
        self._listeners.append((listener, stores))

    def views(self, store_id: str | None = None) -> list[TerminalView]:
        """The terminals of one store (or of all), sorted by store and terminal id."""
        entries = (
            self._entries.values()
            if store_id is None
            else (e for e in self._entries.values() if e.store_id == store_id)
        )
        return [e.view() for e in sorted(entries, key=lambda e: (e.store_id, e.terminal_id))]

    def get(self, store_id: str, terminal_id: str) -> TerminalView | None:
        entry = self._entries.get((store_id, terminal_id))
        return None if entry is None else entry.view()

    def set_reported(self, store_id: str, terminal_id: str, figures: dict[str, Any]) -> None:
        """A terminal's own report (performance_metrics), known before the next figures round."""
        entry = self._entries.get((store_id, terminal_id))
        if entry is None:
            return
        before = entry.figures()
        for name in REPORTED:
            value = _number(figures.get(name))
            if value is not None:
                setattr(entry, name, value)
        if entry.figures() != before:
            self._emit("figures", entry)

    # ---- signals ---------------------------------------------------------------------------

    def handle(self, payload: dict[str, Any]) -> None:
        """Fold one "terminal" signal in (the bus calls this on every worker)."""
        worker = str(payload.get("worker", ""))
        now = self._clock()
        self._workers[worker] = now
        event = payload.get("event")
        if event == "connect":
            self._connect(payload["session"], worker, now)
        elif event == "disconnect":
            code = payload.get("close_code")
            self._disconnect(payload["session"], worker, code, float(payload.get("at", now)))
        elif event == "figures":
            self._figures(payload["sessions"], worker, now)
        else:
            log.warning("unknown terminal signal %r from %s", event, worker)

    def _connect(self, session: dict[str, Any], worker: str, now: float) -> _Entry | None:
        key = (str(session["store_id"]), str(session["terminal_id"]))
        entry = self._entries.get(key)
        opened_at = float(session["opened_at"])
        if entry is not None and (
            entry.session_id == session["session_id"] or opened_at < entry.opened_at
        ):
            return None  # already known, or older than the session the terminal has now
        if entry is None:
            entry = self._entries[key] = _Entry(*key)
        entry.reconnects += 1
        entry.session_id = str(session["session_id"])
        entry.opened_at = opened_at
        entry.connected_since = opened_at
        entry.disconnected_at = None
        entry.ended = False
        entry.status = "online"
        entry.worker = worker
        entry.take(session)
        self._emit("connected", entry)
        return entry

    def _disconnect(self, session: dict[str, Any], worker: str, close_code: Any, at: float) -> None:
        entry = self._entries.get((str(session["store_id"]), str(session["terminal_id"])))
        if entry is None or entry.session_id != session["session_id"] or entry.ended:
            return  # a session that is not the terminal's current one: replaced, nothing to show
        entry.take(session)
        entry.ended = True
        self._offline(entry, at, "error" if close_code in ERROR_CLOSE_CODES else "offline")

    def _figures(self, sessions: list[dict[str, Any]], worker: str, now: float) -> None:
        listed: set[tuple[str, str]] = set()
        for session in sessions:
            key = (str(session["store_id"]), str(session["terminal_id"]))
            listed.add(key)
            entry = self._entries.get(key)
            if entry is None or (
                entry.session_id != session["session_id"]
                and float(session["opened_at"]) > entry.opened_at
            ):
                # The connect signal was lost (or we started after it): the figures say it.
                self._connect(session, worker, now)
                continue
            if entry.session_id != session["session_id"] or entry.ended:
                continue  # an older session still closing there, or one we saw end
            if entry.status != "online":
                # Its worker was silent for a while (a Redis outage) but kept the session.
                entry.status, entry.disconnected_at, entry.worker = "online", None, worker
                entry.take(session)
                self._emit("connected", entry)
                continue
            before = entry.figures()
            entry.take(session)
            if entry.figures() != before:
                self._emit("figures", entry)
        for key, entry in list(self._entries.items()):
            if entry.worker == worker and entry.status == "online" and key not in listed:
                # That worker no longer holds the session: its disconnect signal was lost.
                self._offline(entry, now, "offline")

    def _offline(self, entry: _Entry, at: float, status: Status) -> None:
        entry.status = status
        entry.disconnected_at = at
        entry.last_seen = max(entry.last_seen, min(at, self._clock()))
        self._emit("disconnected", entry)

    # ---- time ------------------------------------------------------------------------------

    def sweep(self) -> None:
        """Mark offline the terminals of workers that went silent; forget long-gone ones."""
        now = self._clock()
        silent = {w for w, heard in self._workers.items() if now - heard > self.stale_after}
        for key, entry in list(self._entries.items()):
            if entry.status == "online" and entry.worker in silent:
                log.info("worker %s went silent: %s is offline", entry.worker, entry.terminal_id)
                self._offline(entry, self._workers[entry.worker], "offline")
            elif (
                entry.status != "online"
                and entry.disconnected_at is not None
                and now - entry.disconnected_at > self.retention
            ):
                del self._entries[key]
                self._emit("forgotten", entry)
        live_workers = {e.worker for e in self._entries.values() if e.status == "online"}
        for worker in silent - live_workers:
            # Forgotten so that the table does not grow with every restarted worker's pid.
            if now - self._workers[worker] > self.retention:
                del self._workers[worker]

    def _emit(self, kind: ChangeKind, entry: _Entry) -> None:
        view = None
        for listener, stores in self._listeners:
            if stores is not None and not stores(entry.store_id):
                continue
            view = view or entry.view()
            try:
                listener(kind, view)
            except Exception:
                log.exception("terminal directory listener failed")

"""A worker's sessions: a connection's session opened, placed in its store's stream, resumed,
given a snapshot and closed, and the sessions a newer one of the same terminal replaces.

The hub (`hub.py`) holds the sessions and feeds their streams; this is what happens to a session
at the edges of its life, where storage (the log's bounds, the session log), the bus (presence,
takeovers), the metrics and the monitors each hear of it.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from chefia_rt.bus.base import Bus
from chefia_rt.config import Settings
from chefia_rt.errors import ChefiaError
from chefia_rt.hub import Hub, Session, snapshot_pages
from chefia_rt.metrics import Metrics
from chefia_rt.monitoring import MonitorFeed
from chefia_rt.protocol import messages as m
from chefia_rt.protocol.messages import utc_now_iso
from chefia_rt.store.base import LogBounds, SessionRecord, Store
from chefia_rt.sync.engine import wire_data
from chefia_rt.terminals import TOPIC as TERMINAL_TOPIC
from chefia_rt.terminals import connect_signal, disconnect_signal

REPLACED = "replaced by a newer connection of the same terminal"


class Sessions:
    """The sessions of one worker, from open to close."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        bus: Bus,
        hub: Hub,
        metrics: Metrics,
        monitor: MonitorFeed,
        worker_name: str,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.hub = hub
        self.metrics = metrics
        self.monitor = monitor
        self.worker_name = worker_name
        self._spawn = spawn

    async def open(self, session: Session, since: int | None, epoch: str | None = None) -> None:
        """Register a connection, greet it, and start its stream at `since` (or now).

        `epoch`, sent with `since`, is the epoch that watermark was read in: another one (the
        store was restored since) gets resync_required whatever the seqs say."""
        old = self.hub.attach(session)
        self.metrics.connected(session.terminal_type)  # `close` counts it out
        if old is not None:
            old.replaced = True
            old.close(4004, REPLACED)
        await self.bus.signal(TERMINAL_TOPIC, connect_signal(session, self.worker_name))
        await self.bus.register(
            session.store_id, session.terminal_id, session.session_id, session.opened_at
        )
        bounds = await self.store.log_bounds(session.store_id)
        session.send(
            m.connection_established_msg(
                terminal_id=session.terminal_id,
                terminal_type=session.terminal_type,
                store_id=session.store_id,
                session_id=session.session_id,
                last_seq=bounds.last_seq,
                epoch=bounds.epoch,
                heartbeat_interval=self.settings.ws_heartbeat_interval,
                encoding=session.encoding,
                worker=self.worker_name,
            )
        )
        session.start()
        self.position(session, since, bounds, epoch)
        if session.terminal_type == "monitor":
            self.monitor.attach(session)
        self._spawn(self.store.record_session(self._record(session, connected=True)))

    def position(
        self, session: Session, since: int | None, bounds: LogBounds, epoch: str | None = None
    ) -> None:
        """Stream from `since` when the log still reaches it (in the same epoch, when the
        terminal names one); else say resync_required."""
        # A resume replays the terminal's own ops too (docs/protocol.md §9.2).
        session.own_ops.clear()
        if since is None:
            self.hub.resume(session, bounds.last_seq)
            return
        reason = None
        if epoch is not None and epoch != bounds.epoch:
            reason = "the store's log was restored since that watermark (another epoch)"
        elif since > bounds.last_seq:
            reason = "since is ahead of the server's log"
        elif since + 1 < bounds.oldest_seq:
            reason = "the operation log no longer reaches back to since"
        if reason is not None:
            self.metrics.resumed("resync_required")
            session.send(
                m.resync_required_msg(
                    since,
                    bounds.oldest_seq,
                    bounds.last_seq,
                    bounds.epoch,
                    reason + "; send snapshot_request",
                )
            )
            self.hub.resume(session, bounds.last_seq)
            return
        self.metrics.resumed("resume")
        self.hub.resume(session, since)

    async def resume(self, session: Session, since: int, epoch: str | None = None) -> None:
        session.pause()  # pushes wait for the catch-up from `since`
        try:
            bounds = await self.store.log_bounds(session.store_id)
        except ChefiaError:
            self.hub.resume(session, session.next_seq - 1)  # refused: the stream goes on as it was
            raise
        self.position(session, since, bounds, epoch)

    async def snapshot(self, session: Session, entity_types: Sequence[str] | None) -> None:
        """Send the store's state at a watermark, then live operations after it."""
        session.pause()  # the stream restarts after the snapshot's watermark
        self.metrics.resumed("snapshot")
        try:
            # Read before the snapshot: a restore between the two reads labels the snapshot
            # with the old epoch, and the terminal's next resume then asks for another one.
            epoch = (await self.store.log_bounds(session.store_id)).epoch
            seq, entities = await self.store.snapshot(session.store_id, entity_types)
        except ChefiaError:
            self.hub.resume(session, session.next_seq - 1)  # refused: the stream goes on as it was
            raise
        wire = [
            m.snapshot_entity(
                e.key.entity_type, e.key.entity_id, e.version, wire_data(e), e.deleted
            )
            for e in entities
        ]
        del entities
        # Pages that each fit a frame, sent as the terminal reads them, then the stream after.
        pages = snapshot_pages(
            session.store_id, seq, epoch, wire, session.encoding, self.settings.max_ws_message_size
        )
        self.hub.resume(session, seq, pages)

    async def close(self, session: Session) -> None:
        """The connection ended: forget it and, unless a newer one replaced it, its locks."""
        await session.stop()
        self.metrics.disconnected(session.terminal_type)
        self.monitor.detach(session)
        if self.hub.detach(session) and not session.replaced:
            # A replaced session says nothing: the monitor must not see a false "offline".
            await self.bus.signal(
                TERMINAL_TOPIC, disconnect_signal(session, self.worker_name, session.close_code)
            )
            self._spawn(
                self.bus.unregister(session.store_id, session.terminal_id, session.session_id)
            )
        self._spawn(self.store.record_session(self._record(session, connected=False)))

    def remote_takeover(
        self, store_id: str, terminal_id: str, session_id: str, opened_at: float
    ) -> None:
        """A session of a terminal opened on another worker: an older one here gives way."""
        local = self.hub.get(store_id, terminal_id)
        if local is None or local.session_id == session_id or local.opened_at > opened_at:
            return
        local.replaced = True
        local.close(4004, REPLACED)

    def resync_all(self) -> None:
        """Pushes may have been missed (the bus reconnected): catch every live session up."""
        for session in self.hub.sessions():
            if session.live and not session.closed:
                self.hub.resume(session, session.next_seq - 1)

    @staticmethod
    def _record(session: Session, connected: bool) -> SessionRecord:
        return SessionRecord(
            session_id=session.session_id,
            terminal_id=session.terminal_id,
            terminal_type=session.terminal_type,
            store_id=session.store_id,
            user_id=session.user_id,
            connected_at=session.connected_at,
            disconnected_at=None if connected else utc_now_iso(),
            bytes_in=session.bytes_in,
            bytes_out=session.bytes_out,
            messages_in=session.messages_in,
            messages_out=session.messages_out,
            close_code=None if connected else session.close_code,
        )

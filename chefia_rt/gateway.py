"""What every WebSocket front end does with a connection, whatever library speaks the protocol.

A front end (chefia_rt/server.py on `websockets`, chefia_rt/picows_server.py on `picows`) does
the listening, the HTTP/1.1 upgrade and the frames on the wire; it hands each upgraded connection
here as a `Link`. From there on the work is the same for both: the handshake's parameters become
a Session (chefia_rt/handshake.py), every frame is decoded, charged and dispatched
(chefia_rt/dispatch.py), tokens run out (chefia_rt/token_expiry.py), abusers are closed, one
heartbeat task pings every connection of the worker, and shutdown goes in one order. The process
around it (signals, the supervisor) is chefia_rt/process.py.

HTTP requests are websockets' `Request` and `Response` for both front ends (chefia_rt/http.py
answers them): the picows front end parses its requests with websockets' HTTP/1.1 parser.

Everything below this layer raises ChefiaError with a wire code; only here, in the handshake and
in the dispatch do codes become `error` / `sync_error` frames or closes.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import socket
import time
from typing import Any, Protocol

from websockets.http11 import Request, Response

from chefia_rt.config import Settings
from chefia_rt.dispatch import Dispatcher
from chefia_rt.errors import ChefiaError, Code
from chefia_rt.handshake import Handshake, HandshakeRejected
from chefia_rt.hub import OutFrame, Session, Transport
from chefia_rt.logs import MessageLog, bind, bound
from chefia_rt.token_expiry import TokenExpiry
from chefia_rt.worker import Worker

log = logging.getLogger("chefia_rt.server")

CLOSE_TIMEOUT = 5.0  # seconds a closing handshake may take before the TCP connection is cut
# Accept queue of the listening socket (the kernel caps it at net.core.somaxconn). asyncio's
# default of 100 overflowed when a restaurant chain's terminals reconnected together (the
# Locust run of 1000 terminals): the kernel dropped or reset the rest of the handshakes.
LISTEN_BACKLOG = 4096
HEARTBEAT_SLICE = 256  # connections pinged before the heartbeat lets the loop run others


class Link(Transport, Protocol):
    """An upgraded connection as a front end hands it over: the hub's Transport, plus what the
    connection loop and the heartbeat need of it."""

    @property
    def close_code(self) -> int | None:
        """The close code the connection ended with (None while it is open)."""
        ...

    async def recv(self) -> str | bytes | None:
        """The next data message (text or binary); None once the connection is closing."""
        ...

    async def ping(self, session: Session) -> None:
        """Send a protocol ping unless the peer reads nothing now; its pong refreshes
        `session.last_seen`."""
        ...

    def hurry(self, timeout: float) -> None:
        """Let a closing handshake that starts from now on take at most `timeout` seconds."""
        ...

    async def linger(self) -> None:
        """The session is over: let go of the connection the front end's way."""
        ...


class Gateway(abc.ABC):
    """Serves one worker's WebSocket connections for its Worker; a front end subclasses it with the
    listening, the upgrade and the wire (`start`, `port`, `connections`, the shutdown hooks)."""

    transport_name = ""

    def __init__(self, settings: Settings, worker: Worker) -> None:
        self.settings = settings
        self.worker = worker
        self._messages = MessageLog() if settings.ws_log_messages else None
        # The served sessions, for the worker's one heartbeat task (no task per connection).
        self._sessions: dict[Link, Session] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._tokens = TokenExpiry(settings, worker.metrics)
        self._handshake = Handshake(settings, worker, self._tokens)
        self._dispatcher = Dispatcher(settings, worker, self._tokens, self._messages)
        # Upgrades accepted whose session `Sessions.open` has not registered yet: they count
        # against MAX_WS_CONNECTIONS (a front end whose upgrade and session start apart).
        self.opening = 0

    # ---- what a front end implements ---------------------------------------------------------

    @abc.abstractmethod
    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen (on `sock` when given, else WS_HOST:WS_PORT with SO_REUSEPORT)."""

    @abc.abstractmethod
    async def start_metrics(self, port: int) -> None:
        """Serve /metrics on METRICS_PORT too (SO_REUSEPORT: a reloading worker's replacement
        binds it before the old one lets go)."""

    @abc.abstractmethod
    def port(self) -> int:
        """The port it listens on."""

    @abc.abstractmethod
    def connections(self) -> set[Any]:
        """The WebSocket connections this worker holds, closing ones included; each has the
        asyncio transport it runs on as `.transport`."""

    @abc.abstractmethod
    def _stop_listening(self) -> None:
        """Stop accepting (the first step of shutdown); handshakes under way go on."""

    @abc.abstractmethod
    async def _close_connections(self, timeout: float) -> None:
        """Close every connection with 1001 (cut the ones whose closing handshake takes longer
        than CLOSE_TIMEOUT, then wait `timeout` at most); refuse handshakes from now on."""

    # ---- the connection ---------------------------------------------------------------------

    def refuse_upgrade(self, request: Request) -> Response | None:
        """The answer to an upgrade request that must not become a connection, or None."""
        return self._handshake.refusal(request, self.opening)

    def limit_send_buffer(self, sock: socket.socket | None) -> None:
        if sock is not None and self.settings.ws_send_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.ws_send_buffer)

    async def serve(
        self, link: Link, request: Request, subprotocol: str | None, opening: bool = False
    ) -> None:
        """Serve an upgraded connection until it ends. The front end keeps no reference to the
        handshake's `request`: its headers are let go once the session is made. `opening`: the
        front end counted the connection in `opening` when it accepted the upgrade."""
        if opening:
            # `Sessions.open` registers the session in its first step, in this same step.
            self.opening -= 1
        try:
            session, since, epoch = self._handshake.session(link, request, subprotocol)
        except HandshakeRejected as exc:
            log.info("handshake refused with %d: %s", exc.code, exc.reason)
            await link.close(exc.code, exc.reason)
            return
        del request
        # Every line logged for this connection from here on (its tasks too) names it.
        bind(
            terminal_id=session.terminal_id,
            store_id=session.store_id,
            session_id=session.session_id,
        )
        if self._messages is not None:
            session.on_sent = functools.partial(self._log_sent, session)
        try:
            await self.worker.sessions.open(session, since, epoch)
        except Exception as exc:
            # `Sessions.open` registers the session before it reads storage: forget it again, or
            # a refused connection would count against MAX_WS_CONNECTIONS and in /ws/stats.
            if isinstance(exc, ChefiaError):
                reason = exc.reason
            else:
                log.exception("opening a session of %s failed", session.terminal_id)
                reason = "server error; retry"
            self._tokens.forget(session)
            await self.worker.sessions.close(session)
            await link.close(Code.TRY_AGAIN_LATER, reason)
            return
        log.info("%s terminal connected (%s)", session.terminal_type, session.encoding)
        self._sessions[link] = session
        self._tokens.check(session)
        dispatcher = self._dispatcher
        abusers = dispatcher.abusers
        invalid: list[float] = []  # times of recent invalid frames
        try:
            while not session.closed and session not in abusers:
                frame = await link.recv()
                if frame is None:
                    break
                if session.closed:  # closed while this frame came (an expired token): not served
                    break
                await dispatcher.serve_frame(session, frame, invalid)
            if session in abusers:
                await dispatcher.close_abusive(session)
        finally:
            abusers.discard(session)
            del self._sessions[link]
            self._tokens.forget(session)
            if session.close_code is None and link.close_code is not None:
                session.close_code = link.close_code
            await self.worker.sessions.close(session)
            log.info("terminal disconnected (close code %s)", session.close_code)
        await link.linger()

    def _log_sent(self, session: Session, frames: list[OutFrame]) -> None:
        """Log what was just sent, naming the connection: flushes run as loop callbacks, outside
        the connection's own task and so outside what `bind` attached to it."""
        if self._messages is not None:
            with bound(
                terminal_id=session.terminal_id,
                store_id=session.store_id,
                session_id=session.session_id,
            ):
                self._messages.outgoing(frame.message for frame in frames)

    # ---- heartbeat --------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._heartbeat = asyncio.create_task(self._heartbeats(), name="heartbeat")

    async def _heartbeats(self) -> None:
        """Protocol pings for every connection of the worker, from one task; a peer silent (no
        frame, no pong) past WS_CONNECTION_TIMEOUT is closed. The walk lets the loop run other
        work every HEARTBEAT_SLICE connections."""
        interval = self.settings.ws_heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            for index, (link, session) in enumerate(list(self._sessions.items())):
                if index and not index % HEARTBEAT_SLICE:
                    await asyncio.sleep(0)
                await self._beat(link, session, interval)

    async def _beat(self, link: Link, session: Session, interval: float) -> None:
        if session.closed:
            return
        if time.monotonic() - session.last_seen > self.settings.ws_connection_timeout:
            # A peer silent this long will not answer a closing handshake either: do not
            # hold its slot for the full close timeout waiting for one.
            link.hurry(interval)
            session.close(Code.GOING_AWAY, "connection timeout: no frame or pong received")
            return
        # A peer that stopped reading (its send buffer is full) gets no ping through: only its
        # silence counts. (And so the ping never waits: the walk goes on.)
        await link.ping(session)

    # ---- shutdown ---------------------------------------------------------------------------

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Graceful stop: refuse new work, commit what is queued, close clients with 1001."""
        # Stop listening first: with SO_REUSEPORT the kernel then sends new connections to the
        # other workers instead of to this one while it drains (no 503 during a reload). A
        # handshake already under way is served until the drain ends (then closed 1001 with the
        # others), so it still counts as serving meanwhile.
        self._stop_listening()
        await self.worker.drain(timeout)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await self._close_connections(timeout)
        await self.worker.stop()

"""What every WebSocket front end does with a connection, whatever library speaks the protocol.

A front end (chefia_rt/server.py on `websockets`, chefia_rt/picows_server.py on `picows`) does
the listening, the HTTP/1.1 upgrade and the frames on the wire; it hands each upgraded connection
here as a `Link`. From there on the work is the same for both: the handshake's parameters become
a Session, every frame is decoded, charged and dispatched, tokens run out, abusers are closed,
one heartbeat task pings every connection of the worker, and shutdown goes in one order. The
process around it (signals, the supervisor) is chefia_rt/process.py.

HTTP requests are websockets' `Request` and `Response` for both front ends (chefia_rt/http.py
answers them): the picows front end parses its requests with websockets' HTTP/1.1 parser.

Everything below this module raises ChefiaError with a wire code; only here do codes become
`error` / `sync_error` frames or closes.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import re
import socket
import time
import uuid
from collections.abc import Iterable
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.http11 import Request, Response

from chefia_rt.auth import (
    CLOCK_SKEW,
    Claims,
    authenticate,
    authorize_terminal,
    verify_token,
)
from chefia_rt.config import Settings
from chefia_rt.domain import Operation, Resolution
from chefia_rt.errors import (
    AuthFailed,
    ChefiaError,
    Code,
    InvalidMessage,
    MessageTooBig,
    RateLimited,
)
from chefia_rt.http import json_response
from chefia_rt.hub import Outbound, OutFrame, Session, Transport
from chefia_rt.logs import MessageLog, bind, bound, operation_bound
from chefia_rt.protocol import messages as m
from chefia_rt.protocol.codec import decode_frame
from chefia_rt.sync.ratelimit import RateLimiter, Verdict
from chefia_rt.worker import Worker

log = logging.getLogger("chefia_rt.server")

SUBPROTOCOLS = {"chefia.v1.json": "json", "chefia.v1.msgpack": "msgpack"}
STORE_ID_MAX = 64
SEQ_RE = re.compile(r"\A[0-9]{1,18}\Z")  # ASCII digits ("²".isdigit() is true), < 2**63
CLOSE_TIMEOUT = 5.0  # seconds a closing handshake may take before the TCP connection is cut
# Accept queue of the listening socket (the kernel caps it at net.core.somaxconn). asyncio's
# default of 100 overflowed when a restaurant chain's terminals reconnected together (the
# Locust run of 1000 terminals): the kernel dropped or reset the rest of the handshakes.
LISTEN_BACKLOG = 4096
HEARTBEAT_SLICE = 256  # connections pinged before the heartbeat lets the loop run others


class HandshakeRejected(Exception):
    """A connection that must be closed right after the upgrade with this code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


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


def _query(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


def choose_subprotocol(offered: Iterable[str]) -> str | None:
    """The first of the client's subprotocols that we speak."""
    for name in offered:
        if name in SUBPROTOCOLS:
            return name
    return None


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
        # Epoch seconds at which a session's token runs out (with JWT_SECRET_KEY), by session id:
        # the connection is closed 4003 then, unless refresh_token moved it on.
        self._token_deadlines: dict[str, float] = {}
        self._token_timers: dict[str, asyncio.TimerHandle] = {}
        self._prefix = settings.ws_path + "/"
        self._outbound = Outbound(
            queue_size=settings.ws_message_queue_size,
            urgent_size=max(settings.ws_message_queue_size, 2 * settings.sync_batch_max_ops),
            batch_max=settings.ws_batch_max_messages,
            batch_window=settings.ws_batch_window_ms / 1000,
            compression_threshold=(
                settings.compression_threshold if settings.ws_enable_compression else None
            ),
            stall_timeout=settings.ws_stall_timeout,
            max_bytes=settings.ws_queue_max_bytes,
            frame_max=settings.max_ws_message_size,
        )
        # Buckets outlive connections, so a reconnect does not refill them (sync/ratelimit.py).
        self._rate = RateLimiter(
            settings.ws_rate_limit,
            settings.ws_rate_burst,
            settings.ws_rate_limit_strikes,
            settings.ws_rate_limit_window,
            max_terminals=max(1024, 4 * settings.max_ws_connections),
        )
        # Sessions found abusive (4005), closed once what they sent before is answered.
        self._abusers: set[Session] = set()
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

    # ---- handshake --------------------------------------------------------------------------

    def refuse_upgrade(self, request: Request) -> Response | None:
        """The answer to an upgrade request that must not become a connection, or None."""
        if not urlsplit(request.path).path.startswith(self._prefix):
            return json_response(404, {"error": "no WebSocket endpoint here"})
        origins = self.settings.allowed_origins
        if origins is not None:
            sent = request.headers.get_all("Origin")
            if len(sent) > 1:
                return json_response(400, {"error": "more than one Origin header"})
            if sent and sent[0] not in origins:
                return json_response(403, {"error": f"origin {sent[0]!r} is not allowed"})
        held = len(self.worker.hub) + self.opening
        if held >= self.settings.max_ws_connections and not self._is_takeover(request):
            return json_response(
                503, {"error": "too many connections on this worker"}, {"Retry-After": "5"}
            )
        # No refusal while draining: the listener is closed first, so only a handshake that was
        # already under way gets here; it is served until the drain ends and then closed with
        # 1001 like every other connection (a 503 here refused terminals during a reload).
        return None

    def _is_takeover(self, request: Request) -> bool:
        """A terminal replacing its own connection takes no new slot: never refuse it, or a
        reconnect at capacity would be locked out until the old socket timed out."""
        url = urlsplit(request.path)
        terminal_id = unquote(url.path[len(self._prefix) :])
        if self.settings.auth_enabled:
            # The store is the token's (a query store_id means nothing then); a bad token is no
            # takeover, and is refused like any other connection over the limit.
            try:
                claims = authenticate(self.settings.jwt_keys, url.query, request.headers)
            except AuthFailed:
                return False
            if claims.terminal_id != terminal_id:
                return False
            return self.worker.hub.get(claims.store_id, terminal_id) is not None
        store_id = _query(parse_qs(url.query), "store_id") or "default"
        return self.worker.hub.get(store_id, terminal_id) is not None

    def _session_for(
        self, link: Link, request: Request, subprotocol: str | None
    ) -> tuple[Session, int | None, str | None]:
        url = urlsplit(request.path)
        terminal_id = unquote(url.path[len(self._prefix) :])
        params = parse_qs(url.query)
        if not m.TERMINAL_ID_RE.match(terminal_id):
            raise HandshakeRejected(Code.INVALID_TERMINAL_ID, "invalid terminal id")
        requested_type = _query(params, "type")
        if requested_type is not None and requested_type not in m.TERMINAL_TYPES:
            raise HandshakeRejected(
                Code.INVALID_TERMINAL_TYPE, f"invalid terminal type {requested_type!r}"
            )
        claims = self._claims(request, url.query, terminal_id, requested_type)
        terminal_type = claims.terminal_type if claims else requested_type or "pos"
        encoding = _query(params, "encoding") or SUBPROTOCOLS.get(subprotocol or "", "json")
        if encoding not in ("json", "msgpack"):
            raise HandshakeRejected(Code.INVALID_MESSAGE, "encoding must be json or msgpack")
        since_raw = _query(params, "since")
        since: int | None = None
        if since_raw is not None:
            if not SEQ_RE.match(since_raw):
                raise HandshakeRejected(Code.INVALID_MESSAGE, "since must be a seq (integer >= 0)")
            since = int(since_raw)
        if claims is not None:
            store_id = claims.store_id  # never the query's: the token is what names the store
        else:
            store_id = _query(params, "store_id") or "default"
            if not m.TERMINAL_ID_RE.match(store_id):
                raise HandshakeRejected(Code.INVALID_MESSAGE, "invalid store_id")
        user_id = claims.user_id if claims and claims.user_id else _query(params, "user_id")
        if user_id is not None and not user_id.isprintable():  # NUL: no storage could keep it
            raise HandshakeRejected(Code.INVALID_MESSAGE, "user_id must be printable text")
        session = Session(
            terminal_id=terminal_id,
            terminal_type=terminal_type,
            store_id=store_id,
            session_id=uuid.uuid4().hex,
            encoding=encoding,
            user_id=user_id[:128] if user_id else None,
            transport=link,
            limits=self._outbound,
            connected_at=m.utc_now_iso(),
        )
        if claims is not None:
            self._token_deadlines[session.session_id] = claims.expires_at + CLOCK_SKEW
        # The `epoch=` of the handshake (the epoch its `since` was read in), if it names one.
        epoch = _query(params, "epoch")
        return session, since, epoch[:64] if epoch else None

    def _claims(
        self, request: Request, query: str, terminal_id: str, requested_type: str | None
    ) -> Claims | None:
        """The verified token of a connection (None in open mode); 4003 when it does not fit."""
        if not self.settings.auth_enabled:
            return None
        try:
            claims = authenticate(self.settings.jwt_keys, query, request.headers)
            authorize_terminal(claims, terminal_id, requested_type)
        except AuthFailed as exc:
            self.worker.metrics.refused_auth("websocket")
            raise HandshakeRejected(exc.code, exc.reason) from None
        return claims

    # ---- the connection ---------------------------------------------------------------------

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
            session, since, epoch = self._session_for(link, request, subprotocol)
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
            self._token_deadlines.pop(session.session_id, None)
            await self.worker.sessions.close(session)
            await link.close(Code.TRY_AGAIN_LATER, reason)
            return
        log.info("%s terminal connected (%s)", session.terminal_type, session.encoding)
        self._sessions[link] = session
        self._check_token(session)
        invalid: list[float] = []  # times of recent invalid frames
        try:
            while not session.closed and session not in self._abusers:
                frame = await link.recv()
                if frame is None:
                    break
                if session.closed:  # closed while this frame came (an expired token): not served
                    break
                await self._serve_frame(session, frame, invalid)
            if session in self._abusers:
                await self._close_abusive(session)
        finally:
            self._abusers.discard(session)
            del self._sessions[link]
            timer = self._token_timers.pop(session.session_id, None)
            if timer is not None:
                timer.cancel()
            self._token_deadlines.pop(session.session_id, None)
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

    def limit_send_buffer(self, sock: socket.socket | None) -> None:
        if sock is not None and self.settings.ws_send_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.ws_send_buffer)

    async def _close_abusive(self, session: Session) -> None:
        """Close 4005 for sustained abuse, once the operations the terminal sent before are
        answered (bounded by the commit timeout). Closing drops what is queued for the
        terminal: a burst that the bucket let in and the writer had not committed yet would
        lose its answers, and a client that sends its unanswered operations again when it
        reconnects would meet the same close, again before any answer, forever."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.sync_commit_timeout):
                await self.worker.pipeline.answered_so_far()
        # The answers' flush was scheduled before this task woke up: it has run.
        session.close(Code.RATE_LIMITED, "rate limit exceeded repeatedly")

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

    def _check_token(self, session: Session) -> None:
        """Close the connection 4003 when its token runs out (refresh_token moves that on)."""
        timer = self._token_timers.pop(session.session_id, None)
        if timer is not None:
            timer.cancel()
        deadline = self._token_deadlines.get(session.session_id)
        if deadline is None or session.closed:
            return  # open mode: no token
        left = deadline - time.time()
        if left <= 0:
            session.close(Code.AUTH_FAILED, "token expired; reconnect with a new token")
            return
        self._token_timers[session.session_id] = asyncio.get_running_loop().call_later(
            left, self._check_token, session
        )

    def _refresh_token(self, session: Session, token: str) -> dict[str, Any]:
        """token_refreshed, the connection now living as long as `token`; AuthFailed (4003,
        the connection keeping its old token) for a bad token or one of another terminal."""
        if session.session_id not in self._token_deadlines:
            return m.token_refreshed_msg(None)  # open mode: connections never expire
        try:
            claims = verify_token(self.settings.jwt_keys, token)
            if (claims.store_id, claims.terminal_id) != (session.store_id, session.terminal_id):
                raise AuthFailed("token was issued to another terminal")
            if claims.terminal_type != session.terminal_type:
                raise AuthFailed(f"token was issued to a {claims.terminal_type} terminal")
        except AuthFailed as exc:
            self.worker.metrics.refused_auth("websocket")
            raise AuthFailed(
                f"refresh_token refused: {exc.reason}; the connection keeps its current token"
            ) from None
        self._token_deadlines[session.session_id] = claims.expires_at + CLOCK_SKEW
        self._check_token(session)
        if claims.user_id:
            session.user_id = claims.user_id
        return m.token_refreshed_msg(claims.expires_at)

    async def _serve_frame(
        self, session: Session, frame: str | bytes, invalid: list[float]
    ) -> None:
        """Answer one frame's messages; what must end the connection closes the session. (The
        loop that waits for frames is `handler` itself: an idle connection holds one coroutine.)"""
        limit = self.settings.ws_invalid_frame_limit
        window = self.settings.ws_invalid_frame_window
        received = time.monotonic()
        session.last_seen = received
        session.bytes_in += len(frame)
        try:
            raws = decode_frame(frame, self.settings.max_ws_message_size)
        except MessageTooBig as exc:
            session.close(Code.MESSAGE_TOO_BIG, exc.reason)
            return
        except InvalidMessage as exc:
            raws = []
            session.send(m.error_msg(exc.code, exc.reason))
            if self._abusive(invalid, received, limit, window):
                session.close(Code.INVALID_MESSAGE, "too many invalid messages")
                return
        self.worker.stats.message(len(raws) or 1)
        for raw in raws:
            session.messages_in += 1
            try:
                with operation_bound(_operation_id(raw)):
                    if self._messages is not None:
                        self._messages.incoming(raw)
                    await self._dispatch(session, raw, received)
            except ChefiaError as exc:
                session.send(self._error_frame(raw, exc))
                if exc.code == Code.INVALID_MESSAGE and self._abusive(
                    invalid, received, limit, window
                ):
                    session.close(Code.INVALID_MESSAGE, "too many invalid messages")
                    return
                if session.closed or session in self._abusers:  # sustained rate-limit abuse
                    return
            except Exception:
                # A bug must cost one answer, not the terminal's connection.
                log.exception("handling %r from %s failed", raw.get("type"), session.terminal_id)
                internal = ChefiaError("internal server error; retry", Code.INTERNAL_ERROR)
                session.send(self._error_frame(raw, internal))

    @staticmethod
    def _abusive(invalid: list[float], now: float, limit: int, window: float) -> bool:
        invalid.append(now)
        recent = [t for t in invalid if t >= now - window]
        invalid[:] = recent[-limit:]
        return len(recent) >= limit

    @staticmethod
    def _error_frame(raw: dict[str, Any], exc: ChefiaError) -> dict[str, Any]:
        """sync_error for anything about an operation, plain error otherwise."""
        kind = raw.get("type")
        op = raw.get("operation") if kind == "data_sync" else None
        if isinstance(op, dict):
            op_id, et, eid = op.get("id"), op.get("entity_type"), op.get("entity_id")
            return m.sync_error_msg(
                op_id if isinstance(op_id, str) else None,
                exc.code,
                exc.reason,
                et if isinstance(et, str) else None,
                eid if isinstance(eid, str) else None,
            )
        if kind == "conflict_resolution":
            cid = raw.get("conflict_id")
            return m.sync_error_msg(cid if isinstance(cid, str) else None, exc.code, exc.reason)
        return m.error_msg(exc.code, exc.reason)

    async def _dispatch(self, session: Session, raw: dict[str, Any], received: float) -> None:
        msg = m.parse_incoming(raw)
        worker = self.worker
        if isinstance(msg, m.DataSyncIn):
            op = self._operation(session, msg.operation)
            bulk = op.operation == m.OpKind.BULK_UPDATE
            self._charge(session, len(op.data["updates"]) if bulk else 1, received)
            await worker.check_operation(session, op)
            worker.pipeline.submit(op, session, received)
        elif isinstance(msg, m.PingIn):
            session.send(m.pong_msg(msg.timestamp))
        elif isinstance(msg, m.SyncConfirmationIn):
            session.acked_seq = max(session.acked_seq, msg.seq or 0)
        elif isinstance(msg, m.ConflictResolutionIn):
            self._charge(session, 1, received)
            worker.permissions.check_resolve(session.terminal_type)
            resolution = Resolution(
                conflict_id=msg.conflict_id,
                store_id=session.store_id,
                terminal_id=session.terminal_id,
                user_id=session.user_id,
                resolution=msg.resolution.value,
                resolved_data=msg.resolved_data,
                timestamp=m.client_time(msg.timestamp, self.settings.clock_skew_max),
            )
            worker.pipeline.submit(resolution, session, received)
        elif isinstance(msg, m.AcquireLockIn):
            self._charge(session, self.settings.ws_rate_cost_lock, received, "an acquire_lock")
            answer = await worker.acquire_lock(
                session, msg.entity_type, msg.entity_id, msg.timeout, msg.lock_id
            )
            session.send(answer)
            await worker.monitor.lock(session, answer)
        elif isinstance(msg, m.ReleaseLockIn):
            self._charge(session, self.settings.ws_rate_cost_lock, received, "a release_lock")
            answer = await worker.release_lock(session, msg.entity_type, msg.entity_id, msg.lock_id)
            session.send(answer)
            await worker.monitor.lock(session, answer)
        elif isinstance(msg, m.ResumeIn):
            self._charge(session, self.settings.ws_rate_cost_resume, received, "a resume")
            await worker.sessions.resume(session, msg.since, msg.epoch)
        elif isinstance(msg, m.SnapshotRequestIn):
            self._charge(
                session, self.settings.ws_rate_cost_snapshot, received, "a snapshot_request"
            )
            await worker.sessions.snapshot(session, msg.entity_types)
        elif isinstance(msg, m.RefreshTokenIn):
            self._charge(session, 1, received)  # each costs a signature check
            session.send(self._refresh_token(session, msg.token))
        elif isinstance(msg, m.PerformanceMetricsIn):
            session.metrics = msg.model_dump(exclude={"type"})
            await worker.monitor.terminal_metrics(session, session.metrics)

    def _charge(self, session: Session, cost: float, now: float, what: str = "") -> None:
        """Count a request against the terminal's rate (`cost` operations; `what` names a
        request that is not one): 4005 over it, close 4005 when sustained."""
        if cost <= 0:
            return
        verdict = self._rate.check((session.store_id, session.terminal_id), cost, now)
        if verdict is Verdict.ALLOW:
            return
        self.worker.metrics.rate_limited.inc()
        if verdict is Verdict.ABUSIVE:
            self._abusers.add(session)  # the connection's handler closes it: _close_abusive
        costs = f"; {what} costs {cost:g}" if what else ""
        raise RateLimited(
            f"rate limit: at most {self.settings.ws_rate_limit:g} operations/s "
            f"(burst {self.settings.ws_rate_burst:g}{costs}); retry later"
        )

    def _operation(self, session: Session, model: m.OperationModel) -> Operation:
        """The Operation a terminal sent. With JWT on, `user_id` is the token's (the identity
        the audit records); a different user_id in the message is kept as a claim only."""
        data = model.data
        if model.operation == m.OpKind.BULK_UPDATE:
            data = {"updates": [item.model_dump() for item in model.bulk_items()]}
        if self.settings.auth_enabled:
            user_id = session.user_id
        else:
            user_id = model.user_id or session.user_id
        claimed = model.user_id if model.user_id != user_id else None
        return Operation(
            id=model.id,
            store_id=session.store_id,
            entity_type=model.entity_type,
            entity_id=model.entity_id,
            operation=model.operation.value,
            data=data,
            version=model.version,
            timestamp=m.client_time(model.timestamp, self.settings.clock_skew_max),
            terminal_id=session.terminal_id,
            user_id=user_id,
            requires_lock=model.requires_lock,
            priority=model.priority.value,
            claimed_user_id=claimed,
            existing_only=self.worker.permissions.existing_only(
                session.terminal_type, model.entity_type
            ),
        )

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

    def _start_heartbeat(self) -> None:
        self._heartbeat = asyncio.create_task(self._heartbeats(), name="heartbeat")


def _operation_id(raw: dict[str, Any]) -> str | None:
    """The operation a message is about, for the log context."""
    op = raw.get("operation")
    if isinstance(op, dict) and isinstance(op.get("id"), str):
        return str(op["id"])[:128]
    conflict_id = raw.get("conflict_id")
    return conflict_id[:128] if isinstance(conflict_id, str) else None

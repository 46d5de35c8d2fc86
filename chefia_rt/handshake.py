"""What a WebSocket handshake decides: whether an upgrade is refused before it becomes a
connection (path, origin, connection limit, takeover), and the Session its URL and token make
(terminal id and type, store, encoding, `since`/`epoch`, user). Both front ends ask the same
questions here through their Gateway (chefia_rt/gateway.py); docs/protocol.md is the contract.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.http11 import Request, Response

from chefia_rt.auth import Claims, authenticate, authorize_terminal
from chefia_rt.config import Settings
from chefia_rt.errors import AuthFailed, Code
from chefia_rt.http import json_response
from chefia_rt.hub import Outbound, Session, Transport
from chefia_rt.protocol import messages as m
from chefia_rt.token_expiry import TokenExpiry
from chefia_rt.worker import Worker

SUBPROTOCOLS = {"chefia.v1.json": "json", "chefia.v1.msgpack": "msgpack"}
SEQ_RE = re.compile(r"\A[0-9]{1,18}\Z")  # ASCII digits ("²".isdigit() is true), < 2**63


class HandshakeRejected(Exception):
    """A connection that must be closed right after the upgrade with this code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def choose_subprotocol(offered: Iterable[str]) -> str | None:
    """The first of the client's subprotocols that we speak."""
    for name in offered:
        if name in SUBPROTOCOLS:
            return name
    return None


def _query(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


class Handshake:
    """A worker's handshake decisions; the sessions it makes share the worker's lane limits."""

    def __init__(self, settings: Settings, worker: Worker, tokens: TokenExpiry) -> None:
        self.settings = settings
        self.worker = worker
        self._tokens = tokens
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

    def refusal(self, request: Request, opening: int) -> Response | None:
        """The answer to an upgrade request that must not become a connection, or None.
        `opening`: upgrades accepted whose sessions are not registered yet."""
        if not urlsplit(request.path).path.startswith(self._prefix):
            return json_response(404, {"error": "no WebSocket endpoint here"})
        origins = self.settings.allowed_origins
        if origins is not None:
            sent = request.headers.get_all("Origin")
            if len(sent) > 1:
                return json_response(400, {"error": "more than one Origin header"})
            if sent and sent[0] not in origins:
                return json_response(403, {"error": f"origin {sent[0]!r} is not allowed"})
        held = len(self.worker.hub) + opening
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

    def session(
        self, link: Transport, request: Request, subprotocol: str | None
    ) -> tuple[Session, int | None, str | None]:
        """The Session an upgraded connection becomes, with the `since` and `epoch` it resumes
        from; HandshakeRejected when its parameters or token do not fit. Its token's expiry
        is recorded in the TokenExpiry."""
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
            self._tokens.expires(session, claims)
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

"""When a connection's token runs out (with JWT_SECRET_KEY): the connection is closed 4003 then,
unless a `refresh_token` message moved its deadline on. Tokens themselves are chefia_rt/auth.py's;
in open mode no session has a deadline and none expires.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from chefia_rt.auth import CLOCK_SKEW, Claims, verify_token
from chefia_rt.config import Settings
from chefia_rt.errors import AuthFailed, Code
from chefia_rt.hub import Session
from chefia_rt.metrics import Metrics
from chefia_rt.protocol import messages as m


class TokenExpiry:
    """The deadlines of one worker's sessions, with one loop timer each (no task)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        # Epoch seconds at which a session's token runs out, by session id.
        self._deadlines: dict[str, float] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def expires(self, session: Session, claims: Claims) -> None:
        """The session lives as long as the token of `claims` (and the clock skew allowed)."""
        self._deadlines[session.session_id] = claims.expires_at + CLOCK_SKEW

    def forget(self, session: Session) -> None:
        """The session is over: no deadline, no timer."""
        timer = self._timers.pop(session.session_id, None)
        if timer is not None:
            timer.cancel()
        self._deadlines.pop(session.session_id, None)

    def check(self, session: Session) -> None:
        """Close the connection 4003 when its token runs out (refresh_token moves that on)."""
        timer = self._timers.pop(session.session_id, None)
        if timer is not None:
            timer.cancel()
        deadline = self._deadlines.get(session.session_id)
        if deadline is None or session.closed:
            return  # open mode: no token
        left = deadline - time.time()
        if left <= 0:
            session.close(Code.AUTH_FAILED, "token expired; reconnect with a new token")
            return
        self._timers[session.session_id] = asyncio.get_running_loop().call_later(
            left, self.check, session
        )

    def refresh(self, session: Session, token: str) -> dict[str, Any]:
        """token_refreshed, the connection now living as long as `token`; AuthFailed (4003,
        the connection keeping its old token) for a bad token or one of another terminal."""
        if session.session_id not in self._deadlines:
            return m.token_refreshed_msg(None)  # open mode: connections never expire
        try:
            claims = verify_token(self.settings.jwt_keys, token)
            if (claims.store_id, claims.terminal_id) != (session.store_id, session.terminal_id):
                raise AuthFailed("token was issued to another terminal")
            if claims.terminal_type != session.terminal_type:
                raise AuthFailed(f"token was issued to a {claims.terminal_type} terminal")
        except AuthFailed as exc:
            self.metrics.refused_auth("websocket")
            raise AuthFailed(
                f"refresh_token refused: {exc.reason}; the connection keeps its current token"
            ) from None
        self.expires(session, claims)
        self.check(session)
        if claims.user_id:
            session.user_id = claims.user_id
        return m.token_refreshed_msg(claims.expires_at)

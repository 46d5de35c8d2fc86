"""Terminal tokens (docs/protocol.md §2.3, docs/security.md): HS256 JWTs naming one terminal of one
store, and keeping them secret.

A token carries `sub` (the terminal_id), `store_id`, `terminal_type`, `exp`, `iat` and optionally
`user_id`. It is the only thing that says which store a connection belongs to when authentication
is on: whoever holds it may act as that terminal, with that type's permissions, until it expires.

Key rotation: JWT_SECRET_KEY may list several keys separated by commas. Tokens are signed with the
first and accepted when signed with any of them, so a rotation is "prepend the new key, restart,
reissue tokens, drop the old key once the old tokens have expired". Every key must be at least
`MIN_KEY_BYTES` long (the HS256 key size); startup refuses a shorter one.

Tokens must never reach a log line: `install_log_redaction` puts a filter on the loggers that see
request lines and headers (websockets logs both at DEBUG) that blanks `token=...`, `Bearer ...`
and anything shaped like a JWT.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import jwt

from chefia_rt.errors import AuthFailed
from chefia_rt.protocol.messages import TERMINAL_ID_RE, TERMINAL_TYPES

ALGORITHM = "HS256"
MIN_KEY_BYTES = 32
MAX_TOKEN_CHARS = 4096  # a real token is a few hundred; do not parse megabytes of "token"
MAX_USER_ID = 128
# Tokens are issued and checked by servers of the same deployment; allow their clocks to differ.
CLOCK_SKEW = 10.0
_REQUIRED = ("sub", "store_id", "terminal_type", "exp")
_DURATION = re.compile(r"\A\s*(\d+)\s*([smhd]?)\s*\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says about its holder."""

    terminal_id: str
    store_id: str
    terminal_type: str
    expires_at: int
    user_id: str | None = None
    issued_at: int | None = None


# ---- keys -------------------------------------------------------------------------------------


def parse_keys(value: str | Sequence[str]) -> tuple[str, ...]:
    """The keys of a JWT_SECRET_KEY value (comma-separated; the first one signs).

    Raises ValueError (naming the position, never the key) for an empty or short key.
    """
    raw = value.split(",") if isinstance(value, str) else list(value)
    keys = tuple(k.strip() for k in raw)
    if not keys:
        raise ValueError("needs at least one key")
    for index, key in enumerate(keys, 1):
        where = f"key {index} of {len(keys)}" if len(keys) > 1 else "the key"
        if not key:
            raise ValueError(f"{where} is empty (keys are separated by commas)")
        size = len(key.encode("utf-8"))
        if size < MIN_KEY_BYTES:
            raise ValueError(
                f"{where} is {size} bytes; HS256 keys must be at least {MIN_KEY_BYTES} bytes "
                "(e.g. `openssl rand -hex 32`)"
            )
    return keys


def _keys(secret: str | Sequence[str]) -> tuple[str, ...]:
    try:
        return parse_keys(secret)
    except ValueError as exc:
        raise ValueError(f"JWT_SECRET_KEY: {exc}") from None


# ---- issuing and verifying --------------------------------------------------------------------


def parse_duration(text: str) -> int:
    """Seconds in `90`, `90s`, `15m`, `12h` or `7d`; ValueError otherwise (or if zero)."""
    match = _DURATION.match(text.lower())
    if match is None:
        raise ValueError(f"bad duration {text!r}: use a number with s, m, h or d, e.g. 12h")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


def issue_token(
    secret: str | Sequence[str],
    terminal: str,
    store: str,
    type: str,
    ttl: float,
    user_id: str | None = None,
    *,
    now: float | None = None,
) -> str:
    """A token for one terminal of one store, valid for `ttl` seconds, signed with the first key."""
    if not TERMINAL_ID_RE.match(terminal):
        raise ValueError("terminal id must be 1-64 characters of [A-Za-z0-9._:-]")
    if not TERMINAL_ID_RE.match(store):
        raise ValueError("store id must be 1-64 characters of [A-Za-z0-9._:-]")
    if type not in TERMINAL_TYPES:
        raise ValueError(f"terminal type must be one of {', '.join(sorted(TERMINAL_TYPES))}")
    if user_id is not None and not 1 <= len(user_id) <= MAX_USER_ID:
        raise ValueError(f"user id must be 1-{MAX_USER_ID} characters")
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": terminal,
        "store_id": store,
        "terminal_type": type,
        "iat": issued,
        "exp": issued + int(ttl),
    }
    if user_id is not None:
        claims["user_id"] = user_id
    return jwt.encode(claims, _keys(secret)[0], algorithm=ALGORITHM)


def verify_token(secret: str | Sequence[str], token: str) -> Claims:
    """The claims of a valid token; AuthFailed (4003) with a reason that never repeats it.

    Only HS256 is accepted (`none`, other HMACs and every asymmetric algorithm are refused
    before any key is tried); the signature may come from any of the keys.
    """
    keys = _keys(secret)
    if not isinstance(token, str) or not token:
        raise AuthFailed("authentication required: no token")
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthFailed("invalid token: too long")
    try:
        header = jwt.get_unverified_header(token)
    except Exception:  # PyJWT wraps most garbage in DecodeError, not all of it
        raise AuthFailed("invalid token: not a JWT") from None
    if header.get("alg") != ALGORITHM:
        raise AuthFailed(f"invalid token: algorithm must be {ALGORITHM}")
    payload: dict[str, Any] | None = None
    for key in keys:
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                options={"require": list(_REQUIRED)},
                leeway=CLOCK_SKEW,
            )
            break
        except jwt.InvalidSignatureError:
            continue
        except jwt.ExpiredSignatureError:
            raise AuthFailed("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthFailed(f"invalid token: missing claim {exc.claim}") from None
        except jwt.ImmatureSignatureError:
            raise AuthFailed("invalid token: not valid yet") from None
        except Exception:
            raise AuthFailed("invalid token") from None
    if payload is None:
        raise AuthFailed("invalid token: bad signature")
    return _claims(payload)


def _claims(payload: Mapping[str, Any]) -> Claims:
    """Check the claims' shapes: a signed token with nonsense in it is still refused."""
    sub, store, kind = payload["sub"], payload["store_id"], payload["terminal_type"]
    if not isinstance(sub, str) or not TERMINAL_ID_RE.match(sub):
        raise AuthFailed("invalid token: sub must be a terminal id")
    if not isinstance(store, str) or not TERMINAL_ID_RE.match(store):
        raise AuthFailed("invalid token: store_id must be a store id")
    if not isinstance(kind, str) or kind not in TERMINAL_TYPES:
        raise AuthFailed("invalid token: unknown terminal_type")
    user_id = payload.get("user_id")
    if user_id is not None and (not isinstance(user_id, str) or len(user_id) > MAX_USER_ID):
        raise AuthFailed("invalid token: user_id must be a short string")
    exp, iat = payload["exp"], payload.get("iat")
    if type(exp) is not int or (iat is not None and type(iat) is not int):
        raise AuthFailed("invalid token: exp and iat must be integers")
    return Claims(sub, store, kind, exp, user_id or None, iat)


# ---- where a request carries its token --------------------------------------------------------


def request_token(query: str, headers: Mapping[str, str]) -> str | None:
    """The token of a request: `Authorization: Bearer ...`, else the `token` query parameter.

    AuthFailed when the request repeats the Authorization header (which one would be meant?).
    """
    try:
        authorization = headers.get("Authorization")
    except LookupError:  # websockets' Headers raise MultipleValuesError for a repeated header
        raise AuthFailed("invalid token: several Authorization headers") from None
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    values = parse_qs(query).get("token")
    return values[0] if values else None


def authenticate(secret: str | Sequence[str], query: str, headers: Mapping[str, str]) -> Claims:
    """Verify the token a request carries; AuthFailed (4003) when there is none or it is bad."""
    token = request_token(query, headers)
    if token is None:
        raise AuthFailed("authentication required: pass ?token= or Authorization: Bearer")
    return verify_token(secret, token)


def authorize_terminal(claims: Claims, terminal_id: str, terminal_type: str | None) -> str:
    """The terminal type of a connection to /ws/{terminal_id} holding `claims`.

    The path and the requested type must match the token; an omitted type is the token's.
    """
    if claims.terminal_id != terminal_id:
        raise AuthFailed("token was issued to another terminal")
    if terminal_type is not None and terminal_type != claims.terminal_type:
        raise AuthFailed(f"token was issued to a {claims.terminal_type} terminal")
    return claims.terminal_type


# ---- logs -------------------------------------------------------------------------------------

# A JWT is three base64url parts; the first two always begin with `eyJ` ('{"').
_SECRETS = re.compile(
    r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*"
    r"|(?<=token=)[^&\s\"']+"
    r"|(?<=token%3d)[^&\s\"']+"
    r"|(?<=bearer )[^\s\"',]+",
    re.IGNORECASE,
)
REDACTED = "[REDACTED]"


def redact(text: str) -> str:
    """`text` with every token-like secret replaced."""
    return _SECRETS.sub(REDACTED, text)


class RedactTokens(logging.Filter):
    """Rewrites a record's message (and traceback) without tokens; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the handler's problem to report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


# websockets (and picows, at its debug level) log request lines and headers on these; ours never
# log tokens, but a future line that did would be caught too.
REDACTED_LOGGERS = (
    "websockets",
    "websockets.server",
    "websockets.client",
    "picows",
    "picows.server",
    "chefia_rt",
    "chefia_rt.server",
    "chefia_rt.http",
    "chefia_rt.worker",
    "chefia_rt.hub",
)


def install_log_redaction(extra_handlers: Iterable[logging.Handler] = ()) -> None:
    """Put the token filter on our loggers and websockets', and on `extra_handlers` (root's).

    A logger's filter applies to records made on it (not to its children's), so each logger
    that may see a token is named; a handler's filter catches everything it writes. Idempotent.
    """
    targets: list[logging.Logger | logging.Handler] = [
        logging.getLogger(name) for name in REDACTED_LOGGERS
    ]
    targets.extend(extra_handlers)
    for target in targets:
        if not any(isinstance(f, RedactTokens) for f in target.filters):
            target.addFilter(RedactTokens())

"""The error tree. Every error knows its wire code; the boundary (gateway.py, handshake.py,
dispatch.py) turns it into a frame (`error` / `sync_error`) or a close, nothing else decides
codes."""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    """Close and error codes (docs/protocol.md §10)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    INVALID_TERMINAL_ID = 4001
    INVALID_TERMINAL_TYPE = 4002
    AUTH_FAILED = 4003
    REPLACED = 4004
    RATE_LIMITED = 4005
    INVALID_MESSAGE = 4006
    ENTITY_NOT_FOUND = 4007
    PERMISSION_DENIED = 4008
    LOCKED = 4009
    CONFLICT_RESOLUTION_FAILED = 4010


class ChefiaError(Exception):
    """Base of every error that reaches a terminal. `code` is what goes on the wire."""

    code: Code = Code.INVALID_MESSAGE

    def __init__(self, reason: str, code: Code | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code


class InvalidMessage(ChefiaError):
    """Undecodable frame, unknown type or schema violation (4006)."""

    code = Code.INVALID_MESSAGE


class MessageTooBig(ChefiaError):
    """A frame, or what it inflates to, exceeds MAX_WS_MESSAGE_SIZE (close 1009)."""

    code = Code.MESSAGE_TOO_BIG


class PermissionDenied(ChefiaError):
    """The terminal type may not do this (4008)."""

    code = Code.PERMISSION_DENIED


class Locked(ChefiaError):
    """The entity is locked by another terminal, or the lock the write needs is not held (4009)."""

    code = Code.LOCKED


class ResolutionFailed(ChefiaError):
    """A conflict_resolution that names no pending conflict, or cannot be applied (4010)."""

    code = Code.CONFLICT_RESOLUTION_FAILED


class EntityTooLarge(ChefiaError):
    """The entity's state after the change would pass ENTITY_MAX_BYTES; nothing changed.

    An invalid message (4006) whose reason names the limit: the protocol's codes stay those of
    docs and clients, and the terminal must not resend it unchanged either way."""

    code = Code.INVALID_MESSAGE


class StorageUnavailable(ChefiaError):
    """Storage cannot commit now; nothing was written and the terminal should retry (1013)."""

    code = Code.TRY_AGAIN_LATER


class Overloaded(ChefiaError):
    """A bounded queue is full; the terminal should retry (1013)."""

    code = Code.TRY_AGAIN_LATER


class AuthFailed(ChefiaError):
    """A missing, invalid or expired token, or one for another terminal (close 4003)."""

    code = Code.AUTH_FAILED


class RateLimited(ChefiaError):
    """Over the terminal's operation rate (4005; sustained abuse closes with it)."""

    code = Code.RATE_LIMITED


class ConfigError(Exception):
    """A bad setting; startup stops with this one-line message."""

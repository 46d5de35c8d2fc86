"""Structured logs: JSON lines for collectors, plain text for a person at a terminal.

Records carry the ids of what they are about (terminal_id, store_id, session_id, operation_id):
set with `bind()` for the current task (a connection's handler binds its session, and the tasks it
starts inherit that), or passed per line with `extra=`. Nothing secret is written: the token
filter of auth.py rewrites every record before it is formatted, and the ids bound here never
include a credential.

With WS_LOG_MESSAGES=true every incoming and outgoing message is logged as a one-line summary
(type, ids, status, code; never the entity data) on the `chefia_rt.messages` logger.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

from chefia_rt.auth import install_log_redaction

CONTEXT_FIELDS = ("terminal_id", "store_id", "session_id", "operation_id")
MESSAGES_LOGGER = "chefia_rt.messages"
# A context variable is the one module-level object here: it is a key into each task's context,
# not shared state (every connection task sees only what it bound itself).
_NOTHING: Mapping[str, str] = MappingProxyType({})
_CONTEXT: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "chefia_log_context", default=_NOTHING
)
# The operation the current message is about, apart: it changes with every message.
_OPERATION: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "chefia_log_operation", default=None
)
_SUMMARY_KEYS = (
    "operation_id",
    "conflict_id",
    "entity_type",
    "entity_id",
    "seq",
    "version",
    "status",
    "code",
    "count",
)


def bind(**ids: str | None) -> None:
    """Attach ids to every record logged from the current task (and tasks it starts later)."""
    merged = dict(_CONTEXT.get())
    merged.update({k: v for k, v in ids.items() if v is not None})
    _CONTEXT.set(merged)


@contextlib.contextmanager
def bound(**ids: str | None) -> Iterator[None]:
    """Attach ids to the records logged inside the block only (one message's operation)."""
    token = _CONTEXT.set({**_CONTEXT.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class operation_bound:
    """Attach an operation id to the records logged inside the block: `bound(operation_id=...)`
    for the one id every incoming message sets, at a fraction of its cost."""

    __slots__ = ("_operation_id", "_token")

    def __init__(self, operation_id: str | None) -> None:
        self._operation_id = operation_id

    def __enter__(self) -> None:
        self._token = _OPERATION.set(self._operation_id)

    def __exit__(self, *exc_info: object) -> None:
        _OPERATION.reset(self._token)


class ContextFields(logging.Filter):
    """Copies the bound ids onto each record, unless the line passed its own with `extra=`."""

    def filter(self, record: logging.LogRecord) -> bool:
        operation_id = _OPERATION.get()
        if operation_id is not None and not hasattr(record, "operation_id"):
            record.operation_id = operation_id
        for name, value in _CONTEXT.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the ids, pid, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in (*CONTEXT_FIELDS, "direction", "message_type"):
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The plain line a person reads, with the ids that are known appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(
            f"{name}={value}"
            for name in CONTEXT_FIELDS
            if (value := getattr(record, name, None)) is not None
        )
        if not ids:
            return line
        head, sep, tail = line.partition("\n")  # ids stay on the first line of a traceback
        return f"{head} [{ids}]{sep}{tail}"


def setup_logging(level: str, stream: TextIO | None = None, json_lines: bool | None = None) -> None:
    """Configure the root logger: JSON lines unless `stream` (stderr) is a TTY."""
    stream = stream if stream is not None else sys.stderr
    if json_lines is None:
        json_lines = not _isatty(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(ContextFields())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    install_log_redaction(root.handlers)  # no token ever reaches a log line
    # websockets logs every connection at INFO; at dinner-rush volume that is noise.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class MessageLog:
    """Summaries of the messages a worker receives and sends (WS_LOG_MESSAGES)."""

    __slots__ = ("_log",)

    def __init__(self) -> None:
        self._log = logging.getLogger(MESSAGES_LOGGER)

    def incoming(self, message: Mapping[str, Any]) -> None:
        self._write("in", message)

    def outgoing(self, messages: Iterable[Mapping[str, Any]]) -> None:
        for message in messages:
            self._write("out", message)

    def _write(self, direction: str, message: Mapping[str, Any]) -> None:
        summary = summarize(message)
        kind = str(summary.pop("type", "?"))
        extra: dict[str, Any] = {"direction": direction, "message_type": kind}
        if "operation_id" in summary:
            extra["operation_id"] = str(summary["operation_id"])
        details = "".join(f" {k}={v}" for k, v in summary.items())
        self._log.info("%s %s%s", direction, kind, details, extra=extra)


def summarize(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message's type and ids, never its data (and so never anything a terminal typed)."""
    summary: dict[str, Any] = {"type": message.get("type")}
    operation = message.get("operation")
    source: Mapping[str, Any] = operation if isinstance(operation, Mapping) else message
    if isinstance(operation, Mapping) and "id" in operation:
        summary["operation_id"] = operation["id"]
    for key in _SUMMARY_KEYS:
        value = source.get(key, message.get(key))
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            summary[key] = value if not isinstance(value, str) else value[:80]
    return summary

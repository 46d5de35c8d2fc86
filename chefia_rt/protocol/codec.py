"""Wire encodings (docs/protocol.md §3), sans-I/O: bytes in, dicts out, and back.

- JSON: one object per text frame, never batched, never compressed.
- msgpack: one map per binary frame; several messages may travel as a `message_batch`; a body
  over the compression threshold travels as ``b"compressed:" + lz4.frame.compress(body)``.

Incoming frames are decoded by frame type, whatever was negotiated. Pushed messages are encoded
once per encoding (`encode_json`, `encode_msgpack`) and a batch frame is assembled from the
already-encoded bodies (`msgpack_frame`) without decoding or re-encoding them. `ws_frame` puts a
payload in its WebSocket frame (RFC 6455, server to client: unmasked, so the same bytes serve
every receiver).

What a frame may carry is what storage (JSON) can hold: maps with string keys, lists, strings
(valid Unicode), booleans, null, signed 64-bit integers and finite floats, nested at most
`MAX_DEPTH` containers deep. Anything else is InvalidMessage (4006) with a reason that says where.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import lz4.frame
import msgpack

from chefia_rt.errors import InvalidMessage, MessageTooBig

COMPRESSED_PREFIX = b"compressed:"
BATCH_TYPE = "message_batch"
MAX_DEPTH = 32  # containers, the frame's own map included
_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1
_REASON_DETAIL = 120  # characters of a parser's own message repeated in a reason

_BATCH_HEAD = msgpack.packb("type") + msgpack.packb(BATCH_TYPE) + msgpack.packb("messages")
_COUNT_KEY = msgpack.packb("count")
# Stateless between calls (autoreset, and it resets itself when a pack fails).
_packer = msgpack.Packer()


class _Rejected(Exception):
    """A value storage cannot hold; `path` is filled in (innermost first) while unwinding."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str | int] = []

    def as_invalid(self, prefix: str = "") -> InvalidMessage:
        where = prefix
        for step in reversed(self.path):
            if isinstance(step, int):
                where += f"[{step}]"
            else:
                where += f".{step}" if where else step
        return InvalidMessage(f"{self.reason} at {where}" if where else self.reason)


def _key_step(key: str) -> str:
    # A key named in an error is escaped: a NUL or lone surrogate in it would break the answer.
    key = key if key.isprintable() else repr(key)[1:-1]
    return key if len(key) <= 40 else key[:37] + "..."


def _check_text(text: str, from_json: bool) -> None:
    # PostgreSQL's jsonb refuses NUL in strings: such an operation could never be committed.
    if "\x00" in text:
        raise _Rejected("strings may not hold NUL (\\u0000)")
    # Only JSON can smuggle in lone surrogates ("\ud800"); msgpack's decoder is strict UTF-8.
    # Such a string cannot be re-encoded as UTF-8, so it would break every receiver's frame.
    if from_json and not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _Rejected("strings may not hold a lone surrogate") from None


def _check_value(value: Any, depth: int, text: bool) -> None:
    """Reject what JSON storage cannot carry. `depth` counts the containers around `value`."""
    kind = type(value)
    if kind is str:
        _check_text(value, text)
    elif kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise _Rejected("integers must fit in signed 64 bits")
    elif kind is dict:
        if depth >= MAX_DEPTH:
            raise _Rejected(f"message nested deeper than {MAX_DEPTH} levels")
        for key, item in value.items():
            if type(key) is not str:
                raise _Rejected("map keys must be strings")
            try:
                _check_text(key, text)
                _check_value(item, depth + 1, text)
            except _Rejected as exc:
                exc.path.append(_key_step(key))
                raise
    elif kind is list:
        if depth >= MAX_DEPTH:
            raise _Rejected(f"message nested deeper than {MAX_DEPTH} levels")
        for index, item in enumerate(value):
            try:
                _check_value(item, depth + 1, text)
            except _Rejected as exc:
                exc.path.append(index)
                raise
    elif kind is float:
        if not math.isfinite(value):
            raise _Rejected("numbers must be finite")
    elif not (value is None or kind is bool):
        raise _Rejected(f"unsupported value of type {kind.__name__}")


def _storable(container: dict[Any, Any] | list[Any], depth: int, text: bool) -> bool:
    """Whether `_check_value` accepts `container`, without its bookkeeping for a reason (it
    is asked only when this says no): the common, valid message in one pass."""
    if depth >= MAX_DEPTH:
        return False
    if type(container) is dict:
        for key in container:
            if type(key) is not str or "\x00" in key or (text and not _utf8(key)):
                return False
        items: Any = container.values()
    else:
        items = container
    for value in items:
        kind = type(value)
        if kind is str:
            if "\x00" in value or (text and not _utf8(value)):
                return False
        elif kind is int:
            if not _INT_MIN <= value <= _INT_MAX:
                return False
        elif kind is dict or kind is list:
            if not _storable(value, depth + 1, text):
                return False
        elif kind is float:
            if not math.isfinite(value):
                return False
        elif not (value is None or kind is bool):
            return False
    return True


def _utf8(text: str) -> bool:
    """`text` encodes as UTF-8 (JSON can smuggle in lone surrogates; ASCII always does)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_message(message: dict[str, Any], text: bool, where: str = "") -> None:
    """Raise InvalidMessage when `message` holds what storage cannot (see `_check_value`)."""
    if _storable(message, 0, text):
        return
    try:
        _check_value(message, 0, text)
    except _Rejected as exc:
        raise exc.as_invalid(where) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _detail(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= _REASON_DETAIL else text[: _REASON_DETAIL - 3] + "..."


def _utf8_size(frame: str, max_size: int) -> int:
    size = len(frame)
    # A code point is at most 4 bytes of UTF-8: only count bytes when it could matter.
    if size <= max_size < 4 * size and not frame.isascii():
        size = len(frame.encode("utf-8", "surrogatepass"))
    return size


def inflate(payload: bytes | memoryview, max_size: int) -> bytes:
    """Decompress one lz4 frame, refusing to produce more than `max_size` bytes (no bombs).

    At most `max_size + 1` bytes are ever inflated. MessageTooBig if the content is larger;
    InvalidMessage if the frame is corrupt, truncated or followed by anything.
    """
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        body: bytes = decompressor.decompress(payload, max_length=max_size + 1)
    except RuntimeError as exc:
        raise InvalidMessage(f"bad lz4 frame: {_detail(exc)}") from None
    if len(body) > max_size or (not decompressor.eof and not decompressor.needs_input):
        raise MessageTooBig(f"compressed frame inflates beyond {max_size} bytes")
    if not decompressor.eof:
        raise InvalidMessage("truncated lz4 frame")
    if decompressor.unused_data:
        raise InvalidMessage("trailing bytes after the lz4 frame")
    return body


def decode_frame(frame: str | bytes, max_size: int) -> list[dict[str, Any]]:
    """Decode one WebSocket frame into its messages (a `message_batch` is unpacked).

    A text frame is JSON, a binary frame msgpack (possibly ``compressed:`` + lz4). `max_size`
    bounds the frame in bytes (UTF-8 for text) and what a compressed frame inflates to.
    Raises MessageTooBig (close 1009) or InvalidMessage (4006, the connection stays).
    """
    text = isinstance(frame, str)
    size = _utf8_size(frame, max_size) if isinstance(frame, str) else len(frame)
    if size > max_size:
        raise MessageTooBig(f"frame of {size} bytes exceeds {max_size}")
    try:
        if isinstance(frame, str):
            decoded = json.loads(frame, parse_constant=_reject_constant)
        else:
            body: bytes | memoryview = frame
            if frame.startswith(COMPRESSED_PREFIX):
                body = inflate(memoryview(frame)[len(COMPRESSED_PREFIX) :], max_size)
            decoded = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (InvalidMessage, MessageTooBig):
        raise
    except RecursionError:
        raise InvalidMessage("message nested too deeply") from None
    except Exception as exc:  # json/msgpack raise a zoo of types for garbage input
        kind = "JSON" if text else "msgpack"
        raise InvalidMessage(f"undecodable {kind} frame: {_detail(exc)}") from None
    if type(decoded) is not dict:
        raise InvalidMessage("a frame must hold one object (map)")
    if decoded.get("type") != BATCH_TYPE:
        _check_message(decoded, text)
        return [decoded]
    return _unpack_batch(decoded, text)


def _unpack_batch(batch: dict[Any, Any], text: bool) -> list[dict[str, Any]]:
    # Each message is checked as if it had come alone, so batching never changes what is valid.
    messages = batch.get("messages")
    if type(messages) is not list:
        raise InvalidMessage("message_batch.messages must be a list")
    if "count" in batch:
        count = batch["count"]
        if type(count) is not int or count != len(messages):
            raise InvalidMessage(f"message_batch.count does not match its {len(messages)} messages")
    try:
        _check_value({k: v for k, v in batch.items() if k != "messages"}, 0, text)
    except _Rejected as exc:
        raise exc.as_invalid("message_batch") from None
    for index, message in enumerate(messages):
        where = f"message_batch.messages[{index}]"
        if type(message) is not dict:
            raise InvalidMessage(f"{where} must be an object (map)")
        if message.get("type") == BATCH_TYPE:
            raise InvalidMessage(f"message_batch may not nest (at {where})")
        _check_message(message, text, where)
    return messages


def encode_json(message: dict[str, Any]) -> str:
    """One message as a JSON text frame.

    Raises ValueError for NaN or infinity rather than emit a frame `JSON.parse` rejects.
    """
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_msgpack(message: dict[str, Any]) -> bytes:
    """One message as a bare msgpack body (not yet framed)."""
    body: bytes = _packer.pack(message)
    return body


def msgpack_frame(bodies: list[bytes], compression_threshold: int | None) -> bytes:
    """Frame already-encoded msgpack bodies: one alone, several as a `message_batch`.

    The batch is byte for byte ``msgpack.packb({"type": "message_batch", "messages": [...],
    "count": N})``. With a threshold, a frame whose body is larger is lz4-compressed behind
    the prefix.
    """
    if len(bodies) == 1:
        body = bodies[0]
    else:
        body = b"".join(
            (
                b"\x83",  # a map of three entries: type, messages, count
                _BATCH_HEAD,
                _packer.pack_array_header(len(bodies)),
                *bodies,
                _COUNT_KEY,
                _packer.pack(len(bodies)),
            )
        )
    if compression_threshold is not None and len(body) > compression_threshold:
        compressed: bytes = lz4.frame.compress(body)
        return COMPRESSED_PREFIX + compressed
    return body


_TEXT = 0x81  # FIN + opcode 1
_BINARY = 0x82  # FIN + opcode 2
_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")


def ws_frame(payload: bytes, text: bool) -> bytes:
    """`payload` as one whole, unmasked WebSocket frame (RFC 6455 §5.2), as a server sends it.

    No extension may be in use on the connection (the server negotiates none).
    """
    first = _TEXT if text else _BINARY
    size = len(payload)
    if size < 126:
        head = bytes((first, size))
    elif size < 65_536:
        head = _HEAD_16.pack(first, 126, size)
    else:
        head = _HEAD_64.pack(first, 127, size)
    return head + payload


def ws_payload_size(frame: bytes) -> int:
    """The payload bytes of a frame built by `ws_frame` (its header aside)."""
    mark = frame[1] & 0x7F
    return len(frame) - (2 if mark < 126 else 4 if mark == 126 else 10)

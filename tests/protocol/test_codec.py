"""The wire codec (docs/protocol.md §3, §11), byte-exact and without an event loop."""

from __future__ import annotations

import json
import math
import time
import tracemalloc
from typing import Any, cast

import lz4.frame
import msgpack
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from chefia_rt.errors import ChefiaError, Code, InvalidMessage, MessageTooBig
from chefia_rt.protocol import codec
from chefia_rt.protocol.codec import (
    COMPRESSED_PREFIX,
    MAX_DEPTH,
    decode_frame,
    encode_json,
    encode_msgpack,
    inflate,
    msgpack_frame,
    ws_frame,
    ws_payload_size,
)

MAX = 1 << 20  # MAX_WS_MESSAGE_SIZE default
THRESHOLD = 1024  # compression_threshold default

PING = {"type": "ping", "timestamp": "2024-01-15T10:30:00.000Z"}
DATA_SYNC = {
    "type": "data_sync",
    "operation": {
        "id": "op-123456",
        "entity_type": "orders",
        "entity_id": "order-789",
        "operation": "UPDATE",
        "data": {"status": "preparing", "items": []},
        "version": 2,
        "timestamp": "2024-01-15T10:30:00.000Z",
        "terminal_id": "pos-001",
        "user_id": "u1",
        "requires_lock": True,
        "priority": "high",
    },
}


def invalid(frame: str | bytes, max_size: int = MAX) -> InvalidMessage:
    """Decode a frame that must be refused with 4006, and return the error."""
    with pytest.raises(InvalidMessage) as info:
        decode_frame(frame, max_size)
    err = info.value
    assert err.code == Code.INVALID_MESSAGE
    assert int(err.code) == 4006
    assert err.reason and err.reason == str(err)
    return err


def nested(levels: int, leaf: Any = 1, kind: str = "dict") -> dict[str, Any]:
    """A map that is `levels` containers deep, itself included."""
    value: Any = leaf
    for _ in range(levels - 1):
        value = {"n": value} if kind == "dict" else [value]
    return {"n": value}


def zero_bomb(size: int) -> bytes:
    """lz4 frame of `size` zero bytes, built in chunks so the test never holds `size` bytes."""
    compressor = lz4.frame.LZ4FrameCompressor()
    chunk = bytes(1 << 20)
    parts = [compressor.begin(source_size=size)]
    for _ in range(size // len(chunk)):
        parts.append(compressor.compress(chunk))
    parts.append(compressor.flush())
    return b"".join(parts)


# ---- the happy paths ---------------------------------------------------------------------


def test_json_text_frame_decodes() -> None:
    frame = json.dumps(DATA_SYNC)
    assert decode_frame(frame, MAX) == [DATA_SYNC]


def test_json_text_frame_keeps_unicode() -> None:
    message = {"type": "data_sync", "note": "café ☕ 😀", "escaped": "\u00e9"}
    assert decode_frame(json.dumps(message), MAX) == [message]
    assert decode_frame(json.dumps(message, ensure_ascii=False), MAX) == [message]
    # A surrogate *pair* escape is one valid character.
    assert decode_frame('{"a":"\\ud83d\\ude00"}', MAX) == [{"a": "😀"}]


def test_msgpack_binary_frame_decodes() -> None:
    assert decode_frame(msgpack.packb(DATA_SYNC), MAX) == [DATA_SYNC]


def test_frame_type_not_negotiation_decides_the_encoding() -> None:
    # JSON text sent in a binary frame is read as msgpack, and is garbage there.
    invalid(json.dumps(PING).encode())


def test_accepted_scalars_round_trip_exactly() -> None:
    message: dict[str, Any] = {
        "type": "x",
        "none": None,
        "t": True,
        "f": False,
        "max": 2**63 - 1,
        "min": -(2**63),
        "zero": 0,
        "float": 0.1,
        "tiny": 5e-324,
        "big": 1.7976931348623157e308,
        "neg0": -0.0,
        "s": "",
        "list": [1, "a", None, [], {}],
    }
    assert decode_frame(encode_json(message), MAX) == [message]
    assert decode_frame(encode_msgpack(message), MAX) == [message]


def test_message_batch_from_a_client_unpacks_binary_and_text() -> None:
    batch = {"type": "message_batch", "messages": [PING, DATA_SYNC], "count": 2}
    assert decode_frame(msgpack.packb(batch), MAX) == [PING, DATA_SYNC]
    assert decode_frame(json.dumps(batch), MAX) == [PING, DATA_SYNC]


def test_message_batch_without_count_is_accepted() -> None:
    batch = {"type": "message_batch", "messages": [PING]}
    assert decode_frame(msgpack.packb(batch), MAX) == [PING]


def test_empty_message_batch_is_no_messages() -> None:
    assert decode_frame(msgpack_frame([], None), MAX) == []


def test_message_batch_messages_are_checked_alone() -> None:
    # Batching must not change what is valid: a message at the depth limit fits in a batch.
    deep = nested(MAX_DEPTH)
    batch = {"type": "message_batch", "messages": [deep, PING], "count": 2}
    assert decode_frame(msgpack.packb(batch), MAX) == [deep, PING]
    assert decode_frame(json.dumps(batch), MAX) == [deep, PING]


# ---- msgpack_frame: byte-exact ----------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 15, 16, 17, 127, 128, 255, 256, 65535, 65536])
def test_batch_frame_is_byte_identical_to_packb(count: int) -> None:
    # Counts straddle every msgpack header size of the array and of the count integer.
    messages = [{"type": "ping", "i": i} for i in range(count)]
    frame = msgpack_frame([encode_msgpack(m) for m in messages], None)
    expected = msgpack.packb({"type": "message_batch", "messages": messages, "count": count})
    assert frame == expected
    assert decode_frame(frame, 16 * MAX) == messages


def test_batch_frame_of_mixed_real_messages_is_byte_identical() -> None:
    messages: list[dict[str, Any]] = [
        DATA_SYNC,
        PING,
        {"type": "pong", "server_time": "2024-01-15T10:30:00.000000Z"},
    ]
    frame = msgpack_frame([encode_msgpack(m) for m in messages], None)
    assert frame == msgpack.packb({"type": "message_batch", "messages": messages, "count": 3})


def test_single_body_is_returned_as_is() -> None:
    body = encode_msgpack(DATA_SYNC)
    assert msgpack_frame([body], None) is body
    assert msgpack_frame([body], THRESHOLD) is body  # under the threshold
    assert decode_frame(body, MAX) == [DATA_SYNC]


def test_encode_msgpack_is_packb() -> None:
    assert encode_msgpack(DATA_SYNC) == msgpack.packb(DATA_SYNC)


def test_encode_msgpack_recovers_after_a_failed_pack() -> None:
    # The module keeps one Packer: a failed pack must not leave bytes behind for the next one.
    with pytest.raises(TypeError):
        encode_msgpack({"type": "x", "bad": cast(Any, object())})
    with pytest.raises(UnicodeEncodeError):
        encode_msgpack({"type": "x", "big": "a" * 100, "bad": "\ud800"})
    assert encode_msgpack(PING) == msgpack.packb(PING)


def test_encode_json_is_compact_and_keeps_unicode() -> None:
    assert encode_json({"type": "pong", "note": "café"}) == '{"type":"pong","note":"café"}'
    assert json.loads(encode_json(DATA_SYNC)) == DATA_SYNC


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encode_json_never_emits_what_json_parse_rejects(bad: float) -> None:
    with pytest.raises(ValueError):
        encode_json({"type": "performance_metrics", "response_time": bad})


# ---- compression ------------------------------------------------------------------------


def test_body_over_threshold_is_compressed_exactly() -> None:
    message = {"type": "data_sync", "blob": "x" * 2000}
    body = encode_msgpack(message)
    frame = msgpack_frame([body], THRESHOLD)
    assert frame == COMPRESSED_PREFIX + lz4.frame.compress(body)
    assert len(frame) < len(body)
    assert decode_frame(frame, MAX) == [message]


def test_compression_threshold_is_strictly_greater() -> None:
    for size in (THRESHOLD - 1, THRESHOLD, THRESHOLD + 1):
        message = {"type": "x", "pad": "y" * 300}  # str16 header from here to 64 KiB
        message["pad"] += "y" * (size - len(encode_msgpack(message)))
        body = encode_msgpack(message)
        assert len(body) == size
        frame = msgpack_frame([body], THRESHOLD)
        assert frame.startswith(COMPRESSED_PREFIX) == (size > THRESHOLD)
        assert decode_frame(frame, MAX) == [message]


def test_no_threshold_never_compresses() -> None:
    body = encode_msgpack({"type": "x", "blob": "z" * 100_000})
    assert msgpack_frame([body], None) is body


def test_compressed_batch_decodes_to_its_messages() -> None:
    messages = [{"type": "data_sync", "i": i, "pad": "p" * 100} for i in range(50)]
    frame = msgpack_frame([encode_msgpack(m) for m in messages], THRESHOLD)
    expected = msgpack.packb({"type": "message_batch", "messages": messages, "count": 50})
    assert frame == COMPRESSED_PREFIX + lz4.frame.compress(expected)
    assert decode_frame(frame, MAX) == messages


def test_client_compressed_frame_with_checksums_decodes() -> None:
    body = msgpack.packb(DATA_SYNC)
    payload = lz4.frame.compress(body, content_checksum=True, block_checksum=True)
    assert decode_frame(COMPRESSED_PREFIX + payload, MAX) == [DATA_SYNC]


def test_inflate_up_to_exactly_max_size() -> None:
    assert inflate(lz4.frame.compress(bytes(1000)), 1000) == bytes(1000)
    with pytest.raises(MessageTooBig):
        inflate(lz4.frame.compress(bytes(1001)), 1000)
    # The same without a content size in the header: only the stream itself tells.
    with pytest.raises(MessageTooBig):
        inflate(lz4.frame.compress(bytes(1001), store_size=False), 1000)


def test_compression_bomb_is_refused_without_inflating_it() -> None:
    bomb = COMPRESSED_PREFIX + zero_bomb(50 * MAX)
    assert len(bomb) < MAX  # small on the wire: only the inflated size can catch it
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(MessageTooBig) as info:
            decode_frame(bomb, MAX)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == Code.MESSAGE_TOO_BIG
    assert int(info.value.code) == 1009
    assert elapsed < 5.0  # inflating 50 MiB would take far longer on a loaded machine too
    assert peak < 4 * MAX  # at most max_size + 1 inflated, never 50 MiB


def test_compressed_frame_that_inflates_just_over_max_size() -> None:
    body = msgpack.packb({"type": "x", "pad": "a" * 2000})
    frame = COMPRESSED_PREFIX + lz4.frame.compress(body)
    assert len(frame) < 500
    assert decode_frame(frame, len(body)) == [msgpack.unpackb(body)]
    with pytest.raises(MessageTooBig):
        decode_frame(frame, len(body) - 1)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (lz4.frame.compress(msgpack.packb(DATA_SYNC))[:-3], "truncated"),
        (lz4.frame.compress(msgpack.packb({"p": "q" * 5000}))[:40], "truncated"),
        (b"", "truncated"),
        (msgpack.packb(PING), "lz4"),  # the prefix, then no lz4 at all
        (b"\x04\x22\x4d\x18" + b"\xff" * 20, "lz4"),  # magic, then a broken header
        (lz4.frame.compress(msgpack.packb(PING)) + b"junk", "trailing"),
        (lz4.frame.compress(msgpack.packb(PING)) * 2, "trailing"),
    ],
    ids=["truncated-end", "truncated-middle", "empty", "not-lz4", "bad-header", "junk", "two"],
)
def test_broken_lz4_is_invalid(payload: bytes, reason: str) -> None:
    assert reason in invalid(COMPRESSED_PREFIX + payload).reason


def test_broken_lz4_reasons_are_exact() -> None:
    """The reason a client reads names what is wrong with its frame, in so many words."""
    frame = lz4.frame.compress(msgpack.packb(DATA_SYNC))
    assert invalid(COMPRESSED_PREFIX + frame[:-3]).reason == "truncated lz4 frame"
    trailing = invalid(COMPRESSED_PREFIX + frame + b"junk").reason
    assert trailing == "trailing bytes after the lz4 frame"
    broken = b"\x04\x22\x4d\x18" + b"\xff" * 20
    with pytest.raises(RuntimeError) as lz4_error:
        lz4.frame.LZ4FrameDecompressor().decompress(broken)
    assert invalid(COMPRESSED_PREFIX + broken).reason == f"bad lz4 frame: {lz4_error.value}"
    with pytest.raises(MessageTooBig) as too_big:
        inflate(lz4.frame.compress(bytes(1001)), 1000)
    assert too_big.value.reason == "compressed frame inflates beyond 1000 bytes"


def test_corrupt_lz4_checksum_is_invalid() -> None:
    payload = bytearray(lz4.frame.compress(msgpack.packb(DATA_SYNC), content_checksum=True))
    payload[-1] ^= 0xFF
    assert "lz4" in invalid(COMPRESSED_PREFIX + bytes(payload)).reason


def test_compression_does_not_nest() -> None:
    inner = COMPRESSED_PREFIX + lz4.frame.compress(msgpack.packb(PING))
    invalid(COMPRESSED_PREFIX + lz4.frame.compress(inner))


# ---- size limits ------------------------------------------------------------------------


def test_binary_frame_over_max_size_is_too_big() -> None:
    frame = msgpack.packb({"type": "x", "pad": "a" * 200})
    assert decode_frame(frame, len(frame)) == [msgpack.unpackb(frame)]
    with pytest.raises(MessageTooBig) as info:
        decode_frame(frame, len(frame) - 1)
    assert info.value.code == 1009
    # Size is checked first: even garbage is "too big", not "invalid", when it is too big.
    with pytest.raises(MessageTooBig):
        decode_frame(b"\xc1" * (MAX + 1), MAX)


def test_text_frame_size_counts_utf8_bytes() -> None:
    frame = json.dumps({"type": "x", "note": "é" * 60}, ensure_ascii=False)
    size = len(frame.encode())
    assert len(frame) < size
    assert decode_frame(frame, size) == [json.loads(frame)]
    with pytest.raises(MessageTooBig):
        decode_frame(frame, size - 1)
    with pytest.raises(MessageTooBig):
        decode_frame(frame, len(frame))  # under the limit in characters, over it in bytes


def test_compressed_frame_over_max_size_on_the_wire_is_too_big() -> None:
    frame = msgpack_frame([encode_msgpack({"type": "x", "pad": "a" * 5000})], 0)
    with pytest.raises(MessageTooBig):
        decode_frame(frame, len(frame) - 1)


# ---- what a frame may not carry ---------------------------------------------------------

FLOAT32_NAN = b"\x81\xa1a\xca\x7f\xc0\x00\x00"
UINT64_MAX = b"\x81\xa1a\xcf" + b"\xff" * 8


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        # undecodable
        (b"\xc1", "undecodable msgpack"),
        (b"\x82\xa4type", "undecodable msgpack"),
        (b"", "undecodable msgpack"),
        (msgpack.packb(PING) + b"\x00", "undecodable msgpack"),
        (b"\x81\xa1a\xa2\xff\xfe", "undecodable msgpack"),  # invalid UTF-8 in a str
        ("", "undecodable JSON"),
        ("not json", "undecodable JSON"),
        ('{"type": "ping"', "undecodable JSON"),
        ('{"type": "ping"} {}', "undecodable JSON"),
        ("{'type': 'ping'}", "undecodable JSON"),
        # not a map at the top
        ("[1, 2]", "object"),
        ('"ping"', "object"),
        ("1", "object"),
        ("null", "object"),
        (msgpack.packb([PING]), "object"),
        (msgpack.packb("ping"), "object"),
        (msgpack.packb(None), "object"),
        # map keys
        (msgpack.packb({1: "a"}), "undecodable msgpack"),  # msgpack's own strict_map_key
        (msgpack.packb({b"type": "ping"}), "keys must be strings"),
        (msgpack.packb({"a": {b"k": 1}}), "keys must be strings at a"),
        (msgpack.packb({"type": "x", "m": {"ok": {1: 2}}}), "undecodable msgpack"),
        # non-finite numbers
        ('{"a": NaN}', "undecodable JSON"),
        ('{"a": Infinity}', "undecodable JSON"),
        ('{"a": -Infinity}', "undecodable JSON"),
        ('{"a": [1e999]}', "finite at a[0]"),
        ('{"a": -1e400}', "finite at a"),
        (msgpack.packb({"a": math.nan}), "finite at a"),
        (msgpack.packb({"a": {"b": [math.inf]}}), "finite at a.b[0]"),
        (msgpack.packb({"a": -math.inf}), "finite"),
        (FLOAT32_NAN, "finite"),
        # bytes, extension types
        (msgpack.packb({"a": b"\x00\x01"}), "bytes at a"),
        (msgpack.packb({"a": bytearray(b"x")}), "bytes"),
        (msgpack.packb({"a": msgpack.ExtType(5, b"x")}), "ExtType"),
        (msgpack.packb({"a": msgpack.Timestamp(0)}), "Timestamp"),
        # integers beyond signed 64 bits
        (UINT64_MAX, "64 bits"),
        (msgpack.packb({"a": 2**63}), "64 bits at a"),
        ('{"a": 9223372036854775808}', "64 bits"),
        ('{"a": -9223372036854775809}', "64 bits"),
        ('{"a": 100000000000000000000000000000}', "64 bits"),
        ('{"a": ' + "9" * 5000 + "}", "undecodable JSON"),
        # strings that are not Unicode
        ('{"a": "\\ud800"}', "surrogate at a"),
        ('{"a": ["ok", "x\\udfffy"]}', "surrogate at a[1]"),
        ('{"\\ud83d": 1}', "surrogate"),
        # nesting
        (json.dumps(nested(MAX_DEPTH + 1)), f"deeper than {MAX_DEPTH}"),
        (json.dumps(nested(MAX_DEPTH + 1, kind="list")), f"deeper than {MAX_DEPTH}"),
        (json.dumps(nested(MAX_DEPTH + 1, leaf={})), f"deeper than {MAX_DEPTH}"),
        (msgpack.packb(nested(MAX_DEPTH + 1)), f"deeper than {MAX_DEPTH}"),
        (msgpack.packb(nested(MAX_DEPTH + 1, kind="list")), f"deeper than {MAX_DEPTH}"),
        ('{"a":' + "[" * 100_000 + "]" * 100_000 + "}", "nested"),
        (b"\x81\xa1a" + b"\x91" * 100_000 + b"\xc0", "undecodable msgpack"),
    ],
)
def test_bad_frames_are_invalid_with_a_reason(frame: str | bytes, reason: str) -> None:
    assert reason in invalid(frame).reason


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ('{"a":' + "[" * 100_000 + "]" * 100_000 + "}", "message nested too deeply"),
        ("[1, 2]", "a frame must hold one object (map)"),
        (msgpack.packb(None), "a frame must hold one object (map)"),
        (msgpack.packb({"type": "message_batch"}), "message_batch.messages must be a list"),
        # At exactly the depth limit the reason names what is wrong, not the depth.
        (
            msgpack.packb(nested(MAX_DEPTH, "\x00")),
            "strings may not hold NUL (\\u0000) at " + ".".join(["n"] * MAX_DEPTH),
        ),
    ],
    ids=["deep", "list", "nil", "batch", "at-the-limit"],
)
def test_whole_reasons_are_exact(frame: str | bytes, reason: str) -> None:
    assert invalid(frame).reason == reason


def test_too_big_names_the_size_and_the_limit() -> None:
    with pytest.raises(MessageTooBig) as info:
        decode_frame(b"\x90" * 11, 10)
    assert info.value.reason == "frame of 11 bytes exceeds 10"


def test_nesting_limit_counts_containers_not_leaves() -> None:
    for kind in ("dict", "list"):
        leaves: list[Any] = [1, {}, []]
        for leaf in leaves:
            deepest = nested(MAX_DEPTH, leaf=1, kind=kind)
            assert decode_frame(json.dumps(deepest), MAX) == [deepest]
            assert decode_frame(msgpack.packb(deepest), MAX) == [deepest]
            too_deep = nested(MAX_DEPTH + 1, leaf=leaf, kind=kind)
            invalid(json.dumps(too_deep))
            invalid(msgpack.packb(too_deep))


def test_signed_64_bit_bounds_are_accepted() -> None:
    for value in (2**63 - 1, -(2**63)):
        assert decode_frame(json.dumps({"a": value}), MAX) == [{"a": value}]
        assert decode_frame(msgpack.packb({"a": value}), MAX) == [{"a": value}]


def test_errors_are_chefia_errors_with_codes() -> None:
    assert issubclass(InvalidMessage, ChefiaError)
    assert issubclass(MessageTooBig, ChefiaError)
    assert InvalidMessage("x").code == 4006
    assert MessageTooBig("x").code == 1009


def test_long_parser_messages_are_clipped_in_the_reason() -> None:
    reason = invalid("x" * 10_000).reason
    assert len(reason) < 200


# ---- message_batch rules ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "reason"),
    [
        ({"type": "message_batch"}, "must be a list"),
        ({"type": "message_batch", "messages": {"0": PING}}, "must be a list"),
        ({"type": "message_batch", "messages": [PING, "ping"]}, "messages[1] must be an object"),
        ({"type": "message_batch", "messages": [[PING]]}, "messages[0] must be an object"),
        (
            {"type": "message_batch", "messages": [{"type": "message_batch", "messages": [PING]}]},
            "may not nest",
        ),
        ({"type": "message_batch", "messages": [PING, PING], "count": 3}, "count"),
        ({"type": "message_batch", "messages": [PING], "count": True}, "count"),
        ({"type": "message_batch", "messages": [PING], "count": "1"}, "count"),
        (
            {"type": "message_batch", "messages": [PING, {"type": "x", "v": math.nan}]},
            "finite at message_batch.messages[1].v",
        ),
        (
            {"type": "message_batch", "messages": [PING], "extra": math.inf},
            "finite at message_batch.extra",
        ),
        (
            {"type": "message_batch", "messages": [nested(MAX_DEPTH + 1)]},
            "deeper than 32 levels at message_batch.messages[0]",
        ),
    ],
)
def test_bad_batches_are_invalid(batch: dict[str, Any], reason: str) -> None:
    assert reason in invalid(msgpack.packb(batch)).reason
    if "finite" not in reason:  # JSON cannot even carry the non-finite ones
        assert reason in invalid(json.dumps(batch)).reason


def test_a_json_batch_refuses_lone_surrogates_as_a_json_message_does() -> None:
    """In a text frame the batch and each of its messages are checked as JSON: a lone surrogate
    in a message or in the batch's own keys is refused as it is in a message sent alone."""
    alone = '{"type": "x", "v": "\\ud800"}'
    assert invalid(alone).reason == "strings may not hold a lone surrogate at v"
    in_a_message = '{"type": "message_batch", "messages": [' + alone + "]}"
    assert invalid(in_a_message).reason == (
        "strings may not hold a lone surrogate at message_batch.messages[0].v"
    )
    beside = '{"type": "message_batch", "messages": [], "v": "\\ud800"}'
    assert invalid(beside).reason == "strings may not hold a lone surrogate at message_batch.v"


def test_a_batchs_own_keys_may_nest_as_deep_as_a_message() -> None:
    deepest = nested(MAX_DEPTH - 1)
    assert decode_frame(msgpack.packb({"type": "x", "v": deepest}), MAX)
    batch = {"type": "message_batch", "messages": [PING], "v": deepest}
    assert decode_frame(msgpack.packb(batch), MAX) == [PING]
    too_deep = {"type": "message_batch", "messages": [PING], "v": nested(MAX_DEPTH)}
    assert invalid(msgpack.packb(too_deep)).reason.startswith("message nested deeper than 32")


def test_nested_batch_is_rejected_even_when_compressed() -> None:
    inner = msgpack_frame([encode_msgpack(PING), encode_msgpack(PING)], None)
    outer = msgpack_frame([inner, encode_msgpack(PING)], 0)
    assert outer.startswith(COMPRESSED_PREFIX)
    assert "may not nest" in invalid(outer).reason


# ---- properties -------------------------------------------------------------------------

# Valid text: no lone surrogates (Cs) and no NUL, which storage (jsonb) cannot hold.
TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=20)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=12,
)


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    message = draw(st.dictionaries(TEXT, JSON_VALUES, max_size=4))
    message["type"] = draw(st.sampled_from(["data_sync", "ping", "pong", "sync_error"]) | TEXT)
    assume(message["type"] != "message_batch" and depth(message) <= MAX_DEPTH)
    return message


PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BATCHES = settings(PROPERTY, max_examples=40)


@PROPERTY
@given(messages())
def test_json_round_trip(message: dict[str, Any]) -> None:
    assert decode_frame(encode_json(message), MAX) == [message]


@PROPERTY
@given(messages(), st.sampled_from([None, 0, 16, THRESHOLD]))
def test_msgpack_round_trip(message: dict[str, Any], threshold: int | None) -> None:
    frame = msgpack_frame([encode_msgpack(message)], threshold)
    assert decode_frame(frame, MAX) == [message]


@BATCHES
@given(st.lists(messages(), min_size=1, max_size=8), st.sampled_from([None, 0, 64, THRESHOLD]))
def test_msgpack_batch_round_trip(batch: list[dict[str, Any]], threshold: int | None) -> None:
    frame = msgpack_frame([encode_msgpack(m) for m in batch], threshold)
    body = frame
    if frame.startswith(COMPRESSED_PREFIX):
        body = lz4.frame.decompress(frame[len(COMPRESSED_PREFIX) :])
    if len(batch) == 1:
        assert body == msgpack.packb(batch[0])
    else:
        expected = {"type": "message_batch", "messages": batch, "count": len(batch)}
        assert body == msgpack.packb(expected)
    assert decode_frame(frame, MAX) == batch


@BATCHES
@given(st.lists(messages(), min_size=1, max_size=8))
def test_json_batch_from_a_client_round_trip(batch: list[dict[str, Any]]) -> None:
    frame = encode_json({"type": "message_batch", "messages": batch, "count": len(batch)})
    assert decode_frame(frame, MAX) == batch


def only_protocol_errors(frame: str | bytes, max_size: int) -> None:
    try:
        decoded = decode_frame(frame, max_size)
    except (InvalidMessage, MessageTooBig) as exc:
        assert exc.reason
        assert exc.code in (Code.INVALID_MESSAGE, Code.MESSAGE_TOO_BIG)
        return
    # Whatever gets through is something every receiver can be sent again.
    assert isinstance(decoded, list)
    for message in decoded:
        assert isinstance(message, dict)
        encode_msgpack(message)
        json.loads(encode_json(message))


FUZZ = settings(max_examples=300, deadline=None)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([MAX, 64]))
def test_arbitrary_bytes_only_raise_protocol_errors(frame: bytes, max_size: int) -> None:
    only_protocol_errors(frame, max_size)
    only_protocol_errors(COMPRESSED_PREFIX + frame, max_size)


@FUZZ
@given(st.text(max_size=300), st.sampled_from([MAX, 64]))
def test_arbitrary_text_only_raises_protocol_errors(frame: str, max_size: int) -> None:
    only_protocol_errors(frame, max_size)


@FUZZ
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.floats()
        | st.floats(width=32)
        | st.text(max_size=10)
        | st.binary(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=5) | st.binary(max_size=3), inner, max_size=4)
        ),
        max_leaves=20,
    ),
    st.booleans(),
)
def test_arbitrary_msgpack_values_only_raise_protocol_errors(value: Any, compress: bool) -> None:
    frame = msgpack.packb({"type": "x", "v": value})
    only_protocol_errors(frame, MAX)
    only_protocol_errors(msgpack.packb(value), MAX)
    if compress:
        only_protocol_errors(COMPRESSED_PREFIX + lz4.frame.compress(frame), MAX)


@FUZZ
@given(st.data())
def test_mutated_frames_only_raise_protocol_errors(data: st.DataObject) -> None:
    base = data.draw(
        st.sampled_from(
            [
                msgpack.packb(DATA_SYNC),
                msgpack_frame([encode_msgpack(PING), encode_msgpack(DATA_SYNC)], None),
                msgpack_frame([encode_msgpack(DATA_SYNC)] * 3, 0),
            ]
        )
    )
    frame = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    only_protocol_errors(bytes(frame[:cut]), MAX)
    only_protocol_errors(bytes(frame), MAX)


@FUZZ
@given(st.data())
def test_mutated_json_only_raises_protocol_errors(data: st.DataObject) -> None:
    text = list(json.dumps(DATA_SYNC))
    alphabet = st.sampled_from('{}[]":,\\0123456789.eE+-nultrfaNIy ') | st.characters()
    for _ in range(data.draw(st.integers(1, 4))):
        text[data.draw(st.integers(0, len(text) - 1))] = data.draw(alphabet)
    only_protocol_errors("".join(text), MAX)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_nul_in_strings_is_refused_because_jsonb_cannot_store_it(encoding: str) -> None:
    message = {"type": "data_sync", "note": "a\x00b"}
    frame = json.dumps(message) if encoding == "json" else msgpack.packb(message)
    with pytest.raises(InvalidMessage, match="NUL"):
        decode_frame(frame, MAX)
    keyed = {"type": "data_sync", "a\x00": 1}
    frame = json.dumps(keyed) if encoding == "json" else msgpack.packb(keyed)
    with pytest.raises(InvalidMessage, match="NUL"):
        decode_frame(frame, MAX)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
@pytest.mark.parametrize("text", [True, False])
def test_ws_frame_is_the_frame_websockets_sends(size: int, text: bool) -> None:
    """Byte for byte what websockets serializes for a server's unfragmented frame (unmasked,
    no extension), at each payload length encoding of RFC 6455 §5.2."""
    payload = bytes(i % 251 for i in range(size))
    opcode = Opcode.TEXT if text else Opcode.BINARY
    expected = Frame(opcode, payload).serialize(mask=False, extensions=[])
    frame = ws_frame(payload, text)
    assert frame == expected
    assert ws_payload_size(frame) == size


# ---- the one-pass check agrees with the one that names what is wrong ------------------------

STORABLE_EDGES = st.sampled_from(
    [
        "",
        "a\x00b",
        "\ud800",
        "açaí 🍧",
        2**63 - 1,
        2**63,
        -(2**63),
        -(2**63) - 1,
        math.nan,
        math.inf,
        1.5,
        True,
        None,
        b"bytes",
        (1, 2),
        msgpack.ExtType(1, b"x"),
    ]
)
LOOSE_VALUES = st.recursive(
    STORABLE_EDGES | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=3) | STORABLE_EDGES, inner, max_size=3)
    ),
    max_leaves=20,
)


def check_value_accepts(message: dict[Any, Any], from_json: bool) -> bool:
    try:
        codec._check_value(message, 0, from_json)
    except codec._Rejected:
        return False
    return True


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(st.text(max_size=3) | STORABLE_EDGES, LOOSE_VALUES, max_size=4), st.booleans()
)
# The lines drawn exactly, whatever the draws: text from JSON (ASCII, UTF-8, a lone surrogate),
# the constants and the two ends of the signed 64-bit range.
@example({"ascii": "a", "açaí": "açaí"}, True)
@example({"v": [None, True, False]}, False)
@example({"v": "\ud800"}, True)
@example({"\ud800": 1}, True)
@example({"v": [-(2**63), 2**63 - 1]}, False)
@example({"v": [-(2**63) - 1]}, False)
@example({"v": [2**63]}, False)
def test_storable_says_exactly_what_check_value_accepts(
    message: dict[Any, Any], from_json: bool
) -> None:
    assert codec._storable(message, 0, from_json) is check_value_accepts(message, from_json)


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1])
@pytest.mark.parametrize("kind", ["dict", "list"])
def test_storable_draws_the_depth_line_where_check_value_does(depth: int, kind: str) -> None:
    for leaf in (1, {}, [], "\x00"):
        message = nested(depth, leaf, kind)
        assert codec._storable(message, 0, False) is check_value_accepts(message, False)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_json_constant_is_named_in_the_reason(constant: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        decode_frame(f'{{"a": {constant}}}', 1000)
    assert info.value.reason == f"undecodable JSON frame: {constant} is not valid JSON"


def test_a_parsers_own_message_is_clipped_in_the_reason() -> None:
    assert codec._detail(ValueError("short")) == "short"
    assert codec._detail(ValueError()) == "ValueError"  # no text: its kind
    long = codec._detail(ValueError("x" * 500))
    assert long == "x" * 117 + "..." and len(long) == 120
    assert codec._detail(ValueError("y" * 120)) == "y" * 120


def test_a_key_that_cannot_be_printed_is_escaped_in_the_reason() -> None:
    with pytest.raises(InvalidMessage) as info:
        decode_frame('{"a\\nb": {"c": "\\u0000"}, "ok": 1}', 1000)
    assert info.value.reason == "strings may not hold NUL (\\u0000) at a\\nb.c"


def test_a_printable_key_is_named_as_it_is() -> None:
    """Only a key that cannot be printed is escaped: a backslash or quote stays itself."""
    with pytest.raises(InvalidMessage) as info:
        decode_frame(json.dumps({"a\\b'\"": "\u0000"}), 1000)
    assert info.value.reason == "strings may not hold NUL (\\u0000) at a\\b'\""


@pytest.mark.parametrize(("size", "named"), [(40, "k" * 40), (41, "k" * 37 + "...")])
def test_a_long_key_is_clipped_in_the_reason(size: int, named: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        decode_frame(json.dumps({"k" * size: "\u0000"}), 1000)
    assert info.value.reason == f"strings may not hold NUL (\\u0000) at {named}"

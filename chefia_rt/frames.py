"""Outgoing messages as built WebSocket frames, and what a connection needs of its socket.

A pushed message is encoded and framed once per encoding and the same bytes are written to every
receiver (a msgpack batch too, when sessions send the same messages together); snapshots are cut
into pages no larger than a frame may be.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from chefia_rt.domain import OpRecord
from chefia_rt.protocol.builders import data_sync_msg, snapshot_msg
from chefia_rt.protocol.codec import (
    encode_json,
    encode_msgpack,
    msgpack_frame,
    ws_frame,
)

BATCH_OVERHEAD = 64  # bytes a message_batch adds around its messages, at most
SNAPSHOT_PAGE_OVERHEAD = 256  # bytes of a snapshot page besides its entities (store_id aside)


class Transport(Protocol):
    """What a session needs of its WebSocket.

    Frames come built (`OutFrame.wire`, `batch_wire`): a message or a batch is encoded and
    framed once per encoding, and the same bytes are written to every receiver's connection.
    """

    def write(self, frames: bytes) -> None:
        """Write whole frames now, without waiting; raises once the connection is closing."""
        ...

    def writable(self) -> bool:
        """False while the connection's send buffer is over its limit (the peer reads slowly)."""
        ...

    async def drain(self) -> None:
        """Until the send buffer is back under its limit, or the connection is lost."""
        ...

    async def close(self, code: int, reason: str) -> None: ...


class OutFrame:
    """One outgoing message, encoded and framed at most once per encoding however many receive
    it. A msgpack batch's frame is kept on its first message for the next session that sends
    the same messages together (`batch_wire`)."""

    __slots__ = ("_batch", "_json", "_json_wire", "_msgpack", "_msgpack_wire", "message")

    def __init__(self, message: dict[str, Any]) -> None:
        self.message = message
        self._json: bytes | None = None
        self._msgpack: bytes | None = None
        self._json_wire: bytes | None = None
        self._msgpack_wire: bytes | None = None
        self._batch: tuple[tuple[OutFrame, ...], bytes] | None = None

    def size(self, encoding: str) -> int:
        """Bytes of the message in `encoding` (encodes it if need be)."""
        if encoding == "msgpack" and self._msgpack is not None:
            return len(self._msgpack)
        return len(self.encoded(encoding))

    def encoded(self, encoding: str) -> bytes:
        if encoding == "json":
            if self._json is None:
                self._json = encode_json(self.message).encode()
            return self._json
        if self._msgpack is None:
            self._msgpack = encode_msgpack(self.message)
        return self._msgpack

    def wire(self, encoding: str, compression_threshold: int | None) -> bytes:
        """The message alone in its WebSocket frame (a JSON text frame, or a msgpack binary one,
        lz4-compressed over the threshold: one server uses one threshold)."""
        if encoding == "json":
            if self._json_wire is None:
                self._json_wire = ws_frame(self.encoded("json"), text=True)
            return self._json_wire
        if self._msgpack_wire is None:
            body = msgpack_frame([self.encoded("msgpack")], compression_threshold)
            self._msgpack_wire = ws_frame(body, text=False)
        return self._msgpack_wire


def batch_wire(frames: Sequence[OutFrame], compression_threshold: int | None) -> bytes:
    """Several messages as one `message_batch` frame, built once for every session that sends
    the same ones together (the sessions of a store usually do)."""
    first, rest = frames[0], tuple(frames[1:])  # the key leaves out `first`: no cycle
    cached = first._batch
    if cached is not None and cached[0] == rest:
        return cached[1]
    body = msgpack_frame([f.encoded("msgpack") for f in frames], compression_threshold)
    wire = ws_frame(body, text=False)
    first._batch = (rest, wire)
    return wire


def push_message(record: OpRecord) -> dict[str, Any]:
    """`data_sync` as other terminals receive it: the full state after the operation."""
    return data_sync_msg(
        id=record.id,
        seq=record.seq,
        entity_type=record.entity_type,
        entity_id=record.entity_id,
        operation=record.operation,
        data=record.data,
        version=record.version,
        deleted=record.deleted,
        timestamp=record.timestamp,
        terminal_id=record.terminal_id,
        user_id=record.user_id,
        priority=record.priority,
        server_time=record.server_time,
    )


def snapshot_pages(
    store_id: str,
    seq: int,
    epoch: str,
    entities: Sequence[dict[str, Any]],
    encoding: str,
    frame_max: int,
) -> list[OutFrame]:
    """The store's state at `seq` as `snapshot` messages of at most `frame_max` bytes each.

    Pages are numbered from 0 and the last says `complete: true`; each carries `seq` and `epoch`.
    A terminal joins the entities of pages 0..complete (a page 0 starts a snapshot anew). An
    entity larger than a page goes alone in its own.
    """
    room = frame_max - SNAPSHOT_PAGE_OVERHEAD - len(store_id.encode()) - len(epoch.encode())
    chunks: list[list[dict[str, Any]]] = [[]]
    size = 0
    for entity in entities:
        need = OutFrame(entity).size(encoding) + 1  # a JSON comma; msgpack needs no separator
        if chunks[-1] and size + need > room:
            chunks.append([])
            size = 0
        chunks[-1].append(entity)
        size += need
    last = len(chunks) - 1
    return [
        OutFrame(snapshot_msg(store_id, seq, epoch, index, index == last, chunk))
        for index, chunk in enumerate(chunks)
    ]

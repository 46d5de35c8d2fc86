"""The rush-hour benchmark's baseline: the bare `websockets` library on uvloop.

    python -m loadtest.baseline_server --port PORT [--durable PATH]

It speaks just enough of the wire protocol for the benchmark's terminals (msgpack): it greets a
connection, and for each `data_sync` it acknowledges the sender (`sync_confirmation` with the
store's next seq) and forwards the operation to every other connection of the same store. No
storage, no validation, no batching, no locks, no ordering guarantees beyond one event loop's:
what is left is the cost of the WebSocket library, msgpack and the fan-out itself, which is the
floor any real server stands on. The forwarded frame is encoded once and shared by all receivers
(the obvious way to write it, not an optimisation of ours).

With `--durable PATH` it is the same relay with the one duty a sync server cannot drop: an
operation is acknowledged and forwarded only once it is on disk. Operations wait in a list; one
writer task takes all of them, inserts them into a SQLite log in one transaction (WAL,
`synchronous=NORMAL`) and syncs the WAL with fdatasync in a thread, then acknowledges and
forwards them. That is the floor of a durable server written the obvious way: group commit, and
nothing else of ours (no versions, conflicts, idempotency, validation, cache or catch-up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sqlite3
from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit

import msgpack
import uvloop
import websockets
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed


class Baseline:
    """Connections by store, and a seq counter per store."""

    def __init__(self, log: DurableLog | None = None) -> None:
        self.stores: dict[str, dict[str, ServerConnection]] = {}
        self.seqs: dict[str, int] = {}
        self.log = log

    async def handler(self, ws: ServerConnection) -> None:
        url = urlsplit(ws.request.path if ws.request else "")
        terminal_id = url.path.rsplit("/", 1)[-1]
        store_id = parse_qs(url.query).get("store_id", ["default"])[0]
        peers = self.stores.setdefault(store_id, {})
        peers[terminal_id] = ws
        try:
            await ws.send(
                msgpack.packb(
                    {
                        "type": "connection_established",
                        "terminal_id": terminal_id,
                        "store_id": store_id,
                        "last_seq": self.seqs.get(store_id, 0),
                    }
                )
            )
            async for frame in ws:
                message = msgpack.unpackb(frame)
                if message.get("type") != "data_sync":
                    continue
                op = message["operation"]
                seq = self.seqs[store_id] = self.seqs.get(store_id, 0) + 1
                if self.log is not None:
                    self.log.append(store_id, seq, frame, (ws, terminal_id, peers, op))
                else:
                    await relay(ws, terminal_id, peers, op, seq)
        except ConnectionClosed:
            pass
        finally:
            if peers.get(terminal_id) is ws:
                del peers[terminal_id]


Sender = tuple[ServerConnection, str, dict[str, ServerConnection], dict[str, object]]


async def relay(
    ws: ServerConnection,
    terminal_id: str,
    peers: dict[str, ServerConnection],
    op: dict[str, object],
    seq: int,
) -> None:
    """Acknowledge an operation to its sender and forward it to the other terminals."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send(
            msgpack.packb(
                {
                    "type": "sync_confirmation",
                    "operation_id": op["id"],
                    "seq": seq,
                    "version": op.get("version"),
                    "status": "applied",
                }
            )
        )
    push = msgpack.packb({"type": "data_sync", "operation": {**op, "seq": seq}})
    for peer_id, peer in list(peers.items()):
        if peer_id != terminal_id:
            with contextlib.suppress(ConnectionClosed):
                await peer.send(push)


class DurableLog:
    """Operations appended to a SQLite log by group commit, relayed once synced."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS log (store_id TEXT, seq INTEGER, op BLOB, "
            "PRIMARY KEY (store_id, seq))"
        )
        self.wal = os.open(f"{path}-wal", os.O_RDONLY)
        self.pending: list[tuple[str, int, str | bytes, Sender]] = []
        self.waiting = asyncio.Event()

    def append(self, store_id: str, seq: int, frame: str | bytes, sender: Sender) -> None:
        self.pending.append((store_id, seq, frame, sender))
        self.waiting.set()

    async def write(self) -> None:
        while True:
            await self.waiting.wait()
            self.waiting.clear()
            batch, self.pending = self.pending, []
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO log VALUES (?, ?, ?)", [b[:3] for b in batch])
            self.db.execute("COMMIT")
            await asyncio.to_thread(os.fdatasync, self.wal)
            for _, seq, _, (ws, terminal_id, peers, op) in batch:
                await relay(ws, terminal_id, peers, op, seq)


async def serve(port: int, durable: str | None) -> None:
    log = DurableLog(durable) if durable else None
    writer = asyncio.create_task(log.write()) if log else None
    baseline = Baseline(log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with websockets.serve(
        baseline.handler,
        "127.0.0.1",
        port,
        compression=None,
        ping_interval=None,
        max_queue=64,
    ):
        await stop.wait()
    if writer is not None:
        writer.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.baseline_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--durable", metavar="PATH", help="a SQLite file: relay once on disk")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.port, args.durable))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The rush-hour benchmark's baseline: the bare `websockets` library on uvloop.

    python -m loadtest.baseline_server --port PORT

It speaks just enough of the wire protocol for the benchmark's terminals (msgpack): it greets a
connection, and for each `data_sync` it acknowledges the sender (`sync_confirmation` with the
store's next seq) and forwards the operation to every other connection of the same store. No
storage, no validation, no batching, no locks, no ordering guarantees beyond one event loop's:
what is left is the cost of the WebSocket library, msgpack and the fan-out itself, which is the
floor any real server stands on. The forwarded frame is encoded once and shared by all receivers
(the obvious way to write it, not an optimisation of ours).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit

import msgpack
import uvloop
import websockets
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed


class Baseline:
    """Connections by store, and a seq counter per store."""

    def __init__(self) -> None:
        self.stores: dict[str, dict[str, ServerConnection]] = {}
        self.seqs: dict[str, int] = {}

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
        except ConnectionClosed:
            pass
        finally:
            if peers.get(terminal_id) is ws:
                del peers[terminal_id]


async def serve(port: int) -> None:
    baseline = Baseline()
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.baseline_server")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvloop.run(serve(args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

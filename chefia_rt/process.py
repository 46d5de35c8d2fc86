"""One worker process from start to exit: its Worker and the front end WS_TRANSPORT names, the
signals, readiness (to the supervisor over its socket pair, or to systemd), and the drain on
SIGTERM or when the supervisor is gone. `chefia-rt serve` runs it (chefia_rt/cli.py), once per
worker under chefia_rt/supervisor.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from chefia_rt.config import Settings
from chefia_rt.gateway import Gateway
from chefia_rt.supervisor import SUPERVISOR_FD_ENV, sd_notify
from chefia_rt.worker import Worker

log = logging.getLogger("chefia_rt.server")


def make_server(settings: Settings, worker: Worker) -> Gateway:
    """The front end WS_TRANSPORT names, serving `worker`."""
    if settings.ws_transport == "picows":
        from chefia_rt.picows_server import PicowsServer

        return PicowsServer(settings, worker)
    from chefia_rt.server import Server

    return Server(settings, worker)


async def run(
    settings: Settings, sock: socket.socket | None = None, index: int | None = None
) -> None:
    """Run one worker until SIGTERM/SIGINT, then drain and stop.

    `index` is the supervisor's number of this worker (None: the only one). METRICS_PORT is
    served by one process of the node, worker 0: every worker's answer is the whole node's, and
    only a worker has the terminal directory that terminal_status comes from.
    """
    worker = Worker.create(settings)
    await worker.start()
    server = make_server(settings, worker)
    await server.start(sock)
    if settings.metrics_port is not None and settings.ws_enable_metrics and not index:
        await server.start_metrics(settings.metrics_port)
    log.info(
        "chefia-rt listening on %s:%d%s (%s, storage %s, bus %s, auth %s)",
        settings.ws_host,
        server.port(),
        settings.ws_path,
        settings.ws_transport,
        worker.store.kind,
        worker.bus.kind,
        "jwt" if settings.auth_enabled else "OPEN",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    channel = _supervisor_channel()
    if channel is None:
        sd_notify(f"READY=1\nSTATUS=serving on port {server.port()}")
    else:
        # Ctrl-C reaches the whole process group: the supervisor decides, and sends SIGTERM.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        channel.sendall(b"ready\n")
        loop.add_reader(channel.fileno(), _watch_supervisor, channel, stop)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: draining writes, closing connections with 1001")
        if channel is None:
            sd_notify("STOPPING=1")
        await server.shutdown()


def _supervisor_channel() -> socket.socket | None:
    """This worker's end of the supervisor's socket pair, when a supervisor started it."""
    fd = os.environ.pop(SUPERVISOR_FD_ENV, None)
    if fd is None:
        return None
    channel = socket.socket(fileno=int(fd))
    channel.setblocking(False)
    return channel


def _watch_supervisor(channel: socket.socket, stop: asyncio.Event) -> None:
    """The supervisor's end closed: it died (even by SIGKILL), so this worker drains and exits."""
    try:
        if channel.recv(64):
            return
    except BlockingIOError:
        return
    except OSError:
        pass
    asyncio.get_running_loop().remove_reader(channel.fileno())
    log.warning("supervisor gone; draining and exiting")
    stop.set()

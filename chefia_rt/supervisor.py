"""The supervisor: WS_WORKERS worker processes sharing the port with SO_REUSEPORT.

It starts the workers, tells systemd when all are ready (sd_notify), restarts a worker that dies
(back within two seconds), replaces them one by one on SIGHUP (the others keep serving), and on
SIGTERM/SIGINT lets every worker drain (stop accepting, commit what is queued, close clients with
1001) before it exits.

Metrics: the supervisor gives its workers one empty aggregation directory (PROMETHEUS_MULTIPROC_DIR,
or a private temporary one it deletes at exit) and marks each worker that exits dead there, so a
scrape of any worker shows the whole node without a gone worker's connections.

Each worker gets one end of a socket pair: it writes ``ready`` when it listens, and it sees the
pair close when the supervisor dies, even by SIGKILL, so no worker outlives its supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

from chefia_rt import metrics
from chefia_rt.config import Settings

log = logging.getLogger("chefia_rt.supervisor")

SUPERVISOR_FD_ENV = "CHEFIA_SUPERVISOR_FD"
NODE_ID_ENV = "CHEFIA_NODE_ID"  # the node a worker belongs to, for /ws/stats
READY_TIMEOUT = 30.0
DRAIN_TIMEOUT = 25.0  # under systemd's TimeoutStopSec (30 s in deploy/chefia-rt.service)
RESTART_DELAYS = (0.1, 0.5, 1.0, 1.5)  # a crash loop slows down, but never past two seconds
CRASH_WINDOW = 30.0


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


@dataclass(eq=False)
class Worker:
    index: int
    process: asyncio.subprocess.Process
    channel: socket.socket
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    retiring: bool = False
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Runs and watches the worker processes of one node."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: dict[int, Worker] = {}
        self._events: asyncio.Queue[tuple[str, Worker | None]] = asyncio.Queue(maxsize=1024)
        self._crashes: list[float] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.node_id = f"{socket.gethostname()}/{os.getpid()}"
        self.metrics_dir: str | None = None
        self._own_metrics_dir = False

    async def run(self) -> int:
        """Prepare the metrics directory, run the workers until stopped, then clean up."""
        if self.settings.prometheus_multiproc_dir:
            self.metrics_dir = str(metrics.prepare_dir(self.settings.prometheus_multiproc_dir))
        else:
            self.metrics_dir = tempfile.mkdtemp(prefix="chefia-rt-metrics-")
            self._own_metrics_dir = True
        try:
            return await self._run()
        finally:
            if self._own_metrics_dir:
                metrics.remove_dir(self.metrics_dir)

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._event, "stop", None)
        loop.add_signal_handler(signal.SIGINT, self._event, "stop", None)
        loop.add_signal_handler(signal.SIGHUP, self._event, "reload", None)
        if not await self._start_all():
            await self._stop_all()
            return 1
        sd_notify(
            f"READY=1\nSTATUS=serving with {len(self.workers)} workers\nMAINPID={os.getpid()}"
        )
        log.info("%d workers serving on port %d", len(self.workers), self.settings.ws_port)
        while True:
            kind, worker = await self._events.get()
            if kind == "stop":
                break
            if kind == "reload":
                await self._reload()
            elif kind == "exited" and worker is not None:
                await self._exited(worker)
        sd_notify("STOPPING=1")
        log.info("stopping: draining %d workers", len(self.workers))
        await self._stop_all()
        return 0

    def _event(self, kind: str, worker: Worker | None) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._events.put_nowait((kind, worker))

    def _own(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self, index: int) -> Worker:
        parent, child = socket.socketpair()
        parent.setblocking(False)
        env = dict(os.environ)
        env[SUPERVISOR_FD_ENV] = str(child.fileno())
        env[NODE_ID_ENV] = self.node_id
        if self.metrics_dir is not None:
            env[metrics.MULTIPROC_ENV] = self.metrics_dir
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chefia_rt",
            "serve",
            "--worker",
            str(index),
            env=env,
            pass_fds=(child.fileno(),),
        )
        child.close()
        worker = Worker(index, process, parent)
        self._own(self._watch(worker))
        return worker

    async def _watch(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while True:
                data = await loop.sock_recv(worker.channel, 64)
                if not data:
                    break
                if b"ready" in data:
                    worker.ready.set()
        await worker.process.wait()
        worker.channel.close()
        if self.metrics_dir is not None:
            # Its connections and queues leave the node's sums; what it counted stays.
            metrics.mark_dead(self.metrics_dir, worker.process.pid)
        self._event("exited", worker)

    async def _start_all(self) -> bool:
        """Start every worker and wait until all listen; False (logged) when they cannot.

        A worker that exits before it is ready is started again, a few times: workers starting
        together race for shared start-up work (migrations, partitions) and one may lose. Only
        waiting for `ready` left the supervisor idle for READY_TIMEOUT with a worker missing,
        and then it stopped the whole node.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        for index in range(self.settings.workers):
            self.workers[index] = await self._spawn(index)
        failures = 0
        for index in range(self.settings.workers):
            while not await self._ready(self.workers[index], deadline - loop.time()):
                worker = self.workers[index]
                if worker.process.returncode is None:
                    log.error("workers did not become ready within %.0fs; stopping", READY_TIMEOUT)
                    return False
                if failures >= len(RESTART_DELAYS):
                    log.error(
                        "worker %d keeps exiting before it is ready (%d starts, last exit %s); "
                        "stopping",
                        index,
                        failures + 1,
                        worker.process.returncode,
                    )
                    return False
                delay = RESTART_DELAYS[failures]
                failures += 1
                log.error(
                    "worker %d (pid %d) exited with %s before it was ready; restarting in %.1fs",
                    index,
                    worker.process.pid,
                    worker.process.returncode,
                    delay,
                )
                await asyncio.sleep(delay)
                self.workers[index] = await self._spawn(index)
        return True

    @staticmethod
    async def _ready(worker: Worker, timeout: float) -> bool:
        """True once the worker listens; False when it exits first or `timeout` passes."""
        ready = asyncio.ensure_future(worker.ready.wait())
        exited = asyncio.ensure_future(worker.process.wait())
        try:
            await asyncio.wait(
                (ready, exited), timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
            exited.cancel()
        return worker.ready.is_set() and worker.process.returncode is None

    async def _exited(self, worker: Worker) -> None:
        if worker.retiring or self.workers.get(worker.index) is not worker:
            return
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < CRASH_WINDOW] + [now]
        delay = RESTART_DELAYS[min(len(self._crashes), len(RESTART_DELAYS)) - 1]
        log.error(
            "worker %d (pid %d) exited with %s; restarting in %.1fs",
            worker.index,
            worker.process.pid,
            worker.process.returncode,
            delay,
        )
        await asyncio.sleep(delay)
        self.workers[worker.index] = await self._spawn(worker.index)

    async def _reload(self) -> None:
        """Replace the workers one at a time: the new one listens before the old one drains."""
        sd_notify("RELOADING=1")
        for index, old in list(self.workers.items()):
            new = await self._spawn(index)
            # Not only a timeout: a new worker that exits at once is given up on at once.
            if not await self._ready(new, READY_TIMEOUT):
                log.error("reload: the new worker %d did not become ready; keeping the old", index)
                await self._terminate([new])
                continue
            self.workers[index] = new
            await self._terminate([old])
        sd_notify("READY=1")

    async def _terminate(self, workers: list[Worker]) -> None:
        for worker in workers:
            worker.retiring = True
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(w.process.wait()) for w in workers]
        _, pending = await asyncio.wait(waits, timeout=DRAIN_TIMEOUT) if waits else (set(), set())
        for worker in workers:
            if worker.process.returncode is None:
                log.warning("worker %d did not drain in time; killing it", worker.index)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
        for wait in pending:
            with contextlib.suppress(Exception):
                await wait

    async def _stop_all(self) -> None:
        await self._terminate(list(self.workers.values()))


def run_supervisor(settings: Settings) -> int:
    """Run the supervisor until it is stopped; the exit code of `chefia-rt serve`."""
    return asyncio.run(Supervisor(settings).run())

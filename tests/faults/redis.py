"""A throwaway redis-server for fault injection: ours to kill, freeze and restart.

The shared Redis of the test machine must never be stopped or flushed, so fault tests start their
own `redis-server` on a free port of 127.0.0.1, without persistence (a restart comes back empty,
like a Redis that lost its memory), and kill it afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import free_port
from tests.services import service_missing

READY_TIMEOUT = 60.0  # a hang guard: a loaded machine starts redis-server slowly


class ThrowawayRedis:
    """One redis-server on 127.0.0.1:`port`, started, killed and restarted by the test."""

    def __init__(self, binary: str, root: Path, port: int) -> None:
        self.binary = binary
        self.root = root
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.root.glob("redis-*.log")))

    def start(self) -> None:
        """Start (or start again, empty) on the same port, and wait until it answers PING."""
        assert not self.running, "already running"
        self.starts += 1
        with open(self.root / f"redis-{self.starts}.log", "wb") as out:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--dir",
                    str(self.root),
                ],
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.paused = False
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}:\n{self.log()}"
                )
            if self.answers():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server not ready in {READY_TIMEOUT}s:\n{self.log()}")

    def answers(self, timeout: float = 0.5) -> bool:
        """True when the server answers PING now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: gone at once, with everything it held."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.paused = False

    def restart(self) -> None:
        """Start again on the same port, empty (no persistence)."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, but nothing is answered."""
        assert self.proc is not None and self.running
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT: it answers again, everything it held intact."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGCONT)
            self.kill()


@contextlib.contextmanager
def throwaway_redis(root: Path) -> Iterator[ThrowawayRedis]:
    """A running throwaway redis-server under `root`, killed on exit whatever happened."""
    binary = shutil.which("redis-server")
    if binary is None:
        service_missing("redis-server", "no redis-server binary on PATH")
        raise AssertionError("unreachable")  # service_missing skips or fails
    server = ThrowawayRedis(binary, root, free_port())
    try:
        server.start()
        yield server
    finally:
        server.close()

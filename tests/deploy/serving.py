"""A chefia-rt server as its own process, the way systemd or a container runs it."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def server_process(
    command: Sequence[str], cwd: Path, env: dict[str, str], port: int
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `command`, wait until /health on `port` answers (30 s at most), drain it at exit."""
    log = open(cwd / "server.log", "wb")  # noqa: SIM115 - closed below, after the process
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (cwd / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer within 30 s"
                time.sleep(0.2)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()

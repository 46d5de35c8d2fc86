"""`chefia-rt serve` tells systemd (Type=notify) when it is ready and when it stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import free_port, server_transport
from tests.services import REDIS_URL, service_missing


def _redis_reachable() -> None:
    host, port = "127.0.0.1", int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        service_missing("Redis", f"{REDIS_URL}: {exc}")


def _messages(sock: socket.socket, until: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if any(until in m for m in got):
            return got
    raise AssertionError(f"no {until!r} from the server; got {got}")


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_then_stopping_reach_the_notify_socket(tmp_path: Path, workers: int) -> None:
    if workers > 1:
        _redis_reachable()
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    env = dict(
        os.environ,
        NOTIFY_SOCKET=str(path),
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}",
        WS_HOST="127.0.0.1",
        WS_PORT=str(free_port()),
        WS_WORKERS=str(workers),
        WS_TRANSPORT=server_transport(),
        REDIS_URL=REDIS_URL if workers > 1 else "",
        REDIS_PREFIX=f"notify-{uuid.uuid4().hex[:8]}",
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "chefia_rt", "serve"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = _messages(listener, "READY=1", timeout=30)
        if workers > 1:
            assert any(f"serving with {workers} workers" in m for m in ready)
        server.send_signal(signal.SIGTERM)
        _messages(listener, "STOPPING=1", timeout=30)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        listener.close()

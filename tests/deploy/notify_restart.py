"""`systemctl restart chefia-rt` for a host without systemd, as deploy.sh's CHEFIA_RESTART_COMMAND
in tests: stop the server this script started last (SIGTERM, then wait for it), start the
current release's `chefia-rt serve` the way the Type=notify unit does (env file, data directory,
NOTIFY_SOCKET), and return 0 once it says READY=1, 1 when it exits first.

Reads CHEFIA_PREFIX, CHEFIA_DATA_DIR and CHEFIA_ENV_FILE (deploy.sh's own environment); the
server's pid is kept in DATA_DIR/server.pid and its output appended to DATA_DIR/server.log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

READY_WITHIN = 60.0  # seconds, like the unit's TimeoutStartSec would bound it
STOP_WITHIN = 30.0


def env_file_vars(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (one pair of quotes dropped)."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        found[key] = value
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has stopped; its parent may just not reap it


def stop(pidfile: Path) -> None:
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
    pidfile.unlink()
    if not running(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WITHIN
    while running(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)


def main() -> int:
    prefix = Path(os.environ["CHEFIA_PREFIX"])
    data = Path(os.environ["CHEFIA_DATA_DIR"])
    pidfile = data / "server.pid"
    stop(pidfile)
    notify = data / "notify.sock"
    notify.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(data))}
    env |= env_file_vars(Path(os.environ["CHEFIA_ENV_FILE"]))
    env["NOTIFY_SOCKET"] = str(notify)
    with open(data / "server.log", "ab") as log:
        server = subprocess.Popen(
            [str(prefix / "current/venv/bin/chefia-rt"), "serve"],
            cwd=data,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this script, as a service outlives systemctl
        )
    pidfile.write_text(str(server.pid))
    deadline = time.monotonic() + READY_WITHIN
    listener.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            if b"READY=1" in listener.recv(4096):
                print(f"notify_restart: {server.pid} is ready", file=sys.stderr)
                return 0
        except TimeoutError:
            pass
        if server.poll() is not None:
            print(f"notify_restart: the server exited ({server.returncode})", file=sys.stderr)
            return 1
    print(f"notify_restart: no READY=1 within {READY_WITHIN:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

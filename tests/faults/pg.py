"""A throwaway PostgreSQL 15 for fault injection: ours to stop, kill and restart.

The shared PostgreSQL of the test machine must never be stopped, so fault tests start their own
cluster from the installed binaries on a free port of 127.0.0.1, with its unix socket in its own
temporary directory, and delete it afterwards. initdb refuses to run as root, so as root every
server command runs as the `postgres` OS user (`runuser -u postgres --`) in a directory it owns.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import free_port
from tests.services import service_missing

BIN_DIR = Path(os.environ.get("CHEFIA_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"


class ThrowawayPostgres:
    """One PostgreSQL cluster in a temporary directory, listening on 127.0.0.1:`port` only."""

    def __init__(self, root: Path, port: int, as_user: str | None) -> None:
        self.root = root
        self.data = root / "data"
        self.logfile = root / "postgres.log"
        self.port = port
        self._as_user = as_user

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", self._as_user, "--"] if self._as_user else []
        return subprocess.run(
            [*prefix, *args],
            cwd=self.root,  # the postgres user cannot necessarily enter the caller's directory
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            raise RuntimeError(
                f"{what} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
                f"{self.log()}"
            )

    def init(self) -> None:
        result = self._run(
            str(BIN_DIR / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",  # a throwaway cluster: durability of initdb's own files does not matter
            "-E",
            "UTF8",
            "--locale=C",
        )
        self._check(result, "initdb")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": "60",
            "shared_buffers": "32MB",
            # Faults here kill PostgreSQL processes, never the machine: what a commit wrote to
            # the OS survives an immediate stop, so fsync only costs time.
            "fsync": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
        }
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# chefia-rt fault tests\n")
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())

    def start(self, timeout: float = 30) -> None:
        result = self._run(
            str(BIN_DIR / "pg_ctl"),
            "start",
            "-w",
            "-t",
            str(int(timeout)),
            "-D",
            str(self.data),
            "-l",
            str(self.logfile),
            timeout=timeout + 5,
        )
        self._check(result, "pg_ctl start")

    def stop(self, mode: str = "immediate", timeout: float = 30) -> None:
        """Stop the cluster: `immediate` is a crash (no checkpoint, clients cut), `fast` rolls
        back open transactions and shuts down cleanly."""
        if not self.running():
            return
        result = self._run(
            str(BIN_DIR / "pg_ctl"),
            "stop",
            "-w",
            "-t",
            str(int(timeout)),
            "-m",
            mode,
            "-D",
            str(self.data),
            timeout=timeout + 5,
        )
        self._check(result, f"pg_ctl stop -m {mode}")

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        if not (self.data / "postmaster.pid").exists():
            return False
        result = self._run(str(BIN_DIR / "pg_ctl"), "status", "-D", str(self.data), timeout=10)
        return result.returncode == 0

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.logfile.read_text(errors="replace")[-4000:]
        return ""

    def delete(self) -> None:
        """Stop (immediately) if running and remove every file."""
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _os_user() -> str | None:
    """Who runs the server commands: ourselves, or `postgres` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        service_missing("throwaway PostgreSQL", f"running as root and no {OS_USER!r} OS user")
    if shutil.which("runuser") is None:
        service_missing("throwaway PostgreSQL", "running as root and no runuser")
    return OS_USER


def create() -> ThrowawayPostgres:
    """Initialise (not start) a new cluster in a new temporary directory on a free port."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (BIN_DIR / tool).is_file():
            service_missing("throwaway PostgreSQL", f"{BIN_DIR / tool} not installed")
    as_user = _os_user()
    root = Path(tempfile.mkdtemp(prefix="chefia-pg-"))
    try:
        if as_user is not None:
            entry = pwd.getpwnam(as_user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        root.chmod(0o700)
        cluster = ThrowawayPostgres(root, free_port(), as_user)
        cluster.init()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return cluster


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    """A started throwaway cluster, stopped and deleted afterwards whatever happens."""
    cluster = create()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.delete()

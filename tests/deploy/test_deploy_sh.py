"""deploy/deploy.sh end to end into a temporary prefix, systemctl skipped: two releases side by
side, a server started from the current one and checked by health-check.sh (health, stats with a
token, a WebSocket round trip), a rollback, and deploys that fail without touching `current`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.deploy.serving import server_process
from tests.helpers import free_port
from tests.services import service_missing

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy/deploy.sh"


class Site:
    """A temporary host: prefix, data directory and env file, and deploy.sh run against them."""

    def __init__(self, tmp_path: Path) -> None:
        self.prefix = tmp_path / "opt"
        self.data = tmp_path / "data"
        self.data.mkdir()
        self.port = free_port()
        self.env_file = tmp_path / "env"
        self.env_file.write_text(
            "# as /etc/chefia-rt/env would be\n"
            "WS_HOST=127.0.0.1\n"
            f"WS_PORT={self.port}\n"
            "DATABASE_URL=sqlite:///chefia.db\n"
            f'JWT_SECRET_KEY="{secrets.token_hex(32)}"\n'
            'BACKUP_SCHEDULE="0 3 * * *"\n'
            'SYNC_POLICIES={"tables": {"policy": "last_write_wins"}}\n'
        )
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", str(tmp_path)),
            "CHEFIA_PREFIX": str(self.prefix),
            "CHEFIA_ENV_FILE": str(self.env_file),
            "CHEFIA_DATA_DIR": str(self.data),
            "CHEFIA_PYTHON": sys.executable,
        }
        # The installers (pip, uv) reach the package index as this machine's own environment
        # says: its certificate authorities and index settings.
        self.env |= {
            key: value
            for key, value in os.environ.items()
            if key.startswith(("PIP_", "UV_INDEX", "UV_DEFAULT_INDEX", "SSL_CERT_"))
            or key.endswith("_PROXY")
        }

    def run(
        self, *args: str, timeout: float = 180, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        done = subprocess.run(
            [str(DEPLOY), *args, "--no-systemctl"],
            env=self.env | (env or {}),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        print(f"deploy.sh {' '.join(args)}: exit {done.returncode} in "
              f"{time.monotonic() - started:.1f}s")  # fmt: skip
        return done

    def current(self) -> str:
        return os.readlink(self.prefix / "current")

    def releases(self) -> list[str]:
        return sorted(p.name for p in (self.prefix / "releases").iterdir())

    @contextmanager
    def serving(self) -> Iterator[None]:
        """The current release's server, as systemd would start it (env file, data dir)."""
        env = dict(self.env)
        for line in self.env_file.read_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key] = value.strip('"')
        command = [str(self.prefix / "current/venv/bin/chefia-rt"), "serve"]
        with server_process(command, self.data, env, self.port):
            yield


# What a wheel is not built from. `build` and `dist` above all: setuptools builds in the source
# tree's build/, so two tests building from one tree at once (xdist) trip over each other.
NOT_SOURCE = shutil.ignore_patterns(
    ".*", "tests", "loadtest", "docs", "__pycache__", "*.egg-info", "build", "dist", "mutants"
)


def source_copy(tmp_path: Path) -> Path:
    """This checkout's sources, copied: each test builds in a tree of its own."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    return source


def build_wheel(tmp_path: Path, source: Path | None = None) -> Path:
    """This checkout (or `source`) as a wheel, once: both releases install it (no source build
    per release)."""
    source = source or source_copy(tmp_path)
    out = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("chefia_rt-*.whl")
    return wheel


def test_deploy_verify_second_release_and_rollback(tmp_path: Path) -> None:
    site = Site(tmp_path)
    wheel = build_wheel(tmp_path)

    first = site.run("deploy", "--wheel", str(wheel))
    assert first.returncode == 0, first.stderr
    (release1,) = site.releases()
    assert site.current() == f"releases/{release1}"
    assert (site.prefix / "current/VERSION").read_text().startswith("chefia-rt ")
    # migrate ran from the release in the service's working directory, with the env file.
    assert (site.data / "chefia.db").exists()
    assert "applying migrations" in first.stderr
    # Its dependencies are exactly what uv.lock pins, and the lock used is kept beside it.
    release = site.prefix / "current"
    assert (release / "uv.lock").read_bytes() == (ROOT / "uv.lock").read_bytes()
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {package["name"]: package["version"] for package in lock["package"]}
    listing = "import importlib.metadata as m, json; print(json.dumps({d.name: d.version"
    listing += " for d in m.distributions()}))"
    python = str(release / "venv/bin/python")
    installed = subprocess.run([python, "-c", listing], capture_output=True, text=True, check=True)
    versions = json.loads(installed.stdout)
    for name in ("websockets", "redis", "asyncpg", "pydantic", "msgpack"):
        assert versions[name] == locked[name], name
    assert "pytest" not in versions and "uv" not in versions  # runtime only

    # Nothing listens yet: verify fails with one clear line.
    down = site.run("verify")
    assert down.returncode == 1
    assert "FAIL health:" in down.stderr and "unreachable" in down.stderr, down.stderr

    with site.serving():
        verified = site.run("verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        print(verified.stdout)
        lines = verified.stdout.splitlines()
        assert lines[0].startswith("ok health: status=ok") and "auth=jwt" in lines[0]
        assert lines[1].startswith("ok stats: total_connections=")
        assert lines[2].startswith("ok monitor: ")
        assert lines[3].startswith("ok websocket: store seq ")

        second = site.run("deploy", "--wheel", str(wheel), "--label", "second")
        assert second.returncode == 0, second.stderr
        release2 = site.releases()[-1]
        assert release2.endswith("-second") and release2 > release1
        assert site.current() == f"releases/{release2}"
        # Side by side: each release has its own venv.
        assert (site.prefix / "releases" / release1 / "venv/bin/chefia-rt").exists()

        # check-config runs before the switch: a configuration the target release refuses
        # stops the rollback with its reason, and `current` stays.
        good_env = site.env_file.read_text()
        site.env_file.write_text(good_env + "WS_PORT=not-a-port\n")
        refused = site.run("rollback")
        assert refused.returncode == 1
        assert "WS_PORT" in refused.stderr and "refuses the configuration" in refused.stderr
        assert site.current() == f"releases/{release2}"
        site.env_file.write_text(good_env)

        back = site.run("rollback")
        assert back.returncode == 0, back.stderr
        assert site.current() == f"releases/{release1}"
        assert site.releases() == [release1, release2]

    nothing_older = site.run("rollback")
    assert nothing_older.returncode == 1
    assert "no release older than" in nothing_older.stderr
    assert site.current() == f"releases/{release1}"

    # A broken build is removed and never becomes current.
    broken = tmp_path / "chefia_rt-9.9.9-py3-none-any.whl"
    broken.write_bytes(b"not a wheel")
    failed = site.run("deploy", "--wheel", str(broken))
    assert failed.returncode == 1
    assert "deploy failed" in failed.stderr and release1 in failed.stderr, failed.stderr
    assert site.releases() == [release1, release2]
    assert site.current() == f"releases/{release1}"


def test_tune_stages_sysctl_and_limits(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx is None or not Path("/etc/nginx/nginx.conf").exists():
        service_missing("nginx", "not installed (apt-get install nginx-light)")
    assert nginx is not None
    # This host's own (Debian) nginx configuration, staged: tune sizes it.
    shutil.copytree("/etc/nginx", tmp_path / "etc/nginx", symlinks=True)
    env = {"PATH": os.environ["PATH"], "CHEFIA_DEPLOY_ROOT": str(tmp_path)}
    tuned = subprocess.run(
        [str(DEPLOY), "tune", "--no-apply"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert tuned.returncode == 0, tuned.stderr
    installed = tmp_path / "etc/sysctl.d/60-chefia-rt.conf"
    assert installed.read_bytes() == (ROOT / "deploy/sysctl.d/60-chefia-rt.conf").read_bytes()
    limits = (tmp_path / "etc/security/limits.d/60-chefia-rt.conf").read_text()
    assert "chefia soft nofile 65536" in limits and "chefia hard nofile 65536" in limits

    staged = tmp_path / "etc/nginx"
    assert (staged / "modules-enabled/60-chefia-rt-limits.conf").read_bytes() == (
        ROOT / "deploy/nginx/60-chefia-rt-limits.conf"
    ).read_bytes()
    assert (staged / "nginx.conf.chefia-rt.bak").read_bytes() == Path(
        "/etc/nginx/nginx.conf"
    ).read_bytes()
    # nginx itself reads the result (its includes pointed at the staged copy).
    main = (staged / "nginx.conf").read_text().replace("/etc/nginx/", f"{staged}/")
    main = re.sub(r"(?m)^pid .*;$", f"pid {tmp_path}/nginx.pid;", main)
    (staged / "nginx.conf").write_text(main)
    checked = subprocess.run(
        [nginx, "-T", "-c", str(staged / "nginx.conf")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr
    effective = "\n".join(line.split("#")[0].strip() for line in checked.stdout.splitlines())
    assert "\nworker_connections 16384;" in effective
    assert "\nworker_rlimit_nofile 65536;" in effective


def broken_wheel(tmp_path: Path) -> Path:
    """This checkout as a wheel whose server starts (READY=1) but whose /health always answers
    503: a release that passes check-config and migrate and only `verify` can catch."""
    source = source_copy(tmp_path / "broken")
    http = source / "chefia_rt/http.py"
    healthy = "return json_response(200 if ok else 503, body)"
    assert healthy in http.read_text()
    http.write_text(http.read_text().replace(healthy, "return json_response(503, body)"))
    return build_wheel(tmp_path / "broken", source)


def test_failing_release_is_rolled_back_by_itself(tmp_path: Path) -> None:
    site = Site(tmp_path)
    restart = f"{sys.executable} {ROOT / 'tests/deploy/notify_restart.py'}"
    site.env["CHEFIA_RESTART_COMMAND"] = restart
    wheel = build_wheel(tmp_path)

    # Prerequisites are checked before anything is built, each with its reason.
    full = site.run("deploy", "--wheel", str(wheel), env={"CHEFIA_DEPLOY_RESERVE_MB": "999999999"})
    assert full.returncode == 1
    assert "not enough disk space" in full.stderr and "MiB free" in full.stderr, full.stderr
    old = site.run("deploy", "--wheel", str(wheel), env={"CHEFIA_PYTHON": "/bin/false"})
    assert old.returncode == 1
    assert "needs Python 3.11 or newer" in old.stderr, old.stderr
    assert not (site.prefix / "releases").exists() or site.releases() == []

    try:
        first = site.run("deploy", "--wheel", str(wheel))
        assert first.returncode == 0, first.stderr
        assert "first deploy: no backup" in first.stderr
        assert "restarted and verified" in first.stderr, first.stderr
        (release1,) = site.releases()
        check_backup_timer(site, tmp_path / "root")

        broken = broken_wheel(tmp_path)
        failed = site.run("deploy", "--wheel", str(broken), "--label", "broken")
        print(failed.stderr)
        assert failed.returncode == 1
        # The backup came first, made and verified by the running release.
        assert f"backing up the data with {release1}" in failed.stderr
        (archive,) = (site.data / "backups").iterdir()
        assert f"backup verified: {archive}" in failed.stderr
        assert failed.stderr.index("backup verified") < failed.stderr.index("applying migrations")
        # The broken release was switched to, failed verify, and was replaced by the old one.
        assert "FAIL health: HTTP 503" in failed.stderr
        assert f"rolled back to {release1}, which is serving and verified" in failed.stderr
        assert str(archive) in failed.stderr.splitlines()[-1]
        assert site.current() == f"releases/{release1}"
        assert site.releases() == [release1]
        again = site.run("verify")
        assert again.returncode == 0, again.stderr
    finally:
        stop_restarted_server(site.data)


def stop_restarted_server(data: Path) -> None:
    pidfile = data / "server.pid"
    if pidfile.exists():
        pid = int(pidfile.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def check_backup_timer(site: Site, root: Path) -> None:
    """`deploy.sh backup-timer` writes the timer's schedule from BACKUP_SCHEDULE ("0 3 * * *" in
    the env file) and follows BACKUP_ENABLED; systemd itself reads the result."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        service_missing("systemd-analyze", "not installed (apt-get install systemd)")
    assert analyze is not None
    staged = {"CHEFIA_DEPLOY_ROOT": str(root)}
    timer = site.run("backup-timer", env=staged)
    assert timer.returncode == 0, timer.stderr
    assert "scheduled backups are on" in timer.stderr
    dropin = root / "etc/systemd/system/chefia-rt-backup.timer.d/schedule.conf"
    text = dropin.read_text()
    calendars = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("OnCal")]
    assert calendars == ["", "*-*-* 03:00:00"], text  # the unit's 02:00 cleared first
    normalized = subprocess.run(
        [analyze, "calendar", calendars[1]], capture_output=True, text=True, check=False
    )
    assert normalized.returncode == 0, normalized.stderr
    assert "Normalized form: *-*-* 03:00:00" in normalized.stdout
    # The timer with its drop-in, as systemd loads it.
    units = root / "units"
    units.mkdir()
    script = Path(sys.executable).parent / "chefia-rt"
    for name in ("chefia-rt-backup.service", "chefia-rt-backup.timer"):
        unit = (ROOT / "deploy" / name).read_text()
        (units / name).write_text(
            unit.replace("/opt/chefia-rt/current/venv/bin/chefia-rt", str(script))
        )
    shutil.copytree(dropin.parent, units / dropin.parent.name)
    verified = subprocess.run(
        [analyze, "verify", "chefia-rt-backup.timer"],
        cwd=units,
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0 and verified.stderr.strip() == "", verified.stderr

    # Turned off in the env file: the timer is disabled; an unchanged schedule is not rewritten.
    good_env = site.env_file.read_text()
    site.env_file.write_text(good_env + "BACKUP_ENABLED=false\n")
    off = site.run("backup-timer", env=staged)
    assert off.returncode == 0, off.stderr
    assert "scheduled backups are off" in off.stderr and "backup schedule:" not in off.stderr
    # Day of month OR day of week (cron) takes two OnCalendar= lines.
    site.env_file.write_text(good_env + 'BACKUP_SCHEDULE="30 4 1 * mon"\n')
    either = site.run("backup-timer", env=staged)
    assert either.returncode == 0, either.stderr
    assert [line for line in dropin.read_text().splitlines() if line.startswith("OnCal")] == [
        "OnCalendar=",
        "OnCalendar=*-*-01 04:30:00",
        "OnCalendar=Mon *-*-* 04:30:00",
    ]
    site.env_file.write_text(good_env + 'BACKUP_SCHEDULE="61 * * * *"\n')
    bad = site.run("backup-timer", env=staged)
    assert bad.returncode == 1 and "BACKUP_SCHEDULE" in bad.stderr, bad.stderr
    site.env_file.write_text(good_env)

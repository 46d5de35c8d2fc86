"""The command line (docs/operations.md §1) and configuration (docs/configuration.md), as an
operator runs them."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from chefia_rt.cli import GC_THRESHOLDS, build_parser

# Settings the environment of the test run must not leak into the commands under test.
_OURS = (
    "WS_",
    "MAX_WS_",
    "DATABASE_URL",
    "REDIS_URL",
    "JWT_",
    "BACKUP_",
    "METRICS_PORT",
    "SYNC_",
    "COMPRESSION_",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(_OURS)}
    env.update(extra)
    return env


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None, entry: str = "module"
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in `cwd` (so no stray .env is read) with a clean environment."""
    if entry == "module":
        command = [sys.executable, "-m", "chefia_rt", *args]
    else:
        script = shutil.which("chefia-rt", path=str(Path(sys.executable).parent))
        assert script is not None, "the chefia-rt entry point is not installed"
        command = [script, *args]
    return subprocess.run(
        command,
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def commands() -> list[str]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    raise AssertionError("no subcommands")


# ---- usage ------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["module", "script"])
def test_help(tmp_path: Path, entry: str) -> None:
    result = run("--help", cwd=tmp_path, entry=entry)
    assert result.returncode == 0
    assert "usage: chefia-rt" in result.stdout
    for command in commands():
        assert command in result.stdout


def test_every_command_has_help(tmp_path: Path) -> None:
    assert {"serve", "migrate", "check-config"} <= set(commands())
    for command in commands():
        result = run(command, "--help", cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr)
        assert f"usage: chefia-rt {command}" in result.stdout


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    result = run(cwd=tmp_path)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    result = run("explode", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_version(tmp_path: Path) -> None:
    from chefia_rt import __version__

    result = run("--version", cwd=tmp_path, entry="script")
    assert result.returncode == 0
    assert __version__ in result.stdout


# ---- check-config -----------------------------------------------------------------------------


def test_check_config_defaults(tmp_path: Path) -> None:
    result = run("check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["storage"] == "sqlite"
    assert described["database"] == "chefia-rt.db"  # in the working directory
    assert described["bus"] == "memory"
    assert described["workers"] == 1
    assert described["auth"].startswith("open")
    assert described["listen"] == "0.0.0.0:8001/ws/{terminal_id}"
    assert described["transport"] == "websockets"
    assert not (tmp_path / "chefia-rt.db").exists(), "check-config must not create anything"


def test_check_config_production_shape(tmp_path: Path) -> None:
    env = clean_env(
        DATABASE_URL="postgresql://chefia@db/chefia",
        REDIS_URL="redis://cache:6379/0",
        WS_WORKER_THREADS="3",
        JWT_SECRET_KEY="s3cret-s3cret-s3cret-s3cret-s3cret",
        WS_PORT="9001",
        WS_TRANSPORT="picows",
    )
    result = run("check-config", cwd=tmp_path, env=env, entry="script")
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["storage"] == "postgresql"
    assert described["bus"] == "redis"
    assert described["workers"] == 3  # WS_WORKER_THREADS is an alias of WS_WORKERS
    assert described["auth"] == "jwt"
    assert described["listen"].endswith(":9001/ws/{terminal_id}")
    assert described["transport"] == "picows"
    assert "s3cret-s3cret-s3cret-s3cret-s3cret" not in result.stdout
    assert "s3cret-s3cret-s3cret-s3cret-s3cret" not in result.stderr


def test_workers_default_with_redis(tmp_path: Path) -> None:
    env = clean_env(REDIS_URL="redis://cache:6379/0")
    described = json.loads(run("check-config", cwd=tmp_path, env=env).stdout)
    assert described["workers"] == min(4, os.cpu_count() or 1)


def test_empty_values_mean_unset(tmp_path: Path) -> None:
    env = clean_env(REDIS_URL="", JWT_SECRET_KEY="", METRICS_PORT="")
    result = run("check-config", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["bus"] == "memory"
    assert described["auth"].startswith("open")


def test_dotenv_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# the operator's file\nWS_PORT=9123\nDATABASE_URL=sqlite:///data/rt.db\n"
        "WS_LOG_LEVEL=DEBUG\n"
    )
    result = run("check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["listen"] == "0.0.0.0:9123/ws/{terminal_id}"
    assert described["database"] == "data/rt.db"
    # The environment wins over the file.
    described = json.loads(run("check-config", cwd=tmp_path, env=clean_env(WS_PORT="9200")).stdout)
    assert described["listen"] == "0.0.0.0:9200/ws/{terminal_id}"


def test_bad_value_in_dotenv_stops_startup(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("WS_PORT=eighty\n")
    result = run("check-config", cwd=tmp_path)
    assert result.returncode == 1
    assert "WS_PORT" in result.stderr


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    result = run("check-config", cwd=tmp_path, env=clean_env(WS_LOG_LEVEL="debug"))
    assert result.returncode == 0, result.stderr


def test_plan_names_are_aliases_and_the_project_name_wins(tmp_path: Path) -> None:
    env = clean_env(WS_MAX_CONNECTIONS="5", LOG_LEVEL="debug")
    result = run("check-config", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["max_connections_per_worker"] == 5
    assert described["log_level"] == "DEBUG"
    assert described["warnings"] == [] and result.stderr == ""
    # Both names set: the project's own wins, and the disagreement is reported.
    env = clean_env(WS_MAX_CONNECTIONS="5", MAX_WS_CONNECTIONS="700", LOG_LEVEL="ERROR")
    result = run("check-config", "--strict", cwd=tmp_path, env=env | {"WS_LOG_LEVEL": "INFO"})
    assert result.returncode == 1
    described = json.loads(result.stdout)
    assert described["max_connections_per_worker"] == 700
    assert described["log_level"] == "INFO"
    assert described["warnings"] == [
        "WS_LOG_LEVEL and its alias LOG_LEVEL are both set and differ: WS_LOG_LEVEL wins",
        "MAX_WS_CONNECTIONS and its alias WS_MAX_CONNECTIONS are both set and differ: "
        "MAX_WS_CONNECTIONS wins",
    ]
    assert "warning: WS_LOG_LEVEL and its alias LOG_LEVEL" in result.stderr
    # An alias is checked like its name.
    bad = run("check-config", cwd=tmp_path, env=clean_env(WS_MAX_CONNECTIONS="0"))
    assert bad.returncode == 1 and "MAX_WS_CONNECTIONS (or WS_MAX_CONNECTIONS)" in bad.stderr


def test_unknown_and_unused_names_are_reported(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("WS_HEARTBEAT_INTERVALL=10\nBACKUP_ENABLED=false\n")
    env = clean_env(WS_METRICS_INTERVAL="60", SYNC_BATCH_SIZE="9", PROMETHEUS_URL="http://p")
    result = run("check-config", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr  # warnings only fail with --strict
    described = json.loads(result.stdout)
    assert described["scheduled_backups"] == "off"
    warned = described["warnings"]
    assert len(warned) == 3, warned
    assert warned[0].startswith("SYNC_BATCH_SIZE is not a chefia-rt setting and is ignored")
    assert warned[1].startswith("WS_HEARTBEAT_INTERVALL is not a chefia-rt setting")  # .env
    assert warned[2].startswith("WS_METRICS_INTERVAL is not used: monitors get")
    assert result.stderr.count("chefia-rt: warning: ") == 3
    assert run("check-config", "--strict", cwd=tmp_path, env=env).returncode == 1


def test_serve_reports_unknown_names_at_start_up(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:  # the server stops right after start-up: the port is taken
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = clean_env(
            WS_HOST="127.0.0.1",
            WS_PORT=str(busy.getsockname()[1]),
            DATABASE_URL=f"sqlite:///{tmp_path / 'rt.db'}",
            WS_MAX_CONECTIONS="5",
        )
        result = run("serve", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "configuration: WS_MAX_CONECTIONS is not a chefia-rt setting" in result.stderr


BAD_VALUES = [
    ("WS_PORT", "abc"),
    ("WS_PORT", "70000"),
    ("WS_PORT", "-1"),
    ("DATABASE_URL", "mysql://x"),
    ("DATABASE_URL", "sqlite:///"),
    ("WS_WORKERS", "2"),  # without REDIS_URL
    ("WS_WORKER_THREADS", "2"),
    ("WS_WORKER_THREADS", "many"),
    ("WS_WORKERS", "0"),
    ("WS_LOG_LEVEL", "LOUD"),
    ("REDIS_URL", "http://x"),
    ("MAX_WS_CONNECTIONS", "0"),
    ("MAX_WS_MESSAGE_SIZE", "1MB"),
    ("WS_HEARTBEAT_INTERVAL", "0"),
    ("WS_ENABLE_COMPRESSION", "maybe"),
    ("WS_PATH", "ws"),
    ("BACKUP_RETENTION_DAYS", "-3"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v}" for n, v in BAD_VALUES])
def test_bad_value_exits_1_with_one_line_naming_it(tmp_path: Path, name: str, value: str) -> None:
    result = run("check-config", cwd=tmp_path, env=clean_env(**{name: value}))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chefia-rt: ")
    assert name in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_bad_value_stops_serve_and_migrate_too(tmp_path: Path) -> None:
    for command in ("serve", "migrate"):
        result = run(command, cwd=tmp_path, env=clean_env(WS_PORT="abc"))
        assert result.returncode == 1
        assert "WS_PORT" in result.stderr
    assert not (tmp_path / "chefia-rt.db").exists()


# ---- migrate ----------------------------------------------------------------------------------


def test_migrate_creates_the_sqlite_schema(tmp_path: Path) -> None:
    db_path = tmp_path / "nested" / "dir" / "rt.db"
    env = clean_env(DATABASE_URL=f"sqlite:///{db_path}")
    result = run("migrate", cwd=tmp_path, env=env, entry="script")
    assert result.returncode == 0, result.stderr
    assert "migrations applied" in result.stdout
    with sqlite3.connect(db_path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        versions = [row[0] for row in db.execute("SELECT version FROM schema_migrations")]
    assert {
        "entities",
        "sync_operations",
        "conflicts",
        "websocket_connections",
        "schema_migrations",
    } <= tables
    assert any(t.startswith("audit_logs") for t in tables), tables
    assert versions == sorted(set(versions)) and versions[0] == 1
    # Running it again is a no-op.
    result = run("migrate", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(db_path) as db:
        again = [row[0] for row in db.execute("SELECT version FROM schema_migrations")]
    assert again == versions


def test_migrate_default_database_in_working_directory(tmp_path: Path) -> None:
    result = run("migrate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "chefia-rt.db").exists()


def test_migrate_failure_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "not-a-db").write_text("this is not a SQLite database, just text " * 100)
    env = clean_env(DATABASE_URL=f"sqlite:///{tmp_path / 'not-a-db'}")
    result = run("migrate", cwd=tmp_path, env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chefia-rt: ")


def test_serve_on_a_busy_port_fails_cleanly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = clean_env(
            WS_HOST="127.0.0.1", WS_PORT=str(port), DATABASE_URL=f"sqlite:///{tmp_path / 'rt.db'}"
        )
        result = run("serve", cwd=tmp_path, env=env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("chefia-rt: ")
    assert "Traceback" not in result.stderr


def test_serve_freezes_start_up_objects_and_raises_gc_thresholds(tmp_path: Path) -> None:
    """A worker's gc: start-up's objects frozen out of collections, a larger first generation
    (fewer full collections walking every connection's objects: stalls of 100-400 ms at 1000
    connections with Python's defaults). Checked where `serve` hands over to the server."""
    probe = (
        "import gc, chefia_rt.process as server\n"
        "from chefia_rt.cli import GC_THRESHOLDS, main\n"
        "async def run(*args, **kwargs):\n"
        "    print(gc.get_threshold() == GC_THRESHOLDS, gc.get_freeze_count() > 1000)\n"
        "server.run = run\n"
        "main(['serve'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(Path(__file__).parent.parent)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
    assert GC_THRESHOLDS[0] > 700  # Python's default first generation


def test_every_setting_is_of_the_reported_family() -> None:
    """An unknown name is reported when it looks like a setting: every real one must look so."""
    from chefia_rt.config import ALIASES, FAMILY, UNUSED, setting_names

    assert all(name.startswith(FAMILY) for name in setting_names())
    assert set(ALIASES) <= setting_names() and set(ALIASES.values()) <= setting_names()
    assert not set(UNUSED) & setting_names()

"""The `chefia-rt` command line (docs/operations.md §1). Exit codes: 0 ok, 1 failure, 2 usage."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import sys
from collections.abc import Callable, Sequence

from chefia_rt import __version__
from chefia_rt.auth import issue_token, parse_duration
from chefia_rt.config import Settings, load_settings, setting_warnings
from chefia_rt.errors import ConfigError
from chefia_rt.protocol.messages import TERMINAL_ID_RE, TERMINAL_TYPES

log = logging.getLogger("chefia_rt")
# Allocations between first-generation collections, and collections between older ones.
GC_THRESHOLDS = (10_000, 20, 20)


def _describe(settings: Settings) -> dict[str, object]:
    return {
        "listen": f"{settings.ws_host}:{settings.ws_port}{settings.ws_path}/{{terminal_id}}",
        "transport": settings.ws_transport,
        "storage": settings.storage_kind,
        "database": settings.sqlite_path if settings.storage_kind == "sqlite" else "postgresql",
        "bus": settings.bus_kind,
        "workers": settings.workers,
        "auth": "jwt" if settings.auth_enabled else "open (JWT_SECRET_KEY not set)",
        "max_connections_per_worker": settings.max_ws_connections,
        "log_level": settings.ws_log_level,
        "scheduled_backups": settings.backup_schedule if settings.backup_enabled else "off",
        "backup_encryption": "AES-256-GCM" if settings.encryption_key else "none",
    }


def cmd_check_config(args: argparse.Namespace, settings: Settings) -> int:
    warnings = setting_warnings()
    for warning in warnings:
        print(f"chefia-rt: warning: {warning}", file=sys.stderr)
    print(json.dumps(_describe(settings) | {"warnings": warnings}, indent=2))
    return 1 if warnings and args.strict else 0


def settle_gc() -> None:
    """A worker's garbage collector, set for a server holding many long-lived objects.

    What start-up made (modules, settings) is frozen out of every later collection; a larger
    first generation means fewer collections, so fewer in-flight objects (operations, frames)
    get promoted, and the full collections that walk every connection's objects come rarely.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from chefia_rt.logs import setup_logging
    from chefia_rt.process import run

    setup_logging(settings.ws_log_level)
    if args.worker is None:
        for warning in setting_warnings():
            log.warning("configuration: %s", warning)
    if not settings.auth_enabled and args.worker is None:
        log.warning(
            "OPEN MODE: JWT_SECRET_KEY is not set; any client can connect as any terminal "
            "of any store. Set JWT_SECRET_KEY before exposing this server."
        )
    if settings.workers > 1 and args.worker is None:
        from chefia_rt.supervisor import run_supervisor

        return run_supervisor(settings)
    if args.worker is None:
        from chefia_rt.metrics import multiproc_dir_from_env, prepare_dir

        # One worker run directly, in multiprocess mode only if the operator exported the
        # variable (prometheus_client reads the environment, not .env): no earlier run's counts.
        if (directory := multiproc_dir_from_env()) is not None:
            prepare_dir(directory)
    settle_gc()
    try:
        import uvloop

        uvloop.run(run(settings, index=args.worker))
    except ImportError:
        asyncio.run(run(settings, index=args.worker))
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from chefia_rt.wiring import make_store

    async def migrate() -> None:
        store = make_store(settings)
        await store.open()
        await store.close()

    asyncio.run(migrate())
    print(f"migrations applied ({settings.storage_kind})")
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.auth_enabled:
        print(
            "chefia-rt: JWT_SECRET_KEY is not set: tokens are signed with it (and the server only "
            "checks them when it is set)",
            file=sys.stderr,
        )
        return 1
    print(issue_token(settings.jwt_keys, args.terminal, args.store, args.type, args.ttl, args.user))
    return 0


def _token_arguments(parser: argparse.ArgumentParser) -> None:
    def name(kind: str) -> Callable[[str], str]:
        def check(value: str) -> str:
            if not TERMINAL_ID_RE.match(value):
                raise argparse.ArgumentTypeError(
                    f"{kind} must be 1-64 characters of [A-Za-z0-9._:-]"
                )
            return value

        return check

    def duration(value: str) -> int:
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def user(value: str) -> str:
        if not 1 <= len(value) <= 128:
            raise argparse.ArgumentTypeError("user id must be 1-128 characters")
        return value

    parser.add_argument(
        "--terminal", required=True, type=name("terminal id"), help="terminal_id (the token's sub)"
    )
    parser.add_argument(
        "--store", required=True, type=name("store id"), help="store_id the terminal belongs to"
    )
    parser.add_argument("--type", required=True, choices=sorted(TERMINAL_TYPES))
    parser.add_argument(
        "--ttl", default=12 * 3600, type=duration, help="lifetime: 90s, 15m, 12h, 7d (default 12h)"
    )
    parser.add_argument("--user", type=user, default=None, help="user_id recorded in the audit log")


def cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from chefia_rt.backup import BackupError, Progress, create_backup, verify_archive
    from chefia_rt.schedule import cron_to_oncalendar

    try:
        if args.print_oncalendar:
            print("\n".join(cron_to_oncalendar(settings.backup_schedule)))
            return 0
        if args.schedule:
            return _scheduled_backups(settings)
        if args.verify is not None:
            verified = verify_archive(Path(args.verify), Progress(), settings.encryption_key)
            print(verified.describe())
            return 0
        output = Path(args.output) if args.output is not None else None
        result = asyncio.run(create_backup(settings, output_dir=output, progress=Progress()))
    except (BackupError, ValueError) as exc:
        print(f"chefia-rt: {exc}", file=sys.stderr)
        return 1
    print(result.path)
    return 0


def _scheduled_backups(settings: Settings) -> int:
    """A backup at every BACKUP_SCHEDULE moment (local time), for ever; a failed one is said
    and the next one still runs. BACKUP_ENABLED=false: says so and exits 0."""
    import time
    from datetime import datetime

    from chefia_rt.backup import BackupError, Progress, create_backup
    from chefia_rt.schedule import next_run

    if not settings.backup_enabled:
        print("chefia-rt: scheduled backups are off (BACKUP_ENABLED=false)", file=sys.stderr)
        return 0
    while True:
        due = next_run(settings.backup_schedule, datetime.now().astimezone())
        print(f"chefia-rt: next backup at {due.isoformat()}", file=sys.stderr, flush=True)
        while (wait := (due - datetime.now().astimezone()).total_seconds()) > 0:
            time.sleep(min(wait, 60.0))  # a clock that jumps is noticed within a minute
        try:
            result = asyncio.run(create_backup(settings, progress=Progress()))
            print(result.path, flush=True)
        except BackupError as exc:
            print(f"chefia-rt: scheduled backup failed: {exc}", file=sys.stderr, flush=True)


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from chefia_rt.backup import BackupError, Progress, restore_archive

    try:
        result = asyncio.run(
            restore_archive(settings, Path(args.archive), force=args.force, progress=Progress())
        )
    except BackupError as exc:
        print(f"chefia-rt: {exc}", file=sys.stderr)
        return 1
    print(result.describe())
    return 0


def _backup_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--verify",
        metavar="ARCHIVE",
        help="check an archive (checksums, row counts, format) without restoring it",
    )
    what.add_argument(
        "--output", metavar="DIR", help="write the archive here instead of BACKUP_DIR"
    )
    what.add_argument(
        "--schedule",
        action="store_true",
        help="stay running and back up at every BACKUP_SCHEDULE time (containers; systemd "
        "hosts use chefia-rt-backup.timer); exits at once with BACKUP_ENABLED=false",
    )
    what.add_argument(
        "--print-oncalendar",
        action="store_true",
        help="print the systemd OnCalendar= line(s) equivalent to BACKUP_SCHEDULE",
    )


def _restore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", metavar="ARCHIVE", help="a chefia-rt backup archive (.tar)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace the data of a database that is not empty (cleared in the same transaction)",
    )


Command = Callable[[argparse.Namespace, Settings], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chefia-rt",
        description="Real-time synchronization server of the Chefia restaurant POS. "
        "Configured by the environment (and a .env file); see docs/configuration.md.",
    )
    parser.add_argument("--version", action="version", version=f"chefia-rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: list[tuple[str, str, Command]] = [
        ("serve", "run the server (supervisor and workers)", cmd_serve),
        ("migrate", "apply pending storage migrations", cmd_migrate),
        ("check-config", "validate the environment and say what would run", cmd_check_config),
        ("token", "print a JWT for one terminal (needs JWT_SECRET_KEY)", cmd_token),
        ("backup", "write one consistent archive of the store data (or --verify one)", cmd_backup),
        ("restore", "restore an archive into DATABASE_URL (empty, or --force)", cmd_restore),
    ]
    for name, help_text, func in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if name == "serve":
            # Set by the supervisor for the worker processes it starts.
            p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
        if name == "token":
            _token_arguments(p)
        if name == "check-config":
            p.add_argument(
                "--strict",
                action="store_true",
                help="exit 1 when a name is unknown, unused or shadowed (the warnings)",
            )
        if name == "backup":
            _backup_arguments(p)
        if name == "restore":
            _restore_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        result: int = args.func(args, settings)
        return result
    except ConfigError as exc:
        print(f"chefia-rt: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
    except Exception as exc:
        print(f"chefia-rt: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

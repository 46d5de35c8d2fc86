"""The `chefia-rt` command line (SPEC §14). Exit codes: 0 ok, 1 failure, 2 usage."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence

from chefia_rt import __version__
from chefia_rt.config import Settings, load_settings
from chefia_rt.errors import ConfigError

log = logging.getLogger("chefia_rt")


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.ws_log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # websockets logs every connection at INFO; at dinner-rush volume that is noise.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, logging.getLogger().level))


def _describe(settings: Settings) -> dict[str, object]:
    return {
        "listen": f"{settings.ws_host}:{settings.ws_port}{settings.ws_path}/{{terminal_id}}",
        "storage": settings.storage_kind,
        "database": settings.sqlite_path if settings.storage_kind == "sqlite" else "postgresql",
        "bus": settings.bus_kind,
        "workers": settings.workers,
        "auth": "jwt" if settings.auth_enabled else "open (JWT_SECRET_KEY not set)",
        "max_connections_per_worker": settings.max_ws_connections,
    }


def cmd_check_config(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(_describe(settings), indent=2))
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from chefia_rt.server import run

    _setup_logging(settings)
    if not settings.auth_enabled and args.worker is None:
        log.warning(
            "OPEN MODE: JWT_SECRET_KEY is not set; any client can connect as any terminal "
            "of any store. Set JWT_SECRET_KEY before exposing this server."
        )
    if settings.workers > 1 and args.worker is None:
        from chefia_rt.supervisor import run_supervisor

        return run_supervisor(settings)
    try:
        import uvloop

        uvloop.run(run(settings))
    except ImportError:
        asyncio.run(run(settings))
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from chefia_rt.node import make_store

    async def migrate() -> None:
        store = make_store(settings)
        await store.open()
        await store.close()

    asyncio.run(migrate())
    print(f"migrations applied ({settings.storage_kind})")
    return 0


Command = Callable[[argparse.Namespace, Settings], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chefia-rt",
        description="Real-time synchronization server of the Chefia restaurant POS. "
        "Configured by the environment (and a .env file); see the README.",
    )
    parser.add_argument("--version", action="version", version=f"chefia-rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: list[tuple[str, str, Command]] = [
        ("serve", "run the server (supervisor and workers)", cmd_serve),
        ("migrate", "apply pending storage migrations", cmd_migrate),
        ("check-config", "validate the environment and say what would run", cmd_check_config),
    ]
    for name, help_text, func in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if name == "serve":
            # Set by the supervisor for the worker processes it starts.
            p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
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

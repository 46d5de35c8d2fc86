"""Settings: the environment names of docs/configuration.md, validated once at start and passed
down."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chefia_rt.auth import parse_keys
from chefia_rt.errors import ConfigError
from chefia_rt.schedule import cron_to_oncalendar
from chefia_rt.sync.permissions import Permissions
from chefia_rt.sync.policies import PolicyTable

DEFAULT_DATABASE_URL = "sqlite:///chefia-rt.db"
MAX_CACHE_TTL = 3600.0
# Never repeated in an error message.
SECRET_SETTINGS = frozenset({"JWT_SECRET_KEY", "ENCRYPTION_KEY"})
# ENCRYPTION_KEY: a passphrase (scrypt makes the archive key of it); shorter ones are guessable.
MIN_ENCRYPTION_KEY = 16
# WS_TRANSPORT: the WebSocket front ends, the default first.
Transport = Literal["websockets", "picows"]
TRANSPORTS: tuple[Transport, ...] = ("websockets", "picows")


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


class Settings(BaseSettings):
    """Every knob of the server. Field names map to environment variables in upper case."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        populate_by_name=True,
    )

    ws_host: str = "0.0.0.0"
    ws_port: int = Field(8001, ge=0, le=65535)
    ws_path: str = "/ws"
    # The WebSocket library that speaks the protocol (chefia_rt/server.py, picows_server.py).
    ws_transport: Transport = "websockets"
    # Each alias below is read when the project's own name is not set (see ALIASES).
    max_ws_connections: int = Field(
        1000,
        ge=1,
        validation_alias=AliasChoices("max_ws_connections", "ws_max_connections"),
    )
    max_ws_message_size: int = Field(1_048_576, ge=1024)
    ws_connection_timeout: float = Field(300.0, gt=0)
    ws_heartbeat_interval: float = Field(30.0, gt=0)
    ws_message_queue_size: int = Field(1000, ge=1)
    # Bytes of encoded messages queued per terminal (answers, pushes, snapshot pages together);
    # a terminal whose queue goes beyond is closed 1013. At least MAX_WS_MESSAGE_SIZE.
    ws_queue_max_bytes: int = Field(8 * 1_048_576, ge=1024)
    # Kernel send buffer per connection (SO_SNDBUF; 0 keeps the kernel's autotuning, up to 4 MiB
    # on Linux). Small enough that a terminal that stops reading fills it and its queue soon and
    # is closed 1013, instead of holding megabytes of kernel memory for many seconds.
    ws_send_buffer: int = Field(262_144, ge=0)
    # A catch-up (resume, gap fill) whose terminal reads nothing for this long is closed 1013.
    ws_stall_timeout: float = Field(30.0, gt=0)
    ws_workers: int | None = Field(
        None, ge=1, le=256, validation_alias=AliasChoices("ws_workers", "ws_worker_threads")
    )
    ws_allowed_origins: str = "*"
    ws_enable_compression: bool = True
    ws_enable_metrics: bool = True
    ws_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", validation_alias=AliasChoices("ws_log_level", "log_level")
    )
    ws_log_messages: bool = False
    # Batching of msgpack pushes: flush at this many messages or after this window.
    ws_batch_max_messages: int = Field(100, ge=1, le=1000)
    ws_batch_window_ms: float = Field(2.0, ge=0, le=5)
    compression_threshold: int = Field(1024, ge=64)
    # Abuse: this many invalid frames within the window closes the connection with 4006.
    ws_invalid_frame_limit: int = Field(20, ge=1)
    ws_invalid_frame_window: float = Field(10.0, gt=0)
    # Per-terminal operation rate (token bucket); this many refusals within the window: close.
    ws_rate_limit: float = Field(1000.0, gt=0)
    ws_rate_burst: float = Field(2000.0, ge=1)
    ws_rate_limit_strikes: int = Field(100, ge=1)
    ws_rate_limit_window: float = Field(10.0, gt=0)
    # What other requests cost in that same bucket, in operations: a snapshot reads and sends the
    # whole store, a resume reads the log, a lock request is one round trip to the lock service.
    ws_rate_cost_snapshot: float = Field(500.0, ge=0)
    ws_rate_cost_resume: float = Field(50.0, ge=0)
    ws_rate_cost_lock: float = Field(1.0, ge=0)
    # Live locks one terminal may hold at once; beyond: lock_failed (reason says so).
    locks_per_terminal: int = Field(100, ge=1, le=100_000)
    # Group commit: at most this many operations per transaction; at most this many waiting.
    sync_batch_max_ops: int = Field(500, ge=1)
    sync_queue_size: int = Field(10_000, ge=1)
    sync_commit_timeout: float = Field(10.0, gt=0)
    # Bytes of one entity's state (compact JSON); a write that would pass it is refused (4006).
    # It also bounds one operation's log row (a BULK_UPDATE: all its states together).
    entity_max_bytes: int = Field(262_144, ge=1024)
    # The operation log answers resumes and duplicates this long (idempotency needs >= 7 days).
    sync_log_retention_days: int = Field(30, ge=7)
    # Storage upkeep (log pruning, audit partitions) and the check for pushes a worker missed.
    sync_maintenance_interval: float = Field(86_400.0, gt=0)
    sync_reconcile_interval: float = Field(5.0, gt=0)
    # A client timestamp later than server time + this many seconds counts as that moment in
    # conflict decisions: a terminal whose clock runs ahead wins last-write-wins for at most this
    # long, never forever.
    clock_skew_max: float = Field(300.0, ge=0, le=86_400)
    # Conflict policy table overrides, JSON: {"tables": {"policy": "merge_changes"}}.
    sync_policies: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Permission table overrides, JSON: {"waiter": [{"entity_type": "orders"}, ...]}.
    terminal_permissions: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)
    # The terminal directory (monitor, terminal_status metric): each worker reports its sessions'
    # figures this often; a worker silent for 3 reports (+2 s) has its terminals marked offline.
    terminal_report_interval: float = Field(2.0, gt=0, le=60)
    # A terminal offline this long (seconds) is forgotten: gone from the monitor and the metric.
    terminal_retention: float = Field(900.0, gt=0)
    # RequestCache (docs/architecture.md §5): seconds a cached entity answers reads, per entity
    # type, JSON overrides of the defaults, "*" for every other type: {"orders": 0.25, "*": 2}.
    cache_enabled: bool = True
    cache_ttls: dict[str, float] = Field(default_factory=dict)
    # Terminal Monitor alerts (docs/operations.md §7): average latency over the last minute, a
    # terminal away this long (seconds), the conflict rate over the last minute, a terminal's
    # reported memory.
    monitor_alert_latency_ms: float = Field(100.0, gt=0)
    monitor_alert_offline_after: float = Field(60.0, gt=0)
    monitor_alert_conflict_rate: float = Field(0.05, gt=0, le=1)
    monitor_alert_memory_mb: float = Field(80.0, gt=0)
    # How often each worker looks for server events (backups, restores) to show monitors.
    monitor_event_poll_interval: float = Field(5.0, gt=0, le=300)
    database_pool_size: int = Field(8, ge=2, le=200)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    # Where the workers of a node write their metric values (prometheus_client multiprocess
    # mode); unset: the supervisor makes a private temporary one. Emptied at every start.
    prometheus_multiproc_dir: str | None = None
    # Seconds between the stats signals every worker sends (/ws/stats across workers and nodes).
    ws_stats_interval: float = Field(2.0, gt=0, le=60)

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None
    # Namespace of every Redis key and channel: deployments (or tests) sharing one Redis.
    redis_prefix: str = Field("chefia", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    jwt_secret_key: str | None = None

    backup_dir: str = "./backups"
    backup_retention_days: int = Field(30, ge=1)
    backup_schedule: str = "0 2 * * *"
    # Scheduled backups (the systemd timer deploy.sh installs, compose's backup service); a
    # `chefia-rt backup` run by hand, and deploy.sh's backup before migrating, run regardless.
    backup_enabled: bool = True
    # Backup archives encrypted with this passphrase (AES-256-GCM); unset: archives in clear.
    # verify and restore of an encrypted archive need the same key.
    encryption_key: str | None = None

    @field_validator("ws_path")
    @classmethod
    def _path_shape(cls, value: str) -> str:
        if not value.startswith("/") or value.endswith("/") or " " in value:
            raise ValueError("must start with '/' and not end with '/', e.g. /ws")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must be sqlite:///path or postgresql://user@host/db")
        if value.startswith("sqlite:///") and value == "sqlite:///":
            raise ValueError("sqlite:/// needs a file path")
        return value

    @field_validator("backup_schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        cron_to_oncalendar(value)  # ValueError naming the bad field
        return value

    @field_validator("ws_log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value: object) -> object:
        # Operators write `debug` as often as `DEBUG` (logging itself accepts only upper case).
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator(
        "redis_url",
        "jwt_secret_key",
        "metrics_port",
        "prometheus_multiproc_dir",
        "encryption_key",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be redis://host:port/db")
        return value

    @field_validator("jwt_secret_key")
    @classmethod
    def _jwt_keys(cls, value: str | None) -> str | None:
        if value is not None:
            parse_keys(value)  # ValueError naming which key is short, never the key itself
        return value

    @field_validator("encryption_key")
    @classmethod
    def _encryption_key(cls, value: str | None) -> str | None:
        if value is not None and len(value) < MIN_ENCRYPTION_KEY:
            raise ValueError(
                f"must be at least {MIN_ENCRYPTION_KEY} characters (openssl rand -hex 32), "
                f"got {len(value)}"
            )
        return value

    @field_validator("cache_ttls")
    @classmethod
    def _cache_ttls(cls, value: dict[str, float]) -> dict[str, float]:
        for entity_type, ttl in value.items():
            if not (0 <= ttl <= MAX_CACHE_TTL):
                raise ValueError(
                    f"{entity_type}: a TTL is 0 to {MAX_CACHE_TTL:g} seconds, got {ttl:g}"
                )
        return value

    @field_validator("sync_policies")
    @classmethod
    def _policies(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        PolicyTable(value)  # raises ValueError naming what is wrong
        return value

    @field_validator("terminal_permissions")
    @classmethod
    def _permissions(
        cls, value: dict[str, list[dict[str, Any]]]
    ) -> dict[str, list[dict[str, Any]]]:
        try:
            Permissions(value)
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"each rule needs an entity_type (and optional fields): {exc}"
            ) from None
        return value

    @model_validator(mode="after")
    def _entity_fits_a_message(self) -> Settings:
        if self.entity_max_bytes * 2 <= self.max_ws_message_size:
            return self
        if "entity_max_bytes" not in self.model_fields_set:
            # Only MAX_WS_MESSAGE_SIZE was lowered: the default follows it.
            self.entity_max_bytes = self.max_ws_message_size // 2
        else:
            raise ValueError(
                f"ENTITY_MAX_BYTES={self.entity_max_bytes} must be at most half of "
                f"MAX_WS_MESSAGE_SIZE={self.max_ws_message_size}: a push or a confirmation "
                "carries an entity's whole state"
            )
        return self

    @model_validator(mode="after")
    def _workers(self) -> Settings:
        if self.ws_workers is None:
            self.ws_workers = _default_workers() if self.redis_url else 1
        if self.ws_workers > 1 and not self.redis_url:
            raise ValueError(
                f"WS_WORKERS (or WS_WORKER_THREADS)={self.ws_workers} needs REDIS_URL: without "
                "Redis the workers could not reach each other's terminals; set REDIS_URL or "
                "WS_WORKERS=1"
            )
        return self

    @model_validator(mode="after")
    def _queue_bytes(self) -> Settings:
        if self.ws_queue_max_bytes < self.max_ws_message_size:
            raise ValueError(
                f"WS_QUEUE_MAX_BYTES ({self.ws_queue_max_bytes}) must be at least "
                f"MAX_WS_MESSAGE_SIZE ({self.max_ws_message_size}): one frame must fit the queue"
            )
        return self

    @property
    def workers(self) -> int:
        assert self.ws_workers is not None
        return self.ws_workers

    @property
    def storage_kind(self) -> str:
        return "sqlite" if self.database_url.startswith("sqlite") else "postgresql"

    @property
    def sqlite_path(self) -> str:
        return self.database_url.removeprefix("sqlite:///")

    @property
    def bus_kind(self) -> str:
        return "redis" if self.redis_url else "memory"

    @property
    def auth_enabled(self) -> bool:
        return self.jwt_secret_key is not None

    @property
    def jwt_keys(self) -> tuple[str, ...]:
        """The keys of JWT_SECRET_KEY, the signing one first (empty in open mode)."""
        return () if self.jwt_secret_key is None else parse_keys(self.jwt_secret_key)

    @property
    def allowed_origins(self) -> list[str] | None:
        """None when every origin is allowed."""
        origins = [o.strip() for o in self.ws_allowed_origins.split(",") if o.strip()]
        return None if not origins or "*" in origins else origins


# Other names for settings, each read only when the project's own name is not set: the project's
# name wins over its alias (and, as for every setting, the environment wins over .env).
ALIASES = {
    "WS_MAX_CONNECTIONS": "MAX_WS_CONNECTIONS",
    "LOG_LEVEL": "WS_LOG_LEVEL",
    "WS_WORKER_THREADS": "WS_WORKERS",
}
# Names a deployment may carry that the server accepts but does not use, and why.
UNUSED = {
    "WS_METRICS_INTERVAL": (
        "monitors get the server's figures every WS_STATS_INTERVAL seconds and /metrics is "
        "computed when it is scraped"
    ),
}
# Read by other parts of a deployment (deploy/health-check.sh), not by the server.
ELSEWHERE = frozenset({"PROMETHEUS_URL", "GRAFANA_URL", "ALERTMANAGER_URL"})
# Environment names that look like this server's: an unknown one among them is most likely a
# misspelt or outdated setting, reported by check-config and at start-up.
FAMILY = (
    "WS_",
    "MAX_WS_",
    "SYNC_",
    "BACKUP_",
    "MONITOR_",
    "CACHE_",
    "TERMINAL_",
    "DATABASE_",
    "REDIS_",
    "JWT_",
    "METRICS_",
    "PROMETHEUS_",
    "COMPRESSION_",
    "ENTITY_",
    "CLOCK_",
    "LOCKS_",
    "LOG_",
    "ENCRYPTION_",
)


def setting_names() -> set[str]:
    """Every environment name the server reads, aliases included, in upper case."""
    names: set[str] = set()
    for field, info in Settings.model_fields.items():
        names.add(field.upper())
        if isinstance(info.validation_alias, AliasChoices):
            names.update(str(choice).upper() for choice in info.validation_alias.choices)
    return names


def setting_warnings(
    environ: dict[str, str] | None = None, env_file: str | None = ".env"
) -> list[str]:
    """What in the environment (and .env) the server ignores, or reads other than it looks:
    unknown names of the server's family, names it does not use, an alias beside its name."""
    from dotenv import dotenv_values

    given: dict[str, str] = {}
    if env_file is not None and os.path.isfile(env_file):
        given |= {k.upper(): v or "" for k, v in dotenv_values(env_file).items()}
    given |= {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}
    known = setting_names()
    warnings = []
    for name in sorted(given):
        if name in UNUSED:
            warnings.append(f"{name} is not used: {UNUSED[name]}")
        elif name in ALIASES:
            own = ALIASES[name]
            if own in given and given[own] != given[name]:
                warnings.append(f"{own} and its alias {name} are both set and differ: {own} wins")
        elif name.startswith(FAMILY) and name not in known and name not in ELSEWHERE:
            warnings.append(
                f"{name} is not a chefia-rt setting and is ignored (config/.env.example "
                "lists every setting)"
            )
    return warnings


def _env_name(field: str) -> str:
    """The environment name(s) of a field, aliases included, as the operator may have set it."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices):
        names = [str(choice).upper() for choice in alias.choices]
        return f"{names[0]} (or {', '.join(names[1:])})" if len(names) > 1 else names[0]
    return field.upper()


def load_settings(**overrides: object) -> Settings:
    """Read and validate the environment (and .env); a bad value is a one-line ConfigError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = _env_name("_".join(str(p) for p in err["loc"]))
            value = err.get("input")
            secret = name in SECRET_SETTINGS
            shown = "" if isinstance(value, dict) or secret else f" (got {value!r})"
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {message}{shown}" if name else message)
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None

"""The schema the migrations build, described once: every table, its columns in table order
with their kind in each database, and the key that identifies a row.

The stores' record ↔ row conversions (rows.py) and the backup archive (backup/format.py) are
built from this description, and tests/store/test_schema.py checks it against the tables the
migrations of both stores create, so that a migration that changes a table fails that test
until this description follows it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Kind:
    """A column's type: as SQLite declares it and as PostgreSQL casts to it."""

    sqlite: str
    postgres: str


TEXT = Kind("TEXT", "text")
BIGINT = Kind("INTEGER", "bigint")
INTEGER = Kind("INTEGER", "integer")
JSON = Kind("TEXT", "jsonb")  # JSON text in SQLite
FLAG = Kind("INTEGER", "boolean")  # 0/1 in SQLite
TIME = Kind("TEXT", "timestamptz")  # canonical UTC ISO text in SQLite
EPOCH = Kind("REAL", "timestamptz")  # epoch seconds in SQLite


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: Kind
    nullable: bool = False
    # False: operational state that a backup leaves out (a restore makes it anew).
    backed_up: bool = True


@dataclass(frozen=True, slots=True)
class Table:
    """A table: its columns in table order, the key that identifies a row (the primary key;
    PostgreSQL's partitioned audit log has none, its rows are identified by `id` alone), and
    `record`: the columns of the stores' record tuples, in the order of the domain record's
    fields (empty: the stores write this table column by column)."""

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    record: tuple[str, ...] = ()
    backed_up: bool = True
    # The stores whose migrations make it (the others keep the state elsewhere).
    stores: tuple[str, ...] = ("sqlite", "postgresql")

    def __post_init__(self) -> None:
        unknown = [c for c in (*self.key, *self.record) if c not in self.names]
        if unknown:
            raise ValueError(f"{self.name}: no column {unknown}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def record_list(self) -> str:
        """The record's columns as SQL lists them: `a, b, c`."""
        return ", ".join(self.record)

    def postgres_types(self) -> list[str]:
        """The PostgreSQL type of each of the record's columns, in order (an unnest's casts)."""
        return [self.column(c).kind.postgres for c in self.record]


def _names(spec: str) -> tuple[str, ...]:
    return tuple(spec.split())


def _columns(spec: str, kind: Kind = TEXT, **flags: bool) -> tuple[Column, ...]:
    return tuple(Column(name, kind, **flags) for name in spec.split())


STORE_SEQS = Table(
    "store_seqs",
    (
        Column("store_id", TEXT),
        Column("last_seq", BIGINT),
        # A restore always starts a new epoch (see backup/sqlite.py, backup/postgres.py).
        Column("epoch", TEXT, backed_up=False),
    ),
    key=("store_id",),
)

ENTITIES = Table(
    "entities",
    (
        *_columns("store_id entity_type entity_id"),
        Column("version", BIGINT),
        Column("data", JSON),
        Column("deleted", FLAG),
        Column("timestamp", TEXT),
        Column("field_versions", JSON),
        Column("updated_at", TIME),
        Column("updated_by", TEXT),
    ),
    key=("store_id", "entity_type", "entity_id"),
    # Entity: its key's three parts, then its fields.
    record=_names(
        "store_id entity_type entity_id version data deleted timestamp updated_by "
        "field_versions updated_at"
    ),
)

SYNC_OPERATIONS = Table(
    "sync_operations",
    (
        *_columns("id store_id"),
        Column("seq", BIGINT, nullable=True),
        *_columns("entity_type entity_id operation"),
        Column("data", JSON),
        Column("version", BIGINT, nullable=True),
        Column("deleted", FLAG),
        Column("status", TEXT),
        Column("conflict_resolved", FLAG),
        Column("terminal_id", TEXT),
        Column("user_id", TEXT, nullable=True),
        *_columns("priority timestamp server_time"),
    ),
    key=("store_id", "id"),
    # OpRecord's fields.
    record=_names(
        "id store_id entity_type entity_id operation data version seq status "
        "conflict_resolved terminal_id user_id priority timestamp server_time deleted"
    ),
)

AUDIT_LOGS = Table(
    "audit_logs_master",
    (
        Column("id", BIGINT),
        *_columns("operation_id store_id entity_type entity_id operation terminal_id"),
        Column("user_id", TEXT, nullable=True),
        Column("changes", JSON),
        Column("sync_status", TEXT),
        Column("conflict_resolved", FLAG),
        Column("timestamp", TIME),
    ),
    key=("id",),
    # AuditRecord's fields, its states before and after as `changes`; the id is the database's.
    record=_names(
        "operation_id store_id entity_type entity_id operation terminal_id user_id "
        "changes sync_status conflict_resolved timestamp"
    ),
)

CONFLICTS = Table(
    "conflicts",
    (
        *_columns("id store_id operation_id"),
        Column("operation", JSON),
        Column("server_version", BIGINT),
        Column("server_data", JSON),
        Column("created_at", TEXT),
    ),
    key=("store_id", "id"),
    # Conflict's fields, its operation's store and id after its own id.
    record=_names("id store_id operation_id operation server_version server_data created_at"),
)

WEBSOCKET_CONNECTIONS = Table(
    "websocket_connections",
    (
        *_columns("session_id terminal_id terminal_type store_id"),
        Column("user_id", TEXT, nullable=True),
        Column("connected_at", TEXT),
        Column("disconnected_at", TEXT, nullable=True),
        *_columns("bytes_in bytes_out messages_in messages_out", BIGINT),
        Column("close_code", INTEGER, nullable=True),
    ),
    key=("session_id",),
    # SessionRecord's fields.
    record=_names(
        "session_id terminal_id terminal_type store_id user_id connected_at "
        "disconnected_at bytes_in bytes_out messages_in messages_out close_code"
    ),
)

# Operational history, not store data: backups leave it out, a restore leaves it as it was.
SERVER_EVENTS = Table(
    "server_events",
    (
        Column("id", BIGINT),
        Column("kind", TEXT),
        Column("created_at", EPOCH),
        Column("payload", JSON),
    ),
    key=("id",),
    backed_up=False,
)

# PostgreSQL only: every lock lease granted, by entity, until when it may be in force (epoch ms,
# renewals only push it later). A batch checks the leases, in the bus, only of the entities
# marked here (docs/architecture.md §3.12). Operational state: never backed up.
LEASE_MARKS = Table(
    "lease_marks",
    (*_columns("store_id entity_type entity_id"), Column("until_ms", BIGINT)),
    key=("store_id", "entity_type", "entity_id"),
    backed_up=False,
    stores=("postgresql",),
)

# In the order a restore loads them (there are no foreign keys); a backup archive numbers its
# members in this order (the nonces of an encrypted one start with that number).
TABLES = (
    STORE_SEQS,
    ENTITIES,
    SYNC_OPERATIONS,
    AUDIT_LOGS,
    CONFLICTS,
    WEBSOCKET_CONNECTIONS,
    SERVER_EVENTS,
    LEASE_MARKS,
)

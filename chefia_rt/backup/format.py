"""The archive format: its tables, how their values travel, and the manifest that describes
an archive (written, then parsed and checked)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chefia_rt import __version__
from chefia_rt.archive_crypto import ArchiveKey
from chefia_rt.protocol.messages import format_timestamp
from chefia_rt.store import schema
from chefia_rt.store.rows import migrations

# The newest format this version reads; a plain archive is still written as 1 (older releases
# read it), an encrypted one as 2.
FORMAT_VERSION = 2
PLAIN_FORMAT_VERSION = 1
FORMAT_NAME = "chefia-rt-backup"
MANIFEST = "manifest.json"


class BackupError(Exception):
    """Backup, verify or restore failed; the message is one line an operator can act on."""


class ArchiveWriteError(BackupError):
    """The database was fine but the archive could not be written (directory, disk full)."""


@dataclass(frozen=True, slots=True)
class Table:
    """One table of the archive and how its values travel."""

    name: str
    columns: tuple[str, ...]
    order: tuple[str, ...]
    json_columns: frozenset[str] = frozenset()
    bool_columns: frozenset[str] = frozenset()
    # timestamptz in PostgreSQL, ISO text in SQLite; canonical ISO text in the archive.
    time_columns: frozenset[str] = frozenset()
    # Sorted as numbers (the others as text, in code-point order).
    integer_order: frozenset[str] = frozenset()

    @property
    def member(self) -> str:
        return f"{self.name}.jsonl.gz"

    @classmethod
    def of(cls, table: schema.Table) -> Table:
        """The archive's view of a table of the schema: the columns a backup keeps, rows in
        the order of the table's key."""
        columns = [c for c in table.columns if c.backed_up]

        def kind(*kinds: schema.Kind) -> frozenset[str]:
            return frozenset(c.name for c in columns if c.kind in kinds)

        keys = [table.column(name) for name in table.key]
        return cls(
            table.name,
            tuple(c.name for c in columns),
            table.key,
            json_columns=kind(schema.JSON),
            bool_columns=kind(schema.FLAG),
            time_columns=kind(schema.TIME),
            integer_order=frozenset(
                c.name for c in keys if c.kind in (schema.BIGINT, schema.INTEGER)
            ),
        )


# The tables of the store data, in restore order (store/schema.py): operational state
# (server_events, store_seqs' epoch) stays out.
TABLES = tuple(Table.of(t) for t in schema.TABLES if t.backed_up)
TABLES_BY_NAME = {t.name: t for t in TABLES}


TABLES_BY_MEMBER = {t.member: t for t in TABLES}


def member_number(member: str) -> int:
    """A member's number in the archive (its nonces start with it when encrypted)."""
    return next(i for i, table in enumerate(TABLES) if table.member == member)


def dump_line(row: dict[str, Any]) -> bytes:
    return (
        json.dumps(row, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"
    ).encode()


def canonical_time(value: str) -> str:
    """ISO text of any offset (or none: UTC) → the server's canonical UTC form. Text that is not
    a timestamp is kept as it is (the archive holds what the database held)."""
    try:
        return format_timestamp(datetime.fromisoformat(value))
    except ValueError:
        return value


def _parse_time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def to_target(
    table: Table, columns: list[str], row: dict[str, Any], postgres: bool
) -> tuple[Any, ...]:
    """An archive row as the target database takes it. JSON travels as text to both (asyncpg's
    own codecs on a plain connection); SQLite keeps flags as 0/1 and times as canonical text,
    PostgreSQL takes bool and timestamptz."""
    values = []
    for column in columns:
        value = row[column]
        if value is None:
            pass
        elif column in table.json_columns:
            value = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        elif column in table.bool_columns:
            value = bool(value) if postgres else int(bool(value))
        elif postgres and column in table.time_columns:
            value = _parse_time(value)
        values.append(value)
    return tuple(values)


@dataclass(slots=True)
class MemberInfo:
    """What the manifest says about one table member."""

    table: str
    columns: list[str]
    rows: int
    bytes: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "columns": self.columns,
            "rows": self.rows,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }


@dataclass(slots=True)
class Snapshot:
    """What one consistent read of the source produced (members are in the staging dir)."""

    kind: str
    schema_version: int
    watermarks: dict[str, int]
    members: dict[str, MemberInfo] = field(default_factory=dict)


def manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def build_manifest(
    snapshot: Snapshot, created: datetime, key: ArchiveKey | None = None
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": PLAIN_FORMAT_VERSION if key is None else FORMAT_VERSION,
        "created_at": format_timestamp(created),
        "chefia_rt_version": __version__,
        "source": {"kind": snapshot.kind, "schema_version": snapshot.schema_version},
        "watermarks": dict(sorted(snapshot.watermarks.items())),
        "members": {
            TABLES_BY_NAME[info.table].member: info.as_json() for info in snapshot.members.values()
        },
    }
    if key is not None:
        manifest["encryption"] = key.description
    manifest["checksum"] = manifest_checksum(manifest)
    return manifest


def latest_schema(kind: str) -> int:
    found = migrations("sqlite" if kind == "sqlite" else "postgres")
    return max((version for version, _ in found), default=0)


@dataclass(slots=True)
class Manifest:
    """A parsed, checked manifest."""

    format_version: int
    created_at: str
    source_kind: str
    schema_version: int
    watermarks: dict[str, int]
    members: dict[str, MemberInfo]
    raw: dict[str, Any]

    @property
    def rows(self) -> int:
        return sum(m.rows for m in self.members.values())

    @property
    def encryption(self) -> dict[str, Any] | None:
        found = self.raw.get("encryption")
        return found if isinstance(found, dict) else None


def damaged(path: Path, what: str) -> BackupError:
    return BackupError(f"{path}: {what}")


def parse_manifest(path: Path, body: bytes) -> Manifest:
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise damaged(path, "manifest.json is not valid JSON (the archive is damaged)") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise damaged(path, "manifest.json is not a chefia-rt backup manifest")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise damaged(path, "manifest.json has no valid format_version")
    if version > FORMAT_VERSION:
        raise damaged(
            path,
            f"archive format {version} is newer than this chefia-rt supports "
            f"({FORMAT_VERSION}); upgrade chefia-rt to restore it",
        )
    if version < 1:
        raise damaged(path, f"archive format {version} is not a known format")
    if raw.get("checksum") != manifest_checksum(raw):
        raise damaged(path, "checksum mismatch in manifest.json (the archive is damaged)")
    try:
        source = raw["source"]
        kind, schema = source["kind"], source["schema_version"]
        created = raw["created_at"]
        watermarks = raw["watermarks"]
        members_raw = raw["members"]
        assert kind in ("sqlite", "postgresql") and isinstance(schema, int)
        assert isinstance(created, str) and isinstance(watermarks, dict)
        assert all(isinstance(s, str) and type(n) is int for s, n in watermarks.items())
        assert isinstance(members_raw, dict)
        members = {
            name: MemberInfo(
                table=str(m["table"]),
                columns=[str(c) for c in m["columns"]],
                rows=int(m["rows"]),
                bytes=int(m["bytes"]),
                sha256=str(m["sha256"]),
            )
            for name, m in members_raw.items()
        }
        assert isinstance(raw.get("encryption", {}), dict)
        assert (version >= 2) == ("encryption" in raw)
    except (KeyError, TypeError, ValueError, AssertionError):
        raise damaged(path, "manifest.json lacks a field or has a wrong one") from None
    latest = latest_schema(kind)
    if schema > latest:
        raise damaged(
            path,
            f"archive schema version {schema} is newer than this chefia-rt knows ({latest}); "
            "upgrade chefia-rt to restore it",
        )
    expected = {t.member for t in TABLES}
    if set(members) != expected:
        missing, extra = sorted(expected - set(members)), sorted(set(members) - expected)
        raise damaged(
            path,
            f"manifest.json lists the wrong members (missing {missing}, unknown {extra})",
        )
    for name, info in members.items():
        table = TABLES_BY_MEMBER[name]
        if info.table != table.name or not set(info.columns) <= set(table.columns):
            raise damaged(path, f"manifest.json: member {name} has unknown columns")
    return Manifest(version, created, kind, schema, watermarks, members, raw)


def not_empty(tables: list[str]) -> BackupError:
    return BackupError(
        f"the target database is not empty ({', '.join(tables)} hold rows): restore into an "
        "empty database, or pass --force to replace its data"
    )


def watermarks_text(watermarks: dict[str, int], shown: int = 5) -> str:
    """`s1=42, s2=7`, shortened for a chain of many stores (one log line per run)."""
    items = [f"{s}={n}" for s, n in list(watermarks.items())[:shown]]
    if len(watermarks) > shown:
        items.append(f"… ({len(watermarks)} stores)")
    return ", ".join(items) or "none"

"""Backup and restore (SPEC §10): one consistent, portable archive of the store data.

The archive is an uncompressed tar (`chefia-rt-backup-YYYYMMDDTHHMMSSZ.tar`, mode 0600) of:

- `manifest.json`, always the first member: format_version, created_at, the source (kind and
  schema version), the watermark (last seq) of every store, and for every other member its
  table, columns, row count, size and sha256; plus `checksum`, the sha256 of the manifest's own
  canonical JSON without that field;
- one member per table, `<table>.jsonl.gz`: gzip-compressed JSON lines, one object per row with
  the table's columns in order. Values are portable: JSON columns as JSON, flags as booleans,
  timestamps as canonical UTC ISO text (`2024-01-15T10:30:00.000000Z`), whatever the source
  database stores them as, so an archive restores into SQLite or PostgreSQL alike.

Compression is per member, not over the whole tar, so that a damaged byte is pinned to the
member it hit by that member's checksum (a `.tar.gz` would only say "CRC error somewhere").

Consistency: PostgreSQL is read in one REPEATABLE READ READ ONLY transaction (COPY TO STDOUT of
every table from one snapshot); SQLite is first copied with the online backup API, which reads
one snapshot, and the copy is read. Writers are never blocked. Every operation with a seq up to
a store's watermark is in the archive's log, and no later one.

With ENCRYPTION_KEY set, every table member is stored encrypted (AES-256-GCM, the key derived
with scrypt) and the manifest, in format 2, says how under `encryption`; verify and restore need
the key (chefia_rt/archive_crypto.py). An archive without `encryption` needs no key.

Restore verifies the whole archive first, so a damaged one is refused before the target database
is even opened; then it loads everything in one transaction into an empty database (or one
emptied in that same transaction with --force).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import sys
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TextIO

from chefia_rt import __version__
from chefia_rt.archive_crypto import (
    ALGORITHM,
    ArchiveKey,
    DecryptingReader,
    EncryptingWriter,
    WrongKey,
)
from chefia_rt.config import Settings
from chefia_rt.errors import StorageUnavailable
from chefia_rt.protocol.messages import format_timestamp
from chefia_rt.store.rows import migrations

# The newest format this version reads; a plain archive is still written as 1 (older releases
# read it), an encrypted one as 2.
FORMAT_VERSION = 2
PLAIN_FORMAT_VERSION = 1
FORMAT_NAME = "chefia-rt-backup"
MANIFEST = "manifest.json"
ARCHIVE_PREFIX = "chefia-rt-backup-"
ARCHIVE_RE = re.compile(r"^chefia-rt-backup-(\d{8}T\d{6}Z)(?:-\d+)?\.tar$")
_NAME_TIME = "%Y%m%dT%H%M%SZ"
# Leftovers of a backup that died (kill -9, full disk): removed by a later run once this old.
_TEMP_PREFIX = ".chefia-rt-backup-"
_TEMP_MAX_AGE = timedelta(days=1)
_BLOCK = 1 << 16
_TAR_END = 2 * tarfile.BLOCKSIZE  # a tar ends with two zero blocks


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

    @property
    def member(self) -> str:
        return f"{self.name}.jsonl.gz"


def _table(name: str, columns: str, order: str, **kinds: str) -> Table:
    """A Table from space-separated column names; `kinds` maps json/bools/times to columns."""
    return Table(
        name,
        tuple(columns.split()),
        tuple(order.split()),
        json_columns=frozenset(kinds.get("json", "").split()),
        bool_columns=frozenset(kinds.get("bools", "").split()),
        time_columns=frozenset(kinds.get("times", "").split()),
    )


# The tables of the migrations, in restore order (there are no foreign keys). Operation and
# conflict ids are unique per store (their keys are (store_id, id)). store_seqs travels without
# its epoch: a restore always starts a new one (see _NEW_EPOCHS).
TABLES = (
    _table("store_seqs", "store_id last_seq", "store_id"),
    _table(
        "entities",
        "store_id entity_type entity_id version data deleted timestamp field_versions "
        "updated_at updated_by",
        "store_id entity_type entity_id",
        json="data field_versions",
        bools="deleted",
        times="updated_at",
    ),
    _table(
        "sync_operations",
        "id store_id seq entity_type entity_id operation data version deleted status "
        "conflict_resolved terminal_id user_id priority timestamp server_time",
        "store_id id",
        json="data",
        bools="deleted conflict_resolved",
    ),
    _table(
        "audit_logs_master",
        "id operation_id store_id entity_type entity_id operation terminal_id user_id changes "
        "sync_status conflict_resolved timestamp",
        "id",
        json="changes",
        bools="conflict_resolved",
        times="timestamp",
    ),
    _table(
        "conflicts",
        "id store_id operation_id operation server_version server_data created_at",
        "store_id id",
        json="operation server_data",
    ),
    _table(
        "websocket_connections",
        "session_id terminal_id terminal_type store_id user_id connected_at disconnected_at "
        "bytes_in bytes_out messages_in messages_out close_code",
        "session_id",
    ),
)

TABLES_BY_NAME = {t.name: t for t in TABLES}
# A restored store's seqs restart below what its terminals may hold: every store gets a new
# epoch, so that a watermark from before the restore is refused (resync_required), even once
# new writes have passed it.
_NEW_EPOCHS = {
    "sqlite": "UPDATE store_seqs SET epoch = lower(hex(randomblob(16)))",
    "postgresql": "UPDATE store_seqs SET epoch = gen_random_uuid()::text",
}
_INTEGER_KEYS = frozenset({("audit_logs_master", "id")})
TABLES_BY_MEMBER = {t.member: t for t in TABLES}


# ---- values ------------------------------------------------------------------------------------


def _dump_line(row: dict[str, Any]) -> bytes:
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


def _from_sqlite(table: Table, row: tuple[Any, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for column, value in zip(table.columns, row, strict=True):
        if value is None:
            pass
        elif column in table.json_columns:
            value = json.loads(value)
        elif column in table.bool_columns:
            value = bool(value)
        elif column in table.time_columns:
            value = canonical_time(value)
        out[column] = value
    return out


def _to_target(
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


def _pg_select(table: Table) -> str:
    """One JSON object per row, columns in order, timestamps already canonical."""
    parts = []
    for column in table.columns:
        if column in table.time_columns:
            expr = f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
        else:
            expr = column
        parts.append(f"'{column}', {expr}")
    # Code-point order for text keys, as SQLite's BINARY collation sorts them.
    order = ", ".join(
        c if (table.name, c) in _INTEGER_KEYS else f'{c} COLLATE "C"' for c in table.order
    )
    return f"SELECT json_build_object({', '.join(parts)}) FROM {table.name} ORDER BY {order}"


_COPY_ESCAPES = {
    b"b": b"\b",
    b"f": b"\f",
    b"n": b"\n",
    b"r": b"\r",
    b"t": b"\t",
    b"v": b"\v",
}
_COPY_ESCAPE_RE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.DOTALL)


def _copy_unescape(line: bytes) -> bytes:
    """Undo the escaping of COPY's text format (a JSON value holds at most backslashes)."""
    if b"\\" not in line:
        return line

    def one(match: re.Match[bytes]) -> bytes:
        octal, hexa, char = match.groups()
        if octal is not None:
            return bytes([int(octal, 8) & 0xFF])
        if hexa is not None:
            return bytes([int(hexa, 16)])
        return _COPY_ESCAPES.get(char, char)

    return _COPY_ESCAPE_RE.sub(one, line)


# ---- progress ----------------------------------------------------------------------------------


class Progress:
    """A per-table progress bar on a terminal; nothing but the final summary line otherwise
    (a timer's journal gets one line per run)."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._label = ""
        self._total: int | None = None
        self._done = 0
        self._shown = 0.0

    def start(self, label: str, total: int | None) -> None:
        self._label, self._total, self._done, self._shown = label, total, 0, 0.0
        self._draw(force=True)

    def advance(self, rows: int = 1) -> None:
        self._done += rows
        if self.tty and time.monotonic() - self._shown >= 0.1:
            self._draw()

    def finish(self) -> None:
        if self.tty:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def summary(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self.tty:
            return
        self._shown = time.monotonic()
        if self._total:
            share = min(1.0, self._done / self._total)
            bar = "#" * int(share * 24)
            text = f"{self._label:<30} [{bar:<24}] {self._done:>10,}/{self._total:,} rows"
        else:
            text = f"{self._label:<30} {self._done:>10,} rows"
        self.stream.write("\r" + text)
        self.stream.flush()


# ---- the archive, written ----------------------------------------------------------------------


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self.raw.write(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


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


class _MemberWriter:
    """JSON lines of one table into `<staging>/<table>.jsonl.gz`, hashed as they are written."""

    def __init__(
        self, staging: Path, table: Table, progress: Progress, key: ArchiveKey | None = None
    ) -> None:
        self.table = table
        self.path = staging / table.member
        self._raw = self.path.open("wb")
        self._hashing = _HashingWriter(self._raw)
        # Encrypted: gzip -> chunks -> hash; the hash is of the stored bytes either way.
        self._encrypting = (
            None
            if key is None
            else EncryptingWriter(key, member_number(table.member), table.member, self._hashing)
        )
        # mtime=0 and no file name: the same rows always compress to the same bytes.
        self._gz = gzip.GzipFile(
            filename="",
            mode="wb",
            fileobj=self._encrypting or self._hashing,
            compresslevel=6,
            mtime=0,
        )
        self._buffer = bytearray()
        self._progress = progress
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        self._buffer += _dump_line(row)
        self.rows += 1
        self._progress.advance()
        if len(self._buffer) >= _BLOCK:
            self._gz.write(self._buffer)
            self._buffer.clear()

    def close(self) -> MemberInfo:
        if self._buffer:
            self._gz.write(self._buffer)
        self._gz.close()
        if self._encrypting is not None:
            self._encrypting.close()
        self._raw.close()  # a staging file: only the finished archive is fsynced
        return MemberInfo(
            table=self.table.name,
            columns=list(self.table.columns),
            rows=self.rows,
            bytes=self._hashing.size,
            sha256=self._hashing.sha256.hexdigest(),
        )

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._gz.close()
        self._raw.close()


@dataclass(slots=True)
class _Snapshot:
    """What one consistent read of the source produced (members are in the staging dir)."""

    kind: str
    schema_version: int
    watermarks: dict[str, int]
    members: dict[str, MemberInfo] = field(default_factory=dict)


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _manifest(
    snapshot: _Snapshot, created: datetime, key: ArchiveKey | None = None
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
    manifest["checksum"] = _manifest_checksum(manifest)
    return manifest


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(temp: Path, directory: Path, created: datetime) -> Path:
    """Give the finished temp file its final name without ever replacing an archive."""
    stamp = created.strftime(_NAME_TIME)
    for attempt in range(1000):
        suffix = f"-{attempt}" if attempt else ""
        final = directory / f"{ARCHIVE_PREFIX}{stamp}{suffix}.tar"
        try:
            os.link(temp, final)  # fails if the name is taken: two backups in one second
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            if final.exists():
                continue
            os.replace(temp, final)  # a filesystem without hard links
        else:
            temp.unlink()
        _fsync_dir(directory)
        return final
    raise BackupError(f"no free archive name for {stamp} in {directory}")


def _write_archive(
    directory: Path, staging: Path, manifest: dict[str, Any], created: datetime
) -> Path:
    """The tar, written to a temp file in `directory`, fsynced, then renamed into place."""
    fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".tmp", dir=directory)
    temp = Path(temp_name)
    mtime = int(created.timestamp())

    def info(name: str, size: int) -> tarfile.TarInfo:
        entry = tarfile.TarInfo(name)
        entry.size, entry.mtime, entry.mode = size, mtime, 0o600
        return entry

    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
                body = json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n"
                tar.addfile(info(MANIFEST, len(body)), io.BytesIO(body))
                for member in manifest["members"]:
                    path = staging / member
                    with path.open("rb") as data:
                        tar.addfile(info(member, path.stat().st_size), data)
            raw.flush()
            os.fsync(raw.fileno())
        return _publish(temp, directory, created)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def prune_backups(directory: Path, retention_days: int, now: datetime | None = None) -> list[Path]:
    """Remove our archives whose name says they are older than the retention, and leftovers of
    dead runs; any other file is left alone. Returns what was removed."""
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=retention_days)
    removed = []
    for entry in sorted(directory.iterdir()):
        match = ARCHIVE_RE.match(entry.name)
        try:
            if match and entry.is_file() and not entry.is_symlink():
                taken = datetime.strptime(match[1], _NAME_TIME).replace(tzinfo=UTC)
                if taken < cutoff:
                    entry.unlink()
                    removed.append(entry)
            elif entry.name.startswith(_TEMP_PREFIX):
                age = now - datetime.fromtimestamp(entry.lstat().st_mtime, UTC)
                if age > _TEMP_MAX_AGE:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                    removed.append(entry)
        except FileNotFoundError:  # another run pruned it first
            continue
    return removed


# ---- backup: reading the source ----------------------------------------------------------------


def _latest_schema(kind: str) -> int:
    found = migrations("sqlite" if kind == "sqlite" else "postgres")
    return max((version for version, _ in found), default=0)


def member_number(member: str) -> int:
    """A member's number in the archive (its nonces start with it when encrypted)."""
    return next(i for i, table in enumerate(TABLES) if table.member == member)


def _snapshot_sqlite(
    path: str, staging: Path, progress: Progress, key: ArchiveKey | None = None
) -> _Snapshot:
    """Copy the file with the online backup API (one read snapshot; writers go on), read the
    copy. Runs in a thread."""
    if path == ":memory:" or not Path(path).is_file():
        raise BackupError(f"no SQLite database at {path}")
    copy_path = staging / "snapshot.db"
    try:
        # mode=rw: never create an empty database where the real one was expected.
        source = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=rw", uri=True, timeout=30)
        try:
            copy = sqlite3.connect(copy_path)
            try:
                source.backup(copy)  # pages=-1: everything in one step, one snapshot
            finally:
                copy.close()
        finally:
            source.close()
        db = sqlite3.connect(copy_path)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot read SQLite database {path}: {exc}") from exc
    writer: _MemberWriter | None = None
    try:
        try:
            schema = db.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
        except sqlite3.OperationalError:
            schema = None
        if schema is None:
            raise BackupError(f"{path} has no chefia-rt schema (run `chefia-rt migrate` first)")
        watermarks = {s: n for s, n in db.execute("SELECT store_id, last_seq FROM store_seqs")}
        snapshot = _Snapshot("sqlite", int(schema), watermarks)
        for table in TABLES:
            total = None
            if progress.tty:
                total = db.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0]
            progress.start(table.name, total)
            writer = _MemberWriter(staging, table, progress, key)
            order = ", ".join(table.order)
            cursor = db.execute(
                f"SELECT {', '.join(table.columns)} FROM {table.name} ORDER BY {order}"
            )
            for row in cursor:
                try:
                    writer.write(_from_sqlite(table, row))
                except ValueError as exc:  # a JSON column that does not hold JSON
                    raise BackupError(
                        f"{path}: a row of {table.name} is unreadable: {exc}"
                    ) from exc
            snapshot.members[table.name] = writer.close()
            writer = None
            progress.finish()
        return snapshot
    except sqlite3.Error as exc:
        raise BackupError(f"cannot read SQLite database {path}: {exc}") from exc
    finally:
        if writer is not None:
            writer.abort()
        db.close()
        copy_path.unlink(missing_ok=True)


class _CopySink:
    """COPY TO STDOUT arrives in chunks that split lines anywhere; rows are whole lines."""

    def __init__(self, writer: _MemberWriter) -> None:
        self.writer = writer
        self._rest = b""

    async def feed(self, chunk: bytes) -> None:
        lines = (self._rest + chunk).split(b"\n")
        self._rest = lines.pop()
        for line in lines:
            self.writer.write(json.loads(_copy_unescape(line)))

    def finish(self) -> None:
        if self._rest:
            raise BackupError("COPY output ended inside a row")


async def _snapshot_postgres(
    dsn: str, staging: Path, progress: Progress, key: ArchiveKey | None = None
) -> _Snapshot:
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise BackupError(f"cannot reach PostgreSQL: {exc}") from exc
    writer: _MemberWriter | None = None
    try:
        # One snapshot for every table: what a store's watermark says is exactly what is in.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            try:
                schema = await conn.fetchval("SELECT max(version) FROM schema_migrations")
            except asyncpg.UndefinedTableError:
                schema = None
            if schema is None:
                raise BackupError(
                    "the PostgreSQL database has no chefia-rt schema "
                    "(run `chefia-rt migrate` first)"
                )
            rows = await conn.fetch("SELECT store_id, last_seq FROM store_seqs")
            snapshot = _Snapshot("postgresql", int(schema), {r[0]: r[1] for r in rows})
            for table in TABLES:
                total = None
                if progress.tty:
                    total = await conn.fetchval(f"SELECT count(*) FROM {table.name}")
                progress.start(table.name, total)
                writer = _MemberWriter(staging, table, progress, key)
                sink = _CopySink(writer)
                await conn.copy_from_query(_pg_select(table), output=sink.feed)
                sink.finish()
                snapshot.members[table.name] = writer.close()
                writer = None
                progress.finish()
        return snapshot
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise BackupError(f"PostgreSQL backup failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if writer is not None:
            writer.abort()
        await conn.close()


@dataclass(slots=True)
class BackupResult:
    path: Path
    manifest: dict[str, Any]
    pruned: list[Path]
    seconds: float

    @property
    def rows(self) -> int:
        return sum(m["rows"] for m in self.manifest["members"].values())


def _watermarks(watermarks: dict[str, int], shown: int = 5) -> str:
    """`s1=42, s2=7`, shortened for a chain of many stores (one log line per run)."""
    items = [f"{s}={n}" for s, n in list(watermarks.items())[:shown]]
    if len(watermarks) > shown:
        items.append(f"… ({len(watermarks)} stores)")
    return ", ".join(items) or "none"


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


async def record_event(
    settings: Settings, kind: str, payload: dict[str, Any], progress: Progress
) -> None:
    """Tell the running servers' monitors (the `server_events` table every worker polls).

    Never fails the command: the backup or restore itself is what matters."""
    from chefia_rt.node import make_store

    store = make_store(settings)
    try:
        async with asyncio.timeout(15):
            await store.open()
            await store.add_server_event(kind, payload, time.time())
    except Exception as exc:
        progress.summary(f"chefia-rt: warning: the monitors were not told of this {kind}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            await store.close()


async def _drop_shared_cache(settings: Settings, progress: Progress) -> None:
    """The shared RequestCache (Redis) still holds the replaced data, possibly at versions above
    the restored ones: start a new cache epoch so that no server answers from it."""
    if settings.redis_url is None:
        return  # the in-process cache lives and dies with the server, which is stopped
    from chefia_rt.bus.redis import new_cache_epoch

    try:
        await new_cache_epoch(settings.redis_url, settings.redis_prefix)
    except StorageUnavailable as exc:
        progress.summary(
            f"chefia-rt: warning: the shared cache in Redis was not cleared ({exc}); delete the"
            f" {settings.redis_prefix}:cache* keys before starting the servers"
        )


async def create_backup(
    settings: Settings,
    *,
    output_dir: Path | None = None,
    progress: Progress | None = None,
    now: Callable[[], datetime] | None = None,
) -> BackupResult:
    """Write one consistent archive of the configured database into `output_dir` (BACKUP_DIR
    by default), then prune that directory's archives older than BACKUP_RETENTION_DAYS.
    Either way, the outcome is recorded as a server event for the monitors' feeds."""
    progress = progress or Progress()
    started = time.monotonic()
    try:
        result = await _create_backup(settings, output_dir, progress, now)
    except ArchiveWriteError as exc:
        # Only then: a database that is missing or no chefia-rt database must not be written
        # to (opening the store would create or migrate it), and one that is down cannot be.
        seconds = round(time.monotonic() - started, 3)
        failed = {"status": "failed", "error": str(exc), "seconds": seconds}
        await record_event(settings, "backup", failed, progress)
        raise
    await record_event(
        settings,
        "backup",
        {
            "status": "ok",
            "archive": result.path.name,
            "bytes": result.path.stat().st_size,
            "rows": result.rows,
            "seconds": round(result.seconds, 3),
            "pruned": len(result.pruned),
            "stores": result.manifest["watermarks"],
        },
        progress,
    )
    return result


async def _create_backup(
    settings: Settings,
    output_dir: Path | None,
    progress: Progress,
    now: Callable[[], datetime] | None,
) -> BackupResult:
    clock = now or (lambda: datetime.now(UTC))
    directory = Path(output_dir if output_dir is not None else settings.backup_dir)
    try:
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, suffix=".staging", dir=directory))
    except OSError as exc:
        raise ArchiveWriteError(f"cannot write into backup directory {directory}: {exc}") from exc
    started = time.monotonic()
    created = clock().astimezone(UTC)
    try:
        key = None
        if settings.encryption_key is not None:
            key = await asyncio.to_thread(ArchiveKey.new, settings.encryption_key)
        if settings.storage_kind == "sqlite":
            snapshot = await asyncio.to_thread(
                _snapshot_sqlite, settings.sqlite_path, staging, progress, key
            )
        else:
            snapshot = await _snapshot_postgres(settings.database_url, staging, progress, key)
        manifest = _manifest(snapshot, created, key)
        path = await asyncio.to_thread(_write_archive, directory, staging, manifest, created)
    except OSError as exc:
        raise ArchiveWriteError(f"cannot write the backup into {directory}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Only after a good archive exists: a failing backup never prunes the last good ones.
    try:
        pruned = await asyncio.to_thread(
            prune_backups, directory, settings.backup_retention_days, clock()
        )
    except OSError as exc:
        progress.summary(f"chefia-rt: warning: pruning {directory} failed: {exc}")
        pruned = []
    result = BackupResult(path, manifest, pruned, time.monotonic() - started)
    sealed = f", encrypted {ALGORITHM}" if "encryption" in manifest else ""
    progress.summary(
        f"backup {path.name}{sealed}: {len(manifest['members'])} tables, {result.rows:,} rows, "
        f"{_human_bytes(path.stat().st_size)} in {result.seconds:.1f}s from {snapshot.kind}; "
        f"watermarks {_watermarks(manifest['watermarks'])}; pruned {len(pruned)} old archive(s)"
    )
    return result


# ---- the archive, read -------------------------------------------------------------------------


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


@dataclass(slots=True)
class VerifiedArchive:
    """An archive whose every byte was checked, and what restore needs to know about it."""

    path: Path
    manifest: Manifest
    audit_months: set[tuple[int, int]] = field(default_factory=set)
    key: ArchiveKey | None = None

    def describe(self) -> str:
        m = self.manifest
        sealed = f"encrypted {m.encryption['algorithm']}, " if m.encryption else ""
        return (
            f"{self.path}: ok ({sealed}format {m.format_version}, {m.source_kind} schema "
            f"{m.schema_version}, created {m.created_at}, {len(m.members)} tables, "
            f"{m.rows:,} rows, watermarks {_watermarks(m.watermarks)})"
        )


def _damaged(path: Path, what: str) -> BackupError:
    return BackupError(f"{path}: {what}")


def _parse_manifest(path: Path, body: bytes) -> Manifest:
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise _damaged(path, "manifest.json is not valid JSON (the archive is damaged)") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise _damaged(path, "manifest.json is not a chefia-rt backup manifest")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _damaged(path, "manifest.json has no valid format_version")
    if version > FORMAT_VERSION:
        raise _damaged(
            path,
            f"archive format {version} is newer than this chefia-rt supports "
            f"({FORMAT_VERSION}); upgrade chefia-rt to restore it",
        )
    if version < 1:
        raise _damaged(path, f"archive format {version} is not a known format")
    if raw.get("checksum") != _manifest_checksum(raw):
        raise _damaged(path, "checksum mismatch in manifest.json (the archive is damaged)")
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
        raise _damaged(path, "manifest.json lacks a field or has a wrong one") from None
    latest = _latest_schema(kind)
    if schema > latest:
        raise _damaged(
            path,
            f"archive schema version {schema} is newer than this chefia-rt knows ({latest}); "
            "upgrade chefia-rt to restore it",
        )
    expected = {t.member for t in TABLES}
    if set(members) != expected:
        missing, extra = sorted(expected - set(members)), sorted(set(members) - expected)
        raise _damaged(
            path,
            f"manifest.json lists the wrong members (missing {missing}, unknown {extra})",
        )
    for name, info in members.items():
        table = TABLES_BY_MEMBER[name]
        if info.table != table.name or not set(info.columns) <= set(table.columns):
            raise _damaged(path, f"manifest.json: member {name} has unknown columns")
    return Manifest(version, created, kind, schema, watermarks, members, raw)


class _HashingReader:
    """Reads a member's stored bytes, hashing them on the way."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        return data

    def seek(self, offset: int) -> int:
        raise io.UnsupportedOperation("a member is read once, forward")

    def drain(self) -> str:
        while self.read(_BLOCK):
            pass
        return self.sha256.hexdigest()


class _RowChecker:
    """Row-level checks of verify: the shape of every row, the log within the watermarks."""

    def __init__(self, path: Path, manifest: Manifest, name: str) -> None:
        self.path = path
        self.manifest = manifest
        self.name = name
        self.info = manifest.members[name]
        self.table = TABLES_BY_MEMBER[name].name
        self.seen_seqs: dict[str, int] = {}
        self.audit_months: set[tuple[int, int]] = set()

    def check(self, row: dict[str, Any]) -> None:
        if self.table == "store_seqs":
            self.seen_seqs[row["store_id"]] = row["last_seq"]
        elif self.table == "sync_operations" and row.get("seq") is not None:
            watermark = self.manifest.watermarks.get(row["store_id"])
            if watermark is None or not 0 < row["seq"] <= watermark:
                raise _damaged(
                    self.path,
                    f"{self.name}: operation {row['id']} has seq {row['seq']} beyond its "
                    f"store's watermark {watermark} (inconsistent archive)",
                )
        elif self.table == "audit_logs_master":
            stamp = row.get("timestamp")
            if isinstance(stamp, str) and len(stamp) >= 7 and stamp[4] == "-":
                with contextlib.suppress(ValueError):
                    self.audit_months.add((int(stamp[:4]), int(stamp[5:7])))

    def done(self, rows: int) -> None:
        if rows != self.info.rows:
            raise _damaged(
                self.path,
                f"{self.name} holds {rows} rows, the manifest says {self.info.rows} "
                "(the archive is damaged)",
            )
        if self.table == "store_seqs" and self.seen_seqs != self.manifest.watermarks:
            raise _damaged(
                self.path, "store_seqs does not match the manifest's watermarks (inconsistent)"
            )


class _MemberRows:
    """The rows of one member, read once, forward.

    The member's bytes are checked against the manifest after its last row, and whenever
    reading or loading its rows fails: damage is reported as what it is, naming the member, not
    as whatever it made go wrong first (a decompression error, a row without its columns, a
    value the database refuses).
    """

    def __init__(
        self,
        path: Path,
        tar: tarfile.TarFile,
        entry: tarfile.TarInfo,
        info: MemberInfo,
        key: ArchiveKey | None = None,
    ) -> None:
        self.path, self.name, self.info, self._key = path, entry.name, info, key
        if entry.size != info.bytes:
            raise _damaged(
                path, f"{self.name} is {entry.size} bytes, the manifest says {info.bytes} (damaged)"
            )
        extracted = tar.extractfile(entry)
        if extracted is None:
            raise _damaged(path, f"{self.name} is not a regular file")
        self._reader = _HashingReader(extracted)
        self._columns = set(info.columns)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            stored: Any = self._reader
            if self._key is not None:
                number = member_number(self.name)
                stored = DecryptingReader(self._key, number, self.name, self._reader)
            with gzip.GzipFile(filename="", mode="rb", fileobj=stored) as lines:
                for number, line in enumerate(lines, 1):
                    row = json.loads(line)
                    if not isinstance(row, dict) or row.keys() != self._columns:
                        raise ValueError(f"row {number} does not have the member's columns")
                    yield row
        except BackupError:
            raise
        except Exception as exc:
            raise (
                self.damage() or _damaged(self.path, f"{self.name} cannot be read: {exc}")
            ) from exc
        damage = self.damage()
        if damage is not None:
            raise damage

    def damage(self) -> BackupError | None:
        """The checksum error, if the member's bytes are not those the manifest describes."""
        if self._reader.drain() != self.info.sha256:
            return _damaged(
                self.path,
                f"checksum mismatch in {self.name}: the archive is damaged (sha256 differs)",
            )
        return None

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Around checking or loading the rows: an error that damaged bytes caused (a row the
        checks or the database refuse) is reported as the damage."""
        try:
            yield
        except Exception as exc:
            damage = self.damage()
            if damage is not None and str(damage) != str(exc):
                raise damage from exc
            if isinstance(exc, (ValueError, TypeError, KeyError)):  # a value of the wrong kind
                raise _damaged(self.path, f"{self.name}: a row cannot be restored: {exc}") from exc
            raise


class _ArchiveReader:
    """Walks an archive's tar structure with the checks that find truncation and damage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.size = path.stat().st_size
            self._raw = path.open("rb")
        except FileNotFoundError:
            raise BackupError(f"{path}: no such file") from None
        except OSError as exc:
            raise BackupError(f"{path}: cannot read: {exc}") from exc
        try:
            # Open for the reader's lifetime; close() closes it.
            self.tar = tarfile.open(fileobj=self._raw, mode="r:")  # noqa: SIM115
        except tarfile.ReadError as exc:
            self._raw.close()
            raise self._unreadable(exc) from None

    def _unreadable(self, exc: Exception) -> BackupError:
        if self.size == 0:
            return _damaged(self.path, "the archive is empty")
        text = str(exc)
        if self.size < tarfile.BLOCKSIZE or "unexpected end" in text or "truncated" in text:
            return _damaged(self.path, "the archive is truncated")
        return _damaged(self.path, f"not a readable chefia-rt archive (tar: {exc})")

    def close(self) -> None:
        self.tar.close()
        self._raw.close()

    def __enter__(self) -> _ArchiveReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def entries(self) -> Iterator[tarfile.TarInfo]:
        """Every member, each checked to lie whole within the file; then the end of the tar."""
        while True:
            try:
                entry = self.tar.next()
            except tarfile.ReadError as exc:
                raise self._unreadable(exc) from None
            if entry is None:
                break
            if entry.offset_data + entry.size > self.size:
                raise _damaged(self.path, f"the archive is truncated (inside {entry.name})")
            yield entry
        # tarfile stops quietly at a damaged or missing header; a whole tar ends in zero blocks.
        end = self.tar.offset
        self._raw.seek(end)
        header = self._raw.read(tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE:  # nothing, or part of a header
            raise _damaged(self.path, "the archive is truncated (its end is missing)")
        zeros = 0
        block = header
        while block:
            if block.strip(b"\0"):
                raise _damaged(
                    self.path, f"the archive is damaged (unreadable tar header at byte {end})"
                )
            zeros += len(block)
            block = self._raw.read(_BLOCK)
        if zeros < _TAR_END:
            raise _damaged(self.path, "the archive is truncated (its end is missing)")

    def manifest(self, first: tarfile.TarInfo | None) -> Manifest:
        if first is None or first.name != MANIFEST or not first.isfile():
            raise _damaged(self.path, "manifest.json is missing (not a chefia-rt archive?)")
        if first.size > 16 << 20:
            raise _damaged(self.path, "manifest.json is implausibly large")
        extracted = self.tar.extractfile(first)
        assert extracted is not None
        try:
            body = extracted.read()
        except tarfile.ReadError:
            raise _damaged(self.path, "the archive is truncated (inside manifest.json)") from None
        return _parse_manifest(self.path, body)


def _archive_key(path: Path, manifest: Manifest, passphrase: str | None) -> ArchiveKey | None:
    """The key of an encrypted archive from ENCRYPTION_KEY (None for a plain one)."""
    if manifest.encryption is None:
        return None
    algorithm = manifest.encryption.get("algorithm")
    if passphrase is None:
        raise BackupError(
            f"{path}: the archive is encrypted ({algorithm}): set ENCRYPTION_KEY to the key it "
            "was made with"
        )
    try:
        return ArchiveKey.from_manifest(manifest.encryption, passphrase)
    except WrongKey:
        raise BackupError(
            f"{path}: ENCRYPTION_KEY is not the key this archive was encrypted with "
            "(nothing was read or restored)"
        ) from None
    except ValueError as exc:
        raise _damaged(path, f"manifest.json: {exc}") from None


def verify_archive(
    path: Path, progress: Progress | None = None, encryption_key: str | None = None
) -> VerifiedArchive:
    """Check an archive without restoring it: the manifest, its format version, every member
    present once with its sha256 and row count, nothing extra, the tar whole; an encrypted one
    with `encryption_key` (ENCRYPTION_KEY), every chunk authenticated. Raises BackupError with a
    one-line reason."""
    progress = progress or Progress(tty=False)
    with _ArchiveReader(path) as archive:
        entries = archive.entries()
        manifest = archive.manifest(next(entries, None))
        key = _archive_key(path, manifest, encryption_key)
        verified = VerifiedArchive(path, manifest, key=key)
        seen: set[str] = set()
        for entry in entries:
            name = entry.name
            if name not in manifest.members or not entry.isfile():
                raise _damaged(path, f"unexpected member {name} (not in the manifest)")
            if name in seen:
                raise _damaged(path, f"member {name} appears twice")
            seen.add(name)
            info = manifest.members[name]
            checker = _RowChecker(path, manifest, name)
            progress.start(f"verify {info.table}", info.rows)
            count = 0
            rows = _MemberRows(path, archive.tar, entry, info, key)
            with rows.loading():
                for row in rows:
                    checker.check(row)
                    count += 1
                    progress.advance()
            checker.done(count)
            progress.finish()
            verified.audit_months |= checker.audit_months
        missing = sorted(set(manifest.members) - seen)
        if missing:
            raise _damaged(path, f"member {missing[0]} is missing from the archive")
    return verified


# ---- restore -----------------------------------------------------------------------------------


@dataclass(slots=True)
class RestoreResult:
    verified: VerifiedArchive
    target: str
    rows: dict[str, int]
    forced: bool

    def describe(self) -> str:
        counts = ", ".join(f"{t} {n:,}" for t, n in self.rows.items())
        m = self.verified.manifest
        cleared = " (after clearing it, --force)" if self.forced else ""
        return (
            f"restored {self.verified.path.name} ({m.source_kind}, {m.created_at}) into "
            f"{self.target}{cleared}: {counts}; watermarks {_watermarks(m.watermarks)}"
        )


def _not_empty(tables: list[str]) -> BackupError:
    return BackupError(
        f"the target database is not empty ({', '.join(tables)} hold rows): restore into an "
        "empty database, or pass --force to replace its data"
    )


def _table_rows(
    archive: _ArchiveReader, verified: VerifiedArchive
) -> Iterator[tuple[Table, MemberInfo, _MemberRows]]:
    """Each table's rows, read again from the archive (and checked again on the way: a file
    changed since it was verified fails the restore, which then rolls back)."""
    entries = archive.entries()
    next(entries)  # manifest.json
    for entry in entries:
        info = verified.manifest.members[entry.name]
        yield (
            TABLES_BY_MEMBER[entry.name],
            info,
            _MemberRows(verified.path, archive.tar, entry, info, verified.key),
        )


def _restore_sqlite(
    db_path: str, verified: VerifiedArchive, force: bool, progress: Progress
) -> dict[str, int]:
    db = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    try:
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        try:
            full = [
                t.name
                for t in TABLES
                if db.execute(f"SELECT EXISTS (SELECT 1 FROM {t.name})").fetchone()[0]
            ]
            if full and not force:
                raise _not_empty(full)
            for t in TABLES:
                db.execute(f"DELETE FROM {t.name}")
            db.execute("DELETE FROM sqlite_sequence WHERE name = 'audit_logs_master'")
            counts: dict[str, int] = {}
            with _ArchiveReader(verified.path) as archive:
                for table, info, rows in _table_rows(archive, verified):
                    progress.start(f"restore {table.name}", info.rows)
                    columns = info.columns
                    sql = (
                        f"INSERT INTO {table.name} ({', '.join(columns)}) "
                        f"VALUES ({', '.join('?' * len(columns))})"
                    )
                    batch: list[tuple[Any, ...]] = []
                    counts[table.name] = 0
                    with rows.loading():
                        for row in rows:
                            batch.append(_to_target(table, columns, row, postgres=False))
                            if len(batch) >= 1000:
                                db.executemany(sql, batch)
                                progress.advance(len(batch))
                                counts[table.name] += len(batch)
                                batch.clear()
                        db.executemany(sql, batch)
                    progress.advance(len(batch))
                    counts[table.name] += len(batch)
                    progress.finish()
            db.execute(_NEW_EPOCHS["sqlite"])
            seqs = dict(db.execute("SELECT store_id, last_seq FROM store_seqs").fetchall())
            if seqs != verified.manifest.watermarks:
                raise BackupError("restored store_seqs do not match the archive's watermarks")
            db.execute("COMMIT")
            return counts
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise BackupError(f"restore into {db_path} failed (nothing changed): {exc}") from exc
    finally:
        db.close()


async def _restore_postgres(
    settings: Settings,
    verified: VerifiedArchive,
    force: bool,
    progress: Progress,
    prepare: Callable[[], Awaitable[None]],
) -> dict[str, int]:
    import asyncpg

    try:
        conn = await asyncpg.connect(settings.database_url, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise BackupError(f"cannot reach PostgreSQL: {exc}") from exc
    try:
        full = [
            t.name for t in TABLES if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {t.name})")
        ]
        if full and not force:
            raise _not_empty(full)
        if not full:
            # Outside the restore's transaction (it uses the store's own connections); on a
            # database with rows this could move nothing, as the default partition holds them.
            await prepare()
        counts: dict[str, int] = {}
        names = ", ".join(t.name for t in TABLES)
        async with conn.transaction():
            if force:
                await conn.execute(f"TRUNCATE {names}")
            else:
                # Still empty now that nobody else can write (a server left running).
                await conn.execute(f"LOCK TABLE {names} IN EXCLUSIVE MODE")
                full = [
                    t.name
                    for t in TABLES
                    if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {t.name})")
                ]
                if full:
                    raise _not_empty(full)
            with _ArchiveReader(verified.path) as archive:
                for table, info, rows in _table_rows(archive, verified):
                    progress.start(f"restore {table.name}", info.rows)
                    columns = info.columns
                    counts[table.name] = 0

                    def records(
                        table: Table = table, columns: list[str] = columns, rows: _MemberRows = rows
                    ) -> Iterator[tuple[Any, ...]]:
                        for row in rows:
                            counts[table.name] += 1
                            progress.advance()
                            yield _to_target(table, columns, row, postgres=True)

                    # COPY into the identity column too: audit ids stay what they were.
                    with rows.loading():
                        await conn.copy_records_to_table(
                            table.name, records=records(), columns=columns
                        )
                    progress.finish()
            await conn.execute(
                "SELECT setval(pg_get_serial_sequence('audit_logs_master', 'id'), "
                "coalesce(max(id), 0) + 1, false) FROM audit_logs_master"
            )
            await conn.execute(_NEW_EPOCHS["postgresql"])
            seqs = {
                r[0]: r[1] for r in await conn.fetch("SELECT store_id, last_seq FROM store_seqs")
            }
            if seqs != verified.manifest.watermarks:
                raise BackupError("restored store_seqs do not match the archive's watermarks")
        return counts
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise BackupError(
            f"restore into PostgreSQL failed (nothing changed): {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        await conn.close()


async def restore_archive(
    settings: Settings, path: Path, *, force: bool = False, progress: Progress | None = None
) -> RestoreResult:
    """Verify the whole archive, then load it into DATABASE_URL (migrated first) in one
    transaction. The database must be empty unless `force`, which clears it in that same
    transaction. Stop the server first: it caches what it read from the database."""
    from chefia_rt.node import make_store

    progress = progress or Progress()
    verified = await asyncio.to_thread(verify_archive, path, progress, settings.encryption_key)
    store = make_store(settings)
    try:
        await store.open()  # applies pending migrations
    except StorageUnavailable as exc:
        raise BackupError(f"cannot open the target database: {exc}") from exc
    try:
        if settings.storage_kind == "sqlite":
            await store.close()
            counts = await asyncio.to_thread(
                _restore_sqlite, settings.sqlite_path, verified, force, progress
            )
            target = f"sqlite ({settings.sqlite_path})"
        else:

            async def prepare() -> None:
                # The audit partitions the server would create (this month and the next) and
                # those of the archive's months, so that restored rows land in their month's
                # partition rather than the default one. The store's own upkeep does it; its
                # log pruning is kept away from everything with a retention of a century.
                retention = timedelta(days=36_500)
                now = datetime.now(UTC)
                months = {(now.year, now.month)}
                months |= verified.audit_months
                for year, month in sorted(months):
                    await store.maintain(retention, datetime(year, month, 15, tzinfo=UTC))

            counts = await _restore_postgres(settings, verified, force, progress, prepare)
            target = "postgresql"
    finally:
        await store.close()
    result = RestoreResult(verified, target, counts, force)
    await _drop_shared_cache(settings, progress)
    manifest = verified.manifest
    await record_event(
        settings,
        "restore",
        {
            "status": "ok",
            "archive": path.name,
            "created_at": manifest.created_at,
            "forced": force,
            "rows": sum(counts.values()),
            "stores": manifest.watermarks,
        },
        progress,
    )
    return result

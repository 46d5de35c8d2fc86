"""PostgreSQL: the snapshot a backup reads (COPY of every table from one snapshot), and the
restore (COPY into the tables, in one transaction)."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from chefia_rt.archive_crypto import ArchiveKey
from chefia_rt.backup.archive import MemberWriter
from chefia_rt.backup.format import TABLES, BackupError, Snapshot, Table, not_empty, to_target
from chefia_rt.backup.progress import Progress
from chefia_rt.backup.verify import ArchiveReader, MemberRows, VerifiedArchive, table_rows
from chefia_rt.config import Settings

# A restored store's seqs restart below what its terminals may hold: every store gets a new
# epoch, so that a watermark from before the restore is refused (resync_required), even once
# new writes have passed it.
_NEW_EPOCH = "UPDATE store_seqs SET epoch = gen_random_uuid()::text"


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
    order = ", ".join(c if c in table.integer_order else f'{c} COLLATE "C"' for c in table.order)
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


class _CopySink:
    """COPY TO STDOUT arrives in chunks that split lines anywhere; rows are whole lines."""

    def __init__(self, writer: MemberWriter) -> None:
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


async def snapshot_postgres(
    dsn: str, staging: Path, progress: Progress, key: ArchiveKey | None = None
) -> Snapshot:
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise BackupError(f"cannot reach PostgreSQL: {exc}") from exc
    writer: MemberWriter | None = None
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
            snapshot = Snapshot("postgresql", int(schema), {r[0]: r[1] for r in rows})
            for table in TABLES:
                total = None
                if progress.tty:
                    total = await conn.fetchval(f"SELECT count(*) FROM {table.name}")
                progress.start(table.name, total)
                writer = MemberWriter(staging, table, progress, key)
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


async def restore_postgres(
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
            raise not_empty(full)
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
                    raise not_empty(full)
            with ArchiveReader(verified.path) as archive:
                for table, info, rows in table_rows(archive, verified):
                    progress.start(f"restore {table.name}", info.rows)
                    columns = info.columns
                    counts[table.name] = 0

                    def records(
                        table: Table = table, columns: list[str] = columns, rows: MemberRows = rows
                    ) -> Iterator[tuple[Any, ...]]:
                        for row in rows:
                            counts[table.name] += 1
                            progress.advance()
                            yield to_target(table, columns, row, postgres=True)

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
            await conn.execute(_NEW_EPOCH)
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

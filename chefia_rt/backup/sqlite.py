"""SQLite: the snapshot a backup reads, and the restore."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from chefia_rt.archive_crypto import ArchiveKey
from chefia_rt.backup.archive import MemberWriter
from chefia_rt.backup.format import (
    TABLES,
    BackupError,
    Snapshot,
    Table,
    canonical_time,
    not_empty,
    to_target,
)
from chefia_rt.backup.progress import Progress
from chefia_rt.backup.verify import ArchiveReader, VerifiedArchive, table_rows

# A restored store's seqs restart below what its terminals may hold: every store gets a new
# epoch, so that a watermark from before the restore is refused (resync_required), even once
# new writes have passed it.
_NEW_EPOCH = "UPDATE store_seqs SET epoch = lower(hex(randomblob(16)))"


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


def snapshot_sqlite(
    path: str, staging: Path, progress: Progress, key: ArchiveKey | None = None
) -> Snapshot:
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
    writer: MemberWriter | None = None
    try:
        try:
            schema = db.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
        except sqlite3.OperationalError:
            schema = None
        if schema is None:
            raise BackupError(f"{path} has no chefia-rt schema (run `chefia-rt migrate` first)")
        watermarks = {s: n for s, n in db.execute("SELECT store_id, last_seq FROM store_seqs")}
        snapshot = Snapshot("sqlite", int(schema), watermarks)
        for table in TABLES:
            total = None
            if progress.tty:
                total = db.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0]
            progress.start(table.name, total)
            writer = MemberWriter(staging, table, progress, key)
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


def restore_sqlite(
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
                raise not_empty(full)
            for t in TABLES:
                db.execute(f"DELETE FROM {t.name}")
            db.execute("DELETE FROM sqlite_sequence WHERE name = 'audit_logs_master'")
            counts: dict[str, int] = {}
            with ArchiveReader(verified.path) as archive:
                for table, info, rows in table_rows(archive, verified):
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
                            batch.append(to_target(table, columns, row, postgres=False))
                            if len(batch) >= 1000:
                                db.executemany(sql, batch)
                                progress.advance(len(batch))
                                counts[table.name] += len(batch)
                                batch.clear()
                        db.executemany(sql, batch)
                    progress.advance(len(batch))
                    counts[table.name] += len(batch)
                    progress.finish()
            db.execute(_NEW_EPOCH)
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

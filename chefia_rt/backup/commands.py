"""The commands: create a backup, restore an archive, and tell the running servers of it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from chefia_rt.archive_crypto import ALGORITHM, ArchiveKey
from chefia_rt.backup.archive import TEMP_PREFIX, prune_backups, write_archive
from chefia_rt.backup.format import ArchiveWriteError, BackupError, build_manifest, watermarks_text
from chefia_rt.backup.postgres import restore_postgres, snapshot_postgres
from chefia_rt.backup.progress import Progress
from chefia_rt.backup.sqlite import restore_sqlite, snapshot_sqlite
from chefia_rt.backup.verify import VerifiedArchive, verify_archive
from chefia_rt.config import Settings
from chefia_rt.errors import StorageUnavailable


@dataclass(slots=True)
class BackupResult:
    path: Path
    manifest: dict[str, Any]
    pruned: list[Path]
    seconds: float

    @property
    def rows(self) -> int:
        return sum(m["rows"] for m in self.manifest["members"].values())


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
    from chefia_rt.wiring import make_store

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
        staging = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, suffix=".staging", dir=directory))
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
                snapshot_sqlite, settings.sqlite_path, staging, progress, key
            )
        else:
            snapshot = await snapshot_postgres(settings.database_url, staging, progress, key)
        manifest = build_manifest(snapshot, created, key)
        path = await asyncio.to_thread(write_archive, directory, staging, manifest, created)
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
        f"watermarks {watermarks_text(manifest['watermarks'])}; pruned {len(pruned)} old archive(s)"
    )
    return result


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
            f"{self.target}{cleared}: {counts}; watermarks {watermarks_text(m.watermarks)}"
        )


async def restore_archive(
    settings: Settings, path: Path, *, force: bool = False, progress: Progress | None = None
) -> RestoreResult:
    """Verify the whole archive, then load it into DATABASE_URL (migrated first) in one
    transaction. The database must be empty unless `force`, which clears it in that same
    transaction. Stop the server first: it caches what it read from the database."""
    from chefia_rt.wiring import make_store

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
                restore_sqlite, settings.sqlite_path, verified, force, progress
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

            counts = await restore_postgres(settings, verified, force, progress, prepare)
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

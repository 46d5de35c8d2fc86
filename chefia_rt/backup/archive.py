"""The archive file written: each table member hashed (and encrypted, with a key) as it is
written, the tar fsynced and published under a name no other archive has; old archives pruned."""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from chefia_rt.archive_crypto import ArchiveKey, EncryptingWriter
from chefia_rt.backup.format import (
    MANIFEST,
    BackupError,
    MemberInfo,
    Table,
    dump_line,
    member_number,
)
from chefia_rt.backup.progress import Progress

ARCHIVE_PREFIX = "chefia-rt-backup-"
ARCHIVE_RE = re.compile(r"^chefia-rt-backup-(\d{8}T\d{6}Z)(?:-\d+)?\.tar$")
_NAME_TIME = "%Y%m%dT%H%M%SZ"
# Leftovers of a backup that died (kill -9, full disk): removed by a later run once this old.
TEMP_PREFIX = ".chefia-rt-backup-"
_TEMP_MAX_AGE = timedelta(days=1)
BLOCK = 1 << 16


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


class MemberWriter:
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
        self._buffer += dump_line(row)
        self.rows += 1
        self._progress.advance()
        if len(self._buffer) >= BLOCK:
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


def write_archive(
    directory: Path, staging: Path, manifest: dict[str, Any], created: datetime
) -> Path:
    """The tar, written to a temp file in `directory`, fsynced, then renamed into place."""
    fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=directory)
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
            elif entry.name.startswith(TEMP_PREFIX):
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

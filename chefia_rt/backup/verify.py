"""Reading an archive back: the tar walked with the checks that find truncation and damage,
every member hashed and its rows checked (verify), and the rows handed to a restore."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from chefia_rt.archive_crypto import ArchiveKey, DecryptingReader, WrongKey
from chefia_rt.backup.archive import BLOCK
from chefia_rt.backup.format import (
    MANIFEST,
    TABLES_BY_MEMBER,
    BackupError,
    Manifest,
    MemberInfo,
    Table,
    damaged,
    member_number,
    parse_manifest,
    watermarks_text,
)
from chefia_rt.backup.progress import Progress

_TAR_END = 2 * tarfile.BLOCKSIZE  # a tar ends with two zero blocks


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
            f"{m.rows:,} rows, watermarks {watermarks_text(m.watermarks)})"
        )


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
        while self.read(BLOCK):
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
                raise damaged(
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
            raise damaged(
                self.path,
                f"{self.name} holds {rows} rows, the manifest says {self.info.rows} "
                "(the archive is damaged)",
            )
        if self.table == "store_seqs" and self.seen_seqs != self.manifest.watermarks:
            raise damaged(
                self.path, "store_seqs does not match the manifest's watermarks (inconsistent)"
            )


class MemberRows:
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
            raise damaged(
                path, f"{self.name} is {entry.size} bytes, the manifest says {info.bytes} (damaged)"
            )
        extracted = tar.extractfile(entry)
        if extracted is None:
            raise damaged(path, f"{self.name} is not a regular file")
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
                self.damage() or damaged(self.path, f"{self.name} cannot be read: {exc}")
            ) from exc
        damage = self.damage()
        if damage is not None:
            raise damage

    def damage(self) -> BackupError | None:
        """The checksum error, if the member's bytes are not those the manifest describes."""
        if self._reader.drain() != self.info.sha256:
            return damaged(
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
                raise damaged(self.path, f"{self.name}: a row cannot be restored: {exc}") from exc
            raise


class ArchiveReader:
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
            return damaged(self.path, "the archive is empty")
        text = str(exc)
        if self.size < tarfile.BLOCKSIZE or "unexpected end" in text or "truncated" in text:
            return damaged(self.path, "the archive is truncated")
        return damaged(self.path, f"not a readable chefia-rt archive (tar: {exc})")

    def close(self) -> None:
        self.tar.close()
        self._raw.close()

    def __enter__(self) -> ArchiveReader:
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
                raise damaged(self.path, f"the archive is truncated (inside {entry.name})")
            yield entry
        # tarfile stops quietly at a damaged or missing header; a whole tar ends in zero blocks.
        end = self.tar.offset
        self._raw.seek(end)
        header = self._raw.read(tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE:  # nothing, or part of a header
            raise damaged(self.path, "the archive is truncated (its end is missing)")
        zeros = 0
        block = header
        while block:
            if block.strip(b"\0"):
                raise damaged(
                    self.path, f"the archive is damaged (unreadable tar header at byte {end})"
                )
            zeros += len(block)
            block = self._raw.read(BLOCK)
        if zeros < _TAR_END:
            raise damaged(self.path, "the archive is truncated (its end is missing)")

    def manifest(self, first: tarfile.TarInfo | None) -> Manifest:
        if first is None or first.name != MANIFEST or not first.isfile():
            raise damaged(self.path, "manifest.json is missing (not a chefia-rt archive?)")
        if first.size > 16 << 20:
            raise damaged(self.path, "manifest.json is implausibly large")
        extracted = self.tar.extractfile(first)
        assert extracted is not None
        try:
            body = extracted.read()
        except tarfile.ReadError:
            raise damaged(self.path, "the archive is truncated (inside manifest.json)") from None
        return parse_manifest(self.path, body)


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
        raise damaged(path, f"manifest.json: {exc}") from None


def verify_archive(
    path: Path, progress: Progress | None = None, encryption_key: str | None = None
) -> VerifiedArchive:
    """Check an archive without restoring it: the manifest, its format version, every member
    present once with its sha256 and row count, nothing extra, the tar whole; an encrypted one
    with `encryption_key` (ENCRYPTION_KEY), every chunk authenticated. Raises BackupError with a
    one-line reason."""
    progress = progress or Progress(tty=False)
    with ArchiveReader(path) as archive:
        entries = archive.entries()
        manifest = archive.manifest(next(entries, None))
        key = _archive_key(path, manifest, encryption_key)
        verified = VerifiedArchive(path, manifest, key=key)
        seen: set[str] = set()
        for entry in entries:
            name = entry.name
            if name not in manifest.members or not entry.isfile():
                raise damaged(path, f"unexpected member {name} (not in the manifest)")
            if name in seen:
                raise damaged(path, f"member {name} appears twice")
            seen.add(name)
            info = manifest.members[name]
            checker = _RowChecker(path, manifest, name)
            progress.start(f"verify {info.table}", info.rows)
            count = 0
            rows = MemberRows(path, archive.tar, entry, info, key)
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
            raise damaged(path, f"member {missing[0]} is missing from the archive")
    return verified


def table_rows(
    archive: ArchiveReader, verified: VerifiedArchive
) -> Iterator[tuple[Table, MemberInfo, MemberRows]]:
    """Each table's rows, read again from the archive (and checked again on the way: a file
    changed since it was verified fails the restore, which then rolls back)."""
    entries = archive.entries()
    next(entries)  # manifest.json
    for entry in entries:
        info = verified.manifest.members[entry.name]
        yield (
            TABLES_BY_MEMBER[entry.name],
            info,
            MemberRows(verified.path, archive.tar, entry, info, verified.key),
        )

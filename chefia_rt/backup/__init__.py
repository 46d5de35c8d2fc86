"""Backup and restore: one consistent, portable archive of the store data.

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

The package: format.py (the tables, their values, the manifest), archive.py (the archive written:
members hashed, the tar fsynced and published; pruning), verify.py (the archive read back and
checked), sqlite.py and postgres.py (each database's snapshot and restore), progress.py (what a
run shows), commands.py (create_backup and restore_archive, as the CLI runs them).
"""

from chefia_rt.backup.archive import prune_backups
from chefia_rt.backup.commands import BackupResult, RestoreResult, create_backup, restore_archive
from chefia_rt.backup.format import ArchiveWriteError, BackupError
from chefia_rt.backup.progress import Progress
from chefia_rt.backup.verify import VerifiedArchive, verify_archive

__all__ = [
    "ArchiveWriteError",
    "BackupError",
    "BackupResult",
    "Progress",
    "RestoreResult",
    "VerifiedArchive",
    "create_backup",
    "prune_backups",
    "restore_archive",
    "verify_archive",
]

"""Backup and restore: one consistent, portable archive of the store data (see archive.py)."""

from chefia_rt.backup.archive import (
    ArchiveWriteError,
    BackupError,
    BackupResult,
    Progress,
    RestoreResult,
    VerifiedArchive,
    create_backup,
    prune_backups,
    restore_archive,
    verify_archive,
)

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

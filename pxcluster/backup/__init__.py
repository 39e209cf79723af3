"""Backups of volume snapshots to S3 or a directory: content-addressed, incremental, verified.

The format is in `format`; targets in `target`; the seam to the cluster (what a backup reads,
what a restore writes) in `volumeio`. docs/BACKUPS.md describes it for operators.
"""

from pxcluster.backup.catalog import DeleteResult, delete_backup, inspect_backup, list_backups
from pxcluster.backup.engine import BackupResult, create_backup
from pxcluster.backup.ports import BackupHooks, RestoreSink, SnapshotSource
from pxcluster.backup.restore import RestoreResult, VerifyReport, restore_backup, verify_backup
from pxcluster.backup.target import Target, parse_target

__all__ = [
    "BackupHooks",
    "BackupResult",
    "DeleteResult",
    "RestoreResult",
    "RestoreSink",
    "SnapshotSource",
    "Target",
    "VerifyReport",
    "create_backup",
    "delete_backup",
    "inspect_backup",
    "list_backups",
    "parse_target",
    "restore_backup",
    "verify_backup",
]

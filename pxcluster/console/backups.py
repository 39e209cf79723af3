"""Backups on the console: those of a volume at its backup target (the one its schedule and
`volume update --backup-target` name), listed, taken now, restored into a new volume. The node
reaches the target as its scheduled backups do (AWS_* in the node's environment for s3://).

A page is drawn on every live update: a target's listing is kept for `LIST_TTL` seconds, so a
busy page does not turn into one S3 listing per etcd change."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pxcluster.backup.catalog import inspect_backup, list_backups
from pxcluster.backup.engine import BackupResult, create_backup
from pxcluster.backup.restore import RestoreResult, restore_manifest
from pxcluster.backup.target import parse_target
from pxcluster.errors import InvalidArgument, PxcError
from pxcluster.service import transfer
from pxcluster.service.core import Service, VolumeView

LIST_TTL = 10.0


@dataclass(frozen=True)
class BackupRow:
    id: str
    snapshot: str
    created: str
    size: int
    uploaded: int


@dataclass(frozen=True)
class Listing:
    target: str
    rows: list[BackupRow]
    error: str = ""


class BackupLister:
    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[float, Listing]] = {}

    def forget(self, view: VolumeView) -> None:
        self._cache.pop((view.record.backup_target, view.record.id), None)

    async def listing(self, view: VolumeView) -> Listing | None:
        """The volume's backups at its target; None without a target. A target that cannot
        be read is an error line on the page, not a failed page."""
        url = view.record.backup_target
        if not url:
            return None
        key = (url, view.record.id)
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < LIST_TTL:
            return hit[1]
        try:
            async with parse_target(url) as target:
                found = await list_backups(target)
            rows = [
                BackupRow(m.id, m.snapshot, m.created, m.size, m.totals.bytes_uploaded)
                for m in found
                if m.volume_id == view.record.id
            ]
            listing = Listing(url, sorted(rows, key=lambda r: r.created, reverse=True))
        except (PxcError, OSError) as e:
            listing = Listing(url, [], f"cannot list {url}: {e}")
        self._cache[key] = (time.monotonic(), listing)
        return listing


def _target_of(view: VolumeView) -> str:
    url = view.record.backup_target
    if not url:
        raise InvalidArgument(
            f"volume {view.record.name} has no backup target: set one first "
            "(pxcluster volume update NAME --backup-target URL)"
        )
    return url


async def back_up_now(svc: Service, view: VolumeView) -> BackupResult:
    """A backup of a temporary snapshot, incremental to the volume's last one there."""
    async with parse_target(_target_of(view)) as target:
        async with transfer.backup_source(svc, view.record.name, None) as source:
            return await create_backup(target, source)


async def restore_into(svc: Service, view: VolumeView, backup_id: str, new: str) -> RestoreResult:
    """A backup of this volume restored into a new volume `new` (deleted again if it fails)."""
    async with parse_target(_target_of(view)) as target:
        m = await inspect_backup(target, backup_id)
        if m.volume_id != view.record.id:
            raise InvalidArgument(f"backup {backup_id} is not of volume {view.record.name}")
        async with transfer.restore_sink(svc, new, m.size, m.chunk_size, None, m.encrypted) as s:
            return await restore_manifest(target, m, s)

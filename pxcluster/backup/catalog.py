"""The backups a target holds: list, inspect, delete (with garbage collection of blocks).

Delete removes the manifest first (from then on the backup does not exist), then collects:
every `blocks/` object that no remaining manifest names is deleted. Collection is the only
thing that removes blocks, and it is careful about backups being created at the same time:

- it announces itself with `gc/<id>.json` (heartbeat) before looking for running backups;
- it does not start while any fresh `inprogress/` marker exists (of any volume: blocks are
  shared between volumes), and says so in its result;
- while deleting it looks again every few seconds and stops when a backup has started;
- a backup that finishes waits for every fresh `gc/` marker to go away, then checks that all
  of its blocks exist before it writes its manifest (pxcluster.backup.engine).

So a block is never deleted after a finishing backup has checked it and before its manifest
is visible. Blocks left by a skipped collection or a crashed backup go at the next delete.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from pxcluster.backup import format as fmt
from pxcluster.backup import markers
from pxcluster.backup.engine import UPLOAD_WINDOW, backup_ids, iter_manifests, load_manifest
from pxcluster.backup.errors import BackupError
from pxcluster.backup.target import Target


async def list_backups(target: Target, volume: str | None = None) -> list[fmt.Manifest]:
    """Every readable backup in the target, oldest first; `volume` filters by volume name or
    id. Unreadable manifests are skipped (with a warning in the log)."""
    return [
        m
        async for m in iter_manifests(target)
        if volume is None or volume in (m.volume, m.volume_id)
    ]


async def inspect_backup(target: Target, backup_id: str) -> fmt.Manifest:
    return await load_manifest(target, backup_id)


@dataclass(frozen=True)
class DeleteResult:
    id: str
    volume: str
    gc: str  # "done", "skipped" (a backup is running), "interrupted", "failed"
    gc_reason: str
    blocks_deleted: int  # block objects removed (this backup's and any orphans)
    blocks_kept: int  # this backup's blocks still used by other backups

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "volume": self.volume,
            "deleted": True,
            "gc": self.gc,
            "gc_reason": self.gc_reason,
            "blocks_deleted": self.blocks_deleted,
            "blocks_kept": self.blocks_kept,
        }


class _Interrupted(Exception):
    pass


async def _running_backups(target: Target) -> list[str]:
    return [markers.describe(k, m) for k, m in await markers.fresh_markers(target, fmt.INPROGRESS)]


async def _remove_stale_markers(target: Target) -> None:
    now = time.time()
    for prefix in (fmt.INPROGRESS, fmt.GC):
        for key, m in await markers.read_markers(target, prefix):
            if m is not None and m.age(now) > markers.STALE_AFTER:
                await target.delete(key)


async def collect_garbage(target: Target, gc_id: str | None = None) -> tuple[str, str, set[str]]:
    """Delete every block no manifest references, unless a backup is running.
    Returns (state, reason, deleted digests)."""
    gc_id = gc_id or fmt.new_id()
    now = time.time()
    marker = fmt.Marker(
        id=gc_id,
        kind="gc",
        volume="",
        volume_id="",
        started=now,
        heartbeat=now,
        owner=markers.owner(),
    )
    deleted: set[str] = set()
    async with markers.LiveMarker(target, fmt.GC, marker):
        running = await _running_backups(target)
        if running:
            return "skipped", f"{running[0]} is in progress", deleted
        try:
            await _remove_stale_markers(target)
            referenced: set[str] = set()
            for backup_id in await backup_ids(target):
                # Any manifest that cannot be read stops the collection: its blocks are
                # unknown, and deleting them would break it.
                referenced |= (await load_manifest(target, backup_id)).digests()
            candidates = []
            for key in await target.list(fmt.BLOCKS):
                digest = fmt.digest_of_key(key)
                if digest is not None and digest not in referenced:
                    candidates.append(digest)
        except BackupError as e:
            return "failed", str(e), deleted
        last_check = time.monotonic()
        batch = UPLOAD_WINDOW * 4
        sem = asyncio.Semaphore(UPLOAD_WINDOW)

        async def one(digest: str) -> None:
            async with sem:
                await target.delete(fmt.block_key(digest))
            deleted.add(digest)

        try:
            for start in range(0, len(candidates), batch):
                if time.monotonic() - last_check >= markers.HEARTBEAT_EVERY:
                    running = await _running_backups(target)
                    if running:
                        raise _Interrupted(f"{running[0]} started")
                    last_check = time.monotonic()
                await asyncio.gather(*(one(d) for d in candidates[start : start + batch]))
        except _Interrupted as e:
            return "interrupted", str(e), deleted
        except BackupError as e:
            return "failed", str(e), deleted
    return "done", "", deleted


async def delete_backup(target: Target, backup_id: str) -> DeleteResult:
    """Remove the backup (its manifest), then collect blocks nothing references any more."""
    m = await load_manifest(target, backup_id)
    await target.delete(fmt.manifest_key(backup_id))
    state, reason, deleted = await collect_garbage(target)
    mine = m.digests()
    return DeleteResult(
        id=m.id,
        volume=m.volume,
        gc=state,
        gc_reason=reason,
        blocks_deleted=len(deleted),
        blocks_kept=len(mine - deleted),
    )

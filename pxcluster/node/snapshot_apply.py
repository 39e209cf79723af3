"""Snapshot requests, carried out by the engine that serves the volume: snapshots taken
(`creating`) and dropped (`deleting`, `failed`), and a revert to a snapshot. Each outcome is
written back only if the request is still the one acted on (a compare on its record)."""

from __future__ import annotations

import contextlib
import logging
import time

from membership.etcd import Etcd
from membership.keys import Keys
from membership.records import RevertRecord, SnapshotRecord
from pxcluster.engine.errors import VolumeIOError
from pxcluster.engine.volume import VolumeEngine
from pxcluster.errors import PxcError
from pxcluster.node.rebuilds import Rebuilds
from pxcluster.service.core import VolumeView

log = logging.getLogger(__name__)


class SnapshotApplier:
    def __init__(self, etcd: Etcd, keys: Keys, rebuilds: Rebuilds) -> None:
        self.etcd = etcd
        self.keys = keys
        # Stopped before a snapshot changes: they start again, and copy the snapshots too.
        self.rebuilds = rebuilds

    async def apply(self, view: VolumeView, engine: VolumeEngine) -> None:
        vid = view.record.id
        for rec in sorted(view.snapshots.values(), key=lambda r: (r.requested, r.id)):
            key = self.keys.snapshot(vid, rec.id)
            if rec.state == "creating":
                await self.rebuilds.cancel(vid)
                try:
                    created = time.time()
                    await engine.snapshot(rec.id, rec.name, created)
                    done = SnapshotRecord.from_dict(
                        rec.to_dict() | {"state": "ready", "created": created}
                    )
                    log.info("volume %s: snapshot %s taken", engine.name, rec.name)
                except (VolumeIOError, PxcError) as e:
                    done = SnapshotRecord.from_dict(
                        rec.to_dict() | {"state": "failed", "error": str(e)}
                    )
                    log.warning("volume %s: snapshot %s failed: %s", engine.name, rec.name, e)
                await self._replace(key, rec.encode(), done.encode())
            elif rec.state in ("deleting", "failed"):
                await self.rebuilds.cancel(vid)
                try:
                    await engine.delete_snapshot(rec.id)
                except (VolumeIOError, PxcError) as e:
                    log.warning("volume %s: deleting snapshot %s: %s", engine.name, rec.name, e)
                    continue
                if rec.state == "deleting":
                    await self.etcd.commit(self.etcd.txn().value_is(key, rec.encode()).delete(key))
        known = set(view.snapshots)
        for snap in [x for x in engine.snapshots if x.id not in known]:
            with contextlib.suppress(VolumeIOError, PxcError):
                await engine.delete_snapshot(snap.id)
        await self._revert(view, engine)

    async def _revert(self, view: VolumeView, engine: VolumeEngine) -> None:
        rv = view.revert
        if rv is None or rv.state != "pending" or view.target is None:
            return
        vid = view.record.id
        key = self.keys.revert(vid)
        if view.target.reason == "user":
            failed = RevertRecord(rv.snapshot, "failed", "the volume is attached for clients")
            await self._replace(key, rv.encode(), failed.encode())
            return
        await self.rebuilds.cancel(vid)
        try:
            await engine.revert(rv.snapshot)
        except (VolumeIOError, PxcError) as e:
            failed = RevertRecord(rv.snapshot, "failed", str(e))
            await self._replace(key, rv.encode(), failed.encode())
            return
        log.info("volume %s: reverted to snapshot %s", engine.name, rv.snapshot)
        await self.etcd.commit(self.etcd.txn().value_is(key, rv.encode()).delete(key))

    async def _replace(self, key: bytes, old: bytes, new: bytes) -> None:
        """Write a request's outcome over it, unless the request changed meanwhile."""
        await self.etcd.commit(self.etcd.txn().value_is(key, old).put(key, new))

"""Snapshot and backup schedules, run by the leader.

Everything a pass needs is in etcd: scheduled snapshots are named `auto-<UTC time>`, so the
newest one says when the next is due, and `volumes/<id>/schedule` records the last backup.
A new leader therefore picks up exactly where the old one stopped. Work runs in tasks (a
snapshot waits for the serving engine, a backup reads the whole volume), one per volume and
kind at a time; a pass only starts what is due.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from membership.records import ScheduleState
from pxcluster import snapshots
from pxcluster.errors import PxcError
from pxcluster.schedule import AUTO_PREFIX, parse_schedule
from pxcluster.service import Service, VolumeView

log = logging.getLogger(__name__)


class ScheduleController:
    def __init__(self, service: Service, *, clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self.clock = clock
        self.running: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def run_pass(self) -> None:
        for view in await self.service.volumes():
            rec = view.record
            if rec.snapshot_schedule:
                self._maybe(view, "snapshot", self._snapshot_due(view), self._take_snapshot)
            if rec.backup_schedule and rec.backup_target:
                state = await self._state(view)
                sched = parse_schedule(rec.backup_schedule)
                due = sched is not None and self.clock() - state.last_backup >= sched.interval
                self._maybe(view, "backup", due, self._take_backup)

    def _maybe(
        self,
        view: VolumeView,
        kind: str,
        due: bool,
        work: Callable[[VolumeView], Coroutine[Any, Any, None]],
    ) -> None:
        key = (view.record.id, kind)
        if not due or key in self.running:
            return
        task = asyncio.get_running_loop().create_task(work(view), name=f"schedule-{kind}")
        self.running[key] = task
        task.add_done_callback(lambda _t: self.running.pop(key, None))

    def _snapshot_due(self, view: VolumeView) -> bool:
        sched = parse_schedule(view.record.snapshot_schedule)
        if sched is None:
            return False
        autos = [r.created for r in view.ready_snapshots() if r.name.startswith(AUTO_PREFIX)]
        return self.clock() - max(autos, default=0.0) >= sched.interval

    async def _take_snapshot(self, view: VolumeView) -> None:
        svc = self.service
        name = view.record.name
        snap = AUTO_PREFIX + time.strftime("%Y%m%dt%H%M%Sz", time.gmtime(self.clock())).lower()
        try:
            await snapshots.create(svc, name, snap)
            log.info("volume %s: scheduled snapshot %s taken", name, snap)
            await self._record(view, last_snapshot=self.clock(), last_error="")
            await self._prune_snapshots(name)
        except PxcError as e:
            log.warning("volume %s: scheduled snapshot failed: %s", name, e)
            await self._record(view, last_error=f"snapshot: {e}")

    async def _prune_snapshots(self, name: str) -> None:
        view = await self.service.volume(name)
        sched = parse_schedule(view.record.snapshot_schedule)
        if sched is None:
            return
        autos = [r for r in view.ready_snapshots() if r.name.startswith(AUTO_PREFIX)]
        for old in autos[: max(0, len(autos) - sched.keep)]:
            await snapshots.delete(self.service, name, old.name)
            log.info("volume %s: scheduled snapshot %s pruned", name, old.name)

    async def _take_backup(self, view: VolumeView) -> None:
        from pxcluster.backup.catalog import delete_backup, list_backups
        from pxcluster.backup.engine import create_backup
        from pxcluster.backup.target import parse_target

        svc = self.service
        rec = view.record
        sched = parse_schedule(rec.backup_schedule)
        try:
            async with parse_target(rec.backup_target) as target:
                async with svc.backup_source(rec.name, None) as source:
                    result = await create_backup(target, source)
                log.info("volume %s: scheduled backup %s done", rec.name, result.id)
                await self._record(
                    view, last_backup=self.clock(), last_backup_id=result.id, last_error=""
                )
                mine = [m for m in await list_backups(target) if m.volume_id == rec.id]
                keep = sched.keep if sched is not None else len(mine)
                for old in mine[: max(0, len(mine) - keep)]:
                    await delete_backup(target, old.id)
                    log.info("volume %s: scheduled backup %s pruned", rec.name, old.id)
        except (PxcError, OSError) as e:
            log.warning("volume %s: scheduled backup failed: %s", rec.name, e)
            await self._record(view, last_backup=self.clock(), last_error=f"backup: {e}")

    async def _state(self, view: VolumeView) -> ScheduleState:
        kv = await self.service.etcd.get(self.service.keys.schedule_state(view.record.id))
        return ScheduleState() if kv is None else ScheduleState.decode(kv.value)

    async def _record(self, view: VolumeView, **changes: object) -> None:
        state = await self._state(view)
        updated = ScheduleState.from_dict(state.to_dict() | changes)
        await self.service.etcd.put(
            self.service.keys.schedule_state(view.record.id), updated.encode()
        )

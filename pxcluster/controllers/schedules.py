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
from pxcluster.backup.catalog import delete_backup, list_backups
from pxcluster.backup.engine import create_backup
from pxcluster.backup.target import parse_target
from pxcluster.controllers.view import PassView
from pxcluster.errors import PxcError
from pxcluster.policy.schedule import AUTO_PREFIX, parse_schedule
from pxcluster.service import snapshots, transfer
from pxcluster.service.core import Service, VolumeView

log = logging.getLogger(__name__)


class ScheduleController:
    def __init__(self, service: Service, *, clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self.clock = clock
        self.running: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._finished: dict[tuple[str, str], float] = {}  # time.monotonic() at the end

    async def run_pass(self, pass_view: PassView | None = None) -> None:
        seen = pass_view if pass_view is not None else PassView(self.service)
        views = await seen.volumes()
        read_at = seen.volumes_read_at or 0.0
        for view in views:
            rec = view.record
            if rec.snapshot_schedule:
                due = self._snapshot_due(view)
                self._maybe(view, "snapshot", due, self._take_snapshot, read_at)
            if rec.backup_schedule and rec.backup_target:
                state = await self._state(view)
                sched = parse_schedule(rec.backup_schedule)
                due = sched is not None and self.clock() - state.last_backup >= sched.interval
                self._maybe(view, "backup", due, self._take_backup, read_at)

    def _maybe(
        self,
        view: VolumeView,
        kind: str,
        due: bool,
        work: Callable[[VolumeView], Coroutine[Any, Any, None]],
        read_at: float,
    ) -> None:
        key = (view.record.id, kind)
        # Work that ended after the view was read may be missing from it (a snapshot just
        # taken): due or not is decided on the next pass, not taken twice.
        if not due or key in self.running or self._finished.get(key, -1.0) >= read_at:
            return
        task = asyncio.get_running_loop().create_task(work(view), name=f"schedule-{kind}")
        self.running[key] = task

        def done(_t: asyncio.Task[None]) -> None:
            self.running.pop(key, None)
            self._finished[key] = time.monotonic()

        task.add_done_callback(done)

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

        svc = self.service
        rec = view.record
        sched = parse_schedule(rec.backup_schedule)
        try:
            async with parse_target(rec.backup_target) as target:
                async with transfer.backup_source(svc, rec.name, None) as source:
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

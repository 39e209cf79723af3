"""Runs the leader's controllers while this node holds the leader key: a pass runs each of
them once, one after another, on one `PassView` (controllers/view.py), so the pass reads
`volumes/`, `alive/` and `nodes/` once between them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from membership.election import Election
from membership.etcd import Etcd, EtcdUnavailable
from pxcluster.controllers.drain import DrainController
from pxcluster.controllers.failover import FailoverController
from pxcluster.controllers.repair import RepairController
from pxcluster.controllers.schedules import ScheduleController
from pxcluster.controllers.view import PassView
from pxcluster.service.core import Service

log = logging.getLogger(__name__)


class Controller(Protocol):
    service: Service

    async def run_pass(self, pass_view: PassView | None = None) -> None: ...


def leader_controllers(service: Service, *, replace_after: float) -> list[Controller]:
    """The leader's controllers, in the order a pass runs them (the node, bench/scale.py and
    the pass tests all run this list)."""
    return [
        FailoverController(service),
        RepairController(service, replace_after=replace_after),
        DrainController(service),
        ScheduleController(service),
    ]


async def run_pass(controllers: Sequence[Controller]) -> dict[str, float]:
    """One pass: every controller, in order, on one view of the cluster. A controller that
    fails is logged and the rest still run. Returns the seconds each took (bench/scale.py)."""
    views: dict[int, PassView] = {}  # per Service; the leader's controllers share one
    took: dict[str, float] = {}
    for c in controllers:
        view = views.setdefault(id(c.service), PassView(c.service))
        t = time.perf_counter()
        try:
            await c.run_pass(view)
        except EtcdUnavailable as e:
            log.warning("%s pass skipped: %s", type(c).__name__, e)
        except Exception:
            log.exception("%s pass failed", type(c).__name__)
        took[type(c).__name__] = time.perf_counter() - t
    return took


class ControllerRunner:
    def __init__(
        self,
        etcd: Etcd,
        prefix: bytes,
        election: Election,
        controllers: list[Controller],
        *,
        interval: float = 1.0,
    ) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.election = election
        self.controllers = controllers
        self.interval = interval
        self.wake = asyncio.Event()

    async def run(self) -> None:
        # Only the leader watches: a watch on the whole cluster prefix from every node sent
        # every change to every node a second time (bench/scale.py).
        watcher: asyncio.Task[None] | None = None
        try:
            while True:
                leader = self.election.is_leader
                if leader and watcher is None:
                    watcher = asyncio.create_task(self.etcd.wake_on_changes(self.prefix, self.wake))
                elif not leader and watcher is not None:
                    await _stop(watcher)
                    watcher = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval):
                        await self.wake.wait()
                self.wake.clear()
                if not self.election.is_leader:
                    continue
                await run_pass(self.controllers)
        finally:
            if watcher is not None:
                await _stop(watcher)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

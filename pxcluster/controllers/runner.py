"""Runs the leader's controllers while this node holds the leader key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from membership.election import Election
from membership.etcd import Etcd, EtcdUnavailable

log = logging.getLogger(__name__)


class Controller(Protocol):
    async def run_pass(self) -> None: ...


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
                for c in self.controllers:
                    try:
                        await c.run_pass()
                    except EtcdUnavailable as e:
                        log.warning("%s pass skipped: %s", type(c).__name__, e)
                    except Exception:
                        log.exception("%s pass failed", type(c).__name__)
        finally:
            if watcher is not None:
                await _stop(watcher)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

"""A clone is usable at once: its engine serves chunks not yet copied from the source
snapshot, and copies them in the background.

Hydration state survives engine restarts through its record in etcd: chunks below the
`watermark` are copied, and so is every chunk in `extra` (copied early because a client wrote
to it). A chunk a client writes to is copied first and recorded before the write goes on, so
a restarted engine can never copy the old data over an acknowledged write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pxcluster.engine.errors import VolumeIOError
from replica.api import ReplicaAPI
from replica.errors import ReplicaError

log = logging.getLogger(__name__)


class SourceUnavailable(VolumeIOError):
    pass


@dataclass
class Hydration:
    source_volume: str  # id of the source volume
    snapshot: str  # id of its snapshot
    sources: list[ReplicaAPI]  # replicas of the source volume holding the snapshot
    pending: set[int]  # chunks of the snapshot not copied yet
    # Records a chunk copied out of order, durably, before the write that needed it goes on.
    record_extra: Callable[[int], Awaitable[None]]
    record_watermark: Callable[[int], Awaitable[None]]
    bandwidth: int = 0  # bytes/s of the background copy (the node's --rebuild-bw), 0: no cap
    copied: int = 0
    _locks: dict[int, asyncio.Lock] = field(default_factory=dict)
    _started: float = field(default_factory=time.monotonic)
    _sent: int = 0

    async def pace(self, nbytes: int) -> None:
        if self.bandwidth <= 0:
            return
        self._sent += nbytes
        ahead = self._sent / self.bandwidth - (time.monotonic() - self._started)
        if ahead > 0:
            await asyncio.sleep(ahead)

    async def read(self, chunk: int, offset: int, length: int) -> bytes:
        return await self._any(
            lambda r: r.read(self.source_volume, 0, chunk, offset, length, snapshot=self.snapshot)
        )

    async def _any(self, call: Callable[[ReplicaAPI], Awaitable[bytes]]) -> bytes:
        last: Exception | None = None
        for r in self.sources:
            try:
                return await call(r)
            except (ReplicaError, OSError) as e:
                last = e
        raise SourceUnavailable(f"no replica of the clone's source could serve it: {last}")

    def lock(self, chunk: int) -> asyncio.Lock:
        lock = self._locks.get(chunk)
        if lock is None:
            lock = self._locks[chunk] = asyncio.Lock()
        return lock

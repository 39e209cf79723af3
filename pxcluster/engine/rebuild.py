"""Bring a stale replica back (invariant 6): copy only the chunks whose generation differs
from an in-sync source, while new writes also go to it, then let it rejoin the in-sync set.

Resuming is free: a chunk copied before an interruption has the source's generation, so the
next run skips it. The copy never races a write: writes to a chunk wait while it is copied,
and the copy starts only after writes already in flight on it have finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pxcluster.engine.errors import VolumeIOError
from pxcluster.engine.volume import CatchUp, VolumeEngine
from replica.api import Generation, ReplicaAPI, VolumeInfo
from replica.errors import ReplicaError

log = logging.getLogger(__name__)


class RebuildAborted(VolumeIOError):
    pass


@dataclass
class Progress:
    node: str
    total_chunks: int = 0
    done_chunks: int = 0
    copied_chunks: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    passes: int = 0
    started: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "node": self.node,
            "total_chunks": self.total_chunks,
            "done_chunks": self.done_chunks,
            "copied_chunks": self.copied_chunks,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "passes": self.passes,
            "seconds": round(time.monotonic() - self.started, 3),
        }


class Throttle:
    """At most `rate` bytes per second on average (0: unlimited)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    async def spend(self, n: int) -> None:
        if self.rate <= 0:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            await asyncio.sleep(ahead)


def differing(src: dict[int, Generation], dst: dict[int, Generation]) -> set[int]:
    return {c for c in src.keys() | dst.keys() if src.get(c) != dst.get(c)}


async def rebuild(
    engine: VolumeEngine,
    node: str,
    target: ReplicaAPI,
    *,
    mark_in_sync: Callable[[], Awaitable[bool]],
    on_open: Callable[[], Awaitable[bool]] | None = None,
    on_progress: Callable[[Progress], Awaitable[None]] | None = None,
    bandwidth: int = 0,
    parallel: int = 8,
    max_passes: int = 20,
) -> Progress:
    s = engine.spec
    epoch = engine.epoch
    progress = Progress(node, started=time.monotonic())
    info = await target.open(s.id, epoch, s.size, s.chunk_size, sync_writes=s.sync_writes)
    if on_open is not None and not await on_open():
        raise RebuildAborted(f"volume {s.name}: epoch {epoch} is no longer current")
    cu = CatchUp(target)
    engine.rebuilding[node] = cu
    copied: set[int] = set()
    try:
        if [x.id for x in await target.snapshots(s.id)] != [x.id for x in engine.snapshots]:
            info = await _copy_snapshots(engine, node, cu, progress)
        suspect = set(info.dirty)  # may hold torn or lost unflushed writes: copy regardless
        throttle = Throttle(bandwidth)
        while True:
            progress.passes += 1
            if progress.passes > max_passes:
                raise RebuildAborted(f"volume {s.name}: replica {node} never caught up")
            # Writes that skipped the target for chunks that no longer count as pending must
            # have landed on the sources before generations are compared.
            mark = max(engine.inflight, default=0)
            await engine.wait_writes(lambda m=mark: not any(i <= m for i in engine.inflight))  # type: ignore[misc]
            if not engine.in_sync:
                raise RebuildAborted(f"volume {s.name}: no in-sync source left")
            first = engine.in_sync[min(engine.in_sync)]
            src_gens = await first.generations(s.id, epoch)
            dst_gens = await target.generations(s.id, epoch)
            todo = sorted(differing(src_gens, dst_gens) | suspect)
            suspect = set()
            if progress.passes == 1:
                progress.total_chunks = len(todo)
                progress.bytes_total = len(todo) * s.chunk_size
            if not todo and cu.pending is not None:
                break
            cu.pending = set(todo)
            copied.update(todo)
            queue: asyncio.Queue[int] = asyncio.Queue()
            for c in todo:
                queue.put_nowait(c)
            await asyncio.gather(
                *(
                    _worker(engine, node, cu, queue, throttle, progress, on_progress)
                    for _ in range(max(1, parallel))
                )
            )
        progress.done_chunks = progress.total_chunks
        if on_progress is not None:
            await on_progress(progress)
        await target.flush(s.id, epoch)
        # Copied chunks entered the target's dirty log; the engine's cleaner only knows the
        # chunks it wrote itself, so clean the rest now (the store keeps any chunk dirty whose
        # last write no completed sync covers).
        untracked = sorted(copied - engine.dirty_chunks())
        if untracked:
            await target.mark_clean(s.id, epoch, untracked)
        if engine.rebuilding.get(node) is not cu:
            raise RebuildAborted(f"volume {s.name}: replica {node} failed a write")
        if not await mark_in_sync():
            raise RebuildAborted(f"volume {s.name}: epoch {epoch} is no longer current")
        # No progress report after this: mark_in_sync recorded the final state, and a late
        # "running" report would overwrite it.
        engine.in_sync[node] = target
        log.info(
            "volume %s: replica %s in sync after copying %d chunks in %d passes",
            s.name,
            node,
            progress.copied_chunks,
            progress.passes,
        )
        return progress
    finally:
        if engine.rebuilding.get(node) is cu:
            del engine.rebuilding[node]


async def _copy_snapshots(
    engine: VolumeEngine, node: str, cu: CatchUp, progress: Progress
) -> VolumeInfo:
    """The target's snapshots differ from the volume's: start it over and copy each snapshot
    layer exactly (through its head, then frozen), oldest first. New writes skip the target
    meanwhile (`cu.pending` is None); the head is compared and copied afterwards as usual."""
    s = engine.spec
    epoch = engine.epoch
    target = cu.api
    await target.delete(s.id, epoch)
    info = await target.open(s.id, epoch, s.size, s.chunk_size, sync_writes=s.sync_writes)
    snaps = list(engine.snapshots)
    for snap in snaps:
        if not engine.in_sync:
            raise RebuildAborted(f"volume {s.name}: no in-sync source left")
        source = engine.in_sync[min(engine.in_sync)]
        for chunk in sorted(await source.generations(s.id, epoch, layer=snap.id)):
            copy = await source.read_chunk(s.id, epoch, chunk, layer=snap.id)
            await target.write_chunk(s.id, epoch, chunk, copy.data, copy.gen, present=copy.present)
            progress.bytes_done += len(copy.data or b"")
            if engine.rebuilding.get(node) is not cu:
                raise RebuildAborted(f"volume {s.name}: snapshots changed during the rebuild")
        await target.snapshot_create(s.id, epoch, snap.id, snap.name, snap.created)
    if [x.id for x in engine.snapshots] != [x.id for x in snaps]:
        raise RebuildAborted(f"volume {s.name}: snapshots changed during the rebuild")
    return info


async def copy_chunk(engine: VolumeEngine, cu: CatchUp, chunk: int) -> None:
    """Copy one chunk from an in-sync replica (trying each in turn) to the catching-up one."""
    s = engine.spec
    gate = asyncio.Event()
    while chunk in engine.copying:  # another copy or clean of this chunk runs
        await engine.copying[chunk].wait()
    engine.copying[chunk] = gate
    try:
        await engine.wait_writes(lambda: chunk not in engine.chunk_writes)
        names = sorted(engine.in_sync)
        if not names:
            raise RebuildAborted(f"volume {s.name}: no in-sync source left")
        # Spread reads over every in-sync replica: a rebuild reads from several sources.
        order = names[chunk % len(names) :] + names[: chunk % len(names)]
        last: Exception | None = None
        for name in order:
            source = engine.in_sync.get(name)
            if source is None:
                continue
            try:
                copy = await source.read_chunk(s.id, engine.epoch, chunk)
                break
            except ReplicaError as e:
                last = e
        else:
            raise RebuildAborted(f"volume {s.name}: no source could serve chunk {chunk}: {last}")
        await cu.api.write_chunk(
            s.id, engine.epoch, chunk, copy.data, copy.gen, present=copy.present
        )
        if cu.pending is not None:
            cu.pending.discard(chunk)  # before the gate opens: later writes must reach it
    finally:
        del engine.copying[chunk]
        gate.set()


async def _worker(
    engine: VolumeEngine,
    node: str,
    cu: CatchUp,
    queue: asyncio.Queue[int],
    throttle: Throttle,
    progress: Progress,
    on_progress: Callable[[Progress], Awaitable[None]] | None,
) -> None:
    s = engine.spec
    while not queue.empty():
        chunk = queue.get_nowait()
        await copy_chunk(engine, cu, chunk)
        await throttle.spend(s.chunk_size)
        progress.copied_chunks += 1
        progress.bytes_done += s.chunk_size
        if progress.passes == 1:
            progress.done_chunks += 1
        if engine.rebuilding.get(node) is not cu:
            raise RebuildAborted(f"volume {s.name}: replica {node} failed a write")
        if on_progress is not None:
            await on_progress(progress)

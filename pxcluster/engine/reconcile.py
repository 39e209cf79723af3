"""Invariant 5: after an unclean stop, every dirty chunk is made identical on all in-sync
replicas before the volume serves I/O, so an unacknowledged write is everywhere or nowhere."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from pxcluster.engine.fanout import fan_out
from replica.api import ChunkCopy, Generation, ReplicaAPI, VolumeInfo

log = logging.getLogger(__name__)


def choose_source(
    chunk: int, gens: dict[str, dict[int, Generation]], infos: dict[str, VolumeInfo]
) -> str:
    """Highest generation wins; a replica whose host lost its page cache loses ties; then the
    lowest node id, so the choice is the same every time (never random)."""

    def rank(node: str) -> tuple[Generation, int, str]:
        gen = gens[node].get(chunk, (0, 0))
        return (gen, 0 if infos[node].unclean else 1, _neg(node))

    return max(gens, key=rank)


def _neg(node: str) -> str:
    # max() with a reversed string order picks the lowest node id among equals.
    return "".join(chr(0x10FFFF - ord(c)) for c in node)


async def reconcile_dirty(
    volume: str, epoch: int, replicas: dict[str, ReplicaAPI], infos: dict[str, VolumeInfo]
) -> int:
    dirty = sorted({c for info in infos.values() for c in info.dirty})
    if not dirty:
        return 0
    if len(replicas) > 1:
        gens, failed = await fan_out(replicas, lambda r: r.generations(volume, epoch))
        if failed:
            raise next(iter(failed.values()))
        for chunk in dirty:
            source = choose_source(chunk, gens, infos)
            copy = await replicas[source].read_chunk(volume, epoch, chunk)
            targets = {n: r for n, r in replicas.items() if n != source}
            _, failed = await fan_out(targets, _install(volume, epoch, chunk, copy))
            if failed:
                raise next(iter(failed.values()))
    _, failed = await fan_out(replicas, lambda r: r.flush(volume, epoch))
    if failed:
        raise next(iter(failed.values()))
    _, failed = await fan_out(replicas, lambda r: r.mark_clean(volume, epoch, dirty))
    if failed:
        raise next(iter(failed.values()))
    log.info("volume %s epoch %d: reconciled %d dirty chunks", volume, epoch, len(dirty))
    return len(dirty)


def _install(
    volume: str, epoch: int, chunk: int, copy: ChunkCopy
) -> Callable[[ReplicaAPI], Awaitable[None]]:
    return lambda r: r.write_chunk(volume, epoch, chunk, copy.data, copy.gen, present=copy.present)

"""Scrub: compare every chunk of every layer across the in-sync replicas and repair the odd
one out from a good copy.

Each replica digests its own copy (checking every block's checksum on the way), so scrub moves
digests, not data, except to repair. A copy is good when its checksums hold; among good copies
the most common digest wins (ties go to the copy on the lowest node id). A head chunk is
scrubbed with writes to it held back, as a rebuild copies it; snapshot layers never change.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pxcluster.engine.fanout import fan_out
from pxcluster.engine.volume import VolumeEngine
from replica.api import Generation, ReplicaAPI
from replica.errors import ChecksumMismatch

log = logging.getLogger(__name__)


@dataclass
class ScrubReport:
    chunks: int = 0
    skipped: list[str] = field(default_factory=list)  # replicas that failed (now stale)
    repaired: list[dict[str, object]] = field(default_factory=list)
    unrepairable: list[dict[str, object]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "chunks": self.chunks,
            "skipped": sorted(set(self.skipped)),
            "repaired": self.repaired,
            "unrepairable": self.unrepairable,
        }


async def scrub(
    engine: VolumeEngine, on_progress: Callable[[int, int], Awaitable[None]] | None = None
) -> ScrubReport:
    s = engine.spec
    epoch = engine.epoch
    report = ScrubReport()
    layers = [x.id for x in engine.snapshots] + [""]
    work: list[tuple[str, int]] = []
    for layer in layers:
        gens, failed = await fan_out(engine.in_sync, _lister(s.id, epoch, layer))
        if failed:
            # A replica that cannot answer is handled as a failed write would be: recorded
            # stale, then rebuilt; scrub goes on with the others (and can be run again).
            await engine.replicas_failed(failed)
            report.skipped += sorted(failed)
        work += [(layer, c) for c in sorted({c for g in gens.values() for c in g})]
    for i, (layer, chunk) in enumerate(work):
        if layer:
            await _scrub_chunk(engine, layer, chunk, report)
        else:
            await _gated(engine, chunk, _scrub_chunk(engine, layer, chunk, report))
        report.chunks += 1
        if on_progress is not None:
            await on_progress(i + 1, len(work))
    return report


def _lister(
    vid: str, epoch: int, layer: str
) -> Callable[[ReplicaAPI], Awaitable[dict[int, Generation]]]:
    return lambda r: r.generations(vid, epoch, layer=layer)


async def _gated(engine: VolumeEngine, chunk: int, body: Awaitable[None]) -> None:
    """Run `body` with writes to `chunk` held back and none in flight."""
    gate = asyncio.Event()
    while chunk in engine.copying:
        await engine.copying[chunk].wait()
    engine.copying[chunk] = gate
    try:
        await engine.wait_writes(lambda: chunk not in engine.chunk_writes)
        await body
    finally:
        del engine.copying[chunk]
        gate.set()


async def _scrub_chunk(engine: VolumeEngine, layer: str, chunk: int, report: ScrubReport) -> None:
    s = engine.spec
    epoch = engine.epoch
    digests, failed = await fan_out(
        engine.in_sync, lambda r: r.chunk_digest(s.id, epoch, chunk, layer=layer)
    )
    corrupt = {n for n, e in failed.items() if isinstance(e, ChecksumMismatch)}
    other = {n: e for n, e in failed.items() if n not in corrupt}
    if other:
        await engine.replicas_failed(other)
        report.skipped += sorted(other)
        corrupt -= set(other)
    where = {"layer": layer or "head", "chunk": chunk}
    if not digests:
        report.unrepairable.append({**where, "nodes": sorted(corrupt)})
        log.error("volume %s: chunk %s has no good copy", s.name, where)
        return
    counts = Counter(digests.values())
    # max() returns the first maximum: among equally common digests, the lowest node's.
    best = digests[max(sorted(digests), key=lambda n: counts[digests[n]])]
    good = sorted(n for n, d in digests.items() if d == best)
    bad = sorted(corrupt | {n for n, d in digests.items() if d != best})
    if not bad:
        return
    copy = await engine.in_sync[good[0]].read_chunk(s.id, epoch, chunk, layer=layer)
    for node in bad:
        await engine.in_sync[node].write_chunk(
            s.id, epoch, chunk, copy.data, copy.gen, present=copy.present, layer=layer
        )
        reason = "checksum" if node in corrupt else "differs"
        report.repaired.append({**where, "node": node, "from": good[0], "reason": reason})
        log.warning(
            "volume %s: scrub repaired %s chunk %d on %s from %s (%s)",
            s.name,
            layer or "head",
            chunk,
            node,
            good[0],
            reason,
        )

"""The node's side of a clone copy (`pxcluster.engine.hydrate`): it finds the source snapshot's
replicas for the engine that serves the clone, and keeps the copy's progress in the clone's
hydration record, where an engine started after this one resumes it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from membership.etcd import Etcd
from membership.keys import Keys
from membership.records import HydrationRecord
from pxcluster.engine.errors import VolumeIOError
from pxcluster.engine.hydrate import Hydration
from pxcluster.engine.volume import VolumeEngine
from pxcluster.node.peers import Peers
from pxcluster.service.core import Service, VolumeView

log = logging.getLogger(__name__)


class Hydrations:
    """Starts the clone copies of the engines on one node."""

    def __init__(
        self,
        node_id: str,
        etcd: Etcd,
        keys: Keys,
        service: Service,
        peers: Peers,
        wake: asyncio.Event,
        *,
        bandwidth: int = 0,
    ) -> None:
        self.node_id = node_id
        self.etcd = etcd
        self.keys = keys
        self.service = service
        self.peers = peers
        self.wake = wake  # set when a copy is done: the agent's next pass looks again
        self.bandwidth = bandwidth  # bytes/s of each copy, 0: unlimited

    async def start(self, view: VolumeView, engine: VolumeEngine, rec: HydrationRecord) -> None:
        """Start copying what is left of the clone; raises when no replica of the source
        snapshot can be reached."""
        src = await self.service.volume_by_id(rec.source_volume)
        alive = await self.service.alive()
        nodes = {n.id: n for n in await self.service.nodes()}
        sources = [
            self.peers.get(nodes[n])
            for n, st in sorted(src.replicas.items(), key=lambda x: x[0] != self.node_id)
            if st.state == "in_sync" and n in alive and n in nodes
        ]
        gens: dict[int, tuple[int, int]] | None = None
        for s in sources:
            try:
                gens = await s.snapshot_generations(rec.source_volume, rec.snapshot)
                break
            except Exception as e:
                log.warning("volume %s: clone source replica: %s", view.record.name, e)
        if gens is None:
            raise VolumeIOError("no replica of the source snapshot is reachable")
        extra = set(rec.extra)
        pending = {c for c in gens if c >= rec.watermark and c not in extra}
        key = self.keys.hydration(view.record.id)

        async def update(change: Callable[[HydrationRecord], HydrationRecord]) -> None:
            for _ in range(20):
                kv = await self.etcd.get(key)
                if kv is None:
                    return
                new = change(HydrationRecord.decode(kv.value))
                txn = self.etcd.txn().unchanged(key, kv.mod_revision).put(key, new.encode())
                if await self.etcd.commit(txn):
                    return
            raise VolumeIOError("clone copy progress could not be recorded")

        async def record_extra(chunk: int) -> None:
            await update(
                lambda r: HydrationRecord.from_dict(
                    r.to_dict() | {"extra": sorted({*r.extra, chunk})}
                )
            )

        async def record_watermark(mark: int) -> None:
            await update(
                lambda r: HydrationRecord.from_dict(
                    r.to_dict() | {"watermark": max(r.watermark, mark)}
                )
            )

        async def done() -> None:
            await update(
                lambda r: HydrationRecord.from_dict(
                    r.to_dict() | {"state": "done", "watermark": r.chunks_total}
                )
            )
            self.wake.set()

        engine.start_hydration(
            Hydration(
                rec.source_volume,
                rec.snapshot,
                sources,
                pending,
                record_extra,
                record_watermark,
                bandwidth=self.bandwidth,
            ),
            done,
        )

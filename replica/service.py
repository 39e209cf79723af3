"""ReplicaService: the ReplicaAPI of this node's replica, in process, over its disks' ChunkStores.

The engine on this node calls it directly; replica/server.py serves the same object to remote
engines. A volume lives on one store: the one already holding it, else (when first opened) the
store with the most free space.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from replica.api import ChunkCopy, Generation, ReplicaStats, SnapshotInfo, VolumeInfo
from replica.errors import NotOpen, OutOfRange, StaleEpoch, UnknownVolume

if TYPE_CHECKING:
    from replica.api import LocalFastPath, ReplicaAPI
    from replica.chunkstore import ChunkStore

# Asked before a volume's epoch is raised (or a volume created) by a peer: raises (e.g.
# UnjustifiedEpoch) unless the cluster handed that epoch to an engine.
EpochGuard = Callable[[str, int], Awaitable[None]]


class ReplicaService:
    def __init__(self, stores: list[ChunkStore], epoch_guard: EpochGuard | None = None) -> None:
        self._stores = list(stores)
        self._epoch_guard = epoch_guard
        self._where: dict[str, ChunkStore] = {}
        # Volumes opened since this process started. A replica that restarted (its host may
        # have lost unflushed writes) refuses I/O until an engine opens it again, so no engine
        # keeps writing to it as if nothing happened.
        self._opened: set[str] = set()
        for store in self._stores:
            for volume in store.volumes():
                self._where[volume] = store

    def volume_ids(self) -> list[str]:
        return sorted(self._where)

    def _store(self, volume: str) -> ChunkStore:
        store = self._where.get(volume)
        if store is None:
            raise UnknownVolume(f"volume {volume!r} is not on this replica")
        if volume not in self._opened:
            raise NotOpen(f"volume {volume!r} was not opened since this replica started")
        return store

    async def open(
        self, volume: str, epoch: int, size: int, chunk_size: int, *, sync_writes: bool = False
    ) -> VolumeInfo:
        store = self._where.get(volume)
        if self._epoch_guard is not None and (store is None or epoch > store.epoch_of(volume)):
            await self._epoch_guard(volume, epoch)
            store = self._where.get(volume)  # the guard waited: look again
        if store is None:
            if not self._stores:
                raise UnknownVolume("this replica has no disks")
            store = max(self._stores, key=lambda s: s.stats().free)
        if chunk_size != store.superblock.chunk_size:
            raise OutOfRange(
                f"volume {volume!r}: chunk size {chunk_size} differs from the disk's "
                f"chunk size {store.superblock.chunk_size}"
            )
        meta = await store.open_volume(volume, epoch, size, sync_writes=sync_writes)
        self._where[volume] = store
        self._opened.add(volume)
        return VolumeInfo(
            volume=volume,
            size=meta.size,
            chunk_size=meta.chunk_size,
            epoch=meta.epoch,
            dirty=sorted(meta.dirty),
            unclean=meta.unclean_dirty,
        )

    async def write(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        offset: int,
        data: bytes | memoryview,
        *,
        seq: int,
        durable: bool = False,
    ) -> None:
        await self._store(volume).write(
            volume, epoch, chunk, offset, data, seq=seq, durable=durable
        )

    # The engine on this node asks these first (they exist only in process): the common read
    # and write done without a coroutine. `write_now` returns False, with nothing changed,
    # when the write has to wait; then it calls `write`.

    def read_now(self, volume: str, epoch: int, chunk: int, offset: int, length: int) -> bytes:
        return self._store(volume).read(volume, epoch, chunk, offset, length)

    def write_now(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        offset: int,
        data: bytes | memoryview,
        *,
        seq: int,
        flushed_after: bool = False,
    ) -> bool:
        return self._store(volume).write_now(
            volume, epoch, chunk, offset, data, seq=seq, flushed_after=flushed_after
        )

    def _holder(self, volume: str) -> ChunkStore:
        """The store of a volume, opened or not: for what never changes (snapshots)."""
        store = self._where.get(volume)
        if store is None:
            raise UnknownVolume(f"volume {volume!r} is not on this replica")
        return store

    async def read(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, snapshot: str = ""
    ) -> bytes:
        if snapshot:
            return self._holder(volume).read(
                volume, epoch, chunk, offset, length, snapshot=snapshot
            )
        return self.read_now(volume, epoch, chunk, offset, length)

    async def trim(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, seq: int
    ) -> None:
        await self._store(volume).trim(volume, epoch, chunk, offset, length, seq=seq)

    async def flush(self, volume: str, epoch: int) -> None:
        store = self._store(volume)
        store.check_epoch(volume, epoch)
        await store.flush()

    def flush_soon(self, volume: str, epoch: int) -> asyncio.Future[None]:
        """`flush` without a coroutine per caller (see ChunkStore.flush_soon)."""
        store = self._store(volume)
        store.check_epoch(volume, epoch)
        return store.flush_soon()

    async def generations(
        self, volume: str, epoch: int, *, layer: str = ""
    ) -> dict[int, Generation]:
        store = self._store(volume)
        store.check_epoch(volume, epoch)
        return store.generations(volume, layer=layer)

    async def snapshot_generations(self, volume: str, snap_id: str) -> dict[int, Generation]:
        return self._holder(volume).snapshot_generations(volume, snap_id)

    async def snapshots(self, volume: str) -> list[SnapshotInfo]:
        return self._holder(volume).snapshots(volume)

    async def snapshot_create(
        self, volume: str, epoch: int, snap_id: str, name: str, created: float
    ) -> None:
        await self._store(volume).snapshot_create(volume, epoch, snap_id, name, created)

    async def snapshot_delete(self, volume: str, epoch: int, snap_id: str) -> None:
        await self._store(volume).snapshot_delete(volume, epoch, snap_id)

    async def revert(self, volume: str, epoch: int, snap_id: str) -> None:
        await self._store(volume).revert(volume, epoch, snap_id)

    async def mark_clean(self, volume: str, epoch: int, chunks: list[int]) -> None:
        await self._store(volume).mark_clean(volume, epoch, chunks)

    async def read_chunk(
        self, volume: str, epoch: int, chunk: int, *, layer: str = ""
    ) -> ChunkCopy:
        return self._store(volume).read_chunk(volume, epoch, chunk, layer=layer)

    async def write_chunk(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        data: bytes | memoryview | None,
        generation: Generation,
        *,
        present: bytes | None = None,
        layer: str = "",
    ) -> None:
        await self._store(volume).write_chunk(
            volume, epoch, chunk, data, generation, present=present, layer=layer
        )

    async def chunk_digest(self, volume: str, epoch: int, chunk: int, *, layer: str = "") -> bytes:
        return self._store(volume).chunk_digest(volume, epoch, chunk, layer=layer)

    async def delete(self, volume: str, epoch: int) -> None:
        store = self._where.get(volume)
        if store is None:
            return
        held = store.epoch_of(volume)
        if epoch < held:
            raise StaleEpoch(f"volume {volume!r}: delete at epoch {epoch} < {held}")
        if self._epoch_guard is not None and epoch > held:
            await self._epoch_guard(volume, epoch)
        await self.discard(volume)

    async def discard(self, volume: str) -> None:
        """Delete without an epoch: for this node's own clean-up of volumes the cluster has
        deleted. Never reachable from the replica port."""
        store = self._where.get(volume)
        if store is None:
            return
        await store.delete_volume(volume)
        del self._where[volume]
        self._opened.discard(volume)

    async def stats(self) -> ReplicaStats:
        capacity = used = free = 0
        for store in self._stores:
            st = store.stats()
            capacity += st.capacity
            used += st.used
            free += st.free
        return ReplicaStats(capacity=capacity, used=used, free=free, volumes=len(self._where))

    async def close(self) -> None:
        """Nothing to release per handle; the stores outlive their users (close_stores)."""

    async def close_stores(self) -> None:
        stores, self._stores = self._stores, []
        self._where.clear()
        for store in stores:
            await store.close()


if TYPE_CHECKING:
    _api: ReplicaAPI = ReplicaService([])  # mypy proves the service satisfies the interface
    _fast: LocalFastPath = ReplicaService([])  # and its fast path

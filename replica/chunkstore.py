"""Chunk store: volumes' chunks in fixed-size slots on one disk, with a write-ahead journal.

The API (a test double may implement the same classes and methods):

    ChunkStore.format(f, *, cluster_id, node_id, disk_id, chunk_size=4 MiB) -> None
    ChunkStore.read_superblock(f) -> Superblock
    ChunkStore.open(f, *, cluster_id=None, boot_id="") -> ChunkStore
    store.superblock -> Superblock;  store.unclean -> bool
    store.volumes() -> dict[str, VolumeMeta]
    await store.open_volume(volume, epoch, size, *, sync_writes=False) -> VolumeMeta
    store.check_epoch(volume, epoch)
    await store.write(volume, epoch, chunk, offset, data, *, seq, durable=False)
    store.read(volume, epoch, chunk, offset, length, *, snapshot="") -> bytes
    await store.trim(volume, epoch, chunk, offset, length, *, seq)
    await store.flush()
    store.generations(volume, *, layer="") -> dict[int, (epoch, seq)]
    store.snapshot_generations(volume, snap_id) -> dict[int, (epoch, seq)]
    await store.mark_clean(volume, epoch, chunks)
    store.read_chunk(volume, epoch, chunk, *, layer="") -> ChunkCopy
    await store.write_chunk(volume, epoch, chunk, data | None, (epoch, seq), *, present=None)
    store.snapshots(volume) -> list[SnapshotInfo]
    await store.snapshot_create(volume, epoch, snap_id, name, created)
    await store.snapshot_delete(volume, epoch, snap_id)
    await store.revert(volume, epoch, snap_id)
    await store.delete_volume(volume)
    store.stats() -> StoreStats
    await store.close()

Errors are replica.errors types: UnknownVolume, StaleEpoch (checked first; nothing changes),
OutOfRange, NoSpace, and the DiskError family from open.

Durability order (DRBD's activity log): a chunk's dirty record is durable before its data is
first touched; later writes to a dirty chunk go straight to the page cache. Generations are
buffered and journaled at the next sync: after a crash, dirty chunks are resynced anyway.
A slot is zeroed durably before it is handed to a chunk, so no chunk ever shows another
chunk's old data. All syncs go through one group-commit path (`flush`). Each 4 KiB block
has a crc32c, checked on every read; a written slot's entries stay in memory (csumpages), a
dirty head chunk's until the chunk is cleaned (a crash recomputes them), others until the next
sync.

Snapshots are layers (see chunkmeta): a snapshot freezes the head's chunks; a later write
allocates a fresh head chunk that holds only the blocks written since (copy on write per
4 KiB block, reading a partial block's rest from below), so a snapshot never costs a chunk copy.
Deleting a snapshot merges its blocks into the layer above, which keeps every view unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from replica.api import ChunkCopy, SnapshotInfo
from replica.chunkmeta import (
    ChunkState,
    Meta,
    Record,
    SnapLayer,
    VolState,
    mask_from_bytes,
    mask_to_bytes,
    rec_clean,
    rec_delete,
    rec_dirty,
    rec_drop_layer,
    rec_free,
    rec_generation,
    rec_move_up,
    rec_present,
    rec_revert,
    rec_snapshot,
    rec_volume,
)
from replica.csumpages import ChecksumPages
from replica.errors import (
    ChecksumMismatch,
    DiskError,
    NoSpace,
    OutOfRange,
    ReplicaError,
    StaleEpoch,
    UnknownSnapshot,
    UnknownVolume,
)
from replica.fileio import BlockFile
from replica.ondisk import (
    BLOCK,
    CSUM_SIZE,
    DEFAULT_CHUNK,
    META_BYTES_PER_NAME,
    META_BYTES_PER_SLOT,
    Superblock,
    block_csums,
    decode_checkpoint,
    decode_records,
    decode_superblock,
    encode_checkpoint,
    encode_record,
    encode_superblock,
    layout,
)

Generation = tuple[int, int]
_ZERO_BATCH = 16  # slots zeroed at a time, ahead of need (see _take_slot)
_PAGE_CACHE_PIECE = 64 << 10  # largest buffered data write (see _data_write)
_OFFLOAD_MIN = 64 << 10  # write_chunk data from this size lands in a worker thread
_LANDING = 1 << 62  # VolState.unsynced of a chunk whose bytes are still landing: no sync counts

__all__ = ["ChunkStore", "StoreStats", "Superblock", "VolumeMeta"]


@dataclass(frozen=True)
class VolumeMeta:
    size: int
    chunk_size: int
    epoch: int  # highest epoch opened, durable
    sync_writes: bool
    dirty: set[int]
    unclean_dirty: bool  # some dirty chunks may have lost unflushed writes in a host crash


@dataclass(frozen=True)
class StoreStats:
    capacity: int
    used: int
    free: int
    chunks: int


class ChunkStore:
    def __init__(self, f: BlockFile, sb: Superblock, meta: Meta, seq: int, unclean: bool) -> None:
        self._f = f
        self._sb = sb
        self._meta = meta
        self._seq = seq  # current checkpoint's seq, also the journal records' generation
        self._tail = 0  # journal bytes in use after that checkpoint
        self._records: list[Record] = []
        self._gen_dirty: set[tuple[str, int]] = set()
        used = meta.used_slots()
        # Free slots: zeroed durably (safe to hand out), punched awaiting a sync, unknown.
        self._zeroed: list[int] = []
        self._punched: list[int] = []
        self._unzeroed: set[int] = set(range(sb.slots)) - used
        self._refill = asyncio.Lock()
        self._csums = ChecksumPages(f, sb)
        # Serialises first writes to one chunk, so two writers cannot both allocate it.
        self._chunk_locks: dict[tuple[str, int], _SharedLock] = {}
        self._started = 0
        self._done = 0
        self._sync_task: asyncio.Task[None] | None = None
        # The sync task has taken its first step (taken the records, started fdatasync):
        # until then it covers whatever is applied meanwhile, so callers join it.
        self._sync_begun = False
        self._closed = False
        self._snap_locks: dict[str, asyncio.Lock] = {}
        # Group commit, observed: flush() callers waiting for the next sync, and a hook told
        # (callers, journal records) of each sync (the node feeds /metrics with it).
        self._callers = 0
        self.on_sync: Callable[[int, int], None] | None = None
        self._flushes: dict[int, asyncio.Future[None]] = {}  # flush_soon's, by sync number
        self._prefill: asyncio.Task[None] | None = None
        self.unclean = unclean

    # ----- disk lifecycle -----

    @staticmethod
    def format(
        f: BlockFile,
        *,
        cluster_id: str,
        node_id: str,
        disk_id: str,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        sb = layout(
            f.size(), cluster_id=cluster_id, node_id=node_id, disk_id=disk_id, chunk_size=chunk_size
        )
        # The superblock goes first and last: a format cut short leaves an unformatted disk,
        # never the old superblock over a half-new layout.
        f.punch(0, BLOCK)
        f.punch(sb.journal_offset, sb.journal_size)  # no old record may pass for a new one
        f.punch(sb.meta_offset, 2 * sb.meta_size)
        f.pwrite(encode_checkpoint(1, Meta().to_body()), sb.meta_area(1))
        f.fdatasync()
        f.pwrite(encode_superblock(sb), 0)
        f.fdatasync()

    @staticmethod
    def read_superblock(f: BlockFile) -> Superblock:
        return decode_superblock(f.pread(BLOCK, 0))

    @classmethod
    def open(cls, f: BlockFile, *, cluster_id: str | None = None, boot_id: str = "") -> ChunkStore:
        """Blocking (startup only). `boot_id`: the host's boot id; after an unclean stop in the
        same boot the page cache survived, so dirty chunks are not suspect."""
        sb = decode_superblock(f.pread(BLOCK, 0), cluster_id=cluster_id)
        if f.size() < sb.slot_offset(sb.slots):
            raise DiskError(f"disk is {f.size()} bytes, smaller than its superblock says")
        best: tuple[int, Meta] | None = None
        for area in (0, 1):
            got = decode_checkpoint(f.pread(sb.meta_size, sb.meta_offset + area * sb.meta_size))
            if got is not None and got[0] % 2 == area and (best is None or got[0] > best[0]):
                best = (got[0], Meta.from_body(got[1]))
        if best is None:
            raise DiskError("no valid metadata checkpoint on disk")
        seq, meta = best
        for _, rec in decode_records(f.pread(sb.journal_size, sb.journal_offset), seq):
            meta.apply(rec)
        unclean = not meta.clean
        lost = unclean and (not boot_id or boot_id != meta.boot_id)
        for v in meta.vols.values():
            if lost:
                v.suspect |= v.dirty
            v.ready = set(v.dirty)
        # Running from here on: a crash must read as unclean. The fresh checkpoint also
        # starts an empty journal, so records past a corrupt one can never be replayed later.
        meta.clean = False
        meta.boot_id = boot_id
        store = cls(f, sb, meta, seq, unclean)
        if unclean and not lost:
            store._restore_present()
        if unclean:
            store._recompute_dirty_csums()
        store._write_checkpoint(*store._snapshot())
        return store

    async def close(self) -> None:
        """Checkpoint and mark the shutdown clean. The BlockFile stays open (caller owns it)."""
        if self._closed:
            return
        if self._prefill is not None:
            await asyncio.gather(self._prefill, return_exceptions=True)
        await self.flush()
        self._closed = True
        while self._sync_task is not None:
            await asyncio.shield(self._sync_task)
        if self._csums.dirty:
            # A store opened clean recomputes nothing: every entry is durable before the
            # checkpoint that says clean (in one sync, a power cut could keep only the latter).
            self._csums.write_back(everything=True)
            await asyncio.to_thread(self._f.fdatasync)
        self._meta.clean = True
        await asyncio.to_thread(self._write_checkpoint, *self._snapshot())

    @property
    def superblock(self) -> Superblock:
        return self._sb

    # ----- volumes -----

    def volumes(self) -> dict[str, VolumeMeta]:
        return {name: _view(v) for name, v in self._meta.vols.items()}

    async def open_volume(
        self, volume: str, epoch: int, size: int, *, sync_writes: bool = False
    ) -> VolumeMeta:
        """Create if unknown; raise the durable epoch; grow (never shrink). `sync_writes` is set
        to the value given."""
        self._check_open()
        if size <= 0 or epoch < 0:
            raise OutOfRange(f"volume {volume!r}: bad size {size} or epoch {epoch}")
        v = self._meta.vols.get(volume)
        if v is None:
            self._check_meta_room(volume)
            v = VolState(size, self._sb.chunk_size, epoch, sync_writes)
            self._meta.vols[volume] = v
            self._records.append(rec_volume(volume, v))
        else:
            if epoch < v.epoch:
                raise StaleEpoch(f"volume {volume!r}: epoch {epoch} < {v.epoch}")
            if epoch > v.epoch or size > v.size or sync_writes != v.sync_writes:
                v.epoch = epoch
                v.size = max(v.size, size)
                v.sync_writes = sync_writes
                self._records.append(rec_volume(volume, v))
        # Even unchanged: an earlier open with this epoch may still be on its way to disk.
        await self.flush()
        return _view(v)

    def check_epoch(self, volume: str, epoch: int) -> None:
        self._volume(volume, epoch)

    def epoch_of(self, volume: str) -> int:
        """The highest epoch the volume was opened with; -1 for a volume not held here."""
        v = self._meta.vols.get(volume)
        return -1 if v is None else v.epoch

    def _check_meta_room(self, what: str) -> None:
        """Refuse a new volume or snapshot the metadata checkpoint could not hold.

        The metadata area has a fixed budget per chunk slot (every chunk entry has a slot)
        plus a base; volumes and snapshots live in the base. Refused here, before anything
        is recorded, because a checkpoint that no longer fits would leave the store unable to
        write one, and so to open, ever again."""
        names = len(self._meta.vols) + sum(len(v.snaps) for v in self._meta.vols.values())
        room = self._sb.meta_size - self._sb.slots * META_BYTES_PER_SLOT
        if (names + 1) * META_BYTES_PER_NAME > room:
            raise NoSpace(
                f"{what!r}: this disk's metadata holds at most {room // META_BYTES_PER_NAME} "
                "volumes and snapshots"
            )

    async def delete_volume(self, volume: str) -> None:
        self._check_open()
        v = self._meta.vols.pop(volume, None)
        if v is None:
            return
        self._records.append(rec_delete(volume))
        slots = [c.slot for c in v.chunks.values()]
        slots += [c.slot for layer in v.snaps for c in layer.chunks.values()]
        # These slots belong to no one now, so zeroing them off the loop cannot race a writer.
        await self._punch_off_loop(slots)
        self._punched.extend(slots)
        await self.flush()

    def generations(self, volume: str, *, layer: str = "") -> dict[int, Generation]:
        """One layer's chunks (the head by default): what a rebuild compares and copies."""
        v = self._lookup(volume)
        return {i: (c.epoch, c.seq) for i, c in self._layer(volume, v, layer).items()}

    def snapshot_generations(self, volume: str, snap_id: str) -> dict[int, Generation]:
        """The snapshot's view: each chunk any layer up to it holds, with the generation of
        the topmost (later writes always carry higher generations)."""
        v = self._lookup(volume)
        top = self._snap_index(volume, v, snap_id)
        out: dict[int, Generation] = {}
        for layer in v.snaps[: top + 1]:
            out.update((i, (c.epoch, c.seq)) for i, c in layer.chunks.items())
        return out

    def snapshots(self, volume: str) -> list[SnapshotInfo]:
        v = self._lookup(volume)
        return [SnapshotInfo(s.id, s.name, s.created) for s in v.snaps]

    def stats(self) -> StoreStats:
        chunks = sum(
            len(v.chunks) + sum(len(s.chunks) for s in v.snaps) for v in self._meta.vols.values()
        )
        capacity = self._sb.slots * self._sb.chunk_size
        used = chunks * self._sb.chunk_size
        return StoreStats(capacity=capacity, used=used, free=capacity - used, chunks=chunks)

    # ----- data path -----

    def read(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, snapshot: str = ""
    ) -> bytes:
        """The head's view, or with `snapshot` that snapshot's (immutable: no epoch check)."""
        if snapshot:
            v = self._lookup(volume)
            _check_range(v, chunk, offset, length)
            stack = v.stack(chunk, self._snap_index(volume, v, snapshot))
            return self._read_view(stack, offset, length, volume, chunk)
        v = self._volume(volume, epoch)
        _check_range(v, chunk, offset, length)
        c = v.chunks.get(chunk)
        if c is not None and c.present is None:
            return self._data_read(volume, chunk, c, offset, length)
        if c is None and not v.snaps:
            return bytes(length)
        return self._read_view(v.stack(chunk), offset, length, volume, chunk)

    def _read_view(
        self, stack: list[ChunkState], offset: int, length: int, volume: str = "", chunk: int = 0
    ) -> bytes:
        """Assemble a range block by block from the topmost entry holding each block."""
        if not stack:
            return bytes(length)
        out = bytearray(length)
        pos, end = offset, offset + length
        while pos < end:
            src = _source(stack, pos // BLOCK)
            run = min(end, (pos // BLOCK + 1) * BLOCK)
            while run < end and _source(stack, run // BLOCK) is src:
                run = min(end, run + BLOCK)
            if src is not None:
                out[pos - offset : run - offset] = self._data_read(
                    volume, chunk, src, pos, run - pos
                )
            pos = run
        return bytes(out)

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
        v = self._volume(volume, epoch)
        _check_range(v, chunk, offset, len(data))
        if len(data):
            c = v.chunks.get(chunk)
            if c is None or chunk not in v.ready:
                v, c = await self._ready_chunk(
                    volume, epoch, chunk, offset, len(data), allocate=True
                )
            assert c is not None
            # No await between the checks in _ready_chunk and here: the epoch, the slot and
            # the durable dirty mark all still hold when the data lands.
            self._apply(volume, v, chunk, c, offset, data, (epoch, seq))
        if durable or v.sync_writes:
            await self.flush()

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
        """`write` without waiting, for the common case: a non-durable write into a chunk whose
        dirty record is durable already. False, with nothing changed, when the write has to
        wait (the chunk's first write, or a volume with synchronous writes): call `write`.
        `flushed_after`: the caller calls `flush` before anyone learns the write is done, so
        a volume with synchronous writes may take it too (a batch of them, one sync)."""
        v = self._volume(volume, epoch)
        _check_range(v, chunk, offset, len(data))
        c = v.chunks.get(chunk)
        if c is None or chunk not in v.ready or (v.sync_writes and not flushed_after):
            return False
        if not len(data):
            return False
        self._apply(volume, v, chunk, c, offset, data, (epoch, seq))
        return True

    def _apply(
        self,
        volume: str,
        v: VolState,
        chunk: int,
        c: ChunkState,
        offset: int,
        data: bytes | memoryview,
        gen: Generation,
    ) -> None:
        # The chunk is dirty (durably): its checksum entries may wait for its clean mark.
        if c.present is None:
            self._data_write(c.slot, offset, data, lazy=True)
        else:
            self._write_partial(v, chunk, c, offset, data)
        self._written(volume, v, chunk, c, gen)

    async def trim(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, seq: int
    ) -> None:
        v = self._volume(volume, epoch)
        _check_range(v, chunk, offset, length)
        if not length:
            return
        if v.in_lower_layer(chunk):
            # A hole here would show the snapshot's data: zeros must be written over it.
            await self.write(volume, epoch, chunk, offset, bytes(length), seq=seq)
            return
        v, c = await self._ready_chunk(volume, epoch, chunk, offset, length, allocate=False)
        if c is None:
            return  # unallocated already reads as zeros
        if offset == 0 and length == v.chunk_len(chunk):
            self._free_chunk(volume, v, chunk, c)
        else:
            # On the loop, not a thread: the slot must still be this chunk's when it lands.
            self._data_punch(c.slot, offset, length, lazy=True)
            self._written(volume, v, chunk, c, (epoch, seq))
        if v.sync_writes:
            await self.flush()

    def read_chunk(self, volume: str, epoch: int, chunk: int, *, layer: str = "") -> ChunkCopy:
        """One layer's entry for the chunk, exactly: data, generation and block presence."""
        v = self._volume(volume, epoch)
        _check_range(v, chunk, 0, 0)
        c = self._layer(volume, v, layer).get(chunk)
        if c is None:
            return ChunkCopy(None, (0, 0))
        data = self._read_entry(volume, v, chunk, c)
        return ChunkCopy(data, (c.epoch, c.seq), mask_to_bytes(c.present))

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
        """Install a whole head chunk (shorter data: the rest reads as zeros) durably, with
        exactly `generation` and block presence `present` (None: every block). The chunk stays
        dirty until mark_clean. With `layer`, repair a snapshot's entry in place (scrub)."""
        length = 0 if data is None else len(data)
        v = self._volume(volume, epoch)
        _check_range(v, chunk, 0, length)
        if layer:
            await self._repair_layer_entry(volume, v, layer, chunk, data, generation, present)
            return
        landing: asyncio.Future[None] | None = None
        offload = data is not None and length >= _OFFLOAD_MIN and length % BLOCK == 0
        if offload and chunk not in v.chunks and not v.in_lower_layer(chunk):
            assert data is not None
            landing = await self._install_fresh(volume, epoch, chunk, data, generation, present)
            if landing is not None:
                await asyncio.shield(landing)  # (as below)
                await self.flush()
                v = self._meta.vols.get(volume) or v
                if chunk in v.dirty and chunk in v.chunks:
                    v.ready.add(chunk)
                return
        v, c = await self._ready_chunk(volume, epoch, chunk, 0, length, allocate=data is not None)
        if c is not None:
            if data is None:
                self._free_chunk(volume, v, chunk, c)
            elif offload:
                c.epoch, c.seq = generation
                c.present = _full_to_none(mask_from_bytes(present), v.chunk_len(chunk))
                landing = self._land_chunk(volume, v, chunk, c, data)
                if len(data) < self._sb.chunk_size:
                    self._data_punch(c.slot, len(data), self._sb.chunk_size - len(data))
            else:
                self._data_write(c.slot, 0, data)
                if len(data) < self._sb.chunk_size:
                    self._data_punch(c.slot, len(data), self._sb.chunk_size - len(data))
                c.epoch, c.seq = generation
                c.present = _full_to_none(mask_from_bytes(present), v.chunk_len(chunk))
                self._save_present(c)
                self._written(volume, v, chunk, c, None)
        if landing is not None:
            # The caller's buffer is in use until the bytes landed. Cancelled: they still
            # land, and the chunk stays unclean until a sync after that.
            await asyncio.shield(landing)
        await self.flush()

    async def _install_fresh(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        data: bytes | memoryview,
        generation: Generation,
        present: bytes | None,
    ) -> asyncio.Future[None] | None:
        """A whole chunk the volume has no entry for: its bytes go straight into a fresh slot,
        and its dirty record (with the slot) goes to disk in the same sync as they do, not in
        a sync before them. The order the dirty log keeps is for slots a durable record points
        to; until this record is durable the slot is free space on disk (a restart zeroes it
        before use), and once it is, the chunk is dirty: suspect after a crash, resynced,
        checksums recomputed. None: the chunk got an entry meanwhile (take the usual path)."""
        slot = await self._take_slot()
        v = self._meta.vols.get(volume)
        if v is None or epoch < v.epoch or chunk in v.chunks or v.in_lower_layer(chunk):
            self._zeroed.append(slot)  # still zeroed: never written
            self._volume(volume, epoch)  # unknown volume, stale epoch: the caller hears it
            return None
        try:
            _check_range(v, chunk, 0, len(data))  # the volume may have been made anew
        except OutOfRange:
            self._zeroed.append(slot)
            raise
        c = ChunkState(slot, present=None)
        v.chunks[chunk] = c
        self._records.append(rec_dirty(volume, chunk, slot, False))
        v.dirty.add(chunk)
        c.epoch, c.seq = generation
        c.present = _full_to_none(mask_from_bytes(present), v.chunk_len(chunk))
        landing = self._land_chunk(volume, v, chunk, c, data)
        if len(data) < self._sb.chunk_size:
            self._data_punch(slot, len(data), self._sb.chunk_size - len(data))
        return landing

    def _land_chunk(
        self, volume: str, v: VolState, chunk: int, c: ChunkState, data: bytes | memoryview
    ) -> asyncio.Future[None]:
        """Write a whole chunk's bytes off the loop, so the next chunk is received meanwhile,
        with their checksums and the entry's block presence (`c.present`, set already).
        From this call on the file holds the slot's data range: any other read, write or punch
        of it waits until they landed, so every reader sees what it would had they landed here,
        and the slot can be freed and handed out again only after. Until then no sync counts
        for the chunk (mark_clean leaves it dirty); a failed landing drops its generation.
        No small write of this chunk stays on the loop: on a sparse file a write allocating
        blocks holds the inode's lock for its whole duration, and a page-cache pwrite on the
        loop would wait for it."""
        v.unsynced[chunk] = _LANDING
        slot = c.slot
        self._csums.drop(slot)  # the landing writes every entry of the slot
        n = self._sb.present_size
        mask = bytes(n) if c.present is None else c.present.to_bytes(n, "little")

        def land() -> None:  # in the file's worker thread, the range held
            self._f.pwrite_direct(data, self._sb.slot_offset(slot))
            # Checksums after data: every access to a slot's checksums follows one to its data.
            self._f.pwrite(block_csums(data), self._sb.csum_at(slot, 0))
            self._f.pwrite(mask, self._sb.present_at(slot))  # as _save_present

        def landed(fut: asyncio.Future[None]) -> None:  # on the loop
            if fut.cancelled() or fut.exception() is not None:
                self._quarantine(volume, chunk, c)  # a rebuild copies it again
            if v.unsynced.get(chunk) == _LANDING:
                v.unsynced[chunk] = self._started + 1
            if v.chunks.get(chunk) is c and self._meta.vols.get(volume) is v:
                self._gen_dirty.add((volume, chunk))

        fut = asyncio.wrap_future(self._f.submit(self._sb.slot_offset(slot), len(data), land))
        fut.add_done_callback(landed)
        return fut

    async def mark_clean(self, volume: str, epoch: int, chunks: list[int]) -> None:
        v = self._volume(volume, epoch)
        # Their checksums must be durable before the clean mark (nothing recomputes a clean
        # chunk's), so in the sync before the one that carries it.
        self._csums.write_back_slots([c.slot for i in chunks if (c := v.chunks.get(i))])
        await self.flush()
        v = self._volume(volume, epoch)
        # A write that landed after the flush began is not durable yet, and one since the
        # write-back has entries still in memory: such a chunk stays dirty.
        done = [
            i
            for i in chunks
            if i in v.dirty
            and v.unsynced.get(i, 0) <= self._done
            and not ((c := v.chunks.get(i)) and self._csums.pending(c.slot))
        ]
        if not done:
            return
        for i in done:
            v.dirty.discard(i)
            v.suspect.discard(i)
            v.ready.discard(i)
            v.unsynced.pop(i, None)
        self._records.append(rec_clean(volume, done))
        await self.flush()

    def chunk_digest(self, volume: str, epoch: int, chunk: int, *, layer: str = "") -> bytes:
        """A digest of one layer's entry (data and block presence), b"" when it has none;
        ChecksumMismatch when its data is corrupt. What scrub compares across replicas."""
        v = self._volume(volume, epoch)
        _check_range(v, chunk, 0, 0)
        c = self._layer(volume, v, layer).get(chunk)
        if c is None:
            return b""
        h = hashlib.blake2b(self._read_entry(volume, v, chunk, c), digest_size=16)
        h.update(mask_to_bytes(c.present) or b"all")
        return h.digest()

    async def _repair_layer_entry(
        self,
        volume: str,
        v: VolState,
        layer: str,
        chunk: int,
        data: bytes | memoryview | None,
        generation: Generation,
        present: bytes | None,
    ) -> None:
        chunks = self._layer(volume, v, layer)
        c = chunks.get(chunk)
        if data is None:
            if c is not None:
                raise OutOfRange(f"volume {volume!r}: a snapshot's chunk cannot be removed")
            return
        if c is None:
            raise OutOfRange(f"volume {volume!r}: snapshot {layer} holds no chunk {chunk} here")
        # The entry's slot belongs to the snapshot alone and nobody writes to it: rewriting it
        # in place (data, then checksums) cannot race a writer.
        self._data_write(c.slot, 0, data)
        if len(data) < self._sb.chunk_size:
            self._data_punch(c.slot, len(data), self._sb.chunk_size - len(data))
        await self.flush()

    # ----- snapshots -----

    async def snapshot_create(
        self, volume: str, epoch: int, snap_id: str, name: str, created: float
    ) -> None:
        """Freeze the head into snapshot `snap_id`, durably. The caller keeps writes out
        meanwhile (the engine's barrier). Idempotent."""
        async with self._snap_lock(volume):
            v = self._volume(volume, epoch)
            if v.snap_index(snap_id) >= 0:
                return
            self._check_meta_room(snap_id)
            # A frozen entry is no head chunk, whose checksums a crash recomputes: its entries
            # are durable before the record that freezes it (in one sync, a power cut could
            # keep only the record).
            if self._csums.dirty:
                self._csums.write_back(everything=True)
                await self.flush()
                v = self._volume(volume, epoch)
                if v.snap_index(snap_id) >= 0:
                    return
            # Buffered generations of head chunks must be journaled before the freeze moves
            # those chunks out of the head (replay applies them in this order).
            for key in [k for k in self._gen_dirty if k[0] == volume]:
                self._gen_dirty.discard(key)
                c = v.chunks.get(key[1])
                if c is not None:
                    self._records.append(rec_generation(volume, key[1], c))
            # Head entries still empty (warmed by the previous snapshot, never written) would
            # freeze as entries holding nothing: give their slots back instead.
            for chunk, c in [(i, c) for i, c in v.chunks.items() if c.present == 0]:
                del v.chunks[chunk]
                self._records.append(rec_free(volume, chunk))
                self._csums.drop(c.slot)
                self._punched.append(c.slot)  # never written: still zero, reusable after sync
            self._csums.write_back_slots([c.slot for c in v.chunks.values()])  # raced writes
            layer = SnapLayer(snap_id, name, created, v.chunks)
            v.snaps.append(layer)
            v.chunks = {}
            self._records.append(rec_snapshot(volume, layer))
            # Chunks being written (in the dirty log) get their empty head entry now, in the
            # same sync: the first write after the snapshot to a hot chunk then costs what any
            # write costs, not a dirty-record sync of its own. Only from slots zeroed already.
            warm = [c for c in sorted(v.ready) if c in layer.chunks][: len(self._zeroed)]
            v.ready.difference_update(warm)
            for chunk in warm:
                entry = ChunkState(self._zeroed.pop(), present=0)
                v.chunks[chunk] = entry
                self._save_present(entry)
                self._records.append(rec_dirty(volume, chunk, entry.slot, True))
            await self.flush()
            if self._meta.vols.get(volume) is v:
                v.ready.update(c for c in warm if c in v.dirty and c in v.chunks)

    async def snapshot_delete(self, volume: str, epoch: int, snap_id: str) -> None:
        """Merge the snapshot's blocks into the layer above (every view stays the same), then
        drop it and free what only it held. Unknown snapshot: nothing to do."""
        async with self._snap_lock(volume):
            v = self._volume(volume, epoch)
            if v.snap_index(snap_id) < 0:
                return
            emptied: list[int] = []
            while True:
                # Phase 1: copy blocks the upper entry lacks into its slot (invisible until
                # its presence says so); move entries the upper layer lacks, by record only.
                copied: list[tuple[int, ChunkState, int]] = []
                for chunk in list(self._layer(volume, v, snap_id)):
                    v = self._volume(volume, epoch)
                    i = v.snap_index(snap_id)
                    lower = v.snaps[i].chunks.get(chunk)
                    if lower is None:
                        continue
                    upper = v.above(i).get(chunk)
                    if upper is not None and upper.present == 0 and i + 1 == len(v.snaps):
                        # An empty head entry: drop it, the snapshot's entry moves up instead.
                        del v.chunks[chunk]
                        self._records.append(rec_free(volume, chunk))
                        emptied.append(upper.slot)
                        upper = None
                    if upper is None:
                        v.above(i)[chunk] = v.snaps[i].chunks.pop(chunk)
                        self._records.append(rec_move_up(volume, snap_id, chunk))
                    elif upper.present is not None:
                        added = self._copy_missing(v, chunk, lower, upper)
                        copied.append((chunk, upper, added))
                    await asyncio.sleep(0)
                await self.flush()  # the copied data is durable before any presence names it
                v = self._volume(volume, epoch)
                i = v.snap_index(snap_id)
                upper_name = v.snaps[i + 1].id if i + 1 < len(v.snaps) else ""
                redo = False
                for chunk, upper, added in copied:
                    if v.above(i).get(chunk) is not upper:
                        redo = True  # replaced meanwhile (freed, reinstalled): copy again
                        continue
                    assert upper.present is not None
                    upper.present = _full_to_none(upper.present | added, v.chunk_len(chunk))
                    self._save_present(upper)
                    self._records.append(rec_present(volume, upper_name, chunk, added))
                    if upper_name == "":
                        self._gen_dirty.add((volume, chunk))
                if not redo:
                    break
            layer = v.snaps.pop(i)
            self._records.append(rec_drop_layer(volume, snap_id))
            await self._free_slots([c.slot for c in layer.chunks.values()] + emptied)

    async def revert(self, volume: str, epoch: int, snap_id: str) -> None:
        """Drop the head and every snapshot newer than `snap_id`: the volume reads as the
        snapshot again. Only for a volume nobody writes to (detached)."""
        async with self._snap_lock(volume):
            v = self._volume(volume, epoch)
            i = self._snap_index(volume, v, snap_id)
            slots = [c.slot for c in v.chunks.values()]
            slots += [c.slot for layer in v.snaps[i + 1 :] for c in layer.chunks.values()]
            del v.snaps[i + 1 :]
            v.chunks = {}
            self._gen_dirty = {k for k in self._gen_dirty if k[0] != volume}
            self._records.append(rec_revert(volume, snap_id))
            await self._free_slots(slots)

    async def _free_slots(self, slots: list[int]) -> None:
        """Slots no entry references any more (their records are buffered): once those records
        are durable (a replay must never bring back an entry whose slot was zeroed), zero the
        slots, and make them reusable once a sync made the zeros durable too."""
        await self.flush()
        await self._punch_off_loop(slots)
        self._punched.extend(slots)
        await self.flush()

    def _copy_missing(self, v: VolState, chunk: int, lower: ChunkState, upper: ChunkState) -> int:
        """Copy the blocks `lower` holds and `upper` lacks into upper's slot; their mask."""
        assert upper.present is not None
        blocks = -(-v.chunk_len(chunk) // BLOCK)
        added = 0
        b = 0
        while b < blocks:
            if upper.has(b) or not lower.has(b):
                b += 1
                continue
            start = b
            while b < blocks and not upper.has(b) and lower.has(b):
                b += 1
            off, n = start * BLOCK, min(b * BLOCK, v.chunk_len(chunk)) - start * BLOCK
            data = self._data_read("", chunk, lower, off, n)
            self._data_write(upper.slot, off, data)
            added |= ((1 << (b - start)) - 1) << start
        return added

    def _write_partial(
        self, v: VolState, chunk: int, c: ChunkState, offset: int, data: bytes | memoryview
    ) -> None:
        """Write into a head chunk that holds only some blocks: a block written in part gets
        the rest of its bytes from the layers below first. Synchronous, so atomic on the loop."""
        assert c.present is not None
        end = offset + len(data)
        first, last = offset // BLOCK, (end - 1) // BLOCK
        start = first * BLOCK
        stop = min((last + 1) * BLOCK, v.chunk_len(chunk))
        if (offset != start and not c.has(first)) or (end != stop and not c.has(last)):
            below = v.stack(chunk)[1:]
            buf = bytearray(self._read_view(below, start, stop - start, "", chunk))
            if c.has(first):
                n = min(BLOCK, stop - start)
                buf[:n] = self._data_read("", chunk, c, start, n)
            if last != first and c.has(last):
                tail = last * BLOCK
                buf[tail - start :] = self._data_read("", chunk, c, tail, stop - tail)
            buf[offset - start : end - start] = data
            self._data_write(c.slot, start, memoryview(buf), lazy=True)
        else:
            self._data_write(c.slot, offset, data, lazy=True)
        bits = ((1 << (last - first + 1)) - 1) << first
        c.present = _full_to_none(c.present | bits, v.chunk_len(chunk))
        self._save_present(c)

    # ----- slot data with per-block checksums

    def _data_write(
        self, slot: int, offset: int, data: bytes | memoryview, *, lazy: bool = False
    ) -> None:
        """Write into a slot and refresh the checksums of the blocks it touches. The data lands
        in the page cache; so do the checksums, at the next sync, or with `lazy` (a dirty head
        chunk's: recomputed when the store opens after a crash) once the chunk is cleaned."""
        # In pieces of at most 64 KiB: the kernel caches a buffered write in a folio as large
        # as the write, and every later 4 KiB write into a large folio costs ext4 a walk of all
        # its blocks (a 4 KiB pwrite into pages a 1 MiB write cached: 13-17 us, 64 KiB: 3.5-4
        # us). repl-1 4 KiB random writes after 1 MiB ones: 17-23k -> 31k IOPS (BENCHMARKS).
        at = self._sb.slot_offset(slot) + offset
        if len(data) <= _PAGE_CACHE_PIECE:  # the 4 KiB write this is for: no slicing
            self._f.pwrite(data, at)
        else:
            view = memoryview(data)
            for i in range(0, len(view), _PAGE_CACHE_PIECE):
                self._f.pwrite(view[i : i + _PAGE_CACHE_PIECE], at + i)
        self._refresh_csums(slot, offset, len(data), data, lazy=lazy)

    def _save_present(self, c: ChunkState) -> None:
        """The entry's block presence, next to its data in the page cache: a process crash
        loses the buffered journal record, not this (see _restore_present)."""
        n = self._sb.present_size
        raw = bytes(n) if c.present is None else c.present.to_bytes(n, "little")
        self._f.pwrite(raw, self._sb.present_at(c.slot))

    def _restore_present(self) -> None:
        """Blocking (open after a process crash in this boot). A partial head entry written
        since its last sync has blocks its journaled presence does not list yet."""
        for v in self._meta.vols.values():
            for chunk in v.dirty:
                c = v.chunks.get(chunk)
                if c is not None and c.present is not None:
                    raw = self._f.pread(self._sb.present_size, self._sb.present_at(c.slot))
                    mask = int.from_bytes(raw, "little")
                    c.present = _full_to_none(c.present | mask, v.chunk_len(chunk))

    def _data_punch(self, slot: int, offset: int, length: int, *, lazy: bool = False) -> None:
        self._f.punch(self._sb.slot_offset(slot) + offset, length)
        if offset == 0 and length == self._sb.chunk_size:
            self._f.punch(self._sb.csum_at(slot, 0), (self._sb.chunk_size // BLOCK) * CSUM_SIZE)
            self._f.punch(self._sb.present_at(slot), self._sb.present_size)
        else:
            self._refresh_csums(slot, offset, length, None, lazy=lazy)

    def _refresh_csums(
        self,
        slot: int,
        offset: int,
        length: int,
        data: bytes | memoryview | None,
        *,
        lazy: bool = False,
    ) -> None:
        if not length:
            return
        first = offset // BLOCK
        end = offset + length
        if data is None or offset % BLOCK or (end % BLOCK and end != self._sb.chunk_size):
            stop = min(-(-end // BLOCK) * BLOCK, self._sb.chunk_size)
            data = self._f.pread(stop - first * BLOCK, self._sb.slot_offset(slot) + first * BLOCK)
        self._csums.put(slot, first, block_csums(data), lazy=lazy)

    def _data_read(self, volume: str, chunk: int, c: ChunkState, offset: int, length: int) -> bytes:
        """Read from an entry's slot, checking every block's checksum. A mismatch is never
        returned as data: ChecksumMismatch, and a head entry's generation drops to (0, 0) so a
        rebuild copies the chunk again."""
        if not length:
            return b""
        first = offset // BLOCK
        start = first * BLOCK
        stop = min(-(-(offset + length) // BLOCK) * BLOCK, self._sb.chunk_size)
        raw = self._f.pread(stop - start, self._sb.slot_offset(c.slot) + start)
        blocks = -(-len(raw) // BLOCK)
        stored = self._csums.get(c.slot, first, blocks)
        if block_csums(raw) != stored:
            bad = next(
                i
                for i in range(blocks)
                if block_csums(raw[i * BLOCK : (i + 1) * BLOCK])
                != stored[i * CSUM_SIZE : (i + 1) * CSUM_SIZE]
            )
            self._quarantine(volume, chunk, c)
            raise ChecksumMismatch(
                f"volume {volume!r} chunk {chunk} block {first + bad}: data does not match its "
                "checksum (disk corruption); not served"
            )
        return raw[offset - start : offset - start + length]

    def _read_entry(self, volume: str, v: VolState, chunk: int, c: ChunkState) -> bytes:
        return self._data_read(volume, chunk, c, 0, v.chunk_len(chunk))

    def _quarantine(self, volume: str, chunk: int, c: ChunkState) -> None:
        v = self._meta.vols.get(volume)
        if v is not None and v.chunks.get(chunk) is c and (c.epoch, c.seq) != (0, 0):
            c.epoch, c.seq = 0, 0
            self._gen_dirty.add((volume, chunk))

    def _recompute_dirty_csums(self) -> None:
        """Blocking (open). A chunk written since its last clean mark may have its data and its
        checksums out of step after a crash (either write may be lost or torn): its content is
        whatever survived, which the engine reconciles across replicas anyway."""
        for v in self._meta.vols.values():
            for chunk in v.dirty:
                c = v.chunks.get(chunk)
                if c is not None:
                    self._refresh_csums(c.slot, 0, self._sb.chunk_size, None)
        self._csums.write_back()

    def _snap_lock(self, volume: str) -> asyncio.Lock:
        lock = self._snap_locks.get(volume)
        if lock is None:
            lock = self._snap_locks[volume] = asyncio.Lock()
        return lock

    def _snap_index(self, volume: str, v: VolState, snap_id: str) -> int:
        i = v.snap_index(snap_id)
        if i < 0:
            raise UnknownSnapshot(f"volume {volume!r} has no snapshot {snap_id!r}")
        return i

    def _layer(self, volume: str, v: VolState, layer: str) -> dict[int, ChunkState]:
        try:
            return v.layer_chunks(layer)
        except KeyError:
            raise UnknownSnapshot(f"volume {volume!r} has no snapshot {layer!r}") from None

    # ----- group commit -----

    async def flush(self) -> None:
        """Return once everything applied before the call is durable. A caller arriving while a
        sync runs waits for the next one, which then covers every such caller."""
        await self._flush_to(self._sync_needed())

    def flush_soon(self) -> asyncio.Future[None]:
        """`flush` as a future, shared by every caller that needs the same sync: a durable
        write started without a coroutine (the engine's `write_begin`) waits on it, and a
        group commit costs one task however many writes it covers."""
        need = self._sync_needed()
        fut = self._flushes.get(need)
        if fut is None:
            fut = self._flushes[need] = asyncio.ensure_future(self._flush_to(need))
            fut.add_done_callback(lambda _: self._flushes.pop(need, None))
        return fut

    def _sync_needed(self) -> int:
        """The number of the first sync that covers everything applied so far."""
        self._check_open()
        self._callers += 1
        if self._sync_task is not None and not self._sync_begun:
            # That sync has not looked at anything yet: everything applied before this call
            # (data written, records appended) is in what it will take and fdatasync.
            return self._started
        return self._started + 1

    async def _flush_to(self, need: int) -> None:
        while self._done < need:
            task = self._sync_task
            if task is None:
                self._started += 1
                self._sync_begun = False
                task = self._sync_task = asyncio.create_task(self._sync(self._started))
            await asyncio.shield(task)

    async def _sync(self, number: int) -> None:
        self._sync_begun = True
        punched, self._punched = self._punched, []
        callers, self._callers = self._callers, 0
        try:
            # First, on the loop: every entry changed before this sync began is in the page
            # cache before the fdatasync below (or the checkpoint's).
            self._csums.write_back()
            batch = self._take_records()
            if self.on_sync is not None:
                self.on_sync(callers, len(batch))
            blob = b"".join(encode_record(self._seq, r) for r in batch)
            if self._tail + len(blob) <= self._sb.journal_size:
                if blob:
                    self._f.pwrite(blob, self._sb.journal_offset + self._tail)
                    self._tail += len(blob)
                await asyncio.to_thread(self._f.fdatasync)
            else:
                # The journal is full: the checkpoint holds everything the batch would have.
                await asyncio.to_thread(self._write_checkpoint, *self._snapshot())
            self._done = number
            self._zeroed.extend(punched)
        except BaseException:
            self._unzeroed.update(punched)
            raise
        finally:
            self._sync_task = None

    def _take_records(self) -> list[Record]:
        batch, self._records = self._records, []
        gens, self._gen_dirty = self._gen_dirty, set()
        for name, i in gens:
            v = self._meta.vols.get(name)
            c = v.chunks.get(i) if v is not None else None
            if c is not None:
                batch.append(rec_generation(name, i, c))
        return batch

    def _snapshot(self) -> tuple[int, bytes]:
        """Next checkpoint from memory, which already holds every buffered record's change."""
        self._take_records()
        seq = self._seq + 1
        blob = encode_checkpoint(seq, self._meta.to_body())
        if len(blob) > self._sb.meta_size:
            raise NoSpace(f"metadata ({len(blob)} bytes) exceeds its area ({self._sb.meta_size})")
        return seq, blob

    def _write_checkpoint(self, seq: int, blob: bytes) -> None:
        """Blocking. Seq n goes to area n % 2, sparing the current one until n is durable."""
        self._f.pwrite(blob, self._sb.meta_area(seq))
        self._f.fdatasync()
        self._seq = seq
        self._tail = 0

    # ----- chunk bookkeeping -----

    async def _ready_chunk(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, allocate: bool
    ) -> tuple[VolState, ChunkState | None]:
        """Return the volume and chunk once the chunk's dirty record is durable (and, with
        `allocate`, it has a slot). Rechecks epoch and range after every wait: the volume may
        have been reopened, or deleted and created again."""
        while True:
            v = self._volume(volume, epoch)
            _check_range(v, chunk, offset, length)
            c = v.chunks.get(chunk)
            if (c is None and not allocate) or (c is not None and chunk in v.ready):
                return v, c
            await self._make_ready(volume, v, chunk, allocate)

    async def _make_ready(self, volume: str, v: VolState, chunk: int, allocate: bool) -> None:
        key = (volume, chunk)
        entry = self._chunk_locks.get(key)
        if entry is None:
            entry = self._chunk_locks[key] = _SharedLock()
        entry.users += 1
        try:
            async with entry.lock:
                if self._meta.vols.get(volume) is not v:
                    return
                c = v.chunks.get(chunk)
                if c is not None and chunk in v.ready:
                    return
                if c is None:
                    if not allocate:
                        return
                    slot = await self._take_slot()
                    if self._meta.vols.get(volume) is not v or chunk in v.chunks:
                        self._zeroed.append(slot)
                        return
                    # Over a snapshot's chunk the fresh entry holds no block yet (copy on
                    # write per block); otherwise the zeroed slot is the whole chunk.
                    partial = v.in_lower_layer(chunk)
                    v.chunks[chunk] = ChunkState(slot, present=0 if partial else None)
                    self._records.append(rec_dirty(volume, chunk, slot, partial))
                else:
                    self._records.append(rec_dirty(volume, chunk, None))
                v.dirty.add(chunk)
                await self.flush()
                if chunk in v.dirty:  # not cleaned meanwhile
                    v.ready.add(chunk)
        finally:
            entry.users -= 1
            if not entry.users:
                del self._chunk_locks[key]

    async def _take_slot(self) -> int:
        while not self._zeroed:
            async with self._refill:
                if self._zeroed:
                    break
                if self._prefill is not None:
                    await asyncio.gather(self._prefill, return_exceptions=True)
                if not self._unzeroed and not self._punched:
                    raise NoSpace(f"no free chunk slot on disk {self._sb.disk_id}")
                batch = [self._unzeroed.pop() for _ in range(min(_ZERO_BATCH, len(self._unzeroed)))]
                try:
                    await self._punch_off_loop(batch)
                except BaseException:
                    self._unzeroed.update(batch)
                    raise
                self._punched.extend(batch)
                await self.flush()
        slot = self._zeroed.pop()
        if len(self._zeroed) < _ZERO_BATCH and self._unzeroed and self._prefill is None:
            # Zero the next batch in the background: the next sync of any kind (the dirty
            # record of this very allocation, say) makes it durable, so a run of first writes
            # (after a snapshot, into a new volume) rarely waits for a sync of its own.
            self._prefill = asyncio.get_running_loop().create_task(self._zero_ahead())
        return slot

    async def _zero_ahead(self) -> None:
        batch = [self._unzeroed.pop() for _ in range(min(_ZERO_BATCH, len(self._unzeroed)))]
        try:
            await self._punch_off_loop(batch)
            self._punched.extend(batch)
        except BaseException:
            self._unzeroed.update(batch)
            raise
        finally:
            self._prefill = None

    async def _punch_off_loop(self, slots: list[int]) -> None:
        """Zero free slots in a worker thread; their checksum pages are forgotten first, on
        the loop, so no write-back puts old entries over the zeros."""
        for slot in slots:
            self._csums.drop(slot)
        await asyncio.to_thread(self._punch_slots, slots)

    def _punch_slots(self, slots: list[int]) -> None:
        for slot in slots:
            self._data_punch(slot, 0, self._sb.chunk_size)

    def _free_chunk(self, volume: str, v: VolState, chunk: int, c: ChunkState) -> None:
        del v.chunks[chunk]
        self._records.append(rec_free(volume, chunk))
        self._csums.drop(c.slot)
        self._data_punch(c.slot, 0, self._sb.chunk_size)
        # Reusable only after a sync makes both the free record and the zeros durable.
        self._punched.append(c.slot)
        v.unsynced[chunk] = self._started + 1

    def _written(
        self, volume: str, v: VolState, chunk: int, c: ChunkState, gen: Generation | None
    ) -> None:
        if gen is not None and gen > (c.epoch, c.seq):
            c.epoch, c.seq = gen
        self._gen_dirty.add((volume, chunk))
        v.unsynced[chunk] = self._started + 1

    def _lookup(self, volume: str) -> VolState:
        self._check_open()
        v = self._meta.vols.get(volume)
        if v is None:
            raise UnknownVolume(f"unknown volume {volume!r}")
        return v

    def _volume(self, volume: str, epoch: int) -> VolState:
        v = self._lookup(volume)
        if epoch < v.epoch:
            raise StaleEpoch(f"volume {volume!r}: epoch {epoch} < {v.epoch}")
        return v

    def _check_open(self) -> None:
        if self._closed:
            raise ReplicaError("chunk store is closed")


def _source(stack: list[ChunkState], block: int) -> ChunkState | None:
    for c in stack:
        if c.has(block):
            return c
    return None


def _full_to_none(mask: int | None, chunk_len: int) -> int | None:
    if mask is None:
        return None
    full = (1 << -(-chunk_len // BLOCK)) - 1
    return None if mask & full == full else mask


class _SharedLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


def _check_range(v: VolState, chunk: int, offset: int, length: int) -> None:
    if not 0 <= chunk < v.chunk_count() or offset < 0 or length < 0:
        raise OutOfRange(f"chunk {chunk} offset {offset} length {length} out of range")
    if offset + length > v.chunk_len(chunk):
        raise OutOfRange(
            f"chunk {chunk} offset {offset} length {length} past the chunk or the volume end"
        )


def _view(v: VolState) -> VolumeMeta:
    return VolumeMeta(
        size=v.size,
        chunk_size=v.chunk_size,
        epoch=v.epoch,
        sync_writes=v.sync_writes,
        dirty=set(v.dirty),
        unclean_dirty=bool(v.suspect),
    )

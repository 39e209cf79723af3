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

The store holds the volume map and the metadata journal (records buffered for the next sync,
the journal area, the two checkpoints); its parts do the rest, each in its own module:

    replica.store_io         the data path: reads and writes of head chunks, whole-chunk copies,
                             the dirty log's order (a chunk's dirty record before its data)
    replica.store_snapshots  snapshot layers: create, delete, revert, copy on write per block
    replica.store_blocks     slot bytes with a crc32c per 4 KiB block, and block presence
    replica.store_slots      free slots, zeroed durably before they are handed to a chunk
    replica.group_commit     every sync, one at a time (`flush`); the store does its work
    replica.store_state      what they share: the volume map, buffered records, the checks
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from replica.api import Generation
from replica.chunkmeta import Meta, Record, VolState, rec_delete, rec_generation, rec_volume
from replica.errors import DiskError, NoSpace, OutOfRange, StaleEpoch
from replica.fileio import BlockFile
from replica.group_commit import GroupCommit
from replica.ondisk import (
    BLOCK,
    DEFAULT_CHUNK,
    Superblock,
    decode_checkpoint,
    decode_records,
    decode_superblock,
    encode_checkpoint,
    encode_record,
    encode_superblock,
    layout,
)
from replica.store_blocks import Blocks
from replica.store_io import ChunkIO
from replica.store_slots import SlotPool
from replica.store_snapshots import Snapshots, layer_chunks
from replica.store_state import StoreState
from replica.sync_thread import SyncThread

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
        self._state = state = StoreState(f, sb, meta)
        self._f = f
        self._sb = sb
        self._meta = meta
        self._csums = state.csums
        self._seq = seq  # current checkpoint's seq, also the journal records' generation
        self._tail = 0  # journal bytes in use after that checkpoint
        # A hook told (flush callers, journal records) of each sync (the node feeds /metrics).
        self.on_sync: Callable[[int, int], None] | None = None
        self.unclean = unclean
        # The file's change count when the latest sync took its first step (-1: none yet).
        self._covered = -1
        self._syncs = SyncThread()  # fdatasync and checkpoints, off the loop
        self._commit = GroupCommit(state, self._sync, self._quiet)
        self._blocks = Blocks(f, sb, state.csums, state.quarantine)
        self._slots = SlotPool(
            set(range(sb.slots)) - meta.used_slots(),
            disk_id=sb.disk_id,
            csums=state.csums,
            blocks=self._blocks,
            flush=self._commit.flush,
        )
        snaps = Snapshots(state, self._blocks, self._slots, self._commit.flush)
        io = ChunkIO(state, self._blocks, self._slots, snaps, self._commit)
        # The calls the parts serve, bound straight to them: no extra frame per I/O.
        self.flush = self._commit.flush
        self.flush_soon = self._commit.flush_soon
        self.read = io.read
        self.write = io.write
        self.write_now = io.write_now
        self.trim = io.trim
        self.read_chunk = io.read_chunk
        self.write_chunk = io.write_chunk
        self.mark_clean = io.mark_clean
        self.chunk_digest = io.chunk_digest
        self.snapshots = snaps.snapshots
        self.snapshot_generations = snaps.generations
        self.snapshot_create = snaps.create
        self.snapshot_delete = snaps.delete
        self.revert = snaps.revert

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
            store._blocks.restore_present(meta.vols.values())
        if unclean:
            store._blocks.recompute_dirty_csums(meta.vols.values())
        store._write_checkpoint(*store._snapshot())
        return store

    async def close(self) -> None:
        """Checkpoint and mark the shutdown clean. The BlockFile stays open (caller owns it)."""
        if self._state.closed:
            return
        await self._slots.settle()
        await self.flush()
        self._state.closed = True
        try:
            await self._commit.idle()
            if self._csums.dirty:
                # A store opened clean recomputes nothing: every entry is durable before the
                # checkpoint that says clean (in one sync, a power cut could keep only the
                # latter).
                self._csums.write_back(everything=True)
                await self._syncs.run(self._f.fdatasync)
            self._meta.clean = True
            await self._checkpoint()
        finally:
            self._syncs.close()

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
        self._state.check_open()
        if size <= 0 or epoch < 0:
            raise OutOfRange(f"volume {volume!r}: bad size {size} or epoch {epoch}")
        v = self._meta.vols.get(volume)
        if v is None:
            self._state.check_meta_room(volume)
            v = VolState(size, self._sb.chunk_size, epoch, sync_writes)
            self._meta.vols[volume] = v
            self._state.records.append(rec_volume(volume, v))
        else:
            if epoch < v.epoch:
                raise StaleEpoch(f"volume {volume!r}: epoch {epoch} < {v.epoch}")
            if epoch > v.epoch or size > v.size or sync_writes != v.sync_writes:
                v.epoch = epoch
                v.size = max(v.size, size)
                v.sync_writes = sync_writes
                self._state.records.append(rec_volume(volume, v))
        # Even unchanged: an earlier open with this epoch may still be on its way to disk.
        await self.flush()
        return _view(v)

    def check_epoch(self, volume: str, epoch: int) -> None:
        self._state.volume(volume, epoch)

    def epoch_of(self, volume: str) -> int:
        """The highest epoch the volume was opened with; -1 for a volume not held here."""
        v = self._meta.vols.get(volume)
        return -1 if v is None else v.epoch

    async def delete_volume(self, volume: str) -> None:
        self._state.check_open()
        v = self._meta.vols.pop(volume, None)
        if v is None:
            return
        self._state.records.append(rec_delete(volume))
        slots = [c.slot for c in v.chunks.values()]
        slots += [c.slot for layer in v.snaps for c in layer.chunks.values()]
        # These slots belong to no one now, so zeroing them off the loop cannot race a writer.
        await self._slots.zero(slots)
        await self.flush()

    def generations(self, volume: str, *, layer: str = "") -> dict[int, Generation]:
        """One layer's chunks (the head by default): what a rebuild compares and copies."""
        v = self._state.lookup(volume)
        return {i: (c.epoch, c.seq) for i, c in layer_chunks(volume, v, layer).items()}

    def stats(self) -> StoreStats:
        chunks = sum(
            len(v.chunks) + sum(len(s.chunks) for s in v.snaps) for v in self._meta.vols.values()
        )
        capacity = self._sb.slots * self._sb.chunk_size
        used = chunks * self._sb.chunk_size
        return StoreStats(capacity=capacity, used=used, free=capacity - used, chunks=chunks)

    # ----- metadata journal -----

    async def _sync(self, callers: int) -> None:
        """One sync's work (GroupCommit runs one at a time, for `callers` flush callers)."""
        punched = self._slots.sync_begins()
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
                self._covered = self._f.changes  # what the fdatasync below makes durable
                await self._syncs.run(self._f.fdatasync)
            else:
                # The journal is full: the checkpoint holds everything the batch would have.
                self._covered = self._f.changes
                await self._checkpoint()
        except BaseException:
            self._slots.sync_failed(punched)
            raise
        self._slots.synced(punched)

    def _quiet(self) -> bool:
        """Nothing applied since the latest sync's first step: no write or punch reached the
        file, and no record, generation, checksum entry or punched slot waits for a sync."""
        st = self._state
        return (
            self._f.changes == self._covered
            and not st.records
            and not st.gen_dirty
            and not self._csums.due
            and not self._slots.punches_due
        )

    def _take_records(self) -> list[Record]:
        batch, self._state.records = self._state.records, []
        gens, self._state.gen_dirty = self._state.gen_dirty, set()
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

    async def _checkpoint(self) -> None:
        """The next checkpoint, taken on the loop and written on the sync thread."""
        seq, blob = self._snapshot()
        await self._syncs.run(lambda: self._write_checkpoint(seq, blob))

    def _write_checkpoint(self, seq: int, blob: bytes) -> None:
        """Blocking. Seq n goes to area n % 2, sparing the current one until n is durable."""
        self._f.pwrite(blob, self._sb.meta_area(seq))
        self._f.fdatasync()
        self._seq = seq
        self._tail = 0


def _view(v: VolState) -> VolumeMeta:
    return VolumeMeta(
        size=v.size,
        chunk_size=v.chunk_size,
        epoch=v.epoch,
        sync_writes=v.sync_writes,
        dirty=set(v.dirty),
        unclean_dirty=bool(v.suspect),
    )

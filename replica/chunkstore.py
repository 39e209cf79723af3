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
    store.read(volume, epoch, chunk, offset, length) -> bytes
    await store.trim(volume, epoch, chunk, offset, length, *, seq)
    await store.flush()
    store.generations(volume) -> dict[int, (epoch, seq)]
    await store.mark_clean(volume, epoch, chunks)
    store.read_chunk(volume, epoch, chunk) -> (bytes | None, (epoch, seq))
    await store.write_chunk(volume, epoch, chunk, data | None, (epoch, seq))
    await store.delete_volume(volume)
    store.stats() -> StoreStats
    await store.close()

Errors are replica.errors types: UnknownVolume, StaleEpoch (checked first; nothing changes),
OutOfRange, NoSpace, and the DiskError family from open.

Durability order (DRBD's activity log): a chunk's dirty record is durable before its data is
first touched; later writes to a dirty chunk go straight to the page cache. Generations are
buffered and journaled at the next sync: after a crash, dirty chunks are resynced anyway.
A slot is zeroed durably before it is handed to a chunk, so no chunk ever shows another
chunk's old data. All syncs go through one group-commit path (`flush`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from replica.chunkmeta import (
    ChunkState,
    Meta,
    Record,
    VolState,
    rec_clean,
    rec_delete,
    rec_dirty,
    rec_free,
    rec_generation,
    rec_volume,
)
from replica.errors import (
    DiskError,
    NoSpace,
    OutOfRange,
    ReplicaError,
    StaleEpoch,
    UnknownVolume,
)
from replica.fileio import BlockFile
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

Generation = tuple[int, int]
_ZERO_BATCH = 8  # slots zeroed per sync when the pool of zeroed free slots runs dry

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
        # Serialises first writes to one chunk, so two writers cannot both allocate it.
        self._chunk_locks: dict[tuple[str, int], _SharedLock] = {}
        self._started = 0
        self._done = 0
        self._sync_task: asyncio.Task[None] | None = None
        # The sync task has taken its first step (taken the records, started fdatasync):
        # until then it covers whatever is applied meanwhile, so callers join it.
        self._sync_begun = False
        self._closed = False
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
        store._write_checkpoint(*store._snapshot())
        return store

    async def close(self) -> None:
        """Checkpoint and mark the shutdown clean. The BlockFile stays open (caller owns it)."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        while self._sync_task is not None:
            await asyncio.shield(self._sync_task)
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

    async def delete_volume(self, volume: str) -> None:
        self._check_open()
        v = self._meta.vols.pop(volume, None)
        if v is None:
            return
        self._records.append(rec_delete(volume))
        slots = [c.slot for c in v.chunks.values()]
        # These slots belong to no one now, so zeroing them off the loop cannot race a writer.
        await asyncio.to_thread(self._punch_slots, slots)
        self._punched.extend(slots)
        await self.flush()

    def generations(self, volume: str) -> dict[int, Generation]:
        v = self._lookup(volume)
        return {i: (c.epoch, c.seq) for i, c in v.chunks.items()}

    def stats(self) -> StoreStats:
        chunks = sum(len(v.chunks) for v in self._meta.vols.values())
        capacity = self._sb.slots * self._sb.chunk_size
        used = chunks * self._sb.chunk_size
        return StoreStats(capacity=capacity, used=used, free=capacity - used, chunks=chunks)

    # ----- data path -----

    def read(self, volume: str, epoch: int, chunk: int, offset: int, length: int) -> bytes:
        v = self._volume(volume, epoch)
        _check_range(v, chunk, offset, length)
        c = v.chunks.get(chunk)
        if c is None:
            return bytes(length)
        return self._f.pread(length, self._sb.slot_offset(c.slot) + offset)

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
            self._f.pwrite(data, self._sb.slot_offset(c.slot) + offset)
            self._written(volume, v, chunk, c, (epoch, seq))
        if durable or v.sync_writes:
            await self.flush()

    async def trim(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, seq: int
    ) -> None:
        v = self._volume(volume, epoch)
        _check_range(v, chunk, offset, length)
        if not length:
            return
        v, c = await self._ready_chunk(volume, epoch, chunk, offset, length, allocate=False)
        if c is None:
            return  # unallocated already reads as zeros
        if offset == 0 and length == v.chunk_len(chunk):
            self._free_chunk(volume, v, chunk, c)
        else:
            # On the loop, not a thread: the slot must still be this chunk's when it lands.
            self._f.punch(self._sb.slot_offset(c.slot) + offset, length)
            self._written(volume, v, chunk, c, (epoch, seq))
        if v.sync_writes:
            await self.flush()

    def read_chunk(self, volume: str, epoch: int, chunk: int) -> tuple[bytes | None, Generation]:
        v = self._volume(volume, epoch)
        _check_range(v, chunk, 0, 0)
        c = v.chunks.get(chunk)
        if c is None:
            return None, (0, 0)
        return self._f.pread(v.chunk_len(chunk), self._sb.slot_offset(c.slot)), (c.epoch, c.seq)

    async def write_chunk(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        data: bytes | memoryview | None,
        generation: Generation,
    ) -> None:
        """Install a whole chunk (shorter data: the rest reads as zeros) durably, with exactly
        `generation`. The chunk stays dirty until mark_clean."""
        length = 0 if data is None else len(data)
        v = self._volume(volume, epoch)
        _check_range(v, chunk, 0, length)
        v, c = await self._ready_chunk(volume, epoch, chunk, 0, length, allocate=data is not None)
        if c is not None:
            if data is None:
                self._free_chunk(volume, v, chunk, c)
            else:
                base = self._sb.slot_offset(c.slot)
                self._f.pwrite(data, base)
                self._f.punch(base + len(data), self._sb.chunk_size - len(data))
                c.epoch, c.seq = generation
                self._written(volume, v, chunk, c, None)
        await self.flush()

    async def mark_clean(self, volume: str, epoch: int, chunks: list[int]) -> None:
        self._volume(volume, epoch)
        await self.flush()
        v = self._volume(volume, epoch)
        # A write that landed after the flush began is not durable yet: its chunk stays dirty.
        done = [i for i in chunks if i in v.dirty and v.unsynced.get(i, 0) <= self._done]
        if not done:
            return
        for i in done:
            v.dirty.discard(i)
            v.suspect.discard(i)
            v.ready.discard(i)
            v.unsynced.pop(i, None)
        self._records.append(rec_clean(volume, done))
        await self.flush()

    # ----- group commit -----

    async def flush(self) -> None:
        """Return once everything applied before the call is durable. A caller arriving while a
        sync runs waits for the next one, which then covers every such caller."""
        self._check_open()
        need = self._started + 1
        if self._sync_task is not None and not self._sync_begun:
            # That sync has not looked at anything yet: everything applied before this call
            # (data written, records appended) is in what it will take and fdatasync.
            need = self._started
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
        try:
            batch = self._take_records()
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
                slot = None
                if c is None:
                    if not allocate:
                        return
                    slot = await self._take_slot()
                    if self._meta.vols.get(volume) is not v or chunk in v.chunks:
                        self._zeroed.append(slot)
                        return
                    v.chunks[chunk] = ChunkState(slot)
                v.dirty.add(chunk)
                self._records.append(rec_dirty(volume, chunk, slot))
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
                if not self._unzeroed and not self._punched:
                    raise NoSpace(f"no free chunk slot on disk {self._sb.disk_id}")
                batch = [self._unzeroed.pop() for _ in range(min(_ZERO_BATCH, len(self._unzeroed)))]
                try:
                    await asyncio.to_thread(self._punch_slots, batch)
                except BaseException:
                    self._unzeroed.update(batch)
                    raise
                self._punched.extend(batch)
                await self.flush()
        return self._zeroed.pop()

    def _punch_slots(self, slots: list[int]) -> None:
        for slot in slots:
            self._f.punch(self._sb.slot_offset(slot), self._sb.chunk_size)

    def _free_chunk(self, volume: str, v: VolState, chunk: int, c: ChunkState) -> None:
        del v.chunks[chunk]
        self._records.append(rec_free(volume, chunk))
        self._f.punch(self._sb.slot_offset(c.slot), self._sb.chunk_size)
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

"""The chunk store's data path: reads and writes of head chunks, and whole-chunk copies.

Durability order (DRBD's activity log): a chunk's dirty record is durable before its data is
first touched; later writes to a dirty chunk go straight to the page cache. Generations are
buffered and journaled at the next sync: after a crash, dirty chunks are resynced anyway.
`write_now` and `read` are the fast path, called per I/O without a coroutine.
"""

from __future__ import annotations

import asyncio
import hashlib

from replica.api import ChunkCopy, Generation
from replica.chunkmeta import (
    ChunkState,
    VolState,
    mask_from_bytes,
    mask_to_bytes,
    rec_clean,
    rec_dirty,
    rec_free,
)
from replica.errors import OutOfRange
from replica.group_commit import GroupCommit
from replica.ondisk import BLOCK
from replica.store_blocks import Blocks, full_to_none
from replica.store_slots import SlotPool
from replica.store_snapshots import Snapshots, layer_chunks, snap_index
from replica.store_state import StoreState

_OFFLOAD_MIN = 64 << 10  # write_chunk data from this size lands in a worker thread
_LANDING = 1 << 62  # VolState.unsynced of a chunk whose bytes are still landing: no sync counts

__all__ = ["ChunkIO"]


class ChunkIO:
    def __init__(
        self,
        state: StoreState,
        blocks: Blocks,
        slots: SlotPool,
        snaps: Snapshots,
        commit: GroupCommit,
    ) -> None:
        self._state = state
        self._blocks = blocks
        self._slots = slots
        self._snaps = snaps
        self._commit = commit
        # Serialises first writes to one chunk, so two writers cannot both allocate it.
        self._chunk_locks: dict[tuple[str, int], _SharedLock] = {}

    def read(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, snapshot: str = ""
    ) -> bytes:
        """The head's view, or with `snapshot` that snapshot's (immutable: no epoch check)."""
        if snapshot:
            v = self._state.lookup(volume)
            _check_range(v, chunk, offset, length)
            stack = v.stack(chunk, snap_index(volume, v, snapshot))
            return self._snaps.read_view(stack, offset, length, volume, chunk)
        v = self._state.volume(volume, epoch)
        _check_range(v, chunk, offset, length)
        c = v.chunks.get(chunk)
        if c is not None and c.present is None:
            return self._blocks.read(volume, chunk, c, offset, length)
        if c is None and not v.snaps:
            return bytes(length)
        return self._snaps.read_view(v.stack(chunk), offset, length, volume, chunk)

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
        v = self._state.volume(volume, epoch)
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
            await self._commit.flush()

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
        v = self._state.volume(volume, epoch)
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
            self._blocks.write(c.slot, offset, data, lazy=True)
        else:
            self._snaps.write_partial(v, chunk, c, offset, data)
        self._written(volume, v, chunk, c, gen)

    async def trim(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, seq: int
    ) -> None:
        v = self._state.volume(volume, epoch)
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
            self._blocks.punch(c.slot, offset, length, lazy=True)
            self._written(volume, v, chunk, c, (epoch, seq))
        if v.sync_writes:
            await self._commit.flush()

    def read_chunk(self, volume: str, epoch: int, chunk: int, *, layer: str = "") -> ChunkCopy:
        """One layer's entry for the chunk, exactly: data, generation and block presence."""
        v = self._state.volume(volume, epoch)
        _check_range(v, chunk, 0, 0)
        c = layer_chunks(volume, v, layer).get(chunk)
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
        v = self._state.volume(volume, epoch)
        _check_range(v, chunk, 0, length)
        if layer:
            await self._snaps.repair(volume, v, layer, chunk, data, generation, present)
            return
        landing: asyncio.Future[None] | None = None
        offload = data is not None and length >= _OFFLOAD_MIN and length % BLOCK == 0
        if offload and chunk not in v.chunks and not v.in_lower_layer(chunk):
            assert data is not None
            landing = await self._install_fresh(volume, epoch, chunk, data, generation, present)
            if landing is not None:
                await asyncio.shield(landing)  # (as below)
                await self._commit.flush()
                v = self._state.meta.vols.get(volume) or v
                if chunk in v.dirty and chunk in v.chunks:
                    v.ready.add(chunk)
                return
        v, c = await self._ready_chunk(volume, epoch, chunk, 0, length, allocate=data is not None)
        if c is not None:
            if data is None:
                self._free_chunk(volume, v, chunk, c)
            elif offload:
                c.epoch, c.seq = generation
                c.present = full_to_none(mask_from_bytes(present), v.chunk_len(chunk))
                landing = self._land_chunk(volume, v, chunk, c, data)
                if len(data) < self._state.sb.chunk_size:
                    self._blocks.punch(c.slot, len(data), self._state.sb.chunk_size - len(data))
            else:
                self._blocks.write(c.slot, 0, data)
                if len(data) < self._state.sb.chunk_size:
                    self._blocks.punch(c.slot, len(data), self._state.sb.chunk_size - len(data))
                c.epoch, c.seq = generation
                c.present = full_to_none(mask_from_bytes(present), v.chunk_len(chunk))
                self._blocks.save_present(c)
                self._written(volume, v, chunk, c, None)
        if landing is not None:
            # The caller's buffer is in use until the bytes landed. Cancelled: they still
            # land, and the chunk stays unclean until a sync after that.
            await asyncio.shield(landing)
        await self._commit.flush()

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
        slot = await self._slots.take()
        v = self._state.meta.vols.get(volume)
        if v is None or epoch < v.epoch or chunk in v.chunks or v.in_lower_layer(chunk):
            self._slots.put_back(slot)  # still zeroed: never written
            self._state.volume(volume, epoch)  # unknown volume, stale epoch: the caller hears it
            return None
        try:
            _check_range(v, chunk, 0, len(data))  # the volume may have been made anew
        except OutOfRange:
            self._slots.put_back(slot)
            raise
        c = ChunkState(slot, present=None)
        v.chunks[chunk] = c
        self._state.records.append(rec_dirty(volume, chunk, slot, False))
        v.dirty.add(chunk)
        c.epoch, c.seq = generation
        c.present = full_to_none(mask_from_bytes(present), v.chunk_len(chunk))
        landing = self._land_chunk(volume, v, chunk, c, data)
        if len(data) < self._state.sb.chunk_size:
            self._blocks.punch(slot, len(data), self._state.sb.chunk_size - len(data))
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

        def landed(fut: asyncio.Future[None]) -> None:  # on the loop
            if fut.cancelled() or fut.exception() is not None:
                self._state.quarantine(volume, chunk, c)  # a rebuild copies it again
            if v.unsynced.get(chunk) == _LANDING:
                v.unsynced[chunk] = self._commit.started + 1
            if v.chunks.get(chunk) is c and self._state.meta.vols.get(volume) is v:
                self._state.gen_dirty.add((volume, chunk))

        fut = self._blocks.land(c, data)
        fut.add_done_callback(landed)
        return fut

    async def mark_clean(self, volume: str, epoch: int, chunks: list[int]) -> None:
        v = self._state.volume(volume, epoch)
        # Their checksums must be durable before the clean mark (nothing recomputes a clean
        # chunk's), so in the sync before the one that carries it.
        self._state.csums.write_back_slots([c.slot for i in chunks if (c := v.chunks.get(i))])
        await self._commit.flush()
        v = self._state.volume(volume, epoch)
        # A write that landed after the flush began is not durable yet, and one since the
        # write-back has entries still in memory: such a chunk stays dirty.
        done = [
            i
            for i in chunks
            if i in v.dirty
            and v.unsynced.get(i, 0) <= self._commit.done
            and not ((c := v.chunks.get(i)) and self._state.csums.pending(c.slot))
        ]
        if not done:
            return
        for i in done:
            v.dirty.discard(i)
            v.suspect.discard(i)
            v.ready.discard(i)
            v.unsynced.pop(i, None)
        self._state.records.append(rec_clean(volume, done))
        await self._commit.flush()

    def chunk_digest(self, volume: str, epoch: int, chunk: int, *, layer: str = "") -> bytes:
        """A digest of one layer's entry (data and block presence), b"" when it has none;
        ChecksumMismatch when its data is corrupt. What scrub compares across replicas."""
        v = self._state.volume(volume, epoch)
        _check_range(v, chunk, 0, 0)
        c = layer_chunks(volume, v, layer).get(chunk)
        if c is None:
            return b""
        h = hashlib.blake2b(self._read_entry(volume, v, chunk, c), digest_size=16)
        h.update(mask_to_bytes(c.present) or b"all")
        return h.digest()

    def _read_entry(self, volume: str, v: VolState, chunk: int, c: ChunkState) -> bytes:
        return self._blocks.read(volume, chunk, c, 0, v.chunk_len(chunk))

    # ----- chunk bookkeeping -----

    async def _ready_chunk(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, allocate: bool
    ) -> tuple[VolState, ChunkState | None]:
        """Return the volume and chunk once the chunk's dirty record is durable (and, with
        `allocate`, it has a slot). Rechecks epoch and range after every wait: the volume may
        have been reopened, or deleted and created again."""
        while True:
            v = self._state.volume(volume, epoch)
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
                if self._state.meta.vols.get(volume) is not v:
                    return
                c = v.chunks.get(chunk)
                if c is not None and chunk in v.ready:
                    return
                if c is None:
                    if not allocate:
                        return
                    slot = await self._slots.take()
                    if self._state.meta.vols.get(volume) is not v or chunk in v.chunks:
                        self._slots.put_back(slot)
                        return
                    # Over a snapshot's chunk the fresh entry holds no block yet (copy on
                    # write per block); otherwise the zeroed slot is the whole chunk.
                    partial = v.in_lower_layer(chunk)
                    v.chunks[chunk] = ChunkState(slot, present=0 if partial else None)
                    self._state.records.append(rec_dirty(volume, chunk, slot, partial))
                else:
                    self._state.records.append(rec_dirty(volume, chunk, None))
                v.dirty.add(chunk)
                await self._commit.flush()
                if chunk in v.dirty:  # not cleaned meanwhile
                    v.ready.add(chunk)
        finally:
            entry.users -= 1
            if not entry.users:
                del self._chunk_locks[key]

    def _free_chunk(self, volume: str, v: VolState, chunk: int, c: ChunkState) -> None:
        del v.chunks[chunk]
        self._state.records.append(rec_free(volume, chunk))
        self._state.csums.drop(c.slot)
        self._blocks.clear(c.slot)
        # Reusable only after a sync makes both the free record and the zeros durable.
        self._slots.free_after_sync(c.slot)
        v.unsynced[chunk] = self._commit.started + 1

    def _written(
        self, volume: str, v: VolState, chunk: int, c: ChunkState, gen: Generation | None
    ) -> None:
        if gen is not None and gen > (c.epoch, c.seq):
            c.epoch, c.seq = gen
        self._state.gen_dirty.add((volume, chunk))
        v.unsynced[chunk] = self._commit.started + 1


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

"""The chunk store's snapshots: layers of chunk entries that share blocks.

Snapshots are layers (see chunkmeta): a snapshot freezes the head's chunks; a later write
allocates a fresh head chunk that holds only the blocks written since (copy on write per
4 KiB block, reading a partial block's rest from below), so a snapshot never costs a chunk copy.
Deleting a snapshot merges its blocks into the layer above, which keeps every view unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from replica.api import Generation, SnapshotInfo
from replica.chunkmeta import (
    ChunkState,
    SnapLayer,
    VolState,
    rec_dirty,
    rec_drop_layer,
    rec_free,
    rec_generation,
    rec_move_up,
    rec_present,
    rec_revert,
    rec_snapshot,
)
from replica.errors import OutOfRange, UnknownSnapshot
from replica.ondisk import BLOCK
from replica.store_blocks import Blocks, full_to_none
from replica.store_slots import SlotPool
from replica.store_state import StoreState

__all__ = ["Snapshots", "layer_chunks", "snap_index"]


class Snapshots:
    def __init__(
        self,
        state: StoreState,
        blocks: Blocks,
        slots: SlotPool,
        flush: Callable[[], Awaitable[None]],
    ) -> None:
        self._state = state
        self._blocks = blocks
        self._slots = slots
        self._flush = flush
        self._locks: dict[str, asyncio.Lock] = {}

    def snapshots(self, volume: str) -> list[SnapshotInfo]:
        v = self._state.lookup(volume)
        return [SnapshotInfo(s.id, s.name, s.created) for s in v.snaps]

    def generations(self, volume: str, snap_id: str) -> dict[int, Generation]:
        """The snapshot's view: each chunk any layer up to it holds, with the generation of
        the topmost (later writes always carry higher generations)."""
        v = self._state.lookup(volume)
        top = snap_index(volume, v, snap_id)
        out: dict[int, Generation] = {}
        for layer in v.snaps[: top + 1]:
            out.update((i, (c.epoch, c.seq)) for i, c in layer.chunks.items())
        return out

    async def create(
        self, volume: str, epoch: int, snap_id: str, name: str, created: float
    ) -> None:
        """Freeze the head into snapshot `snap_id`, durably. The caller keeps writes out
        meanwhile (the engine's barrier). Idempotent."""
        async with self._lock(volume):
            v = self._state.volume(volume, epoch)
            if v.snap_index(snap_id) >= 0:
                return
            self._state.check_meta_room(snap_id)
            # A frozen entry is no head chunk, whose checksums a crash recomputes: its entries
            # are durable before the record that freezes it (in one sync, a power cut could
            # keep only the record).
            if self._state.csums.dirty:
                self._state.csums.write_back(everything=True)
                await self._flush()
                v = self._state.volume(volume, epoch)
                if v.snap_index(snap_id) >= 0:
                    return
            # Buffered generations of head chunks must be journaled before the freeze moves
            # those chunks out of the head (replay applies them in this order).
            for key in [k for k in self._state.gen_dirty if k[0] == volume]:
                self._state.gen_dirty.discard(key)
                c = v.chunks.get(key[1])
                if c is not None:
                    self._state.records.append(rec_generation(volume, key[1], c))
            # Head entries still empty (warmed by the previous snapshot, never written) would
            # freeze as entries holding nothing: give their slots back instead.
            for chunk, c in [(i, c) for i, c in v.chunks.items() if c.present == 0]:
                del v.chunks[chunk]
                self._state.records.append(rec_free(volume, chunk))
                self._state.csums.drop(c.slot)
                self._slots.free_after_sync(c.slot)  # never written: still zero
            self._state.csums.write_back_slots([c.slot for c in v.chunks.values()])  # raced writes
            layer = SnapLayer(snap_id, name, created, v.chunks)
            v.snaps.append(layer)
            v.chunks = {}
            self._state.records.append(rec_snapshot(volume, layer))
            # Chunks being written (in the dirty log) get their empty head entry now, in the
            # same sync: the first write after the snapshot to a hot chunk then costs what any
            # write costs, not a dirty-record sync of its own. Only from slots zeroed already.
            zeroed = self._slots.zeroed
            warm = [c for c in sorted(v.ready) if c in layer.chunks][: len(zeroed)]
            v.ready.difference_update(warm)
            for chunk in warm:
                entry = ChunkState(zeroed.pop(), present=0)
                v.chunks[chunk] = entry
                self._blocks.save_present(entry)
                self._state.records.append(rec_dirty(volume, chunk, entry.slot, True))
            await self._flush()
            if self._state.meta.vols.get(volume) is v:
                v.ready.update(c for c in warm if c in v.dirty and c in v.chunks)

    async def delete(self, volume: str, epoch: int, snap_id: str) -> None:
        """Merge the snapshot's blocks into the layer above (every view stays the same), then
        drop it and free what only it held. Unknown snapshot: nothing to do."""
        async with self._lock(volume):
            v = self._state.volume(volume, epoch)
            if v.snap_index(snap_id) < 0:
                return
            emptied: list[int] = []
            while True:
                # Phase 1: copy blocks the upper entry lacks into its slot (invisible until
                # its presence says so); move entries the upper layer lacks, by record only.
                copied: list[tuple[int, ChunkState, int]] = []
                for chunk in list(layer_chunks(volume, v, snap_id)):
                    v = self._state.volume(volume, epoch)
                    i = v.snap_index(snap_id)
                    lower = v.snaps[i].chunks.get(chunk)
                    if lower is None:
                        continue
                    upper = v.above(i).get(chunk)
                    if upper is not None and upper.present == 0 and i + 1 == len(v.snaps):
                        # An empty head entry: drop it, the snapshot's entry moves up instead.
                        del v.chunks[chunk]
                        self._state.records.append(rec_free(volume, chunk))
                        emptied.append(upper.slot)
                        upper = None
                    if upper is None:
                        v.above(i)[chunk] = v.snaps[i].chunks.pop(chunk)
                        self._state.records.append(rec_move_up(volume, snap_id, chunk))
                    elif upper.present is not None:
                        added = self._copy_missing(v, chunk, lower, upper)
                        copied.append((chunk, upper, added))
                    await asyncio.sleep(0)
                await self._flush()  # the copied data is durable before any presence names it
                v = self._state.volume(volume, epoch)
                i = v.snap_index(snap_id)
                upper_name = v.snaps[i + 1].id if i + 1 < len(v.snaps) else ""
                redo = False
                for chunk, upper, added in copied:
                    if v.above(i).get(chunk) is not upper:
                        redo = True  # replaced meanwhile (freed, reinstalled): copy again
                        continue
                    assert upper.present is not None
                    upper.present = full_to_none(upper.present | added, v.chunk_len(chunk))
                    self._blocks.save_present(upper)
                    self._state.records.append(rec_present(volume, upper_name, chunk, added))
                    if upper_name == "":
                        self._state.gen_dirty.add((volume, chunk))
                if not redo:
                    break
            layer = v.snaps.pop(i)
            self._state.records.append(rec_drop_layer(volume, snap_id))
            await self._free_slots([c.slot for c in layer.chunks.values()] + emptied)

    async def revert(self, volume: str, epoch: int, snap_id: str) -> None:
        """Drop the head and every snapshot newer than `snap_id`: the volume reads as the
        snapshot again. Only for a volume nobody writes to (detached)."""
        async with self._lock(volume):
            v = self._state.volume(volume, epoch)
            i = snap_index(volume, v, snap_id)
            slots = [c.slot for c in v.chunks.values()]
            slots += [c.slot for layer in v.snaps[i + 1 :] for c in layer.chunks.values()]
            del v.snaps[i + 1 :]
            v.chunks = {}
            self._state.gen_dirty = {k for k in self._state.gen_dirty if k[0] != volume}
            self._state.records.append(rec_revert(volume, snap_id))
            await self._free_slots(slots)

    def read_view(
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
                out[pos - offset : run - offset] = self._blocks.read(
                    volume, chunk, src, pos, run - pos
                )
            pos = run
        return bytes(out)

    def write_partial(
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
            buf = bytearray(self.read_view(below, start, stop - start, "", chunk))
            if c.has(first):
                n = min(BLOCK, stop - start)
                buf[:n] = self._blocks.read("", chunk, c, start, n)
            if last != first and c.has(last):
                tail = last * BLOCK
                buf[tail - start :] = self._blocks.read("", chunk, c, tail, stop - tail)
            buf[offset - start : end - start] = data
            self._blocks.write(c.slot, start, memoryview(buf), lazy=True)
        else:
            self._blocks.write(c.slot, offset, data, lazy=True)
        bits = ((1 << (last - first + 1)) - 1) << first
        c.present = full_to_none(c.present | bits, v.chunk_len(chunk))
        self._blocks.save_present(c)

    async def repair(
        self,
        volume: str,
        v: VolState,
        layer: str,
        chunk: int,
        data: bytes | memoryview | None,
        generation: Generation,
        present: bytes | None,
    ) -> None:
        """Rewrite a snapshot's entry in place (scrub), durably."""
        chunks = layer_chunks(volume, v, layer)
        c = chunks.get(chunk)
        if data is None:
            if c is not None:
                raise OutOfRange(f"volume {volume!r}: a snapshot's chunk cannot be removed")
            return
        if c is None:
            raise OutOfRange(f"volume {volume!r}: snapshot {layer} holds no chunk {chunk} here")
        # The entry's slot belongs to the snapshot alone and nobody writes to it: rewriting it
        # in place (data, then checksums) cannot race a writer.
        self._blocks.write(c.slot, 0, data)
        if len(data) < self._state.sb.chunk_size:
            self._blocks.punch(c.slot, len(data), self._state.sb.chunk_size - len(data))
        await self._flush()

    def _lock(self, volume: str) -> asyncio.Lock:
        lock = self._locks.get(volume)
        if lock is None:
            lock = self._locks[volume] = asyncio.Lock()
        return lock

    async def _free_slots(self, slots: list[int]) -> None:
        """Slots no entry references any more (their records are buffered): once those records
        are durable (a replay must never bring back an entry whose slot was zeroed), zero the
        slots, and make them reusable once a sync made the zeros durable too."""
        await self._flush()
        await self._slots.zero(slots)
        await self._flush()

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
            data = self._blocks.read("", chunk, lower, off, n)
            self._blocks.write(upper.slot, off, data)
            added |= ((1 << (b - start)) - 1) << start
        return added


def snap_index(volume: str, v: VolState, snap_id: str) -> int:
    """The snapshot's layer index; UnknownSnapshot if the volume has none by that id."""
    i = v.snap_index(snap_id)
    if i < 0:
        raise UnknownSnapshot(f"volume {volume!r} has no snapshot {snap_id!r}")
    return i


def layer_chunks(volume: str, v: VolState, layer: str) -> dict[int, ChunkState]:
    """One layer's chunks ("" = the head); UnknownSnapshot for an unknown snapshot id."""
    try:
        return v.layer_chunks(layer)
    except KeyError:
        raise UnknownSnapshot(f"volume {volume!r} has no snapshot {layer!r}") from None


def _source(stack: list[ChunkState], block: int) -> ChunkState | None:
    for c in stack:
        if c.has(block):
            return c
    return None

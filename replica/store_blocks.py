"""The bytes of the chunk store's slots: data with a crc32c per 4 KiB block, and block presence.

Each 4 KiB block has a crc32c, checked on every read; a written slot's entries stay in memory
(csumpages), a dirty head chunk's until the chunk is cleaned (a crash recomputes them), others
until the next sync. A partial (copy-on-write) entry's block presence is written next to its
data, so it survives a process crash in the page cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from replica.chunkmeta import ChunkState, VolState
from replica.csumpages import ChecksumPages
from replica.errors import ChecksumMismatch
from replica.fileio import BlockFile
from replica.ondisk import BLOCK, CSUM_SIZE, Superblock, block_csums

_PAGE_CACHE_PIECE = 64 << 10  # largest buffered data write (see Blocks.write)

__all__ = ["Blocks", "full_to_none"]


class Blocks:
    def __init__(
        self,
        f: BlockFile,
        sb: Superblock,
        csums: ChecksumPages,
        quarantine: Callable[[str, int, ChunkState], None],
    ) -> None:
        """`quarantine(volume, chunk, entry)`: told of an entry whose data failed its check."""
        self._f = f
        self._sb = sb
        self._csums = csums
        self._quarantine = quarantine

    def write(
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

    def read(self, volume: str, chunk: int, c: ChunkState, offset: int, length: int) -> bytes:
        """Read from an entry's slot, checking every block's checksum. A mismatch is never
        returned as data: ChecksumMismatch, and the entry is quarantined first (a head entry's
        generation drops to (0, 0), so a rebuild copies the chunk again)."""
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

    def punch(self, slot: int, offset: int, length: int, *, lazy: bool = False) -> None:
        self._f.punch(self._sb.slot_offset(slot) + offset, length)
        if offset == 0 and length == self._sb.chunk_size:
            self._f.punch(self._sb.csum_at(slot, 0), (self._sb.chunk_size // BLOCK) * CSUM_SIZE)
            self._f.punch(self._sb.present_at(slot), self._sb.present_size)
        else:
            self._refresh_csums(slot, offset, length, None, lazy=lazy)

    def clear(self, slot: int) -> None:
        """Zero a whole slot: data, checksum entries and block presence. Its checksum page
        must be dropped first (on the loop: this may run in a worker thread)."""
        self.punch(slot, 0, self._sb.chunk_size)

    def save_present(self, c: ChunkState) -> None:
        """The entry's block presence, next to its data in the page cache: a process crash
        loses the buffered journal record, not this (see restore_present)."""
        self._f.pwrite(self._present_bytes(c), self._sb.present_at(c.slot))

    def land(self, c: ChunkState, data: bytes | memoryview) -> asyncio.Future[None]:
        """Write a whole entry's bytes (from the slot's start), their checksums and its block
        presence (`c.present`, set already) in the file's worker thread, holding the slot's
        data range until they landed (see BlockFile.submit)."""
        slot = c.slot
        self._csums.drop(slot)  # the landing writes every entry of the slot
        mask = self._present_bytes(c)

        def land() -> None:  # in the file's worker thread, the range held
            self._f.pwrite_direct(data, self._sb.slot_offset(slot))
            # Checksums after data: every access to a slot's checksums follows one to its data.
            self._f.pwrite(block_csums(data), self._sb.csum_at(slot, 0))
            self._f.pwrite(mask, self._sb.present_at(slot))  # as save_present

        return asyncio.wrap_future(self._f.submit(self._sb.slot_offset(slot), len(data), land))

    def restore_present(self, vols: Iterable[VolState]) -> None:
        """Blocking (open after a process crash in this boot). A partial head entry written
        since its last sync has blocks its journaled presence does not list yet."""
        for v in vols:
            for chunk in v.dirty:
                c = v.chunks.get(chunk)
                if c is not None and c.present is not None:
                    raw = self._f.pread(self._sb.present_size, self._sb.present_at(c.slot))
                    mask = int.from_bytes(raw, "little")
                    c.present = full_to_none(c.present | mask, v.chunk_len(chunk))

    def recompute_dirty_csums(self, vols: Iterable[VolState]) -> None:
        """Blocking (open). A chunk written since its last clean mark may have its data and its
        checksums out of step after a crash (either write may be lost or torn): its content is
        whatever survived, which the engine reconciles across replicas anyway."""
        for v in vols:
            for chunk in v.dirty:
                c = v.chunks.get(chunk)
                if c is not None:
                    self._refresh_csums(c.slot, 0, self._sb.chunk_size, None)
        self._csums.write_back()

    def _present_bytes(self, c: ChunkState) -> bytes:
        n = self._sb.present_size
        return bytes(n) if c.present is None else c.present.to_bytes(n, "little")

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


def full_to_none(mask: int | None, chunk_len: int) -> int | None:
    """A block presence mask, None when it holds every block of the chunk."""
    if mask is None:
        return None
    full = (1 << -(-chunk_len // BLOCK)) - 1
    return None if mask & full == full else mask

"""The checksum entries of recently written slots, kept in memory between syncs.

Every 4 KiB write used to cost a second `pwrite` (its 4-byte entry) and every read a second
`pread`; here a written slot's entries (one page: 4 KiB per 4 MiB chunk) stay in memory, are
patched by writes and checked by reads, and reach the page cache in one `pwrite` per page.

When: an entry put `lazy` belongs to a head chunk written since its last clean mark (dirty),
whose checksums the store recomputes from its data whenever it opens after an unclean stop;
such an entry need not be durable before the chunk is marked clean (`write_back_slots`), frozen
into a snapshot or the store closes (`write_back(everything=True)`). Every other entry reaches
the file when the next sync begins (`write_back`). So a flush makes data pages durable, not
also one checksum page per chunk written (with random 4 KiB writes, as many pages again).

A page must be dropped (`drop`, unwritten entries and all) before its slot is punched, handed
out again or refilled by a worker thread (a rebuild's landing writes a whole chunk's entries
itself): a page that outlived that would check or overwrite the slot's new entries with old
ones. Only the event loop's thread touches this object.
"""

from __future__ import annotations

from replica.fileio import BlockFile
from replica.ondisk import BLOCK, CSUM_SIZE, Superblock

# 8,192 pages of 4 KiB: 32 MiB of memory for the entries of 32 GiB of recently written chunks.
DEFAULT_CAPACITY = 8192


class _Page:
    __slots__ = ("entries", "hi", "lo")

    def __init__(self, entries: bytearray) -> None:
        self.entries = entries
        # Byte range of entries changed since the page last reached the file (lo >= hi: none).
        self.lo = len(entries)
        self.hi = 0


class ChecksumPages:
    def __init__(self, f: BlockFile, sb: Superblock, capacity: int = DEFAULT_CAPACITY) -> None:
        self._f = f
        self._sb = sb
        self._capacity = capacity
        self._page_size = sb.chunk_size // BLOCK * CSUM_SIZE
        self._pages: dict[int, _Page] = {}  # slot -> page, oldest first (evicted first)
        self._dirty: dict[int, _Page] = {}  # to write at the next sync
        self._lazy: dict[int, _Page] = {}  # to write before the chunk is clean (see above)

    def __len__(self) -> int:
        return len(self._pages)

    @property
    def dirty(self) -> int:
        return len(self._dirty) + len(self._lazy)

    @property
    def due(self) -> bool:
        """Entries the next sync's write_back writes (lazy ones wait for their chunk)."""
        return bool(self._dirty)

    def get(self, slot: int, first: int, blocks: int) -> bytes:
        """The stored entries of `blocks` blocks from block `first` of the slot."""
        start = first * CSUM_SIZE
        stop = start + blocks * CSUM_SIZE
        page = self._pages.get(slot)
        if page is not None:
            return bytes(page.entries[start:stop])
        # Reads do not load pages: a slot only read costs what it did (one small pread).
        return self._f.pread(stop - start, self._sb.csum_at(slot, first))

    def put(self, slot: int, first: int, entries: bytes, *, lazy: bool = False) -> None:
        """Replace the entries from block `first` on; they reach the file at the next
        write_back (`lazy`: see the module docstring), or when the page is evicted."""
        start = first * CSUM_SIZE
        stop = start + len(entries)
        page = self._pages.get(slot)
        if page is None:
            if start == 0 and stop == self._page_size:
                page = _Page(bytearray(entries))
            else:
                page = _Page(bytearray(self._f.pread(self._page_size, self._sb.csum_at(slot, 0))))
            self._pages[slot] = page
            if len(self._pages) > self._capacity:
                self._evict()
        page.entries[start:stop] = entries
        if start < page.lo:
            page.lo = start
        if stop > page.hi:
            page.hi = stop
        if not lazy or slot in self._dirty:
            self._dirty[slot] = page
            self._lazy.pop(slot, None)
        else:
            self._lazy[slot] = page

    def pending(self, slot: int) -> bool:
        """The slot has entries not yet written to the file."""
        return slot in self._dirty or slot in self._lazy

    def drop(self, slot: int) -> None:
        """Forget the slot's page, entries not yet written back included."""
        if self._pages.pop(slot, None) is not None:
            self._dirty.pop(slot, None)
            self._lazy.pop(slot, None)

    def write_back(self, *, everything: bool = False) -> None:
        """Changed entries into the file (the page cache): the caller's fdatasync then makes
        them durable with everything else it covers. Lazy ones only with `everything`."""
        for dirty in (self._dirty, self._lazy) if everything else (self._dirty,):
            for slot, page in list(dirty.items()):
                self._write(slot, page)  # a failure leaves this page and the rest dirty
                del dirty[slot]

    def write_back_slots(self, slots: list[int]) -> None:
        """The slots' changed entries, lazy ones included (their chunks are being cleaned)."""
        for slot in slots:
            page = self._dirty.get(slot) or self._lazy.get(slot)
            if page is not None:
                self._write(slot, page)  # as in write_back: a failure leaves it dirty
                self._dirty.pop(slot, None)
                self._lazy.pop(slot, None)

    def _write(self, slot: int, page: _Page) -> None:
        self._f.pwrite(
            memoryview(page.entries)[page.lo : page.hi], self._sb.csum_at(slot, 0) + page.lo
        )
        page.lo, page.hi = len(page.entries), 0

    def _evict(self) -> None:
        slot = next(iter(self._pages))
        page = self._pages.pop(slot)
        if self._dirty.pop(slot, None) is not None or self._lazy.pop(slot, None) is not None:
            self._write(slot, page)

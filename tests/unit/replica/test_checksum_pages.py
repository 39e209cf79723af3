"""Checksum entries of written slots kept in memory until the store syncs."""

from __future__ import annotations

import contextlib

import pytest

from replica.chunkstore import ChunkStore
from replica.csumpages import ChecksumPages
from replica.fileio import VolatileFile
from replica.ondisk import BLOCK, CSUM_SIZE, block_csums

CHUNK = 64 << 10  # 16 blocks: a page of 64 bytes


class WriteLog(VolatileFile):
    """Records every pwrite's (offset, length)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.writes: list[tuple[int, int]] = []

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        self.writes.append((offset, len(data)))
        super().pwrite(data, offset)


def formatted(f: VolatileFile) -> ChunkStore:
    ChunkStore.format(f, cluster_id="c", node_id="n", disk_id="d", chunk_size=CHUNK)
    return ChunkStore.open(f, cluster_id="c", boot_id="boot-1")


def entries(n: int, fill: int) -> bytes:
    return bytes([fill]) * (n * CSUM_SIZE)


def test_entries_reach_the_file_at_write_back_in_one_write_per_page() -> None:
    f = WriteLog(1 << 20)
    store = formatted(f)
    sb = store.superblock
    pages = ChecksumPages(f, sb)
    f.writes.clear()
    pages.put(3, 2, entries(1, 0x11))
    pages.put(3, 5, entries(2, 0x22))
    assert pages.get(3, 2, 5) == entries(1, 0x11) + bytes(2 * CSUM_SIZE) + entries(2, 0x22)
    # Only the page's first load read the file; nothing is written yet.
    assert f.writes == []
    assert f.pread(CSUM_SIZE, sb.csum_at(3, 2)) == bytes(CSUM_SIZE)
    pages.write_back()
    # One write, from the first changed entry to the last.
    assert f.writes == [(sb.csum_at(3, 2), 5 * CSUM_SIZE)]
    assert f.pread(5 * CSUM_SIZE, sb.csum_at(3, 2)) == pages.get(3, 2, 5)
    pages.write_back()
    assert len(f.writes) == 1  # clean pages are not written again


def test_an_evicted_page_is_written_first_and_read_back_from_the_file() -> None:
    f = WriteLog(1 << 20)
    sb = formatted(f).superblock
    pages = ChecksumPages(f, sb, capacity=2)
    for slot in range(3):
        pages.put(slot, 0, entries(CHUNK // BLOCK, slot + 1))
    assert len(pages) == 2 and pages.dirty == 2
    assert f.pread(CSUM_SIZE, sb.csum_at(0, 0)) == entries(1, 1)
    assert pages.get(0, 4, 1) == entries(1, 1)  # from the file: reads load no page
    assert len(pages) == 2


def test_a_dropped_page_is_never_written() -> None:
    f = WriteLog(1 << 20)
    sb = formatted(f).superblock
    pages = ChecksumPages(f, sb)
    pages.put(1, 0, entries(1, 0x33))
    pages.drop(1)
    pages.write_back()
    assert pages.get(1, 0, 1) == bytes(CSUM_SIZE)
    assert f.pread(CSUM_SIZE, sb.csum_at(1, 0)) == bytes(CSUM_SIZE)


async def test_a_dirty_chunks_entries_reach_the_file_at_its_clean_mark_not_per_write() -> None:
    f = WriteLog(1 << 20)
    store = formatted(f)
    sb = store.superblock
    await store.open_volume("v", 1, 4 * CHUNK)
    await store.write("v", 1, 2, 0, b"\x01" * BLOCK, seq=1)  # allocates: syncs its dirty record
    slot = store._meta.vols["v"].chunks[2].slot  # the test reaches in to find the entries
    area = range(sb.csum_at(slot, 0), sb.csum_at(slot + 1, 0))
    f.writes.clear()
    for i in range(8):
        await store.write("v", 1, 2, i * BLOCK, bytes([i + 1]) * BLOCK, seq=2 + i)
    assert store.read("v", 1, 2, 3 * BLOCK, BLOCK) == b"\x04" * BLOCK  # checked in memory
    # A flush makes the data durable, not the entries: a crash recomputes a dirty chunk's.
    await store.flush()
    assert [w for w in f.writes if w[0] in area] == []
    await store.mark_clean("v", 1, [2])
    assert [w for w in f.writes if w[0] in area] == [(sb.csum_at(slot, 0), 8 * CSUM_SIZE)]
    # Durable with the clean mark: a store opened on what survives a power cut checks them.
    after = ChunkStore.open(VolatileFile.from_image(f.durable_image()), cluster_id="c")
    assert 2 not in after.volumes()["v"].dirty
    stored = after._csums.get(slot, 0, 8)
    assert stored == b"".join(block_csums(bytes([i + 1]) * BLOCK) for i in range(8))
    assert after.read("v", 1, 2, 0, 8 * BLOCK) == b"".join(bytes([i + 1]) * BLOCK for i in range(8))


async def test_after_a_power_cut_a_dirty_chunks_flushed_writes_read_back() -> None:
    f = VolatileFile(1 << 20)
    store = formatted(f)
    await store.open_volume("v", 1, 4 * CHUNK)
    await store.write("v", 1, 1, 0, b"\x05" * CHUNK, seq=1)
    await store.write("v", 1, 1, BLOCK, b"\x06" * BLOCK, seq=2, durable=True)
    after = ChunkStore.open(
        VolatileFile.from_image(f.durable_image()), cluster_id="c", boot_id="boot-2"
    )
    assert 1 in after.volumes()["v"].dirty
    want = b"\x05" * BLOCK + b"\x06" * BLOCK + b"\x05" * (CHUNK - 2 * BLOCK)
    assert after.read("v", 1, 1, 0, CHUNK) == want


async def test_a_snapshot_and_a_clean_close_take_every_entry_to_disk() -> None:
    f = VolatileFile(1 << 20)
    store = formatted(f)
    await store.open_volume("v", 1, 4 * CHUNK)
    await store.write("v", 1, 0, 0, b"\x07" * CHUNK, seq=1)
    await store.snapshot_create("v", 1, "s1", "one", 0.0)
    # The frozen entry is no head chunk: nothing would recompute its checksums after a cut.
    after = ChunkStore.open(
        VolatileFile.from_image(f.durable_image()), cluster_id="c", boot_id="boot-2"
    )
    assert after.read("v", 1, 0, 0, CHUNK, snapshot="s1") == b"\x07" * CHUNK
    await store.write("v", 1, 1, 0, b"\x08" * CHUNK, seq=2)
    await store.close()
    again = ChunkStore.open(VolatileFile.from_image(f.durable_image()), cluster_id="c")
    assert not again.unclean  # so nothing is recomputed: the entries were written
    assert again.read("v", 1, 1, 0, CHUNK) == b"\x08" * CHUNK


async def test_entries_lost_with_the_process_are_recomputed_when_the_store_opens() -> None:
    f = VolatileFile(1 << 20)
    store = formatted(f)
    await store.open_volume("v", 1, 4 * CHUNK)
    await store.write("v", 1, 1, 0, b"\x05" * CHUNK, seq=1)
    await store.flush()
    await store.write("v", 1, 1, BLOCK, b"\x06" * BLOCK, seq=2)  # its entry only in memory
    # The process dies: the page cache (f) keeps the data, the entry never reached it.
    again = ChunkStore.open(f, cluster_id="c", boot_id="boot-1")
    assert again.unclean
    want = b"\x05" * BLOCK + b"\x06" * BLOCK + b"\x05" * (CHUNK - 2 * BLOCK)
    assert again.read("v", 1, 1, 0, CHUNK) == want


class JournalOnlyCut(VolatileFile):
    """Loses power in its `cut_at`-th fdatasync once armed, keeping of the unsynced writes only
    those to the journal: the worst order for a record whose entries share its sync."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.journal = range(0)
        self.cut_at = 0
        self.image: bytes | None = None

    def fdatasync(self) -> None:
        self.cut_at -= 1
        if self.cut_at == 0:
            image = bytearray(self.durable_image())
            for offset, blob in self._pending:
                if offset in self.journal:
                    image[offset : offset + len(blob)] = blob
            self.image = bytes(image)
            raise OSError("power cut")
        super().fdatasync()


@pytest.mark.parametrize("cut_at", [1, 2, 3])
async def test_a_frozen_entrys_checksums_are_durable_before_the_record_freezing_it(
    cut_at: int,
) -> None:
    f = JournalOnlyCut(1 << 20)
    store = formatted(f)
    sb = store.superblock
    await store.open_volume("v", 1, 4 * CHUNK)
    await store.write("v", 1, 0, 0, b"\x09" * CHUNK, seq=1)
    f.journal = range(sb.journal_offset, sb.journal_offset + sb.journal_size)
    f.cut_at = cut_at
    with contextlib.suppress(OSError):  # no cut if the snapshot takes fewer syncs
        await store.snapshot_create("v", 1, "s1", "one", 0.0)
    image = f.image if f.image is not None else f.durable_image()
    after = ChunkStore.open(VolatileFile.from_image(image), cluster_id="c", boot_id="boot-2")
    if after.snapshots("v"):  # the record survived: so must the entries it froze
        assert after.read("v", 1, 0, 0, CHUNK, snapshot="s1") == b"\x09" * CHUNK

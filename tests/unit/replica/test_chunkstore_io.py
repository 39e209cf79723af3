"""Chunk store data path: thin provisioning, fencing, bounds, group commit, chunk copy."""

from __future__ import annotations

import asyncio
import time

import pytest

from replica.chunkstore import ChunkStore
from replica.errors import NoSpace, OutOfRange, StaleEpoch, UnknownVolume
from replica.fileio import VolatileFile

CHUNK = 64 << 10


class CountingFile(VolatileFile):
    """Counts fdatasyncs, each taking a while as on a real disk."""

    def __init__(self, size: int, sync_seconds: float = 0.0) -> None:
        super().__init__(size)
        self.sync_seconds = sync_seconds
        self.count = 0

    def fdatasync(self) -> None:
        self.count += 1
        time.sleep(self.sync_seconds)
        super().fdatasync()


async def new_store(size: int = 4 << 20, f: VolatileFile | None = None) -> ChunkStore:
    f = f if f is not None else VolatileFile(size)
    ChunkStore.format(f, cluster_id="c", node_id="n", disk_id="d", chunk_size=CHUNK)
    return ChunkStore.open(f, cluster_id="c")


async def test_thin_provisioning() -> None:
    store = await new_store()
    await store.open_volume("v", 1, 16 * CHUNK)
    assert store.read("v", 1, 7, 0, CHUNK) == bytes(CHUNK)
    assert store.stats().used == 0
    await store.write("v", 1, 7, 1000, b"x" * 10, seq=1)
    await store.write("v", 1, 3, 0, b"y", seq=2)
    stats = store.stats()
    assert (stats.used, stats.chunks) == (2 * CHUNK, 2)
    assert stats.free == stats.capacity - stats.used
    assert store.read("v", 1, 7, 990, 30) == bytes(10) + b"x" * 10 + bytes(10)

    await store.trim("v", 1, 7, 1002, 4, seq=3)  # partial: zeroed, slot kept
    assert store.read("v", 1, 7, 1000, 10) == b"xx" + bytes(4) + b"xxxx"
    assert store.stats().chunks == 2
    await store.trim("v", 1, 7, 0, CHUNK, seq=4)  # whole: slot freed
    assert store.stats().chunks == 1
    assert store.read("v", 1, 7, 0, CHUNK) == bytes(CHUNK)
    await store.trim("v", 1, 9, 0, 100, seq=5)  # unallocated: nothing to do
    assert store.stats().chunks == 1
    assert store.generations("v") == {3: (1, 2)}


async def test_reused_slot_does_not_leak_old_data() -> None:
    store = await new_store(size=1 << 20)
    slots = store.superblock.slots
    await store.open_volume("a", 1, slots * CHUNK)
    await store.open_volume("b", 1, slots * CHUNK)
    for i in range(slots):
        await store.write("a", 1, i, 0, b"\xaa" * CHUNK, seq=i)
    for i in range(slots):
        await store.trim("a", 1, i, 0, CHUNK, seq=100 + i)
    for i in range(slots):
        await store.write("b", 1, i, 10, b"b", seq=i)
        assert store.read("b", 1, i, 0, CHUNK) == bytes(10) + b"b" + bytes(CHUNK - 11)


async def test_no_space_leaves_the_store_consistent() -> None:
    f = VolatileFile(1 << 20)
    store = await new_store(f=f)
    slots = store.superblock.slots
    await store.open_volume("v", 1, (slots + 2) * CHUNK)
    for i in range(slots):
        await store.write("v", 1, i, 0, bytes([i + 1]) * 8, seq=i)
    with pytest.raises(NoSpace):
        await store.write("v", 1, slots, 0, b"z", seq=99)
    assert store.stats().free == 0
    assert store.volumes()["v"].dirty == set(range(slots))
    assert store.read("v", 1, slots, 0, 1) == b"\0"
    await store.write("v", 1, 0, 0, b"still", seq=100)  # allocated chunks keep working

    await store.trim("v", 1, 1, 0, CHUNK, seq=101)
    await store.write("v", 1, slots, 0, b"z", seq=102)
    await store.close()
    again = ChunkStore.open(VolatileFile.from_image(f.durable_image()))
    assert again.read("v", 1, 0, 0, 8) == b"still\x01\x01\x01"
    assert again.read("v", 1, 1, 0, 8) == bytes(8)
    assert again.read("v", 1, slots, 0, 1) == b"z"
    assert again.stats().free == 0


async def test_old_epochs_are_fenced_and_change_nothing() -> None:
    f = VolatileFile(4 << 20)
    store = await new_store(f=f)
    await store.open_volume("v", 4, 4 * CHUNK)
    await store.write("v", 4, 0, 0, b"four", seq=1)
    await store.open_volume("v", 5, 4 * CHUNK)
    before = (store.generations("v"), store.stats(), store.volumes())

    with pytest.raises(StaleEpoch):
        await store.write("v", 4, 0, 0, b"late", seq=2)
    with pytest.raises(StaleEpoch):
        await store.write("v", 4, 2, 0, b"late", seq=2)
    with pytest.raises(StaleEpoch):
        store.read("v", 4, 0, 0, 4)
    with pytest.raises(StaleEpoch):
        await store.trim("v", 4, 0, 0, CHUNK, seq=3)
    with pytest.raises(StaleEpoch):
        await store.write_chunk("v", 4, 1, b"x", (4, 9))
    with pytest.raises(StaleEpoch):
        store.read_chunk("v", 4, 0)
    with pytest.raises(StaleEpoch):
        await store.mark_clean("v", 4, [0])
    with pytest.raises(StaleEpoch):
        store.check_epoch("v", 4)
    with pytest.raises(StaleEpoch):
        await store.open_volume("v", 4, 4 * CHUNK)

    assert (store.generations("v"), store.stats(), store.volumes()) == before
    assert store.read("v", 5, 0, 0, 4) == b"four"
    store.check_epoch("v", 6)  # newer is fine; only open raises the stored epoch
    # The raised epoch is durable as soon as open_volume returned.
    after = ChunkStore.open(VolatileFile.from_image(f.durable_image()))
    with pytest.raises(StaleEpoch):
        after.check_epoch("v", 4)


async def test_write_racing_a_reopen_is_refused() -> None:
    store = await new_store()
    await store.open_volume("v", 1, 4 * CHUNK)
    # First write to a chunk waits for its dirty record; the epoch moves on meanwhile.
    late = asyncio.create_task(store.write("v", 1, 2, 0, b"old", seq=1))
    await asyncio.sleep(0)
    await store.open_volume("v", 2, 4 * CHUNK)
    with pytest.raises(StaleEpoch):
        await late
    assert store.read("v", 2, 2, 0, 3) == bytes(3)


async def test_bounds() -> None:
    store = await new_store()
    await store.open_volume("v", 1, 2 * CHUNK + 1000)  # last chunk is 1000 bytes
    bad = [
        (3, 0, 1),  # no such chunk
        (-1, 0, 1),
        (0, CHUNK - 1, 2),  # crosses the chunk end
        (0, -1, 1),
        (2, 999, 2),  # crosses the volume end
    ]
    for chunk, offset, length in bad:
        with pytest.raises(OutOfRange):
            await store.write("v", 1, chunk, offset, b"x" * length, seq=1)
        with pytest.raises(OutOfRange):
            store.read("v", 1, chunk, offset, length)
        with pytest.raises(OutOfRange):
            await store.trim("v", 1, chunk, offset, length, seq=1)
    with pytest.raises(OutOfRange):
        await store.write_chunk("v", 1, 2, b"x" * 1001, (1, 1))
    assert store.stats().chunks == 0
    assert store.volumes()["v"].dirty == set()
    await store.write("v", 1, 2, 998, b"ok", seq=1)
    await store.trim("v", 1, 2, 0, 1000, seq=2)  # the whole (short) last chunk
    assert store.stats().chunks == 0

    for call in (
        store.write("nope", 1, 0, 0, b"x", seq=1),
        store.trim("nope", 1, 0, 0, 1, seq=1),
        store.mark_clean("nope", 1, [0]),
        store.write_chunk("nope", 1, 0, None, (1, 1)),
    ):
        with pytest.raises(UnknownVolume):
            await call
    with pytest.raises(UnknownVolume):
        store.read("nope", 1, 0, 0, 1)
    with pytest.raises(UnknownVolume):
        store.generations("nope")


async def test_open_volume_grows_never_shrinks() -> None:
    store = await new_store()
    meta = await store.open_volume("v", 1, 2 * CHUNK, sync_writes=True)
    assert (meta.size, meta.chunk_size, meta.epoch, meta.sync_writes) == (2 * CHUNK, CHUNK, 1, True)
    assert (await store.open_volume("v", 1, 5 * CHUNK, sync_writes=True)).size == 5 * CHUNK
    assert (await store.open_volume("v", 2, CHUNK, sync_writes=True)).size == 5 * CHUNK
    await store.write("v", 2, 4, 0, b"new end", seq=1)


async def test_concurrent_flushes_share_syncs() -> None:
    f = CountingFile(4 << 20, sync_seconds=0.005)
    store = await new_store(f=f)
    await store.open_volume("v", 1, 4 * CHUNK)
    await store.write("v", 1, 0, 0, b"warm", seq=1)
    before = f.count
    for i in range(50):
        await store.write("v", 1, 0, i, b"w", seq=2 + i)  # dirty chunk: no sync
    assert f.count == before
    await asyncio.gather(*(store.flush() for _ in range(50)))
    assert f.count - before <= 3
    before = f.count
    await asyncio.gather(
        *(store.write("v", 1, 0, 100 + i, b"d", seq=100 + i, durable=True) for i in range(50))
    )
    assert f.count - before <= 3


async def test_durable_and_sync_writes_survive_power_loss() -> None:
    f = VolatileFile(4 << 20)
    store = await new_store(f=f)
    await store.open_volume("s", 1, 4 * CHUNK, sync_writes=True)
    await store.open_volume("v", 1, 4 * CHUNK)
    await store.write("v", 1, 0, 0, b"first", seq=1)  # dirty the chunk; then fast path
    await store.flush()
    await store.write("s", 1, 0, 0, b"sync", seq=1)
    await store.write("s", 1, 0, 0, b"SYNC", seq=2)
    await store.write("v", 1, 0, 0, b"fua", seq=2, durable=True)
    await store.write("v", 1, 0, 10, b"lost", seq=3)
    after = ChunkStore.open(VolatileFile.from_image(f.durable_image()))
    assert after.read("s", 1, 0, 0, 4) == b"SYNC"
    assert after.read("v", 1, 0, 0, 5) == b"fuast"
    assert after.read("v", 1, 0, 10, 4) == bytes(4)
    assert after.generations("s") == {0: (1, 2)}


async def test_concurrent_first_writes_allocate_once() -> None:
    store = await new_store()
    await store.open_volume("v", 1, 4 * CHUNK)
    await asyncio.gather(*(store.write("v", 1, 1, i * 10, b"%09d" % i, seq=i) for i in range(30)))
    assert store.stats().chunks == 1
    for i in range(30):
        assert store.read("v", 1, 1, i * 10, 9) == b"%09d" % i
    assert store.generations("v") == {1: (1, 29)}


async def test_write_chunk_read_chunk_round_trip() -> None:
    f = VolatileFile(4 << 20)
    store = await new_store(f=f)
    await store.open_volume("v", 3, 3 * CHUNK)
    assert store.read_chunk("v", 3, 0) == (None, (0, 0), None)
    data = bytes(range(256)) * (CHUNK // 256)
    await store.write_chunk("v", 3, 0, data, (2, 77))
    assert store.read_chunk("v", 3, 0) == (data, (2, 77), None)
    await store.write("v", 3, 1, 0, b"\xff" * CHUNK, seq=1)
    await store.write_chunk("v", 3, 1, b"short", (3, 5))  # the rest must read as zeros
    assert store.read_chunk("v", 3, 1) == (b"short" + bytes(CHUNK - 5), (3, 5), None)
    assert store.generations("v") == {0: (2, 77), 1: (3, 5)}
    assert store.volumes()["v"].dirty == {0, 1}

    after = ChunkStore.open(VolatileFile.from_image(f.durable_image()))
    assert after.read_chunk("v", 3, 0) == (data, (2, 77), None)
    await after.write_chunk("v", 3, 0, None, (3, 9))
    assert after.read_chunk("v", 3, 0) == (None, (0, 0), None)
    assert after.generations("v") == {1: (3, 5)}
    assert after.stats().chunks == 1


async def test_mark_clean_is_durable_and_skips_unflushed_chunks() -> None:
    f = VolatileFile(4 << 20)
    store = await new_store(f=f)
    await store.open_volume("v", 1, 4 * CHUNK)
    for i in range(3):
        await store.write("v", 1, i, 0, b"x", seq=i)
    await store.flush()
    await store.mark_clean("v", 1, [0, 1, 3])
    assert store.volumes()["v"].dirty == {2}
    # Written after being cleaned: dirty again, through the journal before the data.
    await store.write("v", 1, 0, 5, b"y", seq=9)
    assert store.volumes()["v"].dirty == {0, 2}
    after = ChunkStore.open(VolatileFile.from_image(f.durable_image()))
    assert after.volumes()["v"].dirty == {0, 2}

    # A write racing mark_clean's flush is not durable yet, so its chunk stays dirty.
    cleaning = asyncio.create_task(store.mark_clean("v", 1, [0, 2]))
    await asyncio.sleep(0)
    await store.write("v", 1, 2, 9, b"z", seq=10)
    await cleaning
    assert store.volumes()["v"].dirty == {2}


async def test_delete_volume_frees_its_chunks() -> None:
    f = VolatileFile(4 << 20)
    store = await new_store(f=f)
    await store.open_volume("v", 1, 8 * CHUNK)
    await store.open_volume("w", 1, 8 * CHUNK)
    for i in range(5):
        await store.write("v", 1, i, 0, b"v", seq=i)
    await store.write("w", 1, 0, 0, b"w", seq=1)
    await store.delete_volume("v")
    await store.delete_volume("v")  # unknown: no error
    assert set(store.volumes()) == {"w"}
    assert store.stats().chunks == 1
    after = ChunkStore.open(VolatileFile.from_image(f.durable_image()))
    assert set(after.volumes()) == {"w"}
    assert after.stats().chunks == 1
    await after.open_volume("v", 1, 8 * CHUNK)
    assert after.read("v", 1, 0, 0, 1) == b"\0"


class MetadataOnlyCut(VolatileFile):
    """Loses power in its `cut_at`-th fdatasync, keeping only the unsynced writes to the
    superblock, journal and checkpoints: the worst order a page cache may choose."""

    def __init__(self, image: bytes, data_offset: int, cut_at: int) -> None:
        super().__init__(len(image))
        super().pwrite(image, 0)
        super().fdatasync()
        self.data_offset = data_offset
        self.cut_at = cut_at
        self.image: bytes | None = None
        self.armed = False

    def fdatasync(self) -> None:
        self.cut_at -= self.armed
        if self.cut_at == 0:
            image = bytearray(self.durable_image())
            for offset, blob in self._pending:
                if offset < self.data_offset:
                    image[offset : offset + len(blob)] = blob
            self.image = bytes(image)
            raise OSError("power cut")
        super().fdatasync()


async def test_slot_is_zeroed_durably_before_it_is_handed_out() -> None:
    f = VolatileFile(1 << 20)
    store = await new_store(f=f)
    await store.open_volume("v", 1, 4 * CHUNK)
    await store.close()
    sb = store.superblock
    # Free slots holding old data, as after a crash that kept a free record but not its punch.
    f.pwrite(b"\xee" * (sb.slots * CHUNK), sb.data_offset)
    f.fdatasync()
    stale = f.durable_image()
    for cut_at in range(1, 5):
        g = MetadataOnlyCut(stale, sb.data_offset, cut_at)
        store = ChunkStore.open(g)
        await store.open_volume("v", 1, 4 * CHUNK)
        g.armed = True
        with pytest.raises(OSError, match="power cut"):
            while True:
                await store.write("v", 1, 0, 0, b"new", seq=1, durable=True)
        assert g.image is not None
        after = ChunkStore.open(VolatileFile.from_image(g.image))
        got = after.read("v", 1, 0, 0, CHUNK)
        assert got in (bytes(CHUNK), b"new" + bytes(CHUNK - 3)), f"cut at sync {cut_at}"


class LargestWrite(VolatileFile):
    """Records the largest single pwrite."""

    largest = 0

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        self.largest = max(self.largest, len(data))
        super().pwrite(data, offset)


async def test_a_large_write_reaches_the_page_cache_in_pieces_of_64k() -> None:
    """A buffered write is cached in a folio as large as the write, and a later 4 KiB write
    into a large folio costs ext4 a walk of all its blocks (13-17 us into 1 MiB folios against
    3.5-4 us into 64 KiB ones here): data goes to the page cache at most 64 KiB at a time."""
    f = LargestWrite(8 << 20)
    ChunkStore.format(f, cluster_id="c", node_id="n", disk_id="d", chunk_size=1 << 20)
    store = ChunkStore.open(f, cluster_id="c")
    await store.open_volume("v", 1, 4 << 20)
    data = bytes(range(256)) * 4096  # 1 MiB
    await store.write("v", 1, 1, 0, b"x", seq=1)  # the chunk exists: a plain buffered write
    f.largest = 0
    await store.write("v", 1, 1, 0, data, seq=2)
    assert 0 < f.largest <= 64 << 10
    assert store.read("v", 1, 1, 0, 1 << 20) == data


async def test_write_now_applies_only_to_a_ready_chunk_and_is_durable_after_a_flush() -> None:
    f = VolatileFile(4 << 20)
    store = await new_store(f=f)
    await store.open_volume("v", 1, 4 * CHUNK)
    before = (store.generations("v"), store.stats())
    # A chunk's first write must make its dirty record durable first: declined, nothing done.
    assert not store.write_now("v", 1, 2, 0, b"first", seq=1)
    assert (store.generations("v"), store.stats()) == before
    assert store.read("v", 1, 2, 0, 5) == bytes(5)
    await store.write("v", 1, 2, 0, b"first", seq=1)
    assert store.write_now("v", 1, 2, 100, b"at once", seq=2)
    assert store.read("v", 1, 2, 100, 7) == b"at once"
    assert store.generations("v") == {2: (1, 2)}
    with pytest.raises(StaleEpoch):
        await store.open_volume("v", 2, 4 * CHUNK)
        store.write_now("v", 1, 2, 0, b"late", seq=3)
    assert store.write_now("v", 2, 2, 200, b"epoch 2", seq=4)
    await store.flush()
    # Power cut: what a flush covered is there, checksums included (the chunk is dirty, so
    # they are recomputed from its data at open).
    crashed = ChunkStore.open(VolatileFile.from_image(f.durable_image()), cluster_id="c")
    await crashed.open_volume("v", 3, 4 * CHUNK)
    assert crashed.read("v", 3, 2, 100, 7) == b"at once"
    assert crashed.read("v", 3, 2, 200, 7) == b"epoch 2"
    assert crashed.generations("v") == {2: (2, 4)}


async def test_write_now_declines_sync_write_volumes() -> None:
    store = await new_store()
    await store.open_volume("v", 1, 4 * CHUNK, sync_writes=True)
    await store.write("v", 1, 0, 0, b"x", seq=1)
    assert not store.write_now("v", 1, 0, 0, b"y", seq=2)
    assert store.read("v", 1, 0, 0, 1) == b"x"

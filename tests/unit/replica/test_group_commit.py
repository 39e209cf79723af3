"""Group commit: a flush syncs exactly when something was applied since the latest sync took
its first step, and whatever a flush returned for is on the durable image."""

from __future__ import annotations

import asyncio
import errno
import threading

import pytest

from replica.chunkstore import ChunkStore
from replica.fileio import VolatileFile

CHUNK = 64 << 10


class ControlledFile(VolatileFile):
    """fdatasync that can be made to fail once, or to wait until released."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.fail_next = False
        self.hold = threading.Event()
        self.hold.set()
        self.began = threading.Event()

    def fdatasync(self) -> None:
        self.began.set()
        assert self.hold.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise OSError(errno.EIO, "injected")
        super().fdatasync()


async def store_on(f: VolatileFile) -> ChunkStore:
    ChunkStore.format(f, cluster_id="c", node_id="n", disk_id="d", chunk_size=CHUNK)
    store = ChunkStore.open(f, cluster_id="c")
    await store.open_volume("v", 1, 8 * CHUNK)
    return store


def durable(f: VolatileFile) -> ChunkStore:
    return ChunkStore.open(VolatileFile.from_image(f.durable_image()), cluster_id="c")


async def test_a_flush_with_nothing_applied_since_the_last_sync_costs_no_fdatasync() -> None:
    f = ControlledFile(8 << 20)
    store = await store_on(f)
    await store.write("v", 1, 0, 0, b"a" * 4096, seq=1)
    await store.flush()
    synced = f.syncs
    await store.flush()
    await store.flush_soon()
    assert f.syncs == synced  # nothing new: the latest sync covers it
    assert store.write_now("v", 1, 0, 4096, memoryview(b"b" * 4096), seq=2)
    await store.flush()
    assert f.syncs == synced + 1  # a write reached the file: a sync
    assert durable(f).read("v", 1, 0, 0, 8192) == b"a" * 4096 + b"b" * 4096
    await store.open_volume("v", 2, 8 * CHUNK)  # a record alone, no data write
    await store.flush()
    assert f.syncs == synced + 2
    assert durable(f).volumes()["v"].epoch == 2


async def test_a_durable_write_then_a_flush_is_one_sync() -> None:
    # A database commit on a --sync-writes volume: the write is synced before it returns, and
    # the flush after it finds nothing left to make durable.
    f = ControlledFile(8 << 20)
    store = await store_on(f)
    await store.open_volume("s", 1, 8 * CHUNK, sync_writes=True)
    await store.write("s", 1, 0, 0, b"x" * 4096, seq=1)  # the chunk's first write
    synced = f.syncs
    await store.write("s", 1, 0, 4096, b"y" * 4096, seq=2)
    await store.flush()
    assert f.syncs == synced + 1
    assert durable(f).read("s", 1, 0, 4096, 4096) == b"y" * 4096


async def test_after_a_failed_sync_the_next_flush_syncs_again() -> None:
    f = ControlledFile(8 << 20)
    store = await store_on(f)
    await store.flush()
    await store.write("v", 1, 0, 0, b"c" * 4096, seq=1)
    f.fail_next = True
    with pytest.raises(OSError):
        await store.flush()
    synced = f.syncs
    await store.flush()  # nothing applied since: still not covered by a completed sync
    assert f.syncs == synced + 1
    assert durable(f).read("v", 1, 0, 0, 4096) == b"c" * 4096


async def test_a_write_made_while_a_sync_runs_is_made_durable_by_the_next_flush() -> None:
    f = ControlledFile(8 << 20)
    store = await store_on(f)
    await store.write("v", 1, 0, 0, b"d" * 4096, seq=1)
    await store.flush()
    await store.write("v", 1, 0, 0, b"e" * 4096, seq=2)
    f.hold.clear()
    f.began.clear()
    first = asyncio.ensure_future(store.flush())
    assert await asyncio.to_thread(f.began.wait, 10)  # that sync took its first step
    assert store.write_now("v", 1, 0, 4096, memoryview(b"f" * 4096), seq=3)
    second = asyncio.ensure_future(store.flush())
    f.hold.set()
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert durable(f).read("v", 1, 0, 0, 8192) == b"e" * 4096 + b"f" * 4096
